"""temperature_attention on packed documents (cu_seqlens_q/k; op trajops::temperature_attention_varlen).

The oracle is the dense op run on each document alone (same backend): packed == per document for
random packings (empty documents, 1 and 2 tokens, Tq != Tk per document, causal, GQA, Dv != D),
forward and every gradient (dtau for scalar, (Hq,) and (total_q, Hq) tau); plus gradcheck, opcheck,
torch.compile(fullgraph=True), the NaN rule per document, the nn module and bad inputs.
"""
from __future__ import annotations

import importlib.util
import math
import random

import pytest
import torch

import trajops
from conftest import CPU_BACKEND, INTERPRETER, assert_close, assert_compiled_matches_eager
from trajops.varlen import cu_seqlens_from_lengths

op = torch.ops.trajops.temperature_attention_varlen
op_backward = torch.ops.trajops.temperature_attention_varlen_backward

_TRITON_MISSING = INTERPRETER and importlib.util.find_spec(
    "trajops.triton_kernels.temperature_attention_varlen") is None
needs_kernels = pytest.mark.skipif(_TRITON_MISSING, reason="Triton varlen attention lands with the vattnt branch")


def pack(lq, lk, Hq=2, Hkv=1, D=4, Dv=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lq), sum(lk)
    q = torch.randn(tq, Hq, D, generator=g, dtype=dtype)
    k = torch.randn(tk, Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(tk, Hkv, Dv, generator=g, dtype=dtype)
    return q, k, v, cu_seqlens_from_lengths(torch.tensor(lq)), cu_seqlens_from_lengths(torch.tensor(lk))


def make_tau(kind, total_q, Hq, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = {"0d": (), "h": (Hq,), "qh": (total_q, Hq)}[kind]
    return (0.5 + torch.rand(shape, generator=g)).to(dtype)


def per_document(q, k, v, tau, cu_q, cu_k, causal, scale=None):
    """The oracle: the dense op on each document alone, results packed back (lse token-major)."""
    tau = tau.expand(q.shape[0], q.shape[1])
    outs, lses = [], []
    for j in range(cu_q.shape[0] - 1):
        sq, eq, sk, ek = int(cu_q[j]), int(cu_q[j + 1]), int(cu_k[j]), int(cu_k[j + 1])
        dense = lambda x, s, e: x[s:e].transpose(0, 1).unsqueeze(0)  # noqa: E731
        out, lse = trajops.temperature_attention(dense(q, sq, eq), dense(k, sk, ek), dense(v, sk, ek),
                                                 tau[sq:eq].t().unsqueeze(0), causal=causal, scale=scale,
                                                 return_lse=True)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].t())
    return torch.cat(outs), torch.cat(lses)


def loss(out, lse, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype)
    wl = torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    return (out * w).sum() + (torch.where(lse.isinf(), 0.0, lse) * wl).sum()  # -inf rows: no gradient


def random_packing(rng, n):
    lq = [rng.choice([0, 1, 2, 7, 3]) for _ in range(n)]
    lk = [x if rng.random() < 0.5 else rng.choice([0, 1, 2, 5]) for x in lq]
    return lq, lk


PACKINGS = [
    pytest.param([0, 1, 2, 7], [0, 1, 2, 7], id="0-1-2-7"),
    pytest.param([3, 0, 2, 4], [5, 3, 0, 2], id="Tq!=Tk"),
    pytest.param([1], [6], id="decode"),
    pytest.param([0, 0], [0, 0], id="empty"),
]


# ---------------------------------------------------------------- equality with per-document runs
@needs_kernels
@pytest.mark.parametrize("lq,lk", PACKINGS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hq,Hkv", [(2, 1)] if INTERPRETER else [(2, 2), (2, 1)])  # the interpreter is slow
@pytest.mark.parametrize("tau_kind", ["0d", "h", "qh"])
def test_matches_per_document(lq, lk, causal, Hq, Hkv, tau_kind):
    dtype = torch.float64 if tau_kind == "h" else torch.float32
    q, k, v, cu_q, cu_k = pack(lq, lk, Hq, Hkv, dtype=dtype, seed=len(lq) + Hkv)
    tau = make_tau(tau_kind, q.shape[0], Hq, dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, tau)]
    out, lse = trajops.temperature_attention(*leaves, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                             return_lse=True)
    assert out.shape == (q.shape[0], Hq, v.shape[2]) and lse.shape == (q.shape[0], Hq)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    oracle = [x.clone().requires_grad_() for x in (q, k, v, tau)]
    want_out, want_lse = per_document(*oracle, cu_q, cu_k, causal)
    assert_close(out.detach(), want_out.detach())
    assert_close(lse.detach(), want_lse.detach())
    if q.shape[0] == 0 or k.shape[0] == 0:
        return
    got = torch.autograd.grad(loss(out, lse), leaves, allow_unused=True)
    want = torch.autograd.grad(loss(want_out, want_lse), oracle, allow_unused=True)
    for name, a, e, x in zip("q k v tau".split(), got, want, oracle):
        assert a is not None and a.shape == x.shape, name
        assert_close(a, torch.zeros_like(x) if e is None else e)


@needs_kernels
@pytest.mark.parametrize("seed", range(2 if INTERPRETER else 6))
def test_random_packings(seed):
    rng = random.Random(seed)
    lq, lk = random_packing(rng, rng.randint(1, 5))
    Hkv = rng.choice([1, 2])
    causal = bool(seed % 2)
    q, k, v, cu_q, cu_k = pack(lq, lk, 2, Hkv, D=rng.choice([2, 5]), Dv=rng.choice([1, 4]), seed=seed)
    tau = make_tau("qh", q.shape[0], 2)
    scale = rng.choice([None, 0.7])
    out, lse = trajops.temperature_attention(q, k, v, tau, causal=causal, scale=scale, cu_seqlens_q=cu_q,
                                             cu_seqlens_k=cu_k, max_seqlen_q=max(lq), max_seqlen_k=max(lk),
                                             return_lse=True)
    want_out, want_lse = per_document(q, k, v, tau, cu_q, cu_k, causal, scale)
    assert_close(out, want_out)
    assert_close(lse, want_lse)


@needs_kernels
def test_large_and_small_documents():
    """The C++ kernel runs large documents (Lq * Lk * Hq >= 2**20) with every thread, one after the
    other, and the small ones one per thread: both paths, forward and backward, in one call."""
    big = 520 if CPU_BACKEND == "cpp" else 24  # the size only matters to the C++ kernel
    lq, lk = [3, big, 0, 9, 1], [3, big, 2, 9, 4]
    q, k, v, cu_q, cu_k = pack(lq, lk, 4, 2, D=8, Dv=8, seed=9)
    tau = make_tau("qh", q.shape[0], 4)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, tau)]
    out, lse = trajops.temperature_attention(*leaves, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                             return_lse=True)
    oracle = [x.clone().requires_grad_() for x in (q, k, v, tau)]
    want_out, want_lse = per_document(*oracle, cu_q, cu_k, True)
    assert_close(out.detach(), want_out.detach())
    assert_close(lse.detach(), want_lse.detach())
    got = torch.autograd.grad(loss(out, lse), leaves)
    want = torch.autograd.grad(loss(want_out, want_lse), oracle)
    for a, e in zip(got, want):
        assert_close(a, e)


@needs_kernels
def test_other_documents_never_matter():
    """NaN in one document's k/v/q rows: the other documents are exactly a clean run."""
    q, k, v, cu_q, cu_k = pack([2, 3], [4, 3], 2, 1)
    clean = trajops.temperature_attention(q, k, v, 1.0, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    k2, q2 = k.clone(), q.clone()
    k2[1, 0, 0] = math.nan  # a key of document 0
    q2[3, 1, 0] = math.inf  # query 1, head 1 of document 1
    out, lse = trajops.temperature_attention(q2, k2, v, 1.0, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    assert out[:2].isnan().all() and lse[:2].isnan().all()  # every row of document 0 may attend key 1
    assert out[3, 1].isnan().all() and lse[3, 1].isnan()
    keep = torch.ones(5, 2, dtype=torch.bool)
    keep[:2] = False
    keep[3, 1] = False
    torch.testing.assert_close(out[keep], clean[0][keep])
    torch.testing.assert_close(lse[keep], clean[1][keep])


@needs_kernels
def test_int64_offsets_and_noncontiguous():
    q, k, v, cu_q, cu_k = pack([3, 4], [2, 5], 2, 2, D=4, Dv=4)
    want = trajops.temperature_attention(q, k, v, 0.8, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    qn = q.transpose(1, 2).contiguous().transpose(1, 2)  # head dim not innermost in memory
    vn = torch.cat([v, v], -1)[..., ::2] * 0 + v
    got = trajops.temperature_attention(qn, k, vn, 0.8, cu_seqlens_q=cu_q.long(), cu_seqlens_k=cu_k.long())
    assert_close(got, want)


def test_reference_document_mask_survives_corrupt_offsets():
    """On CUDA the reference cannot read the offsets (no host sync): its document mask must index
    nothing out of range whatever they hold (the outputs are then NaN by cu_seqlens_invalid)."""
    from trajops.ops.temperature_attention_varlen import _allowed

    want = torch.zeros(1, 1, 5, 7, dtype=torch.bool)
    want[..., :2, :3] = torch.tensor([[True, True, False], [True, True, True]])  # causal, Lq=2, Lk=3
    want[..., 2:, 3:] = torch.ones(3, 4, dtype=torch.bool).tril(1)
    assert torch.equal(_allowed(torch.tensor([0, 2, 5]), torch.tensor([0, 3, 7]), 5, 7, True), want)
    for cu_q, cu_k in [([0, 9, 2], [-4, 3, 7]), ([3, 1, 5], [0, 7, 70]), ([0, 5, 5], [0, 0, 0])]:
        m = _allowed(torch.tensor(cu_q), torch.tensor(cu_k), 5, 7, True)
        assert m.shape == (1, 1, 5, 7) and m.dtype == torch.bool


# ---------------------------------------------------------------- autograd, opcheck, compile
@needs_kernels
@pytest.mark.parametrize("causal,tau_kind", [(True, "qh"), (False, "h")])
def test_gradcheck(causal, tau_kind):
    q, k, v, cu_q, cu_k = pack([2, 0, 3], [3, 1, 2], 2, 1, D=3, Dv=2, dtype=torch.float64)
    tau = make_tau(tau_kind, q.shape[0], 2, torch.float64)

    def f(q, k, v, tau):
        out, lse = trajops.temperature_attention(q, k, v, tau, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                 max_seqlen_q=3, max_seqlen_k=3, return_lse=True)
        return out, torch.where(lse.isinf(), 0.0, lse)

    inputs = tuple(x.requires_grad_() for x in (q, k, v, tau))
    assert torch.autograd.gradcheck(f, inputs, fast_mode=INTERPRETER or not causal)


@needs_kernels
@pytest.mark.parametrize("causal", [True])
def test_opcheck(causal):
    q, k, v, cu_q, cu_k = pack([2, 0, 3], [4, 1, 2], 2, 1, D=4, Dv=3, dtype=torch.float64)
    tau = make_tau("h", q.shape[0], 2, torch.float64)
    args = (cu_q, cu_k, 3, 4, causal, 0.5)
    torch.library.opcheck(op.default, (q, k, v, tau, *args))
    leaves = tuple(x.clone().requires_grad_() for x in (q, k, v, tau))
    torch.library.opcheck(op.default, (*leaves, *args))
    out, lse = op(q, k, v, tau, *args)
    g = torch.randn_like(out)
    for gl in (None, torch.randn_like(lse)):
        torch.library.opcheck(op_backward.default, (g, gl, q, k, v, tau, *args, out, lse))


@needs_kernels
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    q, k, v, cu_q, cu_k = pack([3, 1, 4], [3, 2, 4], 2, 1, D=8, Dv=4, seed=5)
    tau = make_tau("qh", q.shape[0], 2)

    def f(q, k, v, tau):
        out, lse = trajops.temperature_attention(q * 1.5, k, v, tau.exp(), causal=True, scale=0.5,
                                                 cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4,
                                                 max_seqlen_k=4, return_lse=True)
        return out.sum(-1) * 2 + lse

    assert_compiled_matches_eager(f, (q, k, v, tau), backend="aot_eager")


# ---------------------------------------------------------------- nn module
@needs_kernels
@pytest.mark.parametrize("how", ["cu_seqlens", "position_ids"])
def test_multiscale_attention_packed(how):
    torch.manual_seed(0)
    m = trajops.nn.MultiScaleTrajectoryAttention(16, 2)
    lengths = [3, 1, 4]
    x = torch.randn(1, sum(lengths), 16)
    cu = cu_seqlens_from_lengths(torch.tensor(lengths))
    if how == "cu_seqlens":
        got = m(x, x, x, causal=True, cu_seqlens=cu)
    else:
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        got = m(x, x, x, causal=True, position_ids=pos)
    want = torch.cat([m(d, d, d, causal=True) for d in x.split(lengths, dim=1)], dim=1)
    assert_close(got.detach(), want.detach())


def test_multiscale_attention_packed_bad_inputs():
    m = trajops.nn.MultiScaleTrajectoryAttention(8, 2)
    x = torch.randn(1, 5, 8)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="attention_mask"):
        m(x, x, x, torch.ones(5, 5), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens.*position_ids|position_ids.*cu_seqlens"):
        m(x, x, x, cu_seqlens=cu, position_ids=torch.arange(5)[None])


# ---------------------------------------------------------------- bad inputs (every backend, same text)
def inputs(**over):
    q, k, v, cu_q, cu_k = pack([2, 3], [3, 4], 2, 1, D=4, Dv=3)
    d = dict(q=q, k=k, v=v, tau=torch.tensor(1.0), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    d.update(over)
    return d


I32 = torch.int32
BAD = [
    (lambda: dict(cu_seqlens_k=None), ValueError,
     "cu_seqlens_q and cu_seqlens_k must be given together.*only cu_seqlens_q"),
    (lambda: dict(cu_seqlens_q=None), ValueError, "must be given together.*only cu_seqlens_k"),
    (lambda: dict(cu_seqlens_k=torch.tensor([0, 7], dtype=I32)), ValueError,
     "cu_seqlens_q and cu_seqlens_k must have one length N \\+ 1"),
    (lambda: dict(attn_mask=torch.ones(5, 7, dtype=torch.bool)), ValueError, "attn_mask must be None with cu_seqlens"),
    (lambda: dict(cu_seqlens_q=torch.tensor([0, 3, 2], dtype=I32)), ValueError, "cu_seqlens_q must be non-decreasing"),
    (lambda: dict(cu_seqlens_q=torch.tensor([1, 2, 5], dtype=I32)), ValueError, "cu_seqlens_q must start at 0"),
    (lambda: dict(cu_seqlens_k=torch.tensor([0, 3, 6], dtype=I32)), ValueError,
     "cu_seqlens_k must end at the number of packed tokens 7, got 6"),
    (lambda: dict(cu_seqlens_q=torch.tensor([0.0, 2.0, 5.0])), TypeError,
     "cu_seqlens_q must be torch.int32 or torch.int64"),
    (lambda: dict(cu_seqlens_k=torch.tensor([[0, 3, 7]], dtype=I32)), ValueError,
     r"cu_seqlens_k must have shape \(N \+ 1,\)"),
    (lambda: dict(q=torch.randn(1, 2, 5, 4)), ValueError, r"q must have shape \(total, H, D\)"),
    (lambda: dict(k=torch.randn(7, 1, 5)), ValueError, "q and k must have one head size"),
    (lambda: dict(v=torch.randn(6, 1, 3)), ValueError, "k and v must have one number of packed tokens"),
    (lambda: dict(q=torch.randn(5, 3, 4), k=torch.randn(7, 2, 4), v=torch.randn(7, 2, 3)), ValueError,
     "dividing q's Hq"),
    (lambda: dict(q=torch.randn(5, 2, 4, dtype=torch.float64)), TypeError, "q, k and v must have one dtype"),
    (lambda: dict(tau=torch.ones(5, 3)), ValueError, r"tau must be broadcastable to \(total_q, Hq\) = \(5, 2\)"),
    (lambda: dict(tau=torch.ones(2, dtype=torch.int64)), TypeError, "tau must be a floating-point tensor"),
    (lambda: dict(max_seqlen_q=2), ValueError,
     "max_seqlen_q must be at least the longest document's length 3, got 2"),
    (lambda: dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be >= 0, got -1"),
    (lambda: dict(max_seqlen_q=2.5), TypeError, "max_seqlen_q must be an int or None"),
    (lambda: dict(scale=0.0), ValueError, "scale must be a finite number > 0"),
]
BAD_IDS = ["no-k", "no-q", "N", "mask", "decreasing", "start", "end", "float-cu", "2d-cu", "4d-q", "D", "total_k",
           "Hq%Hkv", "dtype-mix", "tau-shape", "tau-int", "max-small", "max-neg", "max-float", "scale"]


@pytest.mark.parametrize("over,exc,match", BAD, ids=BAD_IDS)
def test_bad_inputs(over, exc, match):
    with pytest.raises(exc, match=match):
        trajops.temperature_attention(**inputs(**over()))


def test_max_seqlen_without_cu_seqlens():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="max_seqlen_q/max_seqlen_k are only used with cu_seqlens"):
        trajops.temperature_attention(q, q, q, 1.0, max_seqlen_q=3)


def test_fake_impl_checks_like_the_kernels():
    """Under FakeTensorMode (torch.compile's tracing) the shape errors are the same; values are not read."""
    d = inputs()
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = {n: mode.from_tensor(t) for n, t in d.items()}
        with pytest.raises(ValueError, match=r"tau must be broadcastable to \(total_q, Hq\)"):
            op(fake["q"], fake["k"], fake["v"], mode.from_tensor(torch.ones(5, 3)), fake["cu_seqlens_q"],
               fake["cu_seqlens_k"], 3, 4, False, None)
        out, lse = op(fake["q"], fake["k"], fake["v"], fake["tau"], fake["cu_seqlens_q"], fake["cu_seqlens_k"], 3, 4,
                      False, None)
        assert out.shape == (5, 2, 3) and lse.shape == (5, 2)


def test_bad_backward_inputs():
    d = inputs()
    args = (d["cu_seqlens_q"], d["cu_seqlens_k"], 3, 4, False, None)
    if _TRITON_MISSING:  # the backward's checks run before its kernel: a forward result of the right shape
        out, lse = torch.zeros(5, 2, 3), torch.zeros(5, 2)
    else:
        out, lse = op(d["q"], d["k"], d["v"], d["tau"], *args)
    g = torch.randn_like(out)
    for over, exc, match in [
        (dict(grad_out=torch.ones(5, 2, 4)), ValueError, "grad_out must have shape"),
        (dict(grad_lse=torch.ones(2, 5)), ValueError, "grad_lse must have shape"),
        (dict(lse=lse.double()), TypeError, "lse must be torch.float32"),
    ]:
        a = dict(grad_out=g, grad_lse=None, out=out, lse=lse)
        a.update(over)
        with pytest.raises(exc, match=match):
            op_backward(a["grad_out"], a["grad_lse"], d["q"], d["k"], d["v"], d["tau"], *args, a["out"], a["lse"])
