"""SPLoRA: W' = M ⊙ (W + s·C@R), b' = m_out ⊙ b, checked against float64 references written out here."""

from __future__ import annotations

import pytest
import torch
from core_helpers import Twice, assert_unchanged, snapshot
from sp_helpers import (
    SITES,
    inputs,
    kernel_volume,
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
from fxtune.passes import fuse, sp_lora

R, ALPHA = 3, 6.0


def given_masks() -> dict:
    """The test masks, with one mask and one whole site left out (they keep everything)."""
    ms = masks()
    del ms["c3"]["out_mask"]
    del ms["depthwise"]
    return ms


def complete(model: nn.Module, ms: dict) -> dict:
    out = {}
    for name in SITES:
        w = model.get_submodule(name).weight
        given = ms.get(name, {})
        out[name] = {
            "in_mask": given.get("in_mask", torch.ones(w.shape[1] * getattr(model.get_submodule(name), "groups", 1), dtype=torch.bool)),
            "out_mask": given.get("out_mask", torch.ones(w.shape[0], dtype=torch.bool)),
        }
    return out


def reference(model: nn.Module, gm: nn.Module, ms: dict, scale: float, centre_tap: bool) -> dict:
    """{site: (W', b')} in float64 from the slot's C and R."""
    refs = {}
    for name in SITES:
        mod, slot = model.get_submodule(name), gm.fxtune.default.get_submodule(name)
        w = mod.weight.detach().double()
        c, r = slot.sp_lora_c.detach().double(), slot.sp_lora_r.detach().double()
        low = c @ r.reshape(r.shape[0], -1)
        if centre_tap and w.dim() > 2:
            delta = torch.zeros_like(w)
            delta[(slice(None), slice(None), *(k // 2 for k in w.shape[2:]))] = low
        else:
            delta = low.reshape(w.shape)
        keep = ref_keep(mod, **ms[name]).double().view(*w.shape[:2], *([1] * (w.dim() - 2)))
        refs[name] = ((w + scale * delta) * keep, masked_bias(mod, ms[name]["out_mask"]))
    return refs


def adapted(centre_tap: bool = False):
    model = sp_net()
    snap = snapshot(model)
    gm = fxtune.trace(model)
    gm_snap = snapshot(gm)
    out = sp_lora(gm, r=R, alpha=ALPHA, masks=given_masks(), centre_tap=centre_tap)
    randomize(out)
    assert_unchanged(gm, gm_snap)
    assert_unchanged(model, snap)
    return model, snap, out


@pytest.mark.parametrize("centre_tap", [False, True])
def test_adapted_and_fused_outputs_match_fp64_formula(centre_tap):
    model, snap, gm = adapted(centre_tap)
    ms = complete(model, given_masks())
    refs = reference(model, gm, ms, ALPHA / R, centre_tap)
    xs = inputs()
    gm_snap = snapshot(gm)
    fused = fuse(gm)
    assert fused.code == fxtune.trace(model).code
    for y_gm, y_fused, name in zip(gm(*xs), fused(*xs), SITES):
        mod = model.get_submodule(name)
        expected = ref_call(mod, site_input(name, xs), *refs[name])
        torch.testing.assert_close(y_gm.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_fused.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.get_submodule(name).weight.double(), refs[name][0], rtol=1e-6, atol=1e-6)
    assert_unchanged(gm, gm_snap)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("centre_tap", [False, True])
def test_masked_entries_get_no_gradient_and_are_not_counted(centre_tap):
    model, snap, gm = adapted(centre_tap)
    ms = complete(model, given_masks())
    g = torch.Generator().manual_seed(3)
    loss = sum((y * torch.randn(y.shape, generator=g)).sum() for y in gm(*inputs()))
    loss.backward()
    rows, trainable, total = summary_numbers(fxtune.summary(gm))
    expected_total = 0
    for name in SITES:
        mod, slot = model.get_submodule(name), gm.fxtune.default.get_submodule(name)
        keep = ref_keep(mod, **ms[name])
        rows_kept, cols_kept = keep.any(1), keep.any(0)
        c_grad, r_grad = slot.sp_lora_c.grad, slot.sp_lora_r.grad
        assert (c_grad[~rows_kept] == 0).all() and (c_grad[rows_kept] != 0).all(), name
        assert (r_grad[:, ~cols_kept] == 0).all() and (r_grad[:, cols_kept] != 0).all(), name
        k = 1 if centre_tap else kernel_volume(mod)
        count = R * int(rows_kept.sum()) + R * k * int(cols_kept.sum())
        assert rows[name] == (count, count), name
        expected_total += count
    assert trainable == expected_total
    assert total == sum(p.numel() for p in model.parameters()) + expected_total  # masked entries: not counted anywhere
    assert fxtune.trainable_parameters(gm) == [p for n, p in gm.named_parameters() if n.startswith("fxtune.")]
    assert_unchanged(model, snap)


def test_masked_outputs_are_zero_and_masked_inputs_have_no_effect():
    model, snap, gm = adapted()
    fused = fuse(gm)
    ms = complete(model, given_masks())
    xs = inputs()
    for graph in (gm, fused):
        ys = graph(*xs)
        for i, name in enumerate(SITES):
            out_mask, in_mask = ms[name]["out_mask"], ms[name]["in_mask"]
            assert (ys[i][:, ~out_mask] == 0).all(), name
            assert (ys[i][:, out_mask] != 0).any(), name
            if not in_mask.all():
                moved = graph(*perturb_masked_inputs(xs, name, in_mask))[i]
                assert torch.equal(moved, ys[i]), name
    for name in SITES:
        bias = fused.get_submodule(name).bias
        if bias is not None:
            assert (bias[~ms[name]["out_mask"]] == 0).all() and (bias[ms[name]["out_mask"]] != 0).all()
    assert_unchanged(model, snap)


def test_masks_are_bool_buffers_in_the_adapter_state_copied_from_the_user():
    model = sp_net()
    ms = masks()
    kept = {n: {k: v.clone() for k, v in d.items()} for n, d in ms.items()}
    gm = sp_lora(fxtune.trace(model), ["lin", "grouped"], r=2, masks={n: ms[n] for n in ("lin", "grouped")})
    for name in ("lin", "grouped"):
        ms[name]["in_mask"].logical_not_()
    state = gm.state_dict()
    for name in ("lin", "grouped"):
        for key in ("in_mask", "out_mask"):
            saved = state[f"fxtune.default.{name}.{key}"]
            assert saved.dtype == torch.bool and torch.equal(saved, kept[name][key])


def test_callable_masks_equal_dict_masks():
    model, xs = sp_net(), inputs()
    gm = fxtune.trace(model)
    torch.manual_seed(7)
    by_dict = sp_lora(gm, r=2, masks=masks())
    torch.manual_seed(7)
    by_callable = sp_lora(gm, r=2, masks=lambda site: masks()[site.name])
    randomize(by_dict)
    randomize(by_callable)
    for a, b in zip(by_dict(*xs), by_callable(*xs)):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"lin": {"in_mask": torch.ones(12)}}, ["'lin'", "in_mask", "bool", "float32"]),
        ({"lin": {"out_mask": torch.ones(7, dtype=torch.bool)}}, ["'lin'", "out_mask", "(8,)", "(7,)"]),
        ({"grouped": {"in_mask": torch.ones(4, dtype=torch.bool)}}, ["'grouped'", "(8,)", "all groups"]),
        ({"lin": {"inmask": torch.ones(12, dtype=torch.bool)}}, ["'lin'", "inmask"]),
        ({"nope": {}}, ["nope", "lin"]),
        ({"lin": [1, 0]}, ["'lin'", "list"]),
    ],
)
def test_invalid_masks_are_refused_naming_the_site(bad, words):
    gm = fxtune.trace(sp_net())
    with pytest.raises(fxtune.AdapterError) as err:
        sp_lora(gm, masks=bad)
    for word in words:
        assert word in str(err.value)


def test_centre_tap_refuses_even_kernels():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, (3, 2)))
    gm = fxtune.trace(model)
    with pytest.raises(fxtune.AdapterError, match=r"'1'.*\(3, 2\)"):
        sp_lora(gm, centre_tap=True)
    out = sp_lora(gm, r=2)
    assert out.fxtune.default.get_submodule("1").sp_lora_r.shape == (2, 4, 3, 2)


def test_shared_weight_takes_the_mask_of_its_first_call():
    model = Twice()
    gm = fxtune.trace(model)
    keep = torch.tensor([True] * 6 + [False] * 2)
    out = sp_lora(gm, ["fc", "fc@1"], r=2, masks={"fc": {"out_mask": keep}})
    fused = fuse(out)
    assert (fused.fc.weight[~keep] == 0).all() and (fused.fc.bias[~keep] == 0).all()
    assert fused.code == fxtune.trace(model).code
    with pytest.raises(fxtune.AdapterError, match="first call"):
        sp_lora(gm, ["fc", "fc@1"], masks={"fc@1": {"out_mask": keep}})


def test_adapter_files_keep_the_masks_and_store_only_kept_entries(tmp_path):
    model, _, gm = adapted()
    fxtune.save_adapters(gm, str(tmp_path))
    back = fxtune.load_adapters(fxtune.trace(model), str(tmp_path))
    xs = inputs()
    assert all(torch.equal(a, b) for a, b in zip(gm(*xs), back(*xs)))
    assert torch.equal(back.fxtune.default.lin.in_mask, masks()["lin"]["in_mask"])
    assert summary_numbers(fxtune.summary(back)) == summary_numbers(fxtune.summary(gm))
