"""ia3: output/input scaling, both forms, on every kind of site, against an fp64 reference."""

from __future__ import annotations

import pytest
import torch
from fxtune.passes import fuse, ia3
from transform_helpers import (
    SITES,
    assert_close,
    assert_only_adapters_got_gradients,
    assert_unchanged,
    base64,
    groups_of,
    ia3_ref,
    inputs,
    net,
    randomize,
    reference,
    slot,
    snapshot,
    traced_code,
)

import fxtune

POSITIONS = ["output", "input"]
FORMS = ["activation", "weight"]


def _scales(name, p, g):
    return 0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("form", FORMS)
def test_init_is_exactly_a_no_op(position, form):
    model, xs = net(), inputs()
    gm = fxtune.trace(model)
    g = ia3(gm, position=position, form=form)
    assert torch.equal(g(*xs), gm(*xs))
    assert torch.equal(g(*xs), model(*xs))


@pytest.mark.parametrize("position", POSITIONS)
def test_scale_shapes_follow_channels_and_groups(position):
    model = net()
    g = ia3(fxtune.trace(model), position=position)
    for name in SITES:
        m = model.get_submodule(name)
        expected = m.weight.shape[0] if position == "output" else m.weight.shape[1] * groups_of(model, name)
        s = slot(g, name).scale
        assert s.shape == (expected,) and torch.equal(s, torch.ones(expected))
        assert slot(g, name).config == {"position": position}


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("form", FORMS)
def test_matches_fp64_reference_and_fuses(position, form):
    model, xs = net(), inputs()
    snap = snapshot(model)
    gm = fxtune.trace(model)
    g = ia3(gm, position=position, form=form)
    assert_unchanged(model, snap)
    randomize(g, _scales)
    base = base64(model)
    weights = {n: ia3_ref(*base[n], slot(g, n).scale, position, groups_of(model, n)) for n in SITES}
    ref = reference(model, weights, xs)
    assert_close(g(*xs), ref)
    fused = fuse(g)
    assert_unchanged(model, snap)
    assert fused.code == traced_code(model)
    assert_close(fused(*xs), ref)
    for n in SITES:  # the folded constants themselves
        w, b = weights[n]
        assert_close(fused.get_submodule(n).weight, w, rtol=1e-6)
        if b is not None:
            assert_close(fused.get_submodule(n).bias, b, rtol=1e-6)
    assert torch.equal(gm(*xs), model(*xs))  # the pass's input GraphModule still works as before


@pytest.mark.parametrize("position", POSITIONS)
def test_activation_and_weight_forms_agree(position):
    model, xs = net(), inputs()
    gm = fxtune.trace(model)
    act = ia3(gm, position=position, form="activation")
    wgt = ia3(gm, position=position, form="weight")
    randomize(act, _scales, seed=3)
    randomize(wgt, _scales, seed=3)
    torch.testing.assert_close(act(*xs), wgt(*xs), rtol=1e-5, atol=1e-6)
    assert "ia3_weight" not in act.code and "ia3_weight" in wgt.code


def test_activation_form_code_reads_as_a_multiply():
    model = net()
    out = ia3(fxtune.trace(model), targets=["c2", "fc"])
    assert "c2_ia3 = c2 * c2_ia3_scale_view" in out.code
    assert "fc_ia3 = fc * fc_scale" in out.code
    inp = ia3(fxtune.trace(model), targets=["c2", "fc"], position="input")
    assert "c2_ia3_input = b * c2_ia3_scale_view" in inp.code
    assert "c2 = self.c2(c2_ia3_input)" in inp.code
    assert "fc = self.fc(fc_ia3_input)" in inp.code


def test_gradients_reach_only_the_scales():
    model, xs = net(), inputs()
    g = ia3(fxtune.trace(model), position="input")
    randomize(g, _scales)
    g(*xs).square().sum().backward()
    assert_only_adapters_got_gradients(g, model)
    assert len(fxtune.trainable_parameters(g)) == len(SITES)


def test_summary_and_state_dict_keys():
    model = net()
    g = ia3(fxtune.trace(model), targets="c*", adapter="scales")
    text = fxtune.summary(g)
    assert "scales:ia3[activation]" in text
    assert {k for k in g.state_dict() if k.startswith("fxtune.")} == {f"fxtune.scales.{n}.scale" for n in ("c1", "c2", "c3")}


def test_bad_options_are_refused():
    gm = fxtune.trace(net())
    with pytest.raises(fxtune.AdapterError, match="position"):
        ia3(gm, position="middle")
    with pytest.raises(fxtune.AdapterError, match="form"):
        ia3(gm, form="auto")
    with pytest.raises(fxtune.SelectionError, match="Available sites"):
        ia3(gm, targets="nothing*")


class ComputedBias(torch.nn.Module):
    """A linear whose bias is computed in the graph (not a parameter the fold could replace)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(5, 3)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.fc.weight, self.fc.bias * 2)


def test_input_scaling_leaves_the_bias_alone_even_where_it_is_computed():
    torch.manual_seed(0)
    model = ComputedBias()
    gm = ia3(fxtune.trace(model), position="input", form="weight")
    assert "ia3_bias" not in gm.code
    s = torch.rand(5, dtype=torch.float64) + 0.5
    with torch.no_grad():
        slot(gm, "fc").scale.copy_(s)
    x = torch.randn(4, 5, dtype=torch.float64)
    w, b = model.fc.weight.double(), model.fc.bias.double()
    expected = (x * s) @ w.T + 2 * b
    fused = fuse(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x.float()).double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused(x.float()).double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(fxtune.FusionError, match="bias is computed in the graph"):
        fuse(ia3(fxtune.trace(model), position="output", form="weight"))


def test_merge_refuses_a_computed_bias_it_would_change_as_fuse_does():
    from core_helpers import assert_unchanged as assert_gm_unchanged, snapshot as gm_snapshot

    gm = ia3(fxtune.trace(ComputedBias()), position="output", form="weight")
    before = gm_snapshot(gm)
    with pytest.raises(fxtune.FusionError, match="bias is computed in the graph"):
        fxtune.merge(gm)
    assert_gm_unchanged(gm, before)
    merged = fxtune.merge(ia3(fxtune.trace(ComputedBias()), position="input", form="weight"))  # leaves the bias alone
    assert [s.merged for s in fxtune.adapters(merged)] == [True]
