"""`fxtune.trace`: the one entry point to the front ends (symbolic tracing, torch.export).

frontend="auto" (the default) always tries symbolic tracing first: its graphs keep module calls,
so every adapter form and structural pass applies. When that stops (shape-dependent Python) and
example inputs are given, torch.export traces the model instead, and a warning says so.
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import fx, nn

from ..errors import TraceError, warn
from .dynamic_shapes import Dynamic, check_dynamic
from .parts import trace_parts
from .record import FRONTEND, TRACE_RECORD
from .symbolic import split_leaf_modules, symbolic_trace
from .torch_export import export_trace

FRONTENDS = ("auto", "fx", "export")


def trace(
    model: nn.Module,
    *,
    frontend: str = "auto",
    example_inputs: tuple | None = None,
    example_kwargs: dict[str, Any] | None = None,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    dynamic: Dynamic = None,
    parts: Iterable[str] | None = None,
) -> fx.GraphModule:
    """Trace `model` into a GraphModule that computes what it computes and never mutates it.

    The GraphModule owns its modules: parameters share the model's storage read-only (no copy;
    they do not require grad, so no optimizer writes them), buffers are copied, so training it
    leaves `model` as it was. Train adapters, or whole-layer copies with `fxtune.train_module`.

    frontend="fx" traces symbolically (`leaf_modules`, types or dotted names, stay opaque;
    `concrete_args` fixes inputs; a parameter defaulting to None is an input only if the example
    inputs give it; timm's and torchvision's own FX registrations are used when plain tracing stops
    in their layers). frontend="export" runs torch.export on `example_inputs`
    / `example_kwargs` (Hugging Face models need it); its graph keeps the train/eval mode the model
    had, and the examples' shapes unless `dynamic=` frees some ("batch", or a dict such as
    {"input_ids": {0: "batch", 1: "seq"}}). frontend="auto" tries "fx", then "export" when given
    example inputs. `gm.meta["fxtune_frontend"]` says which one traced it.

    parts=["backbone", "rpn.head"] traces only those submodules (for models whose whole forward does
    not trace, such as detectors) and returns fxtune's copy of the model with them as GraphModules;
    every pass, fuse and the adapter files work on it, naming sites by their path in the model.
    With example inputs the model runs once to record each part's inputs (for the export route).
    """
    if parts is not None:
        if isinstance(parts, str):
            parts = [parts]
        if not isinstance(model, nn.Module):
            raise TraceError(f"fxtune.trace expects an nn.Module, got {type(model).__name__}")
        return trace_parts(model, list(parts), trace, example_inputs=example_inputs, example_kwargs=example_kwargs,
                           frontend=frontend, leaf_modules=leaf_modules, concrete_args=concrete_args, dynamic=dynamic)
    if frontend not in FRONTENDS:
        raise TraceError(
            f"frontend={frontend!r} is not a front end; use 'auto' (symbolic tracing, then torch.export), "
            "'fx' (symbolic tracing) or 'export' (torch.export)"
        )
    if not isinstance(model, nn.Module):
        raise TraceError(f"fxtune.trace expects an nn.Module, got {type(model).__name__}")
    check_dynamic(dynamic)
    if frontend == "export":
        if tuple(leaf_modules) or concrete_args is not None:
            raise TraceError("leaf_modules and concrete_args belong to frontend='fx'; torch.export traces every module")
        return _exported(model, example_inputs, example_kwargs, dynamic, {"frontend": "export"})
    if frontend == "fx":
        if dynamic is not None:
            raise TraceError("dynamic= belongs to torch.export; symbolic tracing (frontend='fx') keeps every size free")
        return symbolic_trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args,
                              example_inputs=example_inputs, example_kwargs=example_kwargs)
    return _auto(model, example_inputs, example_kwargs, tuple(leaf_modules), concrete_args, dynamic)


def _auto(
    model: nn.Module, example_inputs: Any, example_kwargs: dict | None, leaf_modules: tuple, concrete_args: dict | None,
    dynamic: Dynamic,
) -> fx.GraphModule:
    """Symbolic tracing; if it stops, torch.export on the example inputs, with a warning naming why."""
    split_leaf_modules(model, leaf_modules)  # a wrong name is the user's mistake, not a reason to fall back
    try:
        return symbolic_trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args,
                              example_inputs=example_inputs, example_kwargs=example_kwargs)
    except TraceError as fx_error:
        if example_inputs is None and not example_kwargs:
            raise TraceError(
                f"{fx_error}\nWith example inputs, fxtune.trace falls back to torch.export by itself: "
                "fxtune.trace(model, example_inputs=(x,)) with tensors shaped like real inputs."
            ) from fx_error
        reason = str(fx_error).split("\n", 2)
        try:
            gm = _exported(model, example_inputs, example_kwargs, dynamic, {"frontend": "export", "fallback_from": "fx", "fx_error": reason[0]})
        except TraceError as export_error:
            raise TraceError(
                "neither front end could trace the model.\n"
                f"Symbolic tracing: {fx_error}\n\ntorch.export: {export_error}"
            ) from export_error
    ignored = " (leaf_modules and concrete_args apply to symbolic tracing only)" if leaf_modules or concrete_args else ""
    shapes = "" if dynamic is not None else "; shapes are fixed to the examples (dynamic='batch' or a dict frees dims)"
    warn(
        f"symbolic tracing stopped: {'; '.join(line.strip() for line in reason[:2])}\n"
        f"Traced with torch.export on the example inputs instead{ignored}{shapes}. "
        "frontend='export' skips the symbolic attempt; frontend='fx' with leaf_modules=[...] keeps symbolic tracing."
    )
    return gm


def _exported(model: nn.Module, example_inputs: Any, example_kwargs: dict | None, dynamic: Dynamic, record: dict) -> fx.GraphModule:
    gm = export_trace(model, example_inputs, example_kwargs, dynamic=dynamic)
    gm.meta[FRONTEND] = "export"
    gm.meta[TRACE_RECORD] = record
    return gm
