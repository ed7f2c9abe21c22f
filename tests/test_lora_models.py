"""LoRA on every site of real models, both forms, against a float64 eager reference.

The reference is a float64 deepcopy of the user's model whose weights are replaced by
W + s·(B.flatten(1) @ A.flatten(1)).view(W.shape), computed in the test.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxtune
from core_helpers import (
    MODEL_BUILDERS,
    assert_unchanged,
    expected_lora_numel,
    frozen,
    lora_reference,
    lora_scale,
    lora_slots,
    randomize_lora,
    rel_err,
    small_net,
    snapshot,
    vision_model,
)
from fxtune.passes import fuse, lora

# small test layers: r close to their size on purpose
pytestmark = pytest.mark.filterwarnings("ignore::fxtune.FxtuneWarning")

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
FAST_MODELS = ["small", "resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf"]
SLOW_MODELS = [n for n in MODEL_BUILDERS if n not in FAST_MODELS]


def _build(name: str, seed: int = 0) -> nn.Module:
    return small_net(seed) if name == "small" else vision_model(name, seed)


def _input(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (2, 3, 16, 16) if name == "small" else (2, 3, 64, 64)
    return torch.randn(shape, generator=g)


def _check_lora_then_fuse(name: str, form: str, *, r: int = 4, alpha=None, rslora: bool = False) -> None:
    model = _build(name)
    x = _input(name)
    model_snap = snapshot(model)
    traced_code = fxtune.trace(model).code
    gm = fxtune.trace(model)
    gm_snap = snapshot(gm)

    adapted = lora(gm, r=r, alpha=alpha, rslora=rslora, form=form)
    assert adapted is not gm
    assert_unchanged(gm, gm_snap)
    assert_unchanged(model, model_snap)
    with torch.no_grad():
        assert torch.equal(gm(x), frozen(model)(x))  # the input GraphModule is still usable and the same

    # every supported layer of the model is a site and got an adapter in PEFT's layout
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SUPPORTED)}
    slots = lora_slots(adapted)
    assert set(slots) == set(layers)
    for path, slot in slots.items():
        w = layers[path].weight
        assert tuple(slot.lora_a.shape) == (r, *w.shape[1:])
        assert tuple(slot.lora_b.shape) == (w.shape[0], r, *([1] * (w.dim() - 2)))
        assert slot.lora_a.numel() + slot.lora_b.numel() == expected_lora_numel(layers[path], r)

    randomize_lora(adapted, std=0.05, seed=3)
    scale = lora_scale(r, alpha, rslora)
    ref = lora_reference(model, adapted, scale)
    with torch.no_grad():
        expected = ref(x.double())
        base = model(x)
        got = adapted(x)
    assert rel_err(base, expected) > 1e-2, "adapters too small for a meaningful comparison"
    assert rel_err(got, expected) < 1e-5
    assert_unchanged(model, model_snap)

    adapted_snap = snapshot(adapted)
    fused = fuse(adapted)
    assert_unchanged(adapted, adapted_snap)
    assert_unchanged(model, model_snap)
    with torch.no_grad():
        assert rel_err(fused(x), expected) < 1e-5
    assert fused.code == traced_code

    # the fused state_dict is the user's model's, and loads into a fresh instance of its class
    state = fused.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fresh = _build(name, seed=123)
    fresh.load_state_dict(state)
    # fused parameters are frozen; torch picks another (bitwise different) F.linear path for
    # 3-D inputs when the weight requires grad, so compare like with like
    fresh.eval().requires_grad_(False)
    with torch.no_grad():
        assert torch.equal(fresh(x), fused(x))
        assert rel_err(fresh(x), expected) < 1e-5
    assert_unchanged(model, model_snap)


@pytest.mark.parametrize("form", ["weight", "activation"])
@pytest.mark.parametrize("name", FAST_MODELS)
def test_lora_every_site_matches_fp64_reference(name, form):
    _check_lora_then_fuse(name, form)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["weight", "activation"])
@pytest.mark.parametrize("name", SLOW_MODELS)
def test_lora_every_site_matches_fp64_reference_slow(name, form):
    _check_lora_then_fuse(name, form)


@pytest.mark.parametrize("form", ["weight", "activation"])
@pytest.mark.parametrize("alpha,rslora", [(12.0, False), (6.0, True)])
def test_lora_scale_alpha_and_rslora(form, alpha, rslora):
    """scale = alpha/r, or alpha/sqrt(r) with rslora; a scale != 1 takes another code path."""
    _check_lora_then_fuse("small", form, r=3, alpha=alpha, rslora=rslora)


@pytest.mark.parametrize("form", ["weight", "activation"])
def test_lora_subset_and_unadapted_sites_untouched(form):
    """Adapting layer4 only: the other sites compute exactly what they did."""
    model = vision_model("resnet18")
    x = _input("resnet18")
    adapted = lora(fxtune.trace(model), "layer4.*", r=2, form=form)
    assert set(lora_slots(adapted)) == {n for n, m in model.named_modules() if n.startswith("layer4.") and isinstance(m, SUPPORTED)}
    randomize_lora(adapted, std=0.05)
    ref = lora_reference(model, adapted, 1.0)
    with torch.no_grad():
        assert rel_err(adapted(x), ref(x.double())) < 1e-5
    fused = fuse(adapted)
    for name, p in model.named_parameters():
        if not name.startswith("layer4."):
            assert torch.equal(fused.get_parameter(name), p)


# ----------------------------------------------------------------------------- random conv geometry

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def conv_layers(draw):
    dim = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    if draw(st.booleans()):  # depthwise
        groups, cout = cin, cin * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.sampled_from([0, 1, 2] + (["same"] if stride == 1 else [])))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    return CONVS[dim](cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias, padding_mode=mode)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv=conv_layers(), r=st.integers(1, 3), form=st.sampled_from(["weight", "activation"]), seed=st.integers(0, 2**16))
def test_lora_any_conv_geometry(conv, r, form, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(conv).eval()
    dim = conv.weight.dim() - 2
    x = torch.randn(2, conv.in_channels, *([7] * dim))
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtune.FxtuneWarning)
        gm = lora(fxtune.trace(model), r=r, form=form)
    randomize_lora(gm, std=0.2, seed=seed)
    ref = lora_reference(model, gm, 1.0)
    with torch.no_grad():
        expected = ref(x.double())
        assert rel_err(gm(x), expected) < 1e-5
        fused = fuse(gm)
        assert rel_err(fused(x), expected) < 1e-5
    assert fused.code == fxtune.trace(model).code
    assert_unchanged(model, snap)
