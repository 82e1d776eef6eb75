"""Triton kernels of attention with a per-query temperature (semantics: trajops.reference).

Only ``@triton.jit`` kernels and their host launchers live here. Public launchers:

* :func:`attention_fwd` ``(q, k, v, tau, scale, mask, causal) -> (out, lse)``
* :func:`attention_bwd` ``(grad_out, grad_lse, q, k, v, tau, scale, mask, causal, out, lse) -> (dq, dk, dv, dtau_rows)``

q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv), any strides; tau any float dtype, a view
expanded to (B, Hq, Tq) (broadcast dimensions have stride 0) that the kernels read to form
c = scale / tau in the compute dtype (fp32, fp64 for fp64), NaN where tau is not positive finite;
mask None or a bool view expanded to (B, Hq, Tq, Tk); causal is bottom-right: key j is allowed for
query i iff j <= i + (Tk - Tq). Forming c in the kernels saves ~6 small launches per call.

Flash-attention design (never a (Tq, Tk) buffer):
  forward  grid (cdiv(Tq, BM), B*Hq): one program streams key blocks through an online softmax in
           base 2; the running max is taken on the raw logits (max(s) * c = max(s * c) for c > 0) so
           that every probability is one FMA + exp2; P @ V accumulates into the running output
           inside the tensor-core op. Rows without an allowed key keep m = -inf and give out = 0,
           lse = -inf whatever their c.
  backward delta = rowsum(dO * O) - grad_lse (one small kernel), then
           dk/dv grid (cdiv(Tk, BN), B*Hkv): one program owns a key block and loops over the
             query heads of its group and their query blocks, so GQA needs no atomics and each
             dk/dv element is written once;
           dq    grid (cdiv(Tq, BM), B*Hq): loops over key blocks; its epilogue scales by c and
             writes dtau per query row, -(q . dq) / tau (0 on rows without a key).
  Both loops over a causal diagonal are split into whole blocks that need no mask and the few
  blocks that straddle the diagonal or the end of the keys, which test every element.
  Masks: MASK_KIND 1 is a mask that does not vary along the queries (key padding, (B, Tk) or
  (B, 1, 1, Tk)): it is read as one (BN,) vector per key block, no tile in shared memory;
  MASK_KIND 2 reads a (BM, BN) byte tile per block, which the pipeline keeps in shared memory for
  every stage, so it is counted in the shared-memory estimate of the tiles.
  Base offsets (batch, head, block start) are formed in 64-bit; offsets inside a tile in 32-bit.

Cost (B, Hq = Hkv, T = Tq = Tk, D = Dv, bytes per element e): FLOPs 4*B*H*T^2*D forward (halved
causal), 2.5x that backward (QK^T recomputed in both backward kernels: 3.5x would need atomics).
HBM bytes: forward reads q, k, v once per query block (k, v re-read cdiv(T, BM) times, mostly from
L2) and writes out + lse; compute-bound at T >= 512. Launches: forward 1; backward 3.

Tiles come from :func:`_candidates` (fastest first, each with a shared-memory estimate: pipeline
stages x the streamed tiles, mask tile included, + the resident tiles) through
``_common.launch``, which falls back to the next candidate on OutOfResources and remembers it.
"""
from __future__ import annotations

import struct
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, Config, launch

__all__ = ["attention_fwd", "attention_bwd", "TILE_OVERRIDES"]


@triton.jit
def _row_program(Tq, Hq, G, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """(query block, b * Hq + h, b, h, kv head) of a program on the (cdiv(Tq, BM), B * Hq) grid.
    Under a causal mask the last query blocks do the most work: launched first, so that the short
    ones fill the tail of the grid."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.cdiv(Tq, BLOCK_M) - 1 - pid_m
    bh = tl.program_id(1)
    h = bh % Hq
    return pid_m, bh, bh // Hq, h, h // G


@triton.jit
def _key_ranges(pid_m, Tq, Tk, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(free, hi): keys [0, free) are whole blocks inside [0, Tk) every row of the query block may
    attend (no bounds test), keys [free, hi) straddle the causal diagonal or the end of the keys."""
    if CAUSAL:
        shift = Tk - Tq
        hi = tl.minimum(tl.maximum((pid_m + 1) * BLOCK_M + shift, 0), Tk)
        free = tl.minimum(tl.maximum(pid_m * BLOCK_M + shift + 1, 0), Tk)
    else:
        hi = Tk
        free = Tk
    return (free // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _tile(ptr, rows, cols, srow, scol, nrows, ncols, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr):
    """A (rows x cols) tile at ptr; zero outside [0, nrows) x [0, ncols) where a mask is asked for."""
    ptrs = ptr + rows[:, None] * srow + cols[None, :] * scol
    if ROW_MASK:
        if COL_MASK:
            return tl.load(ptrs, mask=(rows[:, None] < nrows) & (cols[None, :] < ncols), other=0.0)
        return tl.load(ptrs, mask=rows[:, None] < nrows, other=0.0)
    if COL_MASK:
        return tl.load(ptrs, mask=cols[None, :] < ncols, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _coefficient(TAUh, offs_m, Tq, stm, scale_hi, scale_lo, cdt: tl.constexpr):
    """c = scale / tau per query row in cdt; NaN where tau is not positive finite; 0 on rows >= Tq
    (inert padding rows). scale arrives as an fp32 hi + lo pair (float arguments are fp32 on a GPU)."""
    m_ok = offs_m < Tq
    t = tl.load(TAUh + offs_m * stm, mask=m_ok, other=1.0).to(cdt)
    scale = tl.zeros_like(t) + scale_hi + scale_lo  # in cdt: fp64 rows get the fp64 scale
    c = tl.where((t > 0) & (t < float("inf")), scale / t, float("nan"))
    return tl.where(m_ok, c, 0.0)


@triton.jit
def _allowed(Mblk, rows, cols, offs_m, offs_n, Tq, Tk, shift, smm, smn,
             CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, MASK_KIND: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BM, BN) bool: key offs_n allowed for query offs_m. Mblk points at the mask element of the
    block's first (query, key)."""
    ok = tl.full([BLOCK_M, BLOCK_N], 1, tl.int1)
    if BOUNDS:
        ok = ok & (offs_n[None, :] < Tk)
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + shift)
    if MASK_KIND == 1:
        mk = tl.load(Mblk + cols * smn, mask=offs_n < Tk, other=0)
        ok = ok & (mk != 0)[None, :]
    if MASK_KIND == 2:
        mt = tl.load(Mblk + rows[:, None] * smm + cols[None, :] * smn,
                     mask=(offs_m[:, None] < Tq) & (offs_n[None, :] < Tk), other=0)
        ok = ok & (mt != 0)
    return ok


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_block(acc, l_i, m_i, q, c2, Kh, Vh, Mrow, rows, offs_m, start_n, Tq, Tk, shift,
               skn, skd, svn, svd, smm, smn, dcols, dvcols, D, Dv,
               CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, MASK_KIND: tl.constexpr, EVEN_D: tl.constexpr,
               EVEN_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    offs_n = start_n + cols
    n64 = tl.cast(start_n, tl.int64)
    kT = _tile(Kh + n64 * skn, dcols, cols, skd, skn, D, Tk - start_n, not EVEN_D, BOUNDS)
    v = _tile(Vh + n64 * svn, cols, dvcols, svn, svd, Tk - start_n, Dv, BOUNDS, not EVEN_DV)
    s = tl.dot(q, kT, input_precision=PREC).to(c2.dtype)
    if BOUNDS or MASK_KIND != 0:
        ok = _allowed(Mrow + n64 * smn, rows, cols, offs_m, offs_n, Tq, Tk, shift, smm, smn,
                      CAUSAL, BOUNDS, MASK_KIND, BLOCK_M, BLOCK_N)
        s = tl.where(ok, s * c2[:, None], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
    else:  # every key allowed: max(s * c) = max(s) * c (c >= 0), so p is one FMA + exp2
        m_new = tl.maximum(m_i, tl.max(s, 1) * c2)
        m_use = m_new
        p = tl.math.exp2(s * c2[:, None] - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(Q, K, V, TAU, MASK, O, LSE,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                stb, sth, stm, smb, smh, smm, smn, sob, soh, som, sod,
                scale_hi, scale_lo, Hq, G, Tq, Tk, D, Dv,
                CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PREC: tl.constexpr,
                EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m, bh, b, h, hk = _row_program(Tq, Hq, G, CAUSAL, BLOCK_M)
    cdt = LSE.dtype.element_ty
    b64, h64, hk64 = tl.cast(b, tl.int64), tl.cast(h, tl.int64), tl.cast(hk, tl.int64)
    start_m = pid_m * BLOCK_M
    m64 = tl.cast(start_m, tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    dcols = tl.arange(0, BLOCK_D)
    dvcols = tl.arange(0, BLOCK_DV)
    q = _tile(Q + b64 * sqb + h64 * sqh + m64 * sqm, rows, dcols, sqm, sqd, Tq - start_m, D, True, not EVEN_D)
    c2 = _coefficient(TAU + b64 * stb + h64 * sth, offs_m, Tq, stm, scale_hi, scale_lo, cdt) * 1.4426950408889634
    Kh = K + b64 * skb + hk64 * skh
    Vh = V + b64 * svb + hk64 * svh
    Mrow = MASK + b64 * smb + h64 * smh + m64 * smm

    m_i = tl.full([BLOCK_M], float("-inf"), cdt)
    l_i = tl.zeros([BLOCK_M], cdt)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], cdt)
    shift = Tk - Tq
    free, hi = _key_ranges(pid_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in range(0, free, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, c2, Kh, Vh, Mrow, rows, offs_m, start_n, Tq, Tk, shift,
                                   skn, skd, svn, svd, smm, smn, dcols, dvcols, D, Dv,
                                   CAUSAL, False, MASK_KIND, EVEN_D, EVEN_DV, BLOCK_M, BLOCK_N, PREC)
    for start_n in range(free, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, c2, Kh, Vh, Mrow, rows, offs_m, start_n, Tq, Tk, shift,
                                   skn, skd, svn, svd, smm, smn, dcols, dvcols, D, Dv,
                                   CAUSAL, True, MASK_KIND, EVEN_D, EVEN_DV, BLOCK_M, BLOCK_N, PREC)

    empty = l_i == 0
    l_safe = tl.where(empty, 1.0, l_i).to(cdt)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    m_ok = offs_m < Tq
    tl.store(O + b64 * sob + h64 * soh + m64 * som + rows[:, None] * som + dvcols[None, :] * sod,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & (dvcols[None, :] < Dv))
    tl.store(LSE + tl.cast(bh, tl.int64) * Tq + offs_m, lse, mask=m_ok)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


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
def _dkdv_block(dk, dv, kT, vT, Qh, DOh, TAUh, LSE, DELTA, Mh, kmask, row0, start_m, rows, cols, offs_n,
                Tq, Tk, shift, sqm, sqd, sdm, sdd, stm, smm, smn, dcols, dvcols, D, Dv, scale_hi, scale_lo,
                CAUSAL: tl.constexpr, DIAG: tl.constexpr, MASK_KIND: tl.constexpr, EVEN_D: tl.constexpr,
                EVEN_DV: tl.constexpr, PREC: tl.constexpr):
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
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PREC)
    dp = tl.dot(do, vT, input_precision=PREC).to(cdt)
    ds = p * (dp - delta[:, None]) * c[:, None]
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, TAU, MASK, DO, LSE, DELTA, DK, DV,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 stb, sth, stm, smb, smh, smm, smn, sdb, sdh, sdm, sdd,
                 sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                 scale_hi, scale_lo, Hq, Hkv, G, Tq, Tk, D, Dv,
                 CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PREC: tl.constexpr,
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
            dk, dv = _dkdv_block(dk, dv, kT, vT, Qh, DOh, TAUh, LSE, DELTA, Mh, kmask, row0, start_m, rows, cols, offs_n,
                                 Tq, Tk, shift, sqm, sqd, sdm, sdd, stm, smm, smn, dcols, dvcols, D, Dv,
                                 scale_hi, scale_lo, CAUSAL, True, MASK_KIND, EVEN_D, EVEN_DV, PREC)
        for start_m in range(mid, end, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, kT, vT, Qh, DOh, TAUh, LSE, DELTA, Mh, kmask, row0, start_m, rows, cols, offs_n,
                                 Tq, Tk, shift, sqm, sqd, sdm, sdd, stm, smm, smn, dcols, dvcols, D, Dv,
                                 scale_hi, scale_lo, CAUSAL, False, MASK_KIND, EVEN_D, EVEN_DV, PREC)
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
    return tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC)


@triton.jit
def _dq_kernel(Q, K, V, TAU, MASK, DO, LSE, DELTA, DQ, DTAU,
               sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
               stb, sth, stm, smb, smh, smm, smn, sdb, sdh, sdm, sdd, sdqb, sdqh, sdqm, sdqd,
               scale_hi, scale_lo, Hq, G, Tq, Tk, D, Dv,
               CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PREC: tl.constexpr,
               EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m, bh, b, h, hk = _row_program(Tq, Hq, G, CAUSAL, BLOCK_M)
    cdt = LSE.dtype.element_ty
    b64, h64, hk64 = tl.cast(b, tl.int64), tl.cast(h, tl.int64), tl.cast(hk, tl.int64)
    start_m = pid_m * BLOCK_M
    m64 = tl.cast(start_m, tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    dcols = tl.arange(0, BLOCK_D)
    dvcols = tl.arange(0, BLOCK_DV)
    q = _tile(Q + b64 * sqb + h64 * sqh + m64 * sqm, rows, dcols, sqm, sqd, Tq - start_m, D, True, not EVEN_D)
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


# --------------------------------------------------------------------------------------------
# launch configurations
# --------------------------------------------------------------------------------------------


TILE_OVERRIDES: dict = {}  # kind -> list of Config (or one dict of tiles); for tuning sweeps (bench)


def _estimate(kind: str, esize: int, bm: int, bn: int, stages: int, bd: int, bdv: int, mask_kind: int) -> int:
    """Shared memory (bytes) of one program, as the pipeliner lays it out: every stage holds a copy
    of each streamed tile (the mask tile too), plus the resident operand tiles of the tensor-core
    ops. Checked against the compiler by tests/test_triton_resources.py."""
    mtile = bm * bn if mask_kind == 2 else 0
    if kind == "dkdv":  # resident k, v (BN rows); streamed q, dO (BM rows)
        return max(stages, 1) * (bm * (bd + bdv) * esize + mtile) + bn * (bd + bdv) * esize
    resident = bm * bd * esize if kind == "fwd" else bm * (bd + bdv) * esize
    return max(stages, 1) * (bn * (bd + bdv) * esize + mtile) + resident


def _regs(kind: str, esize: int, bm: int, bn: int, warps: int, bd: int, bdv: int) -> int:
    """32-bit registers per thread held by the tiles: fp32 accumulators, resident operands, and the
    (BM, BN) fp32 score/probability tiles (2 forward, 3 backward). See _common.REG_BUDGET."""
    threads = 32 * warps
    if kind == "fwd":
        words = bm * bdv + 2 * bm * bn + bm * bd * esize // 4
    elif kind == "dkdv":
        words = bn * (bd + bdv) + bn * (bd + bdv) * esize // 4 + 3 * bm * bn
    else:
        words = bm * bd + bm * (bd + bdv) * esize // 4 + 3 * bm * bn
    return words // threads


def _preferred(kind: str, esize: int, bd: int, tq: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) measured fastest (H100/H200 sweeps, bench/sweep)."""
    if esize == 8:
        return (16 if tq <= 16 else 32), 32, 4, 1
    if esize == 4:
        bm = {"fwd": 64, "dkdv": 32, "dq": 64}[kind]
        return (16 if tq <= 16 and kind == "fwd" else bm), (64 if kind == "dkdv" else 32), 4, 2
    big = bd > 64
    if kind == "fwd":
        if tq <= 16:
            return 16, (128 if bd <= 64 else 64), 4, 3
        if bd > 128:
            return 64, 64, 4, 2
        return (128, 128, 8, 3) if big else (128, 64, 4, 3)
    if bd > 128:
        return (32, 64, 4, 2) if kind == "dkdv" else (64, 32, 4, 2)
    if kind == "dkdv":  # (64, 128, 8 warps) spills on sm_90: dk, dv, k, v of 128 keys are 192 regs
        return (64, 64, 8, 3) if big else (64, 64, 4, 3)
    return (128, 64, 8, 3) if big else (64, 64, 4, 3)


def _candidates(kind: str, esize: int, bd: int, bdv: int, mask_kind: int, tq: int) -> List[Config]:
    """The preferred tiles, then smaller ones (fewer stages, then a shorter streamed block, then a
    shorter resident block), each with its estimate; launch() takes the first that fits."""
    if kind in TILE_OVERRIDES:
        over = TILE_OVERRIDES[kind]
        return list(over) if isinstance(over, (list, tuple)) else [Config.make(**over)]
    if INTERPRET:  # numpy emulation: small tiles keep the interpreter fast
        return [Config.make(BLOCK_M=16, BLOCK_N=16)]
    bm, bn, warps, stages = _preferred(kind, esize, bd, tq)
    out, seen = [], set()

    def add(m, n, w, s):
        if (m, n, w, s) not in seen:
            seen.add((m, n, w, s))
            out.append(Config.make(_estimate(kind, esize, m, n, s, bd, bdv, mask_kind), w, s,
                                   _regs(kind, esize, m, n, w, bd, bdv), BLOCK_M=m, BLOCK_N=n))

    streamed, resident = ("BLOCK_M", "BLOCK_N") if kind == "dkdv" else ("BLOCK_N", "BLOCK_M")
    dims = {"BLOCK_M": bm, "BLOCK_N": bn}
    while True:
        for s in range(stages, 0, -1):
            add(dims["BLOCK_M"], dims["BLOCK_N"], warps, s)
        if dims[streamed] > 16:
            dims[streamed] //= 2
        elif dims[resident] > 16:
            dims[resident] //= 2
            warps = 4
        else:
            return out


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep full fp32 products (as the reference and SDPA do), not TF32.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _mask_args(mask: Optional[torch.Tensor], like: torch.Tensor):
    """(tensor, strides, kind): kind 0 no mask, 1 constant along the queries (key padding), 2 full."""
    if mask is None:
        return like, (0, 0, 0, 0), 0  # never read
    m8 = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    st = tuple(m8.stride())
    return m8, st, (1 if st[2] == 0 or mask.shape[2] == 1 else 2)


def _scale_pair(scale: float) -> Tuple[float, float]:
    hi = struct.unpack("f", struct.pack("f", scale))[0]
    return hi, scale - hi


def _what(q, k, v, mask_kind: int, causal: bool) -> str:
    return (f"temperature_attention on {q.device} ({str(q.dtype).replace('torch.', '')}, D={q.shape[3]}, "
            f"Dv={v.shape[3]}, mask kind {mask_kind}, causal={bool(causal)})")


def attention_fwd(q, k, v, tau, scale: float, mask, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Tq, Dv) in q's dtype, lse (B, Hq, Tq) in the compute dtype; see the module docstring."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[3]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty((B, Hq, Tq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Tq), dtype=cdt, device=q.device)
    if B * Hq * Tq == 0:
        return out, lse
    if Tk == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    tau = tau.expand(B, Hq, Tq)
    m8, ms, mk = _mask_args(mask, q)
    bd, bdv = _block(D), _block(Dv)
    es = q.element_size()
    launch(_fwd_kernel, lambda cfg: (triton.cdiv(Tq, cfg["BLOCK_M"]), B * Hq),
           (q, k, v, tau, m8, out, lse, *q.stride(), *k.stride(), *v.stride(), *tau.stride(), *ms, *out.stride(),
            *_scale_pair(scale), Hq, Hq // Hkv, Tq, Tk, D, Dv),
           _candidates("fwd", es, bd, bdv, mk, Tq), ("fwd", q.dtype, bd, bdv, mk, bool(causal), Tq <= 16),
           q.device, _what(q, k, v, mk, causal),
           CAUSAL=bool(causal), MASK_KIND=mk, PREC=_precision(q.dtype), EVEN_D=D == bd, EVEN_DV=Dv == bdv,
           BLOCK_D=bd, BLOCK_DV=bdv)
    return out, lse


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
    block_r = 16 if INTERPRET else 64
    bd, bdv = _block(D), _block(Dv)
    _delta_kernel[(triton.cdiv(R, block_r),)](out, grad_out, dlse, delta, R, Dv, HAS_DLSE=grad_lse is not None,
                                             BLOCK_R=block_r, BLOCK_DV=bdv)
    m8, ms, mk = _mask_args(mask, q)
    es = q.element_size()
    what = _what(q, k, v, mk, causal) + " backward"
    flags = dict(CAUSAL=bool(causal), MASK_KIND=mk, PREC=_precision(q.dtype), EVEN_D=D == bd, EVEN_DV=Dv == bdv,
                 BLOCK_D=bd, BLOCK_DV=bdv)
    key = (q.dtype, bd, bdv, mk, bool(causal))
    sp = _scale_pair(scale)
    launch(_dkdv_kernel, lambda cfg: (triton.cdiv(Tk, cfg["BLOCK_N"]), B * Hkv),
           (q, k, v, tau, m8, grad_out, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *tau.stride(), *ms, *grad_out.stride(), *dk.stride(), *dv.stride(),
            *sp, Hq, Hkv, Hq // Hkv, Tq, Tk, D, Dv),
           _candidates("dkdv", es, bd, bdv, mk, Tq), ("dkdv",) + key, q.device, what, **flags)
    launch(_dq_kernel, lambda cfg: (triton.cdiv(Tq, cfg["BLOCK_M"]), B * Hq),
           (q, k, v, tau, m8, grad_out, lse, delta, dq, dtau,
            *q.stride(), *k.stride(), *v.stride(), *tau.stride(), *ms, *grad_out.stride(), *dq.stride(),
            *sp, Hq, Hq // Hkv, Tq, Tk, D, Dv),
           _candidates("dq", es, bd, bdv, mk, Tq), ("dq",) + key, q.device, what, **flags)
    return dq, dk, dv, dtau
