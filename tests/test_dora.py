"""dora: weight-decomposed LoRA against a float64 formula, a detached-norm autograd reference and PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import fxtune
from fxtune.passes import dora, fuse, lora

FORMS = ["activation", "weight"]
SITES = ["c", "grouped", "fc", "head"]




class Net(nn.Module):
    """Conv2d, grouped Conv2d (reflect padding), Linear with bias and Linear without."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4, padding_mode="reflect")
        self.fc = nn.Linear(12, 6)
        self.head = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        h = torch.relu(self.grouped(torch.relu(self.c(x)))).mean((2, 3))
        return self.head(torch.relu(self.fc(h)))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 4, 7, 7, generator=torch.Generator().manual_seed(seed))


def slot(gm, name, adapter="default"):
    return gm.get_submodule(f"fxtune.{adapter}.{name}")


def randomize(gm, seed=0, adapter="default"):
    """Non-trivial A, B and m (m away from ‖W‖), written into gm's own adapter tensors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in SITES:
            s = slot(gm, name, adapter)
            s.lora_a.copy_(torch.randn(s.lora_a.shape, generator=g) * 0.3)
            s.lora_b.copy_(torch.randn(s.lora_b.shape, generator=g) * 0.3)
            s.magnitude.mul_(1 + 0.2 * torch.randn(s.magnitude.shape, generator=g))


def dora64(w, a, b, m, scale, detach=True):
    """W' = m · V/‖V‖, V = W + s·B@A, norm per output row of the (out, in/groups·k) view, float64."""
    v = w.double() + scale * (b.double().flatten(1) @ a.double().flatten(1)).reshape(w.shape)
    norm = v.reshape(v.shape[0], -1).pow(2).sum(1).sqrt()
    if detach:
        norm = norm.detach()
    return (m.double() / norm).reshape(-1, *([1] * (w.dim() - 1))) * v


def reference(model, weights, x):
    """The model in float64 with the given weights."""
    ref = copy.deepcopy(model).double()
    return functional_call(ref, {f"{n}.weight": w for n, w in weights.items()}, (x.double(),))


def formula_weights(model, gm, scale, adapter="default"):
    return {
        n: dora64(model.get_submodule(n).weight.detach(), slot(gm, n, adapter).lora_a.detach(),
                  slot(gm, n, adapter).lora_b.detach(), slot(gm, n, adapter).magnitude.detach(), scale)
        for n in SITES
    }


@pytest.mark.parametrize("form", FORMS)
def test_init_output_equals_base(form):
    model, x = net(), batch()
    g = dora(fxtune.trace(model), r=4, form=form)
    torch.testing.assert_close(g(x), model(x), rtol=1e-6, atol=1e-6)
    for n in SITES:
        w = model.get_submodule(n).weight.detach()
        torch.testing.assert_close(slot(g, n).magnitude, w.flatten(1).double().norm(dim=1).float())
        assert torch.equal(slot(g, n).lora_b, torch.zeros_like(slot(g, n).lora_b))
        assert slot(g, n).lora_a.shape == (4, *w.shape[1:])


@pytest.mark.parametrize("form", FORMS)
def test_matches_fp64_formula_and_fuses_exactly(form):
    model, x = net(), batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    traced = fxtune.trace(model)
    g = dora(traced, r=3, alpha=6, form=form)
    randomize(g)
    weights = formula_weights(model, g, scale=2.0)
    ref = reference(model, weights, x)
    torch.testing.assert_close(g(x).double(), ref, rtol=1e-5, atol=1e-6)
    fused = fuse(g)
    assert fused.code == traced.code
    for n in SITES:
        torch.testing.assert_close(fused.get_submodule(n).weight.double(), weights[n], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused(x).double(), ref, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_forms_agree_in_output_and_gradient():
    model, x = net(), batch()
    traced = fxtune.trace(model)
    act, wgt = dora(traced, r=3, form="activation"), dora(traced, r=3, form="weight")
    randomize(act, seed=5)
    randomize(wgt, seed=5)
    assert "dora_factor" in act.code and "dora_weight" not in act.code and "dora_weight" in wgt.code
    probe = torch.randn(3, 3, generator=torch.Generator().manual_seed(2))
    (act(x) * probe).sum().backward()
    (wgt(x) * probe).sum().backward()
    torch.testing.assert_close(act(x), wgt(x), rtol=1e-5, atol=1e-6)
    for (k, p), (k2, q) in zip(act.named_parameters(), wgt.named_parameters()):
        assert k == k2
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_no_gradient_flows_through_the_norm(form):
    """Gradients of m, A, B equal a float64 autograd reference with the norm detached (and differ from
    the gradient through the norm, so the test can tell the two apart)."""
    model, x = net(), batch()
    g = dora(fxtune.trace(model), r=2, form=form)
    randomize(g, seed=7)
    probe = torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (g(x).double() * probe).sum().backward()

    def reference_grads(detach):
        leaves = {n: {k: getattr(slot(g, n), k).detach().double().requires_grad_() for k in ("lora_a", "lora_b", "magnitude")} for n in SITES}
        weights = {n: dora64(model.get_submodule(n).weight.detach(), t["lora_a"], t["lora_b"], t["magnitude"], 1.0, detach)
                   for n, t in leaves.items()}
        (reference(model, weights, x) * probe).sum().backward()
        return {n: {k: t.grad for k, t in ts.items()} for n, ts in leaves.items()}

    detached, through = reference_grads(True), reference_grads(False)
    for n in SITES:
        for k in ("lora_a", "lora_b", "magnitude"):
            ours = getattr(slot(g, n), k).grad.double()
            torch.testing.assert_close(ours, detached[n][k], rtol=1e-4, atol=1e-7)
            if k == "magnitude":
                continue  # m enters only through m/‖V‖: its gradient is the same either way
            gap = (through[n][k] - detached[n][k]).norm() / detached[n][k].norm()
            assert gap > 1e-2, f"{n}.{k}: the two references are too close to tell apart"
    assert all(p.grad is None for name, p in g.named_parameters() if not name.startswith("fxtune."))


def _peft_model(model, r, alpha):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=alpha, target_modules=["c", "fc", "head"], use_dora=True))


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 5, 3, padding=1)
        self.fc = nn.Linear(5, 7)
        self.head = nn.Linear(7, 2, bias=False)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(self.c(x).mean((2, 3)))))


@pytest.mark.parametrize("form", FORMS)
def test_matches_peft_dora(form):
    torch.manual_seed(0)
    model = Plain().eval()
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    g = dora(fxtune.trace(model), r=2, alpha=5, form=form)
    peft_model = _peft_model(model, 2, 5)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n in ("c", "fc", "head"):
            s, layer = slot(g, n), peft_model.base_model.model.get_submodule(n)
            s.lora_a.copy_(torch.randn(s.lora_a.shape, generator=gen) * 0.4)
            s.lora_b.copy_(torch.randn(s.lora_b.shape, generator=gen) * 0.4)
            s.magnitude.mul_(1 + 0.3 * torch.randn(s.magnitude.shape, generator=gen))
            layer.lora_A["default"].weight.copy_(s.lora_a.view_as(layer.lora_A["default"].weight))
            layer.lora_B["default"].weight.copy_(s.lora_b.view_as(layer.lora_B["default"].weight))
            magnitude = layer.lora_magnitude_vector["default"].weight
            magnitude.copy_(s.magnitude.view_as(magnitude))
    ours, theirs = g(x), peft_model(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    for n in ("c", "fc", "head"):
        layer = peft_model.base_model.model.get_submodule(n)
        torch.testing.assert_close(slot(g, n).magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad.flatten(), rtol=1e-4, atol=1e-5)
        for ours_key, peft_grad in (("lora_a", layer.lora_A["default"].weight.grad), ("lora_b", layer.lora_B["default"].weight.grad)):
            ours_grad = getattr(slot(g, n), ours_key).grad
            torch.testing.assert_close(ours_grad, peft_grad.view_as(ours_grad), rtol=1e-4, atol=1e-5)


def test_merge_unmerge_is_bit_exact():
    model, x = net(), batch()
    g = dora(fxtune.trace(model), r=3)
    randomize(g, seed=11)
    y = g(x)
    merged = fxtune.merge(g)
    assert "dora" not in merged.code
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-6)
    back = fxtune.unmerge(merged)
    for n in SITES:
        assert torch.equal(back.get_submodule(n).weight, model.get_submodule(n).weight)
    assert back.code == g.code
    assert torch.equal(back(x), y)


def test_saved_adapter_reloads_bit_identical(tmp_path):
    model, x = net(), batch()
    g = dora(fxtune.trace(model), r=2, adapter="d")
    randomize(g, seed=13, adapter="d")
    fxtune.save_adapters(g, str(tmp_path), adapter="d")
    h = fxtune.load_adapters(fxtune.trace(net()), str(tmp_path))
    assert h.code == g.code
    assert torch.equal(h(x), g(x))
    assert {k for k in h.state_dict() if k.startswith("fxtune.")} == {
        f"fxtune.d.{n}.{t}" for n in SITES for t in ("lora_a", "lora_b", "magnitude")
    }


def test_activation_form_only_when_dora_acts_first_on_its_site():
    """After another activation-form adapter DoRA needs the whole current weight: it falls back to the
    weight form (the summary says why); acting first, it keeps the activation form. Both match W'."""
    model, x = net(), batch()
    traced = fxtune.trace(model)
    for order in ("lora_first", "dora_first"):
        if order == "lora_first":
            g = dora(lora(traced, targets="fc", r=2, form="activation", adapter="l"), targets="fc", r=2, form="activation", adapter="d")
        else:
            g = lora(dora(traced, targets="fc", r=2, form="activation", adapter="d"), targets="fc", r=2, form="activation", adapter="l")
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in fxtune.trainable_parameters(g):
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        w = model.fc.weight.detach().double()
        lo, do = slot(g, "fc", "l"), slot(g, "fc", "d")
        delta = (lo.lora_b.detach().double() @ lo.lora_a.detach().double())
        if order == "lora_first":
            expected = dora64(w + delta, do.lora_a.detach(), do.lora_b.detach(), do.magnitude.detach(), 1.0)
            assert "d:dora[weight]" in fxtune.summary(g) and "reads the base weight" in fxtune.summary(g)
        else:
            expected = dora64(w, do.lora_a.detach(), do.lora_b.detach(), do.magnitude.detach(), 1.0) + delta
            assert "d:dora[activation]" in fxtune.summary(g) and "l:lora[activation]" in fxtune.summary(g)
        ref = reference(model, {"fc": expected}, x)
        torch.testing.assert_close(g(x).double(), ref, rtol=1e-5, atol=1e-6)


def test_auto_form_settings_and_errors():
    model = net()
    g = dora(fxtune.trace(model), r={"fc": 2}, alpha=4, rslora=True)
    assert slot(g, "fc").config == {"r": 2, "alpha": 4, "scale": 4 / 2 ** 0.5, "rslora": True}
    assert slot(g, "c").lora_a.shape[0] == 8
    assert len(fxtune.trainable_parameters(g)) == 3 * len(SITES)
    with pytest.raises(fxtune.AdapterError, match="form"):
        dora(fxtune.trace(model), form="fast")
    with pytest.raises(fxtune.AdapterError, match="positive int.*'fc'"):
        dora(fxtune.trace(model), r={"fc": 0})
    with torch.no_grad():
        model.fc.weight[2].zero_()
    with pytest.raises(fxtune.AdapterError, match=r"'fc' has all-zero weight rows \[2\]"):
        dora(fxtune.trace(model), targets="fc")
