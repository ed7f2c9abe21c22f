"""A float64 reference for "LoRA on every site" that asks fxtune nothing: the test's own W + s·B@A, run
through the user's model with torch.func.functional_call (so no copy of the model is made or changed).

Where each adapted weight lives comes from `site_helpers.location` (module path -> .weight, q/k/v rows
of MultiheadAttention, embeddings and Conv1D transposed); the adapter's A, B and scale from its slot.
"""

from __future__ import annotations

import torch
from torch import nn

from site_helpers import location, slots


def _double(value):
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def lora_state64(model: nn.Module, adapted: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The model's parameters and buffers in float64, each adapted weight W replaced by W + s·(B@A)."""
    tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    names_of: dict[int, list[str]] = {}
    for name, t in tensors.items():
        names_of.setdefault(id(t), []).append(name)
    converted = {key: _double(tensors[names[0]].detach()) for key, names in names_of.items()}
    state = {name: converted[id(t)] for name, t in tensors.items()}  # one tensor per tied group, as functional_call wants
    for target, slot in slots(adapted, adapter).items():
        module, param, rows, transposed = location(model, target)
        names = names_of[id(getattr(module, param))]
        weight = state[names[0]].clone()  # earlier slots on other rows of this tensor are kept
        view = weight[rows] if rows is not None else weight
        canonical = view.t() if transposed else view
        a, b = slot.lora_a.detach().double().flatten(1), slot.lora_b.detach().double().flatten(1)
        new = canonical + slot.config["scale"] * (b @ a).view(canonical.shape)
        new = new.t() if transposed else new
        if rows is not None:
            weight[rows] = new
        else:
            weight = new
        for name in names:
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
    if dtype != torch.float64:
        rounded: dict[int, torch.Tensor] = {}  # tied names keep one tensor
        state = {k: rounded.setdefault(id(v), v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    convert = _double if dtype == torch.float64 else (lambda v: v)
    with torch.no_grad():
        return torch.func.functional_call(
            model, state, tuple(convert(a) for a in args), {k: convert(v) for k, v in (kwargs or {}).items()}
        )
