"""SPLoPA (Hedegaard et al. 2022): a block-sparse delta from shared low-rank prototypes.

W' = M ⊙ (W + Σₖ Sₖ ⊗ Pₖ) with Pₖ = Cₖ@Rₖ of shape (p, q) and Sₖ of shape (out/p, cols/q); on a
conv the blocks tile W viewed as an (out, cols = in/groups·kernel) matrix. M keeps the entries
that the channel masks and `block_mask` keep; b' = m_out ⊙ b. A block of S is trainable (and
counted) while `block_mask` keeps it and any of its entries survives the channel masks
(`sp_lopa_s_mask`). The prototypes C, R are one Parameter pair per adapter and block shape,
registered in every slot of the GraphModule. After `sp_lopa(gm, "fc", block=(2, 2), ...)`:

    fc_weight = self.fc.weight
    fc_bias = self.fc.bias
    fc_sp_lopa_s = self.fxtune.default.fc.sp_lopa_s
    fc_sp_lopa_c = self.fxtune.default.fc.sp_lopa_c
    fc_sp_lopa_r = self.fxtune.default.fc.sp_lopa_r
    fc_in_mask = self.fxtune.default.fc.in_mask
    fc_out_mask = self.fxtune.default.fc.out_mask
    fc_block_mask = self.fxtune.default.fc.block_mask
    fc_sp_lopa_s_mask = self.fxtune.default.fc.sp_lopa_s_mask
    fc_sp_lopa_weight = fxtune_passes_sp_lopa_sp_lopa_weight(fc_weight, sp_lopa_s = fc_sp_lopa_s, sp_lopa_c = fc_sp_lopa_c, sp_lopa_r = fc_sp_lopa_r, in_mask = fc_in_mask, out_mask = fc_out_mask, block_mask = fc_block_mask, sp_lopa_s_mask = fc_sp_lopa_s_mask)
    fc_sp_lopa_bias = fxtune_kit_masks_masked_bias(fc_bias, out_mask = fc_out_mask)
    fc = torch._C._nn.linear(x, fc_sp_lopa_weight, fc_sp_lopa_bias)
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn

import fxtune
from fxtune import AdapterError, AdapterKind
from fxtune.kit import masked_bias

INIT_RANGE = 1e-6  # S ~ U(-1e-6, 1e-6), C and R kaiming-uniform: the reference implementation's init


def sp_lopa_weight(
    w: torch.Tensor,
    *,
    sp_lopa_s: torch.Tensor,
    sp_lopa_s_mask: torch.Tensor,
    sp_lopa_c: torch.Tensor,
    sp_lopa_r: torch.Tensor,
    in_mask: torch.Tensor,
    out_mask: torch.Tensor,
    block_mask: torch.Tensor,
) -> torch.Tensor:
    """The meaning: M ⊙ (W + Σₖ (Sₖ ⊙ S_mask) ⊗ (Cₖ@Rₖ)), the sum viewed as W's shape."""
    s = sp_lopa_s * sp_lopa_s_mask
    prototypes = sp_lopa_c @ sp_lopa_r
    (_, a, b), (p, q) = s.shape, prototypes.shape[1:]
    delta = torch.einsum("kab,kpq->apbq", s, prototypes).reshape(a * p, b * q)
    return torch.where(kept(w, in_mask, out_mask, block_mask), w + delta.view(w.shape), 0.0)



def kept(w: torch.Tensor, in_mask: torch.Tensor, out_mask: torch.Tensor, block_mask: torch.Tensor) -> torch.Tensor:
    """The entries of W that the channel masks keep and whose block `block_mask` keeps (W's shape)."""
    rows = w.shape[0]
    channels = fxtune.weight_mask(w, in_mask, out_mask).expand(w.shape).reshape(rows, -1)
    p, q = rows // block_mask.shape[0], channels.shape[1] // block_mask.shape[1]
    blocks = block_mask.repeat_interleave(p, 0).repeat_interleave(q, 1)
    return (channels & blocks).view(w.shape)


def _channel_axes(site: fxtune.Site, config: dict) -> dict:
    """S and block_mask entries cover p rows and q flattened columns (q / kernel volume input channels, if whole)."""
    p, q = config["block"]
    k = site.kernel_volume
    cols = None if q % k else q // k
    return {
        "sp_lopa_s": {"out": (1, p), "in_group": None if cols is None else (2, cols)},
        "sp_lopa_s_mask": {"out": (0, p), "in_group": None if cols is None else (1, cols)},
        "block_mask": {"out": (0, p), "in_group": None if cols is None else (1, cols)},
        "in_mask": {"in": 0},
        "out_mask": {"out": 0},
    }


KIND = fxtune.register_kind(AdapterKind("sp_lopa", weight=sp_lopa_weight, bias=masked_bias, channel_axes=_channel_axes))


def _prototypes(gm: fx.GraphModule, adapter: str, shapes: dict, like: torch.Tensor) -> dict[str, nn.Parameter]:
    """This GraphModule's prototypes of `adapter` for one block shape: made once, then reused."""
    block = (shapes["sp_lopa_c"][1], shapes["sp_lopa_r"][2])
    for slot in gm.modules():
        if isinstance(slot, fxtune.AdapterSlot) and slot.kind == "sp_lopa" and slot.adapter == adapter and tuple(slot.config["block"]) == block:
            old = {name: getattr(slot, name) for name in shapes}
            if any(tuple(old[name].shape) != shape for name, shape in shapes.items()):
                raise AdapterError(
                    f"adapter '{adapter}' already has SPLoPA prototypes {[tuple(t.shape) for t in old.values()]} "
                    f"for block {block} (on '{slot.target}'); use the same r and num_prototypes, or another adapter="
                )
            return old
    return {n: nn.Parameter(nn.init.kaiming_uniform_(like.new_empty(s), a=math.sqrt(5))) for n, s in shapes.items()}


@fxtune.register_pass
def sp_lopa(
    gm: fx.GraphModule,
    targets: fxtune.Selector = None,
    *,
    r: int = 1,
    num_prototypes: int = 64,
    block: tuple[int, int] = (32, 32),
    masks: fxtune.MaskSpec = None,
    adapter: str = "default",
    exclude: fxtune.Selector = None,
) -> fx.GraphModule:
    """Adds an SPLoPA adapter to every selected site; returns a new GraphModule (input untouched).

    Defaults follow the reference: rank-1 prototypes, 64 of them, 32×32 blocks. masks: {site:
    {"in_mask", "out_mask", "block_mask" (out/p, cols/q)}} or a callable Site -> that dict.
    """
    for name, value in (("r", r), ("num_prototypes", num_prototypes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AdapterError(f"{name} must be a positive int, got {value!r}")
    if not (isinstance(block, (tuple, list)) and len(block) == 2 and all(isinstance(v, int) and v > 0 for v in block)):
        raise AdapterError(f"block must be a pair (p, q) of positive ints, got {block!r}")
    p, q = block
    rw = fxtune.Rewrite(gm, kind="sp_lopa", adapter=adapter)
    chosen = rw.select(targets, exclude=exclude)
    firsts = [found[0] for found in chosen.values()]
    for site in firsts:
        cols = site.weight_numel // site.out_features
        if site.out_features % p or cols % q:
            raise AdapterError(
                f"block {tuple(block)} does not tile '{site.name}': its weight is {site.out_features}×{cols} as a matrix "
                "(out × in/groups·kernel); pass a block=(p, q) dividing both, or exclude this site"
            )
    found_masks = fxtune.channel_masks(
        masks, firsts, extra=lambda s: {"block_mask": (s.out_features // p, s.weight_numel // s.out_features // q)}
    )
    shapes = {"sp_lopa_c": (num_prototypes, p, r), "sp_lopa_r": (num_prototypes, r, q)}
    prototypes = _prototypes(rw.gm, adapter, shapes, rw.weight(firsts[0].target))
    for target, found in chosen.items():
        site, weight = found[0], rw.weight(target)
        m = found_masks[site.name]
        a, b = m["block_mask"].shape
        keep = kept(weight, m["in_mask"], m["out_mask"], m["block_mask"]).reshape(a, p, b, q)
        slot = rw.attach(
            target,
            params={"sp_lopa_s": weight.new_empty(num_prototypes, a, b).uniform_(-INIT_RANGE, INIT_RANGE)},
            buffers={**m, "sp_lopa_s_mask": keep.any(3).any(1)},
            config={"r": r, "num_prototypes": num_prototypes, "block": (p, q)},
        )
        for name, param in prototypes.items():
            slot.register_parameter(name, param)
    return rw.finish()
