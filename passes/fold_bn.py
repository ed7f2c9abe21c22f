"""BatchNorm folding: an inference-mode BatchNorm right after a conv becomes that conv's weight and bias.

BN(conv(x)) = conv'(x) with W' = W·γ/√(var+ε) per output channel and b' = (b − mean)·γ/√(var+ε) + β,
computed in float64 and cast once to the weight's dtype. After `fold_bn(gm.eval())` on resnet:
    conv1 = self.conv1(x);  x = None
    relu = self.relu(conv1);  conv1 = None
The BatchNorm modules leave the tree; the folded weights are new tensors (the input is untouched).
"""

from __future__ import annotations

import torch
from torch import fx, nn

import fxtune
from fxtune import StructureError

CONVS = ("conv1d", "conv2d", "conv3d")


def following_batchnorm(gm: fx.GraphModule, site: fxtune.Site) -> fx.Node | None:
    """The BatchNorm module call that reads the site's output, if one does."""
    for user in site.node.users:
        if user.op == "call_module" and isinstance(gm.get_submodule(user.target), nn.modules.batchnorm._BatchNorm):
            if user.args and user.args[0] is site.node:
                return user
    return None


def why_not_foldable(gm: fx.GraphModule, group: list[fxtune.Site], bn: fx.Node) -> str | None:
    """Why this site's BatchNorm cannot be folded into it, if so."""
    site, norm = group[0], gm.get_submodule(bn.target)
    if len(group) > 1:
        return f"'{site.weight_name}' is called {len(group)} times; folding would change its other calls"
    if type(site.module) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return f"a {type(site.module).__name__}, whose forward may not be a plain convolution"
    if len(site.node.users) > 1:
        return f"its output is also read by {sorted(u.name for u in site.node.users if u is not bn)}, which need it unnormalized"
    if norm.running_mean is None or norm.running_var is None:
        return f"'{bn.target}' keeps no running statistics (track_running_stats=False), so it always normalizes per batch"
    if norm.num_features != site.out_features:
        return f"'{bn.target}' normalizes {norm.num_features} channels, the site makes {site.out_features}"
    return None


def folded(site: fxtune.Site, weight: torch.Tensor, norm: nn.Module) -> nn.Module:
    """A copy of the site's conv computing BN(conv(x)) with the statistics frozen."""
    mod = site.module
    scale = norm.running_var.double().add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.detach().double()
    shift = -norm.running_mean.double() * scale
    if mod.bias is not None:
        shift = shift + mod.bias.detach().double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().double()
    new = type(mod)(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                    mod.groups, bias=True, padding_mode=mod.padding_mode, device="meta", dtype=weight.dtype)
    view = (-1,) + (1,) * (weight.dim() - 1)
    new.weight = nn.Parameter((weight.double() * scale.view(view)).to(weight.dtype), requires_grad=False)
    new.bias = nn.Parameter(shift.to(weight.dtype), requires_grad=False)
    return new


@fxtune.register_pass
def fold_bn(
    gm: fx.GraphModule, targets: fxtune.Selector = None, *, exclude: fxtune.Selector = None
) -> fx.GraphModule:
    """Folds every inference-mode BatchNorm that reads a selected conv site's output into that conv.

    Only sites followed by a BatchNorm are candidates; one that cannot be folded (output read
    elsewhere too, module called twice, no running statistics) is left with a FxtuneWarning, and
    StructureError is raised if none can. A BatchNorm in training mode is a StructureError: call gm.eval().
    """
    rs = fxtune.Restructure(gm, name="fold_bn")
    chosen = rs.select(targets, exclude=exclude, kinds=CONVS,
                       where=lambda group: any(following_batchnorm(rs.gm, s) is not None for s in group))
    skipped = []
    for target, group in chosen.items():
        bn = following_batchnorm(rs.gm, group[0])
        if bn is None:
            skipped.append(f"'{target}': its first call is not followed by a BatchNorm")
            continue
        norm = rs.gm.get_submodule(bn.target)
        if norm.training:
            raise StructureError(
                f"'{bn.target}' (after '{target}') is in training mode: it normalizes with each batch's statistics, "
                "which no constant weight reproduces. Call gm.eval() before fold_bn"
            )
        why = why_not_foldable(rs.gm, group, bn)
        if why:
            skipped.append(f"'{target}': {why}")
            continue
        rs.swap(target, folded(group[0], rs.weight(target), norm), meta={"folded": bn.target})
        rs.bypass(bn)
    listing = "\n  ".join(skipped)
    if not rs.replaced:
        if skipped:
            detail = f":\n  {listing}"
        elif not any(n.op == "call_module" and isinstance(rs.gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)
                     for n in rs.gm.graph.nodes):
            detail = ("; the graph calls no BatchNorm module (fold_bn folds nn.BatchNorm* module calls, as "
                      "frontend='fx' traces them; torch.export graphs call batch-norm functions instead)")
        else:
            detail = "; no selected conv site's output goes straight into a BatchNorm"
        raise StructureError("fold_bn found no selected conv site followed by a foldable BatchNorm" + detail)
    if skipped:
        fxtune.warn(f"fold_bn left {len(skipped)} BatchNorm(s) unfolded:\n  {listing}")
    return rs.finish()
