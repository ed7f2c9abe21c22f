"""slice_delta: a tuner on one slice of each weight (add or mul), against an fp64 reference."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call

import fxtune
from fxtune.passes import fuse, slice_delta
from transform_helpers import (
    SITES,
    assert_close,
    assert_unchanged,
    base64,
    inputs,
    net,
    randomize,
    reference,
    slice_ref,
    slot,
    snapshot,
    traced_code,
)


def _tuners(op):
    if op == "add":
        return lambda name, p, g: 0.3 * torch.randn(p.shape, generator=g)
    return lambda name, p, g: 1.0 + 0.5 * torch.randn(p.shape, generator=g)


def _matrix(model, name):
    w = model.get_submodule(name).weight
    return w.shape[0], w[0].numel()


def _corners(g):
    return {n: (slot(g, n).config["row"], slot(g, n).config["col"]) for n in SITES}


@pytest.mark.parametrize("op", ["add", "mul"])
def test_init_is_exactly_a_no_op(op):
    model, xs = net(), inputs()
    g = slice_delta(fxtune.trace(model), size=0.3, op=op)
    for n in SITES:
        t = slot(g, n).tuner
        assert torch.equal(t, torch.zeros_like(t) if op == "add" else torch.ones_like(t))
    assert torch.equal(g(*xs), model(*xs))


@pytest.mark.parametrize("op", ["add", "mul"])
@pytest.mark.parametrize("size, where", [(0.1, "random"), ((2, 3), "top-left"), (1.0, "random"), (0.3, (1, 2))])
def test_matches_fp64_reference_and_fuses(op, size, where):
    model, xs = net(), inputs()
    snap = snapshot(model)
    gm = fxtune.trace(model)
    g = slice_delta(gm, size=size, op=op, where=where)
    assert_unchanged(model, snap)
    randomize(g, _tuners(op))
    base = base64(model)
    weights = {}
    for n in SITES:
        c = slot(g, n).config
        weights[n] = (slice_ref(base[n][0], slot(g, n).tuner, c["row"], c["col"], op), base[n][1])
    ref = reference(model, weights, xs)
    assert_close(g(*xs), ref)
    fused = fuse(g)
    assert_unchanged(model, snap)
    assert fused.code == traced_code(model)
    assert_close(fused(*xs), ref)
    for n in SITES:
        assert torch.equal(fused.get_submodule(n).weight, weights[n][0].float())  # one add/mul per entry: exact
    assert torch.equal(gm(*xs), model(*xs))


def test_slice_is_reproducible_and_seeded():
    gm = fxtune.trace(net())
    assert _corners(slice_delta(gm, seed=7)) == _corners(slice_delta(gm, seed=7))
    per_seed = [tuple(_corners(slice_delta(gm, seed=s)).values()) for s in range(5)]
    assert len(set(per_seed)) == 5
    # seeded by the site name: choosing fewer sites (or other order) leaves each site's slice where it was
    alone = slice_delta(gm, targets=["fc"], seed=7)
    assert slot(alone, "fc").config == slot(slice_delta(gm, seed=7), "fc").config
    reordered = slice_delta(gm, targets=["fc", "c1"], seed=7)
    assert slot(reordered, "c1").config == slot(slice_delta(gm, targets=["c1"], seed=7), "c1").config


def test_slice_does_not_depend_on_python_hash_seed():
    code = (
        "import sys, json; sys.path.insert(0, 'tests'); import fxtune; "
        "from fxtune.passes import slice_delta; from transform_helpers import net, slot, SITES; "
        "g = slice_delta(fxtune.trace(net()), seed=3); print(json.dumps([slot(g, n).config for n in SITES]))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    here = slice_delta(fxtune.trace(net()), seed=3)
    assert json.loads(out.stdout) == [slot(here, n).config for n in SITES]


def test_fraction_gives_a_rectangle_shaped_like_the_matrix():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 16), nn.Conv2d(4, 8, 3), nn.Linear(16, 3))
    g = slice_delta(fxtune.trace(model), targets=["0", "1", "2"], size=0.25)
    assert (slot(g, "0").config["rows"], slot(g, "0").config["cols"]) == (32, 32)
    assert (slot(g, "1").config["rows"], slot(g, "1").config["cols"]) == (8, 32)
    assert (slot(g, "2").config["rows"], slot(g, "2").config["cols"]) == (4, 18)  # 8×(4·3·3) view
    g = slice_delta(fxtune.trace(model), size=1.0)
    assert all(tuple(slot(g, n).tuner.shape) == tuple(_matrix(model, n)) for n in ["0", "1", "2", "3"])
    g = slice_delta(fxtune.trace(model), targets="3", size=1e-6)
    assert slot(g, "3").tuner.shape == (1, 1)
    small = net()
    g = slice_delta(fxtune.trace(small), size=0.1)
    for n in SITES:
        rows, cols = slot(g, n).tuner.shape
        n_rows, n_cols = _matrix(small, n)
        assert abs(rows * cols - 0.1 * n_rows * n_cols) <= rows / 2 + 1e-9
        assert abs(math.log((rows / cols) / (n_rows / n_cols))) < math.log(3)


def test_explicit_size_and_positions():
    gm = fxtune.trace(net())
    g = slice_delta(gm, size=(2, 3), where=(1, 4))
    assert all(slot(g, n).config == {"op": "add", "row": 1, "col": 4, "rows": 2, "cols": 3} for n in SITES)
    g = slice_delta(gm, size=(3, 5), where="top-left", op="mul")
    assert all(slot(g, n).config == {"op": "mul", "row": 0, "col": 0, "rows": 3, "cols": 5} for n in SITES)
    g = slice_delta(gm, targets=["c2", "fc"], size=(2, 2), where={"c2": (6, 34), "fc": (0, 20)})
    assert (slot(g, "c2").config["row"], slot(g, "c2").config["col"]) == (6, 34)
    assert (slot(g, "fc").config["row"], slot(g, "fc").config["col"]) == (0, 20)


def test_bad_settings_are_refused_with_the_site_named():
    gm = fxtune.trace(net())
    with pytest.raises(fxtune.AdapterError, match="'c3'.*4×36"):
        slice_delta(gm, size=(5, 2))
    with pytest.raises(fxtune.AdapterError, match="does not fit 'fc'"):
        slice_delta(gm, targets="fc", size=(2, 2), where=(4, 0))
    with pytest.raises(fxtune.AdapterError, match="no \\(row_start, col_start\\) for 'fc'"):
        slice_delta(gm, targets=["c2", "fc"], where={"c2": (0, 0)})
    with pytest.raises(fxtune.AdapterError, match="not selected"):
        slice_delta(gm, targets=["fc"], where={"fc": (0, 0), "c9": (0, 0)})
    for bad in (0, 1.5, -0.1, (0, 2), (2,), "big", True):
        with pytest.raises(fxtune.AdapterError, match="size"):
            slice_delta(gm, size=bad)
    with pytest.raises(fxtune.AdapterError, match="op"):
        slice_delta(gm, op="sub")
    with pytest.raises(fxtune.AdapterError, match="where"):
        slice_delta(gm, where="center")


@pytest.mark.parametrize("op", ["add", "mul"])
def test_gradients_reach_only_the_tuners_and_are_right(op):
    model, xs = net(), inputs()
    g = slice_delta(fxtune.trace(model), size=0.4, op=op)
    randomize(g, _tuners(op))
    g(*xs).square().sum().backward()
    for name, p in g.named_parameters():
        if not name.startswith("fxtune."):
            assert p.grad is None and not p.requires_grad, name
    assert all(p.grad is None for p in model.parameters())
    # fp64 reference: d loss / d W' at the adapted weights, restricted to the slice (times W[S] for mul)
    base = base64(model)
    leaves = {}
    for n in SITES:
        c = slot(g, n).config
        leaves[n] = slice_ref(base[n][0], slot(g, n).tuner, c["row"], c["col"], op).requires_grad_(True)
    ref_model = __import__("copy").deepcopy(model).double()
    params = {f"{n}.weight": w for n, w in leaves.items()}
    functional_call(ref_model, params, tuple(x.double() for x in xs)).square().sum().backward()
    for n in SITES:
        c, t = slot(g, n).config, slot(g, n).tuner
        s = (slice(c["row"], c["row"] + c["rows"]), slice(c["col"], c["col"] + c["cols"]))
        expected = leaves[n].grad.reshape(leaves[n].shape[0], -1)[s]
        if op == "mul":
            expected = expected * base[n][0].reshape(base[n][0].shape[0], -1)[s]
        torch.testing.assert_close(t.grad.double(), expected, rtol=1e-4, atol=1e-6)


def test_slice_is_saved_state_json_and_reloads_on_the_same_slice(tmp_path):
    model, xs = net(), inputs()
    gm = fxtune.trace(model)
    g = slice_delta(gm, size=0.2, seed=11)
    randomize(g, _tuners("add"))
    for n in SITES:
        config = slot(g, n).config
        assert json.loads(json.dumps(config)) == config
        assert all(type(config[k]) is int for k in ("row", "col", "rows", "cols"))
    assert {k for k in g.state_dict() if k.startswith("fxtune.")} == {f"fxtune.default.{n}.tuner" for n in SITES}
    fxtune.save_adapters(g, str(tmp_path))
    back = fxtune.load_adapters(fxtune.trace(model), str(tmp_path))
    assert [slot(back, n).config for n in SITES] == [slot(g, n).config for n in SITES]
    assert torch.equal(back(*xs), g(*xs))
