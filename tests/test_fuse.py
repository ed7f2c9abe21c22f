"""fuse: folded constants equal the fp64 reference, the code is the traced code again, the state_dict is the
user's model's, fusing twice changes nothing, and non-finite adapters are refused."""

from __future__ import annotations

import copy

import pytest
import torch

import fxtune
from core_helpers import (
    Twice,
    assert_unchanged,
    lora_delta64,
    lora_reference,
    lora_slots,
    randomize_lora,
    rel_err,
    small_net,
    snapshot,
    vision_model,
)
from fxtune.passes import fuse, lora


def _adapted(model, form="activation", **kw):
    gm = lora(fxtune.trace(model), r=2, form=form, **kw)
    randomize_lora(gm, std=0.05, seed=4)
    return gm


@pytest.mark.parametrize("form", ["weight", "activation"])
def test_fuse_twice_changes_nothing(form):
    model = small_net()
    fused = fuse(_adapted(model, form))
    snap = snapshot(fused)
    again = fuse(fused)
    assert again is not fused
    assert_unchanged(fused, snap)
    assert again.code == fused.code
    a, b = fused.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(x), fused(x))


def test_fuse_without_adapters_is_the_traced_model():
    model = small_net()
    gm = fxtune.trace(model)
    fused = fuse(gm)
    assert fused.code == gm.code
    for k, v in model.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v)


def test_fused_state_dict_loads_into_users_class():
    model = vision_model("resnet18")
    gm = _adapted(model, "weight")
    fused = fuse(gm)
    state = fused.state_dict()
    assert list(state) == list(model.state_dict())
    assert all(state[k].shape == v.shape and state[k].dtype == v.dtype for k, v in model.state_dict().items())
    fresh = vision_model("resnet18", seed=7)
    fresh.load_state_dict(state)  # strict: no missing or unexpected key
    fresh.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = fused(x)
        assert torch.equal(fresh(x), y)
        assert rel_err(y, lora_reference(model, gm, 1.0)(x.double())) < 1e-5


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("param", ["lora_a", "lora_b"])
def test_nonfinite_adapter_refused_naming_the_site(bad, param):
    model = small_net()
    model_snap = snapshot(model)
    gm = _adapted(model)
    with torch.no_grad():
        getattr(gm.get_submodule("fxtune.default.dilated"), param).view(-1)[3] = bad
    snap = snapshot(gm)
    with pytest.raises(fxtune.FusionError, match="dilated"):
        fuse(gm)
    assert_unchanged(gm, snap)
    assert_unchanged(model, model_snap)


def test_fusion_overflow_refused():
    """Finite adapters whose product overflows float32 still must not be folded as inf."""
    model = small_net()
    gm = _adapted(model, "weight")
    with torch.no_grad():
        slot = gm.get_submodule("fxtune.default.tok")
        slot.lora_a.fill_(1e30)
        slot.lora_b.fill_(1e30)
    snap = snapshot(gm)
    with pytest.raises(fxtune.FusionError, match="tok"):
        fuse(gm)
    assert_unchanged(gm, snap)


def test_fuse_leaves_its_input_trainable():
    model = small_net()
    gm = _adapted(model)
    snap = snapshot(gm)
    fused = fuse(gm)
    assert_unchanged(gm, snap)
    assert fxtune.trainable_parameters(fused) == []
    assert not any(k.startswith("fxtune") for k in fused.state_dict())
    # the input still trains, and training it does not reach the fused copy
    fused_snap = snapshot(fused)
    params = fxtune.trainable_parameters(gm)
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.SGD(params, lr=0.1)
    gm(torch.randn(2, 3, 16, 16)).square().mean().backward()
    opt.step()
    assert_unchanged(fused, fused_snap)


@pytest.mark.parametrize("form", ["weight", "activation"])
def test_shared_weight_fuses_once(form):
    """A module called twice with one shared adapter: the one weight gets the delta once."""
    model = Twice().eval()
    gm = lora(fxtune.trace(model), ["fc", "fc@1"], r=3, form=form)
    assert set(lora_slots(gm)) == {"fc"}
    randomize_lora(gm, std=0.2)
    ref = lora_reference(model, gm, 1.0)
    x = torch.randn(4, 8)
    fused = fuse(gm)
    with torch.no_grad():
        assert rel_err(model(x), ref(x.double())) > 1e-2
        assert rel_err(gm(x), ref(x.double())) < 1e-5
        assert rel_err(fused(x), ref(x.double())) < 1e-5
    assert fused.code == fxtune.trace(model).code
    fresh = Twice()
    fresh.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert rel_err(fresh(x), ref(x.double())) < 1e-5


def test_fuse_folds_in_float32_for_half_models():
    """A bfloat16 model: W' is computed in float32 and cast once, so it is the rounded fp64 value."""
    model = copy.deepcopy(small_net()).to(torch.bfloat16)
    gm = lora(fxtune.trace(model), ["tok", "fc"], r=2, form="weight")
    randomize_lora(gm, std=0.05)
    fused = fuse(gm)
    ref = lora_reference(model, gm, 1.0)
    for name in ("tok", "fc"):
        w = fused.get_submodule(name).weight
        assert w.dtype == torch.bfloat16
        assert torch.equal(w, ref.get_submodule(name).weight.to(torch.bfloat16)), name


def test_lora_fuse_lora_fuse_chain():
    """Passes chain: a second LoRA on the fused model adds its delta on top of the first."""
    model = small_net()
    x = torch.randn(2, 3, 16, 16)
    first = _adapted(model, "activation")
    second = lora(fuse(first), r=2, form="weight")
    randomize_lora(second, std=0.05, seed=9)
    ref = lora_reference(model, first, 1.0)
    with torch.no_grad():
        for path, slot in lora_slots(second).items():
            w = ref.get_submodule(path).weight
            w.add_(lora_delta64(slot, w.shape, 1.0))
        assert rel_err(second(x), ref(x.double())) < 1e-5
        assert rel_err(fuse(second)(x), ref(x.double())) < 1e-5
    assert fuse(second).code == fxtune.trace(model).code
