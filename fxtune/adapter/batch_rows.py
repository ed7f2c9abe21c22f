"""The run-time half of mixed-adapter batches: grouping a batch's rows by adapter, once per forward.

`batched` (batched.py) emits calls to these functions; a batch plan sorts the rows by
`adapter_index` once, and each adapted site takes and merges its groups' rows through it.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import Tensor

from ..errors import AdapterError

_INTEGER = (torch.int64, torch.int32, torch.int16, torch.int8)


class BatchPlan:
    """Where each sample of one batch goes: its rows sorted by adapter index (`order`, None when
    already sorted) and the number of rows per index value; a site's groups are runs of these."""

    def __init__(self, size: int, counts: list[int], order: Tensor | None):
        self.size = size
        self.counts = counts
        self.order = order
        self._spans: dict[tuple, list[tuple[int, int]]] = {}
        self._moved: dict[torch.device, Tensor] = {}

    def spans(self, route: tuple[int, ...]) -> list[tuple[int, int]]:
        """(start, rows) in sorted order of each run of equal consecutive route entries."""
        if route not in self._spans:
            counts, start, spans = iter(self.counts), 0, []
            for _, group in itertools.groupby(route):
                rows = sum(next(counts) for _ in group)
                spans.append((start, rows))
                start += rows
            self._spans[route] = spans
        return self._spans[route]

    def only_run(self, route: tuple[int, ...]) -> int | None:
        """The run holding every row, if one does (then nothing is gathered or scattered)."""
        full = [i for i, (_, rows) in enumerate(self.spans(route)) if rows == self.size]
        return full[0] if full and self.size > 0 else None

    def indices(self, route: tuple[int, ...], i: int, device: torch.device) -> Tensor | None:
        """Batch positions of run i (None: the contiguous rows of its span, the batch being sorted)."""
        if self.order is None:
            return None
        if device not in self._moved:
            self._moved[device] = self.order.to(device)
        start, rows = self.spans(route)[i]
        return self._moved[device][start:start + rows]


def plan_batch(adapter_index: Tensor | None, names: tuple[str, ...]) -> BatchPlan:
    """Checks `adapter_index` (one integer per sample, -1 = base) and groups the rows by it."""
    if not isinstance(adapter_index, Tensor) or adapter_index.dtype not in _INTEGER or adapter_index.dim() != 1:
        got = type(adapter_index).__name__
        if isinstance(adapter_index, Tensor):
            got = f"a {adapter_index.dtype} tensor of shape {tuple(adapter_index.shape)}"
        raise AdapterError(
            f"adapter_index must be a 1-D LongTensor with one entry per sample (a position in {list(names)}, "
            f"or -1 for the base model); got {got}"
        )
    index = adapter_index.long()
    n = index.numel()
    if n == 0:
        return BatchPlan(0, [0] * (len(names) + 1), None)
    low, high, unsorted = torch.stack([index.min(), index.max(), (index[1:] < index[:-1]).sum()]).tolist()
    if low < -1 or high >= len(names):
        raise AdapterError(
            f"adapter_index holds {low if low < -1 else high}; valid values are -1 (base) and 0..{len(names) - 1} "
            f"(positions in {list(names)})"
        )
    counts = torch.bincount(index + 1, minlength=len(names) + 1).tolist()
    return BatchPlan(n, counts, torch.argsort(index, stable=True) if unsorted else None)


def take_rows(x: Tensor, plan: BatchPlan, route: tuple[int, ...], i: int, *, site: str) -> Tensor:
    """The rows of `x` in a site's group i (a view when the batch is sorted)."""
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] != plan.size:
        rows = x.shape[0] if isinstance(x, Tensor) and x.dim() else "no"
        raise AdapterError(
            f"site '{site}': its input has {rows} rows but adapter_index has {plan.size} entries; a batched "
            "GraphModule needs the batch as the first dimension at every adapted site"
        )
    only = plan.only_run(route)
    if only is not None:
        return x if i == only else x[:0]
    index = plan.indices(route, i, x.device)
    return x.narrow(0, *plan.spans(route)[i]) if index is None else x.index_select(0, index)


def merge_rows(
    parts: Sequence[Tensor | None], plan: BatchPlan, route: tuple[int, ...], *, base: Tensor | None = None
) -> Tensor:
    """The site's output: each group's rows from its part, or from `base` (the base call on the
    whole batch) where the part is None. Writes into `base` only when no gradient is recorded."""
    only = plan.only_run(route)
    if only is not None:
        return base if parts[only] is None else parts[only]
    if base is None and plan.order is None:
        return torch.cat(list(parts))
    if base is None:
        first = next(p for p in parts if p is not None)
        out = first.new_empty((plan.size, *first.shape[1:]))
    else:
        recording = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (base, *parts))
        out = base.clone() if recording else base
    for i, part in enumerate(parts):
        if part is not None:
            index = plan.indices(route, i, out.device)
            if index is None:
                out.narrow(0, *plan.spans(route)[i]).copy_(part)
            else:
                out.index_copy_(0, index, part)
    return out
