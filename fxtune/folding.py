"""Fusion: evaluate each weight's adapters once and restore the original calls.

For every adapted weight, W' = f_n(...f_1(W)) is computed in float32 (float64 stays float64),
cast once to the base dtype, and put in a new module at the original path. The graph code
then equals the traced code again; no existing tensor is written.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import fx, nn

from .errors import FusionError
from .kinds import get_kind
from .basekeeping import forget_all, replaced_by, use_base
from .ownership import clone_graph_module, replace_submodule, shallow_module_copy
from .rewrite import rebuild
from .slots import AdapterSlot, all_slots, remove_slots


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else dtype


def _prepared(slot: AdapterSlot, dtype: torch.dtype) -> dict:
    inputs = {}
    for key, value in slot.inputs().items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise FusionError(
                    f"adapter '{slot.adapter}' ({slot.kind}) on '{slot.target}' holds NaN/inf in '{key}'; "
                    "refusing to fold it into the weight. Re-initialise or retrain that adapter (e.g. lower the lr)."
                )
            value = value.detach().to(dtype) if value.is_floating_point() else value.detach()
        inputs[key] = value
    return inputs


def folded_tensors(module: nn.Module, slots: list[AdapterSlot]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W', b') of one module under `slots`, in the module's dtype, as new tensors."""
    weight, bias = module.weight, getattr(module, "bias", None)
    if not slots:
        return weight.detach(), None if bias is None else bias.detach()
    dtype = _compute_dtype(weight.dtype)
    with torch.no_grad():
        w = weight.detach().to(dtype, copy=True)
        b = None if bias is None else bias.detach().to(dtype, copy=True)
        for slot in slots:
            kind = get_kind(slot.kind)
            inputs = _prepared(slot, dtype)
            w = kind.weight(w, **kind.accepted(kind.weight, inputs))
            if kind.bias is not None and b is not None:
                b = kind.bias(b, **kind.accepted(kind.bias, inputs))
        if not torch.isfinite(w).all() or (b is not None and not torch.isfinite(b).all()):
            raise FusionError(f"folding {[s.adapter for s in slots]} into '{slots[0].target}' gives NaN/inf")
    return w.to(weight.dtype), None if b is None else b.to(bias.dtype)


def fold(gm: fx.GraphModule, adapters: Iterable[str] | None = None) -> fx.GraphModule:
    """A new GraphModule with the chosen adapters folded into constant weights and no adapter left.

    `adapters=None` folds the active ones; otherwise the named ones. All others are dropped
    (a merged adapter cannot be dropped: it is already in the weight).
    """
    if not isinstance(gm, fx.GraphModule):
        raise FusionError(f"fuse expects a GraphModule (the result of fxtune.trace and passes), got {type(gm).__name__}")
    gm = clone_graph_module(gm)
    slots = all_slots(gm)
    if adapters is None:
        chosen = [s for s in slots if s.active]
    else:
        adapters = [adapters] if isinstance(adapters, str) else list(adapters)
        unknown = sorted(set(adapters) - {s.adapter for s in slots})
        if unknown:
            raise FusionError(f"no adapter named {unknown} in this GraphModule; it has {sorted({s.adapter for s in slots})}")
        chosen = [s for s in slots if s.adapter in adapters]
    dropped_merged = sorted({s.adapter for s in slots if s.merged and s not in chosen})
    if dropped_merged:
        raise FusionError(f"adapters {dropped_merged} are merged into the weights; fuse them too, or fxtune.unmerge(gm) first")
    replacements = {}
    for target in dict.fromkeys(s.target for s in slots):
        module = shallow_module_copy(gm.get_submodule(target))
        folded = [s for s in chosen if s.target == target]
        if not any(s.merged for s in folded):
            use_base(module, replaced_by(module) in {s.adapter for s in folded})
        forget_all(module)
        weight, bias = folded_tensors(module, [s for s in folded if not s.merged])
        module._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            module._parameters["bias"] = nn.Parameter(bias, requires_grad=False)
        replacements[target] = module
    for target, new in replacements.items():
        replace_submodule(gm, target, new)
    touched = {s.target for s in slots}
    remove_slots(gm, slots)
    rebuild(gm, touched)
    return gm
