"""The functions that fxtune's generated graph code calls (besides torch's and the kinds' own).

They are plain module-level functions, so the code reads `fxtune_ops_add_channel_mix(...)` and a
saved graph names them by qualified name. `y + s·conv1x1(h, B)` as a separate conv, scale and
add writes the site's output-sized tensor two or three times; one batched matmul-add (`baddbmm`,
`addmm`) writes it once (~5% of a resnet50 forward with LoRA on every conv, on CPU). Training in
channels-last layout is the exception: there the conv's backward is the faster kernel.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

_CONV = {3: torch.conv1d, 4: torch.conv2d, 5: torch.conv3d}


def add_channel_mix(y: Tensor, h: Tensor, weight: Tensor, scale: float) -> Tensor:
    """y + scale · conv(h, weight) for a 1×1 `weight` (out, r, 1, ...): a channel mix added in one
    matmul-add, over whichever layout `y` and `h` share (channels-first or channels-last)."""
    if h.dim() < weight.dim():  # an unbatched conv input (C, *spatial)
        return add_channel_mix(y.unsqueeze(0), h.unsqueeze(0), weight, scale).squeeze(0)
    out, r = weight.shape[0], weight.shape[1]
    y_last, h_last = y.movedim(1, -1), h.movedim(1, -1)
    if not y.is_contiguous() and y_last.is_contiguous() and h_last.is_contiguous():
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            # backward through oneDNN's 1x1 conv beats MKL's skinny matmuls in this layout (~10% of a step)
            return torch.add(y, _CONV[weight.dim()](h, weight), alpha=scale)
        mixed = torch.addmm(y_last.reshape(-1, out), h_last.reshape(-1, r), weight.reshape(out, r).t(), alpha=scale)
        return mixed.view(y_last.shape).movedim(-1, 1)
    n = y.shape[0]
    mix = weight.reshape(1, out, r).expand(n, out, r)
    positions = math.prod(y.shape[2:])  # explicit: an empty batch has no -1 to infer
    return torch.baddbmm(y.reshape(n, out, positions), mix, h.reshape(n, r, positions), alpha=scale).view(y.shape)


def add_feature_mix(y: Tensor, h: Tensor, weight: Tensor, scale: float) -> Tensor:
    """y + scale · linear(h, weight) over the last dimension, in one addmm."""
    out = weight.shape[0]
    return torch.addmm(y.reshape(-1, out), h.reshape(-1, weight.shape[1]), weight.t(), alpha=scale).view(y.shape)


def with_rows(raw: Tensor, start: int, stop: int, rows: Tensor) -> Tensor:
    """`raw` with rows start:stop replaced by `rows` (a new tensor; gradients flow to `rows`)."""
    return torch.cat([raw[:start], rows, raw[stop:]])


def keep_index(new: Tensor, old: Tensor, index: Sequence[int], dim: int) -> Tensor:
    """`new` with the slices `index` along `dim` taken from `old` (an embedding's padding row stays as it was)."""
    mask = torch.zeros(new.shape[dim], dtype=torch.bool, device=new.device)
    mask[list(index)] = True
    shape = [1] * new.dim()
    shape[dim] = -1
    return torch.where(mask.view(shape), old, new)


def keep_positions(new: Tensor, base: Tensor, indices: Tensor, index: Sequence[int]) -> Tensor:
    """An embedding's output: `base` where the looked-up index is one never adapted (padding), else `new`."""
    kept = torch.isin(indices, torch.tensor(list(index), device=indices.device))
    return torch.where(kept.unsqueeze(-1), base, new)


def call_with(module: nn.Module, weights: dict[str, Tensor], *args: Any, **kwargs: Any) -> Any:
    """Calls `module` with some parameters replaced by `weights` (names relative to it); the module keeps its own.

    functional_call writes into the dict it is given, so it gets a copy: an fx Interpreter (which
    torch.export runs) passes the node's own immutable dict."""
    return functional_call(module, dict(weights), args, kwargs)
