"""The torch.export front end's errors: each names what went wrong (module, line, argument) and what to
do, and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch

import fxtune
from core_helpers import Gate, Outer, assert_unchanged, snapshot
from hf_models import bert, gpt2

pytestmark = pytest.mark.filterwarnings("ignore::fxtune.FxtuneWarning")


@pytest.mark.parametrize(
    "dynamic, message",
    [
        ({"pixels": {0: "batch"}}, r"names \['pixels'\], which are not inputs"),
        ({"input_ids": {2: "batch"}}, r"does not fit input 'input_ids' of shape \(2, 7\)"),
        ({"input_ids": ("batch",)}, "does not fit"),
        ({"input_ids": "batch"}, "give a dict"),
        ("everything", "dynamic= takes 'batch'"),
    ],
)
def test_dynamic_argument_errors(dynamic, message):
    model, args, kwargs = bert()
    with pytest.raises(fxtune.TraceError, match=message):
        fxtune.trace(model, frontend="export", example_inputs=args, example_kwargs=kwargs, dynamic=dynamic)


def test_export_without_example_inputs_says_to_pass_them():
    model = Outer()
    snap = snapshot(model)
    with pytest.raises(fxtune.TraceError, match="example_inputs="):
        fxtune.trace(model, frontend="export")
    assert_unchanged(model, snap)


def test_data_dependent_control_flow_names_module_and_line():
    model = Outer()
    snap = snapshot(model)
    with pytest.raises(fxtune.TraceError) as info:
        fxtune.trace(model, frontend="export", example_inputs=(torch.randn(2, 4),))
    message = str(info.value)
    assert "block.1" in message and "Gate" in message and "core_helpers.py" in message
    assert "torch.where" in message and "use_cache=False" in message
    assert_unchanged(model, snap)


def test_hf_cache_output_says_use_cache_false():
    model, args, _ = gpt2()
    model.config.use_cache = True
    snap = snapshot(model)
    with pytest.raises(fxtune.TraceError, match="use_cache") as info:
        fxtune.trace(model, frontend="export", example_inputs=args)
    assert "DynamicCache" in str(info.value)
    assert_unchanged(model, snap)


def test_fx_failure_suggests_export_front_end():
    model = Outer()
    with pytest.raises(fxtune.TraceError, match="frontend='export'"):
        fxtune.trace(model)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: fxtune.trace(m, frontend="export", example_inputs=(torch.randn(2, 4),), leaf_modules=[Gate]),
        lambda m: fxtune.trace(m, frontend="export", example_inputs="not inputs"),
        lambda m: fxtune.trace(m, frontend="fx", dynamic="batch"),
    ],
    ids=["leaf-modules", "bad-inputs", "dynamic-with-fx"],
)
def test_front_end_argument_errors(call):
    model = Outer()
    snap = snapshot(model)
    with pytest.raises(fxtune.TraceError):
        call(model)
    assert_unchanged(model, snap)
