"""Every error the core and LoRA raise is an fxtune.FxtuneError subclass, and leaves its inputs as they were."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import fxtune
from core_helpers import MLP, assert_unchanged, randomize_lora, snapshot
from fxtune.passes import fuse, lora



def out_scale_weight(w, *, s):
    """A second adapter kind for the tests: W' = diag(s)·W."""
    return w * s.view(-1, *([1] * (w.dim() - 1)))


fxtune.register_kind(fxtune.AdapterKind("test_errors_outscale", weight=out_scale_weight))


@pytest.fixture()
def setup():
    """A model, its traced GraphModule with a LoRA adapter, and snapshots of both."""
    torch.manual_seed(0)
    model = MLP().eval()
    gm = lora(fxtune.trace(model), ["fc1"], r=2)
    randomize_lora(gm)
    return model, gm, snapshot(model), snapshot(gm)


def _raises(setup, error, call, match=None):
    model, gm, model_snap, gm_snap = setup
    with pytest.raises(error, match=match) as info:
        call(gm)
    assert isinstance(info.value, fxtune.FxtuneError)
    assert_unchanged(gm, gm_snap)
    assert_unchanged(model, model_snap)
    x = torch.randn(2, 16)
    gm(x)  # still usable
    return info.value


@pytest.mark.parametrize("r", [0, -1, 2.5, "4", None, True])
def test_bad_r(setup, r):
    _raises(setup, fxtune.AdapterError, lambda gm: lora(gm, ["fc2"], r=r), match="r must be")


@pytest.mark.parametrize("init", ["kaiming", "PISSA", None, ""])
def test_bad_init(setup, init):
    _raises(setup, fxtune.AdapterError, lambda gm: lora(gm, ["fc2"], init=init), match="init")


def test_pissa_rank_too_large(setup):
    _raises(setup, fxtune.AdapterError, lambda gm: lora(gm, ["fc2"], r=9, init="pissa"), match="fc2")


@pytest.mark.parametrize("form", ["both", "Weight", None, ""])
def test_bad_form(setup, form):
    _raises(setup, fxtune.AdapterError, lambda gm: lora(gm, ["fc2"], form=form), match="form")


@pytest.mark.parametrize(
    "dropout", [-0.1, 1.0, 1.5, float("nan"), None, "0.1"]
)
def test_bad_dropout(setup, dropout):
    _raises(setup, fxtune.AdapterError, lambda gm: lora(gm, ["fc2"], dropout=dropout, form="activation"))


def test_dropout_with_weight_form(setup):
    _raises(setup, fxtune.AdapterError, lambda gm: lora(gm, ["fc2"], dropout=0.1, form="weight"))


@pytest.mark.parametrize("targets", [["fc1"], "fc*", None])
def test_same_adapter_twice_on_a_site(setup, targets):
    err = _raises(setup, fxtune.AdapterError, lambda gm: lora(gm, targets, r=2), match="fc1")
    assert "adapter=" in str(err)  # says what to do next


def test_second_adapter_name_on_same_site_is_fine(setup):
    model, gm, _, gm_snap = setup
    again = lora(gm, ["fc1"], r=2, adapter="second")
    assert_unchanged(gm, gm_snap)
    assert {k for k in again.state_dict() if k.startswith("fxtune.")} == {
        "fxtune.default.fc1.lora_a", "fxtune.default.fc1.lora_b", "fxtune.second.fc1.lora_a", "fxtune.second.fc1.lora_b"
    }


@pytest.mark.parametrize(
    "name",
    [
        "my-adapter",
        "1st",
        "",
        "a.b",
        "with space",
        "class",
        "None",
        "training",
        "forward",
    ],
)
def test_adapter_name_must_be_usable_attribute(setup, name):
    _raises(setup, fxtune.AdapterError, lambda gm: lora(gm, ["fc2"], r=2, adapter=name))


def test_extending_an_adapter_with_another_kind(setup):
    def add_outscale(gm):
        rw = fxtune.Rewrite(gm, kind="test_errors_outscale", adapter="default")
        for target in rw.select(["fc2"]):
            rw.attach(target, params={"s": torch.ones(8)})
        return rw.finish()

    err = _raises(setup, fxtune.AdapterError, add_outscale, match="lora")
    assert "adapter=" in str(err)


def test_other_kind_under_another_name_is_fine(setup):
    model, gm, _, gm_snap = setup
    rw = fxtune.Rewrite(gm, kind="test_errors_outscale", adapter="scale")
    for target in rw.select(["fc2"]):
        rw.attach(target, params={"s": torch.full((8,), 2.0)})
    out = rw.finish()
    assert_unchanged(gm, gm_snap)
    x = torch.randn(2, 16)
    with torch.no_grad():
        b = model.fc2.bias
        torch.testing.assert_close(out(x) - b, 2 * (gm(x) - b))  # diag(2)·W, bias unchanged


def test_unknown_kind(setup):
    _raises(setup, fxtune.AdapterError, lambda gm: fxtune.Rewrite(gm, kind="no_such_kind"))


def test_attach_bad_form(setup):
    def bad(gm):
        rw = fxtune.Rewrite(gm, kind="test_errors_outscale", adapter="scale")
        rw.attach("fc2", params={"s": torch.ones(8)}, form="sideways")
        return rw.finish()

    _raises(setup, fxtune.AdapterError, bad)


def test_register_kind_refuses_local_function():
    def local(w):
        return w

    with pytest.raises(fxtune.AdapterError, match="local"):
        fxtune.register_kind(fxtune.AdapterKind("test_errors_local", weight=local))
    with pytest.raises(fxtune.AdapterError):
        fxtune.get_kind("test_errors_local")


def test_register_kind_refuses_a_taken_name_unless_replace():
    original = fxtune.get_kind("lora")
    with pytest.raises(fxtune.AdapterError, match=r"'lora' is already registered.*replace=True"):
        fxtune.register_kind(fxtune.AdapterKind("lora", weight=out_scale_weight))
    assert fxtune.get_kind("lora") is original
    fxtune.register_kind(fxtune.AdapterKind("test_errors_outscale", weight=out_scale_weight))  # same definition again: fine
    try:
        fxtune.register_kind(fxtune.AdapterKind("lora", weight=out_scale_weight), replace=True)
        assert fxtune.get_kind("lora").weight is out_scale_weight
    finally:
        fxtune.register_kind(original, replace=True)
    assert fxtune.get_kind("lora") is original


def test_fuse_unknown_adapter(setup):
    err = _raises(setup, fxtune.FusionError, lambda gm: fuse(gm, adapters=["nope"]), match="nope")
    assert "default" in str(err)  # lists what exists


def test_fuse_unknown_adapter_string(setup):
    _raises(setup, fxtune.FusionError, lambda gm: fuse(gm, adapters="nope"), match="nope")


def test_fuse_nonfinite(setup):
    _, gm, _, _ = setup
    with torch.no_grad():
        gm.fxtune.default.fc1.lora_b[0, 0] = float("nan")
    gm_snap = snapshot(gm)
    with pytest.raises(fxtune.FusionError, match="fc1"):
        fuse(gm)
    assert_unchanged(gm, gm_snap)


def test_selection_error_is_fxtune_error(setup):
    _raises(setup, fxtune.SelectionError, lambda gm: lora(gm, "nothing*"))


# ----------------------------------------------------------------------------- non-GraphModule input


def test_lora_on_plain_module():
    model = MLP()
    snap = snapshot(model)
    with pytest.raises(fxtune.FxtuneError, match="trace"):
        lora(model, r=2)
    assert_unchanged(model, snap)


def test_fuse_on_plain_module():
    model = MLP()
    snap = snapshot(model)
    try:
        with pytest.raises(fxtune.FxtuneError):
            fuse(model)
    finally:
        assert_unchanged(model, snap)


def test_sites_on_plain_module():
    with pytest.raises(fxtune.FxtuneError):
        fxtune.sites(MLP())


def test_error_hierarchy():
    for cls in (fxtune.TraceError, fxtune.SelectionError, fxtune.AdapterError, fxtune.FusionError):
        assert issubclass(cls, fxtune.FxtuneError) and issubclass(cls, Exception)
    assert issubclass(fxtune.FxtuneWarning, UserWarning)


def test_oversized_adapter_warns(setup):
    _, gm, _, _ = setup
    with pytest.warns(fxtune.FxtuneWarning, match="fc2"):
        lora(gm, ["fc2"], r=16)


def test_warnings_point_at_the_users_line_through_pipelines_and_strategies():
    gm = fxtune.trace(nn.Sequential(nn.Linear(4, 2)))
    runs = {
        "direct": lambda: lora(gm, r=8),
        "pipeline": lambda: fxtune.Pipeline([functools.partial(lora, r=8)]).run(gm),
        "strategy": lambda: fxtune.Strategy([("*", functools.partial(lora, r=8))]).apply(gm),
    }
    for how, run in runs.items():
        with pytest.warns(fxtune.FxtuneWarning, match="more than the 8 of the weight") as caught:
            run()
        assert [w.filename for w in caught] == [__file__], how
