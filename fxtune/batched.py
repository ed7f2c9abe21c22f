"""Mixed-adapter batches: one forward pass in which every sample uses its own adapter (or the base).

`batched(gm, ["a", "b", "c"])` adds a last input `adapter_index` (per sample: a position in the
names, or -1 for the base model). Rows are grouped by adapter once per forward; each adapted site
runs every group with its own adapter. With LoRA `a` (activation form) and `b` (weight form) on
`fc`, and `c` elsewhere, `fc` reads:

    batch_plan = fxtune_batched_plan_batch(adapter_index, ('a', 'b', 'c'))
    fc_a_rows = fxtune_batched_take_rows(x, batch_plan, (0, 1, 2, 0), 1, site = 'fc')
    fc_base = torch._C._nn.linear(x, fc_weight, fc_bias)                 # whole batch, once
    fc_a_base_rows = fxtune_batched_take_rows(fc_base, batch_plan, (0, 1, 2, 0), 1, site = 'fc')
    fc_a_lora_down = torch._C._nn.linear(fc_a_rows, fc_a_lora_a, None)  # LoRA's own activation code
    fc_a_lora = fxtune_ops_add_feature_mix(fc_a_base_rows, fc_a_lora_down, fc_a_lora_b, 1.0)
    fc_b_rows = fxtune_batched_take_rows(x, batch_plan, (0, 1, 2, 0), 2, site = 'fc')
    fc_b_lora_weight = fxtune_passes_lora_lora_weight(fc_weight, lora_a = ..., lora_b = ..., scale = 1.0)
    fc_b_out = torch._C._nn.linear(fc_b_rows, fc_b_lora_weight, fc_bias)  # the kind's weight(w, ...)
    fc = fxtune_batched_merge_rows((None, fc_a_lora, fc_b_out, None), batch_plan, (0, 1, 2, 0), base = fc_base)

The route `(0, 1, 2, 0)` gives the site's option for adapter_index -1, 0, 1, 2 (0 = base, so an
adapter absent from a site leaves it as base); a site's groups are runs of equal entries.
A group in weight form (form="weight": all of them, for any kind) calls the site with the kind's
`weight(w)` / `bias(b)`; in activation form the kind's own code wraps the base output (PEFT's
`adapter_names=` does this for LoRA), and input-side kinds (IA³ "input") get their own call.

Cost per adapted site and forward: the base call on the whole batch when an output-side group
uses it (else on the base groups' rows), plus one call per weight-form or input-side group on its
rows only; so between 1× and (1 + their share of the batch)× the site's compute. Each weight-form
adapter's weight transform once; activation branches on their own rows; adapter rows are
gathered and written back (views when the batch is sorted by adapter_index; nothing when one
option takes every row). Per forward: one argsort and one host sync (group sizes).
The batch must be the first dimension of every adapted site's input, as in PEFT.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Iterable, Sequence

import torch
from torch import Tensor, fx, nn

from .basekeeping import replaced_by, replacement, use_base
from .calls import remember_call as _remember_call
from .emit import META, Emitter
from .errors import AdapterError
from .kinds import get_kind
from .ownership import clone_graph_module
from .rewrite import _inputs, effective_forms, opaque_reason, strip_sites
from .sites import Site, all_sites, canonical_sites
from .slots import AdapterSlot, all_slots, slot_path, target_key
from .weights import Weights, keep_index, keep_positions

INDEX = "adapter_index"
BASES = "fxtune_batched_bases"  # an adapter's replacement base weight (PiSSA), non-persistent
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


def batched(gm: fx.GraphModule, names: str | Iterable[str], *, form: str = "auto") -> fx.GraphModule:
    """A new GraphModule with a last input `adapter_index`: sample i uses `names[adapter_index[i]]`
    (-1: the base model). form="auto" keeps each adapter's form in gm; form="weight" evaluates
    every adapter's weight transform (the generic path). gm is left unchanged."""
    if not isinstance(gm, fx.GraphModule):
        raise AdapterError(f"batched takes a GraphModule (use fxtune.trace(model) first), got {type(gm).__name__}")
    names = (names,) if isinstance(names, str) else tuple(names)
    if form not in ("auto", "weight"):
        raise AdapterError(f"form must be 'auto' or 'weight', got {form!r}")
    known = list(dict.fromkeys(s.adapter for s in all_slots(gm)))
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise AdapterError(f"names must be distinct adapter names (str); got {list(names)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AdapterError(f"no adapter named {unknown}; this GraphModule has {known or 'none'}")
    merged = sorted({s.adapter for s in all_slots(gm) if s.merged})
    if merged:
        raise AdapterError(
            f"adapters {merged} are merged into the weights, so no sample could run without them; "
            "call fxtune.unmerge(gm) first, then fxtune.batched"
        )
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(n.target == INDEX or n.name == INDEX for n in inputs):
        raise AdapterError(f"this GraphModule already has an input named '{INDEX}' (is it batched already?)")
    if any(str(n.target).startswith("*") for n in inputs):
        raise AdapterError("batched needs a forward without *args/**kwargs; trace with concrete_args to fix them")
    out = clone_graph_module(gm)
    _check_sites(out, names)
    _use_traced_bases(out, names)
    strip_sites(out)
    plan = _add_index_input(out, names)
    for site in all_sites(out):
        _emit_site(out, site, plan, names, form)
    for node in reversed(out.graph.nodes):
        if node.meta.get(META, {}).get("site") is not None and not node.users:
            out.graph.erase_node(node)
    out.graph.lint()
    out.recompile()
    return out


def _check_sites(gm: fx.GraphModule, names: tuple[str, ...]) -> None:
    """Refuses sites whose output cannot be computed per group of rows (weights used inside other calls)."""
    adapted = {s.target for s in all_slots(gm) if s.adapter in names}
    for site in all_sites(gm):
        if site.target in adapted and (site.call not in ("module", "function") or not site.canonical):
            why = {"value": "its weight is passed as a value into other code", "mha": "it is inside nn.MultiheadAttention"}
            if site.call == "opaque":
                why["opaque"] = f"its module is called as a whole ({opaque_reason(site)})"
            raise AdapterError(
                f"batched cannot serve site '{site.name}': {why.get(site.call, 'it uses a tied weight in another layout')}, "
                f"so its rows cannot take different adapters. Leave {sorted({s.adapter for s in all_slots(gm) if s.target == site.target and s.adapter in names})} "
                f"off '{site.target}' (exclude it when adding them), or fuse/merge them for a single-adapter model"
            )


def _use_traced_bases(gm: fx.GraphModule, names: tuple[str, ...]) -> None:
    """Puts back the traced weights; a replacement base weight (PiSSA) of a named adapter is kept
    (canonical view) as a non-persistent buffer (under `fxtune_batched_bases`) for that adapter's rows."""
    bases = nn.Module()
    store, sites = Weights(gm), canonical_sites(gm)
    for slot in all_slots(gm):
        slot.active = slot.adapter in names
    for target in dict.fromkeys(s.target for s in all_slots(gm)):
        ref = sites[target].ref
        if replaced_by(store, ref) in names:
            bases.register_buffer(target_key(target), replacement(store, ref).detach().contiguous(), persistent=False)
        use_base(store, ref, False)
    if bases._buffers:
        gm.add_module(BASES, bases)


def _add_index_input(gm: fx.GraphModule, names: tuple[str, ...]) -> fx.Node:
    """Adds `adapter_index` as the last positional input and the per-forward `batch_plan` node."""
    graph = gm.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    default = None if any(n.args for n in inputs) else inspect.Signature.empty
    with graph.inserting_after(inputs[-1]) if inputs else graph.inserting_before(None):
        index = graph.placeholder(INDEX, default_value=default)
    with graph.inserting_after(index):
        plan = graph.create_node("call_function", plan_batch, (index, names), name="batch_plan")
    index.meta[META] = {"site": None, "adapter": None, "kind": None, "role": INDEX}
    plan.meta[META] = {"site": None, "adapter": None, "kind": None, "role": "batch_plan"}
    return plan


def _emit_site(gm: fx.GraphModule, site: Site, plan: fx.Node, names: tuple[str, ...], form: str) -> None:
    """Replaces one site's call by the merge of its groups' outputs, each group with its own adapter."""
    slots = {s.adapter: s for s in all_slots(gm) if s.target == site.target and s.adapter in names}
    touching = [n for n in names if n in slots]
    if not touching:
        return
    route = (0,) + tuple(touching.index(n) + 1 if n in slots else 0 for n in names)
    options = [option for option, _ in itertools.groupby(route)]
    node = site.node
    _remember_call(node)
    with gm.graph.inserting_before(node):
        groups = _Groups(gm, site, plan, route)
        outs = {i: groups.adapted(i, slots[touching[o - 1]], form) for i, o in enumerate(options) if o}
        outs.update((i, groups.base(i)) for i, o in enumerate(options) if not o)
    merged = tuple(outs[i] for i in range(len(options)))
    node.op, node.target, node.args = "call_function", merge_rows, (merged, plan, route)
    node.kwargs = {"base": groups.shared} if groups.shared is not None else {}


class _Groups:
    """Emits one site's per-group code. The base call on the whole batch is made once, when an
    output-side activation form first needs it; the base groups then keep its rows (part None)."""

    def __init__(self, gm: fx.GraphModule, site: Site, plan: fx.Node, route: tuple[int, ...]):
        self.gm, self.site, self.plan, self.route = gm, site, plan, route
        self.root = Emitter(gm, site)
        self.x = site.input
        self.weight = self.root.base_weight(role="weight")
        self.bias = self.root.base_bias(role="bias")
        self.replaced = replaced_by(Weights(gm), site.ref)
        self.shared: fx.Node | None = None

    def rows(self, em: Emitter, x: fx.Node, i: int, role: str) -> fx.Node:
        return em.call(take_rows, x, self.plan, self.route, i, site=self.site.name, role=role)

    def base_rows(self, em: Emitter, i: int) -> fx.Node:
        """Rows of group i of the base output of the whole batch."""
        if self.shared is None:
            self.shared = self.root.site_call(self.x, self.weight, self.bias, role="base")
        return self.rows(em, self.shared, i, "base_rows")

    def base(self, i: int) -> fx.Node | None:
        if self.shared is not None:
            return None
        return self.root.site_call(self.rows(self.root, self.x, i, "base_rows"), self.weight, self.bias, role="base")

    def adapted(self, i: int, slot: AdapterSlot, form: str) -> fx.Node:
        """Group i under `slot`: its weight transform, or the kind's activation form."""
        site, kind = self.site, get_kind(slot.kind)
        em = self.root.for_slot(slot.adapter, slot.kind, slot_path(slot))
        x = self.rows(em, self.x, i, "rows")
        weight, bias, replaced = self.weight, self.bias, self.replaced == slot.adapter
        if replaced:
            weight = em.get_attr(f"{BASES}.{target_key(site.target)}", role="base_weight")
        inputs = _inputs(em, slot)
        if form == "weight" or effective_forms(site, [slot])[0][0] == "weight":
            w = em.call(kind.weight, weight, role=f"{kind.name}_weight", **kind.accepted(kind.weight, inputs))
            if site.kept is not None:
                w = em.call(keep_index, w, weight, site.kept[1], site.kept[0], role="keep_padding")
            if bias is not None and kind.acts_on_bias(slot.config):
                bias = em.call(kind.bias, bias, role=f"{kind.name}_bias", **kind.accepted(kind.bias, inputs))
            return em.site_call(x, w, bias, role="out")
        inner = kind.activation_input(em, x, inputs) if kind.activation_input is not None else x
        if inner is x and not replaced:
            y = self.base_rows(em, i)
        else:
            y = em.site_call(inner, weight, bias, role="out")
        out = kind.activation(em, x, y, inputs) if kind.activation is not None else y
        if site.kept is not None and out is not y:
            out = em.call(keep_positions, out, y, x, site.kept[1], role="keep_padding")
        return out
