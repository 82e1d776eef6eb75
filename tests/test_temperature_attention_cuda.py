"""trajops.temperature_attention on a CUDA device: the Triton kernels against the fp64 reference.

The CPU test file (test_temperature_attention.py) covers the semantics on every backend, the Triton
kernels included (under the interpreter). This file checks what only a GPU can: the compiled
kernels, their tiles and half-precision tensor-core paths. Each case compiles its own kernel
variants, so the list is short. It needs a CUDA device; without one every test is skipped.
"""
from __future__ import annotations

import math

import pytest
import torch

import trajops
from trajops import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"
# Max error relative to max(1, |reference|), measured against the fp64 reference on an H100
# (bf16 ~7e-3, fp16 ~2e-3, fp32 ~1e-6), with margin.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 6e-3, torch.float64: 1e-10}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().nan_to_num(0, 0, 0), b.double().nan_to_num(0, 0, 0)
    return float((a - b).abs().max() / max(1.0, float(b.abs().max()))) if b.numel() else 0.0


def _run(B, Hq, Hkv, Tq, Tk, D, Dv, dtype, causal=False, mask=None, tau_shape=None, with_lse=False, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, dtype=dtype, device=DEV, generator=g).requires_grad_()
    k = torch.randn(B, Hkv, Tk, D, dtype=dtype, device=DEV, generator=g).requires_grad_()
    v = torch.randn(B, Hkv, Tk, Dv, dtype=dtype, device=DEV, generator=g).requires_grad_()
    tau = (torch.rand(*(tau_shape or (B, Hq, Tq)), device=DEV, generator=g) + 0.5).requires_grad_()
    out, lse = trajops.temperature_attention(q, k, v, tau, causal=causal, attn_mask=mask, return_lse=True)
    go = torch.randn(out.shape, device=DEV, generator=g).to(dtype)
    gl = torch.randn(lse.shape, device=DEV, generator=g)
    loss = (out.double() * go.double()).sum() + ((lse.nan_to_num(0, 0, 0) * gl).sum() if with_lse else 0)
    grads = torch.autograd.grad(loss, (q, k, v, tau))

    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, tau)]
    m4 = None if mask is None else (mask[:, None, None, :] if mask.dim() == 2 else mask)
    c = reference.temperature_coefficient(leaves[3], (B, Hq, Tq), 1 / math.sqrt(D), torch.float64,
                                          reference.rows_with_keys(B, Hq, Tq, Tk, m4, causal, DEV))
    r_out, r_lse = reference.temperature_attention(*leaves[:3], c, m4, causal)
    r_loss = (r_out * go.double()).sum() + ((r_lse.nan_to_num(0, 0, 0) * gl.double()).sum() if with_lse else 0)
    r_grads = torch.autograd.grad(r_loss, leaves)
    return (out, lse, *grads), (r_out, r_lse, *r_grads)


CASES = [  # B, Hq, Hkv, Tq, Tk, D, Dv, causal, mask kind, tau shape, lse
    pytest.param(2, 4, 2, 5, 7, 16, 16, False, None, None, False, id="tiny-gqa"),
    pytest.param(2, 4, 2, 129, 129, 64, 64, True, None, None, True, id="causal-129"),
    pytest.param(1, 4, 1, 17, 300, 40, 24, True, None, None, True, id="causal-Tq<Tk-D40-Dv24"),
    pytest.param(2, 8, 2, 1, 257, 128, 128, True, None, (8, 1), False, id="decode-D128"),
    pytest.param(2, 4, 4, 190, 190, 64, 64, True, "pad", (4, 1), True, id="causal-keypad-emptyrow"),
    pytest.param(1, 4, 2, 100, 80, 32, 32, False, "4d", (), False, id="mask4d-0dtau"),
]


def _mask(kind, B, Hq, Tq, Tk):
    if kind == "pad":
        m = torch.ones(B, Tk, dtype=torch.bool, device=DEV)
        m[0] = False  # a sequence with every key padded: its rows are empty
        m[-1, Tk // 3:] = False
        return m
    if kind == "4d":
        return torch.rand(1, 1, Tq, Tk, device=DEV, generator=torch.Generator(device=DEV).manual_seed(3)) > 0.5
    return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,Dv,causal,mask_kind,tau_shape,with_lse", CASES)
def test_against_fp64_reference(dtype, B, Hq, Hkv, Tq, Tk, D, Dv, causal, mask_kind, tau_shape, with_lse):
    mask = _mask(mask_kind, B, Hq, Tq, Tk)
    got, want = _run(B, Hq, Hkv, Tq, Tk, D, Dv, dtype, causal, mask, tau_shape, with_lse)
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv", "dtau"), got, want):
        assert not bool(a.isnan().any()), name
        assert _rel(a, e) < TOL[dtype], (name, _rel(a, e))
    if mask_kind == "pad":  # the fully padded sequence: out 0, lse -inf, zero dq
        assert bool((got[0][0] == 0).all()) and bool((got[1][0] == -math.inf).all()) and bool((got[2][0] == 0).all())


def test_gradcheck_fp64():
    g = torch.Generator(device=DEV).manual_seed(1)
    q = torch.randn(1, 2, 5, 16, dtype=torch.float64, device=DEV, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 7, 16, dtype=torch.float64, device=DEV, generator=g, requires_grad=True)
    v = torch.randn(1, 1, 7, 16, dtype=torch.float64, device=DEV, generator=g, requires_grad=True)
    tau = (torch.rand(2, 1, dtype=torch.float64, device=DEV, generator=g) + 0.5).requires_grad_()
    fn = lambda *a: trajops.temperature_attention(*a, causal=True, return_lse=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, tau))


def test_opcheck_and_compile():
    g = torch.Generator(device=DEV).manual_seed(2)
    q = torch.randn(2, 4, 33, 64, device=DEV, generator=g, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 40, 64, device=DEV, generator=g, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 40, 64, device=DEV, generator=g, dtype=torch.bfloat16, requires_grad=True)
    tau = (torch.rand(2, 4, 33, device=DEV, generator=g) + 0.5).requires_grad_()
    mask = (torch.rand(2, 1, 1, 40, device=DEV, generator=g) > 0.2)
    torch.library.opcheck(torch.ops.trajops.temperature_attention.default, (q, k, v, tau, mask, True, None))

    def f(q, k, v, tau):
        return trajops.temperature_attention(q, k, v, tau, causal=True, attn_mask=mask).float().square().sum()

    eager = torch.autograd.grad(f(q, k, v, tau), (q, k, v, tau))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v, tau), (q, k, v, tau))
    for a, e in zip(compiled, eager):
        assert torch.equal(a, e)


def test_bad_tau_and_determinism():
    g = torch.Generator(device=DEV).manual_seed(4)
    q = torch.randn(1, 2, 70, 64, device=DEV, generator=g, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 70, 64, device=DEV, generator=g, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 2, 70, 64, device=DEV, generator=g, dtype=torch.bfloat16, requires_grad=True)
    tau = torch.rand(1, 2, 70, device=DEV, generator=g) + 0.5
    runs = []
    for _ in range(2):
        out, lse = trajops.temperature_attention(q, k, v, tau, causal=True, return_lse=True)
        runs.append((out, lse, *torch.autograd.grad(out.float().sum(), (q, k, v))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # no atomics: bitwise repeatable
    bad = tau.clone()
    bad[0, 1, 40] = 0.0
    out, lse = trajops.temperature_attention(q, k, v, bad, causal=True, return_lse=True)
    assert bool(out[0, 1, 40].isnan().all()) and bool(lse[0, 1, 40].isnan())
    others = torch.ones(70, dtype=torch.bool, device=DEV)
    others[40] = False
    assert torch.equal(out[0, 1, others], runs[0][0][0, 1, others]) and torch.equal(out[0, 0], runs[0][0][0, 0])
