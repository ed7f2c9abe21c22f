"""The working copy an adapter pass edits: select weights, attach adapters, then realise them once.

A pass reads like this (its own code stays about the technique):

    rw = Rewrite(gm, kind="lora", adapter=adapter)
    for weight, sites in rw.select(targets, exclude=exclude).items():
        rw.attach(weight, params={"lora_a": a, "lora_b": b}, config={"scale": s}, form="activation")
    return rw.finish()
"""

from __future__ import annotations

import keyword
from typing import Any

import torch
from torch import fx, nn

from ..adapter.base_weights import replace_base, replaced_by, traced_weight
from ..adapter.kinds import get_kind
from ..adapter.fusion import folded_tensors
from ..adapter.realise import rebuild
from ..adapter.slots import AdapterSlot, add_slot, all_slots, next_order, slots_by_weight
from ..errors import AdapterError
from .working_copy import WorkingCopy

_PLAIN_MODULE = nn.Module()  # adapter names must not shadow its attributes


class Rewrite(WorkingCopy):
    """A pass's own copy of `gm` (input untouched, base frozen) and the adapters of one kind it adds."""

    error = AdapterError

    def __init__(self, gm: fx.GraphModule, *, kind: str, adapter: str = "default"):
        if not isinstance(adapter, str) or not adapter.isidentifier() or keyword.iskeyword(adapter) or hasattr(_PLAIN_MODULE, adapter):
            raise AdapterError(
                f"adapter name {adapter!r} cannot be used: it becomes an attribute in the generated code, so it "
                "must be a Python identifier that is not a keyword nor an nn.Module attribute (e.g. 'task_a')"
            )
        self.kind = get_kind(kind)
        super().__init__(gm)
        self.adapter = adapter
        self.touched: set[str] = set()
        self._order = next_order(self.gm)  # composition order of the next slot
        self._on_weight = slots_by_weight(self.gm, active_only=False)  # read once; attach() keeps it current
        if not self.kind.companion:
            other = {s.kind for s in all_slots(self.gm) if s.adapter == adapter and not get_kind(s.kind).companion}
            other.discard(self.kind.name)
            if other:
                raise AdapterError(
                    f"adapter '{adapter}' is a {other.pop()} adapter; it can only be extended with the same "
                    f"kind. Give the {self.kind.name} adapter another name: adapter='...'"
                )

    def adapters_on(self, weight_name: str) -> list[AdapterSlot]:
        """The adapters already on a weight (active or not, merged or not), in composition order."""
        return list(self._on_weight.get(weight_name, []))

    def entering(self, weight_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, b) as a new adapter on this weight will receive them: the base under the active adapters
        already acting on it (merged ones are in the base already), canonical view, detached. A kind that
        derives tensors from the weight (a magnitude, singular vectors, a copy) derives them from this,
        so it starts as the identity on top of what is there."""
        site = self.site(weight_name)
        weight, bias = self.weight(weight_name), self.bias(weight_name)
        acting = [s for s in self._on_weight.get(weight_name, []) if s.active and not s.merged]
        if not acting or weight.is_meta:  # no values to compose: the kind sees the base (and may refuse meta)
            return weight, bias
        return folded_tensors(weight, bias, acting, site.kept)

    def entering_weight(self, weight_name: str) -> torch.Tensor:
        """The weight part of `entering`."""
        return self.entering(weight_name)[0]

    def traced_weight(self, weight_name: str) -> torch.Tensor:
        """The weight as traced (before merges and base replacements), canonical view, detached: what a
        kind derives unsaved tensors from, so that reloading its adapter anywhere derives the same ones."""
        return traced_weight(self.store, self.site(weight_name).weight_ref)

    def restored(self, weight_name: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict:
        """What re-creating a saved adapter of this kind on a weight needs beyond its tensors: the kind's
        `restore(site, weight, config, tensors)` with the weight as it reaches the adapter, and `base=` the
        weight as traced when the restore declares it (PiSSA's residual, SVDiff's singular vectors)."""
        restore = self.kind.restore
        if restore is None:
            return {}
        site, weight = self.site(weight_name), self.entering_weight(weight_name)
        if "base" in self.kind.accepted(restore, {"base": None}):
            return restore(site, weight, config, tensors, base=self.traced_weight(weight_name)) or {}
        return restore(site, weight, config, tensors) or {}

    def replace_base_weight(self, weight_name: str, weight: torch.Tensor) -> None:
        """Gives the GraphModule's own copy of a weight a new (frozen) canonical value; the model's stays.

        The replaced weight is remembered, so `fxtune.unload` gives back the traced weights. Adapters
        already on the weight then act on the new base: allowed only when what they add does not depend
        on the weight (checked on their current tensors: LoRA's B@A does not, IA³'s scaling does), and
        never on a merged weight (unmerge puts the pre-merge weight back).
        """
        present = self.adapters_on(weight_name)
        site = self.site(weight_name)
        base, bias = self.store.read(site.weight_ref)
        merged = sorted({s.adapter for s in present if s.merged})
        acting = [s for s in present if not s.merged]
        replaced = replaced_by(self.store, site.weight_ref)
        problem = f"adapters {merged} are merged into it" if merged else None
        if replaced is not None:
            problem = f"adapter '{replaced}' already replaced it"
        if acting and problem is None:
            before = folded_tensors(base, bias, acting, site.kept)[0].double() - base.double()
            after = folded_tensors(weight, bias, acting, site.kept)[0].double() - weight.double()
            if not torch.allclose(before, after, rtol=1e-4, atol=1e-6 * float(base.abs().max().clamp_min(1e-12))):
                problem = f"adapters {sorted({s.adapter for s in acting})} act on it in a way that depends on the weight"
        if problem:
            raise AdapterError(
                f"adapter '{self.adapter}' ({self.kind.name}) would replace the base weight of '{weight_name}', but "
                f"{problem}, so they would compute something else; add it before them on this weight, or choose an "
                "init that keeps the base weight"
            )
        replace_base(self.store, site.weight_ref, weight.detach().clone(), by=self.adapter)

    def attach(
        self,
        weight_name: str,
        *,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor] | None = None,
        modules: dict[str, nn.Module] | None = None,
        config: dict[str, Any] | None = None,
        form: str = "weight",
        reason: str = "",
        derived: dict[str, torch.Tensor] | None = None,
    ) -> AdapterSlot:
        """Adds this pass's adapter on a weight (trainable `params`, fixed `buffers`).

        `derived` tensors are computed from the base weight (e.g. SVD factors): fixed inputs of
        the transform like `buffers`, but registered non-persistent, so they stay out of the
        state_dict and the saved adapter; the pass recomputes them from the base weight.
        """
        if form not in ("weight", "activation"):
            raise AdapterError(f"form must be 'weight' or 'activation', got {form!r} for '{weight_name}'")
        slot = AdapterSlot(self.kind.name, weight_name, self.adapter, config or {}, form, self._order)
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
        self._on_weight.setdefault(weight_name, []).append(slot)
        self._order += 1
        self.touched.add(weight_name)
        return slot

    def finish(self) -> fx.GraphModule:
        """Realises the new adapters as graph nodes (linted once; code generated on first use); returns the GraphModule."""
        rebuild(self.gm, self.sites, self.touched)
        return self.gm
