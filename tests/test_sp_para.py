"""SPPaRA: W' = M ⊙ (W + P at the centre tap), b' = m_out ⊙ b, checked against float64 references."""

from __future__ import annotations

import pytest
import torch
from core_helpers import assert_unchanged, snapshot
from sp_helpers import (
    SITES,
    inputs,
    masked_bias,
    masks,
    perturb_masked_inputs,
    randomize,
    ref_call,
    ref_keep,
    site_input,
    sp_net,
    summary_numbers,
)
from torch import nn

import fxtune
from fxtune.passes import fuse, sp_para


def reference(model: nn.Module, gm: nn.Module, ms: dict) -> dict:
    """{site: (W', b')} in float64 from the slot's P, put at the kernel's centre."""
    refs = {}
    for name in SITES:
        mod, slot = model.get_submodule(name), gm.fxtune.default.get_submodule(name)
        w = mod.weight.detach().double()
        delta = torch.zeros_like(w)
        delta[(slice(None), slice(None), *(k // 2 for k in w.shape[2:]))] = slot.sp_para_p.detach().double()
        keep = ref_keep(mod, **ms[name]).double().view(*w.shape[:2], *([1] * (w.dim() - 2)))
        refs[name] = ((w + delta) * keep, masked_bias(mod, ms[name]["out_mask"]))
    return refs


def adapted():
    model = sp_net()
    snap = snapshot(model)
    gm = fxtune.trace(model)
    gm_snap = snapshot(gm)
    out = sp_para(gm, masks=masks())
    randomize(out)
    assert_unchanged(gm, gm_snap)
    assert_unchanged(model, snap)
    return model, snap, out


def test_adapted_and_fused_outputs_match_fp64_formula():
    model, snap, gm = adapted()
    refs = reference(model, gm, masks())
    xs = inputs()
    gm_snap = snapshot(gm)
    fused = fuse(gm)
    assert fused.code == fxtune.trace(model).code
    for y_gm, y_fused, name in zip(gm(*xs), fused(*xs), SITES):
        expected = ref_call(model.get_submodule(name), site_input(name, xs), *refs[name])
        torch.testing.assert_close(y_gm.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_fused.double(), expected, rtol=1e-5, atol=1e-5)
    assert_unchanged(gm, gm_snap)
    assert_unchanged(model, snap)


def test_masked_entries_get_no_gradient_and_are_not_counted():
    model, snap, gm = adapted()
    ms = masks()
    g = torch.Generator().manual_seed(3)
    sum((y * torch.randn(y.shape, generator=g)).sum() for y in gm(*inputs())).backward()
    rows, trainable, total = summary_numbers(fxtune.summary(gm))
    expected_total = 0
    for name in SITES:
        p = gm.fxtune.default.get_submodule(name).sp_para_p
        keep = ref_keep(model.get_submodule(name), **ms[name])
        assert p.shape == keep.shape
        assert (p.grad[~keep] == 0).all() and (p.grad[keep] != 0).all(), name
        assert rows[name] == (int(keep.sum()), int(keep.sum())), name
        expected_total += int(keep.sum())
    assert trainable == expected_total
    assert total == sum(p.numel() for p in model.parameters()) + expected_total  # masked entries: not counted anywhere
    assert_unchanged(model, snap)


def test_masked_outputs_are_zero_and_masked_inputs_have_no_effect():
    model, snap, gm = adapted()
    fused, ms, xs = fuse(gm), masks(), inputs()
    for graph in (gm, fused):
        ys = graph(*xs)
        for i, name in enumerate(SITES):
            out_mask, in_mask = ms[name]["out_mask"], ms[name]["in_mask"]
            assert (ys[i][:, ~out_mask] == 0).all() and (ys[i][:, out_mask] != 0).any(), name
            moved = graph(*perturb_masked_inputs(xs, name, in_mask))[i]
            assert torch.equal(moved, ys[i]), name
    for name in SITES:
        bias = fused.get_submodule(name).bias
        if bias is not None:
            assert (bias[~ms[name]["out_mask"]] == 0).all()
    assert_unchanged(model, snap)


def test_without_masks_it_is_a_dense_centre_tap_residual():
    model, xs = sp_net(), inputs()
    gm = sp_para(fxtune.trace(model), ["c2", "grouped"])
    randomize(gm)
    ys = gm(*xs)
    for i, name in ((2, "c2"), (4, "grouped")):
        slot = gm.fxtune.default.get_submodule(name)
        assert slot.num_params() == slot.sp_para_p.numel() == model.get_submodule(name).weight[:, :, 0, 0].numel()
        mod = model.get_submodule(name)
        w = mod.weight.detach().double().clone()
        w[:, :, 1, 1] += slot.sp_para_p.detach().double()
        expected = ref_call(mod, xs[2], w, mod.bias.detach().double())
        torch.testing.assert_close(ys[i].double(), expected, rtol=1e-5, atol=1e-5)


def test_refuses_even_kernels_and_bad_masks_naming_the_site():
    gm = fxtune.trace(nn.Sequential(nn.Conv1d(3, 4, 3), nn.Conv1d(4, 4, 2)))
    with pytest.raises(fxtune.AdapterError, match=r"'1'.*\(2,\)"):
        sp_para(gm)
    with pytest.raises(fxtune.AdapterError, match=r"masks\['0'\]\['out_mask'\].*bool.*int64"):
        sp_para(gm, "0", masks={"0": {"out_mask": torch.ones(4, dtype=torch.long)}})
