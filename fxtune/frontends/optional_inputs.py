"""Which of forward's parameters symbolic tracing treats as inputs: the ones a call gives.

fx hands every parameter a Proxy, so `if mask is not None:` takes the branch that a call without
`mask` never takes, and the graph then fails on exactly that call (timm's Hiera). So a parameter
that defaults to None and that the example inputs do not give is fixed to None; fx checks it at
run time (passing one raises "mask has been specialized to have value None"). Giving it in
`example_inputs` / `example_kwargs` keeps it an input.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def with_optional_inputs_fixed(
    model: nn.Module, concrete_args: dict[str, Any] | None, example_inputs: Any = None, example_kwargs: dict | None = None
) -> tuple[dict[str, Any] | None, list[str]]:
    """(concrete_args with every optional parameter the examples leave out set to None, those names).

    The user's own concrete_args win; without examples, only required parameters are inputs.
    """
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return concrete_args, []
    given = _given(parameters, example_inputs, example_kwargs)
    if given is None:
        return concrete_args, []
    user = dict(concrete_args or {})
    fixed = [name for name, p in parameters.items()
             if p.kind in _NAMED and p.default is None and name not in given and name not in user]
    merged = {**{name: None for name in fixed}, **user}
    return merged or None, fixed


def _given(parameters, example_inputs: Any, example_kwargs: dict | None) -> set[str] | None:
    """Names of the parameters the example call binds (None when it does not fit forward)."""
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    args = tuple(args) if isinstance(args, (tuple, list)) else ()
    try:
        bound = inspect.Signature(list(parameters.values())).bind_partial(*args, **dict(example_kwargs or {}))
    except TypeError:
        return None
    return set(bound.arguments)
