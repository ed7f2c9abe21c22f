"""SPPaRA (Hedegaard et al. 2022): a dense delta on the kept channels, W' = M ⊙ (W + P).

P has the shape of the weight's (out, in/groups) matrix; on a conv with a larger (odd) kernel it
is added at the kernel's centre tap, like a parallel 1×1 residual. M keeps weight entry [o, j]
when output channel o and the input channel it reads are kept (`masks=`, True = keep); b' =
m_out ⊙ b. P's masked entries are multiplied by the `sp_para_p_mask` buffer (no gradient, not
counted). After `sp_para(gm, "fc", masks=...)` the site reads:

    fc_weight = self.fc.weight
    fc_bias = self.fc.bias
    fc_sp_para_p = self.fxtune.default.fc.sp_para_p
    fc_in_mask = self.fxtune.default.fc.in_mask
    fc_out_mask = self.fxtune.default.fc.out_mask
    fc_sp_para_p_mask = self.fxtune.default.fc.sp_para_p_mask
    fc_sp_para_weight = fxtune_passes_sp_para_sp_para_weight(fc_weight, sp_para_p = fc_sp_para_p, in_mask = fc_in_mask, out_mask = fc_out_mask, sp_para_p_mask = fc_sp_para_p_mask)
    fc_sp_para_bias = fxtune_kit_masks_masked_bias(fc_bias, out_mask = fc_out_mask)
    fc = torch._C._nn.linear(x, fc_sp_para_weight, fc_sp_para_bias)
"""

from __future__ import annotations

import torch
from torch import fx

import fxtune
from fxtune import AdapterError, AdapterKind
from fxtune.kit import centre_tap, masked_bias

INIT_RANGE = 1e-4  # P ~ U(-1e-4, 1e-4): the reference implementation's init


def sp_para_weight(
    w: torch.Tensor, *, sp_para_p: torch.Tensor, sp_para_p_mask: torch.Tensor, in_mask: torch.Tensor, out_mask: torch.Tensor
) -> torch.Tensor:
    """The meaning: M ⊙ (W + P), P at the centre tap of a conv's kernel."""
    delta = centre_tap(sp_para_p * sp_para_p_mask, w)
    return torch.where(fxtune.weight_mask(w, in_mask, out_mask), w + delta, 0.0)



KIND = fxtune.register_kind(AdapterKind(
    "sp_para", weight=sp_para_weight, bias=masked_bias,
    channel_axes={"sp_para_p": {"out": 0, "in_group": 1}, "sp_para_p_mask": {"out": 0, "in_group": 1},
                  "in_mask": {"in": 0}, "out_mask": {"out": 0}},
))


@fxtune.register_pass
def sp_para(
    gm: fx.GraphModule,
    targets: fxtune.Selector = None,
    *,
    masks: fxtune.MaskSpec = None,
    adapter: str = "default",
    exclude: fxtune.Selector = None,
) -> fx.GraphModule:
    """Adds an SPPaRA adapter to every selected site; returns a new GraphModule (input untouched).

    masks: {site: {"in_mask", "out_mask"}} or a callable Site -> that dict, True = keep (a mask
    left out keeps everything); stored in the slot. Conv kernels must have odd sizes.
    """
    rw = fxtune.Rewrite(gm, kind="sp_para", adapter=adapter)
    chosen = rw.select(targets, exclude=exclude)
    for found in chosen.values():
        site = found[0]
        if any(k % 2 == 0 for k in site.kernel_size):
            raise AdapterError(
                f"SPPaRA adds its delta at the kernel's centre tap, which needs odd kernel sizes, but "
                f"'{site.name}' has kernel {site.kernel_size}; exclude this site (or use sp_lora)"
            )
    found_masks = fxtune.channel_masks(masks, [found[0] for found in chosen.values()])
    for target, found in chosen.items():
        site, weight = found[0], rw.weight(target)
        m = found_masks[site.name]
        rw.attach(
            target,
            params={"sp_para_p": weight.new_empty(weight.shape[:2]).uniform_(-INIT_RANGE, INIT_RANGE)},
            buffers={
                "in_mask": m["in_mask"],
                "out_mask": m["out_mask"],
                "sp_para_p_mask": fxtune.weight_mask(weight, m["in_mask"], m["out_mask"]).flatten(1),
            },
        )
    return rw.finish()
