"""prune on real models: torchvision convnets and transformers, a plain decoder, a Hugging Face model through
torch.export, Torch-Pruning as an oracle, and every torchvision classifier.

The masked reference zeroes, in a deepcopy of the original model, the removed positions of every member
the group lists with an output role (weight rows, biases, norm scales and shifts, other parameters);
the expected parameter count keeps, per tensor axis, the positions no group removes. A member the
analysis missed or invented makes the pruned model differ from the masked one.
"""

from __future__ import annotations

import copy
import gc
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import fxtune
from fxtune import channel_groups
from fxtune.passes import prune

import prune_nets as nets

ZEROED_ROLES = ("out", "bias", "norm_weight", "norm_bias", "param")
DOC = Path(__file__).resolve().parent.parent / "docs" / "pruning.md"


def random_masks(groups, ratio: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keep masks over channels removing floor(ratio · units) random units of every prunable group."""
    masks = {}
    for i, group in enumerate(groups):
        if group.prunable and math.floor(ratio * group.units) > 0:
            masks[group.name] = nets.random_keep(group.units, ratio, seed=seed + i)[group.channel_units]
    return masks


def removed(groups, masks) -> dict[tuple[str, int], set[int]]:
    """(tensor, axis) -> positions the masks remove, from each group's member list."""
    out: dict[tuple[str, int], set[int]] = {}
    for name, keep in masks.items():
        group = groups[name]
        units = group.units_of(keep)
        for m in group.members:
            if m.literal is None and m.role != "consumed":
                out.setdefault((m.name, m.axis), set()).update(m.positions[~units[m.units]].tolist())
    return out


def masked(model: nn.Module, groups, masks) -> nn.Module:
    ref = copy.deepcopy(model)
    tensors = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
    roles = {(m.name, m.axis): m.role for g in groups for m in g.members if m.literal is None}
    with torch.no_grad():
        for (name, axis), positions in removed(groups, masks).items():
            if roles[(name, axis)] in ZEROED_ROLES:
                tensors[name].index_fill_(axis, torch.tensor(sorted(positions)), 0.0)
    return ref


def expected_parameters(model: nn.Module, groups, masks) -> int:
    gone = removed(groups, masks)
    total = 0
    for name, p in model.named_parameters():
        total += math.prod(size - len(gone.get((name, axis), ())) for axis, size in enumerate(p.shape))
    return total


def output(y):
    return y if isinstance(y, torch.Tensor) else y[0]


def check(model: nn.Module, x, ratio: float, gm=None, seed: int = 0) -> None:
    gm = fxtune.trace(model) if gm is None else gm
    inputs = None if any("val" in n.meta for n in gm.graph.nodes) else (x,)
    groups = channel_groups(gm, example_inputs=inputs)
    masks = random_masks(groups, ratio, seed)
    assert masks, "no prunable group"
    pruned = prune(gm, masks=masks, example_inputs=inputs)
    reference = masked(model, groups, masks)
    with torch.no_grad():
        got, expected = output(pruned(x)), output(reference(x))
        original = output(model(x))
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    assert float((original - expected).abs().max()) > 1e-3 * float(expected.abs().max()), "masking changed nothing: weak test"
    assert sum(p.numel() for p in pruned.parameters()) == expected_parameters(model, groups, masks)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_plain_decoder(ratio):
    model = nets.decoder()
    check(model, torch.randint(0, 50, (2, 12)), ratio)


MODELS = {
    "resnet50": 64, "mobilenet_v2": 64, "mobilenet_v3_small": 64, "efficientnet_b0": 64, "densenet121": 64,
    "regnet_y_400mf": 64, "convnext_tiny": 64, "shufflenet_v2_x0_5": 64, "vit_b_16": 32,
}


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", list(MODELS))
def test_torchvision_model(name, ratio):
    torch.manual_seed(0)
    size = MODELS[name]
    model = torchvision.models.get_model(name, weights=None, **({"image_size": size} if name.startswith("vit") else {}))
    if name.startswith("shufflenet"):  # default init shrinks activations to nothing in 50 layers
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    check(nets.randomize(model), torch.randn(2, 3, size, size), ratio)


@pytest.mark.slow
def test_convnext_streams_with_allow_norm_change():
    """Its LayerNorm-normalised streams (depthwise convs, layer scales, downsampling LayerNorms) prune when asked;
    the normalisation changes, so only the arithmetic and a finite output are checked here."""
    torch.manual_seed(0)
    model = nets.randomize(torchvision.models.convnext_tiny())
    x = torch.randn(2, 3, 64, 64)
    gm = fxtune.trace(model)
    groups = channel_groups(gm, example_inputs=(x,))
    streams = [g for g in groups if not g.prunable and g.prunable_with(allow_norm_change=True)]
    assert len(streams) == 4
    masks = random_masks([*groups], 0.5)
    masks.update({g.name: nets.random_keep(g.units, 0.5, seed=i)[g.channel_units] for i, g in enumerate(streams)})
    pruned = prune(gm, masks=masks, allow_norm_change=True, example_inputs=(x,))
    assert sum(p.numel() for p in pruned.parameters()) == expected_parameters(model, groups, masks)
    assert pruned.features[1][0].block[0].groups == pruned.features[0][0].out_channels == 48
    assert torch.isfinite(pruned(x)).all()


def test_shufflenet_channel_shuffle_is_refused_clearly():
    torch.manual_seed(0)
    gm = fxtune.trace(torchvision.models.shufflenet_v2_x0_5().eval())
    groups = channel_groups(gm, example_inputs=(torch.randn(1, 3, 32, 32),))
    shuffled = [g for g in groups if "channel shuffle" in g.why_not]
    assert len(shuffled) == 4 and all(not g.prunable for g in shuffled)
    assert sum(g.prunable for g in groups) == 18  # every branch's inner width


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_hugging_face_llama_through_export(ratio):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, use_cache=False)
    llama = transformers.LlamaModel(config).eval()

    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = llama

        def forward(self, ids):
            return self.model(ids).last_hidden_state

    model = nets.randomize(Hidden())
    ids = torch.randint(0, 100, (2, 8))
    gm = fxtune.trace(model, frontend="export", example_inputs=(ids,), dynamic={"ids": {0: "batch", 1: "seq"}})
    groups = channel_groups(gm)
    heads = groups["model.layers.0.self_attn.q_proj"]
    assert heads.units == 2 and heads.unit_size == 16  # a kv head and the two query heads that read it
    assert "model.layers.0.mlp.gate_proj" in groups.names and groups["model.layers.0.mlp.gate_proj"].units == 48
    check(model, ids, ratio, gm=gm)
    check(model, torch.randint(0, 100, (3, 5)), ratio, gm=gm)  # other batch and sequence sizes
    keep = nets.random_keep(48, ratio)
    again = channel_groups(prune(gm, masks={"model.layers.0.mlp.gate_proj": keep}))  # shapes recorded anew
    assert again["model.layers.0.mlp.gate_proj"].channels == int(keep.sum())


def torch_pruning_copy(model, masks, x):
    tp = pytest.importorskip("torch_pruning")
    theirs = copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(theirs, example_inputs=x)
    for name, keep in masks.items():
        module = theirs.get_submodule(name)
        fn = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
        graph.get_pruning_group(module, fn, idxs=(~keep).nonzero().flatten().tolist()).prune()
    return theirs


@pytest.mark.parametrize("name", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow),
                                  pytest.param("mobilenet_v2", marks=pytest.mark.slow),
                                  pytest.param("densenet121", marks=pytest.mark.slow)])
def test_torch_pruning_removes_the_same_channels_to_the_same_model(name):
    torch.manual_seed(0)
    model = nets.randomize(torchvision.models.get_model(name, weights=None))
    x = torch.randn(2, 3, 64, 64)
    gm = fxtune.trace(model)
    groups = channel_groups(gm, example_inputs=(x,))
    masks = random_masks(groups, 0.3, seed=3)
    ours = prune(gm, masks=masks, example_inputs=(x,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch_pruning_copy(model, masks, x)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    for path, module in theirs.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            assert ours.get_submodule(path).weight.shape == module.weight.shape, path
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def _table() -> dict[str, tuple[int, int]]:
    """docs/pruning.md's table: model -> (groups found, groups prunable)."""
    rows = re.findall(r"^\| (\w+) \| (\d+) \| (\d+) \|", DOC.read_text(), flags=re.M)
    return {name: (int(found), int(prunable)) for name, found, prunable in rows}


ALL = torchvision.models.list_models(module=torchvision.models)
VIT = {"vit_b_16": 32, "vit_b_32": 64, "vit_l_16": 32, "vit_l_32": 64, "vit_h_14": 28}
SIZES = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224, **{n: 64 for n in ALL if n.startswith("swin")}, **VIT}
BUILD = {**{n: {"image_size": s} for n, s in VIT.items()}, "googlenet": {"init_weights": False},
         "inception_v3": {"init_weights": False}}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ALL)
def test_every_torchvision_classifier(name):
    """channel_groups runs and agrees with the docs' table; prune at 0.3 equals the masked model."""
    torch.manual_seed(0)
    model = nets.randomize(torchvision.models.get_model(name, weights=None, **BUILD.get(name, {})))
    if name.startswith("shufflenet") or name in ("googlenet", "inception_v3"):
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    size = SIZES.get(name, 32)
    x = torch.randn(1, 3, size, size)
    gm = fxtune.trace(model)
    groups = channel_groups(gm, example_inputs=(x,))
    assert _table()[name] == (len(groups), sum(g.prunable for g in groups))
    if any(g.prunable for g in groups):
        check(model, x, 0.3, gm=gm)
    del model, gm
    gc.collect()
