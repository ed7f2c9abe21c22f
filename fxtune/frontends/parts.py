"""Tracing a model in parts: when the whole model does not trace, its tensor-only submodules still do.

`fxtune.trace(detector, parts=["backbone", "rpn.head", "roi_heads.box_head"])` returns fxtune's own
copy of the model (parameters shared read-only, buffers copied, as for a GraphModule) in which
each listed submodule is a GraphModule; the model's own forward still runs around them. With
`example_inputs`, the model runs once to record what each part receives, which the export route
needs (frontend="export", or "auto" falling back to it).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx, nn

from ..errors import TraceError
from ..graph.ownership import own_module_tree, replace_submodule
from ..graph.parts import PARTS
from ..graph.sites import PART
from .torch_export import example_args


def _check(model: nn.Module, parts: list[str]) -> None:
    names = dict(model.named_modules())
    unknown = [p for p in parts if p not in names or not p]
    if unknown:
        raise TraceError(f"parts= names no submodule of the model: {unknown}; parts are dotted module paths such as 'backbone'")
    for a in parts:
        for b in parts:
            if a != b and b.startswith(a + "."):
                raise TraceError(f"parts= lists '{b}' inside '{a}'; list the outer part or the inner one, not both")
    if len(set(parts)) != len(parts):
        raise TraceError(f"parts= lists a part twice: {parts}")


def _recorded_inputs(model: nn.Module, parts: list[str], example_inputs: Any, example_kwargs: dict | None) -> dict[str, tuple]:
    """{part: (args, kwargs)} of each part's first call while the model runs once on the examples."""
    seen: dict[str, tuple] = {}
    handles = []
    for path in parts:
        def record(module, args, kwargs, path=path):
            seen.setdefault(path, (args, kwargs))
        handles.append(model.get_submodule(path).register_forward_pre_hook(record, with_kwargs=True))
    args, kwargs = example_args(example_inputs, example_kwargs)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as exc:  # the model's own error: say so, with what it said
        raise TraceError(f"running the model on the example inputs to record its parts' inputs failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        for handle in handles:
            handle.remove()
    missing = [p for p in parts if p not in seen]
    if missing:
        raise TraceError(f"parts {missing} were not called when the model ran on the example inputs; "
                         "list parts the forward pass uses")
    return seen


def trace_parts(model: nn.Module, parts: list[str], trace_one: Callable[..., fx.GraphModule], *,
                example_inputs: Any, example_kwargs: dict | None, **options: Any) -> nn.Module:
    """`model` with each of `parts` traced by `trace_one(module, example_inputs=..., example_kwargs=..., **options)`."""
    parts = list(parts)
    _check(model, parts)
    given = example_inputs is not None or bool(example_kwargs)
    recorded = _recorded_inputs(model, parts, example_inputs, example_kwargs) if given else {}
    owned = own_module_tree(model, freeze=True)
    for path in parts:
        args, kwargs = recorded.get(path, (None, None))
        try:
            gm = trace_one(model.get_submodule(path), example_inputs=args, example_kwargs=kwargs or None, **options)
        except TraceError as exc:
            raise TraceError(f"part '{path}': {exc}") from exc
        gm.meta[PART] = path
        replace_submodule(owned, path, gm)
    owned.__dict__[PARTS] = tuple(parts)
    return owned
