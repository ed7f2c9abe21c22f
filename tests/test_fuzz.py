"""Property-based fuzzing: random tiny networks under random chains of fxtune passes and lifecycle calls.

Each example draws a network (Linear, Conv1d/2d/3d with random groups, dilation, stride, padding
and padding modes, residuals, concats, a module called twice, functional and value uses of a
weight, transformers-style Conv1D, MultiheadAttention both batch layouts and with separate
k/v widths, an Embedding tied to an LM head), optionally fold_bn/low_rank, then adapter passes of
every kind under random names (their parameters perturbed away from identity) mixed with merge,
unmerge, set_active, delete_adapter, save -> load, swap_base and fuse. Every step is checked
against a float64 reference built from the kinds' weight transforms (see fuzz_helpers).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fuzz_helpers import run_chain
from fuzz_nets import networks

COMMON = dict(
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@settings(max_examples=40, **COMMON)
@given(data=st.data(), spec=networks(), seed=st.integers(0, 2**16))
def test_random_chains(data, spec, seed):
    run_chain(data, spec, seed)


@pytest.mark.slow
@settings(max_examples=520, phases=[Phase.explicit, Phase.generate], **COMMON)  # no shrinking: CI's time budget
@given(data=st.data(), spec=networks(), seed=st.integers(0, 2**16))
def test_random_chains_many(data, spec, seed):
    run_chain(data, spec, seed, max_ops=8)
