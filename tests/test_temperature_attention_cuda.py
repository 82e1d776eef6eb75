"""trajops.temperature_attention on a CUDA device: the Triton kernels against the fp64 reference.

The CPU test file (test_temperature_attention.py) covers the semantics on every backend, the Triton
kernels included (under the interpreter). This file checks what only a GPU can: the compiled
kernels, their tiles and half-precision tensor-core paths, over a covering design of head sizes
(every padded head size the kernels serve, and Dv != D), dtypes, mask kinds (none, key padding as
(B, Tk) and (B, 1, 1, Tk), a full (B, Hq, Tq, Tk) mask, a (Tq, Tk) mask), causal or not, GQA
ratios, decode (Tq = 1) and long (Tq = 1024) queries, empty rows and tau shapes. Not the full cross
product: each distinct (dtype, padded D and Dv, mask kind, causal, decode) compiles its own four
kernels (forward, delta, dk/dv, dq) at a few seconds each.

It needs a CUDA device; without one every test is skipped. TRAJOPS_TEST_DEVICE=cpu runs the same
tests on the CPU backend (a dry run of the tests themselves, e.g. on a machine without a GPU).
The measured errors of each case are printed (pytest -rP shows them) so tolerances can be checked.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import trajops
from trajops import reference

DEV = os.environ.get("TRAJOPS_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

# Max error relative to max(1, |reference|), measured against the fp64 reference on an H100
# (bf16 ~7e-3, fp16 ~2e-3, fp32 ~1e-6), with margin.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 6e-3, torch.float64: 1e-10}
# No extra slack for the long (Tq = 1024) cases: dk and dv sum Tq * (Hq / Hkv) terms made of
# probabilities / dS rounded to the half type, but independent roundings add up like the sum itself,
# so the error relative to the result does not grow with the length. The CPU backend (ATen's flash
# kernel, which rounds the same way) gives bf16 dk/dv errors of ~1e-2 at Tq = 1024 as at Tq = 257.

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> float:
    """max |a - b| / max(1, scale, max |b|), infinities counted as 0 (compared separately)."""
    a, b = a.detach().double().nan_to_num(0, 0, 0), b.detach().double().nan_to_num(0, 0, 0)
    return float((a - b).abs().max() / max(1.0, scale, float(b.abs().max()))) if b.numel() else 0.0


def _tau_shape(kind, B, Hq, Tq):
    return {"bhq": (B, Hq, Tq), "h1": (Hq, 1), "0d": (), "b1q": (B, 1, Tq)}[kind]


def _run(B, Hq, Hkv, Tq, Tk, D, Dv, dtype, causal=False, mask=None, tau_shape=None, with_lse=False, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, dtype=dtype, device=DEV, generator=g).requires_grad_()
    k = torch.randn(B, Hkv, Tk, D, dtype=dtype, device=DEV, generator=g).requires_grad_()
    v = torch.randn(B, Hkv, Tk, Dv, dtype=dtype, device=DEV, generator=g).requires_grad_()
    # an fp32 parameter with fp32 / half activations; fp64 for fp64 (dtau comes back in tau's dtype)
    tdt = torch.float64 if dtype == torch.float64 else torch.float32
    tau_shape = (B, Hq, Tq) if tau_shape is None else tuple(tau_shape)  # () is a 0-d tau
    tau = (torch.rand(tau_shape, dtype=tdt, device=DEV, generator=g) + 0.5).requires_grad_()
    out, lse = trajops.temperature_attention(q, k, v, tau, causal=causal, attn_mask=mask, return_lse=True)
    go = torch.randn(out.shape, device=DEV, generator=g).to(dtype)
    gl = torch.randn(lse.shape, device=DEV, generator=g)
    loss = (out.double() * go.double()).sum() + ((lse.nan_to_num(0, 0, 0) * gl).sum() if with_lse else 0)
    grads = torch.autograd.grad(loss, (q, k, v, tau))

    # The reference's tau is one leaf per query row, so that its gradient is dtau per row: summed to
    # tau's shape it is the reference dtau; the root-sum-square of the rows is the scale of that sum.
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    tau_rows = tau.detach().double().expand(B, Hq, Tq).clone().requires_grad_()
    m4 = None if mask is None else (mask[:, None, None, :] if mask.dim() == 2 else mask)
    c = reference.temperature_coefficient(tau_rows, (B, Hq, Tq), 1 / math.sqrt(D), torch.float64,
                                          reference.rows_with_keys(B, Hq, Tq, Tk, m4, causal, DEV))
    r_out, r_lse = reference.temperature_attention(*leaves, c, m4, causal)
    r_loss = (r_out * go.double()).sum() + ((r_lse.nan_to_num(0, 0, 0) * gl.double()).sum() if with_lse else 0)
    *r_grads, r_dtau_rows = torch.autograd.grad(r_loss, [*leaves, tau_rows])
    r_dtau = r_dtau_rows.sum_to_size(tau_shape)
    dtau_rss = float(r_dtau_rows.square().sum_to_size(tau_shape).sqrt().max())
    return (out, lse, *grads), (r_out, r_lse, *r_grads, r_dtau), dtau_rss


def _mask(kind, B, Hq, Tq, Tk, seed=3):
    """The mask of a case, as passed to the op (None, (B, Tk), (B, 1, 1, Tk), (B, Hq, Tq, Tk) or
    (1, 1, Tq, Tk)). "rand" and "qk" hold some fully masked query rows, "pad-empty" a sequence whose
    every key is padded."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    if kind is None:
        return None
    if kind in ("pad", "pad-empty"):  # (B, Tk) key padding, passed 2-D
        m = torch.ones(B, Tk, dtype=torch.bool, device=DEV)
        m[-1, Tk - Tk // 3:] = False  # right padding of the last sequence
        if kind == "pad-empty":
            assert B >= 2
            m[0] = False  # a sequence with every key padded: its rows are empty
        return m
    if kind == "pad4":  # (B, 1, 1, Tk): sequence b keeps its first Tk - b * Tk // 4 keys (at least one)
        m = torch.ones(B, 1, 1, Tk, dtype=torch.bool, device=DEV)
        for b in range(B):
            m[b, ..., max(1, Tk - b * Tk // 4):] = False
        return m
    if kind == "rand":  # (B, Hq, Tq, Tk), 70% attend
        m = torch.rand(B, Hq, Tq, Tk, device=DEV, generator=g) > 0.3
        m[0, 0, ::3] = False  # every third query row of one head: fully masked
        m[-1, -1, -1] = False  # the last row of the last head
        return m
    if kind == "qk":  # (Tq, Tk) for every sequence and head, passed as [None, None]
        m = torch.rand(Tq, Tk, device=DEV, generator=g) > 0.5
        m[Tq // 2] = False  # a fully masked query row (in every sequence and head)
        return m[None, None]
    if kind == "qk-dense":  # the original "4d" case: (1, 1, Tq, Tk), half the keys, no empty row
        return torch.rand(1, 1, Tq, Tk, device=DEV, generator=g) > 0.5
    raise ValueError(kind)


# ---------------------------------------------------------------- the coverage matrix
# (dtype, B, Hq, Hkv, Tq, Tk, D, Dv, causal, mask kind, tau kind, with_lse). A covering design: every
# padded head size (16, 32, 64, 128, 256: D 80 and 96 pad to 128, 192 to 256) with fp32, bf16 and
# fp16; each mask kind with each half dtype and fp32, causal and not; GQA 1, 4, 8 (and 2); Tq 1, 7,
# 1024 with Tk != Tq; fp64 in a few small cases (fp64 with a mask takes the reference on a GPU).
_SPECS = [
    # -- the original cases, each in fp32, bf16 and fp16
    *[(dt, 2, 4, 2, 5, 7, 16, 16, False, None, "bhq", False) for dt in (F32, BF16, F16)],  # tiny GQA
    *[(dt, 2, 4, 2, 129, 129, 64, 64, True, None, "bhq", True) for dt in (F32, BF16, F16)],
    *[(dt, 1, 4, 1, 17, 300, 40, 24, True, None, "bhq", True) for dt in (F32, BF16, F16)],  # Tq < Tk
    *[(dt, 2, 8, 2, 1, 257, 128, 128, True, None, "h1", False) for dt in (F32, BF16, F16)],  # decode
    *[(dt, 2, 4, 4, 190, 190, 64, 64, True, "pad-empty", "h1", True) for dt in (F32, BF16, F16)],
    *[(dt, 1, 4, 2, 100, 80, 32, 32, False, "qk-dense", "0d", False) for dt in (F32, BF16, F16)],
    # -- the most common LLM configuration (D=128 bf16, (B, Tk) padding, causal, GQA 4, T=1024; it
    #    used to fail with OutOfResources: shared memory), and its fp16 / fp32 siblings
    (BF16, 2, 8, 2, 1024, 1024, 128, 128, True, "pad", "bhq", False),
    (F16, 2, 8, 2, 1024, 1024, 128, 128, True, "pad-empty", "bhq", True),
    (F32, 2, 8, 2, 1024, 1024, 128, 128, True, "pad4", "h1", False),
    # -- other long ones
    (BF16, 1, 4, 4, 1024, 1024, 64, 64, False, None, "0d", False),
    (BF16, 1, 2, 2, 1024, 1024, 256, 256, True, None, "bhq", True),
    (F32, 1, 4, 1, 1024, 1280, 64, 64, False, "rand", "bhq", True),
    (BF16, 1, 8, 1, 1024, 1024, 128, 128, True, "rand", "h1", False),  # a mask tile with D=128 tiles
    (F16, 1, 4, 1, 1024, 1024, 192, 192, False, "qk", "bhq", False),
    # -- decode (Tq = 1)
    (BF16, 2, 8, 1, 1, 1000, 64, 64, False, "pad-empty", "h1", False),
    (F16, 2, 4, 1, 1, 300, 256, 256, True, "pad4", "bhq", True),
    (F32, 2, 4, 4, 1, 77, 96, 96, False, None, "0d", False),
    (F64, 2, 4, 1, 1, 50, 32, 32, False, "pad", "bhq", True),
    (F64, 2, 4, 4, 1, 40, 80, 80, True, None, "h1", False),
    (BF16, 1, 8, 8, 1, 513, 192, 192, True, "rand", "bhq", False),  # (B, Hq, 1, Tk): one empty row
    # -- Tq = 7
    (BF16, 2, 4, 1, 7, 7, 80, 40, True, "rand", "b1q", True),
    (F16, 1, 4, 4, 7, 33, 80, 80, False, "qk", "bhq", False),
    (F32, 2, 8, 1, 7, 7, 128, 64, True, "pad4", "h1", False),
    (BF16, 2, 4, 4, 7, 3, 96, 96, True, None, "bhq", True),  # causal with Tq > Tk: rows 0-3 are empty
    (F16, 2, 4, 1, 7, 100, 16, 16, True, "pad-empty", "bhq", False),
    (F64, 1, 4, 1, 7, 19, 64, 64, False, None, "0d", True),
    (F64, 2, 8, 1, 7, 7, 16, 16, True, "rand", "bhq", True),
    # -- middle lengths
    (BF16, 2, 4, 1, 200, 333, 128, 64, True, "pad", "bhq", True),
    (F32, 1, 4, 4, 65, 65, 80, 40, True, "rand", "bhq", False),
    (F16, 2, 8, 1, 100, 150, 96, 96, True, "pad", "h1", False),
    (F32, 2, 4, 1, 64, 100, 192, 192, False, "pad4", "bhq", True),
    (F32, 1, 2, 2, 33, 47, 256, 256, True, "qk", "bhq", True),
    (BF16, 2, 8, 1, 257, 257, 32, 32, True, "pad4", "h1", False),
    (F16, 2, 8, 8, 96, 96, 16, 16, False, "rand", "bhq", True),
    (BF16, 2, 4, 1, 129, 200, 96, 96, True, "qk", "0d", True),
    (F16, 2, 4, 1, 50, 64, 128, 128, False, "rand", "b1q", False),
    (F32, 2, 8, 2, 31, 31, 16, 16, False, "pad", "0d", True),
]


def _id(dt, B, Hq, Hkv, Tq, Tk, D, Dv, causal, mask, tau, lse):
    head = f"D{D}" + (f"-Dv{Dv}" if Dv != D else "")
    return "-".join([DTYPE_NAMES[dt], head, f"B{B}H{Hq}g{Hq // Hkv}", f"T{Tq}x{Tk}",
                     "causal" if causal else "full", mask or "nomask", f"tau_{tau}"] + (["lse"] if lse else []))


CASES = [pytest.param(*s, id=_id(*s)) for s in _SPECS]
assert len({p.id for p in CASES}) == len(CASES), "duplicate case ids"


@pytest.mark.parametrize("dtype,B,Hq,Hkv,Tq,Tk,D,Dv,causal,mask_kind,tau_kind,with_lse", CASES)
def test_against_fp64_reference(dtype, B, Hq, Hkv, Tq, Tk, D, Dv, causal, mask_kind, tau_kind, with_lse):
    mask = _mask(mask_kind, B, Hq, Tq, Tk)
    got, want, dtau_rss = _run(B, Hq, Hkv, Tq, Tk, D, Dv, dtype, causal, mask, _tau_shape(tau_kind, B, Hq, Tq),
                               with_lse)
    names = ("out", "lse", "dq", "dk", "dv", "dtau")
    # dtau of a broadcast tau (0-d, (Hq, 1), (B, 1, Tq)) sums the per-row dtau of up to B * Hq * Tq
    # rows of either sign, which cancel: the sum can be 100x smaller than the rows' root-sum-square,
    # while the rows' independent rounding errors add up like that root-sum-square. Half dtypes
    # measure that error against it (the error per row is held to TOL by the per-row tau cases);
    # fp32 / fp64 keep the plain scale. Seen on the CPU backend (fp16, 0-d tau, 400 rows: row errors
    # <= 7e-4 of the rows, but 1e-2 of the sum 2.3, rss 26).
    half = dtype in (torch.bfloat16, torch.float16)
    errors = {name: _rel(a, e, dtau_rss if name == "dtau" and half else 1.0) for name, a, e in zip(names, got, want)}
    print("max error / max(1, |ref|) (half dtau: also rss): " + ", ".join(f"{n} {e:.2e}" for n, e in errors.items()))
    assert got[5].shape == _tau_shape(tau_kind, B, Hq, Tq)  # dtau has tau's own shape
    for name, a, e in zip(names, got, want):
        assert a.shape == e.shape and a.device.type == torch.device(DEV).type, name
        assert not bool(a.isnan().any()), name
        assert errors[name] < TOL[dtype], (name, errors[name], TOL[dtype])
    # -inf lse exactly on the rows without an allowed key (and nowhere else)
    assert torch.equal(got[1].isneginf(), want[1].isneginf())
    m4 = None if mask is None else (mask[:, None, None, :] if mask.dim() == 2 else mask)
    has_keys = reference.rows_with_keys(B, Hq, Tq, Tk, m4, causal, DEV)
    if mask_kind in ("pad-empty", "rand", "qk") or (causal and Tq > Tk):
        assert has_keys is not None and not bool(has_keys.all()), "the case should hold empty rows"
    if has_keys is not None:  # empty rows: out 0, lse -inf, dq 0 (never NaN)
        empty = ~has_keys.expand(B, Hq, Tq)
        out, lse, dq = got[0], got[1], got[2]
        assert bool((out[empty] == 0).all()) and bool((lse[empty] == -math.inf).all()) and bool((dq[empty] == 0).all())
    if mask_kind == "pad-empty":  # the fully padded sequence
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
    # Under torch.use_deterministic_algorithms(True) the backward takes the two-kernel path (no
    # atomics): bitwise repeatable. (By default it may accumulate dq with fp32 atomics: see
    # triton_kernels/temperature_attention_bwd.py, TRAJOPS_ATTN_ATOMIC_DQ.)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for _ in range(2):
            out, lse = trajops.temperature_attention(q, k, v, tau, causal=True, return_lse=True)
            runs.append((out, lse, *torch.autograd.grad(out.float().sum(), (q, k, v))))
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    bad = tau.clone()
    bad[0, 1, 40] = 0.0
    out, lse = trajops.temperature_attention(q, k, v, bad, causal=True, return_lse=True)
    assert bool(out[0, 1, 40].isnan().all()) and bool(lse[0, 1, 40].isnan())
    others = torch.ones(70, dtype=torch.bool, device=DEV)
    others[40] = False
    assert torch.equal(out[0, 1, others], runs[0][0][0, 1, others]) and torch.equal(out[0, 0], runs[0][0][0, 0])
