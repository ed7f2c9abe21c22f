"""Managing the adapters of a GraphModule: list, activate, delete, merge, unmerge, unload.

Every function returns a new GraphModule and leaves its input usable. Merging keeps the
previous weight tensors, so unmerge and unload restore them bit-exactly (nothing is
subtracted or divided).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from tabulate import tabulate
from torch import fx

from ..errors import AdapterError
from ..graph.discovery import site_table
from ..graph.ownership import clone_graph_module
from ..graph.sites import SiteTable, WeightRef
from ..graph.weights import Weights
from .base_weights import ORIGINAL, PREMERGE, remember, replaced_by, restore, use_base
from .fusion import fold_site
from .realise import rebuild
from .slots import AdapterSlot, all_slots, remove_slots, require_adapters


def _refs(table: SiteTable, weights) -> dict[str, WeightRef]:
    """The weight reference of every adapted weight, from the graph's sites."""
    return {w: table.first(w, error=AdapterError).weight_ref for w in weights}


def _working_copy(gm: fx.GraphModule) -> tuple[fx.GraphModule, SiteTable, Weights]:
    """A clone to edit (code generated once, at its rebuild), its sites and its weights."""
    gm = clone_graph_module(gm)
    return gm, site_table(gm), Weights(gm)


@dataclass(frozen=True)
class AdapterInfo:
    """One named adapter: its kind(s), the weights it adapts, its parameter count and state."""

    name: str
    kind: str
    sites: tuple[str, ...]
    parameters: int
    active: bool
    merged: bool


class AdapterList(list):
    """A list of AdapterInfo that prints as a table."""

    def __str__(self) -> str:
        rows = [[a.name, a.kind, len(a.sites), f"{a.parameters:,}", a.active, a.merged] for a in self]
        return tabulate(rows, headers=["adapter", "kind", "sites", "parameters", "active", "merged"])


def adapters(gm: fx.GraphModule) -> AdapterList:
    """The adapters living in gm, in the order they were added."""
    by_name: dict[str, list[AdapterSlot]] = {}
    for slot in all_slots(gm):
        by_name.setdefault(slot.adapter, []).append(slot)
    seen: set[int] = set()
    return AdapterList(
        AdapterInfo(
            name=name,
            kind="+".join(sorted({s.kind for s in slots})),
            sites=tuple(s.weight_name for s in slots),
            parameters=sum(s.num_params(seen=seen) for s in slots),
            active=all(s.active for s in slots),
            merged=all(s.merged for s in slots),
        )
        for name, slots in by_name.items()
    )


def _names(gm: fx.GraphModule, names: str | Iterable[str] | None, *, default_active: bool) -> set[str]:
    if names is None:
        return {s.adapter for s in all_slots(gm) if s.active or not default_active}
    return set(require_adapters(gm, names))


def set_active(gm: fx.GraphModule, names: str | Iterable[str]) -> fx.GraphModule:
    """A GraphModule in which only `names` act (`[]` = the base model); the others keep their parameters."""
    chosen = _names(gm, names, default_active=False)
    if any(s.merged for s in all_slots(gm)):
        raise AdapterError("this GraphModule has merged adapters; call fxtune.unmerge(gm) before changing the active ones")
    gm, table, store = _working_copy(gm)
    weights = {s.weight_name for s in all_slots(gm)}
    for slot in all_slots(gm):
        slot.active = slot.adapter in chosen
    for ref in _refs(table, weights).values():
        use_base(store, ref, replaced_by(store, ref) in chosen)
    rebuild(gm, table, weights)
    return gm


def delete_adapter(gm: fx.GraphModule, name: str) -> fx.GraphModule:
    """A GraphModule without the adapter `name` (which must not be merged)."""
    require_adapters(gm, name)
    if any(s.merged for s in all_slots(gm) if s.adapter == name):
        raise AdapterError(f"adapter '{name}' is merged into the weights; call fxtune.unmerge(gm) first")
    gm, table, store = _working_copy(gm)
    doomed = [s for s in all_slots(gm) if s.adapter == name]
    weights = {s.weight_name for s in doomed}
    for ref in _refs(table, weights).values():
        if replaced_by(store, ref) == name:
            restore(store, ref, ORIGINAL)
    remove_slots(gm, doomed)
    rebuild(gm, table, weights)
    return gm


def merge(gm: fx.GraphModule, names: str | Iterable[str] | None = None) -> fx.GraphModule:
    """Folds the named (default: active) adapters into the weights, keeping them (frozen) for unmerge.

    Adapters compose in the order they were added, so on each weight the merged ones must come
    before every adapter that stays unmerged and active.
    """
    chosen = _names(gm, names, default_active=True)
    gm, table, store = _working_copy(gm)
    by_target: dict[str, list[AdapterSlot]] = {}
    for slot in all_slots(gm):
        by_target.setdefault(slot.weight_name, []).append(slot)
    for target, slots in by_target.items():
        todo = [s for s in slots if s.adapter in chosen and not s.merged]
        later = [s for s in slots if s.active and not s.merged and s.adapter not in chosen]
        if todo and later and later[0].order < todo[-1].order:
            raise AdapterError(
                f"on '{target}', adapter '{later[0].adapter}' acts before '{todo[-1].adapter}'; merging "
                f"only the later one would change the result. Merge both: fxtune.merge(gm, {sorted(chosen | {later[0].adapter})})"
            )
        if not todo:
            continue
        site = table.first(target, error=AdapterError)
        remember(store, site.weight_ref, PREMERGE)
        fold_site(store, site, todo)
        for slot in todo:
            slot.active = slot.merged = True
            slot.trainable_before_merge = {k: p.requires_grad for k, p in slot.named_parameters(recurse=False)}
            for p in slot.parameters(recurse=False):
                p.requires_grad_(False)
    rebuild(gm, table, set(by_target))
    return gm


def unmerge(gm: fx.GraphModule) -> fx.GraphModule:
    """Puts back the weights as they were before merging (the same bits) and re-activates the adapters' code."""
    gm, table, store = _working_copy(gm)
    merged = [s for s in all_slots(gm) if s.merged]
    weights = {s.weight_name for s in merged}
    for ref in _refs(table, weights).values():
        restore(store, ref, PREMERGE)
    for slot in merged:
        slot.merged = False
        flags, slot.trainable_before_merge = slot.trainable_before_merge, {}
        for name, p in slot.named_parameters(recurse=False):
            p.requires_grad_(flags.get(name, True))
    rebuild(gm, table, weights)
    return gm


def unload(gm: fx.GraphModule) -> fx.GraphModule:
    """The base GraphModule with no adapters: the traced weights, also after merges or PiSSA-style inits."""
    gm, table, store = _working_copy(gm)
    slots = all_slots(gm)
    weights = {s.weight_name for s in slots}
    for ref in _refs(table, weights).values():
        restore(store, ref, PREMERGE)
        restore(store, ref, ORIGINAL)
    remove_slots(gm, slots)
    rebuild(gm, table, weights)
    return gm
