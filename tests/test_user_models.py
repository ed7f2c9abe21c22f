"""Models nobody on the team wrote: errors that name the user's line, state_dicts that load back,
tied LM heads under a type selection (issue: correct on every model users bring)."""

from __future__ import annotations

import timm
import torch
import torchvision
import transformers
from torch import nn

import fxtune
import pytest
from fxtune.passes import fuse, lora


def test_trace_error_names_the_torchvision_line():
    """The frame filter hides torch's own files, not torchvision's (same `site-packages/torch` prefix)."""
    model = torchvision.models.optical_flow.raft_small(weights=None).eval()
    with pytest.raises(fxtune.TraceError) as caught:
        fxtune.trace(model)
    message = str(caught.value)
    assert "unknown line" not in message
    assert "torchvision/models/optical_flow/raft.py:" in message and "if (h, w) != image2.shape[-2:]" in message


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "beit_base_patch16_224"])
def test_fused_state_dict_loads_strictly_into_the_model(name):
    """Tracer tensor constants (`_tensor_constant0`) stay out of the state_dict: fused keys = the model's keys."""
    small = dict(embed_dim=24, depths=(1, 1), num_heads=(1, 2)) if "swin" in name else dict(embed_dim=24, depth=1, num_heads=2)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, img_size=64, **small).eval()
    gm = lora(fxtune.trace(model), r=2)
    with torch.no_grad():
        for p in fxtune.trainable_parameters(gm):
            p.normal_(0, 0.05)
    fused = fuse(gm)
    assert list(fused.state_dict()) == list(model.state_dict())
    fresh = timm.create_model(name, pretrained=False, num_classes=5, img_size=64, **small).eval()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), gm(x), rtol=1e-4, atol=1e-5)


def _tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


def test_a_type_selection_leaves_a_tied_head_out_with_a_warning():
    model = _tiny_gpt2()
    ids = torch.randint(0, 50, (2, 8))
    gm = fxtune.trace(model, frontend="export", example_inputs=(ids,), example_kwargs={"use_cache": False})
    with pytest.warns(fxtune.FxtuneWarning, match=r"'transformer.wte' \(used by \['transformer.wte', 'lm_head'\]"):
        adapted = lora(gm, targets=nn.Linear, r=2)
    adapted_weights = {slot.weight_name for slot in adapted.fxtune.default.children()}
    assert "transformer.wte" not in adapted_weights and "lm_head" not in adapted_weights
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"} <= adapted_weights
    with pytest.raises(fxtune.SelectionError, match="shares its weight with"):
        lora(gm, targets=["lm_head"], r=2)  # names stay strict
    both = lora(gm, targets=["lm_head", "transformer.wte"], r=2)  # every use: one shared adapter
    assert [slot.weight_name for slot in both.fxtune.default.children()] == ["transformer.wte"]
