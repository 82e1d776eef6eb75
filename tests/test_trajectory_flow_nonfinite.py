"""trajops.trajectory_flow with hostile inputs: NaN/Inf anywhere (forward and backward identical to
the reference, NaN positions included), windows near the int64 limit, and the documented rule.

Runs on whatever backend this process dispatches to (C++, reference, Triton interpreter).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trajops
from trajops import reference

from conftest import assert_close
from nonfinite import EXAMPLES, assert_same_nonfinite, spots, sprinkle

op = torch.ops.trajops.trajectory_flow
op_backward = torch.ops.trajops.trajectory_flow_backward
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("window", [2**31 - 1, 2**31, 2**62, 2**63 - 2, 2**63 - 1])
def test_huge_window_is_the_whole_prefix(window):
    # i + window overflowed int64 in the C++ backward (a segfault); any window >= T - 1 must give
    # the same result as window = T - 1, forward and backward.
    x = torch.randn(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = torch.randn_like(x)
    assert_close(op(x, window, 1e-6), op(x, 4, 1e-6))
    assert_close(op_backward(g, x, window, 1e-6), op_backward(g, x, 4, 1e-6))
    leaf = torch.randn(1, 3, 2, requires_grad=True)  # the reproducer
    trajops.trajectory_flow(leaf, window=window).sum().backward()
    assert leaf.grad.shape == leaf.shape and torch.isfinite(leaf.grad).all()


def test_nan_step_is_skipped():
    # The rule: a step is counted iff its norm > eps; a NaN norm fails that test (the seed's
    # comparison), so the step is skipped like a zero step and its NaN is never read further.
    x = torch.randn(1, 9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_nan = x.clone()
    x_nan[0, 4, 1] = NAN  # steps 3 and 4 hold the NaN
    skipped = x.clone()
    skipped[0, 4] = skipped[0, 3]  # step 3 is zero ...
    out = op(x_nan, 3, 1e-6)
    assert torch.isfinite(out).all()
    want = op(skipped, 3, 1e-6)  # ... positions 4..6 see step 3 skipped; step 4 differs from x_nan
    assert_close(out[0, :5], want[0, :5])
    g = torch.randn_like(x)
    dx = op_backward(g, x_nan, 3, 1e-6)
    assert torch.isfinite(dx).all()  # rows 3..5 only touch skipped steps through dd = 0
    assert_same_nonfinite(dx, reference.trajectory_flow_backward(g, x_nan, 3, 1e-6))


def test_inf_step_counts_with_nan_direction():
    x = torch.zeros(1, 6, 2, dtype=torch.float64)
    x[0, :, 0] = torch.arange(6.0)
    x[0, 3, 1] = INF  # steps 2 (+inf in component 1) and 3 (-inf)
    out = op(x, 2, 1e-6)
    # weight tanh(inf) = 1, direction d / |d| = (0, inf / inf) = (0, NaN)
    assert torch.equal(out[0, :3], torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64))
    assert out[0, 3:6, 1].isnan().all() and torch.isfinite(out[0, 3:6, 0]).all()
    assert_same_nonfinite(out, reference.trajectory_flow(x, 2, 1e-6))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 9),
    D=st.integers(1, 4),
    window=st.sampled_from([1, 2, 3, 5, 2**63 - 1]),
    eps=st.sampled_from([0.0, 1e-6, 0.5]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    x_spots=spots(3),
    g_spots=spots(2),
    seed=st.integers(0, 2**31 - 1),
)
def test_nonfinite_matches_reference(B, T, D, window, eps, dtype, x_spots, g_spots, seed):
    gen = torch.Generator().manual_seed(seed)
    # integer-valued steps make zero steps (skipped) and exact ties common
    x = torch.randint(-2, 3, (B, T, D), generator=gen).to(dtype)
    x = sprinkle(x, x_spots)
    g = sprinkle(torch.randn(B, T, D, generator=gen, dtype=torch.float64).to(dtype), g_spots)
    assert_same_nonfinite(op(x, window, eps), reference.trajectory_flow(x, window, eps), what="out")
    assert_same_nonfinite(op_backward(g, x, window, eps), reference.trajectory_flow_backward(g, x, window, eps),
                          what="dx")
