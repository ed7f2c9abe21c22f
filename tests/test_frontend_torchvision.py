"""torchvision models symbolic tracing cannot follow: RAFT through frontend="auto" (torch.export),
detection models refused with both reasons, each naming torchvision's file and line.

Slow: RAFT's export takes several seconds. The reference is `frontend_helpers.lora_reference64` (in
float32 for RAFT, which builds float32 sampling grids in forward: the float64 sums rounded once).
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import fxtune
from core_helpers import assert_unchanged, snapshot
from frontend_helpers import lora_reference64
from fxtune.passes import fuse, lora
from site_helpers import randomize, rel_err

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def _flows(result) -> torch.Tensor:
    return torch.cat([f.flatten() for f in result]) if isinstance(result, (list, tuple)) else result


def test_raft_falls_back_to_export_and_lora_on_every_site_is_exact():
    torch.manual_seed(0)
    model = torchvision.models.optical_flow.raft_small(weights=None).eval()
    snap = snapshot(model)
    g = torch.Generator().manual_seed(1)
    frames = (torch.rand(1, 3, 128, 128, generator=g), torch.rand(1, 3, 128, 128, generator=g))  # RAFT needs 128
    with pytest.warns(fxtune.FxtuneWarning, match=r"raft\.py:\d+: if \(h, w\) != image2\.shape\[-2:\]"):
        gm = fxtune.trace(model, example_inputs=frames)
    assert gm.meta["fxtune_frontend"] == "export"
    assert_unchanged(model, snap)  # RAFT stores its correlation pyramid on self: on fxtune's copy only
    found = fxtune.coverage(model, gm)
    assert found.complete, str(found)
    adapted = lora(gm, r=2)
    randomize(adapted, std=0.05, seed=3)
    expected = _flows(lora_reference64(model, adapted, frames, dtype=torch.float32))  # RAFT makes float32 grids
    with torch.no_grad():
        base, got = _flows(model(*frames)), _flows(adapted(*frames))
        fused = fuse(adapted)
        got_fused = _flows(fused(*frames))
    assert rel_err(base, expected) > 1e-3
    assert rel_err(got, expected) < 1e-4 and rel_err(got_fused, expected) < 1e-4
    fresh = torchvision.models.optical_flow.raft_small(weights=None).eval()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(_flows(fresh(*frames)), expected) < 1e-4
    assert_unchanged(model, snap)


def test_detection_model_is_refused_naming_both_reasons_in_torchvision():
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3
    ).eval()
    with pytest.raises(fxtune.TraceError, match="neither front end") as info:
        fxtune.trace(model, example_inputs=([torch.rand(3, 96, 96)],))
    symbolic, exported = str(info.value).split("torch.export: ", 1)
    assert "generalized_rcnn.py" in symbolic and "for img in images:" in symbolic
    assert "module 'rpn' (RegionProposalNetwork)" in exported and "torchvision/ops/boxes.py:" in exported
    assert "torch.where" in exported
    assert "model.backbone" in exported
    backbone = fxtune.trace(model.backbone)  # the tensor-only part traces, as the message suggests
    assert len(fxtune.sites(backbone)) > 50
