"""low_rank: two-layer factorization of Linear/conv sites, checked against float64 SVDs done here.

Every expected value (singular values, truncated weights, outputs) is computed in this file in
float64 from the original weights; nothing calls fxtune to produce a reference.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxtune
from fxtune import FxtuneError, FxtuneWarning, StructureError
from fxtune.passes import fuse, lora, low_rank

from core_helpers import assert_unchanged, snapshot

low_rank_module = __import__("fxtune.passes.low_rank", fromlist=["TOLERANCE"])


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().double(), ref.detach().double()
    return float((y - ref).norm() / ref.norm())


def group_matrices(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(G, out/G, in/G·k) float64 views of a weight: the matrices the factorization works on."""
    return weight.detach().double().reshape(groups, weight.shape[0] // groups, -1)


def truncated64(weight: torch.Tensor, groups: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The test's own best rank-r approximation per group (float64), and each group's discarded σ²."""
    u, s, vh = torch.linalg.svd(group_matrices(weight, groups), full_matrices=False)
    approx = (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]
    return approx.reshape(weight.shape), s[..., r:].square().sum(-1)


def product64(pair: nn.Module, groups: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The weight the two factor layers compute together, per group B_g @ A_g, in float64."""
    first, second = pair[0].weight.detach().double(), pair[1].weight.detach().double()
    a = first.reshape(groups, first.shape[0] // groups, -1)
    b = second.reshape(groups, second.shape[0] // groups, -1)
    return (b @ a).reshape(shape)


def with_weight64(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A float64 copy of `module` computing with `weight` (same geometry): the reference layer."""
    ref = copy.deepcopy(module).double()
    ref.weight = nn.Parameter(weight.double())
    return ref


class Wrap(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class Net(nn.Module):
    """A conv, a depthwise conv, a pooled Linear, and an untouched head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 20)
        self.head = nn.Linear(20, 5)

    def forward(self, x):
        h = torch.relu(self.depthwise(torch.relu(self.conv(x))))
        return self.head(torch.relu(self.fc(h.mean((2, 3)))))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_factors_are_the_truncated_svd(bias):
    torch.manual_seed(0)
    layer = nn.Linear(40, 24, bias=bias)
    gm = low_rank(fxtune.trace(Wrap(layer)), rank=6, solver="exact")
    pair = gm.layer
    assert [type(m) for m in pair] == [nn.Linear, nn.Linear]
    assert (pair[0].in_features, pair[0].out_features, pair[0].bias) == (40, 6, None)
    assert (pair[1].in_features, pair[1].out_features) == (6, 24)
    assert torch.equal(pair[1].bias, layer.bias) if bias else pair[1].bias is None
    approx, discarded = truncated64(layer.weight, 1, 6)
    error = (product64(pair, 1, layer.weight.shape) - layer.weight.detach().double()).square().sum()
    assert float(error) == pytest.approx(float(discarded.sum()), rel=1e-5)
    assert sum(p.numel() for p in gm.parameters()) == 6 * (40 + 24) + (24 if bias else 0)
    x = torch.randn(7, 40)
    assert rel(gm(x), with_weight64(layer, approx)(x.double())) < 1e-5


CONVS = {
    "conv1d_stride": (lambda: nn.Conv1d(6, 8, 3, stride=2), (2, 6, 17)),
    "conv2d_grouped": (lambda: nn.Conv2d(12, 18, 3, padding=1, groups=3), (2, 12, 9, 9)),
    "conv2d_dilated": (lambda: nn.Conv2d(8, 16, 3, padding=2, dilation=2, bias=False), (2, 8, 11, 11)),
    "conv2d_reflect": (lambda: nn.Conv2d(8, 10, (3, 5), stride=(2, 1), padding=(1, 2), padding_mode="reflect"), (2, 8, 9, 10)),
    "conv2d_same": (lambda: nn.Conv2d(8, 8, 3, padding="same", dilation=2, padding_mode="circular"), (2, 8, 9, 9)),
    "conv3d_grouped": (lambda: nn.Conv3d(4, 6, 3, padding=1, stride=(1, 2, 2), groups=2), (2, 4, 5, 6, 6)),
}


@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv_factors_per_group(case):
    torch.manual_seed(1)
    make, shape = CONVS[case]
    conv = make()
    r, g = 2, conv.groups
    gm = low_rank(fxtune.trace(Wrap(conv)), rank=r, solver="exact")
    first, second = gm.layer
    assert type(first) is type(conv) and type(second) is type(conv)
    assert (first.in_channels, first.out_channels, first.groups, first.bias) == (conv.in_channels, g * r, g, None)
    for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
        assert getattr(first, attr) == getattr(conv, attr), attr
    assert (second.in_channels, second.out_channels, second.groups) == (g * r, conv.out_channels, g)
    assert set(second.kernel_size) == {1} and set(second.stride) == {1} and second.padding_mode == "zeros"
    m, n = conv.out_channels // g, conv.weight[0].numel()
    approx, discarded = truncated64(conv.weight, g, r)
    errors = (group_matrices(product64(gm.layer, g, conv.weight.shape), g) - group_matrices(conv.weight, g)).square().sum((1, 2))
    assert torch.allclose(errors, discarded, rtol=1e-5, atol=0)
    bias = conv.out_channels if conv.bias is not None else 0
    assert sum(p.numel() for p in gm.parameters()) == g * r * (n + m) + bias
    x = torch.randn(shape)
    assert rel(gm(x), with_weight64(conv, approx)(x.double())) < 1e-5


def test_own_rank_and_forced_full_rank_reproduce_the_layer():
    torch.manual_seed(2)
    linear = nn.Linear(32, 24)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(24, 3) @ torch.randn(3, 32))  # rank exactly 3
    gm = low_rank(fxtune.trace(Wrap(linear)), rank=3)
    x = torch.randn(5, 32)
    assert rel(gm(x), linear(x)) < 1e-5

    conv = nn.Conv2d(6, 9, 3, padding=1, groups=3)
    gm = low_rank(fxtune.trace(Wrap(conv)), rank=10_000, force=True)  # capped at full rank min(3, 18)
    assert gm.layer[0].out_channels == 3 * 3
    x = torch.randn(2, 6, 7, 7)
    assert rel(gm(x), conv(x)) < 1e-5


def test_float_rank_is_a_fraction_of_break_even():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(300, 200), nn.Unflatten(1, (8, 5, 5)), nn.Conv2d(8, 32, 3, groups=2))
    gm = low_rank(fxtune.trace(model), rank=0.5)
    even_linear = 200 * 300 / (200 + 300)
    m, n = 16, 4 * 9
    even_conv = m * n / (m + n)
    assert gm.get_submodule("0.0").out_features == math.floor(0.5 * even_linear)
    assert gm.get_submodule("2.0").out_channels == 2 * math.floor(0.5 * even_conv)


def test_round_to_gives_the_nearest_multiple_within_full_rank():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(300, 200), nn.Unflatten(1, (8, 5, 5)), nn.Conv2d(8, 32, 3, groups=2))
    with pytest.warns(fxtune.FxtuneWarning, match="'2': rank 16 × 2 group"):  # 16 = full rank saves nothing
        gm = low_rank(fxtune.trace(model), rank=0.5, round_to=16)
    assert gm.get_submodule("0.0").out_features == 64  # floor(0.5 · 120) = 60 → 64
    assert isinstance(gm.get_submodule("2"), nn.Conv2d)
    gm = low_rank(fxtune.trace(model), rank=0.5, round_to=4)
    assert gm.get_submodule("2.0").out_channels == 2 * 4  # floor(0.5 · 11.08) = 5 → 4 per group
    assert gm.get_submodule("0.0").out_features == 60
    assert low_rank(fxtune.trace(model), "0", rank=20, round_to=16).get_submodule("0.0").out_features == 16
    assert low_rank(fxtune.trace(model), "0", rank=0.5, round_to=512, force=True).get_submodule("0.0").out_features == 200
    for bad in (0, 2.0, True):
        with pytest.raises(StructureError, match="round_to"):
            low_rank(fxtune.trace(model), rank=0.5, round_to=bad)


def test_depthwise_is_skipped_and_reported_unless_forced():
    torch.manual_seed(4)
    model = Net().eval()
    traced = fxtune.trace(model)
    with pytest.warns(FxtuneWarning, match="'depthwise'"):
        gm = low_rank(traced, targets=["conv", "depthwise"], rank=0.5)
    assert isinstance(gm.conv, nn.Sequential) and type(gm.depthwise) is nn.Conv2d
    assert "self.depthwise(" in gm.code

    with pytest.raises(StructureError, match="'depthwise'") as info:
        low_rank(traced, targets="depthwise")
    assert isinstance(info.value, FxtuneError) and "force=True" in str(info.value)

    forced = low_rank(traced, targets="depthwise", force=True)
    assert (forced.depthwise[0].out_channels, forced.depthwise[0].groups) == (16, 16)
    x = torch.randn(2, 6, 8, 8)
    assert rel(forced(x), model(x)) < 1e-5


def test_code_and_diff_show_the_two_calls():
    traced = fxtune.trace(Wrap(nn.Linear(16, 12)))
    gm = low_rank(traced, rank=2)
    assert 'layer_0 = getattr(self.layer, "0")(x)' in gm.code
    assert 'layer = getattr(self.layer, "1")(layer_0)' in gm.code
    changed = [l for l in fxtune.diff(traced, gm).splitlines() if l[:1] in "+-" and l[:3] not in ("+++", "---")]
    removed = [l[1:].strip() for l in changed if l.startswith("-")]
    added = [l[1:].strip() for l in changed if l.startswith("+")]
    assert removed == ["layer = self.layer(x);  x = None"]
    assert added == ['layer_0 = getattr(self.layer, "0")(x);  x = None', 'layer = getattr(self.layer, "1")(layer_0);  layer_0 = None']
    tags = [n.meta["fxtune_structure"] for n in gm.graph.nodes if "fxtune_structure" in n.meta]
    assert [(t["site"], t["index"], t["rank"]) for t in tags] == [("layer", 0, 2), ("layer", 1, 2)]


def test_training_updates_only_the_factors_and_never_the_user_model():
    torch.manual_seed(5)
    model = Net().eval()
    before = snapshot(model)
    traced = fxtune.trace(model)
    traced_code = traced.code
    gm = low_rank(traced, targets=["conv", "fc"], rank=2)
    factors = {"conv.0.weight", "conv.1.weight", "fc.0.weight", "fc.1.weight"}
    named = dict(gm.named_parameters())
    assert {id(p) for p in fxtune.trainable_parameters(gm)} == {id(named[k]) for k in factors}
    start = {k: v.detach().clone() for k, v in gm.state_dict().items()}
    opt = torch.optim.AdamW(fxtune.trainable_parameters(gm), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        gm(torch.randn(4, 6, 8, 8)).square().mean().backward()
        opt.step()
    after = gm.state_dict()
    for key, value in start.items():
        assert torch.equal(after[key], value) == (key not in factors), key
    assert_unchanged(model, before)
    assert traced.code == traced_code and type(traced.conv) is nn.Conv2d


def test_lora_on_factors_then_fuse_matches_float64():
    torch.manual_seed(6)
    model = Net().eval()
    before = snapshot(model)
    factored = low_rank(fxtune.trace(model), targets="fc", rank=3)
    adapted = lora(factored, targets="fc.*", r=2, alpha=4)
    names = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert names == {f"fxtune.default.fc_{i}.lora_{ab}" for i in (0, 1) for ab in "ab"}
    assert {id(p) for p in fxtune.trainable_parameters(adapted)} == {id(p) for n, p in adapted.named_parameters() if n in names}
    opt = torch.optim.AdamW(fxtune.trainable_parameters(adapted), lr=5e-2)
    for _ in range(3):
        opt.zero_grad()
        adapted(torch.randn(4, 6, 8, 8)).square().mean().backward()
        opt.step()
    fused = fuse(adapted)
    assert fxtune.diff(factored, fused) == ""

    slots = adapted.fxtune.default
    w = [factored.fc[i].weight.double() + 2.0 * slots.get_submodule(f"fc_{i}").lora_b.double() @ slots.get_submodule(f"fc_{i}").lora_a.double() for i in (0, 1)]
    x = torch.randn(3, 6, 8, 8)
    h = torch.relu(model.depthwise(torch.relu(model.conv(x)))).mean((2, 3)).double()
    ref = F.linear(torch.relu(F.linear(F.linear(h, w[0]), w[1], model.fc.bias.double())), model.head.weight.double(), model.head.bias.double())
    assert rel(fused(x), ref) < 1e-5
    assert rel(adapted(x), ref) < 1e-5
    assert_unchanged(model, before)


def test_fuse_keeps_the_two_layer_structure():
    torch.manual_seed(7)
    gm = low_rank(fxtune.trace(Net().eval()), targets=["conv", "fc"], rank=2)
    fused = fuse(gm)
    assert fxtune.diff(gm, fused) == ""
    assert all(torch.equal(a, b) for a, b in zip(gm.state_dict().values(), fused.state_dict().values()))


def test_a_module_called_twice_is_factorized_for_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 12)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    torch.manual_seed(8)
    model = Twice()
    gm = low_rank(fxtune.trace(model), rank=3)
    assert gm.code.count('getattr(self.fc, "0")') == 2 and gm.code.count('getattr(self.fc, "1")') == 2
    approx, _ = truncated64(model.fc.weight, 1, 3)
    ref = with_weight64(model.fc, approx)
    x = torch.randn(4, 12)
    assert rel(gm(x), ref(torch.tanh(ref(x.double())))) < 1e-5


def solvers_used(gm) -> set[str]:
    return {n.meta["fxtune_structure"]["solver"] for n in gm.graph.nodes if "fxtune_structure" in n.meta}


def _spectrum_matrix(m: int, n: int, decay: float | None) -> torch.Tensor:
    q1, _ = torch.linalg.qr(torch.randn(m, m))
    q2, _ = torch.linalg.qr(torch.randn(n, m))
    s = torch.exp(-torch.arange(m) / decay) if decay else torch.linspace(2.0, 1.0, m)
    return (q1 * s) @ q2.T


def test_auto_solver_takes_randomized_when_near_optimal_and_exact_otherwise(monkeypatch):
    torch.manual_seed(9)
    layer = nn.Linear(1024, 256, bias=False)
    with torch.no_grad():
        layer.weight.copy_(_spectrum_matrix(256, 1024, decay=8.0))
    gm = low_rank(fxtune.trace(Wrap(layer)), rank=16)
    assert solvers_used(gm) == {"randomized"}
    _, discarded = truncated64(layer.weight, 1, 16)
    error = (product64(gm.layer, 1, layer.weight.shape) - layer.weight.detach().double()).square().sum()
    assert float(error) <= 1.02 * float(discarded.sum())

    with torch.no_grad():
        layer.weight.copy_(_spectrum_matrix(256, 1024, decay=None))  # slowly decaying: randomized is not optimal
    monkeypatch.setattr(low_rank_module, "TOLERANCE", 0.0)
    gm = low_rank(fxtune.trace(Wrap(layer)), rank=16)
    assert solvers_used(gm) == {"exact"}
    _, discarded = truncated64(layer.weight, 1, 16)
    error = (product64(gm.layer, 1, layer.weight.shape) - layer.weight.detach().double()).square().sum()
    assert float(error) == pytest.approx(float(discarded.sum()), rel=1e-5)


def test_randomized_solver_and_small_matrices():
    torch.manual_seed(10)
    layer = nn.Linear(48, 40)
    with torch.no_grad():
        layer.weight.copy_(_spectrum_matrix(40, 48, decay=4.0))
    solvers = {}
    for solver in ("auto", "exact", "randomized"):
        gm = low_rank(fxtune.trace(Wrap(layer)), rank=8, solver=solver)
        solvers[solver] = solvers_used(gm)
        _, discarded = truncated64(layer.weight, 1, 8)
        error = (product64(gm.layer, 1, layer.weight.shape) - layer.weight.detach().double()).square().sum()
        assert float(error) <= 1.05 * float(discarded.sum()) + 1e-12
    assert solvers == {"auto": {"exact"}, "exact": {"exact"}, "randomized": {"randomized"}}


def test_float64_model_keeps_float64_factors():
    torch.manual_seed(11)
    layer = nn.Linear(20, 30).double()
    gm = low_rank(fxtune.trace(Wrap(layer)), rank=4)
    assert gm.layer[0].weight.dtype == gm.layer[1].weight.dtype == torch.float64
    _, discarded = truncated64(layer.weight, 1, 4)
    error = (product64(gm.layer, 1, layer.weight.shape) - layer.weight.detach()).square().sum()
    assert float(error) == pytest.approx(float(discarded.sum()), rel=1e-10)


@pytest.mark.parametrize("rank", [0, -2, 0.0, True, "half", float("nan")])
def test_bad_rank_is_refused(rank):
    with pytest.raises(StructureError, match="rank"):
        low_rank(fxtune.trace(Wrap(nn.Linear(8, 8))), rank=rank)


def test_bad_solver_and_adapted_sites_are_refused():
    traced = fxtune.trace(Net())
    with pytest.raises(StructureError, match="solver"):
        low_rank(traced, solver="qr")
    adapted = lora(traced, targets="fc", r=2)
    with pytest.raises(StructureError, match="'fc'.*fuse"):
        low_rank(adapted, targets="fc")
    assert isinstance(low_rank(fuse(adapted), targets="fc", rank=2).fc, nn.Sequential)


def test_restructure_refuses_a_module_whose_weight_is_read_directly():
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return self.fc(x) + self.fc.weight.sum()

    with pytest.raises(StructureError, match=r"fc\.weight"):
        low_rank(fxtune.trace(Reads()), rank=1)


@pytest.mark.slow
def test_resnet18_every_site_at_half_break_even_and_full_rank():
    import torchvision

    torch.manual_seed(12)
    model = torchvision.models.resnet18(weights=None).eval()
    before = snapshot(model)
    traced = fxtune.trace(model)
    sites = {s.target: s.module for s in fxtune.sites(traced)}
    gm = low_rank(traced, rank=0.5)
    for target, module in sites.items():
        g = getattr(module, "groups", 1)
        m, n = module.weight.shape[0] // g, module.weight[0].numel()
        r = max(1, math.floor(0.5 * m * n / (m + n)))
        bias = 0 if module.bias is None else module.bias.numel()
        assert sum(p.numel() for p in gm.get_submodule(target).parameters()) == g * r * (m + n) + bias, target
    x = torch.randn(2, 3, 64, 64)
    gm(x)
    full = low_rank(traced, rank=10**6, force=True)
    assert rel(full(x), model(x)) < 1e-4
    assert_unchanged(model, before)
