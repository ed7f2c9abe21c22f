"""SPLoPA: W' = M ⊙ (W + Σₖ Sₖ ⊗ Cₖ@Rₖ), prototypes shared within one GraphModule, checked in float64."""

from __future__ import annotations

import pytest
import torch
from core_helpers import assert_unchanged, snapshot
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
from fxtune.passes import fuse, lora, sp_lopa

P, Q, RANK, K = 2, 3, 2, 3


def all_masks(model: nn.Module) -> dict:
    """Channel masks plus a random block mask (about 70% of blocks kept) for every site."""
    g = torch.Generator().manual_seed(11)
    ms = masks()
    for name in SITES:
        w = model.get_submodule(name).weight
        ms[name]["block_mask"] = torch.rand(w.shape[0] // P, w[0].numel() // Q, generator=g) < 0.7
    return ms


def ref_full_keep(mod: nn.Module, m: dict) -> torch.Tensor:
    """(out, in/groups·kernel) bool: channel masks and block mask, entry by entry."""
    keep, kvol = ref_keep(mod, m["in_mask"], m["out_mask"]), kernel_volume(mod)
    out, cols = mod.weight.shape[0], mod.weight[0].numel()
    full = torch.zeros(out, cols, dtype=torch.bool)
    for o in range(out):
        for c in range(cols):
            full[o, c] = bool(keep[o, c // kvol]) and bool(m["block_mask"][o // P, c // Q])
    return full


def ref_s_mask(full: torch.Tensor) -> torch.Tensor:
    a, b = full.shape[0] // P, full.shape[1] // Q
    return torch.tensor([[bool(full[i * P:(i + 1) * P, j * Q:(j + 1) * Q].any()) for j in range(b)] for i in range(a)])


def reference(model: nn.Module, gm: nn.Module, ms: dict) -> dict:
    """{site: (W', b')} in float64 with torch.kron over the prototypes."""
    refs = {}
    for name in SITES:
        mod, slot = model.get_submodule(name), gm.fxtune.default.get_submodule(name)
        w = mod.weight.detach().double()
        full = ref_full_keep(mod, ms[name])
        s = slot.sp_lopa_s.detach().double() * ref_s_mask(full).double()
        c, r = slot.sp_lopa_c.detach().double(), slot.sp_lopa_r.detach().double()
        delta = sum(torch.kron(s[k], c[k] @ r[k]) for k in range(K))
        refs[name] = (((w.flatten(1) + delta) * full.double()).view(w.shape), masked_bias(mod, ms[name]["out_mask"]))
    return refs


def adapted():
    model = sp_net()
    snap = snapshot(model)
    gm = fxtune.trace(model)
    gm_snap = snapshot(gm)
    out = sp_lopa(gm, r=RANK, num_prototypes=K, block=(P, Q), masks=all_masks(model))
    randomize(out)
    assert_unchanged(gm, gm_snap)
    assert_unchanged(model, snap)
    return model, snap, out


def test_adapted_and_fused_outputs_match_fp64_formula():
    model, snap, gm = adapted()
    ms = all_masks(model)
    refs = reference(model, gm, ms)
    xs = inputs()
    gm_snap = snapshot(gm)
    fused = fuse(gm)
    assert fused.code == fxtune.trace(model).code
    for y_gm, y_fused, name in zip(gm(*xs), fused(*xs), SITES):
        expected = ref_call(model.get_submodule(name), site_input(name, xs), *refs[name])
        torch.testing.assert_close(y_gm.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_fused.double(), expected, rtol=1e-5, atol=1e-5)
        fused_w = fused.get_submodule(name).weight.flatten(1)
        assert (fused_w[~ref_full_keep(model.get_submodule(name), ms[name])] == 0).all()
    assert_unchanged(gm, gm_snap)
    assert_unchanged(model, snap)


def test_masked_blocks_get_no_gradient_and_are_not_counted():
    model, snap, gm = adapted()
    ms = all_masks(model)
    g = torch.Generator().manual_seed(3)
    sum((y * torch.randn(y.shape, generator=g)).sum() for y in gm(*inputs())).backward()
    _, trainable, total = summary_numbers(fxtune.summary(gm))
    kept_blocks = 0
    for name in SITES:
        s = gm.fxtune.default.get_submodule(name).sp_lopa_s
        s_mask = ref_s_mask(ref_full_keep(model.get_submodule(name), ms[name]))
        assert (~s_mask).any() and s_mask.any(), name
        assert (s.grad[:, ~s_mask] == 0).all() and (s.grad[:, s_mask] != 0).all(), name
        kept_blocks += int(s_mask.sum())
    slot = gm.fxtune.default.lin
    assert (slot.sp_lopa_c.grad != 0).all() and (slot.sp_lopa_r.grad != 0).all()
    assert trainable == K * kept_blocks + K * P * RANK + K * RANK * Q
    assert total == sum(p.numel() for p in model.parameters()) + trainable  # masked blocks: not counted anywhere
    assert_unchanged(model, snap)


def test_masked_outputs_are_zero_and_masked_inputs_have_no_effect():
    model, snap, gm = adapted()
    fused, ms, xs = fuse(gm), all_masks(model), inputs()
    for graph in (gm, fused):
        ys = graph(*xs)
        for i, name in enumerate(SITES):
            out_mask, in_mask = ms[name]["out_mask"], ms[name]["in_mask"]
            assert (ys[i][:, ~out_mask] == 0).all() and (ys[i][:, out_mask] != 0).any(), name
            assert torch.equal(graph(*perturb_masked_inputs(xs, name, in_mask))[i], ys[i]), name
    assert (fused.lin.bias[~ms["lin"]["out_mask"]] == 0).all()
    assert_unchanged(model, snap)


def _prototypes(gm: nn.Module, name: str) -> tuple:
    slot = gm.fxtune.default.get_submodule(name)
    return slot.sp_lopa_c, slot.sp_lopa_r


def test_prototypes_are_one_parameter_pair_per_graph_module():
    _, _, gm = adapted()
    c, r = _prototypes(gm, "lin")
    assert all(_prototypes(gm, name)[0] is c and _prototypes(gm, name)[1] is r for name in SITES)
    params = fxtune.trainable_parameters(gm)
    assert [id(p) for p in params].count(id(c)) == 1 and [id(p) for p in params].count(id(r)) == 1
    assert len(params) == len(SITES) + 2
    later = lora(gm, "c1", r=2, adapter="other")
    c2, r2 = _prototypes(later, "lin")
    assert c2 is not c and all(_prototypes(later, name)[0] is c2 for name in SITES)
    assert torch.equal(c2, c) and torch.equal(r2, r)


def test_a_second_call_reuses_the_prototypes_of_its_block_shape():
    gm = fxtune.trace(sp_net())
    first = sp_lopa(gm, ["lin", "c1"], r=RANK, num_prototypes=K, block=(P, Q))
    second = sp_lopa(first, ["c2"], r=RANK, num_prototypes=K, block=(P, Q))
    assert _prototypes(second, "c2")[0] is _prototypes(second, "lin")[0]
    assert _prototypes(second, "c2")[0] is not _prototypes(first, "lin")[0]
    other = sp_lopa(first, ["depthwise"], r=RANK, num_prototypes=K, block=(4, 3))
    assert other.fxtune.default.depthwise.sp_lopa_c.shape == (K, 4, RANK)
    assert _prototypes(other, "depthwise")[0] is not _prototypes(other, "lin")[0]
    with pytest.raises(fxtune.AdapterError, match="already has SPLoPA prototypes"):
        sp_lopa(first, ["c2"], r=RANK + 1, num_prototypes=K, block=(P, Q))


def test_prototypes_are_not_shared_between_models():
    gm_a = sp_lopa(fxtune.trace(sp_net(0)), block=(P, Q), num_prototypes=K)
    gm_b = sp_lopa(fxtune.trace(sp_net(1)), block=(P, Q), num_prototypes=K)
    gm_c = sp_lopa(fxtune.trace(sp_net(1)), block=(P, Q), num_prototypes=K)
    assert not {id(t) for t in _prototypes(gm_a, "lin")} & {id(t) for t in _prototypes(gm_b, "lin") + _prototypes(gm_c, "lin")}
    before = [t.detach().clone() for t in _prototypes(gm_b, "lin")]
    opt = torch.optim.SGD(fxtune.trainable_parameters(gm_a), lr=0.1)
    sum(y.square().sum() for y in gm_a(*inputs())).backward()
    opt.step()
    assert not torch.equal(_prototypes(gm_a, "lin")[0], before[0])
    assert all(torch.equal(t, b) for t, b in zip(_prototypes(gm_b, "lin"), before))


def test_defaults_and_refusals_name_the_site():
    big = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 10))
    gm = sp_lopa(fxtune.trace(big), "0")
    slot = gm.fxtune.default.get_submodule("0")
    assert slot.sp_lopa_s.shape == (64, 3, 2) and slot.sp_lopa_c.shape == (64, 32, 1) and slot.sp_lopa_r.shape == (64, 1, 32)
    with pytest.raises(fxtune.AdapterError, match=r"'1'.*10×96.*block=\(p, q\)"):
        sp_lopa(fxtune.trace(big))
    with pytest.raises(fxtune.AdapterError, match=r"masks\['0'\]\['block_mask'\].*\(3, 2\)"):
        sp_lopa(fxtune.trace(big), "0", masks={"0": {"block_mask": torch.ones(2, 3, dtype=torch.bool)}})
    with pytest.raises(fxtune.AdapterError, match="block"):
        sp_lopa(fxtune.trace(big), "0", block=(32,))


def test_adapter_files_keep_prototypes_tied(tmp_path):
    model, _, gm = adapted()
    fxtune.save_adapters(gm, str(tmp_path))
    back = fxtune.load_adapters(fxtune.trace(model), str(tmp_path))
    xs = inputs()
    assert all(torch.equal(a, b) for a, b in zip(gm(*xs), back(*xs)))
    assert all(_prototypes(back, name)[0] is _prototypes(back, "lin")[0] for name in SITES)
    assert len(fxtune.trainable_parameters(back)) == len(SITES) + 2
