"""trajops.stp_loss / stp_loss_dense / sample_stp_triples: seed semantics, every backend against the
reference, gradients, reductions, the sampler, compile, fuzz, determinism and bad inputs.

The op-level tests run against whatever this process dispatches to (see conftest.CPU_BACKEND):
`make test` runs this file once with the C++ kernels, once with TRAJOPS_BACKEND=reference and once
with TRAJOPS_BACKEND=triton TRITON_INTERPRET=1 (the Triton kernels on CPU).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trajops
from trajops import reference

from conftest import DTYPES, INTERPRETER, TOL, assert_close

op = torch.ops.trajops.stp_loss
op_backward = torch.ops.trajops.stp_loss_backward
dense = torch.ops.trajops.stp_loss_dense
dense_backward = torch.ops.trajops.stp_loss_dense_backward

EPS = 1e-8
SLOW = [pytest.mark.slow]


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_close_rows(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """assert_close with the absolute tolerance scaled per row of the last dim (max(1, |row|)).

    Gradients of triples with a zero step are ~1/eps = 1e8: a tensor-wide scale would make every
    other row's comparison meaningless.
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    tol = TOL[dtype or expected.dtype]
    a, e = actual.double(), expected.double()
    if e.numel() == 0:
        return
    scale = e.abs().nan_to_num(0.0, 0.0, 0.0).amax(-1, keepdim=True).clamp_min(1.0)
    ok = ((a - e).abs() <= tol * scale + tol * e.abs()) | (a == e) | (a.isnan() & e.isnan())
    if not bool(ok.all()):
        idx = tuple(int(i) for i in (~ok).nonzero()[0])
        raise AssertionError(
            f"{int((~ok).sum())} of {ok.numel()} elements differ; first at {idx}: "
            f"actual {float(a[idx])!r}, expected {float(e[idx])!r} (tol {tol}, row scale {float(scale[idx[:-1]])})"
        )


def make_hidden(L, B, T, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(L)]


def as_lengths(lengths):
    return None if lengths is None else torch.tensor(lengths, dtype=torch.int64)


def make_triples(S, B, T, lengths=None, seed=0, garbage_inactive=True):
    """Sampled triples plus repeated positions: span 1 repeats span 0, span 2 is (0, r0, t0) (shares
    r and t with span 0), span 3 is (s0, r0, length - 1) (shares s and r); rows shorter than 3 get
    out-of-range garbage (the ops must ignore those rows entirely)."""
    g = torch.Generator().manual_seed(seed)
    tr = trajops.sample_stp_triples(B, T, S, lengths=lengths, generator=g)
    n = torch.full((B,), T) if lengths is None else lengths
    active = n >= 3
    if S >= 2:
        tr[1] = tr[0]
    if S >= 3:
        tr[2, :, 0] = 0
        tr[2, :, 1:] = tr[0, :, 1:]
    if S >= 4:
        tr[3, :, :2] = tr[0, :, :2]
        tr[3, :, 2] = (n - 1).clamp_min(0)
    if garbage_inactive and not bool(active.all()):
        junk = torch.tensor([[7, 3, 10**6], [-5, -5, -5], [2, 1, 0]])
        for b in (~active).nonzero().flatten().tolist():
            tr[:, b] = junk[torch.arange(S) % 3]
    return tr


# ---------------------------------------------------------------- the reference is the seed's math
def seed_sample(B, T, n_spans, generator):
    """The seed's sampler, one draw per span."""
    spans = []
    for _ in range(n_spans):
        idx = torch.randint(0, T - 2, (B, 3), generator=generator)
        idx = idx.sort(dim=-1).values + torch.tensor([0, 1, 2])
        spans.append(idx.clamp(max=T - 1))
    return spans


def seed_loss(hidden, spans):
    """The seed's loss: per layer, per span, gather the three rows of each sequence, 1 - cos, mean."""
    per_layer = []
    for h in hidden:
        B = h.shape[0]
        per_span = []
        for idx in spans:
            hs = torch.stack([h[b, idx[b, 0]] for b in range(B)])
            hr = torch.stack([h[b, idx[b, 1]] for b in range(B)])
            ht = torch.stack([h[b, idx[b, 2]] for b in range(B)])
            per_span.append((1 - F.cosine_similarity(ht - hr, hr - hs, dim=-1, eps=1e-8)).mean())
        per_layer.append(torch.stack(per_span).mean())
    return torch.stack(per_layer).mean()


@pytest.mark.parametrize("B,T,S", [(1, 3, 1), (4, 3, 5), (3, 4, 7), (5, 17, 6), (2, 40, 64)])
def test_sampler_matches_seed_draws(B, T, S):
    got = trajops.sample_stp_triples(B, T, S, generator=torch.Generator().manual_seed(1234 + T))
    expected = seed_sample(B, T, S, torch.Generator().manual_seed(1234 + T))
    assert got.shape == (S, B, 3) and got.dtype == torch.int64
    for i in range(S):
        assert torch.equal(got[i], expected[i]), i


@pytest.mark.parametrize("L,B,T,D,S", [(1, 1, 3, 1, 1), (1, 4, 6, 3, 5), (3, 3, 9, 7, 4), (2, 5, 30, 16, 8)])
def test_reference_matches_seed_loop(L, B, T, D, S):
    hidden = make_hidden(L, B, T, D, torch.float64, seed=L * 100 + T)
    expected = seed_loss(hidden, seed_sample(B, T, S, torch.Generator().manual_seed(5)))
    triples = trajops.sample_stp_triples(B, T, S, generator=torch.Generator().manual_seed(5))
    losses, stats = reference.stp_loss(hidden, triples)
    torch.testing.assert_close(losses.mean(), expected, atol=1e-13, rtol=1e-12)
    # The public function samples the seed's triples itself (whatever backend this run has).
    got = trajops.stp_loss(hidden if L > 1 else hidden[0], S, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    # stats = (|a|, |b|, cos), a = h[r] - h[s], b = h[t] - h[r]
    for layer, h in enumerate(hidden):
        for i in range(S):
            for b in range(B):
                s, r, t = triples[i, b].tolist()
                a, bb = h[b, r] - h[b, s], h[b, t] - h[b, r]
                want = torch.stack([a.norm(), bb.norm(), F.cosine_similarity(bb, a, dim=0, eps=1e-8)])
                torch.testing.assert_close(stats[layer, i, b], want, atol=1e-12, rtol=1e-12)
    # The gradient of the seed's mean.
    leaves = [h.clone().requires_grad_() for h in hidden]
    want = torch.autograd.grad(seed_loss(leaves, seed_sample(B, T, S, torch.Generator().manual_seed(5))), leaves)
    g = torch.full((L, S, B), 1.0 / (L * S * B), dtype=torch.float64)
    got = reference.stp_loss_backward(g, stats, hidden, triples)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)


def test_seed_semantics_small_cases():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # a right angle: cos 0 -> 1; straight on: 0; a reversal: 2; 135 degrees: 1 + 1/sqrt(2); 45 degrees
    rows = torch.stack([torch.zeros(2), e1, e1 + e2, e1 + 2 * e2, e1 + 4 * e2, e1 + 3 * e2, 2 * e1 + 4 * e2])
    h = rows.unsqueeze(0).double()
    triples = torch.tensor([[0, 1, 2], [1, 2, 3], [3, 4, 5], [4, 5, 6], [0, 2, 4]]).unsqueeze(1)
    want = torch.tensor([1.0, 0.0, 2.0, 1 + 1 / math.sqrt(2), 1 - 1 / math.sqrt(2)], dtype=torch.float64)
    for backend in (reference.stp_loss, op):
        loss, stats = backend([h], triples, None)
        torch.testing.assert_close(loss[0, :, 0], want, atol=1e-12, rtol=0)
        torch.testing.assert_close(stats[0, 0, 0], torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    # dense: steps e1, e2, e2, 2 e2, -e2, e1 + e2
    d_want = torch.tensor([1.0, 0.0, 0.0, 2.0, 1 + 1 / math.sqrt(2)], dtype=torch.float64)
    for backend in (reference.stp_loss_dense, dense):
        loss, stats = backend([h], None)
        torch.testing.assert_close(loss[0, 0], d_want, atol=1e-12, rtol=0)
        torch.testing.assert_close(stats[0, 0, :, 0], torch.tensor([1, 1, 1, 2, 1, math.sqrt(2)], dtype=torch.float64))
        torch.testing.assert_close(stats[0, 0, :, 1], torch.tensor([0.0, 1, 1, -1, -1 / math.sqrt(2), 0],
                                                                   dtype=torch.float64))


@pytest.mark.parametrize("zero_step", [False, True])
def test_reference_backward_is_autograd_of_reference(zero_step):
    hidden = make_hidden(2, 3, 9, 5, torch.float64, seed=3)
    if zero_step:
        for h in hidden:
            h[:, 2] = h[:, 1]
    lengths = torch.tensor([9, 2, 6])
    triples = make_triples(6, 3, 9, lengths, seed=3)
    triples[4, 0] = torch.tensor([1, 2, 3])  # a = 0 when zero_step
    triples[5, 0] = torch.tensor([0, 1, 2])  # b = 0 when zero_step
    leaves = [h.clone().requires_grad_() for h in hidden]
    losses, stats = reference.stp_loss(leaves, triples, lengths)
    g = torch.randn(losses.shape, dtype=torch.float64)
    want = torch.autograd.grad(losses, leaves, g)
    got = reference.stp_loss_backward(g, stats.detach(), hidden, triples, lengths)
    for a, e in zip(got, want):
        assert_close_rows(a, e)
    dl, ds = reference.stp_loss_dense(leaves, lengths)
    gd = torch.randn(dl.shape, dtype=torch.float64)
    want = torch.autograd.grad(dl, leaves, gd)
    got = reference.stp_loss_dense_backward(gd, ds.detach(), hidden, lengths)
    for a, e in zip(got, want):
        assert_close_rows(a, e)


# ---------------------------------------------------------------- kernels == reference (sampled)
def term_scale(g, stats, triples, lengths, B, T):
    """Per (layer, b, position): the sum over touching triples of |g| (1/|a| + 1/|b|), eps-clamped.

    A gradient row is a sum of terms of that size; when they cancel (D = 1, where cos is +-1
    and its gradient 0) the rounding left over is relative to them, not to the tiny result.
    """
    inv = (1.0 / stats[..., 0].double().clamp_min(1e-8) + 1.0 / stats[..., 1].double().clamp_min(1e-8))
    active = reference.stp_active_rows(B, T, lengths, triples.device).view(1, B, 1)
    w = (g.double().abs() * inv).unsqueeze(-1).expand(*g.shape, 3) * active  # (L, S, B, 3)
    flat = (torch.arange(B).view(1, B, 1) * T + torch.where(active, triples, 0)).reshape(-1)
    out = torch.zeros(g.shape[0], B * T, dtype=torch.float64)
    for layer in range(g.shape[0]):
        out[layer].index_add_(0, flat, w[layer].reshape(-1))
    return out.view(g.shape[0], B, T, 1)


def assert_grad_close(actual, expected, terms, dtype):
    """assert_close_rows, with each element's absolute tolerance also covering its cancelling terms."""
    tol = TOL[dtype]
    a, e = actual.double(), expected.double()
    ok = (a - e).abs() <= tol * terms
    assert_close_rows(torch.where(ok, e, a), e, dtype)


def check_sampled(hidden, triples, lengths, dtype=None, seed=0):
    """Forward (loss, stats), the backward op and autograd of the public function, vs the reference."""
    dtype = dtype or hidden[0].dtype
    acc = acc_of(dtype)
    L, (B, T, D), S = len(hidden), hidden[0].shape, triples.shape[0]
    loss, stats = op(hidden, triples, lengths)
    assert loss.shape == (L, S, B) and stats.shape == (L, S, B, 3)
    assert loss.dtype == acc and stats.dtype == acc
    ref_loss, ref_stats = reference.stp_loss(hidden, triples, lengths)
    assert_close(loss, ref_loss)
    assert_close(stats, ref_stats)
    g = torch.randn(L, S, B, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(acc)
    grads = op_backward(g, stats, hidden, triples, lengths)
    want = reference.stp_loss_backward(g, ref_stats, hidden, triples, lengths)
    assert len(grads) == L
    terms = term_scale(g, ref_stats, triples, lengths, B, T) if T >= 3 else torch.zeros(L, B, T, 1)
    for a, e, h, t in zip(grads, want, hidden, terms):
        assert a.dtype == h.dtype and a.shape == h.shape
        assert_grad_close(a, e, t, dtype)
    leaves = [h.detach().clone().requires_grad_() for h in hidden]
    out = trajops.stp_loss(leaves, triples=triples, lengths=lengths, reduction="none")
    assert_close(out.detach(), ref_loss)
    (out * g).sum().backward()
    for leaf, e, t in zip(leaves, want, terms):
        assert leaf.grad.dtype == dtype
        assert_grad_close(leaf.grad, e, t, dtype)


SAMPLED_CASES = [
    # T, D, n_spans, layers, lengths
    pytest.param(1, 3, 1, 1, None, id="T1"),
    pytest.param(1, 1, 5, 3, [0, 1], id="T1-len"),
    pytest.param(2, 3, 5, 1, [2, 0, 1], id="T2-len"),
    pytest.param(2, 1000, 1, 1, None, id="T2-D1000"),
    pytest.param(3, 1, 5, 3, None, id="T3"),
    pytest.param(3, 1000, 5, 1, [3, 2], id="T3-D1000-len"),
    pytest.param(4, 3, 64, 1, [0, 1, 2, 3, 4], id="T4-S64-len"),
    pytest.param(4, 1000, 5, 3, [4, 3], id="T4-D1000-L3-len"),
    pytest.param(5, 7, 64, 3, None, id="T5-S64-L3-repeats"),
    pytest.param(129, 1, 64, 1, [129, 50], id="T129-D1"),
    pytest.param(129, 3, 64, 1, [0, 1, 2, 3, 129, 77], id="T129-S64-len"),
    pytest.param(129, 3, 5, 3, [129, 2, 60], id="T129-L3-len"),
    pytest.param(129, 3, 1, 1, None, id="T129-S1"),
    pytest.param(129, 1000, 5, 3, [129, 3, 1], id="T129-D1000-L3-len", marks=SLOW),
    pytest.param(129, 1000, 64, 1, None, id="T129-D1000-S64", marks=SLOW),
]


@pytest.mark.parametrize("T,D,S,L,lengths", SAMPLED_CASES)
def test_sampled_matches_reference_fp32(T, D, S, L, lengths):
    lengths = as_lengths(lengths)
    B = 2 if lengths is None else lengths.numel()
    hidden = make_hidden(L, B, T, D, torch.float32, seed=T * 7 + D + S)
    check_sampled(hidden, make_triples(S, B, T, lengths, seed=T + S), lengths)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,S,L,lengths", [(1, 3, 1, 1, None), (4, 64, 5, 3, [4, 0, 3]), (129, 33, 64, 1, [129, 2, 70])])
def test_sampled_matches_reference_dtypes(dtype, T, D, S, L, lengths):
    lengths = as_lengths(lengths)
    B = 2 if lengths is None else lengths.numel()
    hidden = make_hidden(L, B, T, D, dtype, seed=T + D)
    check_sampled(hidden, make_triples(S, B, T, lengths, seed=D), lengths)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_step_eps_branch(dtype):
    # h[1] == h[2] in every row: (1, 2, 3) and (1, 2, 5) have a = 0, (0, 1, 2) has b = 0, (0, 2, 4)
    # and (1, 3, 4) are ordinary; row 2 is constant (a = b = 0 everywhere).
    hidden = make_hidden(2, 3, 6, 5, dtype, seed=21)
    for h in hidden:
        h[:, 2] = h[:, 1]
        h[2] = h[2, 0]
    triples = torch.tensor([[1, 2, 3], [0, 1, 2], [0, 2, 4], [1, 3, 4], [1, 2, 5]]).unsqueeze(1).repeat(1, 3, 1)
    loss, stats = op(hidden, triples, None)
    # cos = 0 when a step is 0: loss exactly 1, that step's norm exactly 0
    assert torch.equal(loss[:, [0, 1, 4]], torch.ones_like(loss[:, [0, 1, 4]]))
    assert torch.equal(loss[:, :, 2], torch.ones_like(loss[:, :, 2]))
    assert torch.equal(stats[:, 0, :, 0], torch.zeros_like(stats[:, 0, :, 0]))
    assert torch.equal(stats[:, 1, :, 1], torch.zeros_like(stats[:, 1, :, 1]))
    check_sampled(hidden, triples, None)
    dl, ds = dense(hidden, None)
    assert torch.equal(dl[:, :, :2], torch.ones_like(dl[:, :, :2]))
    check_dense(hidden, None)


def test_repeated_triples_accumulate():
    # n copies of one triple give n times its gradient (up to rounding of the sum).
    hidden = make_hidden(1, 2, 8, 6, torch.float64, seed=1)
    one = torch.tensor([[[1, 4, 6], [0, 2, 7]]])
    many = one.repeat(9, 1, 1)
    (g1,) = op_backward(torch.ones(1, 1, 2, dtype=torch.float64), op(hidden, one, None)[1], hidden, one, None)
    (g9,) = op_backward(torch.ones(1, 9, 2, dtype=torch.float64), op(hidden, many, None)[1], hidden, many, None)
    torch.testing.assert_close(g9, 9 * g1, atol=1e-12, rtol=1e-12)
    assert g1.abs().sum() > 0


def test_same_tensor_as_two_layers():
    h = make_hidden(1, 3, 10, 4, torch.float32, seed=4)[0]
    triples = make_triples(5, 3, 10, seed=4)
    loss, _ = op([h, h], triples, None)
    assert torch.equal(loss[0], loss[1])
    leaf = h.clone().requires_grad_()
    trajops.stp_loss([leaf, leaf], triples=triples, reduction="sum").backward()
    ref = reference.stp_loss_backward(torch.ones(1, 5, 3), reference.stp_loss([h], triples)[1], [h], triples)[0]
    assert_close(leaf.grad, 2 * ref)


def test_non_contiguous_inputs():
    B, T, D, S = 4, 11, 6, 7
    base = torch.randn(B, D, 2 * T, dtype=torch.float32)
    stacked = torch.randn(3, B, T + 1, D + 2)
    views = [
        base.transpose(1, 2)[:, ::2],  # transposed and strided along T
        stacked[1, :, 1:, 1:-1],  # a slice with an offset
        make_hidden(1, B, T, D, seed=9)[0],  # contiguous, next to non-contiguous layers
        torch.randn(B, T, 3 * D)[..., ::3],  # innermost dim strided
    ]
    assert sum(not v.is_contiguous() for v in views) == 3
    lengths_big = torch.tensor([[11, 0], [2, 0], [3, 0], [9, 0]])
    lengths = lengths_big[:, 0]
    assert not lengths.is_contiguous()
    triples = make_triples(S, B, T, lengths.contiguous(), seed=2).transpose(0, 1).contiguous().transpose(0, 1)
    assert not triples.is_contiguous()
    for hidden in (views, views[:1], views[3:]):
        check_sampled(hidden, triples, lengths)
        check_dense(hidden, lengths)
    # non-contiguous incoming gradients
    loss, stats = op(views, triples, lengths)
    g = torch.randn(B, S, len(views)).permute(2, 1, 0)
    got = op_backward(g, stats, views, triples, lengths)
    want = reference.stp_loss_backward(g, stats, views, triples, lengths)
    for a, e in zip(got, want):
        assert_close_rows(a, e)
    dl, ds = dense(views, lengths)
    gd = torch.randn(B, len(views), T - 2).transpose(0, 1)
    got = dense_backward(gd, ds, views, lengths)
    want = reference.stp_loss_dense_backward(gd, ds, views, lengths)
    for a, e in zip(got, want):
        assert_close_rows(a, e)
    # autograd into a leaf through a strided view: the gradient lands in the view's elements only
    leaf = base.clone().requires_grad_()
    h = leaf.transpose(1, 2)[:, ::2]
    trajops.stp_loss(h, triples=triples, lengths=lengths, reduction="sum").backward()
    want = reference.stp_loss_backward(torch.ones(1, S, B), reference.stp_loss([h.detach()], triples, lengths)[1],
                                       [h.detach()], triples, lengths)[0]
    assert_close_rows(leaf.grad.transpose(1, 2)[:, ::2], want)
    assert torch.equal(leaf.grad.transpose(1, 2)[:, 1::2], torch.zeros(B, T, D))


@pytest.mark.parametrize("B,T,D", [(0, 5, 3), (3, 0, 4), (2, 6, 0), (2, 1, 0)])
def test_empty_inputs(B, T, D):
    hidden = [torch.randn(B, T, D), torch.randn(B, T, D)]
    triples = trajops.sample_stp_triples(B, T, 3, generator=torch.Generator().manual_seed(0))
    loss, stats = op(hidden, triples, None)
    assert loss.shape == (2, 3, B) and stats.shape == (2, 3, B, 3)
    # active rows of D = 0: both steps are 0, cos = 0, loss 1
    want = torch.full((2, 3, B), 1.0 if T >= 3 else 0.0)
    assert torch.equal(loss, want) and torch.equal(stats, torch.zeros(2, 3, B, 3))
    grads = op_backward(torch.ones_like(loss), stats, hidden, triples, None)
    assert [tuple(g.shape) for g in grads] == [(B, T, D)] * 2
    dl, ds = dense(hidden, None)
    assert dl.shape == (2, B, max(T - 2, 0)) and ds.shape == (2, B, max(T - 1, 0), 2)
    assert torch.equal(dl, torch.ones_like(dl)) and torch.equal(ds, torch.zeros_like(ds))
    for g in dense_backward(torch.ones_like(dl), ds, hidden, None):
        assert g.shape == (B, T, D)
    for fn in (lambda x: trajops.stp_loss(x, 3), lambda x: trajops.stp_loss_dense(x)):
        leaves = [h.clone().requires_grad_() for h in hidden]
        out = fn(leaves)
        assert float(out.detach()) == (1.0 if T >= 3 and B > 0 else 0.0)
        out.backward()
        assert all(leaf.grad.shape == (B, T, D) for leaf in leaves)


# ---------------------------------------------------------------- kernels == reference (dense)
def check_dense(hidden, lengths, dtype=None, seed=0):
    dtype = dtype or hidden[0].dtype
    acc = acc_of(dtype)
    L, (B, T, D) = len(hidden), hidden[0].shape
    loss, stats = dense(hidden, lengths)
    assert loss.shape == (L, B, max(T - 2, 0)) and stats.shape == (L, B, max(T - 1, 0), 2)
    assert loss.dtype == acc and stats.dtype == acc
    ref_loss, ref_stats = reference.stp_loss_dense(hidden, lengths)
    assert_close(loss, ref_loss)
    assert_close(stats, ref_stats)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(acc)
    grads = dense_backward(g, stats, hidden, lengths)
    want = reference.stp_loss_dense_backward(g, ref_stats, hidden, lengths)
    assert len(grads) == L
    for a, e, h in zip(grads, want, hidden):
        assert a.dtype == h.dtype and a.shape == h.shape
        assert_close_rows(a, e, dtype)
    leaves = [h.detach().clone().requires_grad_() for h in hidden]
    out = trajops.stp_loss_dense(leaves, lengths=lengths, reduction="none")
    assert_close(out.detach(), ref_loss)
    (out * g).sum().backward()
    for leaf, e in zip(leaves, want):
        assert_close_rows(leaf.grad, e, dtype)


DENSE_CASES = [
    pytest.param(1, 3, 1, None, id="T1"),
    pytest.param(1, 1000, 3, [1, 0], id="T1-D1000-len"),
    pytest.param(2, 1, 1, [2, 1, 0], id="T2-len"),
    pytest.param(3, 3, 3, None, id="T3-L3"),
    pytest.param(3, 1000, 1, [3, 2], id="T3-D1000-len"),
    pytest.param(4, 1, 3, [0, 1, 2, 3, 4], id="T4-len"),
    pytest.param(4, 1000, 3, None, id="T4-D1000-L3"),
    pytest.param(129, 1, 1, [129, 3, 64], id="T129-D1-len"),
    pytest.param(129, 3, 3, [0, 1, 2, 3, 129, 100], id="T129-L3-len"),
    pytest.param(129, 1000, 1, [129, 40], id="T129-D1000-len", marks=SLOW),
    pytest.param(129, 1000, 3, None, id="T129-D1000-L3", marks=SLOW),
]


@pytest.mark.parametrize("T,D,L,lengths", DENSE_CASES)
def test_dense_matches_reference_fp32(T, D, L, lengths):
    lengths = as_lengths(lengths)
    B = 2 if lengths is None else lengths.numel()
    check_dense(make_hidden(L, B, T, D, torch.float32, seed=T + D), lengths)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,L,lengths", [(2, 5, 1, None), (6, 64, 3, [6, 0, 4]), (129, 33, 1, [129, 2, 70])])
def test_dense_matches_reference_dtypes(dtype, T, D, L, lengths):
    lengths = as_lengths(lengths)
    B = 2 if lengths is None else lengths.numel()
    check_dense(make_hidden(L, B, T, D, dtype, seed=T * D), lengths)


def test_padding_values_do_not_matter():
    B, T, D, S = 3, 12, 5, 6
    lengths = torch.tensor([7, 12, 2])
    clean = make_hidden(2, B, T, D, seed=8)
    dirty = [h.clone() for h in clean]
    for h in dirty:
        h[0, 7:] = 1e4 * torch.randn(T - 7, D)
        h[2, 2:] = -3e3
    triples = make_triples(S, B, T, lengths, seed=8)
    for fwd, bwd, args in [(op, op_backward, (triples, lengths)), (dense, dense_backward, (lengths,))]:
        lc, sc = fwd(clean, *args)
        ld, sd = fwd(dirty, *args)
        assert torch.equal(lc, ld) and torch.equal(sc, sd)
        g = torch.randn(lc.shape)
        gc = bwd(g, sc, clean, *args)
        gd = bwd(g, sd, dirty, *args)
        for a, b in zip(gc, gd):
            assert torch.equal(a, b)
            assert torch.equal(a[0, 7:], torch.zeros(T - 7, D)) and torch.equal(a[2], torch.zeros(T, D))


@pytest.mark.parametrize("kind", ["sampled", "dense"])
def test_nan_in_padding_does_not_leak(kind):
    # Padding (positions >= length, whole rows of length 0) may hold NaN, e.g. hidden states of
    # fully masked sequences: the loss and every gradient of valid positions must stay finite, and
    # the gradient of padding and of inactive rows is 0 (as documented).
    B, T, D = 3, 9, 4
    lengths = torch.tensor([5, 0, 9])
    h = torch.randn(B, T, D)
    h[0, 5:] = float("nan")
    h[1] = float("nan")
    leaf = h.clone().requires_grad_()
    if kind == "sampled":
        out = trajops.stp_loss(leaf, triples=make_triples(8, B, T, lengths, seed=1), lengths=lengths)
    else:
        out = trajops.stp_loss_dense(leaf, lengths=lengths)
    assert torch.isfinite(out)
    out.backward()
    assert torch.isfinite(leaf.grad[0, :5]).all() and torch.isfinite(leaf.grad[2]).all()
    assert torch.equal(leaf.grad[0, 5:], torch.zeros(T - 5, D))
    assert torch.equal(leaf.grad[1], torch.zeros(T, D))


# ---------------------------------------------------------------- values
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_straight_line_is_zero_and_random_walk_is_not(dtype):
    B, T, D = 3, 40, 16
    g = torch.Generator().manual_seed(0)
    v = torch.randn(B, 1, D, generator=g, dtype=torch.float64)
    c = torch.randn(B, 1, D, generator=g, dtype=torch.float64)
    uniform = torch.arange(T, dtype=torch.float64).view(1, T, 1)
    nonuniform = torch.cumsum(0.05 + 3 * torch.rand(B, T, 1, generator=g, dtype=torch.float64), 1)  # strictly increasing
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    triples = trajops.sample_stp_triples(B, T, 64, generator=g)
    for speed in (uniform, nonuniform):
        h = (c + speed * v).to(dtype)
        lengths = torch.tensor([T, 5, 3])
        for ln in (None, lengths):
            tr = triples if ln is None else make_triples(64, B, T, ln, seed=1)
            loss, _ = op([h, 2 * h], tr, ln)
            assert loss.abs().max() <= tol, float(loss.abs().max())
            dl, _ = dense([h], ln)
            assert dl.abs().max() <= tol, float(dl.abs().max())
            assert abs(float(trajops.stp_loss(h, triples=tr, lengths=ln))) <= tol
            assert abs(float(trajops.stp_loss_dense(h, lengths=ln))) <= tol
    # Going back along the line: cos = -1, loss 2.
    back = (c + torch.tensor([0.0, 1.0, 3.0, 2.0, 2.5]).view(1, 5, 1) * v).to(dtype)
    dl, _ = dense([back], None)
    torch.testing.assert_close(dl[..., 1:], torch.tensor([2.0, 2.0]).to(dl).expand(1, B, 2), atol=tol, rtol=0)
    assert dl[..., 0].abs().max() <= tol
    # A random walk bends at every step.
    walk = torch.cumsum(torch.randn(B, T, D, generator=g, dtype=torch.float64), 1).to(dtype)
    loss, _ = op([walk], triples, None)
    assert (loss > 0.01).all() and float(loss.mean()) > 0.5
    dl, _ = dense([walk], None)
    assert (dl > 0.01).all() and float(dl.mean()) > 0.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_in_zero_two(dtype):
    g = torch.Generator().manual_seed(3)
    # random directions, exact reversals and exact repeats, small integer coordinates
    h = torch.randint(-2, 3, (4, 30, 3), generator=g).to(dtype)
    triples = trajops.sample_stp_triples(4, 30, 64, generator=g)
    for loss in (op([h], triples, None)[0], dense([h], None)[0]):
        slack = 1e-6 if dtype != torch.float64 else 1e-14
        assert float(loss.min()) >= -slack and float(loss.max()) <= 2 + slack
        assert float(loss.max()) > 1.5 and float(loss.min()) < 0.5
    h = torch.randn(4, 30, 64, generator=g, dtype=torch.float64).to(dtype)
    for loss in (op([h], triples, None)[0], dense([h], None)[0]):
        assert float(loss.min()) >= 0 and float(loss.max()) <= 2


# ---------------------------------------------------------------- reductions
def test_reductions_sampled():
    L, B, T, D, S = 2, 5, 10, 4, 6
    hidden = make_hidden(L, B, T, D, seed=11)
    lengths = torch.tensor([10, 2, 5, 0, 3])
    active = lengths >= 3
    triples = make_triples(S, B, T, lengths, seed=11)
    none = trajops.stp_loss(hidden, triples=triples, lengths=lengths, reduction="none")
    assert none.shape == (L, S, B) and none.dtype == torch.float32
    assert torch.equal(none[:, :, ~active], torch.zeros(L, S, int((~active).sum())))
    assert (none[:, :, active] > 0).all()
    assert_close(none, reference.stp_loss(hidden, triples, lengths)[0])
    per_layer = torch.stack([none[layer][:, active].mean() for layer in range(L)])
    mean = trajops.stp_loss(hidden, triples=triples, lengths=lengths)
    assert mean.shape == () and mean.dtype == torch.float32
    torch.testing.assert_close(mean, per_layer.mean())
    torch.testing.assert_close(trajops.stp_loss(hidden, triples=triples, lengths=lengths, reduction="sum"), none.sum())
    # the mean is over active rows: not the mean over all B
    assert abs(float(mean) - float(none.mean())) > 1e-3
    # a single tensor is one layer
    single = trajops.stp_loss(hidden[1], triples=triples, lengths=lengths, reduction="none")
    assert single.shape == (1, S, B)
    torch.testing.assert_close(single[0], none[1])
    torch.testing.assert_close(trajops.stp_loss(hidden[1], triples=triples, lengths=lengths), per_layer[1])
    # lengths as a list / int32 tensor are accepted
    for ln in (lengths.tolist(), lengths.int()):
        torch.testing.assert_close(trajops.stp_loss(hidden, triples=triples, lengths=ln), mean)
    # fp64 in, fp64 out; half in, fp32 out
    assert trajops.stp_loss(hidden[0].double(), triples=triples, lengths=lengths).dtype == torch.float64
    assert trajops.stp_loss(hidden[0].bfloat16(), triples=triples, lengths=lengths).dtype == torch.float32


def test_reductions_dense():
    L, B, T, D = 3, 4, 9, 3
    hidden = make_hidden(L, B, T, D, seed=12)
    lengths = torch.tensor([9, 2, 5, 3])
    valid = torch.arange(T - 2).unsqueeze(0) + 2 < lengths.unsqueeze(1)
    none = trajops.stp_loss_dense(hidden, lengths=lengths, reduction="none")
    assert none.shape == (L, B, T - 2)
    assert torch.equal(none[:, ~valid], torch.zeros(L, int((~valid).sum())))
    assert (none[:, valid] > 0).all()
    per_layer = torch.stack([none[layer][valid].mean() for layer in range(L)])
    torch.testing.assert_close(trajops.stp_loss_dense(hidden, lengths=lengths), per_layer.mean())
    torch.testing.assert_close(trajops.stp_loss_dense(hidden, lengths=lengths, reduction="sum"), none.sum())
    assert trajops.stp_loss_dense(hidden[0], reduction="none").shape == (1, B, T - 2)
    torch.testing.assert_close(trajops.stp_loss_dense(hidden), trajops.stp_loss_dense(hidden, reduction="none").mean())
    assert trajops.stp_loss_dense(torch.randn(2, 2, 3), reduction="none").shape == (1, 2, 0)
    assert trajops.stp_loss_dense(torch.randn(2, 1, 3), reduction="none").shape == (1, 2, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_rows_inactive_gives_zero_with_graph(dtype):
    cases = [
        (torch.randn(3, 8, 4, dtype=dtype), torch.tensor([0, 2, 1])),
        (torch.randn(3, 2, 4, dtype=dtype), None),
        (torch.randn(2, 1, 4, dtype=dtype), torch.tensor([1, 0])),
    ]
    for h, lengths in cases:
        for fn in (lambda x: trajops.stp_loss([x, x * 2], 5, lengths=lengths),
                   lambda x: trajops.stp_loss_dense([x, x * 2], lengths=lengths)):
            leaf = h.clone().requires_grad_()
            out = fn(leaf)
            assert out.dtype == dtype and out.shape == ()
            assert float(out.detach()) == 0.0 and not out.isnan()
            assert out.requires_grad and out.grad_fn is not None
            out.backward()
            assert torch.equal(leaf.grad, torch.zeros_like(h))
            assert float(fn(h)) == 0.0


def test_public_sampling_uses_the_generator():
    hidden = make_hidden(2, 3, 20, 5, seed=13)
    lengths = torch.tensor([20, 7, 1])
    a = trajops.stp_loss(hidden, 7, lengths=lengths, generator=torch.Generator().manual_seed(9), reduction="none")
    tr = trajops.sample_stp_triples(3, 20, 7, lengths=lengths, generator=torch.Generator().manual_seed(9))
    b = trajops.stp_loss(hidden, triples=tr, lengths=lengths, reduction="none")
    assert a.shape == (2, 7, 3) and torch.equal(a, b)
    c = trajops.stp_loss(hidden, 7, lengths=lengths, generator=torch.Generator().manual_seed(10), reduction="none")
    assert not torch.equal(a, c)
    # explicit triples override n_spans
    assert trajops.stp_loss(hidden, 2, triples=tr, reduction="none").shape == (2, 7, 3)


# ---------------------------------------------------------------- the sampler
def test_sampler_shape_order_and_range():
    for B, T, S in [(1, 3, 1), (4, 5, 64), (7, 129, 9), (2, 1000, 33)]:
        tr = trajops.sample_stp_triples(B, T, S, generator=torch.Generator().manual_seed(T))
        assert tr.shape == (S, B, 3) and tr.dtype == torch.int64 and tr.device.type == "cpu"
        s, r, t = tr.unbind(-1)
        assert (0 <= s).all() and (s < r).all() and (r < t).all() and (t <= T - 1).all()
    # T = 3: the only triple
    assert torch.equal(trajops.sample_stp_triples(2, 3, 4), torch.tensor([0, 1, 2]).expand(4, 2, 3))


def test_sampler_with_lengths():
    T = 50
    lengths = torch.tensor([50, 3, 4, 10, 2, 0, 1, 37])
    tr = trajops.sample_stp_triples(8, T, 500, lengths=lengths, generator=torch.Generator().manual_seed(2))
    assert tr.shape == (500, 8, 3) and tr.dtype == torch.int64
    s, r, t = tr.unbind(-1)
    assert ((0 <= s) & (r <= T - 1) & (t <= T - 1)).all()  # placeholders too stay inside [0, T - 1]
    active = lengths >= 3
    assert ((s < r) & (r < t) & (t < lengths))[:, active].all()
    # every row reaches its last valid position and its first
    assert torch.equal(t[:, active].amax(0), lengths[active] - 1)
    assert torch.equal(s[:, active].amin(0), torch.zeros(int(active.sum()), dtype=torch.int64))
    assert torch.equal(tr[:, 1], torch.tensor([0, 1, 2]).expand(500, 3))
    # placeholders must be accepted by the ops (they ignore rows shorter than 3)
    h = torch.randn(8, T, 3)
    loss, _ = op([h], tr, lengths)
    assert torch.equal(loss[:, :, ~active], torch.zeros(1, 500, int((~active).sum())))
    # lengths on another integer dtype
    for ln in (lengths.int(), lengths.to(torch.int16)):
        assert torch.equal(trajops.sample_stp_triples(8, T, 500, lengths=ln, generator=torch.Generator().manual_seed(2)), tr)


def _chi2(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampler_base_draws_are_uniform():
    # The three base draws of a triple are triple - (0, 1, 2); pooled they are i.i.d. uniform on [0, T - 2).
    T, m = 12, 10
    tr = trajops.sample_stp_triples(200, T, 100, generator=torch.Generator().manual_seed(0))  # 20000 triples
    base = tr - torch.arange(3)
    assert (base >= 0).all() and (base < m).all()
    counts = torch.bincount(base.flatten(), minlength=m).double()
    assert _chi2(counts) < 40  # 9 dof: p < 1e-5
    # the sorted draws are order statistics of 3 i.i.d. draws: E[min] = sum_k P(min >= k)
    e_min = sum(((m - k) / m) ** 3 for k in range(1, m))
    e_max = (m - 1) - e_min
    assert abs(float(base[..., 0].double().mean()) - e_min) < 0.05
    assert abs(float(base[..., 2].double().mean()) - e_max) < 0.05
    # all three equal happens with probability 1 / m^2 (draws with replacement)
    p_equal = float(((base[..., 0] == base[..., 2])).double().mean())
    assert abs(p_equal - 1 / m**2) < 0.004
    # with lengths: per row, uniform on [0, length - 2)
    lengths = torch.tensor([7, 12]).repeat(100)
    tr = trajops.sample_stp_triples(200, T, 100, lengths=lengths, generator=torch.Generator().manual_seed(1))
    base = tr - torch.arange(3)
    for n in (7, 12):
        rows = base[:, lengths == n]
        assert (rows >= 0).all() and (rows < n - 2).all()
        counts = torch.bincount(rows.flatten(), minlength=n - 2).double()
        assert _chi2(counts) < 40
        e_min = sum(((n - 2 - k) / (n - 2)) ** 3 for k in range(1, n - 2))
        assert abs(float(rows[..., 0].double().mean()) - e_min) < 0.08


def test_sampler_determinism_and_seeds():
    for lengths in (None, torch.tensor([9, 30, 2])):
        a = trajops.sample_stp_triples(3, 30, 8, lengths=lengths, generator=torch.Generator().manual_seed(7))
        b = trajops.sample_stp_triples(3, 30, 8, lengths=lengths, generator=torch.Generator().manual_seed(7))
        c = trajops.sample_stp_triples(3, 30, 8, lengths=lengths, generator=torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)
    # the global RNG is used without a generator
    torch.manual_seed(3)
    a = trajops.sample_stp_triples(3, 30, 8)
    torch.manual_seed(3)
    assert torch.equal(a, trajops.sample_stp_triples(3, 30, 8))


def test_sampler_short_sequences_and_device():
    for T in (0, 1, 2):
        tr = trajops.sample_stp_triples(3, T, 4, generator=torch.Generator().manual_seed(0))
        assert tr.shape == (4, 3, 3) and tr.dtype == torch.int64
        assert (tr >= 0).all() and (tr <= max(T - 1, 0)).all()
        if T > 0:  # T = 0: test_empty_inputs
            h = torch.randn(3, T, 2)
            assert torch.equal(op([h], tr, None)[0], torch.zeros(1, 4, 3))
    assert trajops.sample_stp_triples(0, 10, 2).shape == (2, 0, 3)
    assert trajops.sample_stp_triples(2, 10, 2).device == torch.device("cpu")
    assert trajops.sample_stp_triples(2, 10, 2, generator=torch.Generator()).device == torch.device("cpu")
    meta = trajops.sample_stp_triples(2, 10, 2, device="meta")
    assert meta.device.type == "meta" and meta.shape == (2, 2, 3) and meta.dtype == torch.int64
    assert trajops.sample_stp_triples(2, 10, 2, lengths=torch.tensor([4, 10], device="meta")).device.type == "meta"


# ---------------------------------------------------------------- autograd, opcheck, compile
GRADCHECK_CASES = [
    # L, B, T, D, S, lengths
    (1, 2, 5, 3, 4, None),
    (2, 3, 6, 3, 6, [6, 2, 4]),
    (3, 2, 4, 2, 5, [4, 3]),
]


# The interpreter pays ~10 ms per kernel call: it checks random projections of the Jacobian only.
FAST = {"fast_mode": True} if INTERPRETER else {}


@pytest.mark.parametrize("L,B,T,D,S,lengths", GRADCHECK_CASES)
def test_gradcheck(L, B, T, D, S, lengths):
    lengths = as_lengths(lengths)
    hidden = [h.requires_grad_() for h in make_hidden(L, B, T, D, torch.float64, seed=L * T)]
    triples = make_triples(S, B, T, lengths, seed=L, garbage_inactive=False)
    for red in ("none", "mean"):
        assert torch.autograd.gradcheck(
            lambda *hs: trajops.stp_loss(list(hs), triples=triples, lengths=lengths, reduction=red), hidden, **FAST
        )
    assert torch.autograd.gradcheck(
        lambda *hs: trajops.stp_loss_dense(list(hs), lengths=lengths, reduction="none"), hidden, **FAST
    )


def test_gradcheck_single_tensor():
    h = make_hidden(1, 2, 7, 3, torch.float64, seed=5)[0].requires_grad_()
    assert torch.autograd.gradcheck(lambda x: trajops.stp_loss(x, triples=make_triples(3, 2, 7, seed=5)), (h,), **FAST)
    assert torch.autograd.gradcheck(lambda x: trajops.stp_loss_dense(x, lengths=torch.tensor([7, 5])), (h,), **FAST)


@pytest.mark.parametrize("with_lengths", [False, True])
def test_opcheck(with_lengths):
    B, T, D, S = 3, 7, 4, 5
    lengths = torch.tensor([7, 1, 5]) if with_lengths else None
    hidden = make_hidden(2, B, T, D, torch.float64, seed=6)
    triples = make_triples(S, B, T, lengths, seed=6)
    torch.library.opcheck(op.default, (hidden, triples, lengths))
    torch.library.opcheck(op.default, ([h.clone().requires_grad_() for h in hidden], triples, lengths))
    loss, stats = op(hidden, triples, lengths)
    torch.library.opcheck(op_backward.default, (torch.randn_like(loss), stats, hidden, triples, lengths))
    torch.library.opcheck(dense.default, (hidden, lengths))
    torch.library.opcheck(dense.default, ([h.clone().requires_grad_() for h in hidden], lengths))
    dl, ds = dense(hidden, lengths)
    torch.library.opcheck(dense_backward.default, (torch.randn_like(dl), ds, hidden, lengths))
    # one layer, fp32, T < 3
    h1 = [torch.randn(2, 2, 3)]
    torch.library.opcheck(op.default, (h1, trajops.sample_stp_triples(2, 2, 2), None))
    torch.library.opcheck(dense.default, (h1, None))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    B, T, D = 3, 11, 8
    lengths = torch.tensor([11, 2, 7])
    triples = make_triples(5, B, T, lengths, seed=14)
    x = make_hidden(1, B, T, D, seed=14)[0]

    def f(h):
        layers = [h * 1.5, h.sin()]
        sampled = trajops.stp_loss(layers, triples=triples, lengths=lengths)
        per_triple = trajops.stp_loss(layers, triples=triples, lengths=lengths, reduction="none")
        local = trajops.stp_loss_dense(layers, lengths=lengths)
        return sampled * 2 + local + (per_triple ** 2).sum()

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    f(xa).backward()
    compiled(xb).backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    assert xa.grad.abs().sum() > 0


# ---------------------------------------------------------------- fuzz
@settings(max_examples=8 if INTERPRETER else 60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    L=st.integers(1, 3),
    B=st.integers(1, 4),
    T=st.integers(1, 12 if INTERPRETER else 40),
    D=st.integers(1, 40 if INTERPRETER else 70),
    S=st.integers(1, 8 if INTERPRETER else 20),
    use_lengths=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_against_reference(L, B, T, D, S, use_lengths, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # Small integer-valued coordinates make zero steps, exact alignments and reversals common.
    scale = torch.rand(1, generator=g, dtype=torch.float64) + 0.1
    hidden = [(torch.randint(-2, 3, (B, T, D), generator=g) * scale).to(dtype) for _ in range(L)]
    lengths = torch.randint(0, T + 1, (B,), generator=g) if use_lengths else None
    triples = trajops.sample_stp_triples(B, T, S, lengths=lengths, generator=g)
    check_sampled(hidden, triples, lengths, seed=seed)
    check_dense(hidden, lengths, seed=seed)


# ---------------------------------------------------------------- determinism, touched rows
def test_backward_deterministic_with_repeated_positions():
    B, T, D, S = (2, 5, 67, 64) if INTERPRETER else (4, 6, 300, 512)
    hidden = make_hidden(2, B, T, D, seed=15)
    triples = trajops.sample_stp_triples(B, T, S, generator=torch.Generator().manual_seed(15))
    triples[S // 2:] = triples[0]  # half the spans are one triple
    g = torch.randn(2, S, B)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        loss1, stats1 = op(hidden, triples, None)
        one = op_backward(g, stats1, hidden, triples, None)
        torch.set_num_threads(max(2, threads))
        loss2, stats2 = op(hidden, triples, None)
        many = op_backward(g, stats2, hidden, triples, None)
        again = op_backward(g, stats2, hidden, triples, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(loss1, loss2) and torch.equal(stats1, stats2)
    for a, b, c in zip(one, many, again):
        assert torch.equal(a, b) and torch.equal(b, c)
    dl, ds = dense(hidden, None)
    gd = torch.randn_like(dl)
    for a, b in zip(dense_backward(gd, ds, hidden, None), dense_backward(gd, ds, hidden, None)):
        assert torch.equal(a, b)
    # through autograd too
    grads = []
    for _ in range(2):
        leaves = [h.clone().requires_grad_() for h in hidden]
        (trajops.stp_loss(leaves, triples=triples, reduction="none") * g).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_touches_only_rows_in_triples(dtype):
    B, T, D, S = 3, 20, 9, 4
    lengths = torch.tensor([20, 2, 15])
    hidden = make_hidden(2, B, T, D, dtype, seed=16)
    triples = make_triples(S, B, T, lengths, seed=16)
    touched = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        if lengths[b] >= 3:
            touched[b, triples[:, b].flatten()] = True
    assert 0 < int(touched.sum()) < B * T
    loss, stats = op(hidden, triples, lengths)
    grads = op_backward(torch.randn_like(loss), stats, hidden, triples, lengths)
    leaves = [h.clone().requires_grad_() for h in hidden]
    trajops.stp_loss(leaves, triples=triples, lengths=lengths).backward()
    for grad in list(grads) + [leaf.grad for leaf in leaves]:
        assert torch.equal(grad[~touched], torch.zeros(int((~touched).sum()), D, dtype=dtype))
        assert (grad[touched].abs().sum(-1) > 0).all()


# ---------------------------------------------------------------- bad input
B_, T_, D_ = 2, 6, 3


def _h(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (B_, T_, D_))).to(dtype)


def _tr():
    return torch.tensor([[[0, 1, 2], [1, 3, 5]]])


SHAPE_ERRORS = [
    # (hidden, triples, lengths) factory, exception, message
    (lambda: ([_h(B_, T_)], _tr(), None), ValueError, r"hidden\[0\] must have shape \(B, T, D\)"),
    (lambda: ([_h(B_, T_, D_, 1)], _tr(), None), ValueError, r"hidden\[0\] must have shape \(B, T, D\)"),
    (lambda: ([], _tr(), None), ValueError, "hidden must hold at least one"),
    (lambda: ([_h(), _h(B_, T_, D_ + 1)], _tr(), None), ValueError, r"every layer must have the shape of hidden\[0\]"),
    (lambda: ([_h(), _h(B_, T_ - 1, D_)], _tr(), None), ValueError, r"every layer must have the shape of hidden\[0\]"),
    (lambda: ([_h(), _h(dtype=torch.float64)], _tr(), None), TypeError, r"every layer must have the dtype of hidden\[0\]"),
    (lambda: ([_h(dtype=torch.int64)], _tr(), None), TypeError, "hidden must be float32, float64, float16 or bfloat16"),
    (lambda: ([_h(dtype=torch.complex64)], _tr(), None), TypeError, "hidden must be float32, float64, float16 or bfloat16"),
    (lambda: ([_h()], _tr()[..., :2], None), ValueError, r"triples must have shape \(n_spans, B, 3\)"),
    (lambda: ([_h()], _tr()[0], None), ValueError, r"triples must have shape \(n_spans, B, 3\)"),
    (lambda: ([_h()], _tr()[:0], None), ValueError, "n_spans >= 1"),
    (lambda: ([_h()], _tr()[:, :1], None), ValueError, r"triples must have shape \(n_spans, B, 3\)"),
    (lambda: ([_h()], _tr().int(), None), TypeError, "triples must be int64"),
    (lambda: ([_h()], _tr().double(), None), TypeError, "triples must be int64"),
    (lambda: ([_h()], _tr(), torch.tensor([6, 6, 6])), ValueError, r"lengths must have shape \(B,\)"),
    (lambda: ([_h()], _tr(), torch.tensor([[6, 6]])), ValueError, r"lengths must have shape \(B,\)"),
    (lambda: ([_h()], _tr(), torch.tensor([6, 6], dtype=torch.int32)), TypeError, "lengths must be int64"),
]

VALUE_ERRORS = [
    (torch.tensor([[[0, 1, 6], [0, 1, 2]]]), None, "triples must satisfy 0 <= s < r < t < length"),
    (torch.tensor([[[0, 1, 2], [-1, 1, 2]]]), None, "triples must satisfy"),
    (torch.tensor([[[0, 1, 2], [1, 1, 2]]]), None, "triples must satisfy"),
    (torch.tensor([[[0, 3, 2], [0, 1, 2]]]), None, "triples must satisfy"),
    (torch.tensor([[[0, 1, 2], [0, 1, 2]], [[2, 1, 0], [0, 1, 2]]]), None, r"span 1, row 0"),
    (torch.tensor([[[0, 1, 2], [1, 3, 5]]]), torch.tensor([6, 5]), "triples must satisfy"),  # t == length
    (_tr(), torch.tensor([-1, 6]), r"lengths must be in \[0, T\]"),
    (_tr(), torch.tensor([6, 7]), r"lengths must be in \[0, T\]"),
]


@pytest.mark.parametrize("make,exc,match", SHAPE_ERRORS)
def test_bad_inputs(make, exc, match):
    hidden, triples, lengths = make()
    with pytest.raises(exc, match=match):
        op(hidden, triples, lengths)
    with pytest.raises(exc, match=match):  # the fake impl (torch.compile's tracing) says the same
        with torch._subclasses.fake_tensor.FakeTensorMode():
            op(*make())
    if "triples" not in match and "n_spans" not in match:  # the dense op takes no triples
        with pytest.raises(exc, match=match):
            dense(hidden, lengths)
        with pytest.raises(exc, match=match):
            with torch._subclasses.fake_tensor.FakeTensorMode():
                h, _, ln = make()
                dense(h, ln)
    if hidden:  # the backward ops check the same (with well-formed grad_loss / stats)
        L, S, B = len(hidden), (triples.shape[0] if triples.dim() == 3 else 1), hidden[0].shape[0]
        acc = torch.float64 if hidden[0].dtype == torch.float64 else torch.float32
        with pytest.raises(exc, match=match):
            op_backward(torch.zeros(L, S, B, dtype=acc), torch.zeros(L, S, B, 3, dtype=acc), hidden, triples, lengths)


@pytest.mark.parametrize("triples,lengths,match", VALUE_ERRORS)
def test_bad_index_values(triples, lengths, match):
    h = [_h(), _h()]
    with pytest.raises(ValueError, match=match):
        op(h, triples, lengths)
    with pytest.raises(ValueError, match=match):
        trajops.stp_loss(h, triples=triples, lengths=lengths)
    L, S = 2, triples.shape[0]
    with pytest.raises(ValueError, match=match):
        op_backward(torch.zeros(L, S, B_), torch.zeros(L, S, B_, 3), h, triples, lengths)
    if lengths is not None and "lengths" in match:
        with pytest.raises(ValueError, match=match):
            dense(h, lengths)
        with pytest.raises(ValueError, match=match):
            trajops.stp_loss_dense(h, lengths=lengths)
        with pytest.raises(ValueError, match=match):
            dense_backward(torch.zeros(L, B_, T_ - 2), torch.zeros(L, B_, T_ - 1, 2), h, lengths)


def test_inactive_rows_triples_are_not_checked():
    h = [_h()]
    triples = torch.tensor([[[0, 1, 2], [9, -4, 2]]])
    for lengths in (torch.tensor([6, 2]), torch.tensor([6, 0])):
        loss, stats = op(h, triples, lengths)
        assert float(loss[0, 0, 1]) == 0.0 and torch.equal(stats[0, 0, 1], torch.zeros(3))
        (g,) = op_backward(torch.ones_like(loss), stats, h, triples, lengths)
        assert torch.equal(g[1], torch.zeros(T_, D_))
    # T < 3 without lengths: nothing is active, any triple goes
    h2 = [torch.randn(2, 2, 3)]
    assert torch.equal(op(h2, torch.tensor([[[5, 0, -1], [0, 0, 0]]]), None)[0], torch.zeros(1, 1, 2))


def test_bad_backward_inputs():
    h = [_h(), _h()]
    triples, lengths = _tr(), torch.tensor([6, 6])
    loss, stats = op(h, triples, lengths)
    with pytest.raises(TypeError, match="grad_loss must be torch.float32"):
        op_backward(loss.double(), stats, h, triples, lengths)
    with pytest.raises(ValueError, match="grad_loss must have shape"):
        op_backward(loss[:1], stats, h, triples, lengths)
    with pytest.raises(ValueError, match="stats must have shape"):
        op_backward(loss, stats[..., :2], h, triples, lengths)
    with pytest.raises(TypeError, match="stats must be torch.float32"):
        op_backward(loss, stats.half(), h, triples, lengths)
    dl, ds = dense(h, lengths)
    with pytest.raises(TypeError, match="grad_loss must be torch.float32"):
        dense_backward(dl.double(), ds, h, lengths)
    with pytest.raises(ValueError, match="grad_loss must have shape"):
        dense_backward(dl[:, :, 1:], ds, h, lengths)
    with pytest.raises(ValueError, match="stats must have shape"):
        dense_backward(dl, ds[:, :, 1:], h, lengths)
    with pytest.raises(ValueError, match="grad_loss must have shape"):
        with torch._subclasses.fake_tensor.FakeTensorMode():
            dense_backward(torch.zeros(2, B_, T_), torch.zeros(2, B_, T_ - 1, 2), [_h(), _h()], None)
    with pytest.raises(TypeError, match="grad_loss must be torch.float64"):
        with torch._subclasses.fake_tensor.FakeTensorMode():
            op_backward(torch.zeros(1, 1, B_), torch.zeros(1, 1, B_, 3), [_h(dtype=torch.float64)], _tr(), None)


@pytest.mark.parametrize("fn", [trajops.stp_loss, trajops.stp_loss_dense])
def test_bad_public_arguments(fn):
    with pytest.raises(ValueError, match=r"hidden\[0\] must have shape \(B, T, D\)"):
        fn(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"hidden\[0\] must have shape \(B, T, D\)"):
        fn([torch.randn(2, 5, 3, 1)])
    with pytest.raises(ValueError, match="hidden must hold at least one"):
        fn([])
    with pytest.raises(TypeError, match=r"hidden must be a \(B, T, D\) tensor or a list of them"):
        fn(_h().numpy())
    with pytest.raises(TypeError, match=r"hidden must be a \(B, T, D\) tensor or a list of them"):
        fn([_h(), "layer"])
    with pytest.raises(ValueError, match=r"every layer must have the shape of hidden\[0\]"):
        fn([_h(), _h(B_ + 1, T_, D_)])
    with pytest.raises(TypeError, match=r"every layer must have the dtype of hidden\[0\]"):
        fn((_h(), _h(dtype=torch.float16)))
    with pytest.raises(TypeError, match="hidden must be float32, float64, float16 or bfloat16"):
        fn(_h(dtype=torch.int32))
    with pytest.raises(ValueError, match="reduction must be one of"):
        fn(_h(), reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        fn(_h(), reduction=None)
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        fn(_h(), lengths=torch.tensor([6.0, 5.0]))
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        fn(_h(), lengths=torch.tensor([True, True]))
    with pytest.raises(ValueError, match=r"lengths must be in \[0, T\]"):
        fn(_h(), lengths=[6, 9])


def test_bad_n_spans_and_sampler_arguments():
    for n in (0, -1, True, 2.0, None):
        with pytest.raises(ValueError, match="n_spans must be an int >= 1"):
            trajops.stp_loss(_h(), n)
        with pytest.raises(ValueError, match="n_spans must be an int >= 1"):
            trajops.sample_stp_triples(B_, T_, n)
    with pytest.raises(ValueError, match="batch and seq_len must be >= 0"):
        trajops.sample_stp_triples(-1, T_, 2)
    with pytest.raises(ValueError, match="batch and seq_len must be >= 0"):
        trajops.sample_stp_triples(B_, -2, 2)
    with pytest.raises(ValueError, match=r"lengths must be an integer tensor of shape \(batch,\)"):
        trajops.sample_stp_triples(B_, T_, 2, lengths=torch.tensor([6, 6, 6]))
    with pytest.raises(ValueError, match=r"lengths must be an integer tensor of shape \(batch,\)"):
        trajops.sample_stp_triples(B_, T_, 2, lengths=torch.tensor([6.0, 6.0]))
    with pytest.raises(ValueError, match="triples must satisfy"):
        trajops.stp_loss(_h(), triples=torch.tensor([[[0, 1, 2], [2, 1, 0]]]))
    with pytest.raises(TypeError, match="triples must be int64"):
        trajops.stp_loss(_h(), triples=_tr().int())


@pytest.mark.skipif(INTERPRETER, reason="large shapes; the C++ kernels map their gradient buffers at >= 4 MiB")
def test_large_gradients_from_mapped_buffers():
    # 8 MiB per layer: the C++ backwards take lazily zeroed pages from the OS instead of at::zeros.
    hidden = make_hidden(2, 2, 1024, 1024, torch.float32, seed=5)
    triples = make_triples(6, 2, 1024, None, seed=5)
    loss, stats = op(hidden, triples, None)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(5))
    got = op_backward(g, stats, hidden, triples, None)
    want = reference.stp_loss_backward(g, stats, hidden, triples, None)
    for a, e in zip(got, want):
        assert_close_rows(a, e)
        a.add_(1.0)  # an ordinary, writable tensor
        assert_close_rows(a, e + 1.0)
    dl, ds = dense(hidden, None)
    gd = torch.randn(dl.shape, generator=torch.Generator().manual_seed(6))
    for a, e in zip(dense_backward(gd, ds, hidden, None), reference.stp_loss_dense_backward(gd, ds, hidden, None)):
        assert_close_rows(a, e)
