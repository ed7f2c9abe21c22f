"""Realising the adapters of a graph's sites as code, and taking that code out again.

Per call node: weight-form adapters transform the weight (in its canonical view) before the call,
activation-form adapters wrap its output. Composition order is slot order, so an adapter may act
on activations only if no weight-form adapter comes after it. How the adapted weight reaches the
call depends on the site:
    module    the call becomes the functional op on the adapted weight
    function  the call's weight (and bias) arguments become the adapted ones
    value     the get_attr's consumers read the adapted weight instead (weight form only)
    mha       the call becomes `call_with(attention, {"in_proj_weight": ..., ...}, *args)` (weight form only)
    opaque    likewise `call_with(module, {"weight": ..., "linear1.weight": ...}, *args)`: the module's own
              forward runs on the adapted parameters (weight form only)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from .calls import BASE_META, FUNCTIONS, OUTPUT, load_arg, remember_call
from .emit import META, Emitter, site_call_args
from .errors import AdapterError
from .kinds import AdapterKind, get_kind
from .sites import Site, all_sites
from .slots import AdapterSlot, emitted_slots, slot_path
from .weights import call_with, graph_canonical, keep_index, keep_positions, with_rows


def _site_blocker(site: Site) -> str | None:
    """Why no adapter can take the activation form on this site, if so."""
    if site.call == "value":
        return "its weight flows on as a value"
    if site.call == "mha":
        return "inside nn.MultiheadAttention"
    if site.call == "opaque":
        return opaque_reason(site)
    if not site.canonical:
        return f"uses the tied weight of '{site.target}' in another layout"
    return None


def opaque_reason(site: Site) -> str:
    """Why an opaque site's adapters act through the parameters its module is called with."""
    if site.caller is site.module:
        return f"{type(site.module).__name__} has its own forward"
    return f"inside {type(site.caller).__name__} '{site.caller_path}', called as a whole"


def _acts_on_input(site: Site, slot: AdapterSlot, kind: AdapterKind) -> bool:
    """Whether the kind's input-side activation form would change this site's input (tried on a scratch graph)."""
    if kind.activation_input is None:
        return False
    graph = fx.Graph()
    x = graph.placeholder("x")
    em = Emitter(None, site, adapter=slot.adapter, kind=kind.name, graph=graph)
    inputs = {k: graph.placeholder(k) if isinstance(v, torch.Tensor) else v for k, v in slot.inputs().items()}
    return kind.activation_input(em, x, inputs) is not x


def effective_forms(site: Site, slots: list[AdapterSlot]) -> list[tuple[str, str]]:
    """(form, reason) of each slot as emitted: requested, unless something forces the weight form."""
    forms = []
    blocked = _site_blocker(site)
    for i, slot in enumerate(slots):
        kind = get_kind(slot.kind)
        reason = slot.form_reason
        if slot.form == "activation":
            blocker = kind.activation_blocker(site, slot.config) if kind.activation_blocker else None
            if blocked:
                reason = blocked
            elif kind.activation is None and kind.activation_input is None:
                reason = f"{kind.name} has no activation form"
            elif blocker:
                reason = blocker
            elif kind.activation_reads_weight and i > 0:
                reason = f"{kind.name}'s activation form reads the base weight, and '{slots[0].adapter}' acts before it"
            elif site.input_is_indices and _acts_on_input(site, slot, kind):
                reason = f"{kind.name} acts on the input, which is indices here"
        forms.append(("weight" if slot.form == "weight" or reason else "activation", reason))
    last_weight = max((i for i, (form, _) in enumerate(forms) if form == "weight"), default=-1)
    for i in range(last_weight):
        if forms[i][0] == "activation":
            forms[i] = ("weight", "a weight-form adapter follows it on this site")
    for slot, (form, reason) in zip(slots, forms):
        blocker = get_kind(slot.kind).weight_blocker
        why = blocker(slot.config) if form == "weight" and blocker else None
        if why:
            raise AdapterError(
                f"adapter '{slot.adapter}' ({slot.kind}) on '{site.name}' needs the activation form ({why}), "
                f"but it would be computed in the weight form: {reason or 'requested'}. Use another site, "
                "or an activation-form adapter after it"
            )
    return forms


def strip_nodes(gm: fx.GraphModule, groups: dict[fx.Node, set[str]]) -> None:
    """Removes every node fxtune emitted for the sites named in `groups` ({call node: site names})
    and restores those calls; consumers of an adapted output read the site's own output again."""
    graph = gm.graph
    owner = {name: node for node, names in groups.items() for name in names}
    chain = [n for n in graph.nodes if n.meta.get(META, {}).get("site") in owner]
    members = set(chain)
    by_name = {n.name: n for n in graph.nodes}
    for n in chain:
        site_node = owner[n.meta[META]["site"]]
        original = by_name[n.meta[META].get("replaces", site_node.name)]
        n.replace_all_uses_with(original, delete_user_cb=lambda u: u not in members and u is not site_node)
    for node in groups:
        node.meta.pop(OUTPUT, None)
    for node in groups:
        base = node.meta.pop(BASE_META, None)
        if base is not None and base["op"] != "get_attr":
            node.op, node.target = base["op"], base["target"]
            node.args = load_arg(base["args"], by_name, current=True)
            node.kwargs = load_arg(base["kwargs"], by_name, current=True)
    used = getattr(graph._graph_namespace, "_used_names", None)
    for n in reversed(chain):
        graph.erase_node(n)
        if used is not None:
            used.discard(n.name)


def strip_sites(gm: fx.GraphModule, targets: set[str] | None = None) -> None:
    """Removes the nodes fxtune emitted for every site of a weight in `targets` (all if None), in one sweep."""
    strip_nodes(gm, {node: {s.name for s in group} for node, group in _by_node(all_sites(gm), targets).items()})


def _inputs(em: Emitter, slot: AdapterSlot) -> dict[str, Any]:
    """get_attr nodes for the slot's tensors, plus its settings as constants."""
    path = slot_path(slot)
    out = {}
    for key, value in slot.inputs().items():
        out[key] = em.get_attr(f"{path}.{key}", role=key) if key in slot.tensor_names() else value
    return out


def weight_chain(
    root: Emitter, site: Site, slots: list[AdapterSlot], *, raw: fx.Node | None = None, bias: bool = True
) -> tuple[fx.Node, Any]:
    """Nodes computing the adapted weight in this site's own view, and its bias (adapted on canonical uses).

    The kinds see the canonical view; an embedding's padding row is put back unadapted afterwards.
    """
    w0 = root.base_weight(role="weight") if raw is None else graph_canonical(root, raw, site.ref, "weight")
    b = root.base_bias(role="bias") if bias else None
    w = w0
    for slot in slots:
        kind = get_kind(slot.kind)
        em = root.for_slot(slot.adapter, kind.name, slot_path(slot))
        inputs = _inputs(em, slot)
        w = em.call(kind.weight, w, role=f"{kind.name}_weight", **kind.accepted(kind.weight, inputs))
        if b is not None and site.canonical and kind.acts_on_bias(slot.config):
            b = em.call(kind.bias, b, role=f"{kind.name}_bias", **kind.accepted(kind.bias, inputs))
    if site.kept is not None:
        dim, index = site.kept
        w = root.call(keep_index, w, w0, index, dim, role="keep_padding")
    if site.own.transposed != site.ref.transposed:
        w = root.method("t", w, role="weight_own")
    return w, b


def _replace_argument(node: fx.Node, name: str, value: Any) -> None:
    """Replaces the argument `name` (positional or keyword) of a functional weight call."""
    names = FUNCTIONS[node.target].names
    index = names.index(name)
    if index < len(node.args):
        node.args = (*node.args[:index], value, *node.args[index + 1:])
    else:
        node.kwargs = {**node.kwargs, name: value}


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
                _replace_argument(node, "weight", root.method("t", w, role="weight_raw") if site.own.transposed else w)
                if b is not site.bias_arg:
                    _replace_argument(node, "bias", b)
    y = node
    for slot in act_slots:
        kind = get_kind(slot.kind)
        em = root.for_slot(slot.adapter, kind.name, slot_path(slot))
        if kind.activation_input is not None:
            inner = [n for n in root.created if x in n.all_input_nodes] + [node]
            with graph.inserting_before(_first_of_site(node, root.created)):
                inputs = _inputs(em, slot)
                new_x = kind.activation_input(em, x, inputs)
            if new_x is not x:
                remember_call(node)
                for n in inner:
                    n.replace_input_with(x, new_x)
        if kind.activation is not None:
            with graph.inserting_before(y.next):
                y = kind.activation(em, x, y, inputs if kind.activation_input else _inputs(em, slot))
    if y is not node and site.kept is not None:
        with graph.inserting_before(y.next):
            y = root.call(keep_positions, y, node, x, site.kept[1], role="keep_padding")
    if y is not node:
        created = set(root.created)
        node.replace_all_uses_with(y, delete_user_cb=lambda u: u not in created)
        y.meta[META]["output_of"] = node.name
        node.meta[OUTPUT] = y.name


def _emit_value(gm: fx.GraphModule, site: Site, slots: list[AdapterSlot]) -> None:
    """A weight read by get_attr and passed on: its consumers read the adapted weight (and bias) instead."""
    effective_forms(site, slots)
    graph, node = gm.graph, site.node
    order = {n: i for i, n in enumerate(graph.nodes)}
    consumers = [u for u in node.users if META not in u.meta]
    root = Emitter(gm, site)
    remember_call(node)
    with graph.inserting_before(min(consumers, key=order.__getitem__)):
        w, _ = weight_chain(root, site, slots, raw=node, bias=False)
        if site.own.transposed:
            w = root.method("t", w, role="weight_raw")
    for user in consumers:
        user.replace_input_with(node, w)
    bias_kinds = [s for s in slots if get_kind(s.kind).acts_on_bias(s.config)]
    if not bias_kinds or site.own.bias is None or not site.canonical:
        return
    readers = {b for u in consumers for b in u.all_input_nodes if b.op == "get_attr" and b.target == site.own.bias and META not in b.meta}
    for bias in sorted(readers, key=order.__getitem__):
        users = [u for u in bias.users if u in consumers]
        b = bias
        with graph.inserting_before(min(users, key=order.__getitem__)):
            for slot in bias_kinds:
                kind = get_kind(slot.kind)
                em = root.for_slot(slot.adapter, kind.name, slot_path(slot))
                b = em.call(kind.bias, b, role=f"{kind.name}_bias", **kind.accepted(kind.bias, _inputs(em, slot)))
        b.meta[META]["replaces"] = bias.name
        for user in users:
            user.replace_input_with(bias, b)


def _emit_opaque(gm: fx.GraphModule, node: fx.Node, work: list[tuple[Site, list[AdapterSlot]]]) -> None:
    """A module called as a whole (nn.MultiheadAttention, a layer with its own forward, a leaf holding
    layers): the adapted weights (q/k/v as rows) and biases replace its parameters for this call."""
    graph, path = gm.graph, node.target
    top = Emitter(gm, work[0][0], prefix=path.replace(".", "_"))
    overrides: dict[str, fx.Node] = {}

    def put(qualname: str, rows: tuple[int, int] | None, value: fx.Node, letter: str) -> None:
        key = qualname[len(path) + 1:]
        if rows is None:
            overrides[key] = value
            return
        current = overrides.get(key)
        if current is None:
            current = top.get_attr(qualname, role=key.replace(".", "_"))
        overrides[key] = top.call(with_rows, current, rows[0], rows[1], value, role=f"{key.replace('.', '_')}_{letter}")

    remember_call(node)
    with graph.inserting_before(node):
        for site, slots in work:
            effective_forms(site, slots)
            letter = site.name.rpartition(".")[2].partition("@")[0]
            adapts_bias = any(get_kind(s.kind).acts_on_bias(s.config) for s in slots) and site.has_bias
            root = Emitter(gm, site)
            w, b = weight_chain(root, site, slots, bias=adapts_bias)
            if site.own.transposed:
                w = root.method("t", w, role="weight_raw")
            put(site.own.path, site.own.rows, w, letter)
            if adapts_bias:
                put(site.own.bias, site.own.bias_rows, b, letter)
        module = top.get_attr(path, role="module")
    node.op, node.target, node.args = "call_function", call_with, (module, overrides, *node.args)


def _first_of_site(node: fx.Node, created: list[fx.Node]) -> fx.Node:
    """The earliest node of the site's block before its call (inner input-side and weight nodes)."""
    members = set(created)
    while node.prev in members:
        node = node.prev
    return node


def emit_node(gm: fx.GraphModule, sites: list[Site]) -> None:
    """Emits the active adapters of every (stripped) site of one node, in composition order."""
    work = [(site, emitted_slots(gm, site.target)) for site in sites]
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


def _by_node(sites: list[Site], targets: set[str] | None) -> dict[fx.Node, list[Site]]:
    """Sites grouped by their node, for every node that has a site on one of `targets` (all if None)."""
    groups: dict[fx.Node, list[Site]] = {}
    for site in sites:
        groups.setdefault(site.node, []).append(site)
    return {n: g for n, g in groups.items() if targets is None or any(s.target in targets for s in g)}


def rebuild(gm: fx.GraphModule, targets: set[str] | None = None) -> None:
    """Re-derives the code of every node that uses a weight in `targets` (all if None); recompiles once."""
    strip_sites(gm, targets)
    for group in _by_node(all_sites(gm), targets).values():
        emit_node(gm, group)
    graph = gm.graph
    for n in reversed(graph.nodes):
        tag = n.meta.get(META)
        if tag is not None and tag.get("site") is not None and not n.users and n.op in ("get_attr", "call_function", "call_method"):
            graph.erase_node(n)
    graph.lint()
    gm.recompile()
