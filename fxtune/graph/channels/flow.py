"""How tensor values carry channels through a graph: per-dimension items, and the transform of each op family.

A tensor value carries, per dimension, the item at each position (`Flow.ids[dim]`, -1 where the
position is no item), and whether that position is exactly zero once its item is masked
(`Flow.zero[dim]`). The transforms below (broadcasting ops, reshapes, concatenation, reductions,
contractions) unite the items that meet and block those they cannot follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import Tensor

from .items import HARD, NORM, Items, Reason

@dataclass
class Flow:
    """A tensor value: its static shape and, per carried dimension, its items and zero flags."""

    shape: tuple[int, ...]
    ids: dict[int, Tensor] = field(default_factory=dict)
    zero: dict[int, Tensor] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return len(self.shape)

    def carry(self, dim: int, ids: Tensor, zero: Tensor | bool) -> None:
        self.ids[dim] = ids
        self.zero[dim] = zero if isinstance(zero, Tensor) else torch.full(ids.shape, bool(zero))

    def all_ids(self) -> Iterable[Tensor]:
        return self.ids.values()


def untracked(shape: Sequence[int]) -> Flow:
    """A value that carries no channel items (a graph input, a constant, the output of an op not followed)."""
    return Flow(tuple(shape))


def _aligned(flow: Flow, dim: int, rank: int) -> int:
    """The dimension of `flow` that broadcasting aligns with output dimension `dim`, or -1."""
    return dim - (rank - flow.rank)


def elementwise(items: Items, shape: Sequence[int], operands: list, zero_rule: str, label: str) -> Flow:
    """Broadcasting op over `operands` (Flows and scalars): positions that meet are united.

    zero_rule: "mul" (zero if any factor is), "add" (zero if every term is), "first" (the first
    operand decides, e.g. a numerator), "none" (never zero).
    """
    out, rank = Flow(tuple(shape)), len(shape)
    flows = [op for op in operands if isinstance(op, Flow)]
    scalars = [op for op in operands if not isinstance(op, Flow)]
    for d in range(rank):
        carriers, varying = [], []
        for flow in flows:
            od = _aligned(flow, d, rank)
            if od < 0:
                continue
            if od in flow.ids:
                if flow.shape[od] == shape[d]:
                    carriers.append(flow)
                else:
                    items.block(flow.ids[od], Reason(HARD, f"broadcast by {label} over other channels"))
            elif flow.shape[od] == shape[d] and shape[d] > 1:
                varying.append(flow)
        if not carriers:
            continue
        ids = [c.ids[_aligned(c, d, rank)] for c in carriers]
        for other in ids[1:]:
            items.union(ids[0], other)
        if varying:
            for i in ids:
                items.block(i, Reason(HARD, f"{label} combines them with a value that varies along them and is not traced"))
        merged = ids[0]
        for other in ids[1:]:
            merged = torch.where(merged >= 0, merged, other)
        zeros = [c.zero[_aligned(c, d, rank)] for c in carriers]
        out.carry(d, merged, _zero(zero_rule, zeros, carriers, flows, scalars))
    return out


def _zero(rule: str, zeros: list[Tensor], carriers: list[Flow], flows: list[Flow], scalars: list) -> Tensor:
    if rule == "mul":
        result = zeros[0].clone()
        for z in zeros[1:]:
            result |= z
        return result
    if rule == "add":
        if len(carriers) < len(flows) or any(not isinstance(s, (int, float)) or s != 0 for s in scalars if s is not None):
            return torch.zeros_like(zeros[0])
        result = zeros[0].clone()
        for z in zeros[1:]:
            result &= z
        return result
    if rule == "first":  # a quotient: zero where the numerator is, unless a divisor is zero too (0/0)
        if carriers[0] is not flows[0]:
            return torch.zeros_like(zeros[0])
        result = zeros[0].clone()
        for z in zeros[1:]:
            result &= ~z
        return result
    return torch.zeros_like(zeros[0])


def unary(flow: Flow, keeps_zero: bool) -> Flow:
    """An elementwise op of one tensor (an activation, a cast, dropout): items pass, zeros stay if f(0) = 0."""
    out = Flow(flow.shape)
    for d, ids in flow.ids.items():
        out.carry(d, ids, flow.zero[d] & keeps_zero)
    return out


def pair_blocks(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Contiguous runs of dims of shape `a` and `b` with equal products (how a reshape maps dims), or None."""
    blocks, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            blocks.append(([i], []))
            i += 1
            continue
        if j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            blocks.append(([], [j]))
            j += 1
            continue
        if i >= len(a) or j >= len(b):
            return None
        da, db, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                da.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                db.append(j)
                pb *= b[j]
                j += 1
            else:
                return None
        blocks.append((da, db))
    return blocks


def _varies(grid: Tensor, axis: int) -> bool:
    return grid.shape[axis] > 1 and not bool((grid == grid.narrow(axis, 0, 1)).all())


def reshape(items: Items, flow: Flow, shape: Sequence[int], label: str) -> Flow:
    """view/reshape/flatten/unflatten/squeeze/unsqueeze. A channel dim split into several (heads ×
    head_dim) keeps its items on the outermost one: each head becomes one unit."""
    out = Flow(tuple(shape))
    blocks = pair_blocks(flow.shape, shape)
    if blocks is None:
        for ids in flow.all_ids():
            items.block(ids, Reason(HARD, f"{label} reshapes them in a way the analysis cannot map"))
        return out
    for a_dims, b_dims in blocks:
        carried = [d for d in a_dims if d in flow.ids]
        if not carried:
            continue
        if len(carried) > 1 or not b_dims:
            why = "merges two channel axes" if len(carried) > 1 else "drops their axis"
            for d in carried:
                items.block(flow.ids[d], Reason(HARD, f"{label} {why}"))
            continue
        c = carried[0]
        inner = any(flow.shape[d] > 1 for d in a_dims[:a_dims.index(c)])
        if inner and len(b_dims) < len(a_dims) and items.from_split(flow.ids[c]):
            items.block(flow.ids[c], Reason(HARD, f"{label} interleaves channel groups that a view split off (a channel "
                                                  "shuffle): the groups cannot lose channels separately"))
        sizes = [flow.shape[d] for d in a_dims]
        view = [flow.shape[d] if d == c else 1 for d in a_dims]
        target = [shape[d] for d in b_dims]
        grid = flow.ids[c].view(view).expand(sizes).reshape(target)
        zgrid = flow.zero[c].view(view).expand(sizes).reshape(target)
        varying = [k for k in range(len(b_dims)) if _varies(grid, k)]
        if not varying:
            varying = [next((k for k, s in enumerate(target) if s > 1), 0)]
        axis = varying[0]
        if len(varying) > 1:  # split: every slice along the outer axis (a head) becomes one unit
            moved = grid.movedim(axis, 0).reshape(target[axis], -1)
            for row in moved:
                if bool((row < 0).any()) and bool((row >= 0).any()):
                    items.block(row, Reason(HARD, f"{label} splits channels into blocks that mix them with untraced positions"))
                items.union_all(row)
            ids = moved.max(1).values
            items.split_units.update(i for i in ids.tolist() if i >= 0)
            zero = zgrid.movedim(axis, 0).reshape(target[axis], -1).all(1)
        else:
            index = [0] * len(target)
            index[axis] = slice(None)
            ids, zero = grid[tuple(index)], zgrid[tuple(index)]
        out.carry(b_dims[axis], ids, zero)
    return out


def permute(flow: Flow, order: Sequence[int]) -> Flow:
    """out dim i is input dim order[i]."""
    out = Flow(tuple(flow.shape[d] for d in order))
    for new, old in enumerate(order):
        if old in flow.ids:
            out.carry(new, flow.ids[old], flow.zero[old])
    return out


def expand(items: Items, flow: Flow, shape: Sequence[int], label: str) -> Flow:
    """expand/broadcast_to: new leading dims and size-1 dims repeated; carried dims keep their items."""
    out, shift = Flow(tuple(shape)), len(shape) - flow.rank
    for d, ids in flow.ids.items():
        if flow.shape[d] == shape[d + shift]:
            out.carry(d + shift, ids, flow.zero[d])
        else:
            items.block(ids, Reason(HARD, f"{label} repeats a single channel"))
    return out


def cat(items: Items, flows: list[Flow], dim: int, shape: Sequence[int], label: str) -> Flow:
    """Concatenation along `dim` (positions follow each other, offsets add up); other dims must agree."""
    rank = len(shape)
    others = [Flow(tuple(s if d != dim else shape[dim] for d, s in enumerate(f.shape)), dict(f.ids), dict(f.zero)) for f in flows]
    for f in others:
        f.ids.pop(dim, None)
        f.zero.pop(dim, None)
    out = elementwise(items, shape, others, "add", label)
    if any(dim in f.ids for f in flows):
        parts = [f.ids.get(dim, torch.full((f.shape[dim],), -1, dtype=torch.long)) for f in flows]
        zeros = [f.zero.get(dim, torch.zeros(f.shape[dim], dtype=torch.bool)) for f in flows]
        out.carry(dim, torch.cat(parts), torch.cat(zeros))
    for d in range(rank):  # "add" decided zero for the other dims; a concat keeps each part's own flags
        if d != dim and d in out.ids:
            carriers = [f for f in flows if d in f.ids]
            zero = carriers[0].zero[d].clone()
            for f in carriers[1:]:
                zero &= f.zero[d]
            out.zero[d] = zero if len(carriers) == len(flows) else torch.zeros_like(zero)
    return out


def split(flow: Flow, dim: int, sizes: Sequence[int]) -> list[Flow]:
    """split/chunk along `dim` into consecutive pieces of `sizes`."""
    pieces, start = [], 0
    for size in sizes:
        shape = tuple(size if d == dim else s for d, s in enumerate(flow.shape))
        piece = Flow(shape)
        for d, ids in flow.ids.items():
            if d == dim:
                piece.carry(d, ids[start:start + size], flow.zero[d][start:start + size])
            else:
                piece.carry(d, ids, flow.zero[d])
        pieces.append(piece)
        start += size
    return pieces


def narrow(items: Items, flow: Flow, dim: int, start: int, stop: int, step: int, label: str) -> Flow:
    """A basic slice along one dim; a strided slice of channels is not followed."""
    shape = list(flow.shape)
    positions = range(flow.shape[dim])[start:stop:step]
    shape[dim] = len(positions)
    out = Flow(tuple(shape))
    for d, ids in flow.ids.items():
        if d != dim:
            out.carry(d, ids, flow.zero[d])
        elif step != 1:
            items.block(ids, Reason(HARD, f"{label} takes every {step}-th channel"))
        else:
            out.carry(d, ids[positions.start:positions.stop], flow.zero[d][positions.start:positions.stop])
    return out


def reduce(items: Items, flow: Flow, dims: Sequence[int], keepdim: bool, rule: str, label: str) -> Flow:
    """A reduction over `dims`. rule: "sum" (removed channels must be zero), "stat" (mean, variance, norm:
    the statistic changes, a NORM reason), "hard" (max, argmax...: never), "softmax" (normalised along
    dims that stay)."""
    dims = sorted({d % flow.rank for d in dims}) if flow.rank else []
    for d in dims:
        if d not in flow.ids:
            continue
        ids = flow.ids[d]
        if rule == "sum":
            items.consumed.append((label, ids))
            nonzero = ids[~flow.zero[d]]
            if nonzero.numel():
                items.block(nonzero, Reason(HARD, f"{label} sums them while a removed channel would not be zero"))
        elif rule == "stat":
            items.block(ids, Reason(NORM, f"{label} computes a statistic over them"))
        else:
            items.block(ids, Reason(HARD, f"{label} reduces over them"))
    if rule == "softmax":
        out = Flow(flow.shape)
        for d, ids in flow.ids.items():
            out.carry(d, ids, False)
        return out
    kept = [d for d in range(flow.rank) if d not in dims or keepdim]
    shape = tuple(1 if d in dims else flow.shape[d] for d in kept)
    out = Flow(shape)
    for new, old in enumerate(kept):
        if old in flow.ids and old not in dims:
            out.carry(new, flow.ids[old], flow.zero[old])
    return out


def contract(items: Items, operands: list[tuple[Flow, str]], output: str, shape: Sequence[int], label: str) -> Flow:
    """An einsum of two operands (letters per dim): shared letters unite, summed letters must be zero."""
    out = Flow(tuple(shape))
    letters = dict.fromkeys(ch for _, spec in operands for ch in spec)
    for letter in letters:
        full = max(f.shape[spec.index(letter)] for f, spec in operands if letter in spec)
        carriers, varying = [], []
        for f, spec in operands:
            if letter not in spec:
                continue
            d = spec.index(letter)
            if d in f.ids and f.shape[d] == full:
                carriers.append((f.ids[d], f.zero[d]))
            elif d in f.ids:
                items.block(f.ids[d], Reason(HARD, f"{label} broadcasts a single channel"))
            elif f.shape[d] == full and full > 1:
                varying.append(f)
        if not carriers:
            continue
        for ids, _ in carriers[1:]:
            items.union(carriers[0][0], ids)
        if varying:
            for ids, _ in carriers:
                items.block(ids, Reason(HARD, f"{label} multiplies them with a value that is not traced"))
        zero = carriers[0][1].clone()
        for _, z in carriers[1:]:
            zero |= z
        if letter in output:
            out.carry(output.index(letter), carriers[0][0], zero)
        else:
            items.consumed.append((label, carriers[0][0]))
        if letter not in output and not bool(zero.all()):
            items.block(carriers[0][0][~zero], Reason(HARD, f"{label} sums over them while a removed channel would not be zero"))
    return out


def block_all(items: Items, flows: Iterable[Flow], reason: Reason) -> None:
    for flow in flows:
        for ids in flow.all_ids():
            items.block(ids, reason)
