"""fxtune.save / fxtune.load round trips: traced, adapted, merged, fused, low-rank, fold_bn'd, batched and
torch.export GraphModules come back exactly (outputs bit-equal, same code, node.meta, tensors, ties,
flags), stay trainable, and every lifecycle function gives on the loaded one what it gives on the original.
"""

from __future__ import annotations

import copy
import io
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fxtune
from core_helpers import MLP, small_net, vision_model
from fxtune import load, save
from fxtune import GraphFileError
from fxtune.passes import dora, fold_bn, fuse, ia3, lora, low_rank, slice_delta, sp_lopa, svdiff
from graph_file_helpers import TOKENS, Scaled, WithLeaf, assert_same_graph_module, gradients, tied_net
from hf_models import bert, gpt2

pytestmark = pytest.mark.filterwarnings("ignore::fxtune.FxtuneWarning")

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def round_trip(gm, tmp_path, **kwargs):
    save(gm, tmp_path / "saved")
    return load(tmp_path / "saved", **kwargs)


@pytest.fixture(scope="module")
def traced():
    return fxtune.trace(small_net())


@pytest.fixture(scope="module")
def mixed(traced):
    """Several named adapters of different kinds, some on the same weights, with trained-looking values."""
    torch.manual_seed(1)
    gm = lora(traced, r=2, adapter="a", exclude=["c1d"])
    gm = ia3(gm, targets=["fc", "grouped"], adapter="b")
    gm = dora(gm, targets="tok", r=2, adapter="c")
    gm = svdiff(gm, targets="grouped", adapter="d")
    gm = slice_delta(gm, targets="reflect", adapter="e")
    gm = lora(gm, targets=["stem", "fc"], r=2, init="pissa", adapter="p")
    gm = fxtune.train_module(gm, "c1d", adapter="a")
    with torch.no_grad():
        for p in fxtune.trainable_parameters(gm):
            p.add_(torch.randn_like(p) * 0.05)
    return gm


def test_traced_round_trip_matches_the_model(traced, tmp_path):
    loaded = round_trip(traced, tmp_path)
    assert_same_graph_module(loaded, traced, X)
    with torch.no_grad():  # the user's own model is the reference (tracing itself rounds a few ops differently)
        torch.testing.assert_close(loaded(X), small_net()(X), rtol=1e-6, atol=1e-7)


def test_directory_holds_json_and_safetensors_only(traced, tmp_path):
    save(traced, tmp_path / "d")
    assert sorted(os.listdir(tmp_path / "d")) == ["graph.json", "tensors.safetensors"]
    doc = json.loads((tmp_path / "d" / "graph.json").read_text())
    assert doc["format"] == "fxtune.graph" and doc["format_version"] == 1
    stored = load_file(str(tmp_path / "d" / "tensors.safetensors"))
    assert torch.equal(stored["stem.weight"], traced.stem.weight)


def test_a_save_that_fails_midway_leaves_the_previous_files(traced, mixed, tmp_path, monkeypatch):
    save(traced, tmp_path / "d")
    before = {name: (tmp_path / "d" / name).read_bytes() for name in os.listdir(tmp_path / "d")}

    def failing(tensors, file, metadata=None):
        open(file, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("fxtune.io.graph_files.store.save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save(mixed, tmp_path / "d")
    assert {name: (tmp_path / "d" / name).read_bytes() for name in os.listdir(tmp_path / "d")} == before
    assert_same_graph_module(load(tmp_path / "d"), traced, X)


def test_adapted_round_trip_is_exact_and_trainable(mixed, tmp_path):
    loaded = round_trip(mixed, tmp_path)
    assert_same_graph_module(loaded, mixed, X)
    assert {a.name for a in fxtune.adapters(loaded)} == {"a", "b", "c", "d", "e", "p"}
    grads, expected = gradients(loaded, X), gradients(mixed, X)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected))
    assert all(g.abs().sum() > 0 for g in grads)


def test_loaded_tensors_are_fresh_aligned_storage(mixed, tmp_path):
    loaded = round_trip(mixed, tmp_path)
    originals = {t.untyped_storage().data_ptr() for t in mixed.state_dict().values()}
    for name, t in loaded.state_dict().items():
        assert t.untyped_storage().data_ptr() not in originals, name
        assert t.untyped_storage().data_ptr() % 64 == 0, name


@pytest.mark.parametrize("step", ["set_active", "merge", "unmerge", "fuse", "delete_adapter", "unload"])
def test_lifecycle_on_loaded_equals_original(mixed, tmp_path, step):
    steps = {
        "set_active": lambda g: fxtune.set_active(g, ["b", "c"]),
        "merge": lambda g: fxtune.merge(g, ["a", "b", "c", "d", "e", "p"]),
        "unmerge": lambda g: fxtune.unmerge(fxtune.merge(g, ["a", "b", "c", "d", "e", "p"])),
        "fuse": fuse,
        "delete_adapter": lambda g: fxtune.delete_adapter(g, "p"),
        "unload": fxtune.unload,
    }
    loaded = round_trip(mixed, tmp_path)
    after_loaded, after_original = steps[step](loaded), steps[step](mixed)
    assert_same_graph_module(after_loaded, after_original, X)


def test_merged_state_survives_and_unmerges_bit_exactly(mixed, tmp_path):
    merged = fxtune.merge(mixed, ["a", "b", "c", "d", "e", "p"])
    loaded = round_trip(merged, tmp_path)
    assert_same_graph_module(loaded, merged, X)
    assert_same_graph_module(fxtune.unmerge(loaded), mixed, X)
    assert_same_graph_module(fxtune.unload(loaded), fxtune.unload(mixed), X)


def test_save_adapters_of_loaded_writes_the_same_files(mixed, tmp_path):
    loaded = round_trip(mixed, tmp_path)
    for adapter in ("a", "p"):
        fxtune.save_adapters(loaded, tmp_path / f"l_{adapter}", adapter=adapter)
        fxtune.save_adapters(mixed, tmp_path / f"o_{adapter}", adapter=adapter)
        assert (tmp_path / f"l_{adapter}" / "adapters.json").read_text() == (tmp_path / f"o_{adapter}" / "adapters.json").read_text()
        ours = load_file(str(tmp_path / f"l_{adapter}" / "adapters.safetensors"))
        theirs = load_file(str(tmp_path / f"o_{adapter}" / "adapters.safetensors"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_reloaded_twice_is_still_the_same(mixed, tmp_path):
    once = round_trip(mixed, tmp_path / "1")
    twice = round_trip(once, tmp_path / "2")
    assert_same_graph_module(twice, mixed, X)


def test_tied_weights_and_train_modes(tmp_path):
    model = tied_net()
    gm = lora(fxtune.trace(model), targets=["proj", "head", "embed"], r=2)
    loaded = round_trip(gm, tmp_path)
    assert_same_graph_module(loaded, gm, TOKENS)
    assert loaded.head.weight is loaded.embed.weight
    assert loaded.training and not loaded.norm.training
    fused = fuse(loaded)
    assert_same_graph_module(fused, fuse(gm), TOKENS)
    assert fused.head.weight is fused.embed.weight


def test_fused_low_rank_and_fold_bn(traced, mixed, tmp_path):
    for i, gm in enumerate([fuse(mixed), low_rank(traced, targets=["fc", "stem", "grouped"], rank=2), fold_bn(traced)]):
        loaded = round_trip(gm, tmp_path / str(i))
        assert_same_graph_module(loaded, gm, X)
    factored = round_trip(low_rank(traced, targets=["fc", "stem"], rank=2), tmp_path / "lr")
    assert fxtune.trainable_parameters(factored) and all(g.abs().sum() > 0 for g in gradients(factored, X))


def test_pruned_round_trip_and_pruned_adapters_train(tmp_path):
    """A pruned GraphModule (smaller layers, rewritten sizes) and one pruned with its LoRA adapters sliced."""
    from fxtune.passes import prune

    model = vision_model("resnet18")
    x = torch.randn(2, 3, 32, 32)
    gm = fxtune.trace(model)
    pruned = prune(gm, 0.5, example_inputs=(x,))
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in gm.parameters())
    assert_same_graph_module(round_trip(pruned, tmp_path / "p"), pruned, x)
    adapted = prune(lora(gm, targets="layer4.*", r=2), 0.3, example_inputs=(x,))
    loaded = round_trip(adapted, tmp_path / "a")
    assert_same_graph_module(loaded, adapted, x)
    assert fxtune.trainable_parameters(loaded) and all(g.abs().sum() > 0 for g in gradients(loaded, x)[1::2])


def test_sp_lopa_shared_prototypes_stay_one_parameter(tmp_path):
    gm = sp_lopa(fxtune.trace(MLP()), block=(2, 2), r=1, num_prototypes=2)
    loaded = round_trip(gm, tmp_path)
    x = torch.randn(3, 16)
    assert_same_graph_module(loaded, gm, x)
    slots = [m for m in loaded.modules() if isinstance(m, fxtune.AdapterSlot)]
    assert len(slots) == 2 and slots[0].sp_lopa_c is slots[1].sp_lopa_c


def test_batched_round_trip(tmp_path):
    gm = lora(lora(fxtune.trace(MLP()), r=2, adapter="a"), r=2, adapter="b", init="gaussian")
    served = fxtune.batched(gm, ["a", "b"])
    loaded = round_trip(served, tmp_path)
    assert_same_graph_module(loaded, served, torch.randn(3, 16), torch.tensor([0, 1, -1]))


def test_resnet18_round_trip(tmp_path):
    gm = lora(fxtune.trace(vision_model("resnet18")), targets="layer4.*", r=2)
    loaded = round_trip(gm, tmp_path)
    assert_same_graph_module(loaded, gm, torch.randn(1, 3, 32, 32))
    assert type(loaded.layer1[0]) is nn.Module  # not called by the graph: a plain container of its layers


def test_called_user_module_needs_allow(tmp_path):
    gm = lora(fxtune.trace(WithLeaf(), leaf_modules=[Scaled]), targets="fc", r=2)
    save(gm, tmp_path / "d")
    with pytest.raises(GraphFileError, match=r"graph_file_helpers\.Scaled.*allow="):
        load(tmp_path / "d")
    loaded = load(tmp_path / "d", allow=[Scaled])
    assert type(loaded.scaled) is Scaled and loaded.scaled.factor == 3.0
    assert_same_graph_module(loaded, gm, torch.randn(2, 6))
    assert type(load(tmp_path / "d", allow=["graph_file_helpers.Scaled"]).scaled) is Scaled


def test_called_function_outside_defaults_needs_allow(tmp_path):
    gm = fxtune.trace(Wrapped())
    save(gm, tmp_path / "d")
    with pytest.raises(GraphFileError, match=r"'test_graph_file\.halve'.*allow=\['test_graph_file\.halve'\]"):
        load(tmp_path / "d")
    assert_same_graph_module(load(tmp_path / "d", allow=[halve]), gm, torch.randn(2, 4))  # code keeps its fx.wrap line


def halve(x: torch.Tensor) -> torch.Tensor:
    return x / 2


torch.fx.wrap("halve")


class Wrapped(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return halve(torch.relu(x))


def test_export_front_end_bert_round_trip_and_pickling(tmp_path):
    model, (tokens,), kwargs = bert()
    mask = kwargs["attention_mask"]
    traced = fxtune.trace(model, frontend="export", example_inputs=(tokens,), example_kwargs={"attention_mask": mask})
    gm = lora(traced, r=2, targets="encoder.*")
    loaded = round_trip(gm, tmp_path)
    assert_same_graph_module(loaded, gm, tokens, attention_mask=mask)
    assert type(loaded._guards_fn).__name__ == "GuardsFn"
    with torch.no_grad():
        reference = model(tokens, attention_mask=mask).last_hidden_state
        ours = fuse(round_trip(traced, tmp_path / "t"))(tokens, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert_same_graph_module(fuse(loaded), fuse(gm), tokens, attention_mask=mask)
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    for copied in (torch.load(buffer, weights_only=False), copy.deepcopy(gm)):  # pickling, on the same trace
        assert_same_graph_module(copied, gm, tokens, attention_mask=mask)
        assert_same_graph_module(fuse(copied), fuse(gm), tokens, attention_mask=mask)


@pytest.mark.slow
def test_export_front_end_gpt2_needs_allow_for_conv1d(tmp_path):
    from transformers.pytorch_utils import Conv1D

    model, (tokens,), _ = gpt2()
    gm = lora(fxtune.trace(model, frontend="export", example_inputs=(tokens,)), r=2)
    save(gm, tmp_path / "d")
    with pytest.raises(GraphFileError, match=r"Conv1D.*allow="):
        load(tmp_path / "d")
    assert_same_graph_module(load(tmp_path / "d", allow=[Conv1D]), gm, tokens)


def test_export_guards_survive_as_a_graph(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) * 2 if x.shape[0] > 2 else self.fc(x)

    gm = fxtune.trace(Branchy(), frontend="export", example_inputs=(torch.randn(5, 4),), dynamic="batch")
    loaded = round_trip(gm, tmp_path)
    assert_same_graph_module(loaded, gm, torch.randn(3, 4))
    for g in (gm, loaded):
        with pytest.raises(AssertionError, match=r"x.size\(\)\[0\] >= 3"):
            g(torch.randn(2, 4))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_t", "convnext_tiny", "efficientnet_b0", "inception_v3", "maxvit_t", "regnet_y_400mf",
                                  "vit_b_16", "densenet121", "googlenet", "mobilenet_v3_small", "shufflenet_v2_x0_5"])
def test_torchvision_classifiers_round_trip(name, tmp_path):
    """Wrapped functions (swin), stochastic depth, `boolean_dispatch` functions (inception), module names such as
    'block1-0' (regnet), attention (vit): LoRA on every site, saved, loaded, pickled."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    gm = lora(fxtune.trace(model), r=2)
    x = torch.randn(1, 3, 299 if name == "inception_v3" else 224, 224 if name != "inception_v3" else 299)
    loaded = round_trip(gm, tmp_path, allow=["torchvision.models"])
    assert_same_graph_module(loaded, gm, x)
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    assert_same_graph_module(torch.load(buffer, weights_only=False), gm, x)
