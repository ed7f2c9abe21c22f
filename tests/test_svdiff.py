"""svdiff: a trainable shift of the singular values (per group), against an fp64 reference."""

from __future__ import annotations

import pytest
import torch
from fxtune.passes import fuse, svdiff
from torch import nn
from transform_helpers import (
    SITES,
    assert_close,
    assert_only_adapters_got_gradients,
    assert_unchanged,
    base64,
    group_svds,
    groups_of,
    inputs,
    net,
    reference,
    slot,
    snapshot,
    svdiff_ref,
    traced_code,
)

import fxtune


def _random_deltas(g, model, seed=0):
    """δ = σ·u with u ~ U(-1.5, 1): about a fifth of σ + δ is negative, so relu clips some."""
    gen = torch.Generator().manual_seed(seed)
    base = base64(model)
    with torch.no_grad():
        for n in SITES:
            sigma = torch.stack([s for _, s, _ in group_svds(base[n][0], groups_of(model, n))])
            u = torch.rand(sigma.shape, generator=gen, dtype=torch.float64) * 2.5 - 1.5
            slot(g, n).delta.copy_(sigma * u)


def test_zero_delta_reproduces_the_output():
    model, xs = net(), inputs()
    g = svdiff(fxtune.trace(model))
    with torch.no_grad():
        y, base = g(*xs), model(*xs)
    assert float((y - base).norm() / base.norm()) < 1e-5
    # stronger, as documented in passes/svdiff.py: W' = W + U·diag(relu(σ) − σ)·Vᵀ is exactly W
    assert torch.equal(y, base)


def test_factors_and_delta_shapes_per_group():
    model = net()
    g = svdiff(fxtune.trace(model))
    base = base64(model)
    for n in SITES:
        w, groups = base[n][0], groups_of(model, n)
        out, rest = w.shape[0], w[0].numel()
        r = min(out // groups, rest)
        sl = slot(g, n)
        assert sl.delta.shape == (groups, r) and torch.equal(sl.delta, torch.zeros(groups, r))
        assert sl.u.shape == (groups, out // groups, r) and sl.vh.shape == (groups, r, rest)
        assert sl.u.dtype == sl.sigma.dtype == sl.vh.dtype == torch.float32
        expected_sigma = torch.stack([s for _, s, _ in group_svds(w, groups)])
        torch.testing.assert_close(sl.sigma.double(), expected_sigma, rtol=1e-6, atol=1e-7)


def test_grouped_reference_is_not_the_whole_matrix_svd():
    """The per-group test below can tell the two apart: the grouped conv's singular values differ."""
    w = base64(net())["grouped"][0]
    per_group = torch.cat([s for _, s, _ in group_svds(w, 4)])
    whole = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
    assert per_group.shape != whole.shape or not torch.allclose(per_group, whole)


def test_matches_fp64_per_group_reference_and_fuses():
    model, xs = net(), inputs()
    snap = snapshot(model)
    gm = fxtune.trace(model)
    g = svdiff(gm)
    assert_unchanged(model, snap)
    _random_deltas(g, model)
    base = base64(model)
    clipped = 0
    weights = {}
    for n in SITES:
        sl = slot(g, n)
        clipped += int((sl.sigma + sl.delta < 0).sum())
        weights[n] = (svdiff_ref(base[n][0], sl.delta, groups_of(model, n)), base[n][1])
    assert clipped > 0  # relu is exercised
    ref = reference(model, weights, xs)
    assert_close(g(*xs), ref, rtol=1e-5)
    fused = fuse(g)
    assert_unchanged(model, snap)
    assert fused.code == traced_code(model)
    assert_close(fused(*xs), ref, rtol=1e-5)
    for n in SITES:
        assert_close(fused.get_submodule(n).weight, weights[n][0], rtol=1e-5)
    assert torch.equal(gm(*xs), model(*xs))


def test_factors_are_derived_buffers_not_state_or_trainable():
    model, xs = net(), inputs()
    g = svdiff(fxtune.trace(model))
    trainable = {id(p) for p in fxtune.trainable_parameters(g)}
    state = g.state_dict()
    for n in SITES:
        sl = slot(g, n)
        prefix = f"fxtune.default.{n}."
        assert id(sl.delta) in trainable and prefix + "delta" in state
        for name in ("u", "sigma", "vh"):
            t = getattr(sl, name)
            assert id(t) not in trainable and not t.requires_grad
            assert prefix + name not in state
            assert name in dict(sl.named_buffers()) and name in sl._non_persistent_buffers_set
    assert len(trainable) == len(SITES)
    _random_deltas(g, model, seed=1)
    g(*xs).square().sum().backward()
    assert_only_adapters_got_gradients(g, model)


def test_save_and_load_rederive_the_factors(tmp_path):
    model, xs = net(), inputs()
    g = svdiff(fxtune.trace(model))
    _random_deltas(g, model, seed=2)
    fxtune.save_adapters(g, str(tmp_path))
    back = fxtune.load_adapters(fxtune.trace(model), str(tmp_path))
    assert torch.equal(back(*xs), g(*xs))
    assert set(dict(slot(back, "grouped").named_buffers())) == {"u", "sigma", "vh"}


def test_base_dtype_is_kept_and_summary_counts_delta():
    model = nn.Sequential(nn.Linear(6, 4), nn.Conv1d(4, 4, 3, groups=2)).double()
    g = svdiff(fxtune.trace(model))
    assert slot(g, "0").u.dtype == torch.float64 and slot(g, "1").delta.shape == (2, 2)
    assert "default:svdiff[weight]" in fxtune.summary(g)
    assert fxtune.summary(g).splitlines()[-1].startswith("2/2 sites adapted · trainable 8 of")


def test_meta_weights_are_refused():
    gm = fxtune.trace(nn.Sequential(nn.Linear(6, 4)).to("meta"))
    with pytest.raises(fxtune.AdapterError, match="meta device"):
        svdiff(gm)
