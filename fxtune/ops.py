"""Fused operations that inserted graph code calls, where one kernel beats the plain op sequence.

`y + s·conv1x1(h, B)` as a separate conv, scale and add writes the site's output-sized tensor
two or three times; one batched matmul-add (`baddbmm`, `addmm`) writes it once (~5% of a
resnet50 forward with LoRA on every conv, on CPU).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def add_channel_mix(y: Tensor, h: Tensor, weight: Tensor, scale: float) -> Tensor:
    """y + scale · conv(h, weight) for a 1×1 `weight` (out, r, 1, ...): a channel mix added in one baddbmm."""
    if h.dim() < weight.dim():  # an unbatched conv input (C, *spatial)
        return add_channel_mix(y.unsqueeze(0), h.unsqueeze(0), weight, scale).squeeze(0)
    n, out, r = y.shape[0], weight.shape[0], weight.shape[1]
    mix = weight.reshape(1, out, r).expand(n, out, r)
    positions = math.prod(y.shape[2:])  # explicit: an empty batch has no -1 to infer
    return torch.baddbmm(y.reshape(n, out, positions), mix, h.reshape(n, r, positions), alpha=scale).view(y.shape)


def add_feature_mix(y: Tensor, h: Tensor, weight: Tensor, scale: float) -> Tensor:
    """y + scale · linear(h, weight) over the last dimension, in one addmm."""
    out = weight.shape[0]
    return torch.addmm(y.reshape(-1, out), h.reshape(-1, weight.shape[1]), weight.t(), alpha=scale).view(y.shape)
