"""Adapter slots: one adapter on one weight, stored under `gm.fxtune.<adapter>.<weight key>`.

The slots are the source of truth; the graph nodes that realise them are derived per site.
State-dict keys are stable: `fxtune.<adapter>.<weight key>.<tensor name>`, the weight key being
the weight's name with dots as underscores (`layer4_0_conv1`).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import fx, nn

from ..errors import AdapterError, FxtuneError
from ..graph.ownership import NAMESPACE
from ..graph.sites import identifier


class AdapterSlot(nn.Module):
    """The tensors and settings of one adapter (`adapter`, of `kind`) on the weight `weight_name`.

    Besides its tensors a slot's whole state is these attributes: kind, weight_name, adapter,
    config (JSON-able settings), form and form_reason, order (composition order), active, merged,
    and while merged `trainable_before_merge` (each parameter's requires_grad before merging).
    """

    def __init__(self, kind: str, weight_name: str, adapter: str, config: dict[str, Any], form: str, order: int):
        super().__init__()
        self.__dict__.update(  # plain values: nn.Module.__setattr__ would only pass them on, slowly
            kind=kind, weight_name=weight_name, adapter=adapter, config=dict(config), form=form, form_reason="",
            order=order, active=True, merged=False, trainable_before_merge={},
        )

    target = property(lambda self: self.weight_name, doc="Old name of `weight_name`.")

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
        return f"kind={self.kind!r}, weight={self.weight_name!r}, form={self.form!r}, active={self.active}, merged={self.merged}"


def namespace(gm: nn.Module) -> nn.Module | None:
    return gm._modules.get(NAMESPACE)


def all_slots(gm: nn.Module) -> list[AdapterSlot]:
    """Every slot of gm in composition order (the order adapters were added)."""
    ns = namespace(gm)
    if ns is None:
        return []
    found = [m for m in ns.modules() if isinstance(m, AdapterSlot)]
    return sorted(found, key=lambda s: s.order)


def slots_by_weight(gm: nn.Module, *, active_only: bool = True) -> dict[str, list[AdapterSlot]]:
    """{weight name: its slots in composition order}, read in one walk over the namespace."""
    found: dict[str, list[AdapterSlot]] = {}
    for slot in all_slots(gm):
        if slot.active or not active_only:
            found.setdefault(slot.weight_name, []).append(slot)
    return found


def slots_on(gm: nn.Module, weight_name: str, *, active_only: bool = True) -> list[AdapterSlot]:
    """The slots acting on one weight, in composition order."""
    return slots_by_weight(gm, active_only=active_only).get(weight_name, [])


def slot_path(slot: AdapterSlot) -> str:
    return f"{NAMESPACE}.{slot.adapter}.{identifier(slot.weight_name)}"


def adapter_names(gm: nn.Module) -> list[str]:
    """The names of gm's adapters, in the order they were added."""
    return list(dict.fromkeys(s.adapter for s in all_slots(gm)))


def require_adapters(gm: nn.Module, names: str | Iterable[str], *, error: type[FxtuneError] = AdapterError) -> list[str]:
    """`names` as a list, each the name of one of gm's adapters; else `error` listing the adapters gm has."""
    chosen = [names] if isinstance(names, str) else list(names)
    known = adapter_names(gm)
    unknown = sorted({n for n in chosen if n not in known}, key=str)
    if unknown:
        shown = f"'{unknown[0]}'" if len(unknown) == 1 else str(unknown)
        raise error(f"no adapter named {shown}; this GraphModule has {known or 'none'}")
    return chosen


def add_slot(gm: fx.GraphModule, slot: AdapterSlot) -> str:
    """Installs a slot under the namespace; refuses a second slot of one adapter on one weight."""
    ns = namespace(gm)
    if ns is None:
        ns = nn.Module().train(gm.training)
        gm.add_module(NAMESPACE, ns)
    group = ns._modules.get(slot.adapter)
    if group is None:
        group = nn.Module().train(gm.training)
        ns.add_module(slot.adapter, group)
    key = identifier(slot.weight_name)
    existing = group._modules.get(key)
    if existing is not None:
        if existing.weight_name == slot.weight_name:
            raise AdapterError(
                f"adapter '{slot.adapter}' already has a {existing.kind} on '{slot.weight_name}'; "
                "give the new one another adapter= name"
            )
        raise AdapterError(f"weights '{existing.weight_name}' and '{slot.weight_name}' map to the same key '{key}'")
    group.add_module(key, slot.train(gm.training))  # an eval-mode GraphModule gets eval-mode adapters (dropout off)
    return slot_path(slot)


def next_order(gm: nn.Module) -> int:
    return max((s.order for s in all_slots(gm)), default=-1) + 1


def remove_slots(gm: nn.Module, slots: list[AdapterSlot]) -> None:
    """Deletes slots, and adapter groups or the namespace left empty."""
    ns = namespace(gm)
    for slot in slots:
        group = ns._modules[slot.adapter]
        del group._modules[identifier(slot.weight_name)]
        if not group._modules:
            del ns._modules[slot.adapter]
    if ns is not None and not ns._modules:
        del gm._modules[NAMESPACE]
