"""Structured pruning: channel groups found on the graph, physically removed; a smaller, faster GraphModule.

`prune(gm, 0.3, example_inputs=(x,))` removes 30% of the units of every prunable group (the
lowest by importance); `prune(gm, masks={"layer1.0.conv1": keep})` removes exactly the channels a
mask drops. Every member of a group loses the same units: weight rows and columns, biases,
BatchNorm statistics and affine parameters, literal sizes in the graph, adapters. The module
paths stay, so the state_dict keys are the model's. The pruned model computes what the *masked*
model computes (the removed channels zeroed in every member); with `compensate=True`, what the
model with only the removed channels' weights zeroed computes, where that can be folded exactly.
After `prune(gm, masks={"conv": keep})` on conv → bn → relu → fc:

    conv = self.conv(x)            # Conv2d(3, 12, ...) instead of Conv2d(3, 16, ...)
    bn = self.bn(conv)             # BatchNorm2d(12)
    ...
    fc = self.fc(flatten)          # Linear(12, 10)

`pruned.meta["fxtune_prune"]` holds a report as data (groups pruned, skipped and why; compensation);
`PruneReport.of(pruned)` prints it as a table.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from tabulate import tabulate
from torch import fx

import fxtune
from fxtune import StructureError
from fxtune import channel_groups
from fxtune.kit import name_chosen, remove_channels, unit_importance

ChannelGroup = Any  # fxtune.channels.ChannelGroup: a group of channel_groups(gm)

IMPORTANCE = ("l1", "l2", "bn_scale", "random", "taylor")


REPORT = "fxtune_prune"  # gm.meta key of the report


@dataclass
class PruneReport:
    """What prune did per group (channels before → after, or why not), and where compensation was exact.

    The pruned GraphModule keeps it as data (`gm.meta["fxtune_prune"]`, saved by fxtune.save);
    `PruneReport.of(gm)` gives it back as a printable table.
    """

    rows: list[tuple[str, int, int, str]] = field(default_factory=list)
    compensation: list[tuple[str, str, str]] = field(default_factory=list)

    @classmethod
    def of(cls, gm: fx.GraphModule) -> "PruneReport":
        data = gm.meta[REPORT]
        return cls([tuple(r) for r in data["groups"]], [tuple(r) for r in data["compensation"]])

    def as_data(self) -> dict:
        return {"groups": [list(r) for r in self.rows], "compensation": [list(r) for r in self.compensation]}

    def __str__(self) -> str:
        text = tabulate(self.rows, headers=["group", "channels", "kept", "status"])
        if self.compensation:
            text += "\n" + tabulate(self.compensation, headers=["consumer", "group", "compensation"])
        return text


def _check_ratio(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise StructureError(f"{where} must be a number in [0, 1) (the fraction of a group's channels to remove), got {value!r}")
    return float(value)


def _ratio_of(group: ChannelGroup, ratio: Any) -> float | None:
    if isinstance(ratio, dict):
        for pattern, value in ratio.items():
            if fnmatch.fnmatchcase(group.name, pattern):
                return value
        return None
    return ratio


def keep_count(units: int, ratio: float, unit_size: int, round_to: int) -> int:
    """Units kept: floor(ratio·units) removed, then rounded up so that kept channels are a multiple of round_to."""
    keep = units - math.floor(ratio * units + 1e-9)
    step = math.lcm(unit_size, round_to) // unit_size
    keep = min(units, math.ceil(keep / step) * step)
    return max(1, keep)


def _lowest(group: ChannelGroup, scores: torch.Tensor, count: int) -> torch.Tensor:
    """A removal mask over units: the `count` lowest scores (ties by position), never emptying a tensor."""
    order = torch.argsort(scores, stable=True)
    remove = torch.zeros(scores.numel(), dtype=torch.bool)
    remove[order[:count]] = True
    for unit in reversed(order[:count].tolist()):
        if not emptied(group, remove):
            break
        remove[unit] = False
    return remove


def emptied(group: ChannelGroup, remove: torch.Tensor) -> list[str]:
    """Tensors that would lose every position along an axis (a layer with no channel left, which torch refuses)."""
    return sorted({m.name for m in group.members if m.literal is None and m.role not in ("consumed",)
                   and m.channels == m.size and bool(remove[m.units].all())})


def _from_masks(groups: Any, masks: dict, allow_norm_change: bool) -> dict[str, torch.Tensor]:
    if not isinstance(masks, dict):
        raise StructureError(f"masks= must be a dict {{group name: bool keep mask}}, got {type(masks).__name__}")
    remove = {}
    for name, keep in masks.items():
        if name not in groups.names:
            raise StructureError(f"masks= names no channel group '{name}'; groups: {groups.names[:60]}")
        group = groups[name]
        if not group.prunable_with(allow_norm_change):
            hint = " (allow_norm_change=True prunes it anyway, changing the normalisation)" if group.prunable_with(True) else ""
            raise StructureError(f"channel group '{name}' is not prunable: {group.why_not}{hint}")
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (group.channels,):
            got = f"{keep.dtype} tensor of shape {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise StructureError(f"masks['{name}'] must be a bool tensor of shape ({group.channels},) (True = keep), got {got}")
        units = group.units_of(keep.cpu())
        if not bool(units.any()):
            raise StructureError(f"masks['{name}'] removes every channel of the group; keep at least one")
        empty = emptied(group, ~units)
        if empty:
            raise StructureError(f"masks['{name}'] removes every channel of {empty[:4]}, which a layer cannot have; keep at least "
                                 "one of their channels")
        remove[name] = ~units
    return remove


def _candidates(groups, remove, ratio, exclude, allow_norm_change) -> tuple[list[ChannelGroup], dict[str, str]]:
    """The groups a ratio applies to, and why each other group is left whole."""
    chosen, skipped = [], {}
    for g in groups:
        if g.name in remove:
            continue
        if exclude is not None and name_chosen(g.name, g, exclude):
            skipped[g.name] = "excluded"
        elif _ratio_of(g, ratio) is None:
            skipped[g.name] = "no ratio given"
        elif not g.prunable_with(allow_norm_change):
            skipped[g.name] = (f"normalised over these channels: {g.why_not} (allow_norm_change=True prunes it)"
                               if g.prunable_with(True) else f"not prunable: {g.why_not}")
        elif g.units < 2:
            skipped[g.name] = "one unit"
        else:
            chosen.append(g)
    return chosen, skipped


def _from_ratio(scores: dict[str, torch.Tensor], ratio, chosen, global_ranking, round_to) -> dict[str, torch.Tensor]:
    if not global_ranking:
        return {g.name: _lowest(g, scores[g.name], g.units - keep_count(g.units, _ratio_of(g, ratio), g.unit_size, round_to))
                for g in chosen}
    pool = []
    for g in chosen:
        s = scores[g.name]
        normalised = s / s.mean().clamp_min(1e-30)
        pool += [(float(v), g.name, u) for u, v in enumerate(normalised)]
    pool.sort()
    total = sum(g.channels for g in chosen)
    budget, removed = math.floor(ratio * total), {g.name: 0 for g in chosen}
    by_name = {g.name: g for g in chosen}
    spent = 0
    for _, name, _ in pool:
        g = by_name[name]
        if spent + g.unit_size > budget:
            continue
        if removed[name] < g.units - 1:
            removed[name] += 1
            spent += g.unit_size
    out = {}
    for g in chosen:
        keep = keep_count(g.units, removed[g.name] / g.units, g.unit_size, round_to)
        out[g.name] = _lowest(g, scores[g.name], g.units - keep)
    return out


@fxtune.register_pass
def prune(
    gm: fx.GraphModule,
    ratio: float | dict[str, float] | None = None,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    importance: str | Callable = "l2",
    global_ranking: bool = False,
    round_to: int = 1,
    exclude: Any = None,
    allow_norm_change: bool = False,
    compensate: bool = False,
    data: Iterable | None = None,
    loss: Callable | None = None,
    seed: int = 0,
    example_inputs: Any = None,
) -> fx.GraphModule:
    """Removes channels from every member of the chosen groups; returns a new, smaller GraphModule.

    ratio: the fraction of each prunable group's channels to remove (or {group glob: ratio}), by
    `importance` ("l1", "l2", "bn_scale" (l2 where a group has no norm), "random" seeded by `seed`, "taylor" on `data` batches with
    `loss(model, batch)`, or a callable (group, gm) -> one score per unit), per group or, with
    global_ranking, across groups (scores normalised by each group's mean). masks: {group name:
    keep mask over its channels}, applied exactly. round_to: kept channels are multiples of it.
    exclude: group names (glob, list, regex or predicate) left whole. Groups normalised over their
    channels (LayerNorm, GroupNorm) are left whole unless allow_norm_change=True (not output-
    preserving). compensate: fold removed channels' constant outputs into consumers' biases.
    example_inputs: needed for symbolic traces (shapes only).
    """
    if ratio is None and masks is None:
        raise StructureError("prune needs ratio= (fraction of channels to remove) or masks= ({group: keep mask})")
    if isinstance(ratio, dict):
        ratio = {k: _check_ratio(v, f"ratio['{k}']") for k, v in ratio.items()}
    elif ratio is not None:
        ratio = _check_ratio(ratio, "ratio")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise StructureError(f"round_to must be a positive int, got {round_to!r}")
    if not callable(importance) and importance not in IMPORTANCE:
        raise StructureError(f"importance must be one of {IMPORTANCE} or a callable (group, gm) -> scores, got {importance!r}")
    if importance == "taylor" and ratio is not None and (data is None or loss is None):
        raise StructureError("importance='taylor' needs data= (an iterable of batches) and loss= (loss(model, batch) -> scalar)")
    if global_ranking and isinstance(ratio, dict):
        raise StructureError("global_ranking=True ranks every group together, so ratio must be one number")
    if compensate:
        training = sorted(n for n, m in gm.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training)
        if training:
            raise StructureError(f"compensate=True needs inference BatchNorms, but {training[:4]} are in training mode "
                                 "(they normalise each batch, so a removed channel is no constant); call gm.eval() first")
        if fxtune.adapters(gm):
            raise StructureError("compensate=True folds constants into base biases; fuse the adapters first (fxtune.passes.fuse)")
    groups = channel_groups(gm, example_inputs=example_inputs)
    report, skipped = PruneReport(), {}
    remove = _from_masks(groups, masks, allow_norm_change) if masks is not None else {}
    if ratio is not None:
        chosen, skipped = _candidates(groups, remove, ratio, exclude, allow_norm_change)
        scores = unit_importance(gm, chosen, importance, seed=seed, data=data, loss=loss)
        remove.update(_from_ratio(scores, ratio, chosen, global_ranking, round_to))
    for g in groups:
        if g.name in remove:
            report.rows.append((g.name, g.channels, int((~remove[g.name])[g.channel_units].sum()), "pruned"))
        elif g.name in skipped:
            report.rows.append((g.name, g.channels, g.channels, skipped[g.name]))
    if not any(bool(r.any()) for r in remove.values()):
        listing = "\n  ".join(f"{n}: {s}" for n, _, _, s in report.rows[:20])
        raise StructureError(f"prune found nothing to remove:\n  {listing}")
    pruned, report.compensation = remove_channels(gm, groups, remove, compensate=compensate, example_inputs=example_inputs)
    pruned.meta[REPORT] = report.as_data()
    inexact = [f"{reader} ({group}): {why}" for reader, group, why in report.compensation if why.startswith("skipped")]
    if inexact:
        fxtune.warn("compensate=True could not fold every removed channel's constant exactly; those readers now see 0 instead:\n  "
                    + "\n  ".join(inexact[:12]))
    return pruned
