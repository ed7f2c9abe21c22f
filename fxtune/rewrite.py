"""Realising a site's adapters as graph code, and taking that code out again.

Per site: weight-form adapters transform the weight before the call (which becomes the
functional op), activation-form adapters wrap its output. Composition order is slot order,
so an adapter may act on activations only if no weight-form adapter comes after it.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import fx

from .emit import META, Emitter, site_call_args
from .errors import AdapterError
from .kinds import get_kind
from .sites import BASE_META, Site, all_sites
from .slots import AdapterSlot, emitted_slots, slot_path


class _Ref(str):
    """A node reference inside saved call arguments (a node name, not a plain string)."""


def _save_arg(arg: Any) -> Any:
    return fx.node.map_aggregate(arg, lambda a: _Ref(a.name) if isinstance(a, fx.Node) else a)


def _load_arg(arg: Any, by_name: dict[str, fx.Node]) -> Any:
    return fx.node.map_aggregate(arg, lambda a: by_name[a] if isinstance(a, _Ref) else a)


def effective_forms(site: Site, slots: list[AdapterSlot]) -> list[tuple[str, str]]:
    """(form, reason) of each slot as emitted: requested, unless something forces the weight form."""
    forms = []
    for i, slot in enumerate(slots):
        kind = get_kind(slot.kind)
        reason = slot.form_reason
        if slot.form == "activation":
            blocker = kind.activation_blocker(site, slot.config) if kind.activation_blocker else None
            if kind.activation is None and kind.activation_input is None:
                reason = f"{kind.name} has no activation form"
            elif blocker:
                reason = blocker
            elif kind.activation_reads_weight and i > 0:
                reason = f"{kind.name}'s activation form reads the base weight, and '{slots[0].adapter}' acts before it"
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


def strip_site(gm: fx.GraphModule, site: Site) -> None:
    """Removes every node fxtune emitted for `site` and restores its original call."""
    graph = gm.graph
    chain = [n for n in graph.nodes if n.meta.get(META, {}).get("site") == site.name]
    members = set(chain) | {site.node}
    for n in chain:
        n.replace_all_uses_with(site.node, delete_user_cb=lambda u: u not in members)
    base = site.node.meta.pop(BASE_META, None)
    if base is not None:
        by_name = {n.name: n for n in graph.nodes}
        site.node.op = base["op"]
        site.node.target = base["target"]
        site.node.args = _load_arg(base["args"], by_name)
        site.node.kwargs = _load_arg(base["kwargs"], by_name)
    used = getattr(graph._graph_namespace, "_used_names", None)
    for n in reversed(chain):
        graph.erase_node(n)
        if used is not None:
            used.discard(n.name)


def _inputs(em: Emitter, slot: AdapterSlot) -> dict[str, Any]:
    """get_attr nodes for the slot's tensors, plus its settings as constants."""
    path = slot_path(slot)
    out = {}
    for key, value in slot.inputs().items():
        out[key] = em.get_attr(f"{path}.{key}", role=key) if key in slot.tensor_names() else value
    return out


def emit_site(gm: fx.GraphModule, site: Site, slots: list[AdapterSlot]) -> None:
    """Emits the active slots of one (stripped) site in composition order."""
    if not slots:
        return
    graph = gm.graph
    node = site.node
    forms = effective_forms(site, slots)
    root = Emitter(gm, site)
    x = node.args[0] if node.args else node.kwargs["input"]
    weight_slots = [s for s, (form, _) in zip(slots, forms) if form == "weight"]
    act_slots = [s for s, (form, _) in zip(slots, forms) if form == "activation"]
    if weight_slots:
        _remember_call(node)
        with graph.inserting_before(node):
            w = root.get_attr(f"{site.target}.weight", role="weight")
            b = root.get_attr(f"{site.target}.bias", role="bias") if site.has_bias else None
            for slot in weight_slots:
                kind = get_kind(slot.kind)
                em = root.for_slot(slot.adapter, kind.name, slot_path(slot))
                inputs = _inputs(em, slot)
                w = em.call(kind.weight, w, role=f"{kind.name}_weight", **kind.accepted(kind.weight, inputs))
                if kind.bias is not None and b is not None:
                    b = em.call(kind.bias, b, role=f"{kind.name}_bias", **kind.accepted(kind.bias, inputs))
            fn, args = site_call_args(site, x, w, b, pad=lambda *a: root.call(F.pad, *a, role="pad"))
        node.op, node.target, node.args, node.kwargs = "call_function", fn, args, {}
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
                _remember_call(node)
                for n in inner:
                    n.replace_input_with(x, new_x)
        if kind.activation is not None:
            with graph.inserting_before(y.next):
                y = kind.activation(em, x, y, inputs if kind.activation_input else _inputs(em, slot))
    if y is not node:
        created = set(root.created)
        node.replace_all_uses_with(y, delete_user_cb=lambda u: u not in created)


def _remember_call(node: fx.Node) -> None:
    """Saves the site's original call (once) so that strip_site can restore it."""
    if BASE_META not in node.meta:
        node.meta[BASE_META] = {
            "op": node.op, "target": node.target, "args": _save_arg(node.args), "kwargs": _save_arg(node.kwargs)
        }


def _first_of_site(node: fx.Node, created: list[fx.Node]) -> fx.Node:
    """The earliest node of the site's block before its call (inner input-side and weight nodes)."""
    members = set(created)
    while node.prev in members:
        node = node.prev
    return node


def rebuild(gm: fx.GraphModule, targets: set[str] | None = None) -> None:
    """Re-derives the code of every site whose weight is in `targets` (all if None); recompiles once."""
    for site in all_sites(gm):
        if targets is None or site.target in targets:
            strip_site(gm, site)
    for site in all_sites(gm):
        if targets is None or site.target in targets:
            emit_site(gm, site, emitted_slots(gm, site.target))
    graph = gm.graph
    for n in reversed(graph.nodes):
        if n.op == "get_attr" and META in n.meta and not n.users:
            graph.erase_node(n)
    graph.lint()
    gm.recompile()
