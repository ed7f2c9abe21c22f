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


@dataclass(frozen=True)
class Signature:
    """How one function takes a weight: its layer kind, argument names in order, defaults, op family."""

    layer: str
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


def call_arguments(node: fx.Node) -> dict[str, Any]:
    """A weight call's arguments by name (`input` only, for a module call); {} for any other node."""
    if node.op == "call_module":
        return {"input": node.args[0] if node.args else node.kwargs.get("input")}
    signature = FUNCTIONS.get(node.target) if node.op == "call_function" else None
    return {} if signature is None else bind(signature, node.args, node.kwargs)


def replace_argument(node: fx.Node, name: str, value: Any) -> None:
    """Replaces the argument `name` (positional or keyword) of a functional weight call."""
    index = FUNCTIONS[node.target].names.index(name)
    if index < len(node.args):
        node.args = (*node.args[:index], value, *node.args[index + 1:])
    else:
        node.kwargs = {**node.kwargs, name: value}
