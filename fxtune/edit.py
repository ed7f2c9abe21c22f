"""The working copy a pass edits: select weights, attach adapters, then realise them once.

A pass reads like this (its own code stays about the technique):

    rw = Rewrite(gm, kind="lora", adapter=adapter)
    for target, sites in rw.select(targets, exclude=exclude).items():
        rw.attach(target, params={"lora_a": a, "lora_b": b}, config={"scale": s}, form="activation")
    return rw.finish()
"""

from __future__ import annotations

import keyword
from typing import Any

import torch
from torch import fx, nn

from .errors import AdapterError
from .basekeeping import replace_base
from .kinds import get_kind
from .ownership import clone_graph_module
from .rewrite import rebuild
from .selection import Selector, select_targets
from .sites import Site, canonical_sites
from .slots import AdapterSlot, add_slot, all_slots, next_order
from .weights import Weights


COMPANION_KIND = "train_module"  # whole-layer copies may join an adapter of any kind
_PLAIN_MODULE = nn.Module()  # adapter names must not shadow its attributes


class Rewrite:
    """A pass's own copy of `gm` (input untouched, base frozen) and the adapters it adds."""

    def __init__(self, gm: fx.GraphModule, *, kind: str, adapter: str = "default"):
        if not isinstance(gm, fx.GraphModule):
            raise AdapterError(f"passes take a GraphModule (use fxtune.trace(model) first), got {type(gm).__name__}")
        if not isinstance(adapter, str) or not adapter.isidentifier() or keyword.iskeyword(adapter) or hasattr(_PLAIN_MODULE, adapter):
            raise AdapterError(
                f"adapter name {adapter!r} cannot be used: it becomes an attribute in the generated code, so it "
                "must be a Python identifier that is not a keyword nor an nn.Module attribute (e.g. 'task_a')"
            )
        self.gm = clone_graph_module(gm)
        self.kind = get_kind(kind)
        self.adapter = adapter
        self.touched: set[str] = set()
        self.store = Weights(self.gm)
        self._sites: dict[str, Site] | None = None
        other = {s.kind for s in all_slots(self.gm) if s.adapter == adapter} - {self.kind.name, COMPANION_KIND}
        if other and self.kind.name != COMPANION_KIND:
            raise AdapterError(
                f"adapter '{adapter}' is a {other.pop()} adapter; it can only be extended with the same "
                f"kind. Give the {self.kind.name} adapter another name: adapter='...'"
            )

    def select(self, targets: Selector = None, *, exclude: Selector = None) -> dict[str, list[Site]]:
        """Chosen sites grouped by weight (module path); shared weights come whole or not at all."""
        return select_targets(self.gm, targets, exclude=exclude)

    def site(self, target: str) -> Site:
        """The first site of the weight `target`: its `ref` is how this weight's adapters see it."""
        if self._sites is None:
            self._sites = canonical_sites(self.gm)
        if target not in self._sites:
            raise AdapterError(f"'{target}' is no adapted weight of this graph; weights: {sorted(self._sites)[:40]}")
        return self._sites[target]

    def weight(self, target: str) -> torch.Tensor:
        """The current base weight of `target` in its canonical (out, in/groups, *kernel) view, detached
        (read it, never write it): e.g. the q rows of an in_proj_weight, an embedding's table transposed."""
        return self.store.read(self.site(target).ref)[0]

    def bias(self, target: str) -> torch.Tensor | None:
        """The current base bias of `target` (its rows, for q/k/v), detached, or None."""
        return self.store.read(self.site(target).ref)[1]

    def replace_base_weight(self, target: str, weight: torch.Tensor) -> None:
        """Gives the GraphModule's own copy of `target` a new (frozen) canonical weight; the model's stays.

        The replaced weight is remembered, so `fxtune.unload` gives back the traced weights.
        """
        replace_base(self.store, self.site(target).ref, weight.detach().clone(), by=self.adapter)

    def attach(
        self,
        target: str,
        *,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor] | None = None,
        modules: dict[str, nn.Module] | None = None,
        config: dict[str, Any] | None = None,
        form: str = "weight",
        reason: str = "",
        derived: dict[str, torch.Tensor] | None = None,
    ) -> AdapterSlot:
        """Adds this pass's adapter on the weight at `target` (trainable `params`, fixed `buffers`).

        `derived` tensors are computed from the base weight (e.g. SVD factors): fixed inputs of
        the transform like `buffers`, but registered non-persistent, so they stay out of the
        state_dict and the saved adapter; the pass recomputes them from the base weight.
        """
        if form not in ("weight", "activation"):
            raise AdapterError(f"form must be 'weight' or 'activation', got {form!r} for '{target}'")
        slot = AdapterSlot(self.kind.name, target, self.adapter, config or {}, form, next_order(self.gm))
        slot.form_reason = reason
        for name, value in params.items():
            slot.register_parameter(name, nn.Parameter(value.detach().clone(memory_format=torch.contiguous_format), requires_grad=True))
        for name, value in (buffers or {}).items():
            slot.register_buffer(name, value.detach().clone(memory_format=torch.contiguous_format))
        for name, value in (derived or {}).items():
            slot.register_buffer(name, value.detach().clone(), persistent=False)
        for name, module in (modules or {}).items():
            slot.add_module(name, module)
        add_slot(self.gm, slot)
        self.touched.add(target)
        return slot

    def finish(self) -> fx.GraphModule:
        """Realises the new adapters as graph code (lint and recompile once) and returns the GraphModule."""
        rebuild(self.gm, self.touched)
        return self.gm
