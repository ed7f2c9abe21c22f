"""channel_groups: which channels go together, written out by hand for one coupling per small network."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxtune
from fxtune import StructureError
from fxtune import channel_groups

import prune_nets as nets
from core_helpers import assert_unchanged, snapshot

IMAGE = torch.randn(2, 3, 8, 8)


def groups_of(model: nn.Module, x=IMAGE):
    return channel_groups(fxtune.trace(nets.randomize(model)), example_inputs=(x,))


def members(group) -> set[tuple]:
    return {(m.name, m.role, m.axis, m.offset, m.channels) for m in group.members}


def test_residual_add_joins_both_producers_their_norms_and_the_consumers():
    groups = groups_of(nets.Residual())
    assert groups.names == ["a", "fc"]
    bn = lambda p: {(f"{p}.{n}", r, 0, 0, 8) for n, r in (("weight", "norm_weight"), ("bias", "norm_bias"),
                                                           ("running_mean", "norm_stat"), ("running_var", "norm_stat"))}
    assert members(groups["a"]) == {
        ("a.weight", "out", 0, 0, 8), ("a.bias", "bias", 0, 0, 8), ("b.weight", "out", 0, 0, 8),
        ("b.weight", "in", 1, 0, 8), ("b.bias", "bias", 0, 0, 8), ("fc.weight", "in", 1, 0, 8),
    } | bn("bn_a") | bn("bn_b")
    assert groups["a"].producers == ("a", "b") and groups["a"].prunable
    assert not groups["fc"].prunable and "graph's output" in groups["fc"].why_not


def test_concatenation_puts_each_group_at_its_offset():
    groups = groups_of(nets.Concat())
    assert ("r.weight", "in", 1, 0, 4) in members(groups["p"])
    assert ("r.weight", "in", 1, 4, 6) in members(groups["q"])
    assert groups["q"].prunable and groups["p"].prunable


def test_split_halves_go_to_their_readers_and_the_split_is_a_literal_member():
    group = groups_of(nets.Split())["c"]
    found = {m.name: m for m in group.members}
    assert found["u.weight"].units.tolist() == [0, 1, 2, 3] and found["v.weight"].units.tolist() == [4, 5, 6, 7]
    assert found["chunk"].literal.kind == "split"


def test_squeeze_excitation_gate_rows_multiply_the_channels_they_gate():
    groups = groups_of(nets.SqueezeExcite())
    assert {("excite.weight", "out", 0, 0, 8), ("squeeze.weight", "in", 1, 0, 8), ("out.weight", "in", 1, 0, 8)} <= members(groups["c"])
    assert members(groups["squeeze"]) == {("squeeze.weight", "out", 0, 0, 4), ("squeeze.bias", "bias", 0, 0, 4),
                                          ("excite.weight", "in", 1, 0, 4)}


def test_depthwise_conv_couples_its_input_and_output_channels():
    group = groups_of(nets.Depthwise())["pw"]
    assert {("dw.weight", "out", 0, 0, 8), ("bn2.weight", "norm_weight", 0, 0, 8), ("out.weight", "in", 1, 0, 8)} <= members(group)
    assert group.units == 8


def test_grouped_conv_makes_each_conv_group_one_unit():
    group = groups_of(nets.Grouped())["c"]
    assert group.units == 3 and group.unit_size == 4
    assert group.channel_units.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    g_rows = next(m for m in group.members if m.name == "g.weight")
    assert g_rows.units.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(StructureError, match="keeps some channels of a unit"):
        group.units_of(torch.tensor([True] * 5 + [False] * 7))


def test_flatten_into_linear_maps_each_channel_to_a_block_of_features():
    group = groups_of(nets.FlattenLinear())["c"]
    fc = next(m for m in group.members if m.name == "fc.weight")
    assert fc.positions.tolist() == list(range(16))
    assert fc.units.tolist() == [c for c in range(4) for _ in range(4)]


def test_what_cannot_be_followed_blocks_its_group_with_the_reason():
    groups = groups_of(nets.Blocked())
    assert [g.name for g in groups if g.prunable] == ["d"]
    assert "would not be zero" in groups["a"].why_not
    assert "computes a statistic" in groups["b"].why_not
    assert "opaque_scale" in groups["c"].why_not
    table = str(groups)
    assert "1/5 groups prunable" in table and "graph's output" in table


def test_layer_norm_over_channels_is_a_normalisation_reason():
    groups = groups_of(nets.Norms(), torch.randn(2, 6))
    group = groups["fc1"]
    assert not group.prunable and group.prunable_with(allow_norm_change=True)
    assert "'norm' (LayerNorm) normalises over them" in group.why_not
    assert {("norm.weight", "norm_weight", 0, 0, 8), ("norm.bias", "norm_bias", 0, 0, 8)} <= members(group)


def test_attention_heads_and_gated_mlp_hidden_features_of_a_plain_decoder():
    model = nets.decoder()
    groups = channel_groups(fxtune.trace(model), example_inputs=(torch.randint(0, 50, (2, 12)),))
    assert groups.names == ["embed", "blocks.0.attn.q", "blocks.0.mlp.gate", "blocks.1.attn.q", "blocks.1.mlp.gate", "head"]
    heads = groups["blocks.0.attn.q"]
    assert heads.units == 4 and heads.unit_size == 8 and heads.prunable
    assert {("blocks.0.attn.k.weight", "out", 0, 0, 32), ("blocks.0.attn.v.bias", "bias", 0, 0, 32),
            ("blocks.0.attn.o.weight", "in", 1, 0, 32)} <= members(heads)
    views = [m for m in heads.members if m.literal is not None]
    assert sorted(m.literal.kind for m in views) == ["sizes"] * 4  # three views (head count) and the reshape back
    mlp = groups["blocks.0.mlp.gate"]
    assert members(mlp) == {("blocks.0.mlp.gate.weight", "out", 0, 0, 48), ("blocks.0.mlp.up.weight", "out", 0, 0, 48),
                            ("blocks.0.mlp.down.weight", "in", 1, 0, 48)}
    assert "computes a statistic" in groups["embed"].why_not  # the RMSNorm's mean over the residual stream


def test_a_layer_called_twice_reading_a_graph_input_keeps_its_columns():
    from core_helpers import Twice

    groups = channel_groups(fxtune.trace(Twice()), example_inputs=(torch.randn(2, 8),))
    assert "'fc' also reads channels that are not traced" in groups["fc"].why_not


def test_a_traced_graph_without_shapes_needs_example_inputs_and_nothing_is_modified():
    model = nets.randomize(nets.Residual())
    gm = fxtune.trace(model)
    before = snapshot(gm)
    with pytest.raises(StructureError, match="example_inputs"):
        channel_groups(gm)
    channel_groups(gm, example_inputs=(IMAGE,))
    assert_unchanged(gm, before)


def test_resnet18_groups_are_its_residual_streams_and_block_interiors():
    torch.manual_seed(0)
    gm = fxtune.trace(torchvision.models.resnet18(num_classes=10).eval())
    groups = channel_groups(gm, example_inputs=(torch.randn(1, 3, 32, 32),))
    streams = {"conv1": ("conv1", "layer1.0.conv2", "layer1.1.conv2"),
               "layer2.0.conv2": ("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2")}
    for name, producers in streams.items():
        assert groups[name].producers == producers
    assert [g.name for g in groups if not g.prunable] == ["fc"]
    assert len(groups) == 13
