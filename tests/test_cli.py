"""The `fxtune` command: pass specs, show, apply (with its checks) and errors, run in-process through cli.main."""

from __future__ import annotations

import functools

import pytest

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
        (["show", "resnet18"], "model spec 'resnet18' should be 'torchvision:NAME'"),
        (["show", "torchvision:resnet_nope"], "torchvision has no model 'resnet_nope'"),
        (["show", "no_such_package_xyz:factory"], "cannot import 'no_such_package_xyz'"),
        (["apply", "torchvision:resnet18", "--pass", "lora:targets=nothing*"], "selects no site. Available sites: conv1, "),
    ],
)
def test_errors_print_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxtune: error: ") and message in err
