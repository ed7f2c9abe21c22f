"""Models that trace only in parts: `fxtune.trace(model, parts=[...])` and every pass, fuse and adapter files on it.

The whole model's forward does not trace (value-dependent control flow, as in a detector); its
tensor-only submodules do. References: the user's own model, run eagerly, with W + s·B@A written
out here for the adapted weights.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import nn
from torch.func import functional_call

import fxtune
from fxtune.passes import fuse, ia3, lora, low_rank


class Detectorish(nn.Module):
    """An encoder and a head around Python that branches on tensor values (no front end follows it)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        features = self.encoder(x)
        keep = [i for i in range(x.shape[0]) if float(features[i].sum()) > -1e9]  # a value-dependent filter
        return self.head(features[keep])


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Detectorish().eval()
    with torch.no_grad():
        model.encoder[1].running_mean.normal_()
        model.encoder[1].running_var.uniform_(0.5, 2.0)
    return model


def _randomize(gm, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in fxtune.trainable_parameters(gm):
            p.normal_(0, 0.2)


def _snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


X = torch.randn(5, 3, 8, 8)


def test_the_whole_model_does_not_trace_its_parts_do():
    model = _model()
    with pytest.raises(fxtune.TraceError):
        fxtune.trace(model, example_inputs=(X,))
    parted = fxtune.trace(model, parts=["encoder", "head"])
    assert isinstance(parted.encoder, torch.fx.GraphModule) and isinstance(parted.head, torch.fx.GraphModule)
    assert torch.equal(parted(X), model(X))
    assert [s.name for s in fxtune.sites(parted)] == ["encoder.0", "head.0", "head.2"]
    assert [s.name for s in fxtune.sites(parted, "head.*")] == ["head.0", "head.2"]
    assert list(parted.state_dict()) == list(model.state_dict())


def test_parts_are_checked():
    model = _model()
    with pytest.raises(fxtune.TraceError, match=r"names no submodule of the model: \['decoder'\]"):
        fxtune.trace(model, parts=["decoder"])
    with pytest.raises(fxtune.TraceError, match="inside 'head'"):
        fxtune.trace(model, parts=["head", "head.0"])
    with pytest.raises(fxtune.SelectionError, match="names no site of any part"):
        fxtune.sites(fxtune.trace(model, parts=["encoder", "head"]), ["head.1"])


def test_lora_on_one_part_against_the_formula_then_fuse_and_load_back():
    model = _model()
    before = _snapshot(model)
    parted = fxtune.trace(model, parts=["encoder", "head"])
    parted_out = parted(X)
    adapted = lora(parted, targets=["head.0", "encoder.0"], r=2, alpha=4)
    assert torch.equal(parted(X), parted_out)  # the input model is left as it was
    assert [a.sites for a in fxtune.adapters(adapted)] == [("encoder.0", "head.0")]
    assert "default:lora[" in fxtune.summary(adapted) and "2/3 sites adapted" in fxtune.summary(adapted)
    _randomize(adapted)
    weights = {}
    for path, part_path, key in (("encoder.0", "encoder", "encoder_0"), ("head.0", "head", "head_0")):
        slot = getattr(adapted.get_submodule(part_path).fxtune.default, key)
        w = model.get_submodule(path).weight.detach().double()
        weights[f"{path}.weight"] = w + 2.0 * (slot.lora_b.double().flatten(1) @ slot.lora_a.double().flatten(1)).view(w.shape)
    with torch.no_grad():
        reference = functional_call(copy.deepcopy(model).double(), weights, (X.double(),))
        y = adapted(X)
    assert (y.double() - reference).abs().max() <= 1e-5 * reference.abs().max()
    fused = fuse(adapted)
    assert fused.head.code == parted.head.code and fused.encoder.code == parted.encoder.code
    torch.testing.assert_close(fused(X), y, rtol=1e-5, atol=1e-6)
    fresh = _model(seed=3)
    fresh.load_state_dict(fused.state_dict(), strict=True)
    torch.testing.assert_close(fresh(X), y, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class LayerHead(nn.Module):
    """Traces only in parts (a value-dependent branch), and one part is a bare layer."""

    def __init__(self):
        super().__init__()
        self.backbone, self.head = nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 3)

    def forward(self, x):
        y = self.backbone(x)
        return self.head(y) if float(y.sum()) > -1e9 else y


def test_a_part_that_is_a_layer_is_the_site_named_by_its_path():
    torch.manual_seed(0)
    model, x = LayerHead(), torch.randn(2, 4)
    parted = fxtune.trace(model, parts=["backbone", "head"])
    assert [s.name for s in fxtune.sites(parted)] == ["backbone.0", "head"]
    adapted = lora(parted, targets="head", r=2)
    _randomize(adapted)
    slot = adapted.head.fxtune.default.head
    expected = functional_call(model, {"head.weight": model.head.weight + slot.lora_b @ slot.lora_a}, (x,))
    torch.testing.assert_close(adapted(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fuse(adapted)(x), expected, rtol=1e-5, atol=1e-6)


def test_parts_record_their_inputs_from_keyword_examples_alone():
    torch.manual_seed(0)
    model, x = LayerHead(), torch.randn(2, 4)
    parted = fxtune.trace(model, parts=["backbone", "head"], frontend="export", example_kwargs={"x": x})
    assert parted.backbone.meta["fxtune_frontend"] == parted.head.meta["fxtune_frontend"] == "export"
    torch.testing.assert_close(parted(x), model(x))


def test_an_adapter_file_breaking_its_schema_is_refused_on_parts(tmp_path):
    """As on a GraphModule (test_adapter_files_strict.py): the whole file is checked, not only each part's records."""
    model = _model()
    fxtune.save_adapters(lora(fxtune.trace(model, parts=["encoder", "head"]), targets="head.*", r=2), tmp_path)
    meta = json.loads((tmp_path / "adapters.json").read_text())
    meta["slots"].append("junk")
    (tmp_path / "adapters.json").write_text(json.dumps(meta))
    with pytest.raises(fxtune.AdapterError, match="JSON str"):
        fxtune.load_adapters(fxtune.trace(model, parts=["encoder", "head"]), tmp_path)


def test_adapter_files_lifecycle_and_strategies_on_parts(tmp_path):
    model = _model()
    parted = fxtune.trace(model, parts=["encoder", "head"])
    both = ia3(lora(parted, targets="head.*", r=2, adapter="a"), targets="encoder.*", adapter="b")
    _randomize(both)
    fxtune.save_adapters(both, tmp_path / "a", adapter="a")
    fxtune.save_adapters(both, tmp_path / "b", adapter="b")
    loaded = fxtune.load_adapters(fxtune.load_adapters(fxtune.trace(model, parts=["encoder", "head"]), tmp_path / "a"), tmp_path / "b")
    assert torch.equal(loaded(X), both(X))
    only_a = fxtune.set_active(both, "a")  # the encoder part holds no "a": it runs its base
    assert [a.name for a in fxtune.adapters(only_a) if a.active] == ["a"]
    manual = fxtune.delete_adapter(both, "b")
    torch.testing.assert_close(only_a(X), manual(X))
    merged = fxtune.merge(both)
    by_generator = fxtune.merge(both, (n for n in ["a", "b"]))  # names read once, for every part
    assert [a.merged for a in fxtune.adapters(by_generator)] == [True, True]
    torch.testing.assert_close(merged(X), both(X), rtol=1e-5, atol=1e-6)
    assert torch.equal(fxtune.unmerge(merged)(X), both(X))
    torch.testing.assert_close(fuse(both, ["a"])(X), only_a(X), rtol=1e-5, atol=1e-6)
    assert len(fxtune.trainable_parameters(both)) == 5  # A and B of head.0 and head.2, IA3's scale on encoder.0
    plan = fxtune.Strategy([("head.2", (lora, {"r": 1})), (nn.Conv2d, (ia3, {"adapter": "s"}))])
    planned = plan(parted)
    assert sorted((a.name, a.sites) for a in fxtune.adapters(planned)) == [("default", ("head.2",)), ("s", ("encoder.0",))]
    with pytest.raises(fxtune.AdapterError, match=r"no adapter named \['c'\] in any part"):
        fxtune.set_active(both, "c")


def test_a_structural_pass_on_a_part():
    model = _model()
    parted = fxtune.trace(model, parts=["encoder", "head"])
    factored = low_rank(parted, targets="head.0", rank=2, force=True)
    assert [s.name for s in fxtune.sites(factored)] == ["encoder.0", "head.0.0", "head.0.1", "head.2"]
    assert torch.equal(parted(X), model(X))
    w = model.head[0].weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    truncated = (u[:, :2] * s[:2]) @ vh[:2]
    with torch.no_grad():
        reference = functional_call(copy.deepcopy(model).double(), {"head.0.weight": truncated}, (X.double(),))
    torch.testing.assert_close(factored(X).double(), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_torchvision_detector_in_parts():
    torch.manual_seed(0)
    det = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, box_score_thresh=0.0).eval()
    images = [torch.rand(3, 160, 200), torch.rand(3, 180, 150)]
    parts = ["backbone", "rpn.head", "roi_heads.box_head", "roi_heads.box_predictor"]
    parted = fxtune.trace(det, parts=parts, example_inputs=(images,))
    with torch.no_grad():
        want, got = det(images), parted(images)
    for a, b in zip(want, got):
        torch.testing.assert_close(a["boxes"], b["boxes"]) and torch.testing.assert_close(a["scores"], b["scores"])
    adapted = lora(parted, targets="roi_heads.*", r=2)
    assert {s for a in fxtune.adapters(adapted) for s in a.sites} == {
        "roi_heads.box_head.fc6", "roi_heads.box_head.fc7", "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"}
    _randomize(adapted)
    fused = fuse(adapted)
    with torch.no_grad():
        for a, b in zip(adapted(images), fused(images)):
            torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-4, atol=1e-5)
    fresh = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3)
    fresh.load_state_dict(fused.state_dict(), strict=True)
