"""prune on adapted GraphModules: adapters are sliced as their kinds declare, so fusing after pruning equals
pruning after fusing; kinds that declare nothing are refused; compensation folds constants into biases."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxtune
from fxtune import channel_groups
from fxtune.passes import dora, fold_bn, fuse, ia3, lora, slice_delta, sp_lopa, sp_lora, sp_para
from fxtune.passes import prune
from fxtune.passes.prune import PruneReport

import prune_nets as nets
from core_helpers import assert_unchanged, snapshot
from prune_nets import gone, random_keep, zeroed

X = torch.randn(2, 3, 16, 16)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = nets.randomize(torchvision.models.resnet18(num_classes=10))
    gm = fxtune.trace(model)
    groups = channel_groups(gm, example_inputs=(X,))
    masks = {g.name: random_keep(g.units, 0.5, seed=i)[g.channel_units] for i, g in enumerate(groups) if g.prunable}
    return model, gm, masks


def trained(gm: nn.Module) -> nn.Module:
    """Adapter tensors moved away from their initial values, as training would."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.startswith("fxtune."):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return gm


@pytest.mark.parametrize("name, adapt", [
    ("lora activation form", lambda g: lora(g, targets="layer*", r=4)),
    ("lora weight form", lambda g: lora(g, targets="layer*", r=4, form="weight")),
    ("dora on rows only", lambda g: dora(g, targets=["conv1"], r=4)),
    ("ia3 output", lambda g: ia3(g, targets="layer*")),
    ("ia3 input", lambda g: ia3(g, targets="layer*", position="input")),
    ("sp_lora", lambda g: sp_lora(g, targets="layer*", r=4)),
    ("sp_para", lambda g: sp_para(g, targets="layer*")),
])
def test_fusing_after_pruning_equals_pruning_after_fusing(resnet, name, adapt):
    model, gm, masks = resnet
    adapted = trained(adapt(gm))
    before = snapshot(adapted)
    pruned_then_fused = fuse(prune(adapted, masks=masks, example_inputs=(X,)))
    fused_then_pruned = prune(fuse(adapted), masks=masks, example_inputs=(X,))
    one, two = pruned_then_fused.state_dict(), fused_then_pruned.state_dict()
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pruned_then_fused(X), fused_then_pruned(X))
    assert_unchanged(adapted, before)


def test_pruned_adapters_keep_training_and_show_in_the_summary(resnet):
    _, gm, masks = resnet
    pruned = prune(lora(gm, targets="layer4.*", r=4), masks=masks, example_inputs=(X,))
    slot = pruned.fxtune.default.layer4_0_conv1
    assert slot.lora_a.shape[1] == pruned.layer4[0].conv1.in_channels and slot.lora_b.shape[0] == pruned.layer4[0].conv1.out_channels
    params = fxtune.trainable_parameters(pruned)
    assert params and all(p.requires_grad for p in params)
    pruned(X).sum().backward()
    assert slot.lora_b.grad is not None
    assert "default:lora" in fxtune.summary(pruned)


def test_kinds_that_cannot_be_sliced_are_refused_with_fuse_first(resnet):
    _, gm, masks = resnet
    for adapted, message in (
        (slice_delta(gm, targets="layer1.*"), "slice_delta.*does not declare how its tensors follow channels.*fuse it first"),
        (dora(gm, targets=["fc"], r=2), "dora.*'lora_a' depends on the in_group channels but cannot be sliced.*fuse it first"),
    ):
        with pytest.raises(fxtune.StructureError, match=message):
            prune(adapted, masks=masks, example_inputs=(X,))


def test_only_a_replaced_base_weight_is_refused_not_other_fxtune_records(resnet):
    """PiSSA keeps the traced weight to restore it: refused. A hotswap-prepared GraphModule keeps a record on
    its root too, which says nothing about its weights: it prunes like the graph it was prepared from."""
    _, gm, masks = resnet
    with pytest.raises(fxtune.StructureError, match="replaced the base weight of 'fc'"):
        prune(lora(gm, targets=["fc"], r=2, init="pissa"), masks=masks, example_inputs=(X,))
    adapted = trained(lora(lora(gm, targets=["fc"], r=2, adapter="a"), targets=["fc"], r=2, adapter="b"))
    live = fxtune.prepare_hotswap(adapted, ["a", "b"])  # the live adapter holds a's values, b is stored inactive
    only_a = fxtune.set_active(adapted, "a")
    torch.testing.assert_close(prune(live, masks=masks, example_inputs=(X,))(X), prune(only_a, masks=masks, example_inputs=(X,))(X))


def test_splopa_blocks_follow_whole_channel_blocks_only():
    model = nets.randomize(nets.Residual())
    gm = sp_lopa(fxtune.trace(model), targets=["b"], r=1, num_prototypes=2, block=(2, 9))
    gm = trained(gm)
    aligned = torch.tensor([True, True, False, False, True, True, True, True])  # rows 2, 3: one block of 2
    one = fuse(prune(gm, masks={"a": aligned}, example_inputs=(X,)))
    two = prune(fuse(gm), masks={"a": aligned}, example_inputs=(X,))
    torch.testing.assert_close(one.b.weight, two.b.weight)
    torch.testing.assert_close(one(X), two(X))
    with pytest.raises(fxtune.StructureError, match="some but not all of the 2 out channels"):
        prune(gm, masks={"a": torch.tensor([True, False] * 4)}, example_inputs=(X,))


def test_structured_pruning_adapters_end_to_end():
    """SPLoRA trained under masks, fused, pruned by the same masks, BatchNorm folded: the masked model, smaller."""
    model = nets.randomize(nets.Residual())
    gm = fxtune.trace(model)
    keep = random_keep(8, 0.5, seed=3)
    site_masks = channel_groups(gm, example_inputs=(X,)).site_masks({"a": keep})
    assert {k: sorted(v) for k, v in site_masks.items()} == {"a": ["out_mask"], "b": ["in_mask", "out_mask"], "fc": ["in_mask"]}
    assert all(torch.equal(m, keep) for v in site_masks.values() for m in v.values())
    adapted = sp_lora(gm, targets=["a", "b", "fc"], r=2, masks=site_masks)
    opt = torch.optim.SGD(fxtune.trainable_parameters(adapted), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        adapted(X).square().mean().backward()
        opt.step()
    fused = fuse(adapted)
    small = fold_bn(prune(fused, masks={"a": keep}, example_inputs=(X,)))
    masked = zeroed(fused, [(f"{n}.{t}", 0, gone(keep)) for n in ("bn_a", "bn_b") for t in ("weight", "bias")])
    torch.testing.assert_close(small(X), masked(X), rtol=1e-5, atol=1e-6)
    assert small.a.out_channels == 4 and not hasattr(small, "bn_a")


class ConstantNet(nn.Module):
    """a (3×3, padded) → BN → ReLU → b (1×1) → BN → ReLU → c (3×3, padded) → ReLU → mean → fc."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.c = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.bn_b(self.b(torch.relu(self.bn_a(self.a(x))))))
        return self.fc(torch.relu(self.c(h)).mean((2, 3)))


def test_compensation_equals_the_model_with_only_the_weights_zeroed_where_exact():
    model = nets.randomize(ConstantNet())
    gm = fxtune.trace(model)
    x = torch.randn(4, 3, 8, 8)
    keep_a, keep_c = random_keep(8, 0.5, seed=1), random_keep(6, 0.5, seed=2)
    before = snapshot(gm)
    pruned = prune(gm, masks={"a": keep_a, "c": keep_c}, compensate=True, example_inputs=(x,))
    weights_zeroed = zeroed(model, [("a.weight", 0, gone(keep_a)), ("c.weight", 0, gone(keep_c))])
    torch.testing.assert_close(pruned(x), weights_zeroed(x), rtol=1e-5, atol=1e-6)
    assert pruned.b.bias is not None  # b had none: the folded constant needed one
    report = PruneReport.of(pruned).compensation
    assert ("b", "a", "exact: 4 constant channel(s) folded into its bias") in report
    assert ("fc", "c", "exact: 3 constant channel(s) folded into its bias") in report
    assert_unchanged(gm, before)
    keep_b = random_keep(6, 0.5, seed=4)
    with pytest.warns(fxtune.FxtuneWarning, match="c \\(b\\): skipped: it pads with zeros"):
        pruned = prune(gm, masks={"b": keep_b}, compensate=True, example_inputs=(x,))
    assert any(row[:2] == ("c", "b") and "pads with zeros" in row[2] for row in PruneReport.of(pruned).compensation)
    plain = prune(gm, masks={"b": keep_b}, example_inputs=(x,))
    masked = zeroed(model, [("b.weight", 0, gone(keep_b)), ("bn_b.weight", 0, gone(keep_b)), ("bn_b.bias", 0, gone(keep_b))])
    torch.testing.assert_close(plain(x), masked(x), rtol=1e-5, atol=1e-6)
