"""Remembering base weights that fxtune replaced, so set_active, unmerge and unload are exact.

When a GraphModule's own copy of a module gets a new weight (PiSSA's residual, a merge), the
previous Parameter objects are kept in the module's `__dict__` (not in its state_dict).
"""

from __future__ import annotations

import torch
from torch import nn

ORIGINAL = "_fxtune_original"  # the traced weights, and the adapter that replaced them
PREMERGE = "_fxtune_premerge"  # the weights before the first merge


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach(), requires_grad=False)


def remember(module: nn.Module, record: str, **extra) -> None:
    """Keeps the module's current weight and bias under `record`, unless one is already kept."""
    if record not in module.__dict__:
        module.__dict__[record] = {"weight": module._parameters.get("weight"), "bias": module._parameters.get("bias"), **extra}


def restore(module: nn.Module, record: str) -> bool:
    """Puts the kept weight and bias back (as new frozen Parameters on the same storage)."""
    kept = module.__dict__.pop(record, None)
    if kept is None:
        return False
    for key in ("weight", "bias"):
        if kept[key] is not None:
            module._parameters[key] = _frozen(kept[key])
    return True


def forget_all(module: nn.Module) -> None:
    for record in (ORIGINAL, PREMERGE):
        module.__dict__.pop(record, None)


def set_weights(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Gives the (GraphModule-owned) module new frozen weight/bias tensors."""
    module._parameters["weight"] = _frozen(weight)
    if bias is not None:
        module._parameters["bias"] = _frozen(bias)


def replace_base(module: nn.Module, weight: torch.Tensor, by: str) -> None:
    """Adapter `by` gives the module a new base weight (e.g. PiSSA's residual); the traced one is kept."""
    remember(module, ORIGINAL, by=by, replacement=_frozen(weight))
    module._parameters["weight"] = module.__dict__[ORIGINAL]["replacement"]


def replaced_by(module: nn.Module) -> str | None:
    """The adapter whose base-weight replacement is in force on this module, if any."""
    kept = module.__dict__.get(ORIGINAL)
    return None if kept is None else kept["by"]


def use_base(module: nn.Module, replaced: bool) -> None:
    """Switches the module between the traced weight and the replacement its adapter made."""
    kept = module.__dict__.get(ORIGINAL)
    if kept is not None:
        module._parameters["weight"] = _frozen(kept["replacement"] if replaced else kept["weight"])
