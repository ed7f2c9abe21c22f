"""Mixed-adapter batches: one forward pass in which every sample uses its own adapter (or the base).

`batched(gm, ["a", "b", "c"])` adds a last input `adapter_index` (per sample: a position in the
names, or -1 for the base model). Rows are grouped by adapter once per forward; each adapted site
runs every group with its own adapter. With LoRA `a` (activation form) and `b` (weight form) on
`fc`, and `c` elsewhere, `fc` reads:

    batch_plan = fxtune_adapter_batch_rows_plan_batch(adapter_index, ('a', 'b', 'c'))
    fc_a_rows = fxtune_adapter_batch_rows_take_rows(x, batch_plan, (0, 1, 2, 0), 1, site = 'fc')
    fc_base = torch._C._nn.linear(x, fc_weight, fc_bias)                 # whole batch, once
    fc_a_base_rows = fxtune_adapter_batch_rows_take_rows(fc_base, batch_plan, (0, 1, 2, 0), 1, site = 'fc')
    fc_a_lora_down = torch._C._nn.linear(fc_a_rows, fc_a_lora_a, None)  # LoRA's own activation code
    fc_a_lora = fxtune_ops_add_feature_mix(fc_a_base_rows, fc_a_lora_down, fc_a_lora_b, 1.0)
    fc_b_rows = fxtune_adapter_batch_rows_take_rows(x, batch_plan, (0, 1, 2, 0), 2, site = 'fc')
    fc_b_lora_weight = fxtune_passes_lora_lora_weight(fc_weight, lora_a = ..., lora_b = ..., scale = 1.0)
    fc_b_out = torch._C._nn.linear(fc_b_rows, fc_b_lora_weight, fc_bias)  # the kind's weight(w, ...)
    fc = fxtune_adapter_batch_rows_merge_rows((None, fc_a_lora, fc_b_out, None), batch_plan, (0, 1, 2, 0), base = fc_base)

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
from typing import Iterable

from torch import fx, nn

from ..errors import AdapterError
from ..graph.code_on_first_use import generate_code_on_first_use
from ..graph.discovery import site_table
from ..graph.ownership import clone_graph_module
from ..graph.sites import Site, SiteTable, identifier
from ..graph.traced_calls import TAG, remember_call
from ..graph.weights import Weights
from ..ops import keep_positions
from .base_weights import replaced_by, replacement, use_base
from .batch_rows import merge_rows, plan_batch, take_rows
from .emitter import Emitter
from .forms import effective_forms, site_blocker
from .kinds import get_kind
from .slots import AdapterSlot, all_slots, require_adapters
from .strip import strip_sites, sweep_unused

INDEX = "adapter_index"
BASES = "fxtune_batched_bases"  # an adapter's replacement base weight (PiSSA), non-persistent


def batched(gm: fx.GraphModule, names: str | Iterable[str], *, form: str = "auto") -> fx.GraphModule:
    """A new GraphModule with a last input `adapter_index`: sample i uses `names[adapter_index[i]]`
    (-1: the base model). form="auto" keeps each adapter's form in gm; form="weight" evaluates
    every adapter's weight transform (the generic path). gm is left unchanged."""
    if not isinstance(gm, fx.GraphModule):
        raise AdapterError(f"batched takes a GraphModule (use fxtune.trace(model) first), got {type(gm).__name__}")
    names = (names,) if isinstance(names, str) else tuple(names)
    if form not in ("auto", "weight"):
        raise AdapterError(f"form must be 'auto' or 'weight', got {form!r}")
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise AdapterError(f"names must be distinct adapter names (str); got {list(names)}")
    require_adapters(gm, names)
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
    table = site_table(out)
    _check_sites(out, table, names)
    _use_traced_bases(out, table, names)
    strip_sites(out, table)
    plan = _add_index_input(out, names)
    for site in table:
        _emit_site(out, site, plan, names, form)
    sweep_unused(out.graph)
    out.graph.lint()
    return generate_code_on_first_use(out)


_CANNOT_SPLIT = {"value": "its weight is passed as a value into other code", "mha": "it is inside nn.MultiheadAttention"}


def _check_sites(gm: fx.GraphModule, table: SiteTable, names: tuple[str, ...]) -> None:
    """Refuses sites whose output cannot be computed per group of rows (weights used inside other calls)."""
    adapted = {s.weight_name for s in all_slots(gm) if s.adapter in names}
    for site in table:
        blocked = site_blocker(site)
        if site.weight_name in adapted and blocked:
            on_it = sorted({s.adapter for s in all_slots(gm) if s.weight_name == site.weight_name and s.adapter in names})
            raise AdapterError(
                f"batched cannot serve site '{site.name}': {_CANNOT_SPLIT.get(site.call, blocked)}, "
                f"so its rows cannot take different adapters. Leave {on_it} off '{site.weight_name}' (exclude it when "
                "adding them), or fuse/merge them for a single-adapter model"
            )


def _use_traced_bases(gm: fx.GraphModule, table: SiteTable, names: tuple[str, ...]) -> None:
    """Puts back the traced weights; a replacement base weight (PiSSA) of a named adapter is kept
    (canonical view) as a non-persistent buffer (under `fxtune_batched_bases`) for that adapter's rows."""
    bases = nn.Module()
    store = Weights(gm)
    for slot in all_slots(gm):
        slot.active = slot.adapter in names
    for weight_name in dict.fromkeys(s.weight_name for s in all_slots(gm)):
        ref = table.first(weight_name, error=AdapterError).weight_ref
        if replaced_by(store, ref) in names:
            bases.register_buffer(identifier(weight_name), replacement(store, ref).detach().contiguous(), persistent=False)
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
    index.meta[TAG] = {"site": None, "adapter": None, "kind": None, "role": INDEX}
    plan.meta[TAG] = {"site": None, "adapter": None, "kind": None, "role": "batch_plan"}
    return plan


def _emit_site(gm: fx.GraphModule, site: Site, plan: fx.Node, names: tuple[str, ...], form: str) -> None:
    """Replaces one site's call by the merge of its groups' outputs, each group with its own adapter."""
    slots = {s.adapter: s for s in all_slots(gm) if s.weight_name == site.weight_name and s.adapter in names}
    touching = [n for n in names if n in slots]
    if not touching:
        return
    route = (0,) + tuple(touching.index(n) + 1 if n in slots else 0 for n in names)
    options = [option for option, _ in itertools.groupby(route)]
    node = site.node
    remember_call(node)
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
        self.replaced = replaced_by(Weights(gm), site.weight_ref)
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
        em = self.root.for_slot(slot)
        x = self.rows(em, self.x, i, "rows")
        weight, bias, replaced = self.weight, self.bias, self.replaced == slot.adapter
        if replaced:
            weight = em.get_attr(f"{BASES}.{identifier(site.weight_name)}", role="base_weight")
        if form == "weight" or effective_forms(site, [slot])[0][0] == "weight":
            w, bias = em.adapted_weight(weight, bias, [slot], kept=site.kept)
            return em.site_call(x, w, bias, role="out")
        inputs = em.slot_inputs(slot)
        inner = kind.activation_input(em, x, inputs) if kind.activation_input is not None else x
        if inner is x and not replaced:
            y = self.base_rows(em, i)
        else:
            y = em.site_call(inner, weight, bias, role="out")
        out = kind.activation(em, x, y, inputs) if kind.activation is not None else y
        if site.kept is not None and out is not y:
            out = em.call(keep_positions, out, y, x, site.kept[1], role="keep_padding")
        return out
