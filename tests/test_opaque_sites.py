"""Layers that are not exactly their plain op are adapted through their parameters, never rewritten.

A Conv2d subclass with its own forward (timm's Conv2dSame pads dynamically, StdConv2d standardises
its weight, QAT modules fake-quantise it) kept opaque with `leaf_modules=` used to be rewritten as a
plain conv: a silently wrong output. Now such a module is called as itself on the adapted
parameter (torch.func.functional_call), which is exact for any module; layers inside a leaf module
(nn.TransformerEncoderLayer) are sites the same way. The references below call the user's own
module on W + s·B@A, written out here.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.func import functional_call

import fxtune
from fxtune.passes import fuse, lora

BASES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def _own_forward_classes() -> list[tuple[type, type]]:
    """(base, subclass) for every Linear/Conv/Embedding subclass in torch, torchvision and timm that
    replaces its base's forward (or _conv_forward)."""
    import torch.ao.nn.intrinsic.qat  # noqa: F401
    import torch.ao.nn.qat  # noqa: F401
    import torch.ao.nn.quantized.reference  # noqa: F401

    for package in (torchvision, timm):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            try:
                importlib.import_module(info.name)
            except Exception:  # optional dependencies of datasets etc.; their layers are not needed
                pass
    found = {}
    for base in BASES:
        for sub in _subclasses(base):
            overrides = any(getattr(sub, n, None) is not getattr(base, n, None) for n in ("forward", "_conv_forward"))
            if overrides and sub.__module__.partition(".")[0] in ("torch", "torchvision", "timm"):
                found.setdefault(sub, base)
    return sorted(((b, s) for s, b in found.items()), key=lambda p: f"{p[1].__module__}.{p[1].__qualname__}")


OWN_FORWARD = _own_forward_classes()


def _build(base: type, cls: type) -> tuple[nn.Module, torch.Tensor]:
    """An instance of `cls` (small sizes, a QAT qconfig where it takes one) and an input for it, the same
    whatever ran before (a random draw could make a QAT batch-norm layer output NaN, hiding a column)."""
    torch.manual_seed(0)
    q = torch.ao.quantization
    qconfig = {nn.Embedding: q.default_embedding_qat_qconfig}.get(base, q.get_default_qat_qconfig("fbgemm"))
    if "dynamic" in cls.__module__:
        qconfig = q.default_dynamic_qat_qconfig
    extra = {"qconfig": qconfig} if "qconfig" in cls.__init__.__code__.co_varnames else {}
    if base is nn.Embedding:
        return cls(20, 6, **extra), torch.randint(0, 20, (2, 5))
    if base is nn.Linear:
        return cls(6, 5, **extra), torch.randn(3, 6)
    dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[base]
    return cls(4, 6, 3, stride=2, **extra), torch.randn(2, 4, *([9] * dims))


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Observers (QAT modules) see one batch, then stop, so the module is a fixed function."""
    model.train()
    with torch.no_grad():
        model(x)
    model.apply(torch.ao.quantization.disable_observer)
    return model.eval()


def _randomize(gm: nn.Module, seed: int = 0) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in fxtune.trainable_parameters(gm):
            p.normal_(0, 0.3)


def _lora_weights(model: nn.Module, gm: nn.Module, scale: float) -> dict[str, torch.Tensor]:
    """{parameter path: W + s·B@A} for every adapted weight, from the slots' tensors."""
    out = {}
    for target, slot in gm.fxtune.default.named_children():
        path = next(s.target for s in fxtune.sites(gm) if s.target.replace(".", "_") == target)
        weight = model.get_submodule(path).weight.detach()
        b, a = slot.lora_b.flatten(1), slot.lora_a.flatten(1)
        if isinstance(model.get_submodule(path), nn.Embedding):  # adapters see a table transposed: (W.t() + s·B@A).t()
            out[f"{path}.weight"] = torch.addmm(weight.t(), b, a, alpha=scale).t()
        else:  # W + s·B@A in one fused multiply-add, as exactly as fxtune computes it (bitwise-equal outputs)
            out[f"{path}.weight"] = torch.addmm(weight.reshape(weight.shape[0], -1), b, a, alpha=scale).view(weight.shape)
    return out


@pytest.mark.parametrize("base,cls", OWN_FORWARD, ids=lambda v: getattr(v, "__qualname__", str(v)))
def test_every_layer_with_its_own_forward_is_adapted_exactly(base, cls):
    try:
        layer, x = _build(base, cls)
    except Exception as exc:  # a layer that needs arguments the sweep cannot guess
        pytest.skip(f"cannot build {cls.__qualname__} with small default arguments: {exc}")
    model = _calibrated(nn.Sequential(layer), x)
    before = copy.deepcopy(model.state_dict())
    gm = lora(fxtune.trace(model, leaf_modules=[cls]), r=2, alpha=4)
    (site,) = fxtune.sites(gm)
    assert site.call == "opaque" and site.name == "0"
    _randomize(gm)
    reference = functional_call(model, _lora_weights(model, gm, scale=2.0), (x,))
    assert torch.isfinite(reference).all()
    with torch.no_grad():
        assert torch.equal(gm(x), reference)
        fused = fuse(gm)
        assert fused.code == fxtune.trace(model, leaf_modules=[cls]).code
        torch.testing.assert_close(fused(x), reference, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor))


def test_conv2d_same_kept_opaque_matches_its_reference_in_every_form():
    """The reproduction: Conv2dSame as a leaf, B = 0 at init, must give the model's output exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(timm.layers.Conv2dSame(3, 8, 3, stride=2), nn.AdaptiveAvgPool2d(1)).eval()
    x = torch.randn(2, 3, 17, 19)
    for form in ("weight", "activation", "auto"):
        gm = lora(fxtune.trace(model, leaf_modules=[timm.layers.Conv2dSame]), r=2, form=form)
        assert torch.equal(gm(x), model(x))
        reason = "" if form == "weight" else " (Conv2dSame has its own forward)"
        assert f"default:lora[weight]{reason}  " in fxtune.summary(gm)


def test_timm_mobilenet_with_same_padding_against_float64():
    torch.manual_seed(0)
    model = timm.create_model("tf_mobilenetv3_small_minimal_100", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    gm = lora(fxtune.trace(model, leaf_modules=[timm.layers.Conv2dSame]), r=2)
    assert fxtune.coverage(model, gm).complete
    assert {s.call for s in fxtune.sites(gm) if isinstance(s.module, timm.layers.Conv2dSame)} == {"opaque"}
    _randomize(gm)
    weights = {k: v.double() for k, v in _lora_weights(model, gm, scale=1.0).items()}
    reference = functional_call(copy.deepcopy(model).double(), weights, (x.double(),))
    with torch.no_grad():
        y = gm(x)
    assert (y.double() - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_layers_inside_a_leaf_module_are_sites_and_fuse_exactly():
    torch.manual_seed(0)
    layer = lambda: nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)  # noqa: E731
    model = nn.Sequential(layer(), layer(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 5, 16)
    gm = fxtune.trace(model)
    assert fxtune.coverage(model, gm).complete
    names = [s.name for s in fxtune.sites(gm)]
    assert names[:6] == ["0.self_attn.q", "0.self_attn.k", "0.self_attn.v", "0.self_attn.out_proj", "0.linear1", "0.linear2"]
    adapted = lora(gm, r=2)
    assert "default:lora[weight] (inside TransformerEncoderLayer '0', called as a whole)" in fxtune.summary(adapted)
    _randomize(adapted)
    scale, weights = 1.0, {}
    for site in fxtune.sites(adapted):
        slot = getattr(adapted.fxtune.default, site.target.replace(".", "_"))
        module = model.get_submodule(site.own.owner)
        full = getattr(module, site.own.param).detach().double()
        rows = slice(*site.own.rows) if site.own.rows else slice(None)
        delta = scale * (slot.lora_b.double().flatten(1) @ slot.lora_a.double().flatten(1))
        key = f"{site.own.owner}.{site.own.param}"
        current = weights.get(key, full).clone()
        current[rows] = current[rows] + delta.view(current[rows].shape)
        weights[key] = current
    with torch.no_grad():
        reference = functional_call(copy.deepcopy(model).double(), weights, (x.double(),))
        y = adapted(x)
        assert (y.double() - reference).abs().max() <= 1e-5 * reference.abs().max()
        fused = fuse(adapted)
        assert fused.code == gm.code
        torch.testing.assert_close(fused(x), y, rtol=1e-5, atol=1e-5)
        fresh = copy.deepcopy(model)
        fresh.load_state_dict(fused.state_dict())
        torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-5)


def test_a_layer_with_hooks_is_opaque():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).eval()
    model[0].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    x = torch.randn(3, 4)
    gm = lora(fxtune.trace(model, leaf_modules=[nn.Linear]), r=2)
    assert [(s.name, s.call) for s in fxtune.sites(gm)] == [("0", "opaque"), ("1", "module")]
    _randomize(gm)
    assert torch.equal(gm(x), functional_call(model, _lora_weights(model, gm, scale=1.0), (x,)))
