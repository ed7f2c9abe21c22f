"""`dynamic=` for the export front end: which input dimensions torch.export keeps free.

Static is the default: export then costs what `torch.export.export` costs. Marking every
dimension `Dim.AUTO` made convnets ~100× slower to export (shape arithmetic through every conv
and pool becomes symbolic), so only the dimensions a user names are freed:

    dynamic="batch"                                              dim 0 of every input tensor
    dynamic={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    dynamic={"x": {0: Dim("batch", max=64)}}                     torch.export's own Dim, as is
    dynamic=True                                                 every dimension (slow)

A named dimension ("batch") becomes `Dim.AUTO`: export keeps it as free as the model allows and
its input check (`_guards_fn`) refuses sizes outside what it covered.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from ..errors import TraceError

Dynamic = Any  # None | bool | "batch" | {input name: {dim: name | Dim | None}} (see the module docstring)

_USAGE = (
    "dynamic= takes 'batch' (dim 0 of every input), a dict naming dims per input as torch.export's "
    "dynamic_shapes does, e.g. {'input_ids': {0: 'batch', 1: 'seq'}}, True (every dim; slow), or None (static)"
)


def check_dynamic(dynamic: Dynamic) -> None:
    """Refuses a `dynamic=` of the wrong kind early, before any tracing (per-input details are checked later)."""
    if not (dynamic is None or isinstance(dynamic, (bool, dict)) or dynamic == "batch"):
        raise TraceError(f"{_USAGE}; got {dynamic!r}")


def dynamic_shapes(module: nn.Module, args: tuple, kwargs: dict, dynamic: Dynamic) -> dict | None:
    """torch.export's `dynamic_shapes` for `dynamic=`, keyed by forward's parameter names; None when static."""
    if dynamic is None or dynamic is False:
        return None
    bound = _bound(module, args, kwargs)
    if bound is None:
        return None  # export itself reports inputs forward does not accept
    if dynamic is True:
        return {name: pytree.tree_map(_every_dim, value) for name, value in bound.items()}
    if dynamic == "batch":
        return {name: pytree.tree_map(_batch_dim, value) for name, value in bound.items()}
    check_dynamic(dynamic)
    unknown = sorted(str(k) for k in dynamic if k not in bound)
    if unknown:
        raise TraceError(f"dynamic= names {unknown}, which are not inputs given to forward {sorted(bound)}; {_USAGE}")
    shapes: dict[str, Any] = {name: pytree.tree_map(lambda _: None, value) for name, value in bound.items()}
    for name, spec in dynamic.items():
        _check(name, bound[name], spec)
        shapes[name] = pytree.tree_map(_named_dim, spec)
    return shapes


def _bound(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    try:
        return dict(inspect.signature(module.forward).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return None


def _every_dim(value: Any) -> dict | None:
    return {i: Dim.AUTO for i in range(value.dim())} if isinstance(value, torch.Tensor) else None


def _batch_dim(value: Any) -> dict | None:
    return {0: Dim.AUTO} if isinstance(value, torch.Tensor) and value.dim() > 0 else None


def _named_dim(value: Any) -> Any:
    return Dim.AUTO if isinstance(value, str) else value


def _check(name: str, value: Any, spec: Any) -> None:
    """A per-tensor spec names dims the tensor has (nested inputs are left to torch.export to check)."""
    if not isinstance(value, torch.Tensor) or spec is None:
        return
    dims = list(spec) if isinstance(spec, dict) else list(range(len(spec))) if isinstance(spec, (tuple, list)) else None
    if dims is None:
        raise TraceError(f"dynamic={{{name!r}: {spec!r}}}: give a dict {{dim: name}} or one entry per dim; {_USAGE}")
    bad = [d for d in dims if not isinstance(d, int) or not 0 <= d < value.dim()]
    if bad or (isinstance(spec, (tuple, list)) and len(spec) != value.dim()):
        raise TraceError(f"dynamic={{{name!r}: {spec!r}}} does not fit input {name!r} of shape {tuple(value.shape)}")
