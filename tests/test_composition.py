"""Several adapters on one site compose in graph order, W' = f_2(f_1(W)), in every form the core
may emit them in; and different kinds live side by side on different sites. fp64 references."""

from __future__ import annotations

import pytest
import torch

import fxtune
from fxtune.passes import fuse, ia3, lora, slice_delta, svdiff
from transform_helpers import (
    SITES,
    assert_close,
    assert_unchanged,
    base64,
    group_svds,
    groups_of,
    ia3_ref,
    inputs,
    lora_ref,
    net,
    reference,
    slice_ref,
    slot,
    snapshot,
    svdiff_ref,
    traced_code,
)

FORCED = "a weight-form adapter follows it on this site"


def _randomize(g, model, seed=0):
    """Non-trivial values for every adapter in g, by kind (only g's own tensors are written)."""
    gen = torch.Generator().manual_seed(seed)
    base = base64(model)
    with torch.no_grad():
        for sl in g.get_submodule("fxtune").modules():
            if not isinstance(sl, fxtune.AdapterSlot):
                continue
            if sl.kind == "lora":
                sl.lora_a.copy_(0.3 * torch.randn(sl.lora_a.shape, generator=gen))
                sl.lora_b.copy_(0.3 * torch.randn(sl.lora_b.shape, generator=gen))
            elif sl.kind == "ia3":
                sl.scale.copy_(0.5 + torch.rand(sl.scale.shape, generator=gen))
            elif sl.kind == "slice_delta":
                sl.tuner.copy_(0.3 * torch.randn(sl.tuner.shape, generator=gen) + (sl.config["op"] == "mul"))
            elif sl.kind == "svdiff":
                w = base[sl.target][0]
                sigma = torch.stack([s for _, s, _ in group_svds(w, groups_of(model, sl.target))])
                sl.delta.copy_(sigma * (torch.rand(sigma.shape, generator=gen, dtype=torch.float64) * 2.5 - 1.5))


def _apply(sl, model, name, w, b, base_w):
    """One adapter's meaning on (W, b), written out in fp64; `base_w` is the traced weight."""
    if sl.kind == "lora":
        return lora_ref(w, sl), b
    if sl.kind == "ia3":
        return ia3_ref(w, b, sl.scale, sl.config["position"], groups_of(model, name))
    if sl.kind == "slice_delta":
        c = sl.config
        return slice_ref(w, sl.tuner, c["row"], c["col"], c["op"]), b
    # svdiff: the spectral shift of the base weight, U·diag(relu(σ+δ))·Vᵀ − W, added to what came before
    return w + (svdiff_ref(base_w, sl.delta, groups_of(model, name)) - base_w), b


def _reference(g, model, chain, xs, sites=SITES):
    """Output of the model with each site's weights put through the adapters `chain` (in order)."""
    base = base64(model)
    weights = {}
    for n in sites:
        w, b = base[n]
        for adapter in chain[n] if isinstance(chain, dict) else chain:
            w, b = _apply(slot(g, n, adapter), model, n, w, b, base[n][0])
        weights[n] = (w, b)
    return reference(model, weights, xs), weights


def _check(g, model, chain, xs, snap, sites=SITES):
    ref, weights = _reference(g, model, chain, xs, sites)
    assert_close(g(*xs), ref)
    fused = fuse(g)
    assert_unchanged(model, snap)
    assert fused.code == traced_code(model)
    assert_close(fused(*xs), ref)
    for n in sites:
        assert_close(fused.get_submodule(n).weight, weights[n][0], rtol=1e-5)


def _forms(g, site):
    """The summary's row of one site (it lists each adapter with the form it is emitted in)."""
    return next(line for line in fxtune.summary(g).splitlines() if line.startswith(site + " "))


FORM_PAIRS = [("activation", "activation"), ("weight", "weight"), ("activation", "weight"), ("weight", "activation")]


@pytest.mark.parametrize("position", ["output", "input"])
@pytest.mark.parametrize("lora_form, ia3_form", FORM_PAIRS)
@pytest.mark.parametrize("lora_first", [True, False], ids=["lora_then_ia3", "ia3_then_lora"])
def test_lora_and_ia3_on_one_site(position, lora_form, ia3_form, lora_first):
    model, xs = net(), inputs()
    snap = snapshot(model)
    gm = fxtune.trace(model)
    steps = [
        lambda m: lora(m, r=2, form=lora_form, adapter="lo"),
        lambda m: ia3(m, position=position, form=ia3_form, adapter="sc"),
    ]
    order = ["lo", "sc"] if lora_first else ["sc", "lo"]
    g = gm
    for step in steps if lora_first else steps[::-1]:
        g = step(g)
        assert_unchanged(model, snap)
    _randomize(g, model)
    _check(g, model, order, xs, snap)
    first_form = lora_form if lora_first else ia3_form
    second_form = ia3_form if lora_first else lora_form
    row = _forms(g, "c2")
    assert (FORCED in row) == (first_form == "activation" and second_form == "weight")


@pytest.mark.parametrize("kind", ["slice_delta", "svdiff"])
@pytest.mark.parametrize("lora_first", [True, False], ids=["after_lora", "before_lora"])
def test_weight_only_kinds_with_activation_lora(kind, lora_first):
    model, xs = net(), inputs()
    snap = snapshot(model)
    gm = fxtune.trace(model)
    other = (lambda m: slice_delta(m, size=0.5, adapter="w")) if kind == "slice_delta" else (lambda m: svdiff(m, adapter="w"))
    add_lora = lambda m: lora(m, r=2, form="activation", adapter="lo")  # noqa: E731
    g = other(add_lora(gm)) if lora_first else add_lora(other(gm))
    assert_unchanged(model, snap)
    _randomize(g, model, seed=1)
    _check(g, model, ["lo", "w"] if lora_first else ["w", "lo"], xs, snap)
    row = _forms(g, "grouped")
    assert (f"lo:lora[weight] ({FORCED})" in row) == lora_first
    assert ("lo:lora[activation]" in row) == (not lora_first)


def test_different_kinds_on_different_sites():
    model, xs = net(), inputs()
    snap = snapshot(model)
    g = fxtune.trace(model)
    g = lora(g, targets="c1", r=2, form="activation", adapter="lo")
    g = ia3(g, targets="c2", adapter="out")
    g = ia3(g, targets=["fc", "depthwise"], position="input", adapter="inp")
    g = slice_delta(g, targets="grouped", size=0.3, adapter="sl")
    g = slice_delta(g, targets="c3", size=(2, 9), op="mul", where="top-left", adapter="mul")
    g = svdiff(g, targets=["depthwise", "c2"], adapter="sv")
    assert_unchanged(model, snap)
    _randomize(g, model, seed=2)
    chain = {"c1": ["lo"], "c2": ["out", "sv"], "fc": ["inp"], "depthwise": ["inp", "sv"], "grouped": ["sl"], "c3": ["mul"]}
    _check(g, model, chain, xs, snap)
    # each adapter fused alone leaves the others out; the traced code comes back every time
    for name in ["lo", "out", "inp", "sl", "mul", "sv"]:
        alone = fuse(g, adapters=[name])
        assert alone.code == traced_code(model)
        only = {n: [a for a in chain[n] if a == name] for n in SITES}
        ref, _ = _reference(g, model, only, xs)
        assert_close(alone(*xs), ref)
