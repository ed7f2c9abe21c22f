"""Channel rules for function and method calls (torch functions, tensor methods, operator, aten ops).

Names are matched, not objects, so `torch.relu`, `F.relu`, `x.relu()` and `aten.relu.default`
share one rule; argument positions are those the forms share (aten's batch_norm is the exception).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, fx

from . import flow as cf
from .flow import Flow
from .items import HARD, Reason
from .names import (BATCH_NORMS, ELEMENTWISE, EXPANDS, NO_COPY, NOT_READING, PASSING, PERMUTES, REDUCES, RESHAPES,
                            SIZED, SOFTMAX, SPATIAL, UNARY, arg, op_name)


class OpRules:
    """Mixed into Analysis: the rule for each call_function / call_method node."""

    def attr_or_value(self, a: Any) -> Any:
        if isinstance(a, fx.Node) and a.op == "get_attr":
            t = self.tensor(a.target)
            if isinstance(t, Tensor):
                return t
        return self.value(a)

    def function_call(self, node: fx.Node) -> Any:
        name = op_name(node)
        shape = self.out_shape(node)
        label = f"'{node.name}' ({name})"
        x = self.value(node.args[0]) if node.args else None
        if name == "getitem":
            return self.getitem(node, x, label)
        if name in ("size", "sym_size") or (name == "getattr" and node.args[1] == "shape"):
            return self.size_of(node, x)
        dyn = self.sizes_read(node)
        if dyn is not None and _has_no_tensor(self.shapes.get(node)):
            if name == "_assert" and dyn.ids:
                self.items.block(torch.cat(dyn.ids), Reason(HARD, f"{label} checks their number"))
            return dyn
        if dyn is not None and dyn.ids and name not in SIZED and name not in RESHAPES:
            self.items.block(torch.cat(dyn.ids), Reason(HARD, f"{label} uses their number"))
        if name in NOT_READING or self.shapes.get(node) is None:
            return self.shaped(self.shapes.get(node)) if name in NOT_READING else self.unknown(node, label)
        tensor_args = [a for a in (*node.args, *node.kwargs.values()) if isinstance(self.value(a), Flow)]
        if name in ELEMENTWISE or (name in ("max", "min") and len(tensor_args) > 1) or name in ("where", "masked_fill"):
            return self.elementwise_call(node, name, shape, label)
        if name in UNARY and isinstance(x, Flow) and (len(tensor_args) == 1 or name in ("type_as", "to")):
            if name in NO_COPY:
                return cf.unary(x, NO_COPY[name])
            return cf.unary(x, self.keeps_zero(node, name))
        if name in RESHAPES and isinstance(x, Flow):
            out = cf.reshape(self.items, x, shape, label)
            self.record_sizes(node, name, out, arg(node, 1, "dim", 0) % x.rank if name == "unflatten" else None)
            return out
        if name in EXPANDS and isinstance(x, Flow):
            out = cf.expand(self.items, x, shape, label)
            self.record_sizes(node, name, out, None)
            return out
        if name in PERMUTES and isinstance(x, Flow):
            return cf.permute(x, self.permutation(node, name, x.rank))
        if name == "repeat" and isinstance(x, Flow):
            return self.repeat(node, x, shape, label)
        if name in ("cat", "concat", "concatenate", "stack"):
            return self.concat(node, name, shape, label)
        if name in ("split", "split_with_sizes", "chunk", "unsafe_split", "tensor_split") and isinstance(x, Flow):
            return self.split_call(node, name, x, label)
        if name in ("slice", "narrow", "select") and isinstance(x, Flow):
            return self.slice_call(node, name, x, label)
        if name in REDUCES and isinstance(x, Flow) and len(tensor_args) == 1:
            return self.reduce_call(node, name, x, label)
        if name in SOFTMAX and isinstance(x, Flow):
            return cf.reduce(self.items, x, [arg(node, 1, "dim")], True, "softmax", label)
        if name in ("matmul", "bmm", "mm") and len(tensor_args) == 2:
            return self.matmul(x, self.value(node.args[1]), shape, label)
        if name == "einsum":
            return self.einsum(node, shape, label)
        if name == "linear" and isinstance(x, Flow):
            return self.linear(node, x, shape, label)
        if name == "scaled_dot_product_attention":
            return self.attention(node, shape, label)
        if name in ("layer_norm", "native_layer_norm") and isinstance(x, Flow):
            count = len(arg(node, 1, "normalized_shape"))
            w, b = (self.attr_or_value(arg(node, i, n)) for i, n in ((2, "weight"), (3, "bias")))
            out = self.layer_norm(node, x, count, w, b, "", label, literal=True)
            return out if name == "layer_norm" else (out, *self.shaped(self.shapes[node])[1:])
        if name == "group_norm" and isinstance(x, Flow):
            w, b = (self.attr_or_value(arg(node, i, n)) for i, n in ((2, "weight"), (3, "bias")))
            return self.group_norm(node, x, arg(node, 1, "num_groups"), w, b, "", label)
        if name in BATCH_NORMS and isinstance(x, Flow):
            return self.batch_norm_call(node, name, x)
        if (_spatial(name) or name in ("pad", "constant_pad_nd")) and isinstance(x, Flow):
            return self.spatial_call(node, name, x, label)
        return self.unknown(node, label)

    def keeps_zero(self, node: fx.Node, name: str) -> bool:
        """Whether this elementwise call maps 0 to 0 (evaluated once on a zero tensor)."""
        rest, kwargs = tuple(node.args[1:]), dict(node.kwargs)
        if name in PASSING or name.startswith("dropout"):
            return True
        if any(isinstance(a, fx.Node) for a in (*rest, *kwargs.values())):
            return False
        if node.op == "call_method":
            return keeps_zero_of((name, repr(rest), repr(kwargs)), lambda z: getattr(z, name)(*rest, **kwargs))
        return keeps_zero_of((node.target, repr(rest), repr(kwargs)), lambda z: node.target(z, *rest, **kwargs))

    def elementwise_call(self, node: fx.Node, name: str, shape, label: str) -> Flow:
        values = [self.value(a) for a in node.args]
        values += [v for v in map(self.value, node.kwargs.values()) if isinstance(v, Flow)]
        if name == "where":
            cond, rest = values[0], values[1:]
            out = cf.elementwise(self.items, shape, [cond, *rest], "none", label)
            terms = cf.elementwise(self.items, shape, rest, "add", label)
            for d in out.ids:
                if d in terms.zero:
                    out.zero[d] = terms.zero[d]
            return out
        if name == "masked_fill":
            fill = values[2] if len(values) > 2 else node.kwargs.get("value")
            return cf.elementwise(self.items, shape, values[:2], "first" if fill == 0 else "none", label)
        rule = ELEMENTWISE.get(name, "add")
        if rule == "first" and not isinstance(values[0], Flow):
            rule = "none"
        return cf.elementwise(self.items, shape, values, rule, label)

    def reduce_call(self, node: fx.Node, name: str, x: Flow, label: str) -> Any:
        dims = arg(node, 1, "dim")
        keepdim = bool(arg(node, 2, "keepdim", False))
        if dims is None:
            dims, keepdim = list(range(x.rank)), False
        dims = [dims] if isinstance(dims, int) else list(dims)
        tree = self.shapes[node]
        rule = REDUCES[name]
        if name in ("var", "std") and node.kwargs.get("correction", 1) is not None:
            rule = "stat"
        out = cf.reduce(self.items, x, dims, keepdim, rule, label)
        if isinstance(tree, tuple) and tree and isinstance(tree[0], tuple):
            return (out, *[cf.untracked(t) for t in tree[1:]])
        return out

    def matmul(self, a: Any, b: Any, shape, label: str) -> Any:
        if not (isinstance(a, Flow) and isinstance(b, Flow)) or a.rank < 2 or b.rank < 2:
            cf.block_all(self.items, [f for f in (a, b) if isinstance(f, Flow)], Reason(HARD, f"{label} multiplies them as vectors"))
            return cf.untracked(shape)
        batch = len(shape) - 2
        letters = "abcdefghij"[:batch]
        spec_a = letters[batch - (a.rank - 2):] + "nk"
        spec_b = letters[batch - (b.rank - 2):] + "km"
        return cf.contract(self.items, [(a, spec_a), (b, spec_b)], letters + "nm", shape, label)

    def einsum(self, node: fx.Node, shape, label: str) -> Any:
        equation = node.args[0]
        operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        flows = [self.value(o) for o in operands]
        if len(flows) != 2 or "..." in equation or not all(isinstance(f, Flow) for f in flows):
            return self.unknown(node, label)
        inputs, output = equation.replace(" ", "").split("->")
        specs = inputs.split(",")
        return cf.contract(self.items, list(zip(flows, specs)), output, shape, label)

    def linear(self, node: fx.Node, x: Flow, shape, label: str) -> Any:
        w = self.value(arg(node, 1, "weight"))
        if not isinstance(w, Flow) or w.rank != 2:
            return self.unknown(node, label)
        batch = "abcdefghij"[: x.rank - 1]
        out = cf.contract(self.items, [(x, batch + "k"), (w, "nk")], batch + "n", shape, label)
        bias = self.value(arg(node, 2, "bias"))
        return cf.elementwise(self.items, shape, [out, bias], "add", label) if isinstance(bias, Flow) else out

    def attention(self, node: fx.Node, shape, label: str) -> Any:
        """softmax(q·kᵀ + mask)·v: heads unite over the batch dims, q and k over the summed head dim."""
        q, k, v = (self.value(arg(node, i, n)) for i, n in ((0, "query"), (1, "key"), (2, "value")))
        if not all(isinstance(f, Flow) for f in (q, k, v)) or node.kwargs.get("enable_gqa") or q.rank != k.rank:
            return self.unknown(node, label)
        batch = "abcdefgh"[: q.rank - 2]
        scores_shape = q.shape[:-1] + (k.shape[-2],)
        scores = cf.contract(self.items, [(q, batch + "le"), (k, batch + "se")], batch + "ls", scores_shape, label)
        mask = self.value(arg(node, 3, "attn_mask"))
        if isinstance(mask, Flow):
            scores = cf.elementwise(self.items, scores_shape, [scores, mask], "add", label)
        scores = cf.reduce(self.items, scores, [-1], True, "softmax", label)
        return cf.contract(self.items, [(scores, batch + "ls"), (v, batch + "sv")], batch + "lv", shape, label)

    def batch_norm_call(self, node: fx.Node, name: str, x: Flow) -> Any:
        if node.target is torch.nn.functional.batch_norm:
            order = ("running_mean", "running_var", "weight", "bias")
        elif name == "instance_norm":
            order = ("weight", "bias", "running_mean", "running_var")
        else:
            order = ("weight", "bias", "running_mean", "running_var")
        tensors = {n: self.attr_or_value(node.args[i + 1]) if len(node.args) > i + 1 else self.attr_or_value(node.kwargs.get(n))
                   for i, n in enumerate(order)}
        out = self.channel_norm(x, None, "", affine=tensors.get("weight") is not None, tensors=tensors)
        tree = self.shapes[node]
        if isinstance(tree, tuple) and tree and isinstance(tree[0], tuple):
            rest = [cf.untracked(t) if isinstance(t, tuple) else None for t in tree[1:]]
            for i, t in enumerate(tree[1:]):
                if isinstance(t, tuple) and len(t) == 1 and t[0] == x.shape[1] and 1 in x.ids:
                    rest[i] = Flow(t)
                    rest[i].carry(0, x.ids[1], False)
            return (out, *rest)
        return out

    def spatial_call(self, node: fx.Node, name: str, x: Flow, label: str) -> Any:
        tree = self.shapes[node]
        first = tree[0] if isinstance(tree[0], tuple) else tree
        if name in ("pad", "constant_pad_nd"):
            pad = arg(node, 1, "pad")
            value = arg(node, 3 if name == "pad" else 2, "value", 0) or 0
            mode = arg(node, 2, "mode", "constant") if name == "pad" else "constant"
            out = self.spatial(x, first, len(pad) // 2, label, keeps_zero=(mode == "constant" and value == 0))
        else:
            out = self.spatial(x, first, spatial_dims(name, x.rank) if "interpolate" not in name else x.rank - 2, label)
        if first is tree:
            return out
        return (out, *[self.shaped(t) for t in tree[1:]])


def _has_no_tensor(tree: Any) -> bool:
    if tree is None:
        return True
    if isinstance(tree, tuple) and all(isinstance(s, int) for s in tree):
        return False
    return isinstance(tree, tuple) and all(_has_no_tensor(t) for t in tree)


def _spatial(name: str) -> bool:
    return bool(SPATIAL.search(name))


def spatial_dims(name: str, rank: int) -> int:
    digits = re.search(r"(\d)d", name.lower())
    return int(digits.group(1)) if digits else rank - 2


ZERO_CACHE: dict[Any, bool] = {}


def keeps_zero_of(key: Any, call: Any) -> bool:
    """Whether `call(zeros)` is all zero: f(0) = 0 for an elementwise function, so a masked channel stays zero."""
    if key not in ZERO_CACHE:
        try:
            with torch.no_grad():
                result = call(torch.zeros(1, 1))
            ZERO_CACHE[key] = bool(isinstance(result, Tensor) and (result == 0).all())
        except Exception:  # any failure means we cannot tell: treat as not zero-preserving
            ZERO_CACHE[key] = False
    return ZERO_CACHE[key]
