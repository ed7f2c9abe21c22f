"""Shared helpers for the core + LoRA tests: snapshots, fp64 references, small models.

Every reference here is written out from the math (W + s·B@A in float64); nothing calls into
fxtune to compute an expected value.
"""

from __future__ import annotations

import copy
import math

import torch
import torchvision
from torch import fx, nn


MODEL_BUILDERS = {
    "resnet18": torchvision.models.resnet18,
    "mobilenet_v3_small": torchvision.models.mobilenet_v3_small,
    "efficientnet_b0": torchvision.models.efficientnet_b0,
    "convnext_tiny": torchvision.models.convnext_tiny,
    "regnet_y_400mf": torchvision.models.regnet_y_400mf,
}


def vision_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODEL_BUILDERS[name](weights=None).eval()


class SmallNet(nn.Module):
    """Every conv flavour fxtune must handle, plus Linear on images and on tokens.

    Input: (B, 3, 16, 16).
    """

    def __init__(self):
        super().__init__()
        self.c1d = nn.Conv1d(3, 6, 3, padding=1, padding_mode="circular")
        self.c3d = nn.Conv3d(1, 4, 3, padding=1, stride=(1, 2, 2))
        self.stem = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.grouped = nn.Conv2d(12, 18, 3, padding=1, groups=3)
        self.depthwise = nn.Conv2d(18, 18, 3, padding=1, groups=18)
        self.dilated = nn.Conv2d(18, 16, 3, padding=2, dilation=2, stride=2)
        self.reflect = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
        self.circular = nn.Conv2d(16, 8, (3, 5), padding=(1, 2), padding_mode="circular")
        self.same = nn.Conv2d(8, 8, 3, padding="same", dilation=2)
        self.tok = nn.Linear(8, 8, bias=False)
        self.fc = nn.Linear(8 + 6 + 4, 10)

    def forward(self, x):
        v1 = self.c1d(x.mean(2)).mean(-1)
        v3 = self.c3d(x.unsqueeze(1)).mean((2, 3, 4))
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(self.grouped(h))
        h = torch.relu(self.depthwise(h))
        h = torch.relu(self.dilated(h))
        h = torch.relu(self.reflect(h))
        h = torch.relu(self.circular(h))
        h = self.same(h)
        tokens = h.flatten(2).transpose(1, 2)
        tokens = self.tok(tokens)
        v2 = tokens.mean(1)
        return self.fc(torch.cat([v2, v1, v3], dim=1))


def small_net(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    net = SmallNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


class MLP(nn.Module):
    def __init__(self, d_in=16, d_hidden=32, d_out=8):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Twice(nn.Module):
    """`fc` is called twice: two sites (`fc`, `fc@1`) sharing one weight."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.fc(x)))))


# ----------------------------------------------------------------------------- snapshots


def snapshot(module: nn.Module) -> dict:
    """Everything a call must not change: tensors (cloned), requires_grad flags, code, training."""
    return {
        "params": {k: p.detach().clone() for k, p in module.named_parameters(remove_duplicate=False)},
        "grads": {k: p.requires_grad for k, p in module.named_parameters(remove_duplicate=False)},
        "buffers": {k: b.detach().clone() for k, b in module.named_buffers(remove_duplicate=False)},
        "code": module.code if isinstance(module, fx.GraphModule) else None,
        "modules": [k for k, _ in module.named_modules()],
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaN in the same places counting as equal."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return torch.equal(a, b)


def assert_unchanged(module: nn.Module, snap: dict) -> None:
    now = snapshot(module)
    assert now["code"] == snap["code"], "generated code changed"
    assert now["modules"] == snap["modules"], "module tree changed"
    for store in ("params", "buffers"):
        assert now[store].keys() == snap[store].keys(), f"{store} keys changed"
        for k in snap[store]:
            assert _same(now[store][k], snap[store][k]), f"{store[:-1]} {k} changed"
    assert now["grads"] == snap["grads"], "requires_grad flags changed"


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().double(), ref.detach().double()
    return float((y - ref).norm() / ref.norm())


# ----------------------------------------------------------------------------- adapters


def lora_slots(gm: nn.Module, adapter: str = "default") -> dict[str, nn.Module]:
    """{model path: slot module} for every LoRA slot of `adapter`, found by the documented layout
    `gm.fxtune.<adapter>.<path with dots as underscores>`."""
    out = {}
    for path, module in gm.named_modules():
        if not path or path.startswith("fxtune"):
            continue
        key = f"fxtune.{adapter}.{path.replace('.', '_')}"
        try:
            slot = gm.get_submodule(key)
        except AttributeError:
            continue
        out[path] = slot
    return out


def randomize_lora(gm: nn.Module, *, std: float = 0.05, seed: int = 0, adapter: str = "default") -> None:
    """Gives every LoRA adapter of `gm` moderate non-zero random A and B (in place, on gm only)."""
    g = torch.Generator().manual_seed(seed)
    slots = lora_slots(gm, adapter)
    assert slots, "no LoRA slot found"
    with torch.no_grad():
        for slot in slots.values():
            for t in (slot.lora_a, slot.lora_b):
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * std)


def lora_scale(r: int, alpha=None, rslora: bool = False) -> float:
    alpha = r if alpha is None else alpha
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_delta64(slot: nn.Module, shape, scale: float) -> torch.Tensor:
    """s·(B.flatten(1) @ A.flatten(1)).view(W.shape), in float64."""
    a = slot.lora_a.detach().double().flatten(1)
    b = slot.lora_b.detach().double().flatten(1)
    return scale * (b @ a).view(shape)


def lora_reference(model: nn.Module, gm: nn.Module, scale: float, adapter: str = "default") -> nn.Module:
    """A float64 deepcopy of the user's model with W replaced by W + s·B@A for every slot in gm."""
    ref = copy.deepcopy(model).double()
    slots = lora_slots(gm, adapter)
    assert slots
    with torch.no_grad():
        for path, slot in slots.items():
            m = ref.get_submodule(path)
            m.weight.copy_(m.weight + lora_delta64(slot, m.weight.shape, scale))
    return ref


def count_lora_params(gm: nn.Module, adapter: str = "default") -> int:
    return sum(s.lora_a.numel() + s.lora_b.numel() for s in lora_slots(gm, adapter).values())


def expected_lora_numel(module: nn.Module, r: int) -> int:
    """PEFT layout: A (r, in/groups, *k), B (out, r, 1...)."""
    w = module.weight
    return r * math.prod(w.shape[1:]) + w.shape[0] * r


def frozen(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters do not require grad, as fxtune's base weights.

    torch picks a different linear kernel for 3-D inputs when the weight requires grad (results
    differ in the last bits), so bit-exact comparisons use a frozen copy of the model.
    """
    return copy.deepcopy(model).requires_grad_(False)


# ----------------------------------------------------------------------------- untraceable models


class Gate(nn.Module):
    """Python control flow on data: symbolic tracing cannot follow it, nor can torch.export."""

    def forward(self, x):
        if x.sum() > 0:  # data-dependent branch
            return x * 2
        return x - 1


class Outer(nn.Module):
    """fc → (Linear, Gate) → head: the Gate at `block.1` stops both front ends."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), Gate())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(self.fc(x)))
