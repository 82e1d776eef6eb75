"""Triton kernels of attention with a per-query temperature (semantics: trajops.reference).

Only ``@triton.jit`` kernels and their host launchers live here. Public launchers:

* :func:`attention_fwd` ``(q, k, v, c, mask, causal) -> (out, lse)``
* :func:`attention_bwd` ``(grad_out, grad_lse, q, k, v, c, mask, causal, out, lse) -> (dq, dk, dv, rowdot)``

q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv), any strides; c (B, Hq, Tq) = scale / tau,
contiguous, in the compute dtype (fp32, fp64 for fp64) and NaN where tau is invalid; mask None or a
bool view expanded to (B, Hq, Tq, Tk) (broadcast dimensions have stride 0, so a key-padding mask is
read as B*Tk bytes); causal is bottom-right: key j is allowed for query i iff j <= i + (Tk - Tq).

Flash-attention design (never a (Tq, Tk) buffer):
  forward  grid (cdiv(Tq, BM), B*Hq): one program streams key blocks through an online softmax in
           base 2 (logits c*log2(e)*q.k); rows without an allowed key keep m = -inf, and shifting by
           0 there keeps every exp2 at 0, so out = 0 and lse = -inf instead of NaN.
  backward delta = rowsum(dO * O) - grad_lse (one small kernel), then
           dk/dv grid (cdiv(Tk, BN), B*Hkv): one program owns a key block and loops over the
             query heads of its group and their query blocks, so GQA needs no atomics and each
             dk/dv element is written once;
           dq    grid (cdiv(Tq, BM), B*Hq): loops over key blocks; its epilogue scales by c and
             writes rowdot = q . dq, from which the host forms dtau = -rowdot / tau.
  Both loops over a causal diagonal are split into whole blocks that need no mask and the few
  blocks that straddle the diagonal or the end of the keys, which test every element.
  Out-of-range query rows are made inert rather than masked: they load q = 0, c = 0 and lse = +inf,
  so their probabilities are exp2(0 - inf) = 0.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["attention_fwd", "attention_bwd"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _row_program(Tq, Hq, G, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """(query block, b * Hq + h, b, h, kv head) of a program on the (cdiv(Tq, BM), B * Hq) grid.

    Under a causal mask the last query blocks do the most work, so they are launched first: the
    short ones then fill the tail of the grid instead of idling.
    """
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.cdiv(Tq, BLOCK_M) - 1 - pid_m
    bh = tl.program_id(1)
    h = bh % Hq
    return pid_m, bh, bh // Hq, h, h // G


@triton.jit
def _key_ranges(pid_m, Tq, Tk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(free, hi) for a query block: keys [0, free) are whole blocks every row may attend (no mask
    needed), keys [free, hi) straddle the causal diagonal or the end of the keys (masked)."""
    if CAUSAL:
        shift = Tk - Tq
        hi = tl.minimum(tl.maximum((pid_m + 1) * BLOCK_M + shift, 0), Tk)
        free = tl.minimum(tl.maximum(pid_m * BLOCK_M + shift + 1, 0), Tk)
    else:
        hi = Tk
        free = Tk
    return (free // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _load_tile(ptr, rows, cols, srow, scol, nrows, ncols):
    """A (rows x cols) tile, zero outside [0, nrows) x [0, ncols)."""
    return tl.load(ptr + rows[:, None] * srow + cols[None, :] * scol,
                   mask=(rows[:, None] < nrows) & (cols[None, :] < ncols), other=0.0)


@triton.jit
def _fwd_block(acc, l_i, m_i, q, c2, K, V, MASK, mrow_ptr, offs_m, start_n, Tq, Tk, shift,
               skn, skd, svn, svd, smn, offs_d, offs_dv, D, Dv,
               CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr,
               BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Tk
    kT = _load_tile(K, offs_d, offs_n, skd, skn, D, Tk)
    v = _load_tile(V, offs_n, offs_dv, svn, svd, Tk, Dv)
    s = tl.dot(q, kT, input_precision=PREC).to(c2.dtype) * c2[:, None]
    if BOUNDS:
        ok = n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + shift)
        s = tl.where(ok, s, float("-inf"))
    if HAS_MASK:
        allowed = tl.load(mrow_ptr + offs_n[None, :] * smn, mask=(offs_m[:, None] < Tq) & n_ok[None, :], other=0) != 0
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new).to(c2.dtype)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(acc.dtype)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(Q, K, V, C, MASK, O, LSE,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                smb, smh, smm, smn, sob, soh, som, sod,
                Hq, G, Tq, Tk, D, Dv,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m, bh, b, h, hk = _row_program(Tq, Hq, G, CAUSAL, BLOCK_M)
    cdt = C.dtype.element_ty
    LOG2E = tl.full([], 1.4426950408889634, cdt)
    LN2 = tl.full([], 0.6931471805599453, cdt)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Tq
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, sqd, Tq, D)
    c2 = tl.load(C + bh * Tq + offs_m, mask=m_ok, other=0.0) * LOG2E
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    mrow_ptr = MASK + b * smb + h * smh + offs_m[:, None] * smm

    m_i = tl.full([BLOCK_M], float("-inf"), cdt)
    l_i = tl.zeros([BLOCK_M], cdt)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], cdt)
    shift = Tk - Tq
    free, hi = _key_ranges(pid_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, free, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, c2, K, V, MASK, mrow_ptr, offs_m, start_n, Tq, Tk, shift,
                                   skn, skd, svn, svd, smn, offs_d, offs_dv, D, Dv,
                                   CAUSAL, False, HAS_MASK, BLOCK_N, PREC)
    for start_n in range(free, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, c2, K, V, MASK, mrow_ptr, offs_m, start_n, Tq, Tk, shift,
                                   skn, skd, svn, svd, smn, offs_d, offs_dv, D, Dv,
                                   CAUSAL, True, HAS_MASK, BLOCK_N, PREC)

    out = acc / tl.where(l_i == 0, 1.0, l_i).to(cdt)[:, None]
    lse = tl.where(l_i == 0, float("-inf"), (m_i + tl.math.log2(tl.where(l_i == 0, 1.0, l_i).to(cdt))) * LN2)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < Dv))
    tl.store(LSE + bh * Tq + offs_m, lse, mask=m_ok)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _delta_kernel(O, DO, DLSE, DELTA, R, Dv, HAS_DLSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta[r] = sum_d dO[r, d] * O[r, d] - grad_lse[r] over the rows r of contiguous (R, Dv) tensors."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
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
def _dkdv_block(dk, dv, k, v, Q, DO, C, LSE, DELTA, mcol_ptr, row0, start_m, offs_n, Tq, Tk, shift,
                sqm, sqd, sdm, sdd, smm, offs_d, offs_dv, D, Dv,
                CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr,
                BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    cdt = dk.dtype
    LOG2E = tl.full([], 1.4426950408889634, cdt)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Tq
    qT = _load_tile(Q, offs_d, offs_m, sqd, sqm, D, Tq)
    do = _load_tile(DO, offs_m, offs_dv, sdm, sdd, Tq, Dv)
    c = tl.load(C + row0 + offs_m, mask=m_ok, other=0.0)
    lse = tl.load(LSE + row0 + offs_m, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse).to(cdt)  # empty rows: every p is 0
    delta = tl.load(DELTA + row0 + offs_m, mask=m_ok, other=0.0)
    sT = tl.dot(k, qT, input_precision=PREC).to(cdt)  # (BLOCK_N, BLOCK_M) logits / c
    pT = tl.math.exp2(sT * (c * LOG2E)[None, :] - (lse * LOG2E)[None, :])
    if BOUNDS:
        if CAUSAL:
            pT = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, pT, 0.0)
    if HAS_MASK:
        allowed = tl.load(mcol_ptr + offs_m[None, :] * smm, mask=m_ok[None, :] & (offs_n[:, None] < Tk), other=0) != 0
        pT = tl.where(allowed, pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC).to(cdt)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC).to(cdt)
    dsT = pT * (dpT - delta[None, :]) * c[None, :]
    dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PREC).to(cdt)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, C, MASK, DO, LSE, DELTA, DK, DV,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 smb, smh, smm, smn, sdb, sdh, sdm, sdd,
                 sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                 Hq, Hkv, G, Tq, Tk, D, Dv,
                 CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // Hkv
    hk = bhk % Hkv
    cdt = C.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Tk
    k = _load_tile(K + b * skb + hk * skh, offs_n, offs_d, skn, skd, Tk, D)
    v = _load_tile(V + b * svb + hk * svh, offs_n, offs_dv, svn, svd, Tk, Dv)
    dk = tl.zeros([BLOCK_N, BLOCK_D], cdt)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], cdt)
    shift = Tk - Tq
    end = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # query rows i see key j iff i >= j - shift: none below lo, all of this block from mid on
        lo = (tl.maximum(pid_n * BLOCK_N - shift, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
        lo = tl.minimum(lo, end)
        mid = tl.minimum(tl.maximum(mid, lo), end)
    else:
        lo = 0
        mid = 0
    for g in range(0, G):
        h = hk * G + g
        Qh = Q + b * sqb + h * sqh
        DOh = DO + b * sdb + h * sdh
        row0 = (b * Hq + h) * Tq
        mcol_ptr = MASK + b * smb + h * smh + offs_n[:, None] * smn
        for start_m in range(lo, mid, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, Qh, DOh, C, LSE, DELTA, mcol_ptr, row0, start_m, offs_n, Tq, Tk,
                                 shift, sqm, sqd, sdm, sdd, smm, offs_d, offs_dv, D, Dv,
                                 CAUSAL, True, HAS_MASK, BLOCK_M, PREC)
        for start_m in range(mid, end, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, Qh, DOh, C, LSE, DELTA, mcol_ptr, row0, start_m, offs_n, Tq, Tk,
                                 shift, sqm, sqd, sdm, sdd, smm, offs_d, offs_dv, D, Dv,
                                 CAUSAL, False, HAS_MASK, BLOCK_M, PREC)
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < Dv))


@triton.jit
def _dq_block(dq, q, do, c2, lse2, delta, K, V, mrow_ptr, offs_m, start_n, Tq, Tk, shift,
              skn, skd, svn, svd, smn, offs_d, offs_dv, D, Dv,
              CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr,
              BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Tk
    kT = _load_tile(K, offs_d, offs_n, skd, skn, D, Tk)
    vT = _load_tile(V, offs_dv, offs_n, svd, svn, Dv, Tk)
    s = tl.dot(q, kT, input_precision=PREC).to(dq.dtype)
    p = tl.math.exp2(s * c2[:, None] - lse2[:, None])
    if BOUNDS:
        ok = n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + shift)
        p = tl.where(ok, p, 0.0)
    if HAS_MASK:
        allowed = tl.load(mrow_ptr + offs_n[None, :] * smn, mask=(offs_m[:, None] < Tq) & n_ok[None, :], other=0) != 0
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, vT, input_precision=PREC).to(dq.dtype)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PREC).to(dq.dtype)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, C, MASK, DO, LSE, DELTA, DQ, ROWDOT,
               sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
               smb, smh, smm, smn, sdb, sdh, sdm, sdd, sdqb, sdqh, sdqm, sdqd,
               Hq, G, Tq, Tk, D, Dv,
               CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m, bh, b, h, hk = _row_program(Tq, Hq, G, CAUSAL, BLOCK_M)
    cdt = C.dtype.element_ty
    LOG2E = tl.full([], 1.4426950408889634, cdt)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Tq
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqm, sqd, Tq, D)
    do = _load_tile(DO + b * sdb + h * sdh, offs_m, offs_dv, sdm, sdd, Tq, Dv)
    c = tl.load(C + bh * Tq + offs_m, mask=m_ok, other=0.0)
    lse = tl.load(LSE + bh * Tq + offs_m, mask=m_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse).to(cdt) * LOG2E
    delta = tl.load(DELTA + bh * Tq + offs_m, mask=m_ok, other=0.0)
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    mrow_ptr = MASK + b * smb + h * smh + offs_m[:, None] * smm
    dq = tl.zeros([BLOCK_M, BLOCK_D], cdt)
    c2 = c * LOG2E
    shift = Tk - Tq
    free, hi = _key_ranges(pid_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, free, BLOCK_N):
        dq = _dq_block(dq, q, do, c2, lse2, delta, K, V, mrow_ptr, offs_m, start_n, Tq, Tk, shift,
                       skn, skd, svn, svd, smn, offs_d, offs_dv, D, Dv, CAUSAL, False, HAS_MASK, BLOCK_N, PREC)
    for start_n in range(free, hi, BLOCK_N):
        dq = _dq_block(dq, q, do, c2, lse2, delta, K, V, mrow_ptr, offs_m, start_n, Tq, Tk, shift,
                       skn, skd, svn, svd, smn, offs_d, offs_dv, D, Dv, CAUSAL, True, HAS_MASK, BLOCK_N, PREC)
    dq = dq * c[:, None]
    rowdot = tl.sum(q.to(cdt) * dq, 1)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < D))
    tl.store(ROWDOT + bh * Tq + offs_m, rowdot, mask=m_ok)


# --------------------------------------------------------------------------------------------
# launch configurations
# --------------------------------------------------------------------------------------------


TILE_OVERRIDES: dict = {}  # kind -> tile dict; for tuning sweeps (bench), not for users


# Fixed tiles per (element size, head size), no autotuning: each distinct autotune key would compile
# every candidate (seconds each) on first use, and these sizes are the usual flash-attention
# choices for sm80/sm90, picked by a sweep on an H100. Wider elements
# get smaller tiles to fit shared memory; short query blocks (decoding) use 16-row tiles.
def _tiles(kind: str, esize: int, d: int, tq: int) -> dict:
    if kind in TILE_OVERRIDES:
        return dict(TILE_OVERRIDES[kind])
    if _INTERPRET:  # numpy emulation: small tiles keep the interpreter fast
        return dict(BLOCK_M=16, BLOCK_N=16)
    if esize == 8:
        return dict(BLOCK_M=16 if tq <= 16 else 32, BLOCK_N=32, num_warps=4, num_stages=1)
    if esize == 4:
        bm = {"fwd": 64, "dkdv": 32, "dq": 64}[kind]
        return dict(BLOCK_M=16 if tq <= 16 and kind == "fwd" else bm, BLOCK_N=32 if kind != "dkdv" else 64,
                    num_warps=4, num_stages=2)
    big = d > 64  # tiles measured on an H100 (B=4, H=16, T=4096, bf16, causal; see bench/)
    if kind == "fwd":
        if tq <= 16:
            return dict(BLOCK_M=16, BLOCK_N=128 if d <= 64 else 64, num_warps=4, num_stages=3)
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3) if big else \
            dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if kind == "dkdv":
        return dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3) if big else \
            dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3) if big else \
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep full fp32 products (as the reference and SDPA do), not TF32.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _mask_args(mask: Optional[torch.Tensor], like: torch.Tensor):
    if mask is None:
        return like, (0, 0, 0, 0)  # never read: HAS_MASK is False
    m8 = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return m8, tuple(m8.stride())


def attention_fwd(q, k, v, c, mask, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    B, Hq, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty((B, Hq, Tq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Tq), dtype=c.dtype, device=q.device)
    if B * Hq * Tq == 0:
        return out, lse
    if Tk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    m8, ms = _mask_args(mask, q)
    t = _tiles("fwd", q.element_size(), D, Tq)
    grid = (triton.cdiv(Tq, t["BLOCK_M"]), B * Hq)
    _fwd_kernel[grid](q, k, v, c, m8, out, lse, *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
                      Hq, Hq // Hkv, Tq, Tk, D, Dv,
                      CAUSAL=bool(causal), HAS_MASK=mask is not None, PREC=_precision(q.dtype),
                      BLOCK_D=_block(D), BLOCK_DV=_block(Dv), **t)
    return out, lse


def attention_bwd(grad_out, grad_lse, q, k, v, c, mask, causal: bool, out, lse):
    B, Hq, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    rowdot = torch.zeros((B, Hq, Tq), dtype=c.dtype, device=q.device)
    if B * Hq * Tq == 0 or Tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), rowdot
    grad_out = grad_out.contiguous()
    out = out.contiguous()
    delta = torch.empty((B, Hq, Tq), dtype=c.dtype, device=q.device)
    R = B * Hq * Tq
    dlse = grad_lse.contiguous() if grad_lse is not None else delta
    block_r = 16 if _INTERPRET else 64
    _delta_kernel[(triton.cdiv(R, block_r),)](out, grad_out, dlse, delta, R, Dv, HAS_DLSE=grad_lse is not None,
                                             BLOCK_R=block_r, BLOCK_DV=_block(Dv))
    m8, ms = _mask_args(mask, q)
    flags = dict(CAUSAL=bool(causal), HAS_MASK=mask is not None, PREC=_precision(q.dtype),
                 BLOCK_D=_block(D), BLOCK_DV=_block(Dv))
    t = _tiles("dkdv", q.element_size(), D, Tq)
    _dkdv_kernel[(triton.cdiv(Tk, t["BLOCK_N"]), B * Hkv)](
        q, k, v, c, m8, grad_out, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *ms, *grad_out.stride(), *dk.stride(), *dv.stride(),
        Hq, Hkv, Hq // Hkv, Tq, Tk, D, Dv, **flags, **t)
    t = _tiles("dq", q.element_size(), D, Tq)
    _dq_kernel[(triton.cdiv(Tq, t["BLOCK_M"]), B * Hq)](
        q, k, v, c, m8, grad_out, lse, delta, dq, rowdot,
        *q.stride(), *k.stride(), *v.stride(), *ms, *grad_out.stride(), *dq.stride(),
        Hq, Hq // Hkv, Tq, Tk, D, Dv, **flags, **t)
    return dq, dk, dv, rowdot
