"""summary, diff and Pipeline: what they print is checked against counts computed in the test."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from torch import nn

import fxtune
from core_helpers import lora_slots, randomize_lora, small_net, vision_model
from fxtune.passes import fuse, lora

TOTALS = re.compile(r"(\d+)/(\d+) sites adapted · trainable ([\d,]+) of ([\d,]+) parameters \(([\d.]+)%\)")


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def _lora_numel(model, names, r):
    total = 0
    for n in names:
        w = model.get_submodule(n).weight
        total += r * w[0].numel() + w.shape[0] * r
    return total


@pytest.fixture(scope="module")
def resnet():
    model = vision_model("resnet18")
    return model, fxtune.trace(model)


def test_summary_rows_and_totals(resnet):
    model, gm = resnet
    adapted = lora(gm, "layer4.*", r=4)
    text = fxtune.summary(adapted)
    site_names = [s.name for s in fxtune.sites(gm)]
    rows = {line.split()[0]: line for line in text.splitlines()}
    for name in site_names:
        assert name in rows
    layer4 = [n for n in site_names if n.startswith("layer4.")]
    for name in layer4:
        expected = _lora_numel(model, [name], 4)
        assert "default:lora[" in rows[name]
        assert f"{expected:,}" in rows[name].split()  # params column
        w = model.get_submodule(name).weight
        assert "×".join(map(str, w.shape)) in rows[name]
    assert "lora" not in rows["layer1.0.conv1"]

    (match,) = TOTALS.findall(text)
    adapted_n, sites_n, trainable, total, pct = match
    assert int(adapted_n) == len(layer4) == 5 and int(sites_n) == len(site_names)
    expected_trainable = _lora_numel(model, layer4, 4)
    expected_total = sum(p.numel() for p in model.parameters()) + expected_trainable
    assert _int(trainable) == expected_trainable
    assert _int(total) == expected_total
    assert pct == f"{100 * expected_trainable / expected_total:.3f}"


def test_summary_of_traced_model_counts_nothing_trainable():
    """A traced model shares its parameters read-only: nothing is trainable before a pass."""
    model = small_net()
    text = fxtune.summary(fxtune.trace(model))
    (match,) = TOTALS.findall(text)
    total = sum(p.numel() for p in model.parameters())
    assert match[0] == "0" and _int(match[2]) == 0 and _int(match[3]) == total
    assert match[4] == "0.000"


def test_summary_shows_forms_per_site():
    gm = fxtune.trace(small_net())
    gm = lora(gm, ["stem", "tok"], r=2, form="activation")
    gm = lora(gm, ["depthwise", "fc"], r=2, form="weight", adapter="extra")
    rows = {line.split()[0]: line for line in fxtune.summary(gm).splitlines()}
    assert "default:lora[activation]" in rows["stem"] and "default:lora[activation]" in rows["tok"]
    assert "extra:lora[weight]" in rows["depthwise"] and "extra:lora[weight]" in rows["fc"]


def test_diff(resnet):
    model, gm = resnet
    assert fxtune.diff(gm, gm) == ""
    assert fxtune.diff(gm, fxtune.trace(model)) == ""
    adapted = lora(gm, ["fc"], r=2, form="activation")
    d = fxtune.diff(gm, adapted)
    added = [line for line in d.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert added and any("lora" in line for line in added)
    assert any("self.fxtune.default.fc.lora_a" in line for line in added)
    assert all("layer1" not in line for line in added)
    assert fxtune.diff(gm, fuse(adapted)) == ""
    assert fxtune.diff(gm.code, adapted.code) == d


def _set_adapters(gm):
    """A deterministic pipeline step: non-zero adapters so fusion has something to fold."""
    randomize_lora(gm, std=0.05, seed=11)
    return gm


def test_pipeline_equals_calls_in_order(resnet):
    model, gm = resnet
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    by_hand = lora(gm, r=4, targets="layer4.*")
    by_hand_adapted = _set_adapters(by_hand)
    with torch.no_grad():
        y_adapted = by_hand_adapted(x)
    by_hand = fuse(by_hand_adapted)

    torch.manual_seed(0)
    pipe = fxtune.Pipeline([functools.partial(lora, r=4, targets="layer4.*"), _set_adapters, fuse])
    out = pipe.run(gm)
    assert out.code == by_hand.code == gm.code
    a, b = out.state_dict(), by_hand.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(out(x), by_hand(x))
        assert not torch.allclose(out(x), model(x))  # the fold did fold something
        assert torch.allclose(out(x), y_adapted, rtol=1e-4, atol=1e-5)

    report = pipe.report()
    lines = report.splitlines()
    added = _lora_numel(model, [n for n, m in model.named_modules() if n.startswith("layer4.") and isinstance(m, nn.Conv2d)], 4)
    (lora_line,) = [line for line in lines if line.startswith("lora(")]
    (fuse_line,) = [line for line in lines if line.startswith("fuse")]
    lora_cells = lora_line.split()
    assert "targets='layer4.*'" in lora_line and "r=4" in lora_line
    assert lora_cells[-4] == "5"  # sites touched
    assert _int(lora_cells[-3]) == added
    assert _int(lora_cells[-2]) == added  # trainable after
    assert float(lora_cells[-1]) >= 0
    fuse_cells = fuse_line.split()
    assert fuse_cells[1] == "5" and _int(fuse_cells[2]) == -added and _int(fuse_cells[3]) == 0


def test_pipeline_accepts_pass_option_pairs():
    model = small_net()
    gm = fxtune.trace(model)
    pipe = fxtune.Pipeline([(lora, {"targets": nn.Linear, "r": 2})])
    out = pipe.run(gm)
    assert set(lora_slots(out)) == {"tok", "fc"}
    (line,) = [line for line in pipe.report().splitlines() if line.startswith("lora(")]
    assert line.split()[-4] == "2"
