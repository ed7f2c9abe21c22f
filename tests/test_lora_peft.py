"""fxtune LoRA against PEFT as the oracle: same A, B, alpha (and rslora) give PEFT's output.

PEFT's lora_A / lora_B weights have fxtune's layout (A: r×in×k…, B: out×r×1…), so they are
copied straight across; the test then compares outputs, and fxtune's fuse against PEFT's
merge_and_unload.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fxtune
from core_helpers import MLP, assert_unchanged, rel_err, snapshot
from fxtune.passes import fuse, lora


# small test layers: r close to their size on purpose
pytestmark = pytest.mark.filterwarnings("ignore::fxtune.FxtuneWarning")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 12, 3, stride=2, padding=1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def _peft_model(model: nn.Module, targets: list[str], *, r: int, alpha: float, rslora: bool, seed: int):
    """PEFT on a copy of `model`, with non-zero random A and B (std ~0.1)."""
    config = peft.LoraConfig(target_modules=targets, r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0)
    pm = peft.get_peft_model(copy.deepcopy(model), config)
    g = torch.Generator().manual_seed(seed)
    factors = {}
    with torch.no_grad():
        for name, module in pm.base_model.model.named_modules():
            if name in targets:
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                a.copy_(torch.randn(a.shape, generator=g) * 0.1)
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
                factors[name] = (a.detach().clone(), b.detach().clone())
    return pm.eval(), factors


def _copy_into_fxtune(gm, factors):
    with torch.no_grad():
        for name, (a, b) in factors.items():
            slot = gm.get_submodule(f"fxtune.default.{name.replace('.', '_')}")
            assert slot.lora_a.shape == a.shape and slot.lora_b.shape == b.shape  # same layout as PEFT
            slot.lora_a.copy_(a)
            slot.lora_b.copy_(b)


CASES = [(4, 4, False), (4, 16, False), (8, 8, True), (2, 6, True)]


@pytest.mark.parametrize("form", ["weight", "activation"])
@pytest.mark.parametrize("r,alpha,rslora", CASES)
def test_mlp_matches_peft(r, alpha, rslora, form):
    torch.manual_seed(0)
    model = MLP().eval()
    snap = snapshot(model)
    x = torch.randn(6, 16)
    targets = ["fc1", "fc2"]
    pm, factors = _peft_model(model, targets, r=r, alpha=alpha, rslora=rslora, seed=r)

    gm = lora(fxtune.trace(model), targets, r=r, alpha=alpha, rslora=rslora, form=form)
    _copy_into_fxtune(gm, factors)
    with torch.no_grad():
        expected = pm(x)
        assert rel_err(model(x), expected) > 1e-2
        assert rel_err(gm(x), expected) < 1e-5
        fused = fuse(gm)
        merged = pm.merge_and_unload()
        assert rel_err(fused(x), merged(x)) < 1e-5
        for name in targets:
            assert rel_err(fused.get_submodule(name).weight, merged.get_submodule(name).weight) < 1e-6
    assert_unchanged(model, snap)


def test_mlp_matches_peft_one_target():
    """Only fc2 adapted; fc1 stays the base layer in both libraries."""
    torch.manual_seed(1)
    model = MLP().eval()
    x = torch.randn(3, 16)
    pm, factors = _peft_model(model, ["fc2"], r=3, alpha=5, rslora=False, seed=9)
    gm = lora(fxtune.trace(model), ["fc2"], r=3, alpha=5, form="activation")
    _copy_into_fxtune(gm, factors)
    with torch.no_grad():
        assert rel_err(gm(x), pm(x)) < 1e-5


@pytest.mark.parametrize("form", ["weight", "activation"])
@pytest.mark.parametrize("r,alpha,rslora", [(4, 8, False), (3, 3, True)])
def test_conv2d_matches_peft(r, alpha, rslora, form):
    torch.manual_seed(2)
    model = ConvNet().eval()
    snap = snapshot(model)
    x = torch.randn(2, 4, 9, 9)
    pm, factors = _peft_model(model, ["conv"], r=r, alpha=alpha, rslora=rslora, seed=7)

    gm = lora(fxtune.trace(model), ["conv"], r=r, alpha=alpha, rslora=rslora, form=form)
    _copy_into_fxtune(gm, factors)
    with torch.no_grad():
        expected = pm(x)
        assert rel_err(model(x), expected) > 1e-2
        assert rel_err(gm(x), expected) < 1e-5
        merged = pm.merge_and_unload()
        assert rel_err(fuse(gm)(x), merged(x)) < 1e-5
    assert_unchanged(model, snap)
