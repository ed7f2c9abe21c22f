"""Adapter slots: one adapter on one weight, stored under `gm.fxtune.<adapter>.<target_key>`.

The slots are the source of truth; the graph nodes that realise them are derived per site.
State-dict keys are stable: `fxtune.<adapter>.<target_key>.<tensor name>`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from .errors import AdapterError
from .ownership import NAMESPACE


class AdapterSlot(nn.Module):
    """The tensors and settings of one adapter (`adapter`, of `kind`) on the weight at `target`."""

    def __init__(self, kind: str, target: str, adapter: str, config: dict[str, Any], form: str, order: int):
        super().__init__()
        self.kind = kind
        self.target = target
        self.adapter = adapter
        self.config = dict(config)
        self.form = form
        self.form_reason = ""
        self.order = order
        self.active = True
        self.merged = False

    def inputs(self) -> dict[str, Any]:
        """Tensors (parameters, buffers) and settings the kind's functions receive, by name.

        Non-persistent buffers (values derived from the base weight, e.g. SVD factors) are
        inputs too; they are just not part of the adapter's saved state.
        """
        tensors = {k: v for k, v in self._parameters.items() if v is not None}
        tensors.update((k, v) for k, v in self._buffers.items() if v is not None)
        return {**tensors, **self.config}

    def tensor_names(self) -> list[str]:
        return [k for k, v in self.inputs().items() if isinstance(v, torch.Tensor)]

    def num_params(self, *, trainable_only: bool = False, seen: set[int] | None = None) -> int:
        """Adapter parameters, counting only the entries a `<name>_mask` buffer keeps (if any).

        A kind that masks a parameter multiplies it by `<name>_mask` in its transform, so the
        masked entries get no gradient and are not counted. Parameters whose id is in `seen`
        (shared with a slot counted before) are skipped, and added to it.
        """
        total = 0
        for name, p in self._parameters.items():
            if p is None or (trainable_only and not p.requires_grad) or (seen is not None and id(p) in seen):
                continue
            if seen is not None:
                seen.add(id(p))
            mask = self._buffers.get(f"{name}_mask")
            total += int(torch.broadcast_to(mask, p.shape).sum()) if mask is not None else p.numel()
        return total

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, target={self.target!r}, form={self.form!r}, active={self.active}, merged={self.merged}"


def target_key(target: str) -> str:
    """The attribute name used for a weight's slot: dots become underscores."""
    return target.replace(".", "_").replace("@", "_") or "root"


def namespace(gm: nn.Module) -> nn.Module | None:
    return gm._modules.get(NAMESPACE)


def all_slots(gm: nn.Module) -> list[AdapterSlot]:
    """Every slot of gm in composition order (the order adapters were added)."""
    ns = namespace(gm)
    if ns is None:
        return []
    found = [m for m in ns.modules() if isinstance(m, AdapterSlot)]
    return sorted(found, key=lambda s: s.order)


def slots_on(gm: nn.Module, target: str, *, active_only: bool = True) -> list[AdapterSlot]:
    """The slots acting on one weight, in composition order."""
    return [s for s in all_slots(gm) if s.target == target and (s.active or not active_only)]


def emitted_slots(gm: nn.Module, target: str) -> list[AdapterSlot]:
    """The slots whose effect the graph computes: active and not merged into the weight."""
    return [s for s in slots_on(gm, target) if not s.merged]


def slot_path(slot: AdapterSlot) -> str:
    return f"{NAMESPACE}.{slot.adapter}.{target_key(slot.target)}"


def add_slot(gm: fx.GraphModule, slot: AdapterSlot) -> str:
    """Installs a slot under the namespace; refuses a second slot of one adapter on one weight."""
    ns = namespace(gm)
    if ns is None:
        ns = nn.Module()
        gm.add_module(NAMESPACE, ns)
    group = ns._modules.get(slot.adapter)
    if group is None:
        group = nn.Module()
        ns.add_module(slot.adapter, group)
    key = target_key(slot.target)
    existing = group._modules.get(key)
    if existing is not None:
        if existing.target == slot.target:
            raise AdapterError(
                f"adapter '{slot.adapter}' already has a {existing.kind} on '{slot.target}'; "
                "give the new one another adapter= name"
            )
        raise AdapterError(f"targets '{existing.target}' and '{slot.target}' map to the same key '{key}'")
    group.add_module(key, slot)
    return slot_path(slot)


def next_order(gm: nn.Module) -> int:
    return max((s.order for s in all_slots(gm)), default=-1) + 1


def remove_slots(gm: nn.Module, slots: list[AdapterSlot]) -> None:
    """Deletes slots, and adapter groups or the namespace left empty."""
    ns = namespace(gm)
    for slot in slots:
        group = ns._modules[slot.adapter]
        del group._modules[target_key(slot.target)]
        if not group._modules:
            del ns._modules[slot.adapter]
    if ns is not None and not ns._modules:
        del gm._modules[NAMESPACE]
