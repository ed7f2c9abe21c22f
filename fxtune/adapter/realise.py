"""Realising the adapters of a graph's sites as code: the half of every rebuild that emits.

Per call node: weight-form adapters transform the weight (in its canonical view) before the call,
activation-form adapters wrap its output (forms.py decides which form each takes). How the
adapted weight reaches the call depends on the site:
    module    the call becomes the functional op on the adapted weight
    function  the call's weight (and bias) arguments become the adapted ones
    value     the get_attr's consumers read the adapted weight instead (weight form only)
    mha       the call becomes `call_with(attention, {"in_proj_weight": ..., ...}, *args)` (weight form only)
    opaque    likewise `call_with(module, {"weight": ..., "linear1.weight": ...}, *args)`: the module's own
              forward runs on the adapted parameters (weight form only)
"""

from __future__ import annotations

from typing import Any

from torch import fx

from ..graph.code_on_first_use import generate_code_on_first_use
from ..graph.signatures import replace_argument
from ..graph.sites import Site, SiteTable, identifier
from ..graph.traced_calls import OUTPUT, TAG, remember_call
from ..ops import call_with, keep_positions, with_rows
from .composition import changes_bias
from .emitter import Emitter, site_call_args
from .forms import effective_forms
from .kinds import get_kind
from .slots import AdapterSlot, slots_by_weight
from .strip import strip_sites, sweep_unused


def weight_chain(root: Emitter, site: Site, slots: list[AdapterSlot], *, raw: fx.Node | None = None,
                 bias: bool = True) -> tuple[fx.Node, Any]:
    """Nodes computing the adapted weight in this site's own view, and its bias (adapted on canonical uses)."""
    w0 = root.base_weight(role="weight") if raw is None else root.canonical(raw, site.weight_ref, "weight")
    b = root.base_bias(role="bias") if bias else None
    w, b = root.adapted_weight(w0, b, slots, kept=site.kept, adapt_bias=site.canonical)
    if site.use_ref.transposed != site.weight_ref.transposed:
        w = root.method("t", w, role="weight_own")
    return w, b


def _emit_call(gm: fx.GraphModule, site: Site, slots: list[AdapterSlot]) -> None:
    """A module or function site: weight-form adapters before the call, activation forms after it."""
    graph, node = gm.graph, site.node
    forms = effective_forms(site, slots)
    root = Emitter(gm, site)
    x = site.input
    weight_slots = [s for s, (form, _) in zip(slots, forms) if form == "weight"]
    act_slots = [s for s, (form, _) in zip(slots, forms) if form == "activation"]
    if weight_slots:
        remember_call(node)
        with graph.inserting_before(node):
            w, b = weight_chain(root, site, weight_slots)
            if site.call == "module":
                fn, args = site_call_args(site, x, w, b, emit=lambda f, *a, part: root.call(f, *a, role=part))
                node.op, node.target, node.args, node.kwargs = "call_function", fn, args, {}
            else:
                replace_argument(node, "weight", root.method("t", w, role="weight_raw") if site.use_ref.transposed else w)
                if b is not site.bias_arg:
                    replace_argument(node, "bias", b)
    y = node
    for slot in act_slots:
        kind = get_kind(slot.kind)
        em = root.for_slot(slot)
        inputs = None
        if kind.activation_input is not None:
            inner = [n for n in root.created if x in n.all_input_nodes] + [node]
            with graph.inserting_before(_first_of_site(node, root.created)):
                inputs = em.slot_inputs(slot)
                new_x = kind.activation_input(em, x, inputs)
            if new_x is not x:
                remember_call(node)
                for n in inner:
                    n.replace_input_with(x, new_x)
        if kind.activation is not None:
            with graph.inserting_before(y.next):
                y = kind.activation(em, x, y, inputs if inputs is not None else em.slot_inputs(slot))
    if y is not node and site.kept is not None:
        with graph.inserting_before(y.next):
            y = root.call(keep_positions, y, node, x, site.kept[1], role="keep_padding")
    if y is not node:
        created = set(root.created)
        node.replace_all_uses_with(y, delete_user_cb=lambda u: u not in created)
        y.meta[TAG]["output_of"] = node.name
        node.meta[OUTPUT] = y.name


def _emit_value(gm: fx.GraphModule, site: Site, slots: list[AdapterSlot]) -> None:
    """A weight read by get_attr and passed on: its consumers read the adapted weight (and bias) instead."""
    effective_forms(site, slots)
    graph, node = gm.graph, site.node
    order = {n: i for i, n in enumerate(graph.nodes)}
    consumers = [u for u in node.users if TAG not in u.meta]
    root = Emitter(gm, site)
    remember_call(node)
    with graph.inserting_before(min(consumers, key=order.__getitem__)):
        w, _ = weight_chain(root, site, slots, raw=node, bias=False)
        if site.use_ref.transposed:
            w = root.method("t", w, role="weight_raw")
    for user in consumers:
        user.replace_input_with(node, w)
    bias_path = site.use_ref.bias
    if not changes_bias(slots) or bias_path is None or not site.canonical:
        return
    # every read of the layer's bias, beside the weight's consumers or not: fusion changes the parameter itself
    readers = [n for n in graph.nodes if n.op == "get_attr" and n.target == bias_path and TAG not in n.meta and n.users]
    for bias in readers:
        users = list(bias.users)
        with graph.inserting_before(min(users, key=order.__getitem__)):
            _, b = root.adapted_weight(None, bias, slots)
        b.meta[TAG]["replaces"] = bias.name
        for user in users:
            user.replace_input_with(bias, b)


def _emit_opaque(gm: fx.GraphModule, node: fx.Node, work: list[tuple[Site, list[AdapterSlot]]]) -> None:
    """A module called as a whole (nn.MultiheadAttention, a layer with its own forward, a leaf holding
    layers): the adapted weights (q/k/v as rows) and biases replace its parameters for this call."""
    graph, path = gm.graph, node.target
    top = Emitter(gm, work[0][0], prefix=identifier(path))
    overrides: dict[str, fx.Node] = {}

    def put(qualname: str, rows: tuple[int, int] | None, value: fx.Node, letter: str) -> None:
        key = qualname[len(path) + 1:]
        if rows is None:
            overrides[key] = value
            return
        current = overrides.get(key)
        if current is None:
            current = top.get_attr(qualname, role=identifier(key))
        overrides[key] = top.call(with_rows, current, rows[0], rows[1], value, role=f"{identifier(key)}_{letter}")

    remember_call(node)
    with graph.inserting_before(node):
        for site, slots in work:
            effective_forms(site, slots)
            letter = site.name.rpartition(".")[2].partition("@")[0]
            adapts_bias = changes_bias(slots) and site.has_bias
            root = Emitter(gm, site)
            w, b = weight_chain(root, site, slots, bias=adapts_bias)
            if site.use_ref.transposed:
                w = root.method("t", w, role="weight_raw")
            put(site.use_ref.path, site.use_ref.rows, w, letter)
            if adapts_bias:
                put(site.use_ref.bias, site.use_ref.bias_rows, b, letter)
        module = top.get_attr(path, role="module")
    node.op, node.target, node.args = "call_function", call_with, (module, overrides, *node.args)


def _first_of_site(node: fx.Node, created: list[fx.Node]) -> fx.Node:
    """The earliest node of the site's block before its call (inner input-side and weight nodes)."""
    members = set(created)
    while node.prev in members:
        node = node.prev
    return node


def emit_node(gm: fx.GraphModule, work: list[tuple[Site, list[AdapterSlot]]]) -> None:
    """Emits the given slots of every (stripped) site of one node, in composition order."""
    work = [(site, slots) for site, slots in work if slots]
    if not work:
        return
    site = work[0][0]
    if site.call in ("mha", "opaque"):
        _emit_opaque(gm, site.node, work)
    elif site.call == "value":
        _emit_value(gm, *work[0])
    else:
        _emit_call(gm, *work[0])


def rebuild(gm: fx.GraphModule, table: SiteTable, weights: set[str] | None = None) -> None:
    """Re-derives the code of every node that uses a weight in `weights` (all if None) from its active,
    unmerged slots; `table` holds gm's sites. Lints; the code is generated on first use."""
    strip_sites(gm, table, weights)
    by_weight = slots_by_weight(gm)
    for group in table.by_node(weights).values():
        emit_node(gm, [(site, [s for s in by_weight.get(site.weight_name, []) if not s.merged]) for site in group])
    sweep_unused(gm.graph)
    gm.graph.lint()
    generate_code_on_first_use(gm)
