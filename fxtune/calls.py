"""The functional calls that consume a weight: F.linear, F.conv1d/2d/3d, F.embedding and their aten forms.

`bind` names a call's arguments the way the function declares them, so discovery reads a
site's input, weight, bias and geometry from the call itself (torch.export graphs hold
`aten.conv2d.default(x, w, b, [1, 1], [1, 1], [1, 1], 1)`, symbolic traces `torch.conv2d(...)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx

META = "fxtune"  # tag of every node fxtune inserts: site, adapter, kind, role
BASE_META = "fxtune_base"  # on a node fxtune rewrote: its original call, so it can be restored
OUTPUT = "fxtune_output"  # on a site's call node: the name of the node that now stands for its output


@dataclass(frozen=True)
class Signature:
    """How one function takes a weight: its kind, argument names in order, defaults, op family."""

    kind: str
    names: tuple[str, ...]
    defaults: dict[str, Any]
    aten: bool = False


_LINEAR = ("input", "weight", "bias")
_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_F_EMBEDDING = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
_F_EMBEDDING_DEFAULTS = {"padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False, "sparse": False}
_ATEN_EMBEDDING = ("weight", "input", "padding_idx", "scale_grad_by_freq", "sparse")
_ATEN_EMBEDDING_DEFAULTS = {"padding_idx": -1, "scale_grad_by_freq": False, "sparse": False}


def _functions() -> dict[Callable, Signature]:
    aten = torch.ops.aten
    table: dict[Callable, Signature] = {
        F.linear: Signature("linear", _LINEAR, {"bias": None}),
        aten.linear.default: Signature("linear", _LINEAR, {"bias": None}, aten=True),
        F.embedding: Signature("embedding", _F_EMBEDDING, _F_EMBEDDING_DEFAULTS),
        aten.embedding.default: Signature("embedding", _ATEN_EMBEDDING, _ATEN_EMBEDDING_DEFAULTS, aten=True),
    }
    for dim, fn in ((1, torch.conv1d), (2, torch.conv2d), (3, torch.conv3d)):
        table[fn] = Signature(f"conv{dim}d", _CONV, _CONV_DEFAULTS)
        packet = getattr(aten, f"conv{dim}d")
        for overload in ("default", "padding"):
            table[getattr(packet, overload)] = Signature(f"conv{dim}d", _CONV, _CONV_DEFAULTS, aten=True)
    return table


FUNCTIONS = _functions()


def bind(signature: Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name, defaults filled in."""
    values = dict(signature.defaults)
    values.update(zip(signature.names, args))
    values.update(kwargs)
    return values


class _Ref(str):
    """A node reference inside saved call arguments (a node name, not a plain string)."""


def save_arg(arg: Any) -> Any:
    """Node references as names of traced nodes: an adapted site's output stands for the site's call."""
    return fx.node.map_aggregate(
        arg, lambda a: _Ref(a.meta.get(META, {}).get("output_of", a.name)) if isinstance(a, fx.Node) else a
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
