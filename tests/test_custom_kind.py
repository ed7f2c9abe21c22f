"""A user-defined adapter kind, built only from fxtune's public API, works end to end.

The kind ("gated basis"): a frozen random basis E (r, in/groups, *k) saved with the adapter,
trainable coefficients c (r,), an up-projection V (out, r) and a gate g (out,):
    W' = (1 + g) ⊙rows (W + V·diag(c)·E),   b' = (1 + g) · b.
At init V = 0 and g = 0, so W' = W. It has an activation form, except on grouped convs.
"""

from __future__ import annotations

import copy
import pathlib
import re
import runpy

import pytest
import torch
from torch import fx, nn
from torch.func import functional_call

import fxtune
from fxtune.passes import fuse

KIND = "test_gated_basis"


def gated_weight(w, *, basis, coef, up, gate):
    """The meaning on W: rows of (W + V·diag(c)·E) times (1 + g)."""
    delta = (up.flatten(1) * coef) @ basis.flatten(1)
    return (w + delta.view(w.shape)) * (1 + gate).view(-1, *([1] * (w.dim() - 1)))


def gated_bias(b, *, gate):
    """The meaning on b: scaled with its output channel."""
    return b * (1 + gate)


def gated_activation(em: fxtune.Emitter, x: fx.Node, y: fx.Node, inputs: dict) -> fx.Node:
    """(y + V(c · E(x))) · (1 + g), E with the site's geometry, V a channel mix."""
    down = em.site_call(x, inputs["basis"], role="gb_down")
    down = em.mul(down, em.channel_view(inputs["coef"], role="gb_coef_view"), role="gb_coef")
    inner = em.add(y, em.pointwise(down, inputs["up"], role="gb_up"), role="gb_inner")
    factor = em.add(inputs["gate"], 1.0, role="gb_factor")
    return em.mul(inner, em.channel_view(factor, role="gb_factor_view"), role="gb")


def gated_blocker(site: fxtune.Site, config: dict) -> str | None:
    return "grouped conv: the basis branch would need one basis per group" if site.groups > 1 else None


fxtune.register_kind(
    fxtune.AdapterKind(KIND, weight=gated_weight, bias=gated_bias, activation=gated_activation, activation_blocker=gated_blocker)
)


def gated_basis(gm, targets=None, *, r=3, seed=0, form="activation", adapter="default", exclude=None):
    """The pass: one adapter of the custom kind per selected weight (r may be per site)."""
    rw = fxtune.Rewrite(gm, kind=KIND, adapter=adapter)
    g = torch.Generator().manual_seed(seed)
    for target, found in rw.select(targets, exclude=exclude).items():
        site = found[0]
        rank = fxtune.per_site(r, site, 3)
        w = rw.weight(target)
        basis = torch.randn((rank, *w.shape[1:]), generator=g, dtype=w.dtype) / w[0].numel() ** 0.5
        rw.attach(
            target,
            params={"coef": torch.ones(rank), "up": torch.zeros(site.out_features, rank, *([1] * len(site.kernel_size))),
                    "gate": torch.zeros(site.out_features)},
            buffers={"basis": basis},
            config={"r": rank},
            form=form,
        )
    return rw.finish()




class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3, padding=1, padding_mode="circular")
        self.grouped = nn.Conv2d(6, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        h = torch.relu(self.grouped(torch.relu(self.c(x)))).mean((2, 3))
        return self.head(torch.relu(self.fc(h)))


SITES = ["c", "grouped", "fc", "head"]


def net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def batch():
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def slot(gm, name, adapter="default"):
    return gm.get_submodule(f"fxtune.{adapter}.{name}")


def randomize(gm, adapter="default", seed=0, names=SITES):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in names:
            s = slot(gm, n, adapter)
            for t in (s.coef, s.up, s.gate):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def formula64(w, b, s):
    """W', b' of the kind in float64, written out: W' = diag(1+g)(W + Σ_i c_i V[:, i] ⊗ E_i)."""
    basis, coef, up, gate = (t.detach().double() for t in (s.basis, s.coef, s.up, s.gate))
    delta = torch.einsum("oi,i,i...->o...", up.flatten(1), coef, basis)
    factor = (1 + gate).reshape(-1, *([1] * (w.dim() - 1)))
    return factor * (w.double() + delta), None if b is None else (1 + gate) * b.double()


def expected(model, gm, adapters=("default",), names=SITES):
    """{name: (W', b')} with the listed adapters applied in order, float64."""
    out = {}
    for n in names:
        m = model.get_submodule(n)
        w, b = m.weight.detach().double(), None if m.bias is None else m.bias.detach().double()
        for a in adapters:
            if f"fxtune.{a}.{n}" in dict(gm.named_modules()):
                w, b = formula64(w, b, slot(gm, n, a))
        out[n] = (w, b)
    return out


def run64(model, weights, x):
    params = {f"{n}.weight": w for n, (w, _) in weights.items()}
    params.update({f"{n}.bias": b for n, (_, b) in weights.items() if b is not None})
    return functional_call(copy.deepcopy(model).double(), params, (x.double(),))


@pytest.mark.parametrize("form", ["activation", "weight"])
def test_adapted_output_matches_the_float64_formula(form):
    model, x = net(), batch()
    gm = fxtune.trace(model)
    adapted = gated_basis(gm, form=form)
    assert torch.allclose(adapted(x), model(x), rtol=0, atol=1e-6)  # W' = W at init
    randomize(adapted)
    torch.testing.assert_close(adapted(x).double(), run64(model, expected(model, adapted), x), rtol=1e-5, atol=1e-6)
    if form == "activation":
        assert "test_gated_basis_weight" in adapted.code  # the grouped conv falls back to the weight form
        assert "fc_gb = fc_gb_inner * fc_gb_factor" in adapted.code


def test_fuse_equals_the_formula_and_gives_back_the_traced_code():
    model, x = net(), batch()
    gm = fxtune.trace(model)
    adapted = gated_basis(gm)
    randomize(adapted)
    fused = fuse(adapted)
    assert fused.code == gm.code
    weights = expected(model, adapted)
    for n, (w, b) in weights.items():
        torch.testing.assert_close(fused.get_submodule(n).weight.double(), w, rtol=1e-6, atol=1e-7)
        if b is not None:
            torch.testing.assert_close(fused.get_submodule(n).bias.double(), b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused(x).double(), run64(model, weights, x), rtol=1e-5, atol=1e-6)


def test_merge_then_unmerge_restores_base_weights_bit_exactly():
    model, x = net(), batch()
    adapted = gated_basis(fxtune.trace(model))
    randomize(adapted)
    y = adapted(x)
    merged = fxtune.merge(adapted)
    assert KIND not in merged.code
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-6)
    back = fxtune.unmerge(merged)
    for n in SITES:
        ours, base = back.get_submodule(n), model.get_submodule(n)
        assert torch.equal(ours.weight, base.weight)
        assert (ours.bias is None) == (base.bias is None) and (base.bias is None or torch.equal(ours.bias, base.bias))
    assert back.code == adapted.code and torch.equal(back(x), y)


def test_set_active_switches_between_adapters_of_the_custom_kind():
    model, x = net(), batch()
    gm = gated_basis(gated_basis(fxtune.trace(model), adapter="a", seed=1), targets=["fc", "head"], adapter="b", seed=2)
    randomize(gm, "a", seed=3)
    randomize(gm, "b", seed=4, names=["fc", "head"])
    only_a = fxtune.set_active(gm, "a")
    torch.testing.assert_close(only_a(x).double(), run64(model, expected(model, gm, ["a"]), x), rtol=1e-5, atol=1e-6)
    assert torch.equal(fxtune.set_active(gm, [])(x), model(x))
    both = fxtune.set_active(only_a, ["a", "b"])
    torch.testing.assert_close(both(x).double(), run64(model, expected(model, gm, ["a", "b"]), x), rtol=1e-5, atol=1e-6)


def test_summary_row_names_the_kind_its_form_and_its_parameters():
    gm = gated_basis(fxtune.trace(net()), targets=["fc", "grouped"], r=2, adapter="mine")
    rows = {line.split()[0]: line for line in fxtune.summary(gm).splitlines()[2:-1]}
    assert re.search(rf"mine:{KIND}\[activation\]\s+26\s+26$", rows["fc"])  # c 2 + V 8·2 + g 8; E is a buffer
    assert f"mine:{KIND}[weight] (grouped conv" in rows["grouped"]
    assert rows["c"].split()[3] == "-"
    assert fxtune.adapters(gm)[0].kind == KIND


def test_saved_adapter_reloads_bit_identically_on_a_fresh_trace(tmp_path):
    model, x = net(), batch()
    adapted = gated_basis(fxtune.trace(model), r={"fc": 4}, adapter="mine")
    randomize(adapted, "mine")
    fxtune.save_adapters(adapted, str(tmp_path), adapter="mine")
    loaded = fxtune.load_adapters(fxtune.trace(net()), str(tmp_path))
    assert loaded.code == adapted.code
    mine = {k: v for k, v in adapted.state_dict().items() if k.startswith("fxtune.")}
    theirs = {k: v for k, v in loaded.state_dict().items() if k.startswith("fxtune.")}
    assert mine.keys() == theirs.keys() and "fxtune.mine.fc.basis" in mine
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert slot(loaded, "fc", "mine").config == {"r": 4}
    assert torch.equal(loaded(x), adapted(x))


def test_kind_functions_must_be_module_level():
    def local_weight(w, *, s):
        return w * s

    with pytest.raises(fxtune.AdapterError, match="local function"):
        fxtune.register_kind(fxtune.AdapterKind("test_local", weight=local_weight))


def test_the_guide_example_runs(tmp_path):
    """docs/custom_kinds.md: its Python blocks, concatenated, run as a script (they assert their claims)."""
    guide = pathlib.Path(__file__).resolve().parents[1] / "docs" / "custom_kinds.md"
    blocks = re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.S)
    assert blocks
    script = tmp_path / "guide_example.py"
    script.write_text("\n".join(blocks))
    runpy.run_path(str(script), run_name="guide_example")
