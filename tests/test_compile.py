"""torch.compile on adapted GraphModules: whole-graph compiles, and no recompiles when adapter
values change or when `hotswap` switches adapters (compilations counted by dynamo's counter).

The fast tests compile with the "aot_eager" backend (whether dynamo recompiles does not depend on
the backend); the slow one runs inductor for real. Outputs are checked against float64 copies of
the model with W + s·B@A (or the IA³ scaling) written in, never against fxtune's own output.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fxtune
from core_helpers import assert_unchanged, snapshot
from fxtune import hotswap, live_source, prepare_hotswap
from fxtune.passes import dora, ia3, lora
from site_helpers import ia3_64, lora64, randomize, reference, slots

pytestmark = pytest.mark.filterwarnings("ignore::fxtune.FxtuneWarning")


class Net(nn.Module):
    """A conv (LoRA activation form), an attention (weight form, through call_with) and a linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        t = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)
        t = self.attn(t, t, t, need_weights=False)[0]
        return self.fc(t.mean(1))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def _x(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def _with_lora(gm, adapter: str, seed: int):
    gm = lora(gm, targets="conv", r=2, form="activation", adapter=adapter)
    gm = lora(gm, targets=["attn.q", "attn.v", "fc"], r=2, form="weight", adapter=adapter)
    randomize(gm, std=0.2, seed=seed, adapter=adapter)
    return gm


def _lora_reference(model, gm, adapter: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference(model, gm, lora64, adapter=adapter)(x.double())


def _counter(backend: str = "aot_eager") -> CompileCounterWithBackend:
    torch._dynamo.reset()
    return CompileCounterWithBackend(backend)


def _assert_matches(y: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(y.detach().double(), ref, rtol=1e-5, atol=1e-6)


def test_adapted_graph_compiles_whole_and_training_steps_do_not_recompile():
    model, x = _net(), _x()
    gm = _with_lora(fxtune.trace(model), "default", seed=0)
    counter = _counter()
    compiled = torch.compile(gm, backend=counter, fullgraph=True)
    opt = torch.optim.SGD(fxtune.trainable_parameters(gm), lr=0.5)
    with torch.no_grad():
        before = {n: p.clone() for n, p in gm.named_parameters() if p.requires_grad}
    for _ in range(3):
        y = compiled(x)
        _assert_matches(y, _lora_reference(model, gm, "default", x))
        opt.zero_grad()
        y.square().sum().backward()
        opt.step()
    assert any(not torch.equal(p, before[n]) for n, p in gm.named_parameters() if p.requires_grad)
    _assert_matches(compiled(x), _lora_reference(model, gm, "default", x))
    assert counter.frame_count == 1


def dora64(w: torch.Tensor, b, slot) -> tuple:
    """m · V / ‖V‖ per output row, V = W + s·B@A, in float64."""
    a, up = slot.lora_a.detach().double().flatten(1), slot.lora_b.detach().double().flatten(1)
    v = w + slot.config["scale"] * (up @ a).view(w.shape)
    norm = v.flatten(1).norm(dim=1)
    return v * (slot.magnitude.detach().double() / norm).view(-1, *([1] * (w.dim() - 1))), b


def _with_kind(gm, kind: str, name: str, seed: int):
    if kind == "lora":
        return _with_lora(gm, name, seed)
    if kind == "ia3":
        gm = ia3(gm, targets=["conv", "fc"], adapter=name)
    else:
        gm = dora(dora(gm, targets="conv", r=2, form="activation", adapter=name), targets="fc", r=2, form="weight", adapter=name)
    randomize(gm, std=0.3, seed=seed, adapter=name)
    return gm


@pytest.mark.parametrize("kind, transform", [("lora", lora64), ("ia3", ia3_64), ("dora", dora64)])
def test_hotswap_switches_adapters_without_recompiling(kind, transform):
    model, x = _net(), _x()
    gm = fxtune.trace(model)
    for i, name in enumerate("abc"):
        gm = _with_kind(gm, kind, name, seed=i)
    snap = snapshot(gm)
    live = prepare_hotswap(gm, ["a", "b", "c"])
    assert_unchanged(gm, snap)
    expected = {name: reference(model, live, transform, adapter=name)(x.double()).detach() for name in "abc"}
    counter = _counter()
    compiled = torch.compile(live, backend=counter, fullgraph=True)
    code = live.code
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        _assert_matches(compiled(x), expected["a"])  # the first adapter is live after preparing
        for name in "bcab":
            hotswap(compiled if name == "c" else live, name)  # the compiled wrapper works too
            assert live_source(live) == name
            _assert_matches(compiled(x), expected[name])
    assert counter.frame_count == 1
    assert live.code == code
    assert "fxtune.live." in code and "fxtune.a." not in code and "fxtune.b." not in code


def test_hotswap_keeps_what_was_trained_on_the_live_adapter():
    model, x = _net(), _x()
    gm = _with_lora(_with_lora(fxtune.trace(model), "a", seed=0), "b", seed=1)
    live = prepare_hotswap(gm)
    b_before = {k: v.detach().clone() for k, v in slots(live, "b")["fc"].named_parameters()}
    counter = _counter()
    compiled = torch.compile(live, backend=counter, fullgraph=True)
    live_params = [p for n, p in live.named_parameters() if n.startswith("fxtune.live.")]
    opt = torch.optim.SGD(live_params, lr=0.5)
    compiled(x).square().sum().backward()
    opt.step()
    trained = {k: v.detach().clone() for k, v in slots(live, "live")["fc"].named_parameters()}
    hotswap(live, "b")
    for k, v in slots(live, "b")["fc"].named_parameters():
        assert torch.equal(v, b_before[k])  # b itself untouched by a's training
        assert torch.equal(slots(live, "live")["fc"].get_parameter(k), v)
    hotswap(live, "a")
    for k, v in slots(live, "a")["fc"].named_parameters():
        assert torch.equal(v, trained[k])  # a's training went back into a
    y = compiled(x)
    _assert_matches(y, _lora_reference(model, live, "a", x))
    y.square().sum().backward()
    assert counter.frame_count == 1  # calls with gradients only: grad mode is part of every compiled graph's guard


def test_a_prepared_graphmodule_saves_and_loads_and_swaps_as_before(tmp_path):
    model, x = _net(), _x()
    live = prepare_hotswap(_with_lora(_with_lora(fxtune.trace(model), "a", seed=0), "b", seed=1))
    hotswap(live, "b")
    fxtune.save(live, tmp_path / "live")
    loaded = fxtune.load(tmp_path / "live")
    assert live_source(loaded) == "b" and loaded.code == live.code
    _assert_matches(loaded(x), _lora_reference(model, live, "b", x))
    hotswap(loaded, "a")
    assert live_source(loaded) == "a" and live_source(live) == "b"
    _assert_matches(loaded(x), _lora_reference(model, live, "a", x))


def test_hotswap_takes_values_from_another_graphmodule():
    model, x = _net(), _x()
    live = prepare_hotswap(_with_lora(fxtune.trace(model), "a", seed=0))
    other = _with_lora(fxtune.trace(model), "x", seed=5)
    snap = snapshot(other)
    counter = _counter()
    compiled = torch.compile(live, backend=counter, fullgraph=True)
    with torch.no_grad():
        compiled(x)
        hotswap(live, "x", source=other)
        assert live_source(live) is None
        _assert_matches(compiled(x), _lora_reference(model, other, "x", x))
        hotswap(live, "a")  # nothing is written back into `other`
        _assert_matches(compiled(x), _lora_reference(model, live, "a", x))
    assert_unchanged(other, snap)
    assert counter.frame_count == 1


def test_hotswap_refuses_adapters_whose_code_would_differ():
    model = _net()
    gm = _with_lora(fxtune.trace(model), "a", seed=0)
    other_sites = lora(gm, targets="conv", r=2, form="activation", adapter="b")
    with pytest.raises(fxtune.AdapterError, match="different sites"):
        prepare_hotswap(other_sites, ["a", "b"])
    other_rank = lora(lora(gm, targets="conv", r=4, form="activation", adapter="b"),
                      targets=["attn.q", "attn.v", "fc"], r=2, form="weight", adapter="b")
    with pytest.raises(fxtune.AdapterError, match=r"(?s)alike.*'conv': tensors"):
        prepare_hotswap(other_rank, ["a", "b"])
    other_alpha = lora(lora(gm, targets="conv", r=2, alpha=4, form="activation", adapter="b"),
                       targets=["attn.q", "attn.v", "fc"], r=2, form="weight", adapter="b")
    with pytest.raises(fxtune.AdapterError, match=r"(?s)would change the code.*'conv': alpha=2 vs 4.*scale"):
        prepare_hotswap(other_alpha, ["a", "b"])
    other_init = lora(lora(gm, targets="conv", r=2, init="gaussian", form="activation", adapter="b"),
                      targets=["attn.q", "attn.v", "fc"], r=2, form="weight", adapter="b")
    assert "live" in [a.name for a in fxtune.adapters(prepare_hotswap(other_init, ["a", "b"]))]  # init leaves the code alike
    other_kind = ia3(gm, targets=["conv", "attn.q", "attn.v", "fc"], adapter="b")
    with pytest.raises(fxtune.AdapterError, match="kind"):
        prepare_hotswap(other_kind, ["a", "b"])
    with pytest.raises(fxtune.AdapterError, match="no live adapter"):
        hotswap(gm, "a")
    live = prepare_hotswap(gm)
    with pytest.raises(fxtune.AdapterError, match="already has an adapter named 'live'"):
        prepare_hotswap(live, ["a"])
    with pytest.raises(fxtune.AdapterError, match="no adapter named 'zzz'"):
        hotswap(live, "zzz")
    with pytest.raises(fxtune.AdapterError, match="different sites"):
        hotswap(live, "b", source=other_sites)


def test_hotswap_refuses_adapters_that_replaced_the_base_weight():
    gm = lora(lora(fxtune.trace(_net()), targets="fc", r=2, init="pissa", adapter="a"), targets="fc", r=2, adapter="b")
    with pytest.raises(fxtune.AdapterError, match="replaced the base weight"):
        prepare_hotswap(gm, ["a", "b"])


@pytest.mark.slow
def test_inductor_compiles_once_across_training_and_hotswaps():
    model, x = _net(), _x()
    gm = _with_lora(_with_lora(fxtune.trace(model), "a", seed=0), "b", seed=1)
    live = prepare_hotswap(gm)
    counter = _counter("inductor")
    compiled = torch.compile(live, backend=counter, fullgraph=True)
    opt = torch.optim.SGD([p for n, p in live.named_parameters() if n.startswith("fxtune.live.")], lr=0.5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name in "abab":
            hotswap(live, name)
            y = compiled(x)
            _assert_matches(y, _lora_reference(model, live, name, x))
            opt.zero_grad()
            y.square().sum().backward()
            opt.step()
    assert counter.frame_count == 1
