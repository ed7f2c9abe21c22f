"""prune: the pruned model computes the masked model (removed channels zeroed in every member, built here
by hand in a deepcopy), and has the parameter count the test works out itself."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision

import fxtune
from fxtune.passes import prune
from fxtune.passes.prune import PruneReport

import prune_nets as nets
from core_helpers import assert_unchanged, snapshot
from prune_nets import gone, random_keep, zeroed

IMAGE = torch.randn(4, 3, 8, 8)


def close(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    got, expected = got.detach(), expected.detach()
    assert float((got - expected).abs().max()) <= rtol * float(expected.abs().max()), "pruned model differs from masked model"


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def bn_entries(name: str, index: torch.Tensor) -> list:
    return [(f"{name}.weight", 0, index), (f"{name}.bias", 0, index)]


def test_residual_pair_pruned_equals_masked_and_counts():
    model = nets.randomize(nets.Residual())
    keep = random_keep(8, 0.5, seed=1)
    pruned = prune(fxtune.trace(model), masks={"a": keep}, example_inputs=(IMAGE,))
    r = gone(keep)
    masked = zeroed(model, [("a.weight", 0, r), ("a.bias", 0, r), ("b.weight", 0, r), ("b.bias", 0, r),
                            *bn_entries("bn_a", r), *bn_entries("bn_b", r)])
    close(pruned(IMAGE), masked(IMAGE))
    k = 4
    assert params(pruned) == (k * 3 * 9 + k) + 2 * k + (k * k * 9 + k) + 2 * k + (4 * k + 4)
    assert pruned.b.in_channels == k and pruned.bn_b.num_features == k and pruned.fc.in_features == k
    assert pruned.bn_a.running_mean.tolist() == model.bn_a.running_mean[keep].tolist()


def test_concatenated_groups_leave_the_consumer_columns_at_their_offsets():
    model = nets.randomize(nets.Concat())
    keep_p, keep_q = torch.tensor([True, False, True, True]), torch.tensor([False, True, True, False, True, False])
    pruned = prune(fxtune.trace(model), masks={"p": keep_p, "q": keep_q}, example_inputs=(IMAGE,))
    masked = zeroed(model, [("p.weight", 0, gone(keep_p)), ("p.bias", 0, gone(keep_p)),
                            ("q.weight", 0, gone(keep_q)), ("q.bias", 0, gone(keep_q))])
    close(pruned(IMAGE), masked(IMAGE))
    columns = torch.cat([keep_p, keep_q])
    torch.testing.assert_close(pruned.r.weight, model.r.weight[:, columns])
    assert params(pruned) == (3 * 3 + 3) + (3 * 27 + 3) + (5 * 6 + 5)


def test_a_split_becomes_a_split_into_the_sizes_that_remain():
    model = nets.randomize(nets.Split())
    keep = torch.tensor([True, False, False, True, True, True, False, True])  # 2 from u's half, 3 from v's
    pruned = prune(fxtune.trace(model), masks={"c": keep}, example_inputs=(IMAGE,))
    close(pruned(IMAGE), zeroed(model, [("c.weight", 0, gone(keep)), ("c.bias", 0, gone(keep))])(IMAGE))
    assert "split(" in pruned.code and "[2, 3]" in pruned.code
    assert (pruned.u.in_channels, pruned.v.in_channels) == (2, 3)


def test_squeeze_excitation_and_its_inner_width():
    model = nets.randomize(nets.SqueezeExcite())
    keep_c, keep_s = random_keep(8, 0.3, seed=2), random_keep(4, 0.5, seed=3)
    pruned = prune(fxtune.trace(model), masks={"c": keep_c, "squeeze": keep_s}, example_inputs=(IMAGE,))
    c, s = gone(keep_c), gone(keep_s)
    masked = zeroed(model, [("c.weight", 0, c), ("c.bias", 0, c), *bn_entries("bn", c), ("excite.weight", 0, c),
                            ("excite.bias", 0, c), ("squeeze.weight", 0, s), ("squeeze.bias", 0, s)])
    close(pruned(IMAGE), masked(IMAGE))
    kc, ks = 6, 2
    assert params(pruned) == (kc * 27 + kc) + 2 * kc + (ks * kc + ks) + (kc * ks + kc) + (5 * kc + 5)


def test_depthwise_and_grouped_convs_keep_their_groups_whole():
    model = nets.randomize(nets.Depthwise())
    keep = random_keep(8, 0.5, seed=4)
    pruned = prune(fxtune.trace(model), masks={"pw": keep}, example_inputs=(IMAGE,))
    r = gone(keep)
    close(pruned(IMAGE), zeroed(model, [("pw.weight", 0, r), ("dw.weight", 0, r), *bn_entries("bn1", r), *bn_entries("bn2", r)])(IMAGE))
    assert (pruned.dw.groups, pruned.dw.in_channels, pruned.dw.out_channels) == (4, 4, 4)
    assert params(pruned) == 4 * 3 + 4 * 2 + 4 * 9 + 4 * 2 + (5 * 4 + 5)

    model = nets.randomize(nets.Grouped())
    keep = torch.tensor([True] * 4 + [False] * 4 + [True] * 4)  # conv group 1 of g goes
    pruned = prune(fxtune.trace(model), masks={"c": keep}, example_inputs=(IMAGE,))
    rows = torch.tensor([2, 3])
    masked = zeroed(model, [("c.weight", 0, gone(keep)), ("c.bias", 0, gone(keep)), ("g.weight", 0, rows), ("g.bias", 0, rows)])
    close(pruned(IMAGE), masked(IMAGE))
    assert (pruned.g.groups, pruned.g.in_channels, pruned.g.out_channels) == (2, 8, 4)
    assert params(pruned) == (8 * 3 + 8) + (4 * 4 * 9 + 4) + (5 * 4 + 5)


def test_flatten_into_a_linear_removes_each_channel_s_block_of_features():
    model = nets.randomize(nets.FlattenLinear())
    keep = torch.tensor([False, True, True, False])
    pruned = prune(fxtune.trace(model), masks={"c": keep}, example_inputs=(IMAGE,))
    close(pruned(IMAGE), zeroed(model, [("c.weight", 0, gone(keep)), ("c.bias", 0, gone(keep))])(IMAGE))
    assert pruned.fc.weight.shape == (3, 8)
    torch.testing.assert_close(pruned.fc.weight, model.fc.weight[:, keep.repeat_interleave(4)])


def test_decoder_heads_and_gated_mlp_features():
    model = nets.decoder()
    ids = torch.randint(0, 50, (3, 12))
    heads, hidden = torch.tensor([True, False, True, False]), random_keep(48, 0.5, seed=5)
    masks = {"blocks.0.attn.q": heads.repeat_interleave(8), "blocks.1.mlp.gate": hidden}
    pruned = prune(fxtune.trace(model), masks=masks, example_inputs=(ids,))
    h = gone(heads.repeat_interleave(8))
    entries = [(f"blocks.0.attn.{p}.{t}", 0, h) for p in "qkv" for t in ("weight", "bias")]
    entries += [(f"blocks.1.mlp.{p}.weight", 0, gone(hidden)) for p in ("gate", "up")]
    close(pruned(ids), zeroed(model, entries)(ids))
    assert pruned.code.count(", 2, 8)") == 3 and "reshape(getitem, getitem_1, 16)" in pruned.code  # 2 heads of 8 in block 0
    d = 32
    expected = params(model) - 3 * (16 * d + 16) - 16 * d - 3 * 24 * d
    assert params(pruned) == expected


def test_resnet18_at_ratios_equals_masked_and_counts_by_hand():
    torch.manual_seed(0)
    model = nets.randomize(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    gm = fxtune.trace(model)
    streams = {"conv1": ["conv1", "layer1.0.conv2", "layer1.1.conv2"]}
    for i in (2, 3, 4):
        streams[f"layer{i}.0.conv2"] = [f"layer{i}.0.conv2", f"layer{i}.0.downsample.0", f"layer{i}.1.conv2"]
    inner = [f"layer{i}.{j}.conv1" for i in (1, 2, 3, 4) for j in (0, 1)]
    norm_of = lambda conv: conv.replace("conv", "bn") if "downsample" not in conv else conv[:-1] + "1"
    for ratio in (0.3, 0.5):
        keeps = {name: random_keep(dict(model.named_modules())[name].out_channels, ratio, seed=len(name)) for name in [*streams, *inner]}
        pruned = prune(gm, masks=keeps, example_inputs=(x,))
        entries = []
        for group, convs in [*streams.items(), *((c, [c]) for c in inner)]:
            r = gone(keeps[group])
            for conv in convs:
                entries += [(f"{conv}.weight", 0, r), *bn_entries(norm_of(conv), r)]
        close(pruned(x), zeroed(model, entries)(x))
        kept = {g: int(k.sum()) for g, k in keeps.items()}
        stream_of = {c: g for g, convs in streams.items() for c in convs}
        width = lambda conv: kept[stream_of.get(conv, conv)]
        expected = 3 * 49 * width("conv1") + 2 * width("conv1") + 10 * width("layer4.0.conv2") + 10
        for i in (1, 2, 3, 4):
            for j in (0, 1):
                block = f"layer{i}.{j}"
                before = "conv1" if (i, j) == (1, 0) else (f"layer{i}.0.conv2" if j == 1 else f"layer{i - 1}.0.conv2" if i > 2 else "conv1")
                w_in, w_mid, w_out = width(before), width(f"{block}.conv1"), width(f"{block}.conv2")
                expected += w_in * w_mid * 9 + 2 * w_mid + w_mid * w_out * 9 + 2 * w_out
                if j == 0 and i > 1:
                    expected += w_in * w_out + 2 * w_out
        assert params(pruned) == expected


def test_ratio_removes_the_lowest_l2_units_and_keeps_multiples_of_round_to():
    model = nets.randomize(nets.FlattenLinear())
    pruned = prune(fxtune.trace(model), 0.5, example_inputs=(IMAGE,))
    scores = model.c.weight.detach().square().flatten(1).sum(1) + model.fc.weight.detach().square().view(3, 4, 4).sum((0, 2))
    keep = torch.zeros(4, dtype=torch.bool)
    keep[scores.argsort()[2:]] = True
    torch.testing.assert_close(pruned.c.weight, model.c.weight[keep])
    model = nets.decoder()
    ids = torch.randint(0, 50, (2, 12))
    gm = fxtune.trace(model)
    pruned = prune(gm, {"*.mlp.gate": 0.5}, round_to=16, example_inputs=(ids,))
    assert pruned.blocks[0]["mlp"].gate.out_features == 32  # 48 - 24 = 24, rounded up to 32
    assert pruned.blocks[0]["attn"].q.out_features == 32  # no ratio for heads: untouched
    pruned = prune(gm, 0.5, round_to=16, exclude="blocks.1.*", example_inputs=(ids,))
    assert pruned.blocks[0]["mlp"].gate.out_features == 32 and pruned.blocks[1]["mlp"].gate.out_features == 48
    assert pruned.blocks[0]["attn"].q.out_features == 16 and pruned.blocks[1]["attn"].q.out_features == 32  # 2 heads of 8 go
    with pytest.raises(fxtune.StructureError, match="nothing to remove"):  # 0.3: 1 head (24 left) and 14 features round back up
        prune(gm, 0.3, round_to=16, exclude="blocks.1.*", example_inputs=(ids,))
    report = str(PruneReport.of(pruned))
    assert "excluded" in report


def test_a_getitem_slicing_two_pruned_dims_keeps_both_edits():
    model, x = nets.randomize(nets.OuterSlice()), torch.randn(2, 4)
    keep_1, keep_2 = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1], dtype=torch.bool), torch.tensor([1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    pruned = prune(fxtune.trace(model), masks={"f1": keep_1, "f2": keep_2}, example_inputs=(x,))
    masked = zeroed(model, [("f1.weight", 0, gone(keep_1)), ("f1.bias", 0, gone(keep_1)),
                            ("f2.weight", 0, gone(keep_2)), ("f2.bias", 0, gone(keep_2))])
    close(pruned(x), masked(x))
    torch.testing.assert_close(pruned.f3.weight, model.f3.weight[:, keep_1[:6]])


@pytest.mark.parametrize("exclude", [
    "blocks.1.*", re.compile(r"blocks\.1\..*"), lambda group: group.name.startswith("blocks.1."),
], ids=["glob", "regex", "callable"])
def test_exclude_takes_every_kind_of_name_selector(exclude):
    model, ids = nets.decoder(), torch.randint(0, 50, (2, 12))
    gm = fxtune.trace(model)
    names = [g.name for g in fxtune.channel_groups(gm, example_inputs=(ids,)) if g.name.startswith("blocks.1.")]
    for chosen in (exclude, names):
        pruned = prune(gm, 0.5, round_to=16, exclude=chosen, example_inputs=(ids,))
        assert pruned.blocks[0]["mlp"].gate.out_features == 32 and pruned.blocks[1]["mlp"].gate.out_features == 48
        assert pruned.blocks[1]["attn"].q.out_features == 32


def test_importance_rules_follow_their_formulas():
    model = nets.randomize(nets.Depthwise())
    gm = fxtune.trace(model)
    pruned = prune(gm, 0.5, importance="bn_scale", example_inputs=(IMAGE,))
    scores = model.bn1.weight.detach().abs() + model.bn2.weight.detach().abs()
    torch.testing.assert_close(pruned.pw.weight, model.pw.weight[scores.argsort()[4:].sort().values])
    pruned = prune(gm, 0.5, importance="l1", example_inputs=(IMAGE,))
    l1 = (model.pw.weight.abs().flatten(1).sum(1) + model.dw.weight.abs().flatten(1).sum(1) + model.bn1.weight.abs()
          + model.bn2.weight.abs() + model.out.weight.abs()[:, :, 0, 0].sum(0)).detach()
    torch.testing.assert_close(pruned.pw.weight, model.pw.weight[l1.argsort()[4:].sort().values])
    first = prune(gm, 0.5, importance="random", seed=7, example_inputs=(IMAGE,))
    again = prune(gm, 0.5, importance="random", seed=7, example_inputs=(IMAGE,))
    assert torch.equal(first.pw.weight, again.pw.weight)
    chosen = prune(gm, 0.5, importance=lambda group, g: torch.arange(group.units, 0, -1), example_inputs=(IMAGE,))
    torch.testing.assert_close(chosen.pw.weight, model.pw.weight[:4])


def test_taylor_importance_is_weight_times_gradient_on_the_data():
    model = nets.randomize(nets.FlattenLinear())
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    loss = lambda m, batch: m(batch).square().mean()
    pruned = prune(fxtune.trace(model), 0.5, importance="taylor", data=batches, loss=loss, example_inputs=(IMAGE,))
    w, fc = model.c.weight.detach().clone().requires_grad_(), model.fc.weight.detach().clone().requires_grad_()
    totals = torch.zeros(4, dtype=torch.float64)
    for batch in batches:
        h = torch.nn.functional.adaptive_avg_pool2d(torch.relu(torch.conv2d(batch, w, model.c.bias, padding=1)), 2)
        out = h.flatten(1) @ fc.t() + model.fc.bias
        gw, gfc = torch.autograd.grad(out.square().mean(), (w, fc))
        totals += (w * gw).abs().flatten(1).sum(1).double() + (fc * gfc).abs().view(3, 4, 4).sum((0, 2)).double()
    keep = torch.zeros(4, dtype=torch.bool)
    keep[totals.argsort()[2:]] = True
    torch.testing.assert_close(pruned.c.weight, model.c.weight[keep])


def test_global_ranking_compares_groups_by_their_mean_normalised_scores():
    model = nets.randomize(nets.Concat())
    with torch.no_grad():
        model.q.weight.mul_(10)  # q's scores are larger in absolute terms, not relative to their mean
    pruned = prune(fxtune.trace(model), 0.5, global_ranking=True, example_inputs=(IMAGE,))
    score = {n: (getattr(model, n).weight.detach().square().flatten(1).sum(1)
                 + model.r.weight.detach().square()[:, sl, 0, 0].sum(0)) for n, sl in (("p", slice(0, 4)), ("q", slice(4, 10)))}
    pool = sorted((float(v / score[n].mean()), n, u) for n in score for u, v in enumerate(score[n]))
    removed = {"p": set(), "q": set()}
    for _, n, u in pool[:5]:  # floor(0.5 · 10 channels)
        removed[n].add(u)
    assert pruned.p.out_channels == 4 - len(removed["p"]) and pruned.q.out_channels == 6 - len(removed["q"])


def test_errors_name_the_problem_and_change_nothing():
    model = nets.randomize(nets.Blocked())
    gm = fxtune.trace(model)
    before = snapshot(gm)
    run = lambda **kw: prune(gm, example_inputs=(torch.randn(2, 3, 4, 4),), **kw)
    for bad in (-0.1, 1.0, 1.5, "half"):
        with pytest.raises(fxtune.StructureError, match=r"\[0, 1\)"):
            run(ratio=bad)
    with pytest.raises(fxtune.StructureError, match="no channel group 'zz'"):
        run(masks={"zz": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(fxtune.StructureError, match="'a' is not prunable: 'b' reads them while a removed channel"):
        run(masks={"a": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(fxtune.StructureError, match="removes every channel"):
        run(masks={"d": torch.zeros(4, dtype=torch.bool)})
    with pytest.raises(fxtune.StructureError, match=r"shape \(4,\)"):
        run(masks={"d": torch.ones(5, dtype=torch.bool)})
    with pytest.raises(fxtune.StructureError, match="taylor.*needs data="):
        run(ratio=0.5, importance="taylor")
    with pytest.raises(fxtune.StructureError, match="training mode"):
        prune(fxtune.trace(nets.Residual().train()), 0.5, compensate=True, example_inputs=(IMAGE,))
    with pytest.raises(fxtune.StructureError, match="ratio= .* or masks="):
        run()
    assert_unchanged(gm, before)
    pruned = run(ratio=0.5)
    assert pruned.d.out_channels == 2 and pruned.a.out_channels == 4
    assert_unchanged(gm, before)


def test_norm_coupled_groups_need_allow_norm_change():
    model = nets.randomize(nets.Norms())
    gm = fxtune.trace(model)
    x = torch.randn(3, 6)
    with pytest.raises(fxtune.StructureError, match="(?s)nothing to remove.*allow_norm_change=True prunes it"):
        prune(gm, 0.5, example_inputs=(x,))
    with pytest.raises(fxtune.StructureError, match=r"allow_norm_change=True prunes it anyway"):
        prune(gm, masks={"fc1": torch.ones(8, dtype=torch.bool)}, example_inputs=(x,))
    keep = random_keep(8, 0.5, seed=9)
    pruned = prune(gm, masks={"fc1": keep}, allow_norm_change=True, example_inputs=(x,))
    assert pruned.norm.normalized_shape == (4,) and pruned.fc2.in_features == 4
    expected = torch.nn.functional.layer_norm(model.fc1(x)[:, keep], (4,), model.norm.weight[keep], model.norm.bias[keep])
    torch.testing.assert_close(pruned(x), model.fc2(torch.zeros(3, 8).index_copy(1, keep.nonzero().flatten(), expected)))
