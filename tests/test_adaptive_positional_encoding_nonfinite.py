"""trajops.adaptive_positional_encoding (and nn.TrajectoryAdaptivePositionalEncoding) with hostile
inputs: NaN/Inf in displacement, positions, table and grad_out (forward and gradients identical to
the reference, NaN positions included), empty sequences and empty embeddings.

Runs on whatever backend this process dispatches to (C++, reference, Triton interpreter).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trajops
from trajops import reference

from nonfinite import EXAMPLES, assert_same_nonfinite, spots, sprinkle

op = torch.ops.trajops.adaptive_positional_encoding
op_backward = torch.ops.trajops.adaptive_positional_encoding_backward
NAN, INF = float("nan"), float("inf")


def test_rule_on_a_small_case():
    # NaN semantic position: NaN output row, table rows 0 and 1 get NaN gradient (read with a NaN
    # weight), and the displacement gets none from that row (clamp's gradient mask). +-Inf clamps.
    table = torch.arange(12.0, dtype=torch.float64).view(4, 3)
    d = torch.tensor([[0.0, 0.5, NAN, 0.0], [0.0, INF, -INF, 0.0]], dtype=torch.float64)
    out = op(d, table)
    assert out[0, 2:].isnan().all() and torch.isfinite(out[0, :2]).all()
    assert torch.equal(out[1, 1], table[3]) and out[1, 2:].isnan().all()  # inf + -inf = NaN
    g = torch.ones(2, 4, 3, dtype=torch.float64)
    gd, gs, gt = op_backward(g, d, table, None, True)
    assert torch.equal(gs[0], torch.tensor([9.0, 9.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(gd[0], torch.tensor([18.0, 9.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(gs[1], torch.tensor([9.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert gt[:2].isnan().all() and torch.isfinite(gt[2:]).all()
    # A NaN of dL/ds reaches the displacements at or before its position only (the Triton reverse
    # scan once spread it over its whole chunk).
    g = torch.ones(1, 6, 3, dtype=torch.float64)
    g[0, 2, 1] = NAN
    gd, gs, _ = op_backward(g, torch.full((1, 6), 0.25, dtype=torch.float64), table, None, False)
    assert gd[0, :3].isnan().all() and torch.isfinite(gd[0, 3:]).all()
    assert gs[0, 2].isnan() and torch.isfinite(gs[0, [0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("shape", [(2, 0, 4), (0, 4), (0, 0, 4), (3, 1, 4)])
def test_module_keeps_the_sequence_length(shape):
    # T = 0 gave (B, 1, E): the zero displacement of t = 0 was padded onto an empty step list.
    m = trajops.nn.TrajectoryAdaptivePositionalEncoding(4, 16)
    x = torch.randn(shape, requires_grad=True)
    out = m(x)
    assert out.shape == shape
    out.sum().backward()
    assert x.grad.shape == shape


def test_empty_embedding_gradient():
    # E = 0 with a table that needs a gradient: the reference's reshape(-1, 0) raised
    d = torch.randn(2, 3, requires_grad=True)
    table = torch.randn(5, 0, requires_grad=True)
    out = trajops.adaptive_positional_encoding(d, table)
    assert out.shape == (2, 3, 0)
    out.sum().backward()
    assert torch.equal(d.grad, torch.zeros(2, 3)) and table.grad.shape == (5, 0)
    gd, gs, gt = op_backward(torch.zeros(2, 3, 0), d.detach(), table.detach(), None, True)
    assert gt.shape == (5, 0) and torch.equal(gd, torch.zeros(2, 3))


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 8),
    L=st.integers(1, 6),
    E=st.integers(1, 3),
    pos_kind=st.sampled_from(["none", "shared", "per_row"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    d_spots=spots(2),
    p_spots=spots(1),
    t_spots=spots(2),
    g_spots=spots(2),
    seed=st.integers(0, 2**31 - 1),
)
def test_nonfinite_matches_reference(B, T, L, E, pos_kind, dtype, d_spots, p_spots, t_spots, g_spots, seed):
    gen = torch.Generator().manual_seed(seed)
    # halves: integer positions (weight 0 on the upper row) and exact table ends are common
    d = sprinkle(torch.randint(-2, 3, (B, T), generator=gen).to(dtype) / 2, d_spots)
    table = sprinkle(torch.randn(L, E, generator=gen, dtype=torch.float64).to(dtype), t_spots)
    positions = None
    if pos_kind != "none":
        shape = (T,) if pos_kind == "shared" else (B, T)
        positions = sprinkle(torch.randint(-1, L + 1, shape, generator=gen).to(dtype), p_spots)
    assert_same_nonfinite(op(d, table, positions), reference.adaptive_positional_encoding(d, table, positions),
                          what="out")
    g = sprinkle(torch.randn(B, T, E, generator=gen, dtype=torch.float64).to(dtype), g_spots)
    got = op_backward(g, d, table, positions, True)
    want = reference.adaptive_positional_encoding_backward(g, d, table, positions, True)
    for name, a, e in zip(("grad_displacement", "grad_position", "grad_table"), got, want):
        assert_same_nonfinite(a, e, what=name)
