"""A float64 reference for "LoRA on every site" that asks fxtune nothing: the test's own W + s·B@A, run
through a copy of the user's model with torch.func.functional_call.

Where each adapted weight lives comes from `site_helpers.location` (module path -> .weight, q/k/v rows
of MultiheadAttention, embeddings and Conv1D transposed); the adapter's A, B and scale from its slot.
"""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn

from site_helpers import location, slots


def _double(value):
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def lora_state64(model: nn.Module, adapted: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The model's parameters and buffers in float64, each adapted weight W replaced by W + s·(B@A).

    One name per tensor: functional_call ties the other names of a shared tensor itself.
    """
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    state = {name: _double(t.detach()) for name, t in tensors.items()}
    name_of = {id(t): name for name, t in tensors.items()}
    for target, slot in slots(adapted, adapter).items():
        module, param, rows, transposed = location(model, target)
        name = name_of[id(getattr(module, param))]
        weight = state[name].clone()  # earlier slots on other rows of this tensor are kept
        view = weight[rows] if rows is not None else weight
        canonical = view.t() if transposed else view
        a, b = slot.lora_a.detach().double().flatten(1), slot.lora_b.detach().double().flatten(1)
        new = canonical + slot.config["scale"] * (b @ a).view(canonical.shape)
        new = new.t() if transposed else new
        if rows is not None:
            weight[rows] = new
        else:
            weight = new
        state[name] = weight
    return state


def lora_reference64(
    model: nn.Module, adapted: nn.Module, args: tuple, kwargs: dict | None = None, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The user's model run in float64 on W + s·B@A for every LoRA slot of `adapted`.

    `dtype=torch.float32` runs it on the float64 sums rounded once, for models that make float32
    tensors of their own in forward (RAFT's sampling grids).
    """
    state = lora_state64(model, adapted)
    copy = deepcopy(model)  # functional_call can leave a module that is shared under two names (timm's
    # coat) holding the substitutes afterwards: the user's model must not be the one it runs
    if dtype != torch.float64:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    convert = _double if dtype == torch.float64 else (lambda v: v)
    with torch.no_grad():
        return torch.func.functional_call(
            copy, state, tuple(convert(a) for a in args), {k: convert(v) for k, v in (kwargs or {}).items()}
        )
