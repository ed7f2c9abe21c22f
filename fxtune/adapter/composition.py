"""A weight's adapters applied to it: W' = f_n(...f_1(W)), b' likewise, padding rows untouched.

This is the meaning of every adapted site, written once. Fusion and merge evaluate it on tensors;
the weight form emits it as graph nodes; batched serving emits it per group of rows. Each caller
passes `call(slot, fn, *args, role=..., **kwargs)`, which either calls `fn` or emits a node.
"""

from __future__ import annotations

from typing import Any, Callable

from ..ops import keep_index
from .kinds import get_kind
from .slots import AdapterSlot


def compose(
    weight: Any,
    bias: Any,
    slots: list[AdapterSlot],
    *,
    call: Callable[..., Any],
    inputs: Callable[[AdapterSlot], dict[str, Any]],
    kept: tuple[int, tuple[int, ...]] | None = None,
    adapt_bias: bool = True,
) -> tuple[Any, Any]:
    """(W', b') of `weight` and `bias` under `slots` in composition order.

    `inputs(slot)` gives the slot's tensors and settings as `call` needs them; `kept` (dim,
    indices) are entries of the canonical weight that keep W's values (an embedding's padding
    row), after every adapter, so each adapter sees them as they were whether the ones before it
    are merged or not; `adapt_bias=False` leaves the bias as it is (a use that sees the weight
    transposed); `weight=None` adapts the bias alone.
    """
    w = weight
    for slot in slots:
        kind = get_kind(slot.kind)
        values = inputs(slot)
        if w is not None:
            w = call(slot, kind.weight, w, role=f"{kind.name}_weight", **kind.accepted(kind.weight, values))
            if kept is not None:
                w = call(slot, keep_index, w, weight, kept[1], kept[0], role="keep_padding")
        if bias is not None and adapt_bias and kind.acts_on_bias(slot.config):
            bias = call(slot, kind.bias, bias, role=f"{kind.name}_bias", **kind.accepted(kind.bias, values))
    return w, bias


def changes_bias(slots: list[AdapterSlot]) -> bool:
    """Whether any of these adapters changes the bias."""
    return any(get_kind(s.kind).acts_on_bias(s.config) for s in slots)
