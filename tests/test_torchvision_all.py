"""Every torchvision classification model: trace, LoRA on every site, fuse, against a float64 reference.

The reference is a float64 deepcopy of the model whose weights W are replaced by W + s·B@A,
located by `site_helpers.location` (module weights, q/k/v rows of MultiheadAttention's
in_proj_weight), with no call into fxtune. Coverage must be every Linear/Conv weight and every
attention projection the graph uses; the only unused weights are the auxiliary classifiers of
googlenet and inception_v3, which run in training mode only.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torchvision
from torch import nn

import fxtune
from fxtune.passes import fuse, lora
from site_helpers import canonical64, lora64, randomize, reference, rel_err, slots

pytestmark = pytest.mark.filterwarnings("ignore::fxtune.FxtuneWarning", "ignore::UserWarning")

MODELS = torchvision.models.list_models(module=torchvision.models)

# The smallest input each model accepts (most fit 32×32); ViTs get a small image_size (4 patches).
VIT_SIZES = {"vit_b_16": 32, "vit_b_32": 64, "vit_l_16": 32, "vit_l_32": 64, "vit_h_14": 28}
SIZES = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224, **{n: 64 for n in MODELS if n.startswith("swin")}, **VIT_SIZES}
BUILD = {
    **{n: {"image_size": size} for n, size in VIT_SIZES.items()},
    "googlenet": {"init_weights": False}, "inception_v3": {"init_weights": False},
}
AUX = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}
# PyTorch's default conv init shrinks activations layer by layer; these models (no BatchNorm-friendly
# init of their own) then compute nearly the same output for any weights, which would test nothing.
RESCALED = ("googlenet", "inception_v3", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0")
# Run by default: one or two of every family (~45 s on one core); the rest are marked slow.
FAST = [
    "alexnet", "squeezenet1_1", "shufflenet_v2_x0_5", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_large",
    "regnet_x_400mf", "regnet_y_400mf", "efficientnet_b0", "efficientnet_v2_s", "resnet18", "resnext50_32x4d",
    "wide_resnet50_2", "googlenet", "inception_v3", "densenet121", "vgg11", "convnext_tiny", "swin_t", "swin_v2_t",
    "maxvit_t", "vit_b_16", "vit_b_32",
]


def build(name: str, seed: int = 0) -> nn.Module:
    """Random weights; the RESCALED models get variance-preserving (He) conv weights, ViTs a random
    head (torchvision initialises it to zeros, so every output would be 0)."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, **BUILD.get(name, {})).eval()
    if name in VIT_SIZES:
        nn.init.normal_(model.heads.head.weight, std=0.02)
    if name in RESCALED:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


def example(name: str) -> torch.Tensor:
    size = SIZES.get(name, 32)
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def fingerprint(model: nn.Module) -> dict:
    """What fxtune must not change in the user's model, without cloning it (some weigh gigabytes):
    each tensor's storage, version counter (bumped by in-place writes), dtype, shape and float64 sums."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {
        k: (t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.requires_grad, float(t.sum(dtype=torch.float64)),
            float(torch.linalg.vector_norm(t, dtype=torch.float64)) if t.is_floating_point() else 0.0)
        for k, t in tensors.items()
    }


def check_model(name: str) -> fxtune.Coverage:
    """Trace, check coverage, LoRA (r=2) on every site with random A and B, fuse; compare to float64."""
    torch.set_num_threads(1)
    model = build(name)
    x = example(name)
    before = fingerprint(model)
    gm = fxtune.trace(model)
    traced_code = gm.code

    found = fxtune.coverage(model, gm)
    assert found.complete, str(found)
    assert all(u.startswith(AUX.get(name, ())) for u in found.unused), found.unused
    assert bool(found.unused) == (name in AUX)

    adapted = lora(gm, r=2)
    assert set(slots(adapted)) == {s.target for s in fxtune.sites(gm)}
    assert len(slots(adapted)) == len(found.found)
    randomize(adapted, std=0.05, seed=3)
    with torch.no_grad():
        got = adapted(x)
        fused = fuse(adapted)
        got_fused = fused(x)
    assert fused.code == traced_code
    del fused, gm
    gc.collect()
    ref = reference(model, adapted, lora64)
    with torch.no_grad():
        expected = ref(x.double())
        base = model(x)
    del ref
    gc.collect()
    assert rel_err(base, expected) > 1e-3, "adapters too small for a meaningful comparison"
    assert rel_err(got, expected) < 1e-4
    assert rel_err(got_fused, expected) < 1e-4
    assert fingerprint(model) == before
    return found


@pytest.mark.parametrize("name", FAST)
def test_every_site_lora_then_fuse(name):
    check_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in MODELS if n not in FAST])
def test_every_site_lora_then_fuse_slow(name):
    check_model(name)


def test_every_model_is_listed():
    """The default and slow lists together are torchvision's classification models, nothing dropped."""
    assert set(FAST) <= set(MODELS) and len(MODELS) >= 80


@pytest.mark.parametrize("letter", ["q", "k", "v"])
def test_vit_q_k_v_adapted_separately_match_hand_written_rows(letter):
    """LoRA on only the q (k, v) projections of vit_b_16: equal to changing only those rows of in_proj_weight."""
    model = build("vit_b_16")
    x = example("vit_b_16")
    adapted = lora(fxtune.trace(model), f"*.self_attention.{letter}", r=2)
    targets = sorted(slots(adapted))
    assert len(targets) == 12 and all(t.endswith(f".self_attention.{letter}") for t in targets)
    randomize(adapted, std=0.05, seed=4)
    ref = build("vit_b_16").double()
    e = 768
    rows = slice("qkv".index(letter) * e, ("qkv".index(letter) + 1) * e)
    with torch.no_grad():
        for target, slot in slots(adapted).items():
            mha = ref.get_submodule(target.rpartition(".")[0])
            w = model.get_submodule(target.rpartition(".")[0]).in_proj_weight.detach().double()
            delta = slot.config["scale"] * (slot.lora_b.double() @ slot.lora_a.double())
            mha.in_proj_weight[rows] = w[rows] + delta
            assert torch.equal(canonical64(model, target), w[rows])
        expected = ref(x.double())
        assert rel_err(model(x), expected) > 1e-3
        assert rel_err(adapted(x), expected) < 1e-4
        assert rel_err(fuse(adapted)(x), expected) < 1e-4
