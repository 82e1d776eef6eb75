"""Backward kernels of attention with a per-query temperature (the design is in
temperature_attention.py's docstring, which also holds the shared helpers and the tile planner).

* :func:`attention_bwd` ``(grad_out, grad_lse, q, k, v, tau, scale, mask, causal, out, lse) -> (dq, dk, dv, dtau_rows)``

Launches 3: delta = rowsum(dO * O) - grad_lse; dk/dv (a program per key block, looping over the
query heads of its GQA group and their query blocks: no atomics, every dk/dv element written once);
dq (a program per query block, looping over key blocks; its epilogue writes dtau per row). QK^T is
recomputed in both: 7 tensor-core products per block pair against the 5 of an atomic-dq design,
the price of a deterministic backward.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, device_spec, launch
from .temperature_attention import (_allowed, _block, _candidates, _coefficient, _key_ranges, _mask_args,
                                    _precision, _query_block, _scale_pair, _tile, _what)

__all__ = ["attention_bwd", "use_atomic_dq"]

# dq through fp32 atomics inside the dk/dv kernel (5 tensor-core products per block pair instead of 7,
# not bitwise repeatable): "1" on, "0" off, "auto" on unless torch.use_deterministic_algorithms(True).
# Off until a GPU sweep shows it faster (bench/sweep_attention.py).
ATOMIC_DQ = os.environ.get("TRAJOPS_ATTN_ATOMIC_DQ", "0")


def use_atomic_dq(q: torch.Tensor) -> bool:
    if ATOMIC_DQ == "0" or q.dtype == torch.float64:  # fp64 (gradcheck) keeps the exact two-kernel path
        return False
    return ATOMIC_DQ == "1" or not torch.are_deterministic_algorithms_enabled()


@triton.jit
def _delta_kernel(O, DO, DLSE, DELTA, R, Dv, HAS_DLSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta[r] = sum_d dO[r, d] * O[r, d] - grad_lse[r] over the rows r of contiguous (R, Dv) tensors."""
    offs_r = tl.cast(tl.program_id(0), tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_DV)
    ok = (offs_r[:, None] < R) & (offs_d[None, :] < Dv)
    cdt = DELTA.dtype.element_ty
    o = tl.load(O + offs_r[:, None] * Dv + offs_d[None, :], mask=ok, other=0.0).to(cdt)
    do = tl.load(DO + offs_r[:, None] * Dv + offs_d[None, :], mask=ok, other=0.0).to(cdt)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + offs_r, mask=offs_r < R, other=0.0).to(cdt)
    tl.store(DELTA + offs_r, delta, mask=offs_r < R)


@triton.jit
def _row_stats(TAUh, LSE, DELTA, row0, offs_m, Tq, stm, scale_hi, scale_lo, cdt: tl.constexpr):
    """(c, lse, delta) of query rows for the backward: c = 0 and lse = +inf on rows without a key
    (lse = -inf) and past Tq, so that their probabilities are exp2(-inf) = 0 and c cannot turn a
    zero gradient into NaN."""
    m_ok = offs_m < Tq
    c = _coefficient(TAUh, offs_m, Tq, stm, scale_hi, scale_lo, cdt)
    lse = tl.load(LSE + row0 + offs_m, mask=m_ok, other=float("-inf"))
    empty = lse == float("-inf")
    c = tl.where(empty, 0.0, c)
    lse = tl.where(empty, float("inf"), lse).to(cdt)
    delta = tl.load(DELTA + row0 + offs_m, mask=m_ok, other=0.0)
    return c, lse, delta


@triton.jit
def _dkdv_block(dk, dv, kT, vT, Qh, DOh, TAUh, LSE, DELTA, Mh, DQACC, kmask, row0, start_m, rows, cols, offs_n,
                Tq, Tk, shift, sqm, sqd, sdm, sdd, stm, smm, smn, dcols, dvcols, D, Dv, scale_hi, scale_lo,
                CAUSAL: tl.constexpr, DIAG: tl.constexpr, MASK_KIND: tl.constexpr, EVEN_D: tl.constexpr,
                EVEN_DV: tl.constexpr, PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    # Scores in (query, key) orientation with the resident kT, vT as the right-hand operands: on
    # sm_90 they then stay in shared memory instead of registers (k, v as left operands made every
    # dk/dv tile spill).
    cdt = dk.dtype
    offs_m = start_m + rows
    m64 = tl.cast(start_m, tl.int64)
    q = _tile(Qh + m64 * sqm, rows, dcols, sqm, sqd, Tq - start_m, D, True, not EVEN_D)
    do = _tile(DOh + m64 * sdm, rows, dvcols, sdm, sdd, Tq - start_m, Dv, True, not EVEN_DV)
    c, lse, delta = _row_stats(TAUh, LSE, DELTA, row0, offs_m, Tq, stm, scale_hi, scale_lo, cdt)
    s = tl.dot(q, kT, input_precision=PREC).to(cdt)  # (BLOCK_M, BLOCK_N) logits / c
    p = tl.math.exp2(s * (c * 1.4426950408889634)[:, None] - (lse * 1.4426950408889634)[:, None])
    if CAUSAL:
        if DIAG:  # rows of this block straddle the diagonal
            p = tl.where(offs_n[None, :] <= offs_m[:, None] + shift, p, 0.0)
    if MASK_KIND == 1:
        p = tl.where(kmask[None, :], p, 0.0)
    if MASK_KIND == 2:
        mt = tl.load(Mh + m64 * smm + rows[:, None] * smm + cols[None, :] * smn,
                     mask=(offs_m[:, None] < Tq) & (offs_n[None, :] < Tk), other=0)
        p = tl.where(mt != 0, p, 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PREC, out_dtype=dv.dtype)
    dp = tl.dot(do, vT, input_precision=PREC).to(cdt)
    ds = p * (dp - delta[:, None]) * c[:, None]
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PREC, out_dtype=dk.dtype)
    if ATOMIC_DQ:  # dq += ds k (c included) into an fp32 (rows, D) buffer: 5 products per block, not 7
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PREC, out_dtype=dk.dtype)
        tl.atomic_add(DQACC + (row0 + offs_m)[:, None] * D + dcols[None, :], dq,
                      mask=(offs_m[:, None] < Tq) & (dcols[None, :] < D), sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, TAU, MASK, DO, LSE, DELTA, DK, DV, DQACC,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 stb, sth, stm, smb, smh, smm, smn, sdb, sdh, sdm, sdd,
                 sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                 scale_hi, scale_lo, Hq, Hkv, G, Tq, Tk, D, Dv,
                 CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                 EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b64 = tl.cast(bhk // Hkv, tl.int64)
    hk = bhk % Hkv
    cdt = LSE.dtype.element_ty
    start_n = pid_n * BLOCK_N
    n64 = tl.cast(start_n, tl.int64)
    cols = tl.arange(0, BLOCK_N)
    offs_n = start_n + cols
    rows = tl.arange(0, BLOCK_M)
    dcols = tl.arange(0, BLOCK_D)
    dvcols = tl.arange(0, BLOCK_DV)
    kT = _tile(K + b64 * skb + tl.cast(hk, tl.int64) * skh + n64 * skn, dcols, cols, skd, skn, D, Tk - start_n,
               not EVEN_D, True)
    vT = _tile(V + b64 * svb + tl.cast(hk, tl.int64) * svh + n64 * svn, dvcols, cols, svd, svn, Dv, Tk - start_n,
               not EVEN_DV, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], cdt)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], cdt)
    shift = Tk - Tq
    end = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # query rows i see key j iff i >= j - shift: none below lo, all of this block from mid on
        lo = (tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
        lo = tl.minimum(lo, end)
        mid = tl.minimum(tl.maximum(mid, lo), end)
    else:
        lo = 0
        mid = 0
    for g in range(0, G):
        h64 = tl.cast(hk * G + g, tl.int64)
        Qh = Q + b64 * sqb + h64 * sqh
        DOh = DO + b64 * sdb + h64 * sdh
        TAUh = TAU + b64 * stb + h64 * sth
        row0 = (b64 * Hq + h64) * Tq
        Mh = MASK + b64 * smb + h64 * smh + n64 * smn
        kmask = offs_n < Tk
        if MASK_KIND == 1:  # key padding: one vector for every query block of this head
            kmask = kmask & (tl.load(Mh + cols * smn, mask=offs_n < Tk, other=0) != 0)
        for start_m in range(lo, mid, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, kT, vT, Qh, DOh, TAUh, LSE, DELTA, Mh, DQACC, kmask, row0, start_m, rows, cols,
                                 offs_n,
                                 Tq, Tk, shift, sqm, sqd, sdm, sdd, stm, smm, smn, dcols, dvcols, D, Dv,
                                 scale_hi, scale_lo, CAUSAL, True, MASK_KIND, EVEN_D, EVEN_DV, PREC, ATOMIC_DQ)
        for start_m in range(mid, end, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, kT, vT, Qh, DOh, TAUh, LSE, DELTA, Mh, DQACC, kmask, row0, start_m, rows, cols,
                                 offs_n,
                                 Tq, Tk, shift, sqm, sqd, sdm, sdd, stm, smm, smn, dcols, dvcols, D, Dv,
                                 scale_hi, scale_lo, CAUSAL, False, MASK_KIND, EVEN_D, EVEN_DV, PREC, ATOMIC_DQ)
    n_ok = offs_n < Tk
    tl.store(DK + b64 * sdkb + tl.cast(hk, tl.int64) * sdkh + n64 * sdkn + cols[:, None] * sdkn + dcols[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (dcols[None, :] < D))
    tl.store(DV + b64 * sdvb + tl.cast(hk, tl.int64) * sdvh + n64 * sdvn + cols[:, None] * sdvn + dvcols[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & (dvcols[None, :] < Dv))


@triton.jit
def _dq_block(dq, q, do, c2, lse2, delta, Kh, Vh, Mrow, rows, offs_m, start_n, Tq, Tk, shift,
              skn, skd, svn, svd, smm, smn, dcols, dvcols, D, Dv,
              CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, MASK_KIND: tl.constexpr, EVEN_D: tl.constexpr,
              EVEN_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    offs_n = start_n + cols
    n64 = tl.cast(start_n, tl.int64)
    kT = _tile(Kh + n64 * skn, dcols, cols, skd, skn, D, Tk - start_n, not EVEN_D, BOUNDS)
    vT = _tile(Vh + n64 * svn, dvcols, cols, svd, svn, Dv, Tk - start_n, not EVEN_DV, BOUNDS)
    s = tl.dot(q, kT, input_precision=PREC).to(dq.dtype)
    p = tl.math.exp2(s * c2[:, None] - lse2[:, None])
    if BOUNDS or MASK_KIND != 0:
        ok = _allowed(Mrow + n64 * smn, rows, cols, offs_m, offs_n, Tq, Tk, shift, smm, smn,
                      CAUSAL, BOUNDS, MASK_KIND, BLOCK_M, BLOCK_N)
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, vT, input_precision=PREC).to(dq.dtype)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC, out_dtype=dq.dtype)


@triton.jit
def _dq_kernel(Q, K, V, TAU, MASK, DO, LSE, DELTA, DQ, DTAU,
               sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
               stb, sth, stm, smb, smh, smm, smn, sdb, sdh, sdm, sdd, sdqb, sdqh, sdqm, sdqd,
               scale_hi, scale_lo, Hq, G, Tq, Tk, D, Dv,
               CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PREC: tl.constexpr,
               EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m, bh, b64, h64, hk64, start_m, m64, rows, offs_m, dcols, dvcols, q = _query_block(
        Q, sqb, sqh, sqm, sqd, Tq, Hq, G, D, CAUSAL, EVEN_D, BLOCK_M, BLOCK_D, BLOCK_DV)
    cdt = LSE.dtype.element_ty
    do = _tile(DO + b64 * sdb + h64 * sdh + m64 * sdm, rows, dvcols, sdm, sdd, Tq - start_m, Dv, True, not EVEN_DV)
    row0 = tl.cast(bh, tl.int64) * Tq
    c, lse, delta = _row_stats(TAU + b64 * stb + h64 * sth, LSE, DELTA, row0, offs_m, Tq, stm, scale_hi, scale_lo,
                               cdt)
    c2 = c * 1.4426950408889634
    lse2 = lse * 1.4426950408889634
    Kh = K + b64 * skb + hk64 * skh
    Vh = V + b64 * svb + hk64 * svh
    Mrow = MASK + b64 * smb + h64 * smh + m64 * smm
    dq = tl.zeros([BLOCK_M, BLOCK_D], cdt)
    shift = Tk - Tq
    free, hi = _key_ranges(pid_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, free, BLOCK_N):
        dq = _dq_block(dq, q, do, c2, lse2, delta, Kh, Vh, Mrow, rows, offs_m, start_n, Tq, Tk, shift,
                       skn, skd, svn, svd, smm, smn, dcols, dvcols, D, Dv,
                       CAUSAL, False, MASK_KIND, EVEN_D, EVEN_DV, BLOCK_M, BLOCK_N, PREC)
    for start_n in range(free, hi, BLOCK_N):
        dq = _dq_block(dq, q, do, c2, lse2, delta, Kh, Vh, Mrow, rows, offs_m, start_n, Tq, Tk, shift,
                       skn, skd, svn, svd, smm, smn, dcols, dvcols, D, Dv,
                       CAUSAL, True, MASK_KIND, EVEN_D, EVEN_DV, BLOCK_M, BLOCK_N, PREC)
    dq = dq * c[:, None]
    scale = tl.zeros_like(c) + scale_hi + scale_lo
    # dtau = -(q . dq) / tau = -(q . dq) * c / scale; rows without a key have c = 0 here
    dtau = -tl.sum(q.to(cdt) * dq, 1) * (c / scale)
    m_ok = offs_m < Tq
    tl.store(DQ + b64 * sdqb + h64 * sdqh + m64 * sdqm + rows[:, None] * sdqm + dcols[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (dcols[None, :] < D))
    tl.store(DTAU + row0 + offs_m, dtau, mask=m_ok)



@triton.jit
def _dq_finalize_kernel(Q, DQACC, TAU, LSE, DQ, DTAU, sqb, sqh, sqm, sqd, stb, sth, stm, sdqb, sdqh, sdqm, sdqd,
                        scale_hi, scale_lo, Hq, Tq, R, D,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq (q's dtype) from the fp32 atomic accumulator, and dtau per row = -(q . dq) * c / scale
    (0 on rows without a key): one pass over q and the accumulator."""
    offs_r = tl.cast(tl.program_id(0), tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    dcols = tl.arange(0, BLOCK_D)
    r_ok = offs_r < R
    ok = r_ok[:, None] & (dcols[None, :] < D)
    t = offs_r % Tq
    bh = offs_r // Tq
    b, h = bh // Hq, bh % Hq
    cdt = LSE.dtype.element_ty
    q = tl.load(Q + (b * sqb + h * sqh + t * sqm)[:, None] + dcols[None, :] * sqd, mask=ok, other=0.0).to(cdt)
    dq = tl.load(DQACC + offs_r[:, None] * D + dcols[None, :], mask=ok, other=0.0).to(cdt)
    tau = tl.load(TAU + b * stb + h * sth + t * stm, mask=r_ok, other=1.0).to(cdt)
    scale = tl.zeros_like(tau) + scale_hi + scale_lo
    c = tl.where((tau > 0) & (tau < float("inf")), scale / tau, float("nan"))
    lse = tl.load(LSE + offs_r, mask=r_ok, other=0.0)
    c = tl.where(lse == float("-inf"), 0.0, c)
    tl.store(DQ + (b * sdqb + h * sdqh + t * sdqm)[:, None] + dcols[None, :] * sdqd, dq.to(DQ.dtype.element_ty), mask=ok)
    tl.store(DTAU + offs_r, -tl.sum(q * dq, 1) * (c / scale), mask=r_ok)


def attention_bwd(grad_out, grad_lse, q, k, v, tau, scale: float, mask, causal: bool, out, lse):
    """(dq, dk, dv) in the inputs' shapes and dtypes (contiguous) and dtau per query row (B, Hq, Tq) in
    the compute dtype, to be summed to tau's shape by the caller."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    dtau = torch.empty((B, Hq, Tq), dtype=lse.dtype, device=q.device)
    if B * Hq * Tq == 0 or Tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dtau.zero_()
    tau = tau.expand(B, Hq, Tq)
    grad_out = grad_out.contiguous()
    out = out.contiguous()
    lse = lse.contiguous()
    delta = torch.empty((B, Hq, Tq), dtype=lse.dtype, device=q.device)
    R = B * Hq * Tq
    dlse = grad_lse.contiguous() if grad_lse is not None else delta
    bd, bdv = _block(D), _block(Dv)
    block_r = 16 if INTERPRET else max(16, min(64, 8192 // bdv))  # (BLOCK_R, Dv) fp32 tiles: 64 regs/thread
    _delta_kernel[(triton.cdiv(R, block_r),)](out, grad_out, dlse, delta, R, Dv, HAS_DLSE=grad_lse is not None,
                                             BLOCK_R=block_r, BLOCK_DV=bdv)
    m8, ms, mk = _mask_args(mask, q)
    es = q.element_size()
    what = _what(q, k, v, mk, causal) + " backward"
    flags = dict(CAUSAL=bool(causal), MASK_KIND=mk, PREC=_precision(q.dtype), EVEN_D=D == bd, EVEN_DV=Dv == bdv,
                 BLOCK_D=bd, BLOCK_DV=bdv)
    key = (q.dtype, bd, bdv, mk, bool(causal))
    sp = _scale_pair(scale)
    major = device_spec(q.device).capability[0]
    atomic = use_atomic_dq(q)
    dqacc = torch.zeros((R, D), dtype=torch.float32, device=q.device) if atomic else delta  # never read if not
    launch(_dkdv_kernel, lambda cfg: (triton.cdiv(Tk, cfg["BLOCK_N"]), B * Hkv),
           (q, k, v, tau, m8, grad_out, lse, delta, dk, dv, dqacc,
            *q.stride(), *k.stride(), *v.stride(), *tau.stride(), *ms, *grad_out.stride(), *dk.stride(), *dv.stride(),
            *sp, Hq, Hkv, Hq // Hkv, Tq, Tk, D, Dv),
           _candidates("dkdv", es, bd, bdv, mk, Tq, major), ("dkdv", atomic) + key, q.device, what, ATOMIC_DQ=atomic,
           **flags)
    if atomic:
        block_r = 16 if INTERPRET else 32
        _dq_finalize_kernel[(triton.cdiv(R, block_r),)](
            q, dqacc, tau, lse, dq, dtau, *q.stride(), *tau.stride(), *dq.stride(), *sp, Hq, Tq, R, D,
            BLOCK_R=block_r, BLOCK_D=bd)
        return dq, dk, dv, dtau
    launch(_dq_kernel, lambda cfg: (triton.cdiv(Tq, cfg["BLOCK_M"]), B * Hq),
           (q, k, v, tau, m8, grad_out, lse, delta, dq, dtau,
            *q.stride(), *k.stride(), *v.stride(), *tau.stride(), *ms, *grad_out.stride(), *dq.stride(),
            *sp, Hq, Hq // Hkv, Tq, Tk, D, Dv),
           _candidates("dq", es, bd, bdv, mk, Tq, major), ("dq",) + key, q.device, what, **flags)
    return dq, dk, dv, dtau
