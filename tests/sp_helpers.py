"""Shared helpers for the structured-pruning adapter tests: a model with every site kind, masks,
and float64 references written out with loops (nothing here calls fxtune to compute a value)."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

SITES = ["lin", "c1", "c2", "c3", "grouped", "depthwise"]


class SPNet(nn.Module):
    """One site of each kind on its own input: Linear, Conv1d/2d/3d, grouped and depthwise Conv2d."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 8)
        self.c1 = nn.Conv1d(6, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1, stride=2)
        self.c3 = nn.Conv3d(4, 6, 3, padding=1)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)

    def forward(self, v, s, img, vol):
        return self.lin(v), self.c1(s), self.c2(img), self.c3(vol), self.grouped(img), self.depthwise(img)


def sp_net(seed: int = 0) -> SPNet:
    torch.manual_seed(seed)
    return SPNet().eval()


def inputs(seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g) for shape in [(3, 12), (2, 6, 7), (2, 8, 6, 6), (1, 4, 4, 4, 4)])


def site_input(name: str, xs: tuple) -> torch.Tensor:
    """The input tensor each site of SPNet reads."""
    return {"lin": xs[0], "c1": xs[1], "c2": xs[2], "c3": xs[3], "grouped": xs[2], "depthwise": xs[2]}[name]


def _b(bits: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits])


def masks() -> dict[str, dict[str, torch.Tensor]]:
    """Non-trivial masks; grouped masks input 3 in both groups but 1 (2) only in group 0 (1)."""
    return {
        "lin": {"in_mask": _b("110110111011"), "out_mask": _b("10111101")},
        "c1": {"in_mask": _b("101101"), "out_mask": _b("11011110")},
        "c2": {"in_mask": _b("11101101"), "out_mask": _b("101111")},
        "c3": {"in_mask": _b("1011"), "out_mask": _b("110111")},
        "grouped": {"in_mask": _b("10101100"), "out_mask": _b("111011111101")},
        "depthwise": {"in_mask": _b("11110111"), "out_mask": _b("10111111")},
    }


def ref_keep(module: nn.Module, in_mask: torch.Tensor, out_mask: torch.Tensor) -> torch.Tensor:
    """(out, in/groups) bool: weight entry [o, j] reads input channel (o's group)·in/groups + j."""
    out, per_group = module.weight.shape[:2]
    groups = getattr(module, "groups", 1)
    keep = torch.zeros(out, per_group, dtype=torch.bool)
    for o in range(out):
        group = o // (out // groups)
        for j in range(per_group):
            keep[o, j] = bool(out_mask[o]) and bool(in_mask[group * per_group + j])
    return keep


def ref_call(module: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The module's operation in float64 with weight w and bias b."""
    x = x.double()
    if isinstance(module, nn.Linear):
        return F.linear(x, w, b)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
    return conv(x, w, b, module.stride, module.padding, module.dilation, module.groups)


def masked_bias(module: nn.Module, out_mask: torch.Tensor) -> torch.Tensor | None:
    if module.bias is None:
        return None
    return torch.tensor([float(v) if keep else 0.0 for v, keep in zip(module.bias.tolist(), out_mask)], dtype=torch.float64)


def kernel_volume(module: nn.Module) -> int:
    return math.prod(module.weight.shape[2:])


def randomize(gm: nn.Module, *, std: float = 0.3, seed: int = 0) -> None:
    """Every adapter parameter of gm (masked entries included) gets a random value, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.startswith("fxtune."):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def summary_numbers(text: str) -> tuple[dict[str, tuple[int, int]], int, int]:
    """({site: (params, trainable)}, trainable total, parameter total) parsed from fxtune.summary."""
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in SITES:
            rows[parts[0]] = (int(parts[-2].replace(",", "")), int(parts[-1].replace(",", "")))
    m = re.search(r"trainable ([\d,]+) of ([\d,]+) parameters", text)
    return rows, int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))


def perturb_masked_inputs(xs: tuple, name: str, in_mask: torch.Tensor, seed: int = 5) -> tuple:
    """The inputs with large noise added to the channels `in_mask` drops for site `name`."""
    g = torch.Generator().manual_seed(seed)
    x = site_input(name, xs).clone()
    x[:, ~in_mask] += 100 * torch.randn(x[:, ~in_mask].shape, generator=g)
    return tuple(x if t is site_input(name, xs) else t for t in xs)
