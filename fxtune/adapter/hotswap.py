"""Switching adapters under torch.compile without recompiling: one fixed "live" adapter per site.

`set_active` returns a new GraphModule whose code reads the chosen adapter's attributes, so a
compiled model must compile again. `prepare_hotswap(gm, ["a", "b"])` instead adds an adapter
`live` (fxtune's own copies of a's tensors) that the code reads, and `hotswap(gm, "b")` copies
b's values into those same tensors: code, tensor identities and shapes stay, so nothing
recompiles (and CUDA graphs keep their data pointers). As PEFT's hotswap, the adapters must be
alike: same kind, sites, settings and tensor shapes on every site.
"""

from __future__ import annotations

import copy
import difflib
import keyword
from typing import Iterable

import torch
from torch import fx, nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import AdapterError
from ..graph.discovery import site_table
from ..graph.ownership import RECORD_PREFIX, clone_graph_module
from ..graph.weights import Weights
from .base_weights import replaced_by
from .realise import rebuild
from .slots import AdapterSlot, adapter_names, add_slot, all_slots, require_adapters

# + live name: a record in the GraphModule's __dict__ (clones copy it; graph files save it, so it is plain data):
# {"source": the adapter whose values the live one holds, or None; "checked": adapters whose code was checked to match}
STATE = RECORD_PREFIX + "hotswap:"


def prepare_hotswap(gm: fx.GraphModule, adapters: str | Iterable[str] | None = None, *, live: str = "live") -> fx.GraphModule:
    """A GraphModule whose code reads adapter `live`, holding a copy of one of `adapters` (default: all).

    `live` starts as the active one of `adapters` (else the first) and takes its place in the
    composition order; the others stay as inactive stores for `hotswap`. Returns a new GraphModule.
    """
    bank = _bank(gm, adapters)
    _check_name(gm, live)
    slots = {name: _slots_of(gm, name) for name in bank}
    first = slots[bank[0]]
    _check_base_kept(gm, bank, first)
    for name in bank[1:]:
        _check_alike(first, slots[name], bank[0], name)
    _check_order(gm, bank, first)
    active = [name for name in bank if all(s.active for s in slots[name].values())]
    source = active[0] if len(active) == 1 else bank[0]

    gm = clone_graph_module(gm)
    for slot in all_slots(gm):
        if slot.adapter in bank:
            slot.active = False
    originals = _slots_of(gm, source)
    copies = copy.deepcopy(list(originals.values()))  # one memo: tensors shared between sites stay shared
    for target, twin in zip(originals, copies):
        twin.adapter, twin.active = live, True
        twin.order = min(_slots_of(gm, name)[target].order for name in bank)
        add_slot(gm, twin)
    rebuild(gm, site_table(gm), set(originals))
    gm.__dict__[STATE + live] = {"source": source, "checked": []}
    for name in bank:
        if name != source:
            _check_code(gm, live, name)
    gm.__dict__[STATE + live]["checked"] = sorted(bank)
    return gm


def hotswap(gm: nn.Module, adapter: str, *, live: str = "live", source: fx.GraphModule | None = None) -> None:
    """In place: the live adapter takes the values of `adapter` (of `source`, default `gm` itself).

    Before that, the live values go back to the adapter of `gm` they were taken from, so training
    done on the live tensors is kept there. Only tensors fxtune owns are written; no recompile.
    `gm` may also be what torch.compile or DistributedDataParallel made of the prepared GraphModule.
    """
    gm = _unwrapped(gm)
    state = _state(gm, live)
    lives = _slots_of(gm, live)
    origin = gm if source is None else source
    if not isinstance(origin, fx.GraphModule):
        raise AdapterError(f"source must be an fxtune GraphModule holding adapter '{adapter}', got {type(origin).__name__}")
    if adapter == live and origin is gm:
        raise AdapterError(f"'{live}' is the live adapter itself; name the adapter whose values it should take")
    wanted = _slots_of(origin, adapter)
    if any(s.merged for s in wanted.values()):
        raise AdapterError(f"adapter '{adapter}' is merged into the weights; fxtune.unmerge it first")
    _check_base_kept(origin, [adapter], wanted)
    _check_alike(lives, wanted, live, adapter)
    if origin is not gm or adapter not in state["checked"]:
        _check_code(gm, live, adapter, wanted)
        if origin is gm:
            state["checked"] = sorted({*state["checked"], adapter})
    held = state["source"]
    with torch.no_grad():
        if held is not None and held in adapter_names(gm):
            for target, slot in _slots_of(gm, held).items():
                _copy_tensors(lives[target], slot)
        for target, slot in wanted.items():
            _copy_tensors(slot, lives[target])
    state["source"] = adapter if origin is gm else None


def live_source(gm: nn.Module, *, live: str = "live") -> str | None:
    """The adapter of `gm` whose values the live adapter holds (None after a swap from another GraphModule)."""
    return _state(_unwrapped(gm), live)["source"]


def _unwrapped(module: nn.Module) -> nn.Module:
    """The GraphModule inside torch.compile's and DistributedDataParallel's wrappers."""
    while True:
        if isinstance(module, DistributedDataParallel):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


def _state(gm: fx.GraphModule, live: str) -> dict:
    """The record `prepare_hotswap` left: which adapter the live one holds, which were checked."""
    state = gm.__dict__.get(STATE + live)
    if state is None:
        raise AdapterError(
            f"this GraphModule has no live adapter '{live}' to swap into; prepare it once with "
            f"gm = fxtune.prepare_hotswap(gm, [...adapters...], live='{live}') and compile that"
        )
    return state


def _check_name(gm: fx.GraphModule, live: str) -> None:
    """The live adapter's name becomes an attribute in the code: an unused identifier."""
    if not isinstance(live, str) or not live.isidentifier() or keyword.iskeyword(live) or hasattr(nn.Module(), live):
        raise AdapterError(f"live={live!r} cannot name an adapter: use a Python identifier that is no keyword (e.g. 'live')")
    if live in adapter_names(gm):
        raise AdapterError(f"this GraphModule already has an adapter named '{live}'; choose another live= name")


def _bank(gm: fx.GraphModule, adapters: str | Iterable[str] | None) -> list[str]:
    """The adapters to swap among, in the order they were added, checked to exist and be unmerged."""
    known = adapter_names(gm)
    if not known:
        raise AdapterError("this GraphModule has no adapters to hot-swap; add some first (e.g. lora(gm, adapter='a'))")
    chosen = known if adapters is None else require_adapters(gm, adapters)
    if not chosen:
        raise AdapterError(f"no adapter named (none given); this GraphModule has {known}")
    merged = sorted({s.adapter for s in all_slots(gm) if s.merged and s.adapter in chosen})
    if merged:
        raise AdapterError(f"adapters {merged} are merged into the weights; fxtune.unmerge(gm) before prepare_hotswap")
    return [name for name in known if name in chosen]


def _slots_of(gm: nn.Module, adapter: str) -> dict[str, AdapterSlot]:
    """{target: slot} of one adapter, in composition order."""
    require_adapters(gm, adapter)
    return {s.weight_name: s for s in all_slots(gm) if s.adapter == adapter}


def _describe(slot: AdapterSlot) -> dict:
    """What the live adapter's tensors must match: kind, tensor shapes, submodules (e.g. dropout)."""
    return {
        "kind": slot.kind,
        "tensors": {k: f"{'×'.join(map(str, t.shape))} {str(t.dtype).removeprefix('torch.')} {t.device}" for k, t in _tensors(slot).items()},
        "modules": [(k, type(m).__name__, m.extra_repr()) for k, m in slot.named_modules() if k],
    }


def _check_alike(first: dict[str, AdapterSlot], other: dict[str, AdapterSlot], a: str, b: str) -> None:
    """Refuses two adapters with other sites, kinds, tensor shapes or submodules."""
    if set(first) != set(other):
        only_a, only_b = sorted(set(first) - set(other)), sorted(set(other) - set(first))
        raise AdapterError(
            f"adapters '{a}' and '{b}' adapt different sites (only '{a}': {only_a}; only '{b}': {only_b}); "
            "hot-swapping needs the same sites: add the missing ones to both"
        )
    problems = []
    for target, slot in first.items():
        mine, theirs = _describe(slot), _describe(other[target])
        problems += [f"'{target}': {key} {mine[key]} vs {theirs[key]}" for key in mine if mine[key] != theirs[key]]
    if problems:
        raise AdapterError(
            f"adapters '{a}' and '{b}' differ where hot-swapping needs them alike:\n  {_listed(problems)}\n"
            "they need the same kind, tensor shapes (e.g. LoRA's r) and submodules on every site"
        )


def _check_code(gm: fx.GraphModule, live: str, adapter: str, slots: dict[str, AdapterSlot] | None = None) -> None:
    """Refuses an adapter whose settings (e.g. LoRA's alpha) would give the live adapter other code.

    The code is what torch.compile compiled; it is re-derived on a scratch copy with the
    adapter's kind, form and settings in the live slots and compared line by line.
    """
    slots = _slots_of(gm, adapter) if slots is None else slots
    scratch = clone_graph_module(gm)
    for target, twin in _slots_of(scratch, live).items():
        other = slots[target]
        twin.kind, twin.form, twin.form_reason, twin.config = other.kind, other.form, other.form_reason, dict(other.config)
    rebuild(scratch, site_table(scratch), set(slots))
    if scratch.code == gm.code:
        return
    lines = [line.strip() for line in difflib.unified_diff(gm.code.splitlines(), scratch.code.splitlines(), lineterm="", n=0)]
    changed = [line for line in lines if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    settings = [
        f"'{t}': {k}={s.config.get(k)!r} vs {slots[t].config.get(k)!r}"
        for t, s in _slots_of(gm, live).items() for k in sorted(set(s.config) | set(slots[t].config))
        if s.config.get(k) != slots[t].config.get(k)
    ]
    raise AdapterError(
        f"adapter '{adapter}' would change the code of the live adapter '{live}' (so torch.compile would compile again); "
        f"its settings differ: {_listed(settings) if settings else 'none, but its form does'}\n  "
        f"{_listed(changed)}\nhot-swapping needs adapters with the same settings (e.g. LoRA's alpha and rslora) and form"
    )


def _listed(items: list[str], limit: int = 6) -> str:
    return "\n  ".join(items[:limit]) + ("\n  ..." if len(items) > limit else "")


def _check_base_kept(gm: fx.GraphModule, bank: list[str], slots: dict[str, AdapterSlot]) -> None:
    """Refuses adapters that replaced the base weight (PiSSA): swapping them would need another base."""
    store, table = Weights(gm), site_table(gm)
    for target in slots:
        by = replaced_by(store, table.first(target, error=AdapterError).weight_ref)
        if by in bank:
            raise AdapterError(
                f"adapter '{by}' replaced the base weight of '{target}' (e.g. init='pissa'), which hot-swapping "
                "cannot change; leave it out of the adapters to swap"
            )


def _check_order(gm: fx.GraphModule, bank: list[str], slots: dict[str, AdapterSlot]) -> None:
    """Refuses an active adapter acting between two swapped ones on a site: the live one has one place."""
    chosen = set(bank)
    for target in slots:
        on_site = [s for s in all_slots(gm) if s.weight_name == target]
        orders = [s.order for s in on_site if s.adapter in chosen]
        between = [s.adapter for s in on_site if s.adapter not in chosen and s.active and min(orders) < s.order < max(orders)]
        if between:
            raise AdapterError(
                f"on '{target}', adapter {between[0]!r} acts between adapters to be swapped; the live adapter takes one "
                "place in the order, so swap adapters added one after another (or deactivate it first)"
            )


def _tensors(slot: AdapterSlot) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a slot (its submodules' too), by name."""
    return {**dict(slot.named_parameters(remove_duplicate=False)), **dict(slot.named_buffers(remove_duplicate=False))}


def _copy_tensors(src: AdapterSlot, dst: AdapterSlot) -> None:
    """Copies every tensor of `src` into the same-named tensor of `dst` (same shapes, checked before)."""
    targets = _tensors(dst)
    for name, value in _tensors(src).items():
        targets[name].copy_(value)
