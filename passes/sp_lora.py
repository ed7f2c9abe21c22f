"""SPLoRA (Hedegaard et al. 2022): a low-rank delta under channel masks, W' = M ⊙ (W + s·C@R).

M keeps weight entry [o, j] when output channel o and the input channel it reads are kept
(`masks=`, True = keep); b' = m_out ⊙ b. C is (out, r) and R is (r, in/groups, *kernel), or
(r, in/groups) added at the kernel's centre tap with centre_tap=True. Entries of C and R that
reach only masked weights are multiplied by the `sp_lora_c_mask` / `sp_lora_r_mask` buffers
(no gradient, not counted). After `sp_lora(gm, "fc", r=2, masks=...)` the site reads:

    fc_weight = self.fc.weight
    fc_bias = self.fc.bias
    fc_sp_lora_c = self.fxtune.default.fc.sp_lora_c
    fc_sp_lora_r = self.fxtune.default.fc.sp_lora_r
    fc_in_mask = self.fxtune.default.fc.in_mask
    fc_out_mask = self.fxtune.default.fc.out_mask
    fc_sp_lora_c_mask = self.fxtune.default.fc.sp_lora_c_mask
    fc_sp_lora_r_mask = self.fxtune.default.fc.sp_lora_r_mask
    fc_sp_lora_weight = fxtune_passes_sp_lora_sp_lora_weight(fc_weight, sp_lora_c = fc_sp_lora_c, sp_lora_r = fc_sp_lora_r, in_mask = fc_in_mask, out_mask = fc_out_mask, sp_lora_c_mask = fc_sp_lora_c_mask, sp_lora_r_mask = fc_sp_lora_r_mask, scale = 1.0, centre_tap = False)
    fc_sp_lora_bias = fxtune_kit_masks_masked_bias(fc_bias, out_mask = fc_out_mask)
    fc = torch._C._nn.linear(x, fc_sp_lora_weight, fc_sp_lora_bias)
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn

import fxtune
from fxtune import AdapterError, AdapterKind
from fxtune.kit import centre_tap as at_centre
from fxtune.kit import masked_bias

INIT_RANGE = 1e-4  # C ~ U(-1e-4, 1e-4), R kaiming-uniform: the reference implementation's init


def sp_lora_weight(
    w: torch.Tensor,
    *,
    sp_lora_c: torch.Tensor,
    sp_lora_r: torch.Tensor,
    sp_lora_c_mask: torch.Tensor,
    sp_lora_r_mask: torch.Tensor,
    in_mask: torch.Tensor,
    out_mask: torch.Tensor,
    scale: float,
    centre_tap: bool,
) -> torch.Tensor:
    """The meaning: M ⊙ (W + scale · C@R), the delta shaped like W or put at W's centre tap."""
    delta = (sp_lora_c * sp_lora_c_mask) @ (sp_lora_r * sp_lora_r_mask).flatten(1)
    delta = at_centre(delta, w) if centre_tap else delta.view(w.shape)
    return torch.where(fxtune.weight_mask(w, in_mask, out_mask), w + scale * delta, 0.0)



KIND = fxtune.register_kind(AdapterKind(
    "sp_lora", weight=sp_lora_weight, bias=masked_bias,
    channel_axes={"sp_lora_c": {"out": 0}, "sp_lora_c_mask": {"out": 0}, "sp_lora_r": {"in_group": 1},
                  "sp_lora_r_mask": {"in_group": 1}, "in_mask": {"in": 0}, "out_mask": {"out": 0}},
))


@fxtune.register_pass
def sp_lora(
    gm: fx.GraphModule,
    targets: fxtune.Selector = None,
    *,
    r: int = 8,
    alpha: float | None = None,
    masks: fxtune.MaskSpec = None,
    centre_tap: bool = False,
    adapter: str = "default",
    exclude: fxtune.Selector = None,
) -> fx.GraphModule:
    """Adds an SPLoRA adapter to every selected site; returns a new GraphModule (input untouched).

    scale = alpha/r (alpha defaults to r). masks: {site: {"in_mask", "out_mask"}} or a callable
    Site -> that dict, True = keep (a mask left out keeps everything); stored in the slot.
    """
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"r must be a positive int, got {r!r}")
    alpha = r if alpha is None else alpha
    rw = fxtune.Rewrite(gm, kind="sp_lora", adapter=adapter)
    chosen = rw.select(targets, exclude=exclude)
    found_masks = fxtune.channel_masks(masks, [found[0] for found in chosen.values()])
    for target, found in chosen.items():
        site, weight = found[0], rw.weight(target)
        if centre_tap and any(k % 2 == 0 for k in site.kernel_size):
            raise AdapterError(
                f"centre_tap=True needs odd kernel sizes, but '{site.name}' has kernel {site.kernel_size}; "
                "use centre_tap=False (a delta over the whole kernel) or exclude this site"
            )
        tail = () if centre_tap else site.kernel_size
        c = weight.new_empty(site.out_features, r).uniform_(-INIT_RANGE, INIT_RANGE)
        rows = nn.init.kaiming_uniform_(weight.new_empty(r, weight.shape[1], *tail), a=math.sqrt(5))
        m = found_masks[site.name]
        keep = fxtune.weight_mask(weight, m["in_mask"], m["out_mask"]).flatten(1)
        rw.attach(
            target,
            params={"sp_lora_c": c, "sp_lora_r": rows},
            buffers={
                "in_mask": m["in_mask"],
                "out_mask": m["out_mask"],
                "sp_lora_c_mask": keep.any(1)[:, None],
                "sp_lora_r_mask": keep.any(0).view(1, -1, *([1] * len(tail))),
            },
            config={"r": r, "alpha": alpha, "scale": alpha / r, "centre_tap": centre_tap},
        )
    return rw.finish()
