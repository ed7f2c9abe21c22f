"""Selecting call sites: glob, full-match regex, exact names, module type, predicate; exclude= the same."""

from __future__ import annotations

import copy
import fnmatch
import re

import pytest
import torch
from torch import nn

import fxtune
from core_helpers import (
    Twice,
    assert_unchanged,
    lora_reference,
    lora_slots,
    randomize_lora,
    rel_err,
    small_net,
    snapshot,
    vision_model,
)
from fxtune.passes import fuse, lora

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@pytest.fixture(scope="module")
def resnet():
    model = vision_model("resnet18")
    return model, fxtune.trace(model)


@pytest.fixture(scope="module")
def resnet_names(resnet):
    model, _ = resnet
    return [n for n, m in model.named_modules() if isinstance(m, SUPPORTED)]


def _names(gm, targets=None, exclude=None):
    return [s.name for s in fxtune.sites(gm, targets, exclude=exclude)]


def test_every_supported_layer_is_a_site(resnet, resnet_names):
    _, gm = resnet
    assert _names(gm) == resnet_names  # graph order is module order for resnet
    small = fxtune.trace(small_net())
    kinds = {s.name: s.kind for s in fxtune.sites(small)}
    assert kinds["c1d"] == "conv1d" and kinds["c3d"] == "conv3d" and kinds["tok"] == "linear"
    (g,) = fxtune.sites(small, ["grouped"])
    assert g.groups == 3 and g.weight_shape == (18, 4, 3, 3) and g.in_features == 12


SELECTORS = {
    "glob": ("layer4.*", lambda n: fnmatch.fnmatchcase(n, "layer4.*")),
    "glob-char": ("layer?.0.conv1", lambda n: n.endswith(".0.conv1") and n.startswith("layer")),
    "regex": (re.compile(r"layer[12]\.\d\.conv\d"), lambda n: re.fullmatch(r"layer[12]\.\d\.conv\d", n)),
    "list": (["fc", "conv1", "layer2.0.downsample.0"], lambda n: n in ("fc", "conv1", "layer2.0.downsample.0")),
    "type": (nn.Linear, lambda n: n == "fc"),
    "predicate": (lambda s: s.kernel_size == (1, 1), lambda n: "downsample" in n),
}


@pytest.mark.parametrize("kind", list(SELECTORS))
def test_targets_each_kind(resnet, resnet_names, kind):
    _, gm = resnet
    selector, expected = SELECTORS[kind]
    want = [n for n in resnet_names if expected(n)]
    assert want, "selector must choose something"
    assert _names(gm, selector) == want


@pytest.mark.parametrize("kind", list(SELECTORS))
def test_exclude_each_kind(resnet, resnet_names, kind):
    _, gm = resnet
    selector, expected = SELECTORS[kind]
    assert _names(gm, exclude=selector) == [n for n in resnet_names if not expected(n)]
    # targets and exclude together
    assert _names(gm, "layer*", exclude=selector) == [n for n in resnet_names if n.startswith("layer") and not expected(n)]


def test_regex_is_a_full_match(resnet):
    _, gm = resnet
    with pytest.raises(fxtune.SelectionError):
        fxtune.sites(gm, re.compile(r"layer4"))  # would match by search, not by fullmatch
    assert _names(gm, re.compile(r"layer4.*")) == _names(gm, "layer4.*")


def test_module_type_is_exact_kind():
    gm = fxtune.trace(small_net())
    assert _names(gm, nn.Conv2d) == ["stem", "grouped", "depthwise", "dilated", "reflect", "circular", "same"]
    assert _names(gm, nn.Conv1d) == ["c1d"]
    assert _names(gm, lambda s: s.groups > 1) == ["grouped", "depthwise"]


@pytest.mark.parametrize("targets,exclude", [("nothing*", None), (None, "*"), (re.compile("zzz"), None), (nn.Conv3d, None)])
def test_empty_selection_lists_available_sites(resnet, targets, exclude):
    _, gm = resnet
    snap = snapshot(gm)
    with pytest.raises(fxtune.SelectionError) as info:
        lora(gm, targets, exclude=exclude)
    message = str(info.value)
    for name in ("conv1", "layer1.0.conv1", "layer4.1.conv2", "fc"):
        assert name in message
    assert_unchanged(gm, snap)


@pytest.mark.parametrize("where", ["targets", "exclude"])
def test_unknown_exact_name(resnet, where):
    _, gm = resnet
    snap = snapshot(gm)
    kw = {where: ["fc", "layer9.conv"]}
    with pytest.raises(fxtune.SelectionError, match="layer9.conv"):
        lora(gm, **kw)
    assert_unchanged(gm, snap)


@pytest.mark.parametrize("kind", ["glob", "list", "type", "predicate"])
def test_lora_adapts_exactly_the_selection(resnet, resnet_names, kind):
    model, gm = resnet
    selector, expected = SELECTORS[kind]
    adapted = lora(gm, selector, r=2, exclude="layer4.1.*")
    want = {n for n in resnet_names if expected(n) and not n.startswith("layer4.1.")}
    assert set(lora_slots(adapted)) == want


# ----------------------------------------------------------------------------- shared weights


def test_module_called_twice_is_two_sites():
    gm = fxtune.trace(Twice())
    sites = fxtune.sites(gm)
    assert [s.name for s in sites] == ["fc", "fc@1", "out"]
    assert sites[0].target == sites[1].target == "fc"
    assert _names(gm, "fc*") == ["fc", "fc@1"]


@pytest.mark.parametrize(
    "targets,exclude",
    [(["fc"], None), (["fc@1"], None), ("fc", None), (None, ["fc@1"]), (["fc@1", "out"], None)],
)
def test_adapting_one_use_of_a_shared_weight_is_refused(targets, exclude):
    model = Twice()
    gm = fxtune.trace(model)
    snap, model_snap = snapshot(gm), snapshot(model)
    with pytest.raises(fxtune.SelectionError, match="fc@1"):
        lora(gm, targets, exclude=exclude, r=2)
    assert_unchanged(gm, snap)
    assert_unchanged(model, model_snap)


@pytest.mark.parametrize("form", ["weight", "activation"])
@pytest.mark.parametrize("targets", [["fc", "fc@1"], "fc*", None])
def test_both_uses_share_one_adapter(targets, form):
    model = Twice().eval()
    gm = lora(fxtune.trace(model), targets, r=2, form=form)
    assert "fc" in lora_slots(gm) and sum(1 for k in gm.state_dict() if k.endswith("lora_a")) == (2 if targets is None else 1)
    randomize_lora(gm, std=0.2, seed=5)
    ref = lora_reference(model, gm, 1.0)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = ref(x.double())
        assert rel_err(gm(x), expected) < 1e-5
        assert rel_err(fuse(gm)(x), expected) < 1e-5
    rows = fxtune.summary(gm).splitlines()
    assert any(line.startswith("fc@1") and "shares fc" in line for line in rows)


def test_pissa_on_shared_weight():
    model = Twice().eval()
    gm = lora(fxtune.trace(model), "fc*", r=2, init="pissa")
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert rel_err(gm(x), copy.deepcopy(model).double()(x.double())) < 1e-5


@pytest.mark.parametrize("where", ["targets", "exclude"])
def test_names_from_a_generator(where):
    """Selectors accept an Iterable[str]; a generator is one."""
    gm = fxtune.trace(small_net())
    names = (n for n in ["tok", "fc"])
    if where == "targets":
        assert _names(gm, names) == ["tok", "fc"]
    else:  # silently excluding nothing would adapt sites the user excluded
        assert "tok" not in _names(gm, exclude=names)


def test_functional_linear_on_parameter_is_a_site():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(torch.nn.functional.linear(x, self.w))

    gm = fxtune.trace(Functional())
    assert [(s.name, s.call) for s in fxtune.sites(gm)] == [("w", "function"), ("fc", "module")]
