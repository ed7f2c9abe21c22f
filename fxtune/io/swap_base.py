"""Swapping the base model under a GraphModule's adapters (e.g. a re-trained base)."""

from __future__ import annotations

from torch import fx, nn

from ..adapter.lifecycle import adapters, set_active
from ..errors import AdapterError
from ..frontends.trace import trace
from .adapter_files import adapter_state, apply_adapter_state


def swap_base(gm: fx.GraphModule, model: nn.Module, **trace_options) -> fx.GraphModule:
    """gm's adapters re-created, with the same tensors, on `model` (traced first unless a GraphModule).

    The new base must have the same sites with the same weight shapes; otherwise an
    AdapterError lists the mismatches. Neither gm nor model is changed.
    """
    found = adapters(gm)
    if not found:
        raise AdapterError("this GraphModule has no adapters to move to another base model")
    if any(a.merged for a in found):
        raise AdapterError("this GraphModule has merged adapters; call fxtune.unmerge(gm) before swapping the base")
    result = model if isinstance(model, fx.GraphModule) else trace(model, **trace_options)
    for info in found:
        meta, tensors = adapter_state(gm, info.name)
        result = apply_adapter_state(result, meta, tensors, source=f"adapter '{info.name}' of this GraphModule")
    inactive = [a.name for a in found if not a.active]
    if inactive:
        result = set_active(result, [a.name for a in found if a.active])
    return result
