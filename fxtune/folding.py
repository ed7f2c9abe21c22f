"""Fusion: evaluate each weight's adapters once and restore the original calls.

For every adapted weight, W' = f_n(...f_1(W)) is computed on its canonical view in float32
(float64 stays float64), cast once to the base dtype, and given as a new tensor to the
GraphModule's own copy of the owning module, at the original attribute path. The graph code
then equals the traced code again; no existing tensor is written.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import fx

from .errors import FusionError
from .kinds import get_kind
from .basekeeping import forget_all, replaced_by, use_base
from .ownership import clone_graph_module
from .rewrite import rebuild
from .sites import Site, canonical_sites
from .slots import AdapterSlot, all_slots, remove_slots
from .weights import Weights, keep_index


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


def folded_tensors(
    weight: torch.Tensor, bias: torch.Tensor | None, slots: list[AdapterSlot], kept: tuple[int, tuple[int, ...]] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W', b') of one canonical weight and bias under `slots`, in their dtype, as new tensors.

    `kept` (dim, indices) are entries never adapted (an embedding's padding row): they keep W's values.
    """
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
            if b is not None and kind.acts_on_bias(slot.config):
                b = kind.bias(b, **kind.accepted(kind.bias, inputs))
        if kept is not None:
            w = keep_index(w, weight.detach().to(dtype), kept[1], kept[0])
        if not torch.isfinite(w).all() or (b is not None and not torch.isfinite(b).all()):
            raise FusionError(f"folding {[s.adapter for s in slots]} into '{slots[0].target}' gives NaN/inf")
    return w.to(weight.dtype), None if b is None else b.to(bias.dtype)


def site_of(sites: dict[str, Site], target: str) -> Site:
    """The canonical site of an adapted weight; an adapter whose weight the graph no longer uses is an error."""
    site = sites.get(target)
    if site is None:
        raise FusionError(
            f"an adapter is attached to '{target}', but the graph no longer uses that weight at any call site; "
            "delete that adapter (fxtune.delete_adapter) or re-create it on the current graph"
        )
    return site


def _check_bias(site: Site, slots: list[AdapterSlot]) -> None:
    """A bias computed in the graph (not a parameter) cannot take a folded value."""
    if site.has_bias and site.ref.bias is None and any(get_kind(s.kind).acts_on_bias(s.config) for s in slots):
        raise FusionError(
            f"'{site.name}': {sorted({s.kind for s in slots})} change the bias, but this call's bias is computed in the "
            "graph, not a parameter, so it cannot be folded; keep this adapter unfused, or exclude the site"
        )


def fold_site(store: Weights, site: Site, slots: list[AdapterSlot]) -> None:
    """Writes W' (and b') of `slots` into the site's weight as new tensors: what fuse and merge share."""
    _check_bias(site, slots)
    weight, bias = store.read(site.ref)
    store.write(site.ref, *folded_tensors(weight, bias, slots, site.kept))


def fold(gm: fx.GraphModule, adapters: Iterable[str] | None = None) -> fx.GraphModule:
    """A new GraphModule with the chosen adapters folded into constant weights and no adapter left.

    `adapters=None` folds the active ones; otherwise the named ones. All others are dropped
    (a merged adapter cannot be dropped: it is already in the weight). Each weight gets new
    tensors at its own attribute path (tied weights stay tied); the code is the traced code again.
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
    store, sites = Weights(gm), canonical_sites(gm)
    for target in dict.fromkeys(s.target for s in slots):
        site = site_of(sites, target)
        folded = [s for s in chosen if s.target == target]
        if not any(s.merged for s in folded):
            use_base(store, site.ref, replaced_by(store, site.ref) in {s.adapter for s in folded})
        forget_all(store, site.ref)
        todo = [s for s in folded if not s.merged]
        if not todo:
            continue
        fold_site(store, site, todo)
    touched = {s.target for s in slots}
    remove_slots(gm, slots)
    rebuild(gm, touched)
    return gm
