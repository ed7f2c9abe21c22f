"""frontend="auto": symbolic tracing with timm's and torchvision's own FX registrations, then torch.export
on example inputs, saying which one it used; and regions (autocast, no_grad) inside export graphs.

Numbers are checked against `frontend_helpers.lora_reference64`: the user's model run in float64 on
W + s·B@A computed in the test.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torchvision
from torch import nn

import fxtune
from core_helpers import Outer, assert_unchanged, snapshot, vision_model
from frontend_helpers import lora_reference64
from fxtune.passes import fuse, lora
from site_helpers import randomize, rel_err

timm_layers = pytest.importorskip("timm.layers")


class SquareGrid(nn.Module):
    """Tokens folded back into a square grid, as ViT-style models do: Python on a shape."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.proj(x)
        side = int(math.sqrt(tokens.shape[1]))
        grid = tokens.transpose(1, 2).reshape(x.shape[0], 8, side, side)
        return self.head(self.conv(grid).mean((2, 3)))


class SamePadded(nn.Module):
    """timm's Conv2dSame pads by shape arithmetic; timm registers it as a leaf for its own tracer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.same = timm_layers.Conv2dSame(8, 8, 3, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.same(torch.relu(self.stem(x))).mean((2, 3)))


class Deformable(nn.Module):
    """torchvision's deform_conv2d unpacks weight.shape; torchvision wraps torchvision.ops for its tracer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.offset = nn.Conv2d(8, 18, 3, padding=1)
        self.deform = torchvision.ops.DeformConv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.conv(x)
        return self.head(self.deform(h, self.offset(h)).mean((2, 3)))


class Masked(nn.Module):
    """An optional input, as timm's Hiera has: a call without it never takes the `is not None` branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask.view(x.shape[0], 1)
        return self.fc(x)


class PartialConv(nn.Module):
    """Picks its forward in __init__, as timm's FasterNet does: a bound method in the instance's __dict__."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.forward = self.forward_split_cat

    def forward_split_cat(self, x):
        x1, x2 = torch.split(x, [4, 4], dim=1)
        return torch.cat((self.conv(x1), x2), 1)


class WithPartialConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = PartialConv()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.mix(self.stem(x)).mean((2, 3)))


class Regions(nn.Module):
    """A linear inside an autocast region and one inside a no_grad region (higher-order ops under export)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)
        self.d = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        with torch.autocast("cpu", enabled=False):
            h = torch.relu(self.b(h))
        with torch.no_grad():
            h = h + self.c(h)
        return self.d(h)


def _grid_tokens(batch: int = 2, side: int = 3) -> torch.Tensor:
    return torch.randn(batch, side * side, 4, generator=torch.Generator().manual_seed(1))


def _check_lora_every_site(model: nn.Module, gm, x: torch.Tensor) -> None:
    """LoRA (B random) on every site: adapted == fused == the float64 reference; the fused weights load into the model."""
    adapted = lora(gm, r=2)
    randomize(adapted, std=0.2, seed=3)
    expected = lora_reference64(model, adapted, (x,))
    with torch.no_grad():
        got, fused = adapted(x), fuse(adapted)
        assert rel_err(model(x), expected) > 1e-2, "adapters too small to matter"
        assert rel_err(got, expected) < 1e-5
        assert rel_err(fused(x), expected) < 1e-5
    fresh = type(model)().eval()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(fresh(x), expected) < 1e-5


def test_default_is_symbolic_tracing_quietly():
    model = vision_model("resnet18")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = fxtune.trace(model, example_inputs=(torch.randn(1, 3, 32, 32),))
    assert gm.meta["fxtune_frontend"] == "fx"
    assert gm.meta["fxtune_trace"] == {"frontend": "fx"}  # plain tracing: no library rules were needed
    assert gm.code == fxtune.trace(model, frontend="fx").code


def test_auto_falls_back_to_export_and_says_so():
    model = SquareGrid().eval()
    snap = snapshot(model)
    x = _grid_tokens()
    with pytest.warns(fxtune.FxtuneWarning, match="symbolic tracing stopped") as caught:
        gm = fxtune.trace(model, example_inputs=(x,))
    message = str(caught[0].message)
    assert "test_frontend_auto.py" in message and "side = int(math.sqrt(tokens.shape[1]))" in message
    assert "torch.export" in message and "dynamic=" in message
    assert caught[0].filename == __file__  # attributed to the caller's line
    assert gm.meta["fxtune_frontend"] == "export"
    assert gm.meta["fxtune_trace"]["fallback_from"] == "fx"
    assert [s.name for s in fxtune.sites(gm)] == ["proj", "conv", "head"]
    _check_lora_every_site(model, gm, x)
    assert_unchanged(model, snap)


def test_auto_fallback_keeps_shapes_free_when_asked():
    model = SquareGrid().eval()
    with pytest.warns(fxtune.FxtuneWarning):
        gm = fxtune.trace(model, example_inputs=(_grid_tokens(),), dynamic="batch")
    other = _grid_tokens(batch=5)
    with torch.no_grad():
        torch.testing.assert_close(gm(other), model(other))


def test_without_example_inputs_the_error_says_they_open_the_export_route():
    with pytest.raises(fxtune.TraceError, match=r"falls back to torch.export by itself: fxtune.trace\(model, example_inputs=") as info:
        fxtune.trace(SquareGrid())
    assert "int(math.sqrt(tokens.shape[1]))" in str(info.value)


def test_frontend_fx_does_not_fall_back():
    with pytest.raises(fxtune.TraceError, match="could not trace module"):
        fxtune.trace(SquareGrid(), frontend="fx", example_inputs=(_grid_tokens(),))


def test_when_both_front_ends_fail_both_reasons_name_the_users_line():
    model = Outer()
    with pytest.raises(fxtune.TraceError, match="neither front end") as info:
        fxtune.trace(model, example_inputs=(torch.randn(2, 4),))
    message = str(info.value)
    symbolic, exported = message.split("torch.export: ", 1)
    for part in (symbolic, exported):
        assert "core_helpers.py" in part and "block.1" in part
    assert "if x.sum() > 0:" in symbolic and "torch.where" in exported


def test_a_wrong_leaf_name_is_not_a_reason_to_fall_back():
    with pytest.raises(fxtune.TraceError, match="leaf_modules names no module"):
        fxtune.trace(SquareGrid(), leaf_modules=["nope"], example_inputs=(_grid_tokens(),))


@pytest.mark.parametrize(
    "options",
    [{"frontend": "fx", "dynamic": "batch"}, {"leaf_modules": [3]}, {"frontend": "export", "leaf_modules": [nn.Linear]},
     {"dynamic": "seq"}],
    ids=["fx-dynamic", "leaf-not-a-type", "export-leaf", "dynamic-unknown"],
)
def test_options_of_the_other_front_end_are_refused(options):
    with pytest.raises(fxtune.TraceError):
        fxtune.trace(nn.Sequential(nn.Linear(4, 4)), **options)  # traceable: the option alone is refused


@pytest.mark.filterwarnings("ignore:Was not able to add assertion")  # fx, on the concrete tensor below
@pytest.mark.parametrize("frontend", ["auto", "fx"])
def test_an_optional_input_left_out_is_none_and_given_stays_an_input(frontend):
    model = Masked().eval()
    x, mask = torch.randn(3, 4), torch.tensor([1.0, 0.0, 2.0])
    plain = fxtune.trace(model, frontend=frontend)
    assert plain.meta["fxtune_trace"]["fixed_inputs"] == {"mask": None}
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)  # fx alone would need a mask here
        with pytest.raises(AssertionError, match=r"mask was fixed to None .* example_kwargs=\{'mask': \.\.\.\}"):
            plain(x, mask)
    live = fxtune.trace(model, frontend=frontend, example_inputs=(x,), example_kwargs={"mask": mask})
    assert "fixed_inputs" not in live.meta["fxtune_trace"]
    with torch.no_grad():
        torch.testing.assert_close(live(x, mask), model(x, mask), rtol=0, atol=0)
    kept = fxtune.trace(model, frontend=frontend, concrete_args={"mask": torch.ones(3)})  # the user's own value wins
    with torch.no_grad():
        torch.testing.assert_close(kept(x), model(x, torch.ones(3)), rtol=0, atol=0)


def test_timm_registered_leaf_module_is_used_only_where_tracing_stopped():
    model = SamePadded().eval()
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(2))
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)  # plain tracing stops in Conv2dSame
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, so nothing to warn about
        gm = fxtune.trace(model, frontend="fx")
    assert gm.meta["fxtune_trace"] == {
        "frontend": "fx", "libraries": ["timm"], "library_leaf_modules": ["timm.layers.conv2d_same.Conv2dSame"],
    }
    assert [(s.name, s.call) for s in fxtune.sites(gm)] == [("stem", "module"), ("same", "opaque"), ("head", "module")]
    _check_lora_every_site(model, gm, x)


def test_torchvision_wrapped_functions_let_deform_conv_trace():
    model = Deformable().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    gm = fxtune.trace(model)
    assert gm.meta["fxtune_trace"] == {"frontend": "fx", "libraries": ["torchvision"], "library_leaf_modules": []}
    assert "torchvision_ops_deform_conv_deform_conv2d(" in gm.code
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    assert [s.name for s in fxtune.sites(gm)] == ["conv", "offset", "head"]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_forward_picked_in_init_runs_on_fxtunes_copy(frontend):
    """Before: fx stopped ("not installed as a submodule"), export baked mix.conv's weight in as a constant."""
    torch.manual_seed(0)
    model = WithPartialConv().eval()
    snap = snapshot(model)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    gm = fxtune.trace(model, frontend=frontend, example_inputs=(x,))
    assert [s.name for s in fxtune.sites(gm)] == ["stem", "mix.conv", "head"]
    assert fxtune.coverage(model, gm).complete and not fxtune.coverage(model, gm).unused
    _check_lora_every_site(model, gm, x)
    assert_unchanged(model, snap)


def test_sites_inside_autocast_and_no_grad_regions_are_found_and_exact():
    """Export wraps such regions in higher-order ops (`wrap_with_autocast(..., submod, h, b_weight, b_bias)`);
    the region's weights arrive as inputs, so they are sites adapted in weight form."""
    torch.manual_seed(0)
    model = Regions().eval()
    snap = snapshot(model)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    gm = fxtune.trace(model, frontend="export", example_inputs=(x,))
    assert "wrap_with_autocast" in gm.code and "wrap_with_set_grad_enabled" in gm.code
    assert [(s.name, s.call) for s in fxtune.sites(gm)] == [("a", "function"), ("b", "value"), ("c", "value"), ("d", "function")]
    assert list(gm.state_dict()) == list(model.state_dict())
    _check_lora_every_site(model, gm, x)
    assert_unchanged(model, snap)
