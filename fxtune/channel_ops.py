"""Channel rules for function and method calls (torch functions, tensor methods, operator, aten ops).

Names are matched, not objects, so `torch.relu`, `F.relu`, `x.relu()` and `aten.relu.default`
share one rule; argument positions are those the forms share (aten's batch_norm is the exception).
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
from torch import Tensor, fx

from . import channel_flow as cf
from .channel_flow import HARD, Dyn, Flow, Literal, Reason

ELEMENTWISE = {
    "add": "add", "add_": "add", "iadd": "add", "sub": "add", "sub_": "add", "isub": "add", "rsub": "add",
    "maximum": "add", "minimum": "add", "mul": "mul", "mul_": "mul", "imul": "mul", "div": "first",
    "div_": "first", "truediv": "first", "itruediv": "first", "eq": "none", "ne": "none", "lt": "none",
    "le": "none", "gt": "none", "ge": "none", "logical_and": "none", "and_": "none", "__and__": "none",
}
UNARY = {
    "relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish",
    "hardswish_", "hardsigmoid", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu",
    "mish", "softplus", "neg", "abs", "exp", "sqrt", "rsqrt", "square", "sin", "cos", "erf", "log", "reciprocal",
    "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "pow", "contiguous", "clone", "detach", "to", "type",
    "float", "half", "double", "bfloat16", "type_as", "dropout", "dropout_", "alpha_dropout", "feature_alpha_dropout",
    "dropout1d", "dropout2d", "dropout3d", "stochastic_depth", "alias", "_to_copy", "lift_fresh_copy", "sign",
    "logsigmoid", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like",
}
PASSING = {"dropout", "dropout_", "feature_alpha_dropout", "stochastic_depth", "to", "type", "_to_copy", "contiguous",
           "clone", "detach", "alias", "lift_fresh_copy", "type_as", "float", "half", "double", "bfloat16"}
NO_COPY = {"zeros_like": True, "ones_like": False, "full_like": False, "empty_like": False, "rand_like": False, "randn_like": False}
RESHAPES = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_", "ravel", "view_as", "reshape_as"}
SIZED = {"view", "reshape", "_unsafe_view", "expand", "broadcast_to"}
EXPANDS = {"expand", "expand_as", "broadcast_to"}
PERMUTES = {"permute", "transpose", "transpose_", "swapaxes", "swapdims", "t", "numpy_T", "mT"}
REDUCES = {
    "sum": "sum", "nansum": "sum", "mean": "stat", "nanmean": "stat", "var": "stat", "std": "stat", "norm": "stat",
    "vector_norm": "stat", "linalg_vector_norm": "stat", "amax": "hard", "amin": "hard", "argmax": "hard",
    "argmin": "hard", "logsumexp": "hard", "prod": "hard", "all": "hard", "any": "hard", "max": "hard", "min": "hard",
}
SOFTMAX = {"softmax", "log_softmax", "_softmax", "_log_softmax", "_safe_softmax", "softmin"}
BATCH_NORMS = {"batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
               "_native_batch_norm_legit_functional", "native_batch_norm", "instance_norm"}
SPATIAL = re.compile(r"(max|avg|lp)_?pool|adaptive|upsample|interpolate|pixel")
NOT_READING = {"size", "dim", "numel", "sym_size", "getattr", "_assert", "_assert_tensor_metadata", "_assert_scalar",
               "sym_constrain_range_for_size", "is_contiguous", "_guards_fn"}


def op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def sizes_arg(node: fx.Node, start: int = 1) -> tuple[list, int | None]:
    """The literal size list of view/reshape/expand (varargs or one list) and its argument index (None: varargs)."""
    rest = node.args[start:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)):
        return list(rest[0]), start
    if not rest and "size" in node.kwargs:
        return list(node.kwargs["size"]), None
    return list(rest), None


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
        if name in UNARY and isinstance(x, Flow) and len(tensor_args) == 1:
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

    def size_of(self, node: fx.Node, x: Any) -> Any:
        """x.size(d) / x.shape / sym_size: numbers that follow channels if their dim carries items."""
        if not isinstance(x, Flow):
            return None

        def one(d: int) -> Dyn:
            return Dyn([x.ids[d]] if d in x.ids else [])

        dim = arg(node, 1, "dim") if node.args[1:2] != ("shape",) else None
        return one(dim % x.rank) if isinstance(dim, int) else tuple(one(d) for d in range(x.rank))

    def sizes_read(self, node: fx.Node) -> Dyn | None:
        """The channel sizes a node's arguments are computed from (None if it reads no computed size)."""
        found: list[Dyn] = []
        fx.node.map_aggregate((node.args, node.kwargs), lambda a: found.append(self.env.get(a)) if isinstance(a, fx.Node) and isinstance(self.env.get(a), Dyn) else None)
        if not found:
            return None
        return Dyn([ids for d in found for ids in d.ids])

    def keeps_zero(self, node: fx.Node, name: str) -> bool:
        """Whether this elementwise call maps 0 to 0 (evaluated once on a zero tensor)."""
        rest, kwargs = tuple(node.args[1:]), dict(node.kwargs)
        if any(isinstance(a, fx.Node) for a in (*rest, *kwargs.values())):
            return False
        if name in PASSING or name.startswith("dropout"):
            return True
        if node.op == "call_method":
            return keeps_zero_of((name, repr(rest), repr(kwargs)), lambda z: getattr(z, name)(*rest, **kwargs))
        return keeps_zero_of((node.target, repr(rest), repr(kwargs)), lambda z: node.target(z, *rest, **kwargs))

    def elementwise_call(self, node: fx.Node, name: str, shape, label: str) -> Flow:
        values = [self.value(a) for a in node.args]
        if name == "where":
            cond, rest, rule = values[0], values[1:], "add"
            out = cf.elementwise(self.items, shape, [v for v in (cond, *rest)], "none", label)
            terms = cf.elementwise(self.items, shape, rest, "add", label)
            for d in out.ids:
                if d in terms.zero:
                    out.zero[d] = terms.zero[d]
            return out
        if name == "masked_fill":
            fill = values[2] if len(values) > 2 else node.kwargs.get("value")
            return cf.elementwise(self.items, shape, values[:2], "first" if fill == 0 else "none", label)
        rule = ELEMENTWISE.get(name, "add")
        if name == "rsub" or (node.target is operator.sub and not isinstance(values[0], Flow)):
            rule = "add"
        if rule == "first" and not isinstance(values[0], Flow):
            rule = "none"
        return cf.elementwise(self.items, shape, values, rule, label)

    def record_sizes(self, node: fx.Node, name: str, out: Flow, start: int | None) -> None:
        """Literal sizes of a view/reshape/expand/unflatten that count channels (edited when channels go);
        sizes computed from channel counts elsewhere become constants (channel dims are static)."""
        if name not in SIZED and name != "unflatten":
            return
        for d, ids in out.ids.items():
            self.literals.append(Literal(node.name, "sizes" if name != "unflatten" else "unflatten", d, ids, start))
        if name == "unflatten":
            return
        sizes, _ = sizes_arg(node)
        for d, entry in enumerate(sizes):
            value = self.env.get(entry) if isinstance(entry, fx.Node) else None
            if isinstance(value, Dyn) and value.ids and d not in out.ids:
                self.constant_sizes.append((node.name, d, out.shape[d]))

    def permutation(self, node: fx.Node, name: str, rank: int) -> list[int]:
        if name in ("t", "numpy_T") or (name == "mT"):
            order = list(range(rank))
            if rank >= 2:
                order[-1], order[-2] = order[-2], order[-1]
            return order
        if name == "permute":
            dims, _ = sizes_arg(node)
            return [d % rank for d in dims]
        a, b = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        order = list(range(rank))
        order[a % rank], order[b % rank] = order[b % rank], order[a % rank]
        return order

    def repeat(self, node: fx.Node, x: Flow, shape, label: str) -> Flow:
        counts, _ = sizes_arg(node)
        out, shift = Flow(shape), len(shape) - x.rank
        for d, ids in x.ids.items():
            times = counts[d + shift]
            out.carry(d + shift, ids.repeat(times), x.zero[d].repeat(times))
        return out

    def concat(self, node: fx.Node, name: str, shape, label: str) -> Flow:
        flows = [self.value(a) for a in node.args[0]]
        dim = arg(node, 1, "dim", 0)
        if not all(isinstance(f, Flow) for f in flows):
            return self.unknown(node, label)
        if name == "stack":
            dim = dim % len(shape)
            flows = [cf.reshape(self.items, f, f.shape[:dim] + (1,) + f.shape[dim:], label) for f in flows]
        return cf.cat(self.items, flows, dim % len(shape), shape, label)

    def split_call(self, node: fx.Node, name: str, x: Flow, label: str) -> Any:
        tree = self.shapes[node]
        dim = arg(node, 2, "dim", 0) % x.rank
        sizes = [s[dim] for s in tree]
        if dim in x.ids:
            self.literals.append(Literal(node.name, "split", dim, x.ids[dim], sizes))
        if name == "tensor_split" and dim in x.ids:
            return self.unknown(node, label)
        return tuple(cf.split(x, dim, sizes))

    def slice_call(self, node: fx.Node, name: str, x: Flow, label: str) -> Flow:
        dim = arg(node, 1, "dim", 0) % x.rank
        size = x.shape[dim]
        if name == "select":
            index = arg(node, 2, "index")
            if dim in x.ids:
                self.items.block(x.ids[dim], Reason(HARD, f"{label} reads one channel by its index"))
            out = cf.narrow(self.items, x, dim, index % size, index % size + 1, 1, label)
            return cf.reshape(self.items, out, self.out_shape(node), label)
        if name == "narrow":
            start, length = arg(node, 2, "start"), arg(node, 3, "length")
            stop, step = start + length, 1
        else:
            start, stop, step = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1)
        if not all(v is None or isinstance(v, int) for v in (start, stop, step)):
            if dim in x.ids:
                return self.unknown(node, label)
            return Flow(self.out_shape(node), dict(x.ids), dict(x.zero))
        start, stop, _ = slice(start, stop, step).indices(size)
        if dim in x.ids:
            self.literals.append(Literal(node.name, "slice", dim, x.ids[dim], (name, start, stop)))
        return cf.narrow(self.items, x, dim, start, stop, step or 1, label)

    def getitem(self, node: fx.Node, x: Any, label: str) -> Any:
        index = node.args[1]
        if not isinstance(x, Flow):
            if isinstance(x, (tuple, list)) and isinstance(index, int):
                return x[index]
            if isinstance(x, (tuple, list)) and isinstance(index, slice):
                return tuple(x[index])
            return self.unknown(node, label) if x is not None else None
        return self.index_flow(node, x, index, label)

    def index_flow(self, node: fx.Node, x: Flow, index: Any, label: str) -> Any:
        """Basic indexing (ints, slices, None, Ellipsis) of a tensor; anything else is not followed."""
        parts = list(index) if isinstance(index, tuple) else [index]
        if any(not (p is None or p is Ellipsis or isinstance(p, (int, slice))) for p in parts):
            return self.unknown(node, label)
        if any(isinstance(p, slice) and not all(v is None or isinstance(v, int) for v in (p.start, p.stop, p.step)) for p in parts):
            return self.unknown(node, label)
        used = sum(1 for p in parts if p is not None and p is not Ellipsis)
        if Ellipsis in parts:
            e = parts.index(Ellipsis)
            parts = parts[:e] + [slice(None)] * (x.rank - used) + parts[e + 1:]
        parts += [slice(None)] * (x.rank - sum(1 for p in parts if p is not None))
        flow, d, out_dims = x, 0, []
        for position, p in enumerate(parts):
            if p is None:
                out_dims.append(None)
                continue
            if isinstance(p, int):
                if d in flow.ids:
                    self.items.block(flow.ids[d], Reason(HARD, f"{label} reads one channel by its index"))
                flow = cf.narrow(self.items, flow, d, p % flow.shape[d], p % flow.shape[d] + 1, 1, label)
            else:
                start, stop, step = p.indices(flow.shape[d])
                if d in flow.ids and (start, stop, step) != (0, flow.shape[d], 1):
                    self.literals.append(Literal(node.name, "slice", d, flow.ids[d], ("getitem", start, stop, position, tuple(parts))))
                flow = cf.narrow(self.items, flow, d, start, stop, step, label)
                out_dims.append(d)
            d += 1
        return cf.reshape(self.items, flow, self.out_shape(node), label)

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
