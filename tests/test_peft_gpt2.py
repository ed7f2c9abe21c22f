"""PEFT's format for LoRA on transformers' Conv1D (GPT-2's c_attn / c_proj / c_fc), both directions.

PEFT wraps Conv1D with fan_in_fan_out=True; its lora_A (r, in) and lora_B (out, r) are fxtune's
A and B on the Conv1D weight seen as (out, in). The oracle is PEFT itself on a tiny GPT-2 built
from a config (nothing downloaded): the logits of `PeftModel.from_pretrained` on a fresh copy
of the model must be fxtune's, and the reverse. Before, saving refused Conv1D sites.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import peft
import pytest
import torch
import transformers

import fxtune
from core_helpers import lora_slots, randomize_lora, rel_err
from fxtune.passes import lora

TOL = 1e-5
CONV1D = re.compile(r".*\.(c_attn|c_proj|c_fc)")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def gpt2():
    """(model, ids, GraphModule traced by torch.export) for a 2-layer GPT-2 with random weights."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.config.use_cache = False
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    gm = fxtune.trace(model, frontend="export", example_inputs=(ids,))
    return model, ids, gm


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out["logits"]


def _peft_layers(pm: peft.PeftModel) -> dict:
    return {n: m for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_gpt2_conv1d_lora_saved_as_peft_loads_in_peft(gpt2, tmp_path):
    model, ids, gm = gpt2
    adapted = lora(gm, targets=CONV1D, r={"*.c_fc": 2, "*": 4}, alpha={"*.attn.c_proj": 3, "*": 8})
    randomize_lora(adapted, std=0.1, seed=2)
    adapted.eval()
    fxtune.save_adapters(adapted, str(tmp_path), format="peft")
    with open(tmp_path / "adapter_config.json") as f:
        assert json.load(f)["fan_in_fan_out"] is True

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    layers, slots = _peft_layers(pm), lora_slots(adapted)
    assert set(layers) == set(slots) and len(layers) == 8
    for path, layer in layers.items():
        assert layer.fan_in_fan_out and type(layer.base_layer).__name__ == "Conv1D"
        assert torch.equal(layer.lora_A["default"].weight, slots[path].lora_a)
        assert torch.equal(layer.lora_B["default"].weight, slots[path].lora_b)
        assert layer.scaling["default"] == pytest.approx(slots[path].config["scale"], rel=1e-12)
    with torch.no_grad():
        expected = _logits(pm(ids))
        assert rel_err(_logits(model(ids)), expected) > 1e-3
        assert rel_err(_logits(adapted(ids)), expected) < TOL
        assert rel_err(_logits(fxtune.load_adapters(gm, str(tmp_path))(ids)), expected) < TOL


def _peft_gpt2(model, path, **config) -> peft.PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval().save_pretrained(str(path))
    return pm


@pytest.mark.parametrize(
    "config",
    [
        dict(target_modules=["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=8, fan_in_fan_out=True, rank_pattern={"c_fc": 2}),
        dict(target_modules="all-linear", r=3, lora_alpha=6, use_rslora=True),  # PEFT leaves out the output layer (lm_head)
    ],
    ids=["conv1d-list", "all-linear"],
)
def test_peft_gpt2_conv1d_lora_loads_in_fxtune(gpt2, config, tmp_path):
    model, ids, gm = gpt2
    pm = _peft_gpt2(model, tmp_path, **config)
    loaded = fxtune.load_adapters(gm, str(tmp_path)).eval()
    layers, slots = _peft_layers(pm), lora_slots(loaded)
    assert set(slots) == set(layers) and "lm_head" not in slots and len(slots) == 8
    with torch.no_grad():
        expected = _logits(pm(ids))
        assert rel_err(_logits(model(ids)), expected) > 1e-3
        assert rel_err(_logits(loaded(ids)), expected) < TOL
