"""Which of forward's parameters symbolic tracing treats as inputs: the ones the call gives.

fx hands every parameter a Proxy, so `if mask is not None:` takes the branch that a call without
`mask` never takes, and the graph then fails on exactly that call (timm's Hiera). So a parameter
that defaults to None and that the example inputs do not give is fixed to None. One with another
plain default (`is_causal: bool = False`, timm's ViT) is fixed to it when tracing otherwise stops.
fx checks fixed values at run time; fxtune's message says how to keep one an input: give it in
`example_inputs` / `example_kwargs`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import fx, nn

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_PLAIN = (type(None), bool, int, float, str)


def defaults_to_fix(
    model: nn.Module, concrete_args: dict[str, Any] | None, example_inputs: Any, example_kwargs: dict | None, *, plain: bool
) -> dict[str, Any]:
    """{name: default} of forward's parameters the example call leaves out and the user did not fix:
    those defaulting to None, and with `plain` also those defaulting to a bool, int, float or str."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    given = _given(parameters, example_inputs, example_kwargs)
    if given is None:
        return {}
    kinds = _PLAIN if plain else (type(None),)
    return {
        name: p.default for name, p in parameters.items()
        if p.kind in _NAMED and p.default is not inspect.Parameter.empty and type(p.default) in kinds
        and name not in given and name not in (concrete_args or {})
    }


def _given(parameters, example_inputs: Any, example_kwargs: dict | None) -> set[str] | None:
    """Names of the parameters the example call binds (None when it does not fit forward)."""
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    args = tuple(args) if isinstance(args, (tuple, list)) else ()
    try:
        bound = inspect.Signature(list(parameters.values())).bind_partial(*args, **dict(example_kwargs or {}))
    except TypeError:
        return None
    return set(bound.arguments)


def explain_fixed(graph: fx.Graph, fixed: dict[str, Any]) -> None:
    """fx's run-time check of each fixed parameter says what fxtune did and how to keep it an input."""
    for node in graph.nodes:
        if node.op != "call_function" or len(node.args) != 2 or not isinstance(node.args[1], str):
            continue
        name, specialized, _ = node.args[1].partition(" has been specialized")
        if specialized and name in fixed:
            message = (f"{name} was fixed to {fixed[name]!r} when fxtune traced the model (the example inputs did "
                       f"not give it); trace with example_kwargs={{'{name}': ...}} to keep it an input")
            node.args = (node.args[0], message)
