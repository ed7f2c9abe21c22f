"""What fxtune changed in a graph and how to undo it: node tags, and each rewritten node's traced call.

Every node fxtune inserts carries `node.meta["fxtune"]` (site, adapter, kind, role); a node it
rewrote keeps its call as traced under `node.meta["fxtune_base"]`, so stripping adapters (fuse,
unload) restores exactly the traced code. Discovery reads through both, so a rewritten graph has
the same sites as the traced one.
"""

from __future__ import annotations

from typing import Any

from torch import fx

TAG = "fxtune"  # tag of every node fxtune inserts: site, adapter, kind, role
BASE_META = "fxtune_base"  # on a node fxtune rewrote: its original call, so it can be restored
OUTPUT = "fxtune_output"  # on a site's call node: the name of the node that now stands for its output


class _Ref(str):
    """A node reference inside saved call arguments (a node name, not a plain string)."""


def save_arg(arg: Any) -> Any:
    """Node references as names of traced nodes: an adapted site's output stands for the site's call."""
    return fx.node.map_aggregate(
        arg, lambda a: _Ref(a.meta.get(TAG, {}).get("output_of", a.name)) if isinstance(a, fx.Node) else a
    )


def load_arg(arg: Any, by_name: dict[str, fx.Node], *, current: bool = False) -> Any:
    """Saved arguments as nodes; with `current`, a site call whose output is adapted reads as that output."""

    def node(name: str) -> fx.Node:
        found = by_name[name]
        return by_name[found.meta[OUTPUT]] if current and OUTPUT in found.meta else found

    return fx.node.map_aggregate(arg, lambda a: node(a) if isinstance(a, _Ref) else a)


def remember_call(node: fx.Node, **extra: Any) -> None:
    """Saves the node's original call (once) so that fxtune can restore it."""
    if BASE_META not in node.meta:
        node.meta[BASE_META] = {
            "op": node.op, "target": node.target, "args": save_arg(node.args), "kwargs": save_arg(node.kwargs), **extra
        }


def original_call(node: fx.Node, by_name: dict[str, fx.Node]) -> tuple[str, Any, tuple, dict]:
    """(op, target, args, kwargs) of the node as traced, before fxtune rewrote it."""
    base = node.meta.get(BASE_META)
    if base is None:
        return node.op, node.target, node.args, node.kwargs
    if base["op"] == "get_attr":
        return "get_attr", node.target, (), {}
    return base["op"], base["target"], load_arg(base["args"], by_name), load_arg(base["kwargs"], by_name)
