"""Looking at a GraphModule: its sites and adapters as a table, code diffs, coverage, trainable parameters."""

from __future__ import annotations

import difflib

from tabulate import tabulate
from torch import fx, nn

from .adapter.forms import effective_forms
from .adapter.slots import all_slots, slots_by_weight
from .frontends.trace import trace
from .graph.coverage import Coverage, coverage_of
from .graph.discovery import discover_sites
from .graph.ownership import NAMESPACE, trainable_names
from .graph.parts import gathered, graphs_of, is_parted
from .graph.sites import join


def coverage(model: nn.Module, gm: fx.GraphModule | None = None) -> Coverage:
    """Which of `model`'s Linear/Conv/Embedding/Conv1D weights and MultiheadAttention projections are
    call sites of `gm` (traced from it; `fxtune.trace(model)` if None), and why the others are not."""
    return coverage_of(model, trace(model) if gm is None else gm)


def trainable_parameters(gm: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should update: the adapters' (and modules trained with them),
    and those a structural pass made trainable (e.g. low-rank factors), if still requiring grad."""
    if is_parted(gm):
        return gathered(gm, trainable_parameters)
    listed = set(trainable_names(gm))
    return [p for name, p in gm.named_parameters() if p.requires_grad and (name.startswith(NAMESPACE + ".") or name in listed)]


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape)


def summary_rows(gm: fx.GraphModule) -> list[dict]:
    """One record per call site: its module, weight shape, adapters (with the form used) and counts."""
    rows, counted, seen_all, seen_trainable = [], set(), set(), set()
    structural = set(trainable_names(gm))
    by_weight = slots_by_weight(gm, active_only=False)
    for site in discover_sites(gm):
        slots = by_weight.get(site.weight_name, [])
        emitted = [s for s in slots if s.active and not s.merged]
        forms = dict(zip(map(id, emitted), effective_forms(site, emitted)))
        labels = []
        for slot in slots:
            form, reason = forms.get(id(slot), ("merged" if slot.merged else "inactive", ""))
            label = f"{slot.adapter}:{slot.kind}[{form}]"
            labels.append(label + (f" ({reason})" if reason and form == "weight" else ""))
        first = site.weight_name not in counted
        counted.add(site.weight_name)
        params = sum(s.num_params(seen=seen_all) for s in slots) if first else 0
        trainable = sum(s.num_params(trainable_only=True, seen=seen_trainable) for s in slots) if first else 0
        if first:
            trainable += sum(
                p.numel() for n, p in site.module.named_parameters() if p.requires_grad and join(site.use_ref.owner, n) in structural
            )
        rows.append(
            {
                "site": site.name,
                "module": site.type_name,
                "weight": _shape(site.weight_shape),
                "adapters": ", ".join(labels) if first else f"(shares {site.weight_name})",
                "params": params,
                "trainable": trainable,
                "adapted": bool(slots),
            }
        )
    return rows


def masked_entries(gm: nn.Module, *, trainable_only: bool = False) -> int:
    """Adapter parameter entries that masks exclude (they reach only pruned weights): never counted."""
    stored, seen_stored, seen_counted = 0, set(), set()
    for slot in all_slots(gm):
        for p in slot.parameters(recurse=False):
            if id(p) not in seen_stored and (p.requires_grad or not trainable_only):
                seen_stored.add(id(p))
                stored += p.numel()
        stored -= slot.num_params(trainable_only=trainable_only, seen=seen_counted)
    return stored


def summary(gm: fx.GraphModule) -> str:
    """A table of call sites with their adapters, and a totals line with the trainable share (for a model
    traced in parts, the sites of every part)."""
    rows = gathered(gm, summary_rows)
    table = tabulate(
        [[r["site"], r["module"], r["weight"], r["adapters"] or "-", f"{r['params']:,}", f"{r['trainable']:,}"] for r in rows],
        headers=["site", "module", "weight", "adapters", "params", "trainable"],
        colalign=("left", "left", "left", "left", "right", "right"),
    )
    graphs = graphs_of(gm)
    total = sum(p.numel() for p in gm.parameters()) - sum(masked_entries(g) for g in graphs)
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad) - sum(masked_entries(g, trainable_only=True) for g in graphs)
    adapted = sum(1 for r in rows if r["adapted"])
    share = 100.0 * trainable / total if total else 0.0
    return (
        f"{table}\n{adapted}/{len(rows)} sites adapted · trainable {trainable:,} of {total:,} parameters "
        f"({share:.3f}%)"
    )


def diff(before: fx.GraphModule | str, after: fx.GraphModule | str, *, context: int = 3) -> str:
    """Unified diff of the generated code of two GraphModules ('' when the code is identical)."""
    a = before if isinstance(before, str) else before.code
    b = after if isinstance(after, str) else after.code
    lines = difflib.unified_diff(
        a.strip("\n").splitlines(), b.strip("\n").splitlines(), "before", "after", n=context, lineterm=""
    )
    return "\n".join(lines)
