"""Op names the channel rules match (the forms torch functions, tensor methods and aten ops share) and argument helpers."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx

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
