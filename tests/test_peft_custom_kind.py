"""The PEFT format knows no technique: a user's kind that declares a `fxtune.PeftFormat` reads and
writes PEFT files with no change to fxtune.

The kind here is an output scale, W' = diag(s)·W, b' = s·b, mapped to PEFT's IA³ on its
non-feedforward layers (`ia3_l` of shape (out, 1)). PEFT's own IA³ is the oracle, both ways.
"""

from __future__ import annotations

import copy
import json
import os

import peft
import pytest
import torch
from torch import nn

import fxtune
from fxtune.adapter import kinds as kind_registry

KIND = "test_out_scale"


def scale_weight(w, *, scale):
    """The meaning: every output row of W times its scale."""
    return w * scale.view(-1, *([1] * (w.dim() - 1)))


def scale_bias(b, *, scale):
    return b * scale


class ScaleAsIA3(fxtune.PeftFormat):
    """Output scales as PEFT's IA³ on non-feedforward layers."""

    peft_type = "IA3"
    tensor_names = ("ia3_l",)
    config_keys = frozenset({"feedforward_modules", "init_ia3_weights"})
    inert_keys = frozenset({"fan_in_fan_out"})

    def site_problem(self, site):
        return None if isinstance(site.module, nn.Linear) else "PEFT's IA³ here is on Linear layers only"

    def to_peft(self, slot, site):
        return fxtune.PeftModule({"ia3_l": slot.scale.detach()[:, None]})

    def adapter_config(self, modules, module_names):
        return {"feedforward_modules": [], "fan_in_fan_out": False, "init_ia3_weights": True}

    def from_peft(self, module, site, tensors, config):
        feedforward = config.get("feedforward_modules") or []
        if module in feedforward or any(module.endswith(f".{f}") for f in feedforward):
            return "a feedforward IA³ layer (scales the input), which this kind does not compute"
        scale = tensors["ia3_l"]
        if tuple(scale.shape) != (site.out_features, 1):
            return f"ia3_l {list(scale.shape)}, expected {[site.out_features, 1]}"
        return {"params": {"scale": scale.flatten()}, "config": {}}


def out_scale(gm, targets=None):
    rw = fxtune.Rewrite(gm, kind=KIND)
    for target, found in rw.select(targets).items():
        rw.attach(target, params={"scale": torch.ones(found[0].out_features)}, form="weight")
    return rw.finish()


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """The kind registered for one test only, as the one kind that reads PEFT's IA3 files."""
    others = {n: k for n, k in kind_registry._REGISTRY.items() if getattr(k.peft, "peft_type", None) != "IA3"}
    monkeypatch.setattr(kind_registry, "_REGISTRY", others)
    fxtune.register_kind(fxtune.AdapterKind(KIND, weight=scale_weight, bias=scale_bias, peft=ScaleAsIA3()))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _net():
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))


def test_a_users_kind_writes_peft_ia3_files_that_peft_loads(tmp_path):
    base = _net()
    gm = out_scale(fxtune.trace(base))
    with torch.no_grad():
        for name, slot in gm.fxtune.default.named_children():
            slot.scale.copy_(torch.linspace(0.5, 1.5, slot.scale.numel()))
    fxtune.save_adapters(gm, str(tmp_path), format="peft")
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["peft_type"] == "IA3" and config["target_modules"] == ["fc1", "fc2"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        expected = pm(X)
        assert (expected - base(X)).abs().max() > 1e-3
        torch.testing.assert_close(gm(X), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fxtune.load_adapters(fxtune.trace(base), str(tmp_path))(X), expected, rtol=1e-5, atol=1e-6)


def test_peft_ia3_files_load_into_the_users_kind(tmp_path):
    base = _net()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=[]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(2)) + 0.5)
    pm.eval().save_pretrained(str(tmp_path))
    loaded = fxtune.load_adapters(fxtune.trace(base), str(tmp_path))
    assert [a.kind for a in fxtune.adapters(loaded)] == [KIND]
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), pm(X), rtol=1e-5, atol=1e-6)


def test_what_the_mapping_refuses_is_listed_by_module(tmp_path):
    pm = peft.get_peft_model(copy.deepcopy(_net()), peft.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]))
    pm.save_pretrained(str(tmp_path))
    with pytest.raises(fxtune.AdapterError, match=r"'fc2': a feedforward IA³ layer"):
        fxtune.load_adapters(fxtune.trace(_net()), str(tmp_path))
