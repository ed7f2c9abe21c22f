"""fxtune.batched: a mixed batch equals running each sample through its own adapter.

References are per-sample runs of `fxtune.set_active(gm, name)` models (tested on their own),
and for LoRA on a Linear the formula y = xWᵀ + b + s·(x Aᵀ) Bᵀ written out in float64.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import fx, nn

import fxtune
from core_helpers import assert_unchanged, small_net, snapshot, vision_model
from fxtune import AdapterKind, AdapterSlot
from fxtune.passes import ia3, lora

NAMES = ["a", "b", "c"]
SHUFFLED = [2, 0, -1, 1, 0, 2, -1, 1, 1, -1, 0, 2]
INDEXES = {
    "shuffled": SHUFFLED,
    "sorted": sorted(SHUFFLED),
    "one adapter": [1] * 6,
    "all base": [-1] * 5,
    "no base": [0, 2, 1, 2, 0],
}




def _randomize(gm: nn.Module, seed: int = 0) -> None:
    """Non-trivial values for every adapter tensor of gm (gm's own copies only)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sl in gm.modules():
            if isinstance(sl, AdapterSlot):
                for p in sl.parameters(recurse=False):
                    noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
                    p.copy_(1.0 + 0.3 * noise if sl.kind == "ia3" else 0.2 * noise)


def _reference(gm: fx.GraphModule, names, xs, index) -> torch.Tensor:
    """Row i of the output of gm with only names[index[i]] active (the base model for -1)."""
    models = {k: fxtune.set_active(gm, [] if k < 0 else [names[k]]).eval() for k in set(index)}
    outs = {k: m(*xs) for k, m in models.items()}
    return torch.stack([outs[k][i] for i, k in enumerate(index)])


def _assert_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def _small_mixed() -> tuple[fx.GraphModule, torch.Tensor]:
    """SmallNet (every conv flavour, Linear on tokens and vectors) with three overlapping adapters:
    LoRA r=2 and LoRA r=4 (weight form) on overlapping sites, and IA³ on the input side of a few."""
    model = small_net()
    g = lora(fxtune.trace(model), ["stem", "grouped", "dilated", "tok", "fc", "c1d", "c3d"], r=2, adapter="a")
    g = lora(g, ["grouped", "reflect", "circular", "fc"], r=4, alpha=8, form="weight", adapter="b")
    g = ia3(g, ["depthwise", "same", "fc", "tok"], position="input", adapter="c")
    _randomize(g)
    return g.eval(), torch.randn(len(SHUFFLED), 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("form", ["auto", "weight"])
@pytest.mark.parametrize("case", list(INDEXES))
def test_small_net_lora_and_ia3_match_per_sample_runs(case, form):
    g, x = _small_mixed()
    index = INDEXES[case]
    x = x[: len(index)]
    snap = snapshot(g)
    bm = fxtune.batched(g, NAMES, form=form)
    with torch.no_grad():
        y = bm(x, torch.tensor(index))
        ref = _reference(g, NAMES, (x,), index)
        base = _reference(g, NAMES, (x,), [-1] * len(index))
    _assert_close(y, ref)
    changed = (ref - base).abs().amax(1)
    assert all((changed[i] > 1e-3) == (k >= 0) for i, k in enumerate(index)), "the adapters must matter"
    assert_unchanged(g, snap)


def test_lora_formula_on_a_linear_over_tokens():
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    g = lora(fxtune.trace(nn.Sequential(lin)), r=2, alpha=3, form="activation", adapter="p")
    g = lora(g, r=3, alpha=3, form="activation", adapter="q")
    _randomize(g)
    x = torch.randn(5, 4, 8)
    index = [1, -1, 0, 1, 0]
    y = fxtune.batched(g, ["p", "q"])(x, torch.tensor(index))
    w, b = lin.weight.double(), lin.bias.double()
    for i, k in enumerate(index):
        ref = x[i].double() @ w.T + b
        if k >= 0:
            sl = g.get_submodule(f"fxtune.{'pq'[k]}.0")
            scale = 3 / sl.lora_a.shape[0]
            ref = ref + scale * (x[i].double() @ sl.lora_a.double().T) @ sl.lora_b.double().T
        torch.testing.assert_close(y[i].double(), ref, rtol=1e-5, atol=1e-6)


def _small_output_side() -> tuple[fx.GraphModule, torch.Tensor]:
    """SmallNet with output-side activation forms only: LoRA r=3, LoRA r=5, IA³ output."""
    model = small_net()
    g = lora(fxtune.trace(model), ["stem", "grouped", "depthwise", "tok", "fc"], r=3, form="activation", adapter="a")
    g = lora(g, ["grouped", "dilated", "reflect", "fc"], r=5, form="activation", adapter="b")
    g = ia3(g, ["stem", "circular", "same", "fc"], position="output", adapter="c")
    _randomize(g, seed=3)
    return g.eval(), torch.randn(len(SHUFFLED), 3, 16, 16, generator=torch.Generator().manual_seed(4))


def test_activation_path_equals_generic_weight_path_for_lora_and_ia3_output():
    g, x = _small_output_side()
    index = torch.tensor(SHUFFLED)
    fast, generic = fxtune.batched(g, NAMES), fxtune.batched(g, NAMES, form="weight")
    assert "lora_down" in fast.code and "lora_down" not in generic.code
    with torch.no_grad():
        y_fast, y_generic = fast(x, index), generic(x, index)
        _assert_close(y_fast, y_generic)
        _assert_close(y_fast, _reference(g, NAMES, (x,), SHUFFLED))


def _shift_weight(w: torch.Tensor, *, delta: torch.Tensor) -> torch.Tensor:
    return w + delta


def _shift_bias(b: torch.Tensor, *, gain: torch.Tensor) -> torch.Tensor:
    return b * gain


fxtune.register_kind(AdapterKind("test_batched_shift", weight=_shift_weight, bias=_shift_bias))


def _shift(gm: fx.GraphModule, targets, adapter: str) -> fx.GraphModule:
    """A weight-only kind the core has never heard of: W + Δ, b · g."""
    rw = fxtune.Rewrite(gm, kind="test_batched_shift", adapter=adapter)
    for target in rw.select(targets):
        w = rw.weight(target)
        rw.attach(target, params={"delta": torch.zeros_like(w), "gain": torch.ones(w.shape[0])}, form="weight")
    return rw.finish()


def test_any_kind_through_its_weight_transform_and_pissa_bases():
    model = small_net()
    g = _shift(fxtune.trace(model), ["grouped", "tok", "fc"], "s")
    g = lora(g, ["grouped", "dilated", "fc"], r=2, init="pissa", adapter="pissa")
    g = lora(g, ["dilated", "tok"], r=2, adapter="plain")
    _randomize(g, seed=5)
    x = torch.randn(9, 3, 16, 16)
    index = [2, 0, 1, -1, 1, 0, 2, -1, 1]
    names = ["s", "pissa", "plain"]
    with torch.no_grad():
        for form in ("auto", "weight"):
            _assert_close(fxtune.batched(g, names, form=form)(x, torch.tensor(index)), _reference(g, names, (x,), index))


def test_resnet18_lora_of_different_r_on_overlapping_sites_and_ia3():
    model = vision_model("resnet18")
    g = lora(fxtune.trace(model), "layer4.*", r=4, adapter="a")
    g = lora(g, ["layer3.1.conv2", "layer4.0.conv1", "layer4.0.downsample.0", "fc"], r=8, adapter="b")
    g = ia3(g, ["conv1", "layer1.0.conv1", "fc"], adapter="c")
    _randomize(g, seed=1)
    for sl in g.modules():
        if isinstance(sl, AdapterSlot) and sl.kind == "lora":
            sl.lora_b.data.mul_(0.1)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    index = [0, 2, -1, 1, 1, -1, 2, 0]
    with torch.no_grad():
        y = fxtune.batched(g, NAMES)(x, torch.tensor(index))
        _assert_close(y, _reference(g, NAMES, (x,), index))


@pytest.mark.parametrize("order", ["shuffled", "sorted"])
@pytest.mark.parametrize("build", [_small_mixed, _small_output_side])
def test_gradients_reach_each_samples_adapter(build, order):
    g, x = build()
    g = lora(g, ["fc"], r=2, adapter="unused")
    index = INDEXES[order]
    bm = fxtune.batched(g, NAMES)
    weights = torch.randn(len(index), 10, generator=torch.Generator().manual_seed(7))
    (bm(x, torch.tensor(index)) * weights).sum().backward()
    for k, name in enumerate(NAMES):
        rows = [i for i, j in enumerate(index) if j == k]
        ref = fxtune.set_active(g, [name]).eval()
        (ref(x[rows]) * weights[rows]).sum().backward()
        expected = {n: p.grad for n, p in ref.named_parameters() if n.startswith(f"fxtune.{name}.")}
        got = {n: p.grad for n, p in bm.named_parameters() if n.startswith(f"fxtune.{name}.")}
        assert expected.keys() == got.keys() and expected
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for n, p in bm.named_parameters() if n.startswith("fxtune.unused."))
    assert all(p.grad is None for n, p in g.named_parameters())


def test_training_steps_only_move_the_adapters_in_the_batch():
    g, x = _small_mixed()
    bm = fxtune.batched(g, NAMES)
    before = {n: p.detach().clone() for n, p in bm.named_parameters()}
    opt = torch.optim.SGD(fxtune.trainable_parameters(bm), lr=0.1)
    index = torch.tensor([0, 2, -1, 0, 2])
    for _ in range(2):
        opt.zero_grad()
        bm(x[:5], index).square().mean().backward()
        opt.step()
    moved = {n.split(".")[1] for n, p in bm.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"a", "c"}


def test_graph_code_input_and_tags():
    g, x = _small_mixed()
    bm = fxtune.batched(g, NAMES)
    params = list(inspect.signature(bm.forward).parameters)
    assert params == ["x", "adapter_index"]
    assert "def forward(self, x, adapter_index):" in bm.code
    placeholders = [n for n in bm.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in placeholders] == ["x", "adapter_index"]
    assert [s.name for s in fxtune.sites(bm)] == [s.name for s in fxtune.sites(g)]
    emitted = [n for n in bm.graph.nodes if n.op in ("call_function", "call_method", "get_attr")]
    tagged = [n for n in emitted if "fxtune" in n.meta]
    assert {n.meta["fxtune"]["site"] for n in tagged} >= {"stem", "fc", "c3d", "same"}
    untagged = {n.name for n in emitted if "fxtune" not in n.meta and "fxtune_base" not in n.meta}
    assert untagged <= {n.name for n in g.graph.nodes}, "every node batched adds carries node.meta['fxtune']"
    fc_nodes = [n.meta["fxtune"] for n in tagged if n.meta["fxtune"]["site"] == "fc"]
    assert {(t["adapter"], t["kind"]) for t in fc_nodes} >= {("a", "lora"), ("b", "lora"), ("c", "ia3"), (None, None)}
    assert [a.name for a in fxtune.adapters(bm)] == ["a", "b", "c"]


def test_partial_names_and_inactive_adapters():
    g, x = _small_mixed()
    g = fxtune.set_active(g, ["a"])
    bm = fxtune.batched(g, ["c", "b"])
    index = [1, 0, -1, 0, 1]
    with torch.no_grad():
        _assert_close(bm(x[:5], torch.tensor(index)), _reference(g, ["c", "b"], (x[:5],), index))


def test_errors_are_fxtune_errors_and_leave_gm_unchanged():
    g, x = _small_mixed()
    snap = snapshot(g)
    with pytest.raises(fxtune.AdapterError, match="no adapter named"):
        fxtune.batched(g, ["a", "nope"])
    with pytest.raises(fxtune.AdapterError, match="distinct"):
        fxtune.batched(g, ["a", "a"])
    with pytest.raises(fxtune.AdapterError, match="form"):
        fxtune.batched(g, ["a"], form="fast")
    with pytest.raises(fxtune.AdapterError, match="unmerge"):
        fxtune.batched(fxtune.merge(g, ["a"]), ["b"])
    with pytest.raises(fxtune.AdapterError, match="GraphModule"):
        fxtune.batched(small_net(), ["a"])
    bm = fxtune.batched(g, NAMES)
    with pytest.raises(fxtune.AdapterError, match="already"):
        fxtune.batched(bm, NAMES)
    for bad, pattern in [
        (torch.tensor([0.0, 1.0, 2.0, -1.0]), "LongTensor"),
        (torch.tensor([[0, 1], [2, -1]]), "1-D"),
        (None, "LongTensor"),
        (torch.tensor([0, 1, 3, -1]), "holds 3"),
        (torch.tensor([0, -2, 1, -1]), "holds -2"),
        (torch.tensor([0, 1, 2]), "4 rows but adapter_index has 3"),
    ]:
        with pytest.raises(fxtune.AdapterError, match=pattern):
            bm(x[:4], bad)
    assert_unchanged(g, snap)


class _WithDefault(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 6)

    def forward(self, x, scale: float = 2.0):
        return self.fc(x) * scale


def test_input_after_a_defaulted_input_defaults_to_none_and_is_required():
    g = lora(fxtune.trace(_WithDefault()), r=2, form="activation", adapter="a")
    _randomize(g)
    bm = fxtune.batched(g, ["a"])
    assert list(inspect.signature(bm.forward).parameters) == ["x", "scale", "adapter_index"]
    x, index = torch.randn(4, 8), [0, -1, -1, 0]
    with torch.no_grad():
        _assert_close(bm(x, adapter_index=torch.tensor(index)), _reference(g, ["a"], (x,), index))
    with pytest.raises(fxtune.AdapterError, match="got NoneType"):
        bm(x)


class _Flattened(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x.reshape(-1, 4)).reshape(x.shape)


def test_batch_not_in_first_dimension_is_named():
    bm = fxtune.batched(lora(fxtune.trace(_Flattened()), r=2, adapter="a"), ["a"])
    with pytest.raises(fxtune.AdapterError, match="site 'fc'.*first dimension"):
        bm(torch.randn(3, 2, 4), torch.tensor([0, -1, 0]))


def test_input_gm_keeps_working_and_unchanged_after_training_the_batched_one():
    g, x = _small_mixed()
    snap = snapshot(g)
    with torch.no_grad():
        before = g(x)
    bm = fxtune.batched(g, NAMES)
    bm(x, torch.tensor(SHUFFLED)).sum().backward()
    torch.optim.SGD(fxtune.trainable_parameters(bm), lr=1.0).step()
    assert_unchanged(g, snap)
    with torch.no_grad():
        assert torch.equal(g(x), before)


def test_adapter_trained_in_a_batch_saves_and_loads_into_the_plain_model(tmp_path):
    g, x = _small_mixed()
    bm = fxtune.batched(g, NAMES)
    opt = torch.optim.SGD(fxtune.trainable_parameters(bm), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        bm(x, torch.tensor(SHUFFLED)).square().mean().backward()
        opt.step()
    fxtune.save_adapters(bm, tmp_path, adapter="a")
    reloaded = fxtune.set_active(fxtune.load_adapters(fxtune.delete_adapter(g, "a"), tmp_path), ["a"])
    with torch.no_grad():
        trained = bm(x, torch.zeros(len(x), dtype=torch.long))
        _assert_close(reloaded(x), trained)
        assert (trained - fxtune.set_active(g, ["a"])(x)).abs().max() > 1e-4
