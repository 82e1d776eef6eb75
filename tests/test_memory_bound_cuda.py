"""The memory-bound Triton kernels on a CUDA device against the fp64 reference on the CPU.

trajectory_flow, the STP losses (sampled and dense), adaptive_positional_encoding, and the packed
(cu_seqlens) forms of flow, STP and attention. Their CPU test files run the Triton kernels under the interpreter on tiny shapes; only a GPU runs the compiled kernels with the
tiles, grids and multi-program paths real sizes pick (several programs per sequence for the
positional scan, long windows, many documents), which is what this file checks: forward and
gradients, fp32 and the half types, against the reference computed in fp64 on the CPU.

It needs a CUDA device; without one every test is skipped. TRAJOPS_TEST_DEVICE=cpu runs the same
tests on the CPU backend (a dry run of the tests themselves).
"""
from __future__ import annotations

import os

import pytest
import torch

import trajops
from trajops.varlen import cu_seqlens_from_lengths

DEV = os.environ.get("TRAJOPS_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
# Max error relative to max(1, |reference|): half types round the inputs' steps (flow, STP) and the
# output; fp32 differs from fp64 by accumulation order only.
TOL = {F32: 2e-5, BF16: 3e-2, F16: 4e-3, F64: 1e-10}


def _close(name, actual, expected, tol):
    a, e = actual.detach().to("cpu", F64), expected.detach().to("cpu", F64)
    assert a.shape == e.shape, (name, a.shape, e.shape)
    assert torch.equal(a.isnan(), e.isnan()), name
    a, e = a.nan_to_num(), e.nan_to_num()
    scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    err = float((a - e).abs().max()) / scale if e.numel() else 0.0
    print(f"{name}: {err:.3g}")
    assert err <= tol, (name, err, tol)


def _packing(lengths, device=DEV):
    return cu_seqlens_from_lengths(torch.tensor(lengths)).to(device)


def _rand(*shape, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def _fwd_bwd(fn, inputs, grad):
    """fn(*inputs) and the gradients of <fn(*inputs), grad> for every input that is floating point."""
    xs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*xs)
    wrt = [x for x in xs if x.requires_grad]
    grads = torch.autograd.grad(out, wrt, grad.to(out.dtype))
    return out, grads


def _compare(name, fn, inputs, tol=None, seed=1):
    """Device run in the inputs' dtype vs fp64 CPU reference run of the same inputs (upcast)."""
    dev_in = [t.to(DEV) for t in inputs]
    out = fn(*dev_in)
    grad = _rand(*out.shape, seed=seed)
    out, grads = _fwd_bwd(fn, dev_in, grad.to(DEV))
    # the CPU backend in fp64 (itself checked against the reference by the CPU test files)
    ref_in = [t.to("cpu", F64) if t.is_floating_point() else t.cpu() for t in inputs]
    ref_out, ref_grads = _fwd_bwd(fn, ref_in, grad.to(F64))
    tol = tol or TOL[inputs[0].dtype]
    _close(f"{name} out", out, ref_out, tol)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        _close(f"{name} grad{i}", a, b, tol)


# ------------------------------------------------------------------------------ trajectory_flow
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("B,T,D,window", [(2, 1031, 1000, 8), (1, 4099, 64, 1), (3, 129, 4096, 37), (1, 2, 3, 8)])
def test_trajectory_flow(dtype, B, T, D, window):
    x = _rand(B, T, D, dtype=dtype).cumsum(1)  # a walk: steps of norm ~sqrt(D), some windows long
    _compare(f"flow {dtype} {B}x{T}x{D} w{window}", lambda t: trajops.trajectory_flow(t, window), [x])


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_trajectory_flow_packed(dtype):
    lengths = [0, 1, 2, 700, 3, 1, 1500, 9]
    x = _rand(sum(lengths), 320, dtype=dtype).cumsum(0)
    cu = _packing(lengths)
    _compare(f"flow packed {dtype}", lambda t: trajops.trajectory_flow(t, 8, cu_seqlens=cu.to(t.device)), [x])


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_trajectory_flow_public_backward_uses_the_stats(dtype, packed):
    """The public function keeps the forward's stats on CUDA (trajectory_flow_with_stats, one
    backward launch); its values and gradient equal the raw op's (whose backward recomputes them)."""
    lengths = [5, 1, 600, 300]
    x = _rand(sum(lengths) if packed else 2, *(() if packed else (517,)), 256, dtype=dtype).cumsum(-2).to(DEV)
    cu = _packing(lengths) if packed else None
    args = (8, 1e-6) + ((cu,) if packed else ())
    g = _rand(*x.shape, dtype=dtype, seed=7).to(DEV)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = trajops.trajectory_flow(xa, 8, cu_seqlens=cu)
    if DEV == "cuda":
        assert "trajectory_flow_with_stats" in type(out.grad_fn).__name__
    (out * g).sum().backward()
    want = torch.ops.trajops.trajectory_flow(xb, *args)
    (want * g).sum().backward()
    _close(f"flow public vs op {dtype} packed={packed} out", out, want, 0.0)
    _close(f"flow public vs op {dtype} packed={packed} grad", xa.grad, xb.grad, TOL[dtype])


# ------------------------------------------------------------------------------ STP
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("B,T,D", [(4, 2048, 1024), (3, 37, 4096), (2, 3, 1)])
def test_stp_sampled_and_dense(dtype, B, T, D):
    h = [_rand(B, T, D, dtype=dtype, seed=s).cumsum(1) for s in (2, 3)]
    lengths = torch.tensor([T, max(0, T - 5)] + [T // 2] * (B - 2))
    triples = trajops.sample_stp_triples(B, T, 4, lengths=lengths, generator=torch.Generator().manual_seed(0))

    def sampled(a, b):
        return trajops.stp_loss([a, b], triples=triples.to(a.device), lengths=lengths.to(a.device),
                                reduction="none")

    def dense(a, b):
        return trajops.stp_loss_dense([a, b], lengths=lengths.to(a.device), reduction="none")

    _compare(f"stp sampled {dtype} {B}x{T}x{D}", sampled, h)
    _compare(f"stp dense {dtype} {B}x{T}x{D}", dense, h)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_stp_packed(dtype):
    lengths = [0, 1, 2, 3, 900, 5, 300]
    h = _rand(1, sum(lengths), 512, dtype=dtype, seed=4).cumsum(1)
    cu = _packing(lengths)
    n_docs = len(lengths)
    triples = trajops.sample_stp_triples(n_docs, max(lengths), 4, lengths=torch.tensor(lengths),
                                         generator=torch.Generator().manual_seed(1))

    def sampled(a):
        return trajops.stp_loss([a], triples=triples.to(a.device), cu_seqlens=cu.to(a.device), reduction="none")

    def dense(a):
        return trajops.stp_loss_dense([a], cu_seqlens=cu.to(a.device), reduction="none")

    _compare(f"stp packed sampled {dtype}", sampled, [h])
    _compare(f"stp packed dense {dtype}", dense, [h])


# ------------------------------------------------------------------------------ positional encoding
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("B,T,E,L", [(8, 4096, 1024, 8192), (2, 20011, 64, 512), (3, 1, 7, 5)])
def test_adaptive_positional_encoding(dtype, B, T, E, L):
    disp = (_rand(B, T, seed=5) * 0.7).to(dtype)  # positions wander, hit both clamps for small L
    table = _rand(L, E, dtype=dtype, seed=6)
    _compare(f"ape {dtype} {B}x{T} E{E} L{L}", trajops.adaptive_positional_encoding, [disp, table],
             tol=TOL[dtype] * (4 if dtype != F32 else 50))  # s = cumsum over 20k steps: fp32 rounding of s


# ------------------------------------------------------------------------------ packed attention
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("causal", [False, True])
def test_temperature_attention_packed(dtype, causal):
    lq = [0, 1, 2, 700, 7, 300]
    lk = [3, 1, 2, 700, 9, 260]
    Hq, Hkv, D = 8, 2, 128
    q = _rand(sum(lq), Hq, D, dtype=dtype, seed=7)
    k = _rand(sum(lk), Hkv, D, dtype=dtype, seed=8)
    v = _rand(sum(lk), Hkv, D, dtype=dtype, seed=9)
    tau = (_rand(sum(lq), Hq, seed=10).abs() + 0.5).to(F32)
    cq, ck = _packing(lq), _packing(lk)

    def fn(q, k, v, tau):
        return trajops.temperature_attention(q, k, v, tau, causal=causal, cu_seqlens_q=cq.to(q.device),
                                             cu_seqlens_k=ck.to(q.device), max_seqlen_q=max(lq),
                                             max_seqlen_k=max(lk))

    _compare(f"attn packed {dtype} causal={causal}", fn, [q, k, v, tau])
