"""The `fxtune` command: pass specs, show, apply (with its checks) and errors, run in-process through cli.main."""

from __future__ import annotations

import functools
import json
import math
import os

import pytest
import torch

import fxtune
from core_helpers import MLP
from fxtune import FxtuneError
from fxtune.cli.command import main, parse_pass
from fxtune.passes import lora


def test_pass_specs_become_partials_with_typed_values():
    spec = parse_pass("lora:r=4,alpha=8.5,rslora=true,targets=layer4.*;fc,exclude=none")
    assert isinstance(spec, functools.partial) and spec.func is lora
    assert spec.keywords == {"r": 4, "alpha": 8.5, "rslora": True, "targets": ["layer4.*", "fc"], "exclude": None}
    assert parse_pass("fuse").keywords == {}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope:r=1", r"unknown pass 'nope'; available: .*lora"),
        ("lora:r", r"pass option 'r' in 'lora:r' should be key=value"),
        ("lora:rank=4", r"pass 'lora' has no option among \['rank'\]; its options: targets, r, alpha"),
    ],
)
def test_bad_pass_specs_are_fxtune_errors(spec, message):
    with pytest.raises(FxtuneError, match=message):
        parse_pass(spec)


def test_show_lists_every_site(capsys):
    assert main(["show", "torchvision:resnet18"]) == 0
    out = capsys.readouterr().out
    assert "layer4.1.conv2" in out and "fc" in out
    assert sum(1 for line in out.splitlines() if line.startswith(("conv1 ", "layer", "fc "))) == 21


def test_apply_lora_then_fuse_restores_the_traced_code_and_output(capsys):
    argv = ["apply", "torchvision:resnet18", "--pass", "lora:r=4,targets=layer4.*", "--pass", "fuse",
            "--summary", "--diff", "--input-shape", "1,3,64,64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # r·(in·k² + out) per site: 4·(256·9 + 512) + 3 · 4·(512·9 + 512) + 4·(256 + 512) (downsample)
    added = 4 * (256 * 9 + 512) + 3 * 4 * (512 * 9 + 512) + 4 * (256 + 512)
    assert "lora(r=4, targets='layer4.*')" in out and f"+{added:,}" in out and f"-{added:,}" in out
    assert "(generated code identical to the traced model's)" in out
    error = float(out.rsplit(":", 1)[1])
    assert error < 1e-5  # default init: B = 0, so the fused model computes the original


def test_apply_fold_bn_and_low_rank_shows_the_new_structure(capsys):
    argv = ["apply", "torchvision:resnet18", "--pass", "fold_bn", "--pass", "low_rank:rank=0.5,targets=layer4.*", "--diff"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fold_bn()" in out and "low_rank(rank=0.5, targets='layer4.*')" in out
    assert '-    bn1 = self.bn1(conv1);  conv1 = None' in out
    assert '+    layer4_0_conv1_0 = getattr(getattr(self.layer4, "0").conv1, "0")' in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["show", "resnet18"], "model spec 'resnet18' should be torchvision:NAME, timm:NAME, transformers:"),
        (["show", "torchvision:resnet_nope"], "torchvision has no model 'resnet_nope'"),
        (["show", "no_such_package_xyz:factory"], "cannot import 'no_such_package_xyz'"),
        (["apply", "torchvision:resnet18", "--pass", "lora:targets=nothing*"], "selects no site. Available sites: conv1, "),
    ],
)
def test_errors_print_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxtune: error: ") and message in err


# ----------------------------------------------------------------------------- issue 11: the command line grows up


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"fxtune {fxtune.__version__}"


def test_apply_out_writes_adapter_files_that_load_back(tmp_path, capsys):
    """Before: apply could not write anything."""
    argv = ["apply", "core_helpers:MLP", "--model-kwargs", "d_in=6,d_hidden=12", "--seed", "3",
            "--pass", "lora:r=2,targets=fc1", "--pass", "ia3:adapter=scales", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"wrote adapter 'default' (lora, fxtune format): {tmp_path}" in out
    assert f"wrote adapter 'scales' (ia3, fxtune format): {tmp_path / 'scales'}" in out
    assert sorted(os.listdir(tmp_path)) == ["adapters.json", "adapters.safetensors", "graph", "scales"]
    torch.manual_seed(3)
    model = MLP(d_in=6, d_hidden=12)  # the command's model: same seed, same keyword arguments
    gm = fxtune.load_adapters(fxtune.load_adapters(fxtune.trace(model), str(tmp_path)), str(tmp_path / "scales"))
    assert [(a.name, a.kind, a.sites) for a in fxtune.adapters(gm)] == [("default", "lora", ("fc1",)), ("scales", "ia3", ("fc1", "fc2"))]
    torch.manual_seed(3)
    MLP(d_in=6, d_hidden=12)  # the pass's random A comes right after the model's weights
    expected_a = torch.nn.init.kaiming_uniform_(torch.empty(2, 6), a=math.sqrt(5))
    assert torch.equal(gm.fxtune.default.fc1.lora_a, expected_a)


def test_apply_out_in_peft_format(tmp_path, capsys):
    assert main(["apply", "core_helpers:MLP", "--pass", "lora:r=2", "--out", str(tmp_path), "--format", "peft"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "graph"]
    with open(tmp_path / "adapter_config.json") as f:
        assert json.load(f)["target_modules"] == ["fc1", "fc2"]


def test_apply_out_saves_the_graphmodule_then_show_and_export_read_it(tmp_path, capsys):
    """apply --out writes the result with fxtune.save (also a fused one, which has no adapters);
    `fxtune show DIR` loads and lists it; `fxtune export DIR` writes checked .pt2 and ONNX files."""
    argv = ["apply", "core_helpers:MLP", "--seed", "1", "--pass", "lora:r=2,targets=fc1", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    assert f"wrote GraphModule: {tmp_path / 'a' / 'graph'}" in capsys.readouterr().out
    saved = fxtune.load(str(tmp_path / "a" / "graph"))
    assert [a.name for a in fxtune.adapters(saved)] == ["default"]
    assert main(["show", str(tmp_path / "a")]) == 0
    shown = capsys.readouterr().out
    assert "default:lora[" in shown and "1/2 sites adapted" in shown
    assert main(["apply", "core_helpers:MLP", "--pass", "lora:r=2", "--pass", "fuse", "--out", str(tmp_path / "f")]) == 0
    fused = fxtune.load(str(tmp_path / "f" / "graph"))
    assert not fxtune.adapters(fused) and os.listdir(tmp_path / "f") == ["graph"]
    pt2, onnx_file = tmp_path / "m.pt2", tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "a"), "--pt2", str(pt2), "--onnx", str(onnx_file), "--input-shape", "3,16"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {pt2}" in out and f"wrote {onnx_file}" in out
    x = torch.randn(5, 16)  # another batch size: the batch dimension stays dynamic
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(pt2)).module()(x), saved.eval()(x), rtol=1e-5, atol=1e-6)
    assert main(["export", str(tmp_path / "nothing"), "--pt2", str(pt2), "--input-shape", "3,16"]) == 2
    assert "holds no saved GraphModule" in capsys.readouterr().err


def test_the_change_check_moves_the_adapters_off_their_no_op_start(capsys):
    """Before: --input-shape after lora reported 0, since B starts at zero."""
    assert main(["apply", "core_helpers:MLP", "--pass", "lora:r=2", "--input-shape", "4,16"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[-3:]
    values = [float(line.rsplit(":", 1)[1]) for line in lines]
    assert "adapters as created" in lines[0] and values[0] == 0.0
    assert "moved as training would" in lines[1] and values[1] > 1e-3
    assert "fuse(result) - result" in lines[2] and values[2] < 1e-5


def test_timm_spec(capsys):
    """Before: timm:resnet18 was refused (only timm.models:resnet18 worked), with no hint."""
    assert main(["show", "timm:resnet18", "--model-kwargs", '{"num_classes": 7}']) == 0
    out = capsys.readouterr().out
    assert "layer4.1.conv2" in out and "7×512" in out


def test_transformers_config_spec_traced_with_export_on_token_ids(tmp_path, capsys):
    import peft
    import transformers

    kwargs = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    argv = ["apply", "transformers:GPT2Config", "--model-kwargs", json.dumps(kwargs), "--input-shape", "2,8",
            "--pass", "lora:r=2,targets=*.c_attn", "--out", str(tmp_path), "--format", "peft"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "lora(r=2, targets='*.c_attn')" in out and "wrote adapter 'default' (lora, peft format)" in out
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(transformers.GPT2Config(**kwargs))
    pm = peft.PeftModel.from_pretrained(model, str(tmp_path))
    assert [n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A")] == ["h.0.attn.c_attn"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["show", "timm:resnet_nope"], "timm has no model 'resnet_nope'"),
        (["show", "transformers:NoSuchConfig"], "transformers has no config or model class 'NoSuchConfig'"),
        (["show", "torchvision:resnet18", "--model-kwargs", "num_classez=3"], "cannot build torchvision's resnet18"),
        (["show", "torchvision:resnet18", "--model-kwargs", "{bad json"], "--model-kwargs '{bad json' is not valid JSON"),
        (["show", "timm.modelz:resnet18"], "Model specs: torchvision:NAME, timm:NAME"),
        (["show", "torchvision:resnet18", "--frontend", "export"], "--frontend export runs the model once on an example input"),
        (["apply", "core_helpers:MLP", "--pass", "fuse", "--input-shape", "2,16", "--input-dtype", "int64"],
         "no config.vocab_size and no nn.Embedding"),
        (["apply", "core_helpers:MLP", "--pass", "fuse", "--input-shape", "2,x"], "--input-shape '2,x' should be sizes"),
    ],
)
def test_spec_and_input_errors_are_one_line_with_a_hint(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_export_frontend_can_be_chosen_for_any_model(capsys):
    argv = ["apply", "core_helpers:MLP", "--frontend", "export", "--input-shape", "3,16", "--pass", "lora:r=2", "--pass", "fuse"]
    assert main(argv) == 0
    assert float(capsys.readouterr().out.rsplit(":", 1)[1]) < 1e-6


def test_the_readme_gpt2_example_prints_what_it_shows(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("$ fxtune apply transformers:GPT2LMHeadModel", 1)[1].split("```", 1)[0]
    command, shown = block.replace("\\\n", " ").split("\n", 1)
    monkeypatch.chdir(tmp_path)
    assert main(["apply", "transformers:GPT2LMHeadModel", *command.split()]) == 0
    printed = capsys.readouterr().out

    def comparable(text):  # the seconds column varies; the |difference| of a fuse is float round-off
        lines = [line.rsplit(None, 1)[0] if "    " in line else line for line in text.strip().splitlines()]
        return [line.rsplit(":", 1)[0] if line.startswith("max |fuse") else line for line in lines]

    assert comparable(printed) == comparable(shown)
    assert float(printed.split("with those tensors:")[1].split()[0]) < 1e-5
    assert sorted(os.listdir(tmp_path / "gpt2-lora")) == ["adapter_config.json", "adapter_model.safetensors", "graph"]
