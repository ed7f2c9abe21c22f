"""Property-based fuzzing: random tiny networks under random chains of fxtune passes and lifecycle calls.

Each example draws a network (Linear, Conv1d/2d/3d with random groups, dilation, stride, padding
and padding modes, residuals, concats, a module called twice, functional and value uses of a
weight, transformers-style Conv1D, MultiheadAttention in both batch layouts and with separate
k/v widths, an Embedding tied to an LM head; float32 or float64, channels-last or unbatched conv
inputs), optionally fold_bn/low_rank, then adapter passes of every kind under random names (their
parameters perturbed away from identity) mixed with merge, unmerge, set_active, delete_adapter,
save -> load (both formats), swap_base, unload and fuse. Every step is checked against a float64
reference built from the kinds' weight transforms (see fuzz_helpers and fuzz_reference).
Bugs found are reproduced in test_fuzz_found.py (all fixed).
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fxtune
from fuzz_helpers import run_chain
from fuzz_nets import networks

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

COMMON = dict(
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@settings(max_examples=40, phases=[Phase.explicit, Phase.generate], **COMMON)
@given(data=st.data(), spec=networks(), seed=st.integers(0, 2**16))
def test_random_chains(data, spec, seed):
    run_chain(data, spec, seed)


@pytest.mark.slow
@settings(max_examples=1000, phases=[Phase.explicit, Phase.generate], **COMMON)  # no shrinking: CI's time budget
@given(data=st.data(), spec=networks(), seed=st.integers(0, 2**16))
def test_random_chains_many(data, spec, seed):
    run_chain(data, spec, seed, max_ops=10)


def _scaled_lora_branch(em, x, y, inputs):
    """LoRA's activation form with a 5% wrong scale: what a bug in a graph form would look like."""
    return LORA.activation(em, x, y, {**inputs, "scale": inputs["scale"] * 1.05})


LORA = fxtune.get_kind("lora")


def test_the_checks_catch_a_wrong_activation_form():
    """The fuzz checks are not vacuous: with LoRA's activation form subtly wrong, some example fails."""

    @settings(max_examples=40, phases=[Phase.generate], report_multiple_bugs=False, **COMMON)
    @given(data=st.data(), spec=networks(), seed=st.integers(0, 2**16))
    def fuzz(data, spec, seed):
        run_chain(data, spec, seed)

    fxtune.register_kind(dataclasses.replace(LORA, activation=_scaled_lora_branch), replace=True)
    try:
        with pytest.raises(AssertionError, match="float64 reference|fused vs unfused"):
            fuzz()
    finally:
        fxtune.register_kind(LORA, replace=True)
    assert fxtune.get_kind("lora") is LORA
