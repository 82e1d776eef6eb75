"""Backward kernels of attention with a per-query temperature (the design is in
temperature_attention.py's docstring, which also holds the shared helpers and the tile planner).

* :func:`attention_bwd` ``(grad_out, grad_lse, q, k, v, tau, scale, mask, causal, out, lse) -> (dq, dk, dv, dtau_rows)``

Launches 8: the key flags (temperature_attention_nonfinite.key_flags: 2), a zeroed head map;
delta = rowsum(dO * O) - grad_lse, which also marks the rows the NaN/Inf rule affects and their
heads (see the forward's docstring); dk/dv (a program per key block, looping over the query heads
of its GQA group and their query blocks: no atomics, every dk/dv element written once); dq (a
program per query block, looping over key blocks; its epilogue writes dtau per row); then dk/dv and
dq again with HOSTILE on small tiles for the heads the fast ones skipped (their other programs
return at once). QK^T is recomputed in both: 7 tensor-core products per block pair against the 5
of an atomic-dq design, the price of a deterministic backward.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, cdiv, device_spec, launch, next_power_of_2
from .temperature_attention import (_allowed, _block, _candidates, _coefficient, _hostile_tiles, _key_ranges,
                                    _mask_args, _precision, _query_block, _scale_pair, _tile, _tile_rows, _what)
from .temperature_attention_nonfinite import _doc_span, _key_bad, _serves, any_hostile, key_flags

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
def _tile_cols(ptr, rows, cols, srow, scol, nrows, col_ok, ROW_MASK: tl.constexpr):
    """A (rows x cols) tile at ptr with only the columns where col_ok is True read (the others 0)."""
    ptrs = ptr + rows[:, None] * srow + cols[None, :] * scol
    if ROW_MASK:
        return tl.load(ptrs, mask=(rows[:, None] < nrows) & col_ok[None, :], other=0.0)
    return tl.load(ptrs, mask=col_ok[None, :], other=0.0)


@triton.jit
def _finite_rows(x):
    """(rows,) bool: the rows of a (rows, cols) tile with no NaN/Inf."""
    return tl.min((tl.abs(x) < float("inf")).to(tl.int32), 1) != 0


@triton.jit
def _delta_kernel(O, DO, DLSE, LSE, Q, DELTA, LSE2, RF, HOST, CU_Q, R, Hq, Hkv, G, Tq, D, Dv, sqb, sqh, sqm, sqd,
                  total_q, HAS_DLSE: tl.constexpr, VARLEN: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Over the rows r of contiguous (R, Dv) O and dO (q through its strides):
    delta[r] = sum_d dO[r, d] * O[r, d] - grad_lse[r], and the NaN/Inf rule's row facts: the rows
    whose gradients are NaN (an allowed key and: the forward made the row NaN, or its dO row or
    grad_lse is not finite) get lse2 = NaN, which turns their probabilities, hence exactly their
    dq, dtau and the dk, dv rows of the keys they may attend, NaN; rf marks the rows whose q and dO
    the other kernels load as 0 (those, and any row whose q or dO holds a NaN/Inf: a zero weight
    would multiply it), and delta is 0 there so that it stays finite; HOST[(batch, kv head)] is set
    where such a row reads that kv head (the HOSTILE launches then serve it).
    VARLEN: rows r = token * Hq + head of packed (total_q, Hq) tensors; grid (cdiv(longest document
    * Hq, BLOCK_R), N): a program covers rows of document program_id(1), whose HOST entry is
    doc * Hkv + kv head."""
    if VARLEN:
        doc = tl.cast(tl.program_id(1), tl.int64)
        q0, Tqd = _doc_span(CU_Q, doc, total_q)
        offs_r = q0 * Hq + tl.cast(tl.program_id(0), tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < (q0 + Tqd) * Hq
    else:
        offs_r = tl.cast(tl.program_id(0), tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = r_ok[:, None] & (offs_dv[None, :] < Dv)
    cdt = DELTA.dtype.element_ty
    o = tl.load(O + offs_r[:, None] * Dv + offs_dv[None, :], mask=ok, other=0.0).to(cdt)
    do = tl.load(DO + offs_r[:, None] * Dv + offs_dv[None, :], mask=ok, other=0.0).to(cdt)
    delta = tl.sum(o * do, 1)
    offs_d = tl.arange(0, BLOCK_D)
    if VARLEN:
        hq = offs_r % Hq
        q = tl.load(Q + (hq * sqh + (offs_r // Hq) * sqm)[:, None] + offs_d[None, :] * sqd,
                    mask=r_ok[:, None] & (offs_d[None, :] < D), other=0.0).to(cdt)
    else:
        bh = offs_r // Tq
        q = tl.load(Q + ((bh // Hq) * sqb + (bh % Hq) * sqh + (offs_r % Tq) * sqm)[:, None] + offs_d[None, :] * sqd,
                    mask=r_ok[:, None] & (offs_d[None, :] < D), other=0.0).to(cdt)
    lse = tl.load(LSE + offs_r, mask=r_ok, other=0.0)
    grads_ok = _finite_rows(do)
    if HAS_DLSE:
        gl = tl.load(DLSE + offs_r, mask=r_ok, other=0.0).to(cdt)
        grads_ok = grads_ok & (tl.abs(gl) < float("inf"))
        delta -= gl
    nan_row = (lse != float("-inf")) & ((lse != lse) | ~grads_ok)
    zero_row = nan_row | ~grads_ok | ~_finite_rows(q)
    tl.store(DELTA + offs_r, tl.where(zero_row, 0.0, delta), mask=r_ok)
    tl.store(LSE2 + offs_r, tl.where(nan_row, float("nan"), lse), mask=r_ok)
    tl.store(RF + offs_r, zero_row.to(tl.uint8), mask=r_ok)
    if VARLEN:
        tl.atomic_max(HOST + doc * Hkv + hq // G, zero_row.to(tl.int32), mask=r_ok & zero_row)
    else:
        tl.atomic_max(HOST + (bh // Hq) * Hkv + (bh % Hq) // G, zero_row.to(tl.int32), mask=r_ok & zero_row)


@triton.jit
def _row_stats(TAUh, LSE, DELTA, row0, rr, offs_m, Tq, stm, scale_hi, scale_lo, cdt: tl.constexpr):
    """(c, lse, delta) of query rows for the backward (LSE: the delta kernel's lse2): c = 0 and
    lse = +inf on rows without a key (lse = -inf) and past Tq, so that their probabilities are
    exp2(-inf) = 0 and c cannot turn a zero gradient into NaN; c = 0 where tau is bad (such rows
    have lse = NaN: their NaN comes from there, and c = 0 keeps it off their masked keys)."""
    m_ok = offs_m < Tq
    c = _coefficient(TAUh, offs_m, Tq, stm, scale_hi, scale_lo, cdt)
    lse = tl.load(LSE + row0 + rr, mask=m_ok, other=float("-inf"))
    empty = lse == float("-inf")
    c = tl.where(empty | (c != c), 0.0, c)
    lse = tl.where(empty, float("inf"), lse).to(cdt)
    delta = tl.load(DELTA + row0 + rr, mask=m_ok, other=0.0)
    return c, lse, delta


@triton.jit
def _dkdv_block(dk, dv, kT, vT, Qh, DOh, TAUh, LSE, DELTA, RF, Mh, DQACC, kmask, row0, start_m, rows, cols, offs_n,
                Tq, Tk, shift, sqm, sqd, sdm, sdd, stm, smm, smn, dcols, dvcols, D, Dv, scale_hi, scale_lo,
                Hq, CAUSAL: tl.constexpr, DIAG: tl.constexpr, MASK_KIND: tl.constexpr, EVEN_D: tl.constexpr,
                EVEN_DV: tl.constexpr, PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr, HOSTILE: tl.constexpr,
                VARLEN: tl.constexpr):
    # Scores in (query, key) orientation with the resident kT, vT as the right-hand operands: on
    # sm_90 they then stay in shared memory instead of registers (k, v as left operands made every
    # dk/dv tile spill).
    cdt = dk.dtype
    offs_m = start_m + rows
    m64 = tl.cast(start_m, tl.int64)
    if VARLEN:  # (total_q, Hq) row statistics: row0 = q0 * Hq + head, rows Hq apart
        rr = offs_m * Hq
    else:
        rr = offs_m
    if HOSTILE:  # rf rows (a NaN/Inf in q or dO, or a NaN row) load as 0
        live = (offs_m < Tq) & (tl.load(RF + row0 + rr, mask=offs_m < Tq, other=0) == 0)
        q = _tile_rows(Qh + m64 * sqm, rows, dcols, sqm, sqd, live, D, not EVEN_D)
        do = _tile_rows(DOh + m64 * sdm, rows, dvcols, sdm, sdd, live, Dv, not EVEN_DV)
    else:
        q = _tile(Qh + m64 * sqm, rows, dcols, sqm, sqd, Tq - start_m, D, True, not EVEN_D)
        do = _tile(DOh + m64 * sdm, rows, dvcols, sdm, sdd, Tq - start_m, Dv, True, not EVEN_DV)
    c, lse, delta = _row_stats(TAUh, LSE, DELTA, row0, rr, offs_m, Tq, stm, scale_hi, scale_lo, cdt)
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
def _dkdv_kernel(Q, K, V, TAU, MASK, DO, LSE, DELTA, RF, KF, FIRST, HOST, DK, DV, DQACC, CU_Q, CU_K,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 stb, sth, stm, smb, smh, smm, smn, sdb, sdh, sdm, sdd,
                 sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                 scale_hi, scale_lo, Hq, Hkv, G, Tq, Tk, D, Dv, total_q, total_k,
                 CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                 EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, HOSTILE: tl.constexpr, VARLEN: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """VARLEN (packed documents; batch strides 0): the grid's second axis is document x kv head, Tq /
    Tk arrive as the longest documents and become the document's lengths, the token axes start at
    the document's first query / key token, row statistics are (total_q, Hq)."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b64 = tl.cast(bhk // Hkv, tl.int64)
    hk = bhk % Hkv
    cdt = LSE.dtype.element_ty
    start_n = pid_n * BLOCK_N
    n64 = tl.cast(start_n, tl.int64)
    if VARLEN:
        q0, Tq = _doc_span(CU_Q, b64, total_q)
        k0, Tk = _doc_span(CU_K, b64, total_k)
        n64 = k0 + n64  # the absolute key token (offs_n stay relative)
        KFh = KF + tl.cast(hk, tl.int64) * total_k + k0
    else:
        q0 = 0
    cols = tl.arange(0, BLOCK_N)
    offs_n = start_n + cols
    rows = tl.arange(0, BLOCK_M)
    dcols = tl.arange(0, BLOCK_D)
    dvcols = tl.arange(0, BLOCK_DV)
    kv = b64 * Hkv + hk
    mine = _serves(FIRST, HOST, kv, Tk, True, HOSTILE)
    Kb = K + b64 * skb + tl.cast(hk, tl.int64) * skh + n64 * skn
    Vb = V + b64 * svb + tl.cast(hk, tl.int64) * svh + n64 * svn
    n_end = tl.where(mine, Tk - start_n, 0)  # (nothing is read for a head another launch serves)
    if HOSTILE:
        # flagged keys (a NaN/Inf in their k or v row) load as 0: the rows that may attend them carry
        # lse = NaN (the delta kernel), the others must not meet them
        if VARLEN:
            key_ok = (cols < n_end) & (~_key_bad(KFh, start_n, cols, Tk))
        else:
            key_ok = (cols < n_end) & (~_key_bad(KF + kv * Tk, start_n, cols, Tk))
        kT = _tile_cols(Kb, dcols, cols, skd, skn, D, key_ok, not EVEN_D)
        vT = _tile_cols(Vb, dvcols, cols, svd, svn, Dv, key_ok, not EVEN_DV)
    else:
        kT = _tile(Kb, dcols, cols, skd, skn, D, n_end, not EVEN_D, True)
        vT = _tile(Vb, dvcols, cols, svd, svn, Dv, n_end, not EVEN_DV, True)
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
    end = tl.where(mine, end, 0)
    if VARLEN:  # a key block past its document's end: no query block to visit (its stores are masked off)
        end = tl.where(start_n < Tk, end, 0)
    lo, mid = tl.minimum(lo, end), tl.minimum(mid, end)
    for g in range(0, G):
        h64 = tl.cast(hk * G + g, tl.int64)
        if VARLEN:
            Qh = Q + h64 * sqh + q0 * sqm
            DOh = DO + h64 * sdh + q0 * sdm
            TAUh = TAU + h64 * sth + q0 * stm
            row0 = q0 * Hq + h64
        else:
            Qh = Q + b64 * sqb + h64 * sqh
            DOh = DO + b64 * sdb + h64 * sdh
            TAUh = TAU + b64 * stb + h64 * sth
            row0 = (b64 * Hq + h64) * Tq
        Mh = MASK + b64 * smb + h64 * smh + n64 * smn
        kmask = offs_n < Tk
        if MASK_KIND == 1:  # key padding: one vector for every query block of this head
            kmask = kmask & (tl.load(Mh + cols * smn, mask=offs_n < Tk, other=0) != 0)
        for start_m in range(lo, mid, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, kT, vT, Qh, DOh, TAUh, LSE, DELTA, RF, Mh, DQACC, kmask, row0, start_m, rows,
                                 cols, offs_n,
                                 Tq, Tk, shift, sqm, sqd, sdm, sdd, stm, smm, smn, dcols, dvcols, D, Dv,
                                 scale_hi, scale_lo, Hq, CAUSAL, True, MASK_KIND, EVEN_D, EVEN_DV, PREC,
                                 ATOMIC_DQ, HOSTILE, VARLEN)
        for start_m in range(mid, end, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, kT, vT, Qh, DOh, TAUh, LSE, DELTA, RF, Mh, DQACC, kmask, row0, start_m, rows,
                                 cols, offs_n,
                                 Tq, Tk, shift, sqm, sqd, sdm, sdd, stm, smm, smn, dcols, dvcols, D, Dv,
                                 scale_hi, scale_lo, Hq, CAUSAL, False, MASK_KIND, EVEN_D, EVEN_DV, PREC,
                                 ATOMIC_DQ, HOSTILE, VARLEN)
    n_ok = offs_n < tl.where(mine, Tk, 0)
    tl.store(DK + b64 * sdkb + tl.cast(hk, tl.int64) * sdkh + n64 * sdkn + cols[:, None] * sdkn + dcols[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (dcols[None, :] < D))
    tl.store(DV + b64 * sdvb + tl.cast(hk, tl.int64) * sdvh + n64 * sdvn + cols[:, None] * sdvn + dvcols[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & (dvcols[None, :] < Dv))


@triton.jit
def _dq_block(dq, q, do, c2, lse2, delta, Kh, Vh, KFh, Mrow, rows, offs_m, start_n, Tq, Tk, shift,
              skn, skd, svn, svd, smm, smn, dcols, dvcols, D, Dv,
              CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, MASK_KIND: tl.constexpr, EVEN_D: tl.constexpr,
              EVEN_DV: tl.constexpr, HOSTILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              PREC: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    offs_n = start_n + cols
    n64 = tl.cast(start_n, tl.int64)
    if HOSTILE and (BOUNDS or MASK_KIND != 0):  # flagged keys load as 0 (a masked zero weight would meet them)
        key_ok = (cols < Tk - start_n) & (~_key_bad(KFh, start_n, cols, Tk))
        kT = _tile_cols(Kh + n64 * skn, dcols, cols, skd, skn, D, key_ok, not EVEN_D)
        vT = _tile_cols(Vh + n64 * svn, dvcols, cols, svd, svn, Dv, key_ok, not EVEN_DV)
    else:  # every row attends these keys: a flagged one makes them all NaN rows (lse = NaN) anyway
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
def _dq_kernel(Q, K, V, TAU, MASK, DO, LSE, DELTA, RF, KF, FIRST, HOST, DQ, DTAU, CU_Q, CU_K,
               sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
               stb, sth, stm, smb, smh, smm, smn, sdb, sdh, sdm, sdd, sdqb, sdqh, sdqm, sdqd,
               scale_hi, scale_lo, Hq, Hkv, G, Tq, Tk, D, Dv, total_q, total_k,
               CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PREC: tl.constexpr,
               EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, HOSTILE: tl.constexpr, VARLEN: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """VARLEN: as the forward's (see _fwd_kernel); dtau is written per (token, head) row."""
    pid_m, bh, b64, h64, hk64, start_m, m64, rows, offs_m, dcols, dvcols, q, kv, mine, q0, k0, Tq, Tk = _query_block(
        Q, sqb, sqh, sqm, sqd, Tq, Hq, G, D, FIRST, HOST, Hkv, Tk, CU_Q, CU_K, total_q, total_k, CAUSAL, EVEN_D,
        True, HOSTILE, VARLEN, BLOCK_M, BLOCK_D, BLOCK_DV)
    cdt = LSE.dtype.element_ty
    if VARLEN:  # (total_q, Hq) row statistics: rows Hq apart
        row0 = q0 * Hq + h64
        rr = offs_m * Hq
        TAUh = TAU + h64 * sth + q0 * stm
        Kh = K + hk64 * skh + k0 * skn
        Vh = V + hk64 * svh + k0 * svn
        KFh = KF + hk64 * total_k + k0
    else:
        row0 = tl.cast(bh, tl.int64) * Tq
        rr = offs_m
        TAUh = TAU + b64 * stb + h64 * sth
        Kh = K + b64 * skb + hk64 * skh
        Vh = V + b64 * svb + hk64 * svh
        KFh = KF + kv * Tk
    live = offs_m < tl.where(mine, Tq, 0)
    if HOSTILE:  # rf rows (a NaN/Inf in q or dO, or a NaN row): q and dO as 0
        live = live & (tl.load(RF + row0 + rr, mask=offs_m < Tq, other=0) == 0)
        q = tl.where(live[:, None], q, 0.0)
    do = _tile_rows(DO + b64 * sdb + h64 * sdh + m64 * sdm, rows, dvcols, sdm, sdd, live, Dv, not EVEN_DV)
    c, lse, delta = _row_stats(TAUh, LSE, DELTA, row0, rr, offs_m, Tq, stm, scale_hi, scale_lo, cdt)
    c2 = c * 1.4426950408889634
    lse2 = lse * 1.4426950408889634
    Mrow = MASK + b64 * smb + h64 * smh + m64 * smm
    dq = tl.zeros([BLOCK_M, BLOCK_D], cdt)
    shift = Tk - Tq
    free, hi = _key_ranges(pid_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    free, hi = tl.where(mine, free, 0), tl.where(mine, hi, 0)
    if VARLEN:  # a block past its document's end: no key to visit (its stores are masked off)
        hi = tl.where(start_m < Tq, hi, 0)
        free = tl.minimum(free, hi)
    for start_n in range(0, free, BLOCK_N):
        dq = _dq_block(dq, q, do, c2, lse2, delta, Kh, Vh, KFh, Mrow, rows, offs_m, start_n, Tq, Tk, shift,
                       skn, skd, svn, svd, smm, smn, dcols, dvcols, D, Dv,
                       CAUSAL, False, MASK_KIND, EVEN_D, EVEN_DV, HOSTILE, BLOCK_M, BLOCK_N, PREC)
    for start_n in range(free, hi, BLOCK_N):
        dq = _dq_block(dq, q, do, c2, lse2, delta, Kh, Vh, KFh, Mrow, rows, offs_m, start_n, Tq, Tk, shift,
                       skn, skd, svn, svd, smm, smn, dcols, dvcols, D, Dv,
                       CAUSAL, True, MASK_KIND, EVEN_D, EVEN_DV, HOSTILE, BLOCK_M, BLOCK_N, PREC)
    dq = dq * c[:, None]
    scale = tl.zeros_like(c) + scale_hi + scale_lo
    # dtau = -(q . dq) / tau = -(q . dq) * c / scale; rows without a key have c = 0 here
    dtau = -tl.sum(q.to(cdt) * dq, 1) * (c / scale)
    m_ok = offs_m < tl.where(mine, Tq, 0)
    tl.store(DQ + b64 * sdqb + h64 * sdqh + m64 * sdqm + rows[:, None] * sdqm + dcols[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (dcols[None, :] < D))
    tl.store(DTAU + row0 + rr, dtau, mask=m_ok)



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
    c = scale / tau
    # (a bad c makes lse NaN: the row's head is hostile, and the HOSTILE dq launch rewrites its dq, dtau)
    c = tl.where((tau > 0) & (tau < float("inf")) & (tl.abs(c) < float("inf")), c, float("nan"))
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
    lse2 = torch.empty_like(delta)  # lse, NaN on the rows whose gradients the NaN/Inf rule makes NaN
    rf = torch.empty((B, Hq, Tq), dtype=torch.uint8, device=q.device)  # rows whose q and dO load as 0
    kf, first = key_flags(k, v)
    host = torch.zeros((B * Hkv,), dtype=torch.int32, device=q.device)  # heads with an rf row
    R = B * Hq * Tq
    dlse = grad_lse.contiguous() if grad_lse is not None else delta
    bd, bdv = _block(D), _block(Dv)
    # O, dO (BLOCK_R, Dv) and q (BLOCK_R, D) in fp32: about 96 registers per thread (4 warps)
    block_r = 16 if INTERPRET else max(16, min(64, next_power_of_2(12288 // (2 * bdv + bd) + 1) // 2))
    _delta_kernel[(cdiv(R, block_r),)](out, grad_out, dlse, lse, q, delta, lse2, rf, host, host, R, Hq, Hkv,
                                             Hq // Hkv, Tq, D, Dv, *q.stride(), 0, HAS_DLSE=grad_lse is not None,
                                             VARLEN=False, BLOCK_R=block_r, BLOCK_D=bd, BLOCK_DV=bdv)
    m8, ms, mk = _mask_args(mask, q)
    es = q.element_size()
    what = _what(q, k, v, mk, causal) + " backward"
    flags = dict(CAUSAL=bool(causal), MASK_KIND=mk, PREC=_precision(q.dtype), EVEN_D=D == bd, EVEN_DV=Dv == bdv,
                 VARLEN=False, BLOCK_D=bd, BLOCK_DV=bdv)
    key = (q.dtype, bd, bdv, mk, bool(causal))
    sp = _scale_pair(scale)
    major = device_spec(q.device).capability[0]
    atomic = use_atomic_dq(q)
    dqacc = torch.zeros((R, D), dtype=torch.float32, device=q.device) if atomic else delta  # never read if not
    dkdv_grid = lambda cfg: (cdiv(Tk, cfg["BLOCK_N"]), B * Hkv)  # noqa: E731
    dkdv_args = (q, k, v, tau, m8, grad_out, lse2, delta, rf, kf, first, host, dk, dv, dqacc, host, host,
                 *q.stride(), *k.stride(), *v.stride(), *tau.stride(), *ms, *grad_out.stride(), *dk.stride(),
                 *dv.stride(), *sp, Hq, Hkv, Hq // Hkv, Tq, Tk, D, Dv, 0, 0)
    dq_grid = lambda cfg: (cdiv(Tq, cfg["BLOCK_M"]), B * Hq)  # noqa: E731
    dq_args = (q, k, v, tau, m8, grad_out, lse2, delta, rf, kf, first, host, dq, dtau, host, host,
               *q.stride(), *k.stride(), *v.stride(), *tau.stride(), *ms, *grad_out.stride(), *dq.stride(),
               *sp, Hq, Hkv, Hq // Hkv, Tq, Tk, D, Dv, 0, 0)
    dkdv_cands = _candidates("dkdv", es, bd, bdv, mk, Tq, major)
    dq_cands = _candidates("dq", es, bd, bdv, mk, Tq, major)
    # the heads no NaN/Inf reaches (see temperature_attention_nonfinite._serves)
    launch(_dkdv_kernel, dkdv_grid, dkdv_args, dkdv_cands, ("dkdv", atomic) + key, q.device, what,
           ATOMIC_DQ=atomic, HOSTILE=False, **flags)
    if atomic:
        block_r = 16 if INTERPRET else 32
        _dq_finalize_kernel[(cdiv(R, block_r),)](
            q, dqacc, tau, lse2, dq, dtau, *q.stride(), *tau.stride(), *dq.stride(), *sp, Hq, Tq, R, D,
            BLOCK_R=block_r, BLOCK_D=bd)
    else:
        launch(_dq_kernel, dq_grid, dq_args, dq_cands, ("dq",) + key, q.device, what, HOSTILE=False, **flags)
    # the others (their programs in the launches above did nothing; here the others' return at once),
    # on small tiles, after the atomic path's finalize (which writes every row)
    if any_hostile(first, Tk, host):
        launch(_dkdv_kernel, dkdv_grid, dkdv_args, _hostile_tiles("dkdv", es, bd, bdv, mk),
               ("dkdv", "hostile") + key, q.device, what, ATOMIC_DQ=False, HOSTILE=True, **flags)
        launch(_dq_kernel, dq_grid, dq_args, _hostile_tiles("dq", es, bd, bdv, mk), ("dq", "hostile") + key,
               q.device, what, HOSTILE=True, **flags)
    return dq, dk, dv, dtau
