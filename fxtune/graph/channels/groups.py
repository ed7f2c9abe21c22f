"""Channel groups: the channels of a graph that must be removed together, found on the graph itself.

A group is named by the call site that produces its channels (`"layer1.0.conv1"`); layers whose
outputs are added together (a residual stream), multiplied (a squeeze-excitation gate) or read by
a depthwise conv share one group. Its members are every tensor axis, graph literal and module
attribute that counts those channels: producers' weight rows and biases, norm parameters and
statistics, consumers' weight columns (at the offset a concatenation put them), a view's head
count. A *unit* is what is removed at once: a channel, a conv group of a grouped conv, a head.
What the analysis cannot follow makes the group unprunable, with the reason:

    groups = channel_groups(gm, example_inputs=(x,))
    print(groups)                       # one line per group
    print(groups["layer1.0.conv1"])     # its members
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate
from torch import Tensor, fx

from .items import HARD, NORM, Literal, Reason
from .rules import Analysis
from .shapes import value_shapes
from ...errors import StructureError


@dataclass
class Member:
    """Positions of one member that belong to a group, and the unit each one is in.

    `name` is a parameter or buffer (role out/in/bias/norm_*/param, `axis` of that tensor), or a
    node / module attribute whose number counts the channels (role `literal`, `literal` set)."""

    name: str
    role: str
    axis: int
    positions: Tensor
    units: Tensor
    literal: Literal | None = None
    size: int = 0  # the length of the member's axis (all groups)

    @property
    def offset(self) -> int:
        return int(self.positions.min())

    @property
    def channels(self) -> int:
        return self.positions.numel()


@dataclass
class ChannelGroup:
    """Channels removed together: `channels` of them (the keep mask's length), in `units` units."""

    name: str
    producers: tuple[str, ...]
    channel_units: Tensor  # unit of each channel (a position of a producer's output)
    members: list[Member]
    reasons: list[Reason] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return self.channel_units.numel()

    @property
    def units(self) -> int:
        return int(self.channel_units.max()) + 1 if self.channels else 0

    @property
    def unit_size(self) -> int:
        """Channels per unit (1 for plain channels; a conv group's width; a head's size)."""
        return max(1, self.channels // max(1, self.units))

    @property
    def prunable(self) -> bool:
        return not self.reasons

    def prunable_with(self, allow_norm_change: bool = False) -> bool:
        return all(r.kind == NORM and allow_norm_change for r in self.reasons)

    @property
    def why_not(self) -> str:
        return "; ".join(r.text for r in self.reasons)

    def units_of(self, keep: Tensor) -> Tensor:
        """A keep mask over channels as a keep mask over units (every channel of a unit must agree)."""
        kept = torch.zeros(self.units, dtype=torch.bool).index_fill_(0, self.channel_units[keep], True)
        dropped = torch.zeros(self.units, dtype=torch.bool).index_fill_(0, self.channel_units[~keep], True)
        split = (kept & dropped).nonzero().flatten().tolist()
        if split:
            channels = (self.channel_units == split[0]).nonzero().flatten().tolist()
            raise StructureError(
                f"the mask for group '{self.name}' keeps some channels of a unit and removes others: channels "
                f"{channels} are one unit ({self.unit_size} channels: a conv group or an attention head) and go together"
            )
        return kept

    def __str__(self) -> str:
        state = "prunable" if self.prunable else f"not prunable: {self.why_not}"
        head = f"{self.name}: {self.channels} channels in {self.units} units; {state}"
        rows = [[m.name, m.role if m.literal is None else f"literal ({m.literal.kind})", m.axis, m.offset, m.channels]
                for m in self.members]
        return head + "\n" + tabulate(rows, headers=["member", "role", "axis", "offset", "channels"])


class ChannelGroups(list):
    """The groups of a graph, printable as a table; `groups[name]` finds one by name.

    `constant_sizes` lists sizes the graph computes from channel counts ((node, index, value)):
    pruning pins them to constants, since a channel count never varies with the input."""

    constant_sizes: list = []
    site_of_weight: dict = {}

    def site_masks(self, keep: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        """{site name: {"out_mask", "in_mask"}} that group keep masks imply for every site they touch: the
        form pruning-aware adapters take (`sp_lora(gm, masks=groups.site_masks(keep))`), True = keep."""
        found: dict[str, dict[str, Tensor]] = {}
        for name, mask in keep.items():
            group = self[name]
            units = group.units_of(mask.cpu())
            for m in group.members:
                site = self.site_of_weight.get(m.name)
                if site is None or m.role not in ("out", "in"):
                    continue
                key = "out_mask" if m.role == "out" else "in_mask"
                masks = found.setdefault(site, {})
                if key not in masks:
                    masks[key] = torch.ones(m.size, dtype=torch.bool)
                masks[key][m.positions] = units[m.units]
        return found

    def __getitem__(self, key):
        if isinstance(key, str):
            for group in self:
                if group.name == key:
                    return group
            raise KeyError(f"no channel group '{key}'; groups: {[g.name for g in self][:40]}")
        return super().__getitem__(key)

    @property
    def names(self) -> list[str]:
        return [g.name for g in self]

    def __str__(self) -> str:
        rows = [[g.name, g.channels, g.units, len(g.members), "yes" if g.prunable else f"no: {_short(g)}"] for g in self]
        prunable = sum(g.prunable for g in self)
        return tabulate(rows, headers=["group", "channels", "units", "members", "prunable"]) + (
            f"\n{prunable}/{len(self)} groups prunable")


def _short(group: ChannelGroup) -> str:
    text = group.reasons[0].text
    more = len(group.reasons) - 1
    return text + (f" (+{more} more)" if more else "")


def analyse_channels(gm: fx.GraphModule, example_inputs: Any = None) -> ChannelGroups:
    """The groups of channels of a graph without adapter code (see kit's `channel_groups`), in graph order.

    Shapes come from the graph's metadata (torch.export graphs) or from running it once on fake
    copies of `example_inputs` (a symbolic trace).
    """
    return assemble(Analysis(gm, value_shapes(gm, example_inputs)).run())


def assemble(analysis: Analysis) -> ChannelGroups:
    """Groups from what the analysis found: producers sharing a unit are one group."""
    items = analysis.items
    roots = items.roots()

    def rooted(ids: Tensor) -> Tensor:
        out = torch.full_like(ids, -1)
        found = ids >= 0
        out[found] = roots[ids[found]]
        return out

    site_names = {}
    for site in analysis.sites:
        tensor = analysis.tensor(site.use_ref.path)
        if tensor is not None:
            site_names.setdefault(id(tensor), site.name)
    producers = []
    for member in analysis.members.values():
        tensor = analysis.tensor(member.path)
        if member.role == "out" and id(tensor) in site_names:
            producers.append((site_names[id(tensor)], rooted(member.ids)))
    order = {s.name: i for i, s in enumerate(analysis.sites)}
    producers.sort(key=lambda p: order.get(p[0], len(order)))
    parent = list(range(len(producers)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for index, (_, ids) in enumerate(producers):
        for root in ids.tolist():
            if root < 0:
                continue
            if root in owner:
                a, b = find(owner[root]), find(index)
                parent[max(a, b)] = min(a, b)
            else:
                owner[root] = index
    clusters: dict[int, list[int]] = {}
    for index in range(len(producers)):
        clusters.setdefault(find(index), []).append(index)
    group_of = torch.full((len(items.parent),), -1, dtype=torch.long)
    unit_of = torch.full((len(items.parent),), -1, dtype=torch.long)
    groups = []
    for number, members in enumerate(clusters.values()):
        channel_roots, seen = [], set()
        for index in members:
            ids = [r for r in producers[index][1].tolist() if r >= 0]
            new = ids if index == members[0] else [r for r in ids if r not in seen]
            channel_roots.extend(new)
            seen.update(new)
        unique = list(dict.fromkeys(channel_roots))
        index = torch.tensor(unique, dtype=torch.long)
        group_of[index] = number
        unit_of[index] = torch.arange(len(unique))
        reasons = []
        for r in unique:
            for reason in items.reasons.get(r, []):
                if reason not in reasons:
                    reasons.append(reason)
        groups.append(ChannelGroup(
            name=producers[members[0]][0],
            producers=tuple(producers[i][0] for i in members),
            channel_units=unit_of[torch.tensor(channel_roots, dtype=torch.long)],
            members=[],
            reasons=sorted(reasons, key=lambda r: r.kind != HARD)[:6],
        ))
    _attach_members(analysis, groups, rooted, group_of, unit_of)
    found = ChannelGroups(groups)
    found.constant_sizes = list(analysis.constant_sizes)
    found.site_of_weight = {}
    for site in analysis.sites:
        if site.call in ("module", "function") and site.use_ref.rows is None:
            found.site_of_weight.setdefault(site.use_ref.path, site.name)
    return found


def _attach_members(analysis: Analysis, groups: list[ChannelGroup], rooted, group_of: Tensor, unit_of: Tensor) -> None:
    """Every tensor axis and literal, split by group: the positions of each group's units."""
    entries: list[tuple[str, str, int, Tensor, Literal | None]] = [
        (m.path, m.role, m.axis, m.ids, None) for m in analysis.members.values()
    ]
    entries += [(lit.node, "literal", lit.dim, lit.ids, lit) for lit in analysis.literals]
    entries += [(label, "consumed", 0, ids, None) for label, ids in analysis.items.consumed]
    for name, role, axis, ids, literal in entries:
        r = rooted(ids)
        valid = r >= 0
        g = torch.full_like(r, -1)
        g[valid] = group_of[r[valid]]
        for number in sorted(set(g[g >= 0].tolist())):
            positions = (g == number).nonzero().flatten()
            groups[number].members.append(Member(name, role, axis, positions, unit_of[r[positions]], literal, ids.numel()))
