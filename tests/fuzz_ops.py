"""Random operations for the fuzz tests: adapter passes with random settings, lifecycle calls, structural passes.

Each `draw_*` function draws (with hypothesis' interactive `data.draw`) what to do on the current
GraphModule and returns an `Op`: a label for failure messages and a function GraphModule ->
GraphModule. Targets are drawn from the GraphModule's current sites.
"""

from __future__ import annotations

import fnmatch
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from hypothesis import strategies as st
from torch import fx, nn

import fxtune
from fxtune import passes

ADAPTER_NAMES = ("default", "a", "b", "task_x")
ADAPTER_KINDS = ("lora", "lora", "lora", "ia3", "slice_delta", "svdiff", "dora", "sp_lora", "sp_para", "sp_lopa", "train_module")
SITE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention)
GLOBS = ("conv*", "lin*", "attn*", "*.q", "*.v", "head*", "emb*", "gpt*", "*")


@dataclass
class Op:
    """One drawn operation: what it is (for messages), its kind of effect, and the call."""

    label: str
    effect: str  # "adapter" (adds parameters to perturb), "lifecycle", "structural"
    run: Callable[[fx.GraphModule], fx.GraphModule]
    kind: str = ""
    options: dict = field(default_factory=dict)


def _site_names(gm: fx.GraphModule) -> tuple[list[str], dict[str, list[str]]]:
    sites = fxtune.sites(gm)
    by_target: dict[str, list[str]] = {}
    for s in sites:
        by_target.setdefault(s.target, []).append(s.name)
    return [s.name for s in sites], by_target


def draw_targets(data, gm: fx.GraphModule):
    """None (every site), whole weights by their site names, single names, a module type or a glob."""
    names, by_target = _site_names(gm)
    how = data.draw(st.sampled_from(["all", "weights", "weights", "weights", "names", "type", "glob"]), label="targets by")
    if how == "all":
        return None
    if how == "weights":
        chosen = data.draw(st.lists(st.sampled_from(sorted(by_target)), min_size=1, max_size=3, unique=True), label="weights")
        return [n for t in chosen for n in by_target[t]]
    if how == "names":
        return data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True), label="names")
    if how == "type":
        present = [t for t in SITE_TYPES if any(isinstance(m, t) for m in gm.modules())]
        return data.draw(st.sampled_from(present or SITE_TYPES), label="type")
    present = [g for g in GLOBS if any(fnmatch.fnmatchcase(n, g) for n in names)]
    return data.draw(st.sampled_from(present or GLOBS), label="glob")


def draw_exclude(data, gm: fx.GraphModule):
    """Mostly None; sometimes whole weights by name, or a glob."""
    how = data.draw(st.sampled_from(["none", "none", "none", "none", "weights", "glob"]), label="exclude by")
    if how == "none":
        return None
    names, by_target = _site_names(gm)
    if how == "weights":
        return by_target[data.draw(st.sampled_from(sorted(by_target)), label="exclude weight")]
    return data.draw(st.sampled_from([g for g in GLOBS if g != "*"]), label="exclude glob")


def adapter_kinds(gm: nn.Module) -> dict[str, str]:
    """{adapter name: its kind} (a train_module joining another kind's adapter does not count)."""
    found: dict[str, str] = {}
    for slot in gm.modules():
        if isinstance(slot, fxtune.AdapterSlot):
            if slot.kind != "train_module" or slot.adapter not in found:
                found[slot.adapter] = slot.kind
    return found


def _adapter_name(data, gm: fx.GraphModule, kind: str) -> str:
    """Mostly a fresh name or one already holding this kind; sometimes any (which may be refused)."""
    kinds = adapter_kinds(gm)
    fresh = [n for n in ADAPTER_NAMES if n not in kinds]
    same = [n for n, k in kinds.items() if k == kind or kind == "train_module"]
    how = data.draw(st.sampled_from(["fresh", "fresh", "same", "any"]), label="name by")
    pool = {"fresh": fresh, "same": same}.get(how) or fresh or same or list(ADAPTER_NAMES)
    return data.draw(st.sampled_from(pool), label="adapter")


def mask_maker(seed: int, keep: float, block: tuple[int, int] | None = None) -> Callable:
    """masks= as a callable Site -> {in_mask, out_mask[, block_mask]}: seeded per site name, True = keep."""

    def masks(site: fxtune.Site) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed + zlib.crc32(site.name.encode()))
        out = {"in_mask": torch.rand(site.in_features, generator=g) < keep,
               "out_mask": torch.rand(site.out_features, generator=g) < keep}
        if block is not None:
            cols = site.weight_numel // site.out_features
            shape = (site.out_features // block[0], cols // block[1])
            out["block_mask"] = torch.rand(shape, generator=g) < keep
        return out

    return masks


def _common_block(data, gm: fx.GraphModule, targets) -> tuple[int, int]:
    """A block (p, q) tiling every selected weight's (out, in/groups·kernel) matrix."""
    try:
        chosen = fxtune.sites(gm, targets)
    except fxtune.FxtuneError:
        return (1, 1)
    rows = [s.out_features for s in chosen]
    cols = [s.weight_numel // s.out_features for s in chosen]
    ps = [p for p in range(1, min(rows) + 1) if all(r % p == 0 for r in rows)]
    qs = [q for q in range(1, min(cols) + 1) if all(c % q == 0 for c in cols)]
    return data.draw(st.sampled_from(ps), label="p"), data.draw(st.sampled_from(qs), label="q")


def _masks(data, block=None):
    if data.draw(st.booleans(), label="masked"):
        return mask_maker(data.draw(st.integers(0, 2**16), label="mask seed"),
                          data.draw(st.sampled_from([0.5, 0.8, 1.0]), label="keep"), block)
    return None


class _rank_by_site:
    """r as a callable Site -> int (printable): smaller on convs."""

    def __init__(self, r: int):
        self.r = r

    def __call__(self, site: fxtune.Site) -> int:
        return max(1, self.r - 1) if site.is_conv else self.r

    def __repr__(self) -> str:
        return f"<r={self.r}, convs {max(1, self.r - 1)}>"


def _options(data, gm: fx.GraphModule, kind: str, targets) -> dict:
    """Random settings for one adapter pass."""
    d = data.draw
    r = st.integers(1, 4)
    if kind == "lora":
        per_site = d(st.sampled_from([None, None, "glob", "callable"]), label="per-site r")
        rank = d(r, label="r")
        if per_site == "glob":  # first matching glob wins, other sites take the default 8 (refused where too large)
            rank = {d(st.sampled_from(GLOBS), label="r glob"): rank, "*": d(st.integers(1, 3), label="r other")}
        elif per_site == "callable":
            rank = _rank_by_site(rank)
        return dict(r=rank, alpha=d(st.sampled_from([None, 1, 2.5, 8]), label="alpha"),
                    rslora=d(st.booleans(), label="rslora"),
                    init=d(st.sampled_from(["default", "gaussian", "pissa"]), label="init"),
                    form=d(st.sampled_from(["auto", "weight", "activation"]), label="form"),
                    dropout=d(st.sampled_from([0.0, 0.0, 0.0, 0.1]), label="dropout"))
    if kind == "ia3":
        return dict(position=d(st.sampled_from(["output", "input"]), label="position"),
                    form=d(st.sampled_from(["activation", "weight"]), label="form"))
    if kind == "slice_delta":
        return dict(size=d(st.sampled_from([0.1, 0.5, 1.0, (1, 1), (2, 3)]), label="size"),
                    op=d(st.sampled_from(["add", "mul"]), label="op"), seed=d(st.integers(0, 9), label="seed"),
                    where=d(st.sampled_from(["random", "top-left"]), label="where"))
    if kind == "dora":
        return dict(r=d(r, label="r"), alpha=d(st.sampled_from([None, 2, 6]), label="alpha"),
                    rslora=d(st.booleans(), label="rslora"), form=d(st.sampled_from(["auto", "weight", "activation"]), label="form"))
    if kind == "sp_lora":
        return dict(r=d(r, label="r"), alpha=d(st.sampled_from([None, 3]), label="alpha"),
                    centre_tap=d(st.booleans(), label="centre_tap"), masks=_masks(data))
    if kind == "sp_para":
        return dict(masks=_masks(data))
    if kind == "sp_lopa":
        block = _common_block(data, gm, targets)
        return dict(r=d(st.integers(1, 2), label="r"), num_prototypes=d(st.integers(1, 3), label="prototypes"),
                    block=block, masks=_masks(data, block))
    return {}


PASSES = {
    "lora": passes.lora, "ia3": passes.ia3, "slice_delta": passes.slice_delta, "svdiff": passes.svdiff,
    "dora": passes.dora, "sp_lora": passes.sp_lora, "sp_para": passes.sp_para, "sp_lopa": passes.sp_lopa,
    "train_module": fxtune.train_module,
}


def draw_adapter_pass(data, gm: fx.GraphModule) -> Op:
    """One adapter pass of a random kind, on random targets, under a random adapter name."""
    kind = data.draw(st.sampled_from(ADAPTER_KINDS), label="kind")
    name = _adapter_name(data, gm, kind)
    targets = draw_targets(data, gm)
    exclude = draw_exclude(data, gm)
    options = _options(data, gm, kind, targets)
    shown = {k: ("<masks>" if k == "masks" and v is not None else v) for k, v in options.items()}
    label = f"{kind}(targets={getattr(targets, '__name__', targets)!r}, exclude={exclude!r}, adapter={name!r}, {shown})"
    fn = PASSES[kind]

    def run(g: fx.GraphModule) -> fx.GraphModule:
        return fn(g, targets, adapter=name, exclude=exclude, **options)

    return Op(label, "adapter", run, kind, options)


def _subset(data, names: list[str], label: str, min_size: int = 0) -> list[str]:
    picked = data.draw(st.lists(st.sampled_from(names), min_size=min_size, max_size=len(names), unique=True), label=label)
    return [n for n in names if n in picked]


def draw_lifecycle(data, gm: fx.GraphModule, *, can_swap: bool) -> tuple[str, object]:
    """A lifecycle call: (what, argument). The chain runner knows how to perform and check each."""
    names = list(adapter_kinds(gm))
    choices = ["merge", "merge", "unmerge", "set_active", "set_active", "delete", "save_load", "save_load", "fuse_check", "unload"]
    if can_swap:
        choices.append("swap_base")
    what = data.draw(st.sampled_from(choices), label="lifecycle")
    if what == "merge":
        return what, None if data.draw(st.booleans(), label="merge all") else _subset(data, names, "merge names", 1)
    if what == "set_active":
        return what, _subset(data, names, "active")
    if what == "delete":
        return what, data.draw(st.sampled_from(names), label="delete")
    if what == "save_load":
        chosen = names if data.draw(st.booleans(), label="save all") else _subset(data, names, "save names", 1)
        return what, (chosen, data.draw(st.sampled_from(["fxtune", "fxtune", "peft"]), label="format"))
    if what == "fuse_check":
        return what, None if data.draw(st.booleans(), label="fuse all") else _subset(data, names, "fuse names")
    return what, None


def draw_structural(data, gm: fx.GraphModule, *, has_bn: bool) -> list[Op]:
    """Optional structural passes before any adapter: fold_bn (eval-mode conv+BN) and low_rank."""
    ops = []
    if has_bn and data.draw(st.booleans(), label="fold_bn"):
        ops.append(Op("fold_bn()", "structural", passes.fold_bn))
    if data.draw(st.sampled_from([False, False, False, True]), label="low_rank"):
        targets = draw_targets(data, gm)
        rank = data.draw(st.sampled_from([1, 2, 0.5, 1.0]), label="rank")
        force = data.draw(st.booleans(), label="force")
        ops.append(Op(f"low_rank(targets={getattr(targets, '__name__', targets)!r}, rank={rank}, force={force})",
                      "structural", lambda g: passes.low_rank(g, targets, rank=rank, force=force)))
    if len(ops) == 2 and data.draw(st.booleans(), label="low_rank first"):
        ops.reverse()
    return ops
