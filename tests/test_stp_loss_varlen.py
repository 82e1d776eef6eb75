"""STP losses on packed sequences (cu_seqlens): equal to the padded batch of the same documents.

A packed batch (1, total, D) with cu_seqlens (N + 1,) is the padded batch (N, max_len, D) whose row
j is document j, lengths = the document lengths. Runs on every backend (`make test`: C++,
reference, Triton interpreter), forward and backward, with documents of length 0, 1, 2, 3 and more.
"""
from __future__ import annotations

import pytest
import torch

import trajops
from trajops import reference, varlen
from trajops.nn import STPInject, STPLoss

from conftest import INTERPRETER, TOL

op = torch.ops.trajops.stp_loss
op_backward = torch.ops.trajops.stp_loss_backward
dense = torch.ops.trajops.stp_loss_dense
dense_backward = torch.ops.trajops.stp_loss_dense_backward

PACKINGS = [
    [5, 0, 1, 2, 3, 7],
    [3],
    [2, 1, 0],
    [0],
    [4, 4, 6],
    [1, 9, 2],
]
# The interpreter pays ~10 ms per kernel call: fewer packings and reductions there (the same code
# paths: the reductions differ only in grad_loss), and opcheck / compile run in the C++ pass only.
if INTERPRETER:
    PACKINGS = [PACKINGS[0], PACKINGS[2]]
REDUCTIONS = ("none", "mean") if INTERPRETER else ("mean", "sum", "none")
FAST = {"fast_mode": True} if INTERPRETER else {}
SLOW = pytest.mark.slow


def cu_of(lengths, dtype=torch.int32) -> torch.Tensor:
    return varlen.cu_seqlens_from_lengths(torch.tensor(lengths, dtype=torch.int64), dtype)


def packed_and_padded(lengths, D, L=2, dtype=torch.float64, seed=0):
    """(packed layers (1, total, D), padded layers (N, max(T, 1), D) holding the same tokens, padding
    filled with garbage that must not matter)."""
    g = torch.Generator().manual_seed(seed)
    total, N, T = sum(lengths), len(lengths), max(lengths + [1])
    packed = [torch.randn(1, total, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(L)]
    padded = []
    for h in packed:
        x = torch.full((N, T, D), 1e3, dtype=dtype)
        off = 0
        for j, n in enumerate(lengths):
            x[j, :n] = h[0, off : off + n]
            off += n
        padded.append(x)
    return packed, padded


def unpad(grad: torch.Tensor, lengths) -> torch.Tensor:
    """(N, T, D) padded rows -> (1, total, D) packed rows."""
    return torch.cat([grad[j, :n] for j, n in enumerate(lengths)]).unsqueeze(0)


def random_packing(seed: int, max_docs: int = 6, max_len: int = 9):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, max_docs + 1, (1,), generator=g))
    return torch.randint(0, max_len + 1, (n,), generator=g).tolist()


def tol(dtype):
    return dict(rtol=TOL[dtype], atol=TOL[dtype])


# ---------------------------------------------------------------- sampler
@pytest.mark.parametrize("lengths", PACKINGS)
def test_sampler_draws_what_the_padded_call_draws(lengths):
    cu, lt = cu_of(lengths), torch.tensor(lengths)
    total, N, T = sum(lengths), len(lengths), max(lengths)
    a = trajops.sample_stp_triples(N, total, 7, cu_seqlens=cu, generator=torch.Generator().manual_seed(4))
    b = trajops.sample_stp_triples(N, T, 7, lengths=lt, generator=torch.Generator().manual_seed(4))
    assert a.shape == (7, N, 3) and a.dtype == torch.int64
    active = lt >= 3
    assert torch.equal(a[:, active], b[:, active])
    s, r, t = a[:, active].unbind(-1)
    assert bool(((0 <= s) & (s < r) & (r < t) & (t < lt[active])).all())


def test_sampler_bad_arguments():
    cu = cu_of([3, 4])
    with pytest.raises(ValueError, match="batch must be the number of packed documents"):
        trajops.sample_stp_triples(3, 7, 2, cu_seqlens=cu)
    with pytest.raises(ValueError, match="either lengths or cu_seqlens"):
        trajops.sample_stp_triples(2, 7, 2, cu_seqlens=cu, lengths=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="cu_seqlens must end at the number of packed tokens 8"):
        trajops.sample_stp_triples(2, 8, 2, cu_seqlens=cu)
    with pytest.raises(TypeError, match="cu_seqlens must be torch.int32 or torch.int64"):
        trajops.sample_stp_triples(2, 7, 2, cu_seqlens=cu.float())


# ---------------------------------------------------------------- equality with the padded batch
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lengths", PACKINGS)
def test_sampled_equals_padded(lengths, dtype):
    D, S = 5, (3 if INTERPRETER else 6)
    packed, padded = packed_and_padded(lengths, D, dtype=dtype, seed=len(lengths))
    cu, lt = cu_of(lengths), torch.tensor(lengths)
    triples = trajops.sample_stp_triples(len(lengths), sum(lengths), S, cu_seqlens=cu,
                                         generator=torch.Generator().manual_seed(1))
    # op level: losses and stats are the padded ones
    lp, sp = op(packed, triples, None, cu)
    lq, sq = op(padded, triples, lt)
    torch.testing.assert_close(lp, lq, **tol(dtype))
    torch.testing.assert_close(sp, sq, **tol(dtype))
    for red in REDUCTIONS:
        hp = [h.clone().requires_grad_() for h in packed]
        hq = [h.clone().requires_grad_() for h in padded]
        a = trajops.stp_loss(hp, triples=triples, cu_seqlens=cu, reduction=red)
        b = trajops.stp_loss(hq, triples=triples, lengths=lt, reduction=red)
        torch.testing.assert_close(a, b, **tol(dtype))
        w = torch.randn(a.shape, dtype=a.dtype, generator=torch.Generator().manual_seed(2))
        (a * w).sum().backward()
        (b * w).sum().backward()
        for x, y in zip(hp, hq):
            torch.testing.assert_close(x.grad, unpad(y.grad, lengths), **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lengths", PACKINGS)
def test_dense_equals_padded(lengths, dtype):
    D = 4
    packed, padded = packed_and_padded(lengths, D, dtype=dtype, seed=7 + len(lengths))
    cu, lt = cu_of(lengths), torch.tensor(lengths)
    total, P = sum(lengths), max(sum(lengths) - 2, 0)
    for red in REDUCTIONS:
        hp = [h.clone().requires_grad_() for h in packed]
        hq = [h.clone().requires_grad_() for h in padded]
        a = trajops.stp_loss_dense(hp, cu_seqlens=cu, reduction=red)
        b = trajops.stp_loss_dense(hq, lengths=lt, reduction=red)
        if red == "none":  # packed layout (L, 1, total - 2): triple p of document j sits at cu[j] + p
            assert a.shape == (2, 1, P)
            expect = torch.zeros_like(a)
            for j, n in enumerate(lengths):
                expect[:, 0, int(cu[j]) : int(cu[j]) + max(n - 2, 0)] = b[:, j, : max(n - 2, 0)]
            torch.testing.assert_close(a, expect, **tol(dtype))
            w = torch.randn(b.shape, dtype=b.dtype, generator=torch.Generator().manual_seed(3))
            wp = torch.zeros_like(a)
            for j, n in enumerate(lengths):
                wp[:, 0, int(cu[j]) : int(cu[j]) + max(n - 2, 0)] = w[:, j, : max(n - 2, 0)]
            (a * wp).sum().backward()
            (b * w).sum().backward()
        else:
            torch.testing.assert_close(a, b, **tol(dtype))
            a.backward()
            b.backward()
        for x, y in zip(hp, hq):
            torch.testing.assert_close(x.grad, unpad(y.grad, lengths), **tol(dtype))
    # the stats of kept steps are the padded ones; steps across a boundary are 0
    _, sp = dense(packed, None, cu)
    _, sq = dense(padded, lt)
    for j, n in enumerate(lengths):
        o = int(cu[j])
        torch.testing.assert_close(sp[:, 0, o : o + max(n - 1, 0)], sq[:, j, : max(n - 1, 0)], **tol(dtype))
        if n >= 1 and o + n - 1 < total - 1:
            assert torch.equal(sp[:, 0, o + n - 1], torch.zeros_like(sp[:, 0, 0]))


@pytest.mark.parametrize("seed", range(2 if INTERPRETER else 4))
def test_random_packings(seed):
    lengths = random_packing(seed)
    D = 3 + seed
    packed, padded = packed_and_padded(lengths, D, L=1, dtype=torch.float64, seed=seed)
    cu, lt = cu_of(lengths, torch.int64 if seed % 2 else torch.int32), torch.tensor(lengths)
    hp, hq = packed[0].requires_grad_(), padded[0].requires_grad_()
    g = torch.Generator().manual_seed(seed)
    a = trajops.stp_loss(hp, 5, cu_seqlens=cu, generator=g) + trajops.stp_loss_dense(hp, cu_seqlens=cu)
    triples = trajops.sample_stp_triples(len(lengths), max(lengths), 5, lengths=lt,
                                         generator=torch.Generator().manual_seed(seed))
    b = trajops.stp_loss(hq, triples=triples, lengths=lt) + trajops.stp_loss_dense(hq, lengths=lt)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(hp.grad, unpad(hq.grad, lengths))


def test_two_dim_hidden_and_no_cross_document_triples():
    lengths = [4, 3]
    packed, _ = packed_and_padded(lengths, 3, L=1)
    cu = cu_of(lengths)
    x = packed[0][0]  # (total, D)
    torch.testing.assert_close(trajops.stp_loss_dense(x, cu_seqlens=cu), trajops.stp_loss_dense(packed[0], cu_seqlens=cu))
    per = trajops.stp_loss_dense(x, cu_seqlens=cu, reduction="none")
    assert per.shape == (1, 1, 5)
    assert float(per[0, 0, 2]) == 0.0 and float(per[0, 0, 3]) == 0.0  # (2,3,4) and (3,4,5) cross
    tri = torch.tensor([[[0, 1, 3], [0, 1, 2]]])
    torch.testing.assert_close(trajops.stp_loss(x, triples=tri, cu_seqlens=cu),
                               trajops.stp_loss(packed[0], triples=tri, cu_seqlens=cu))
    # a NaN in one document changes nothing in the others (sampled and dense, forward and backward)
    y = x.clone()
    y[4] = float("nan")
    h = y.clone().requires_grad_()
    per = trajops.stp_loss_dense(h, cu_seqlens=cu, reduction="none")
    assert torch.isfinite(per[0, 0, :2]).all() and per[0, 0, 4].isnan()
    per[0, 0, :2].sum().backward()
    # document 0's rows stay finite; document 1's are NaN (its valid triple reads the NaN: the
    # project's NaN rule makes its gradient rows NaN whatever grad_loss is)
    assert torch.isfinite(h.grad[:4]).all() and h.grad[4:].isnan().all()
    loss = trajops.stp_loss(y, triples=tri, cu_seqlens=cu, reduction="none")
    assert torch.isfinite(loss[0, 0, 0]) and loss[0, 0, 1].isnan()


def test_gradcheck_fp64():
    lengths = [4, 1, 3, 2, 5]
    packed, _ = packed_and_padded(lengths, 3, L=2, seed=9)
    hidden = [h.requires_grad_() for h in packed]
    cu = cu_of(lengths)
    tri = trajops.sample_stp_triples(5, sum(lengths), 3, cu_seqlens=cu, generator=torch.Generator().manual_seed(9))
    assert torch.autograd.gradcheck(
        lambda *hs: trajops.stp_loss(list(hs), triples=tri, cu_seqlens=cu, reduction="none"), hidden, **FAST
    )
    assert torch.autograd.gradcheck(
        lambda *hs: trajops.stp_loss_dense(list(hs), cu_seqlens=cu, reduction="none"), hidden, **FAST
    )


@SLOW
def test_opcheck():
    lengths = [4, 0, 2, 5]
    packed, _ = packed_and_padded(lengths, 3, L=2, seed=10)
    cu = cu_of(lengths)
    tri = trajops.sample_stp_triples(4, sum(lengths), 3, cu_seqlens=cu, generator=torch.Generator().manual_seed(2))
    torch.library.opcheck(op.default, (packed, tri, None, cu))
    torch.library.opcheck(op.default, ([h.clone().requires_grad_() for h in packed], tri, None, cu))
    loss, stats = op(packed, tri, None, cu)
    torch.library.opcheck(op_backward.default, (torch.randn_like(loss), stats, packed, tri, None, cu))
    torch.library.opcheck(dense.default, (packed, None, cu))
    torch.library.opcheck(dense.default, ([h.clone().requires_grad_() for h in packed], None, cu))
    dl, ds = dense(packed, None, cu)
    torch.library.opcheck(dense_backward.default, (torch.randn_like(dl), ds, packed, None, cu))


@SLOW
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    lengths = [5, 2, 6]
    cu = cu_of(lengths)
    tri = trajops.sample_stp_triples(3, 13, 4, cu_seqlens=cu, generator=torch.Generator().manual_seed(5))
    x = packed_and_padded(lengths, 6, L=1, dtype=torch.float32, seed=5)[0][0]

    def f(h):
        layers = [h * 1.5, h.sin()]
        return trajops.stp_loss(layers, triples=tri, cu_seqlens=cu) + trajops.stp_loss_dense(layers, cu_seqlens=cu)

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    f(xa).backward()
    compiled(xb).backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    assert xa.grad.abs().sum() > 0


# ---------------------------------------------------------------- nn modules and stp_inject
def test_modules_and_inject_pass_cu_seqlens():
    lengths = [5, 1, 4]
    packed, padded = packed_and_padded(lengths, 4, L=1, seed=11)
    cu, lt = cu_of(lengths), torch.tensor(lengths)
    tri = trajops.sample_stp_triples(3, 10, 3, cu_seqlens=cu, generator=torch.Generator().manual_seed(1))
    m = STPLoss(weight=0.5)
    torch.testing.assert_close(m(packed[0][0], triples=tri, cu_seqlens=cu),
                               0.5 * trajops.stp_loss(padded[0], triples=tri, lengths=lt))
    h = packed[0].clone().requires_grad_()
    out = trajops.stp_inject(h, 0.25, triples=tri, cu_seqlens=cu)
    assert out.shape == h.shape
    out.sum().backward()
    hq = padded[0].clone().requires_grad_()
    (hq.sum() + 0.25 * trajops.stp_loss(hq, triples=tri, lengths=lt)).backward()
    torch.testing.assert_close(h.grad, unpad(hq.grad, lengths))
    seam = STPInject(weight=0.1)
    x = packed[0][0].clone().requires_grad_()
    assert seam(x, triples=tri, cu_seqlens=cu).shape == x.shape and seam.last_loss is not None
    with pytest.raises(ValueError, match="either lengths or cu_seqlens"):
        trajops.stp_inject(h, 0.25, cu_seqlens=cu, lengths=lt)


# ---------------------------------------------------------------- bad cu_seqlens: same error everywhere
def _h(B=1, T=7, D=3):
    return [torch.randn(B, T, D)]


def _cu():  # built inside the callers' FakeTensorMode too
    return torch.tensor([0, 3, 7], dtype=torch.int32)


def _tri():
    return torch.tensor([[[0, 1, 2], [0, 2, 3]]])
BAD_CU = [
    (lambda: (_h(), _tri(), None, torch.tensor([1, 3, 7])), ValueError, "cu_seqlens must start at 0, got 1"),
    (lambda: (_h(), _tri(), None, torch.tensor([0, 4, 3])), ValueError,
     "cu_seqlens must be non-decreasing, got 4 then 3 at index 2"),
    (lambda: (_h(), _tri(), None, torch.tensor([0, 3, 6])), ValueError,
     "cu_seqlens must end at the number of packed tokens 7, got 6"),
    (lambda: (_h(), _tri(), None, _cu().float()), TypeError, "cu_seqlens must be torch.int32 or torch.int64"),
    (lambda: (_h(), _tri(), None, _cu().view(1, 3)), ValueError, r"cu_seqlens must have shape \(N \+ 1,\)"),
    (lambda: (_h(), _tri(), torch.tensor([7]), _cu()), ValueError, "pass either lengths or cu_seqlens, not both"),
    (lambda: (_h(B=2), _tri(), None, _cu()), ValueError,
     r"with cu_seqlens, hidden must be one packed row \(1, total, D\), got batch size 2"),
    (lambda: (_h(), _tri()[:, :1], None, _cu()), ValueError, r"triples must have shape \(n_spans, N, 3\)"),
]


@pytest.mark.parametrize("make,exc,match", BAD_CU)
def test_bad_cu_seqlens(make, exc, match):
    hidden, tri, lengths, cu = make()
    with pytest.raises(exc, match=match):
        op(hidden, tri, lengths, cu)
    L, S, N = 1, tri.shape[0], tri.shape[1]
    with pytest.raises(exc, match=match):
        op_backward(torch.zeros(L, S, N), torch.zeros(L, S, N, 3), hidden, tri, lengths, cu)
    if "triples" in match:
        return
    with pytest.raises(exc, match=match):
        dense(hidden, lengths, cu)
    T = hidden[0].shape[1]
    B = hidden[0].shape[0]
    with pytest.raises(exc, match=match):
        dense_backward(torch.zeros(L, B, T - 2), torch.zeros(L, B, T - 1, 2), hidden, lengths, cu)
    with pytest.raises(exc, match=match):
        trajops.stp_loss_dense(hidden, lengths=lengths, cu_seqlens=cu)
    if "must start" not in match and "non-decreasing" not in match and "must end" not in match:
        with pytest.raises(exc, match=match):  # shape faults: the fake impl says the same
            with torch._subclasses.fake_tensor.FakeTensorMode():
                op(*make())


def test_bad_triple_values_name_the_document():
    with pytest.raises(ValueError, match=r"\(s, r, t\) = \(0, 1, 3\) for span 0, row 0 \(length 3\)"):
        op(_h(), torch.tensor([[[0, 1, 3], [0, 1, 2]]]), None, _cu())
    with pytest.raises(ValueError, match=r"for span 0, row 1 \(length 4\)"):
        trajops.stp_loss(_h(), triples=torch.tensor([[[0, 1, 2], [1, 2, 4]]]), cu_seqlens=_cu())


def test_invalid_offsets_unchecked_give_nan():
    """Where the offsets are not read by the host (CUDA), the reference and the Triton launchers
    flag them with NaN losses instead; both are called here directly on CPU tensors."""
    h = _h()
    bad = torch.tensor([0, 5, 3])
    loss, stats = reference.stp_loss(h, _tri(), None, bad)
    assert loss.isnan().all() and stats.isnan().all()
    dl, ds = reference.stp_loss_dense(h, None, bad)
    assert dl.isnan().all()
    if INTERPRETER:
        from trajops.ops.stp_loss import _packed_ends, _packed_rows
        from trajops.triton_kernels import stp_loss as kernels

        lens, base = _packed_rows(bad, 7, None)
        assert kernels.stp_fwd(h, _tri(), lens, base)[0].isnan().all()
        lens, ends = _packed_ends(bad, 7, None)
        assert kernels.stp_dense_fwd(h, lens, ends)[0].isnan().all()
