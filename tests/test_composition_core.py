"""The core composes adapters on one site in graph order, whatever forms they take.

A custom input-side kind (W' = W·diag(s) over input channels, realised in activation form by
scaling the site's input) is combined with LoRA on the same sites, in both orders and all four
form combinations; the result must equal applying the two weight transforms in that order,
computed in float64 by the test.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import fxtune
from core_helpers import (
    Twice,
    assert_unchanged,
    lora_delta64,
    lora_slots,
    randomize_lora,
    rel_err,
    small_net,
    snapshot,
)
from fxtune.passes import fuse, lora


def inscale_weight(w, *, s, groups):
    """W'[o, j, ...] = W[o, j, ...] · s[input channel of column j for output o]."""
    out, cin_g = w.shape[0], w.shape[1]
    ones = [1] * (w.dim() - 2)
    per_out = s.view(groups, 1, cin_g, *ones).expand(groups, out // groups, cin_g, *ones)
    return w * per_out.reshape(out, cin_g, *ones)


def inscale_input(em, x, inputs):
    """The same meaning on activations: the site (and every inner adapter) reads x·s."""
    return em.mul(x, em.channel_view(inputs["s"], role="inscale_view"), role="inscale")


fxtune.register_kind(fxtune.AdapterKind("test_inscale", weight=inscale_weight, activation_input=inscale_input))


def inscale(gm, targets=None, *, form="activation", adapter="scale", seed=0):
    """A pass built only from the public core API: one input-channel scale per selected weight."""
    rw = fxtune.Rewrite(gm, kind="test_inscale", adapter=adapter)
    g = torch.Generator().manual_seed(seed)
    for target, found in rw.select(targets).items():
        site = found[0]
        s = 1 + 0.3 * torch.randn(site.in_features, generator=g)
        rw.attach(target, params={"s": s}, config={"groups": site.groups}, form=form)
    return rw.finish()


def scale_columns64(w: torch.Tensor, s: torch.Tensor, groups: int) -> torch.Tensor:
    """The reference, written with explicit indices: column j of output o reads input channel
    (o // (out/groups))·(in/groups) + j."""
    out, cin_g = w.shape[0], w.shape[1]
    channel = (torch.arange(out)[:, None] // (out // groups)) * cin_g + torch.arange(cin_g)[None, :]
    factor = s.double()[channel]  # (out, cin_g)
    return w.double() * factor.view(out, cin_g, *([1] * (w.dim() - 2)))


TARGETS = ["c1d", "c3d", "stem", "grouped", "depthwise", "dilated", "reflect", "circular", "same", "tok", "fc"]
FORMS = ["weight", "activation"]


def _reference(model, gm, order, targets, lora_scale=1.0):
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for path in targets:
            m = ref.get_submodule(path)
            w = m.weight
            groups = getattr(m, "groups", 1)
            s = gm.get_submodule(f"fxtune.scale.{path}").s.detach()
            delta = lora_delta64(gm.get_submodule(f"fxtune.default.{path}"), w.shape, lora_scale)
            if order == "lora_first":
                new = scale_columns64(w + delta, s, groups)
            else:
                new = scale_columns64(w, s, groups) + delta
            w.copy_(new)
    return ref


@pytest.mark.parametrize("lora_form,scale_form", list(itertools.product(FORMS, FORMS)))
@pytest.mark.parametrize("order", ["lora_first", "scale_first"])
def test_input_scale_and_lora_compose_in_order(order, lora_form, scale_form):
    model = small_net()
    model_snap = snapshot(model)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    gm = fxtune.trace(model)
    if order == "lora_first":
        gm = lora(gm, TARGETS, r=2, alpha=3.0, form=lora_form)
        randomize_lora(gm, std=0.05)
        before = snapshot(gm)
        out = inscale(gm, TARGETS, form=scale_form)
        assert_unchanged(gm, before)
    else:
        gm = inscale(gm, TARGETS, form=scale_form)
        before = snapshot(gm)
        out = lora(gm, TARGETS, r=2, alpha=3.0, form=lora_form)
        assert_unchanged(gm, before)
        randomize_lora(out, std=0.05)
    ref = _reference(model, out, order, TARGETS, lora_scale=1.5)
    with torch.no_grad():
        expected = ref(x.double())
        assert rel_err(model(x), expected) > 1e-2
        assert rel_err(out(x), expected) < 1e-5
        out_snap = snapshot(out)
        fused = fuse(out)
        assert_unchanged(out, out_snap)
        assert rel_err(fused(x), expected) < 1e-5
    assert fused.code == fxtune.trace(model).code
    assert_unchanged(model, model_snap)


def test_order_matters():
    """The two orders give different weights (so the test above can tell them apart)."""
    model = small_net()
    a = inscale(lora(fxtune.trace(model), ["fc"], r=2, form="weight"), ["fc"])
    randomize_lora(a, std=0.1)
    b = lora(inscale(fxtune.trace(model), ["fc"]), ["fc"], r=2, form="weight")
    with torch.no_grad():
        b.fxtune.default.fc.lora_a.copy_(a.fxtune.default.fc.lora_a)
        b.fxtune.default.fc.lora_b.copy_(a.fxtune.default.fc.lora_b)
    wa, wb = fuse(a).fc.weight, fuse(b).fc.weight
    assert not torch.allclose(wa, wb, atol=1e-4)
    assert rel_err(wa, _reference(model, a, "lora_first", ["fc"]).fc.weight) < 1e-6
    assert rel_err(wb, _reference(model, b, "scale_first", ["fc"]).fc.weight) < 1e-6


@pytest.mark.parametrize("scale_form", FORMS)
def test_input_scale_alone_and_summary(scale_form):
    model = small_net()
    gm = inscale(fxtune.trace(model), ["grouped", "reflect", "tok"], form=scale_form)
    x = torch.randn(2, 3, 16, 16)
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for path in ("grouped", "reflect", "tok"):
            m = ref.get_submodule(path)
            m.weight.copy_(scale_columns64(m.weight, gm.get_submodule(f"fxtune.scale.{path}").s, getattr(m, "groups", 1)))
        assert rel_err(gm(x), ref(x.double())) < 1e-5
        assert rel_err(fuse(gm)(x), ref(x.double())) < 1e-5
    rows = {line.split()[0]: line for line in fxtune.summary(gm).splitlines()}
    assert f"scale:test_inscale[{scale_form}]" in rows["grouped"]
    assert fuse(gm).code == fxtune.trace(model).code


def test_activation_lora_before_weight_form_is_realised_as_weight():
    """An activation-form adapter followed by a weight-form one must act on the weight (graph order)."""
    model = small_net()
    gm = lora(fxtune.trace(model), ["fc"], r=2, form="activation")
    gm = inscale(gm, ["fc"], form="weight")
    randomize_lora(gm)
    rows = {line.split()[0]: line for line in fxtune.summary(gm).splitlines()}
    assert "default:lora[weight]" in rows["fc"] and "scale:test_inscale[weight]" in rows["fc"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(gm(x), _reference(model, gm, "lora_first", ["fc"])(x.double())) < 1e-5


@pytest.mark.parametrize("forms", list(itertools.product(FORMS, FORMS)))
def test_three_adapters_on_shared_weight(forms):
    """Shared weight (fc, fc@1) with scale, then LoRA, then a second scale: rebuilt sites stay exact."""
    model = Twice().eval()
    gm = inscale(fxtune.trace(model), ["fc", "fc@1"], form=forms[0])
    gm = lora(gm, ["fc", "fc@1"], r=3, form=forms[1])
    randomize_lora(gm, std=0.2)
    gm = inscale(gm, ["fc", "fc@1"], form=forms[0], adapter="scale2", seed=1)
    assert set(lora_slots(gm)) == {"fc"}
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        w = ref.fc.weight
        w1 = scale_columns64(w, gm.fxtune.scale.fc.s, 1) + lora_delta64(gm.fxtune.default.fc, w.shape, 1.0)
        w.copy_(scale_columns64(w1, gm.fxtune.scale2.fc.s, 1))
        x = torch.randn(3, 8)
        assert rel_err(gm(x), ref(x.double())) < 1e-5
        fused = fuse(gm)
        assert rel_err(fused(x), ref(x.double())) < 1e-5
    assert fused.code == fxtune.trace(model).code
