"""fold_bn: inference BatchNorms folded into the convs before them, checked against the float64 eager model."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import fxtune
from fxtune import FxtuneWarning, StructureError
from fxtune.passes import fold_bn, fuse, lora, low_rank

from core_helpers import assert_unchanged, snapshot


def randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the (0, 1) defaults, so folding is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) * 2 - 1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) * 2 + 0.25)
                if mod.affine:
                    mod.weight.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                    mod.bias.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
    return model.eval()


class Convs(nn.Module):
    """Every conv kind followed by its BatchNorm: 1d, grouped+dilated+reflect 2d with bias, depthwise, 3d without affine."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.n1 = nn.BatchNorm1d(8)
        self.c2 = nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2, padding_mode="reflect")
        self.n2 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.ndw = nn.BatchNorm2d(8, eps=1e-3)
        self.c3 = nn.Conv3d(2, 4, (1, 3, 3), stride=(1, 2, 2), bias=False)
        self.n3 = nn.BatchNorm3d(4, affine=False)

    def forward(self, a, b, c):
        u = self.n1(self.c1(a))
        v = self.ndw(self.dw(torch.relu(self.n2(self.c2(b)))))
        w = self.n3(self.c3(c))
        return u.sum(-1), v.flatten(1).sum(-1), w.flatten(1).sum(-1)


def inputs(seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 10, generator=g), torch.randn(2, 4, 9, 9, generator=g), torch.randn(2, 2, 3, 8, 8, generator=g)


def test_folded_convs_compute_the_float64_eager_model():
    model = randomize_statistics(Convs())
    gm = fxtune.trace(model).eval()
    before_model, before_gm = snapshot(model), snapshot(gm)
    folded = fold_bn(gm)
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        got = folded(*inputs())
        expected = reference(*(t.double() for t in inputs()))
    for y, ref in zip(got, expected):
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert "self.n1" not in folded.code and "self.c1(a)" in folded.code
    assert_unchanged(model, before_model)
    assert_unchanged(gm, before_gm)


def test_folded_weight_and_bias_follow_the_formula():
    model = randomize_statistics(Convs(), seed=3)
    folded = fold_bn(fxtune.trace(model).eval(), ["c2", "c3"])
    for conv, norm in ((model.c2, model.n2), (model.c3, model.n3)):
        mean, var = norm.running_mean.double(), norm.running_var.double()
        gamma = norm.weight.double() if norm.affine else torch.ones_like(mean)
        beta = norm.bias.double() if norm.affine else torch.zeros_like(mean)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + norm.eps)
        new = folded.get_submodule("c2" if conv is model.c2 else "c3")
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        torch.testing.assert_close(new.weight.double(), conv.weight.double() * scale.view(shape), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(new.bias.double(), (bias - mean) * scale + beta, rtol=1e-6, atol=1e-7)
        assert new.weight.dtype == conv.weight.dtype and not new.weight.requires_grad
    assert isinstance(folded.get_submodule("n1"), nn.BatchNorm1d)  # not selected: left as it was


def test_training_mode_is_refused_and_nothing_changes():
    model = randomize_statistics(Convs()).train()
    gm = fxtune.trace(model)
    before = snapshot(gm)
    with pytest.raises(StructureError, match=r"'n1' \(after 'c1'\) is in training mode.*gm.eval\(\)"):
        fold_bn(gm)
    assert_unchanged(gm, before)


class Branchy(nn.Module):
    """c1's output is read by its BatchNorm and by the sum; n2 keeps no statistics; c3 is called twice."""

    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.c2, self.n2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
        self.c3, self.n3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.c1(x)
        z = self.n1(y) + y + self.n2(self.c2(x))
        return self.n3(self.c3(z)) + self.c3(z)


def test_unfoldable_batchnorms_are_reported_and_left():
    model = randomize_statistics(Branchy())
    gm = fxtune.trace(model).eval()
    with pytest.raises(StructureError) as info:
        fold_bn(gm)
    message = str(info.value)
    assert "'c1': its output is also read by" in message
    assert "'c2': 'n2' keeps no running statistics" in message
    assert "'c3' is called 2 times" in message


def test_partial_folding_warns_and_keeps_the_rest_exact():
    model = randomize_statistics(nn.Sequential(Branchy(), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)))
    gm = fxtune.trace(model).eval()
    with pytest.warns(FxtuneWarning, match=r"fold_bn left 3 BatchNorm\(s\) unfolded"):
        folded = fold_bn(gm)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert "self.2" not in folded.code and isinstance(folded.get_submodule("0.n1"), nn.BatchNorm2d)


def test_sites_without_a_batchnorm_are_no_candidates():
    gm = fxtune.trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())).eval()
    with pytest.raises(StructureError, match="followed by a foldable BatchNorm; the graph calls no BatchNorm module"):
        fold_bn(gm)
    gm = fxtune.trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4))).eval()
    with pytest.raises(StructureError, match="no selected conv site's output goes straight into a BatchNorm"):
        fold_bn(gm)


def test_adapted_sites_must_be_fused_first():
    model = randomize_statistics(Convs())
    adapted = lora(fxtune.trace(model).eval(), "c1", r=2)
    with pytest.raises(StructureError, match="carries adapters.*fuse"):
        fold_bn(adapted, "c1")
    fused = fold_bn(fuse(adapted).eval(), "c1")
    assert "self.n1" not in fused.code


def test_resnet18_folds_every_batchnorm_and_composes_with_low_rank_and_lora():
    model = randomize_statistics(torchvision.models.resnet18(weights=None))
    before = snapshot(model)
    gm = fxtune.trace(model).eval()
    folded = fold_bn(gm)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double()).float()
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4)
    kept = [k for k in model.state_dict() if "bn" not in k and "downsample.1" not in k]
    assert sorted(folded.state_dict()) == sorted(kept + [k.replace(".weight", ".bias") for k in kept if "conv" in k or "downsample.0" in k])
    assert fxtune.trainable_parameters(folded) == []
    exact = low_rank(folded, rank=10_000, force=True)  # full rank: the same function
    with torch.no_grad():
        torch.testing.assert_close(exact(x), folded(x), rtol=1e-4, atol=1e-4)
    tuned = lora(folded, "layer4.*", r=4)
    assert len(fxtune.trainable_parameters(tuned)) == 2 * 5
    assert_unchanged(model, before)


def test_structural_passes_in_a_row_keep_earlier_factors_trainable_on_copies():
    model = randomize_statistics(Convs())
    gm = fxtune.trace(model).eval()
    first = low_rank(gm, "c2", rank=2)
    second = low_rank(first, "c3", rank=1)
    assert sorted(n for n, p in second.named_parameters() if p.requires_grad) == ["c2.0.weight", "c2.1.weight", "c3.0.weight", "c3.1.weight"]
    assert len(fxtune.trainable_parameters(second)) == 4
    before = snapshot(first)
    opt = torch.optim.SGD(fxtune.trainable_parameters(second), lr=0.1)
    sum(y.square().sum() for y in second(*inputs())).backward()
    opt.step()
    assert_unchanged(first, before)  # the copies trained, not the earlier result's factors
    folded = fold_bn(first, "c2.1")  # the second factor takes the BatchNorm: a new, frozen conv
    assert [n for n, p in folded.named_parameters() if p.requires_grad] == ["c2.0.weight"]
    assert folded.meta["fxtune_trainable"] == ("c2.0.weight",)
    with torch.no_grad():
        for y, ref in zip(folded(*inputs()), first(*inputs())):
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
