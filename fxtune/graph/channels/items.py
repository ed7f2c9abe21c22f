"""What the channel analysis records: items and their union-find, reasons, members, literals.

Every output channel of a layer is an *item*. Ops that tie positions together *unite* items:
united items form one unit, removed together or not at all. Whatever cannot be followed *blocks*
the items it touches, with a reason; a group with a blocked unit is not pruned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

HARD, NORM = "hard", "norm"  # a reason that always blocks / one that allow_norm_change=True overrides
MAX_REASONS = 4


@dataclass(frozen=True)
class Reason:
    """Why some channels cannot be removed: `kind` HARD, or NORM (pruning would change a normalisation)."""

    kind: str
    text: str


class Items:
    """Channel items and their union-find; each root keeps the reasons that block it."""

    def __init__(self):
        self.parent: list[int] = []
        self.reasons: dict[int, list[Reason]] = {}
        self.consumed: list[tuple[str, Tensor]] = []  # (what, items) summed away by something that is no layer
        self.split_units: set[int] = set()  # items standing for a block a view split off (a head)

    def new(self, n: int) -> Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n)

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def _join(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx == ry:
            return
        if ry < rx:
            rx, ry = ry, rx
        self.parent[ry] = rx
        moved = self.reasons.pop(ry, None)
        if moved:
            for reason in moved:
                self._note(rx, reason)

    def union(self, a: Tensor, b: Tensor) -> None:
        """Unites a[i] with b[i] for every i (positions that are no item, -1, are skipped)."""
        if a is b or torch.equal(a, b):
            return
        for x, y in zip(a.tolist(), b.tolist()):
            if x >= 0 and y >= 0:
                self._join(x, y)

    def union_all(self, ids: Tensor) -> None:
        """Unites every item in `ids` into one unit."""
        found = [i for i in ids.flatten().tolist() if i >= 0]
        for other in found[1:]:
            self._join(found[0], other)

    def _note(self, root: int, reason: Reason) -> None:
        kept = self.reasons.setdefault(root, [])
        if reason not in kept and len(kept) < MAX_REASONS:
            kept.append(reason)

    def block(self, ids: Tensor, reason: Reason) -> None:
        for i in set(ids.flatten().tolist()):
            if i >= 0:
                self._note(self.find(i), reason)

    def from_split(self, ids: Tensor) -> bool:
        """Whether any of these items stands for a block that a view split channels into (a head, a shuffle group)."""
        if not self.split_units:
            return False
        split = {self.find(i) for i in self.split_units}
        return any(self.find(i) in split for i in ids.tolist() if i >= 0)

    def roots(self) -> Tensor:
        """The root of every item, as one tensor (index by item id)."""
        return torch.tensor([self.find(i) for i in range(len(self.parent))], dtype=torch.long)


@dataclass
class Dyn:
    """A number computed in the graph (a size); `ids`: the channel items whose count it depends on."""

    ids: list


@dataclass
class TensorMember:
    """Positions along `axis` of the parameter or buffer `path` that hold the items `ids`."""

    path: str
    axis: int
    ids: Tensor
    role: str  # out, in, bias, norm_weight, norm_bias, norm_stat, param


@dataclass
class Literal:
    """A number in the graph or a module attribute that counts channels (a view's size, a split, a slice)."""

    node: str
    kind: str  # sizes, unflatten, split, slice, norm_shape, groups, module
    dim: int
    ids: Tensor
    extra: Any = None
