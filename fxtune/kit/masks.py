"""Per-site channel masks (True = keep) for pruning-aware adapters, checked against each site.

A pass takes `masks={site name: {"in_mask": ..., "out_mask": ...}}` or a callable Site -> such
a dict (or None); `channel_masks` turns either into complete bool tensors, and `weight_mask`
lays a pair of channel masks over a weight's (out, in/groups, *kernel) layout. `masked_bias` and
`centre_tap` are the pieces the masked kinds' transforms share.
"""

from __future__ import annotations

from typing import Callable, Mapping, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import AdapterError
from ..graph.sites import Site

MaskSpec = Union[None, Mapping[str, Mapping[str, Tensor]], Callable[[Site], Union[Mapping[str, Tensor], None]]]

_MEANING = {"in_mask": "one entry per input channel/feature, all groups", "out_mask": "one entry per output channel/feature"}


def channel_masks(
    masks: MaskSpec,
    sites: list[Site],
    *,
    extra: Callable[[Site], dict[str, tuple[int, ...]]] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """{site name: {"in_mask", "out_mask", ...}} for `sites` (one per weight), all-True where left out.

    `extra(site)` names further masks a pass accepts and their shapes (e.g. a block mask).
    """
    if masks is not None and not callable(masks) and not isinstance(masks, Mapping):
        raise AdapterError(f"masks= must be a dict {{site name: {{'in_mask': ..., 'out_mask': ...}}}} or a callable Site -> such a dict; got {type(masks).__name__}")
    names = [s.name for s in sites]
    if isinstance(masks, Mapping):
        unknown = sorted(set(masks) - set(names))
        if unknown:
            raise AdapterError(
                f"masks= names no selected site: {unknown}; selected sites: {names} (a module called "
                "several times takes the name of its first call)"
            )
    found = {}
    for site in sites:
        given = masks(site) if callable(masks) else (masks or {}).get(site.name)
        shapes = {"in_mask": (site.in_features,), "out_mask": (site.out_features,), **(extra(site) if extra else {})}
        found[site.name] = _checked(site, {} if given is None else given, shapes)
    return found


def _checked(site: Site, given: Mapping[str, Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    if not isinstance(given, Mapping):
        raise AdapterError(f"masks for '{site.name}' must be a dict with keys {list(shapes)}, got {type(given).__name__}")
    unknown = sorted(set(given) - set(shapes))
    if unknown:
        raise AdapterError(f"masks for '{site.name}' has unknown keys {unknown}; the keys are {list(shapes)}")
    device = site.device
    checked = {}
    for key, shape in shapes.items():
        mask = given.get(key)
        if mask is None:
            checked[key] = torch.ones(shape, dtype=torch.bool, device=device)
            continue
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(shape):
            got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise AdapterError(
                f"masks['{site.name}']['{key}'] must be a bool tensor of shape {tuple(shape)} "
                f"({_MEANING.get(key, 'as the pass documents')}; True = keep), got {got}; "
                "build it with that length and dtype=torch.bool"
            )
        checked[key] = mask.detach().to(device)
    return checked


def weight_mask(weight: Tensor, in_mask: Tensor, out_mask: Tensor) -> Tensor:
    """Bool mask broadcastable to `weight` (out, in/groups, *kernel): entry [o, j] is kept when
    output channel o and the input channel it reads (j-th of o's group) are both kept."""
    out, per_group = weight.shape[0], weight.shape[1]
    groups = in_mask.numel() // per_group
    cols = in_mask.view(groups, 1, per_group).expand(groups, out // groups, per_group).reshape(out, per_group)
    return (out_mask[:, None] & cols).view(out, per_group, *([1] * (weight.dim() - 2)))


def masked_bias(b: Tensor, *, out_mask: Tensor) -> Tensor:
    """A bias whose masked output channels are zero, so their output is exactly zero."""
    return torch.where(out_mask, b, 0.0)


def centre_tap(delta: Tensor, w: Tensor) -> Tensor:
    """An (out, in/groups) delta as a kernel of W's shape, nonzero only at the (odd) kernel's centre."""
    pad = [k // 2 for k in reversed(w.shape[2:]) for _ in range(2)]
    return F.pad(delta.view(*delta.shape, *([1] * (w.dim() - 2))), pad)
