"""trajops.stp_loss / stp_loss_dense with hostile inputs: NaN/Inf anywhere (forward, stats and
gradients identical to the reference, NaN positions included), steps too large to square, and
index values at the int64 limits.

Runs on whatever backend this process dispatches to (C++, reference, Triton interpreter).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trajops
from trajops import reference

from conftest import assert_close
from nonfinite import EXAMPLES, assert_same_nonfinite, spots, sprinkle

op = torch.ops.trajops.stp_loss
op_backward = torch.ops.trajops.stp_loss_backward
dense = torch.ops.trajops.stp_loss_dense
dense_backward = torch.ops.trajops.stp_loss_dense_backward
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- steps too large to square
def _line(step, D, T=4, dtype=torch.float32):
    """T points on a straight line with steps of `step` in every component (|step| ~ step sqrt(D))."""
    t = torch.arange(T, dtype=torch.float64).view(1, T, 1)
    return (t * step * torch.ones(1, 1, D, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("D", [1, 2, 7])
@pytest.mark.parametrize("step", [2e19, 1e30, 1e37])
def test_huge_finite_steps_do_not_overflow(D, step):
    # |a|^2 overflows fp32 above ~1.8e19: the loss of a straight line must still be 0 (a plain
    # sum of squares gave 1, or NaN), the stats hold cos = 1 and finite norms, the gradient is finite.
    h = _line(step, D).requires_grad_()
    tri = torch.tensor([[[0, 1, 3]], [[1, 2, 3]]])
    loss, stats = op([h], tri)
    assert_close(loss, torch.zeros_like(loss))  # 0 up to rounding (-1.2e-7 is one fp32 ulp of 1)
    assert_close(stats[..., 2], torch.ones_like(stats[..., 2]))
    want = step * D**0.5 * torch.tensor([1.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(stats[0, :, 0, :2].flatten().double(), want, rtol=1e-6, atol=0)
    dl, ds = dense([h])
    assert_close(dl, torch.zeros_like(dl))
    assert torch.isfinite(ds).all()
    (loss.sum() + dl.sum()).backward()
    assert torch.isfinite(h.grad).all()


def test_huge_step_next_to_a_small_one():
    # a = 1e20 e1, b ~ 2e13 (e1 + e2): cos(b, a) ~ 1/sqrt(2), computed in fp32 without overflow.
    h = torch.tensor([[[0.0, 0.0], [1e20, 0.0], [1e20 + 2e13, 2e13]]])  # |a|^2 = 1e40 overflows fp32
    loss, stats = op([h], torch.tensor([[[0, 1, 2]]]))
    a, b = (h[0, 1] - h[0, 0]).double(), (h[0, 2] - h[0, 1]).double()
    want = 1 - F.cosine_similarity(b, a, dim=0, eps=1e-8)
    torch.testing.assert_close(loss[0, 0, 0].double(), want, atol=1e-6, rtol=0)
    g = op_backward(torch.ones_like(loss), stats, [h], torch.tensor([[[0, 1, 2]]]), None)[0]
    want_g = reference.stp_loss_backward(torch.ones_like(loss), reference.stp_loss([h], torch.tensor([[[0, 1, 2]]]))[1],
                                         [h], torch.tensor([[[0, 1, 2]]]))[0]
    assert torch.isfinite(g).all()
    assert_close(g, want_g)


# ---------------------------------------------------------------- NaN / Inf
def test_nan_triple_poisons_exactly_its_rows():
    # The rule: a valid triple that reads a NaN or Inf has a NaN loss and NaN gradient rows (all of
    # D) for its three positions, even with grad_loss = 0; nothing else is touched.
    h = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0))
    h[0, 2, 1] = INF
    tri = torch.tensor([[[0, 2, 4], [0, 1, 2]], [[1, 3, 5], [3, 4, 5]]])  # (S=2, B=2, 3)
    loss, stats = op([h], tri)
    assert loss[0, 0, 0].isnan() and loss[0, 0, 1].isfinite() and loss[0, 1].isfinite().all()
    g = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    grad = op_backward(g, stats, [h], tri, None)[0]
    assert grad[0, [0, 2, 4]].isnan().all() and grad[0, [1, 3, 5]].isfinite().all() and grad[1].isfinite().all()
    # An infinite grad_loss of a finite triple: NaN rows too, not an Inf/NaN mix that would depend on
    # whether a term rounds to exactly 0 (inf * 0).
    grad = op_backward(torch.tensor([[[1.0, 1.0], [INF, 1.0]]]), stats, [h], tri, None)[0]
    assert grad[0, [1, 3, 5]].isnan().all() and grad[1].isfinite().all()
    dl, ds = dense([h])
    assert dl[0, 0, :3].isnan().all() and dl[0, 0, 3:].isfinite().all() and dl[0, 1].isfinite().all()
    gd = dense_backward(torch.zeros_like(dl), ds, [h], None)[0]
    assert gd[0, :5].isnan().all() and torch.equal(gd[0, 5], torch.zeros(3)) and torch.equal(gd[1], torch.zeros(6, 3))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    L=st.integers(1, 2),
    B=st.integers(1, 3),
    T=st.integers(0, 7),
    D=st.integers(0, 4),
    S=st.integers(1, 3),
    use_lengths=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    h_spots=spots(3),
    g_spots=spots(2),
    seed=st.integers(0, 2**31 - 1),
)
def test_nonfinite_matches_reference(L, B, T, D, S, use_lengths, dtype, h_spots, g_spots, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=gen) if use_lengths else None
    # integer-valued rows make zero steps (norms below eps) and exact cosines common
    hidden = [sprinkle(torch.randint(-2, 3, (B, T, D), generator=gen).to(dtype), h_spots[layer::L])
              for layer in range(L)]
    triples = trajops.sample_stp_triples(B, T, S, lengths=lengths, generator=gen)
    loss, stats = op(hidden, triples, lengths)
    ref_loss, ref_stats = reference.stp_loss(hidden, triples, lengths)
    assert_same_nonfinite(loss, ref_loss, what="loss")
    assert_same_nonfinite(stats, ref_stats, what="stats")
    g = sprinkle(torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype), g_spots,
                 (NAN, INF, 0.0))
    got = op_backward(g, ref_stats, hidden, triples, lengths)
    want = reference.stp_loss_backward(g, ref_stats, hidden, triples, lengths)
    for a, e in zip(got, want):
        assert_same_nonfinite(a, e, what="grad")

    dloss, dstats = dense(hidden, lengths)
    ref_dloss, ref_dstats = reference.stp_loss_dense(hidden, lengths)
    assert_same_nonfinite(dloss, ref_dloss, what="dense loss")
    assert_same_nonfinite(dstats, ref_dstats, what="dense stats")
    gd = sprinkle(torch.randn(dloss.shape, generator=gen, dtype=torch.float64).to(dloss.dtype), g_spots,
                  (NAN, INF, 0.0))
    got = dense_backward(gd, ref_dstats, hidden, lengths)
    want = reference.stp_loss_dense_backward(gd, ref_dstats, hidden, lengths)
    for a, e in zip(got, want):
        assert_same_nonfinite(a, e, what="dense grad")


# ---------------------------------------------------------------- index values at the limits
BIG = 2**63 - 1


@pytest.mark.parametrize(
    "triples,lengths,match",
    [
        ([[[0, 1, BIG], [0, 1, 2]]], None, r"got \(s, r, t\) = \(0, 1, 9223372036854775807\) for span 0, row 0"),
        ([[[-BIG - 1, 1, 2], [0, 1, 2]]], None, r"\(-9223372036854775808, 1, 2\) for span 0, row 0"),
        ([[[0, 1, 2], [BIG - 2, BIG - 1, BIG]]], None, r"for span 0, row 1 \(length 4\)"),
        ([[[0, 1, 2], [0, 1, 2]]], [BIG, 3],
         r"lengths must be in \[0, T\] = \[0, 4\], got 9223372036854775807 for row 0"),
        ([[[0, 1, 2], [0, 1, 2]]], [3, -BIG - 1], r"got -9223372036854775808 for row 1"),
    ],
)
def test_index_values_at_int64_limits_raise(triples, lengths, match):
    h = [torch.randn(2, 4, 3)]
    tri = torch.tensor(triples)
    lens = None if lengths is None else torch.tensor(lengths)
    with pytest.raises(ValueError, match=match):
        op(h, tri, lens)
    with pytest.raises(ValueError, match=match):
        op_backward(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2, 3), h, tri, lens)
    if lengths is not None:
        with pytest.raises(ValueError, match=match):
            dense(h, lens)
