"""TorchScript takes traced and fused GraphModules (README, Limits), also before their code is generated."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import fxtune
from fxtune.passes import fuse, lora


def _scripted(gm: torch.nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's own deprecation and annotation notices
        return torch.jit.script(gm)


def test_traced_and_fused_graphmodules_script_and_compute_the_same():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)).eval()
    x = torch.randn(2, 3, 6, 6)
    adapted = lora(fxtune.trace(model), targets=["0"], r=2)
    with torch.no_grad():
        for p in fxtune.trainable_parameters(adapted):
            p.normal_(0, 0.3)
        for gm in (fxtune.trace(model), fuse(adapted)):
            assert "_code" not in gm.__dict__
            torch.testing.assert_close(_scripted(gm)(x), gm(x), rtol=0, atol=0)
        torch.testing.assert_close(fuse(adapted)(x), adapted(x), rtol=1e-5, atol=1e-6)
