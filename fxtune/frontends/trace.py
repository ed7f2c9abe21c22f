"""`fxtune.trace`: the one entry point to the front ends (symbolic tracing, torch.export)."""

from __future__ import annotations

from typing import Any, Iterable

from torch import fx, nn

from ..errors import TraceError
from .symbolic import symbolic_trace
from .torch_export import export_trace


def trace(
    model: nn.Module,
    *,
    frontend: str = "fx",
    example_inputs: tuple | None = None,
    example_kwargs: dict[str, Any] | None = None,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace `model` into a GraphModule that computes what it computes and never mutates it.

    The GraphModule owns its modules: parameters share the model's storage read-only (no copy;
    they do not require grad, so no optimizer writes them), buffers are copied, so training it
    leaves `model` as it was. Train adapters, or whole-layer copies with `fxtune.train_module`.
    `leaf_modules` (types or dotted names) are kept opaque; `concrete_args` fixes inputs.
    frontend="export" runs torch.export on `example_inputs` / `example_kwargs` instead (for
    Hugging Face models); its graph keeps the train/eval mode the model had when traced.
    """
    if frontend not in ("fx", "export"):
        raise TraceError(f"frontend={frontend!r} is not a front end; use 'fx' (symbolic tracing) or 'export' (torch.export)")
    if not isinstance(model, nn.Module):
        raise TraceError(f"fxtune.trace expects an nn.Module, got {type(model).__name__}")
    if frontend == "export":
        if tuple(leaf_modules) or concrete_args is not None:
            raise TraceError("leaf_modules and concrete_args belong to frontend='fx'; torch.export traces every module")
        return export_trace(model, example_inputs, example_kwargs)
    if example_kwargs is not None:
        raise TraceError("example_kwargs belongs to frontend='export'; symbolic tracing needs no example inputs")
    return symbolic_trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
