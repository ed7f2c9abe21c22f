"""Remembering base weights that fxtune replaced, so set_active, unmerge and unload are exact.

When a GraphModule's own copy of a weight gets a new value (PiSSA's residual, a merge), the
previous raw-layout pieces (the Parameter objects themselves for whole tensors, the rows for a
q/k/v slice) are kept as a record in the owning module's `__dict__` (under graph/ownership.py's
RECORD_PREFIX, so they travel with clones), not in its state_dict, one record per weight:
    _fxtune_original[:<param>[rows]]   {"weight", "bias", "by": adapter, "replacement": new base}
    _fxtune_premerge[:<param>[rows]]   {"weight", "bias"} before the first merge
"""

from __future__ import annotations

import torch

from ..graph.ownership import RECORD_PREFIX
from ..graph.sites import WeightRef
from ..graph.weights import Weights

ORIGINAL = RECORD_PREFIX + "original"  # the traced weights, and the adapter that replaced them
PREMERGE = RECORD_PREFIX + "premerge"  # the weights before the first merge


def _key(record: str, ref: WeightRef) -> str:
    if ref.param == "weight" and ref.rows is None:
        return record
    rows = "" if ref.rows is None else f"[{ref.rows[0]}:{ref.rows[1]}]"
    return f"{record}:{ref.param}{rows}"


def _records(store: Weights, ref: WeightRef) -> dict:
    return store.owner(ref).__dict__


def remember(store: Weights, ref: WeightRef, record: str, **extra) -> None:
    """Keeps the weight's current raw pieces (weight, bias) under `record`, unless some are already kept."""
    records, key = _records(store, ref), _key(record, ref)
    if key not in records:
        weight, bias = store.pieces(ref)
        records[key] = {"weight": weight, "bias": bias, **extra}


def restore(store: Weights, ref: WeightRef, record: str) -> bool:
    """Puts the kept weight and bias back (whole tensors as new frozen Parameters on the same storage)."""
    kept = _records(store, ref).pop(_key(record, ref), None)
    if kept is None:
        return False
    store.write_pieces(ref, kept["weight"], kept["bias"])
    return True


def forget_all(store: Weights, ref: WeightRef) -> None:
    for record in (ORIGINAL, PREMERGE):
        _records(store, ref).pop(_key(record, ref), None)


def replace_base(store: Weights, ref: WeightRef, weight: torch.Tensor, by: str) -> None:
    """Adapter `by` gives the weight a new canonical base value (e.g. PiSSA's residual); the traced one is kept."""
    remember(store, ref, ORIGINAL, by=by, replacement=ref.raw_rows(weight.detach()))
    store.write_pieces(ref, _records(store, ref)[_key(ORIGINAL, ref)]["replacement"])


def replaced_by(store: Weights, ref: WeightRef) -> str | None:
    """The adapter whose base-weight replacement is in force on this weight, if any."""
    kept = _records(store, ref).get(_key(ORIGINAL, ref))
    return None if kept is None else kept["by"]


def holds_replaced_weights(module: object) -> bool:
    """Whether an adapter replaced a base weight this module owns (a record other fxtune state is not)."""
    return any(key.startswith(ORIGINAL) for key in vars(module))


def replacement(store: Weights, ref: WeightRef) -> torch.Tensor | None:
    """The replacement base weight in the canonical view, if an adapter made one."""
    kept = _records(store, ref).get(_key(ORIGINAL, ref))
    if kept is None:
        return None
    piece = kept["replacement"]
    return piece.t() if ref.transposed else piece


def use_base(store: Weights, ref: WeightRef, replaced: bool) -> None:
    """Switches the weight between the traced value and the replacement its adapter made."""
    kept = _records(store, ref).get(_key(ORIGINAL, ref))
    if kept is not None:
        store.write_pieces(ref, kept["replacement"] if replaced else kept["weight"])



def traced_weight(store: Weights, ref: WeightRef) -> torch.Tensor:
    """The weight as traced, canonical view: before any merge or base replacement (from their records),
    what a fresh trace of the model has. Tensors derived from it are the same again after a reload."""
    records = _records(store, ref)
    for record in (ORIGINAL, PREMERGE):
        kept = records.get(_key(record, ref))
        if kept is not None:
            weight = kept["weight"].detach()  # raw layout; already the rows of a row slice
            return weight.t() if ref.transposed else weight
    return store.read(ref)[0]
