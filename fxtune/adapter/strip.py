"""Taking fxtune's code out of a graph again: the half of every rebuild that restores the traced code.

Every node fxtune emitted is tagged with its site; every call it rewrote keeps its traced call
(graph/traced_calls.py). Stripping a site erases its tagged nodes and puts the call back, so
consumers read the site's own output again; fuse and unload are a strip with nothing re-emitted.
"""

from __future__ import annotations

from torch import fx

from ..graph.code_on_first_use import generate_code_on_first_use
from ..graph.discovery import site_table
from ..graph.ownership import clone_graph_module
from ..graph.sites import SiteTable
from ..graph.traced_calls import BASE_META, OUTPUT, TAG, load_arg
from .slots import all_slots


def strip_nodes(gm: fx.GraphModule, groups: dict[fx.Node, set[str]]) -> None:
    """Removes every node fxtune emitted for the sites named in `groups` ({call node: site names})
    and restores those calls; consumers of an adapted output read the site's own output again."""
    graph = gm.graph
    owner = {name: node for node, names in groups.items() for name in names}
    chain = [n for n in graph.nodes if n.meta.get(TAG, {}).get("site") in owner]
    members = set(chain)
    by_name = {n.name: n for n in graph.nodes}
    for n in chain:
        site_node = owner[n.meta[TAG]["site"]]
        original = by_name[n.meta[TAG].get("replaces", site_node.name)]
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


def strip_sites(gm: fx.GraphModule, table: SiteTable, weights: set[str] | None = None) -> None:
    """Removes the nodes fxtune emitted for every site of a weight in `weights` (all if None), in one sweep."""
    strip_nodes(gm, {node: {s.name for s in group} for node, group in table.by_node(weights).items()})


def sweep_unused(graph: fx.Graph) -> None:
    """Erases nodes fxtune emitted that nothing reads any more (e.g. a weight read only an unused branch needed)."""
    for node in reversed(graph.nodes):
        tag = node.meta.get(TAG)
        if tag is not None and tag.get("site") is not None and not node.users and node.op != "placeholder":
            graph.erase_node(node)


def without_adapter_code(gm: fx.GraphModule) -> fx.GraphModule:
    """gm itself if it has no adapters, else a copy with every adapter's code taken out (the base graph,
    same node names): what analyses of the base model (channel groups) read."""
    if not all_slots(gm):
        return gm
    base = clone_graph_module(gm)
    strip_sites(base, site_table(base))
    return generate_code_on_first_use(base)
