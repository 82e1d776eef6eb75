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

NaN/Inf (the rule: trajops/reference/temperature_attention.py). Handling it inside the tuned loops
made them spill (a per-key vector in the MMA layout, a select on the v tile), so the work is split
by (batch, kv head): key_flags reads k and v once and flags each key whose k or v row holds a
NaN/Inf (one byte) and, per head, the first such key. The fast kernels (TMA or pointer) serve the
heads without a flagged key -- their only additions are per row: c = NaN when scale / tau overflows
or the q row holds a NaN/Inf (an exponent-bit test of the q tile, once per program), so such a row
turns NaN by itself -- and their programs of flagged heads return at once. A second launch of the
pointer kernel with HOSTILE (small tiles, AOT-checked spill-free) serves the flagged heads: in tiles
that test a mask or bounds a flagged key's v row is zeroed (0 weight * NaN would leak into rows that
may not attend it) and its allowed scores get NaN (one FMA: scale and a NaN/0 key bias); tiles every
row of the block attends make the whole block NaN when its first flagged key lies among them. The
backward (temperature_attention_bwd.py) splits the same way, with also the heads of rows whose q,
dO or grad_lse holds a NaN/Inf or whose lse is NaN (marked by its delta kernel) as hostile.
Cost on finite inputs: the flag pass (one read of k and v, 2 launches: about 5% of the T = 4096
causal bf16 forward on an H200 by bytes over time, not yet measured) and the HOSTILE launch, whose
B * Hq * cdiv(Tq, 16) programs return at once (a few microseconds; not yet measured either);
hostile heads run on small tiles.

Cost (B, Hq = Hkv, T = Tq = Tk, D = Dv, bytes per element e): FLOPs 4*B*H*T^2*D forward (halved
causal), 2.5x that backward (QK^T recomputed in both backward kernels: 3.5x would need atomics).
HBM bytes: forward reads q, k, v once per query block (k, v re-read cdiv(T, BM) times, mostly from
L2) and writes out + lse; compute-bound at T >= 512. Launches: forward 4 (key flags 2, fast,
hostile); backward 8 (key flags 2, a zeroed head map, delta, fast dk/dv and dq, hostile dk/dv, dq).

Hopper path (sm_90, bf16/fp16, 16-byte-aligned strides, default on; TRAJOPS_ATTN_TMA=0 turns it
off): the forward reads q, k, v through 4-D TMA descriptors instead of per-thread pointers (189
registers instead of 237 at 128x128 tiles; H200, B4 H16 T4096 D128 causal: 0.631 ms against 0.676,
cuDNN 0.474). Same tiles, same results bit for bit (checked by the sweep).

Packed documents (FlashAttention's varlen layout): the pointer kernels, the delta kernel and the key
flags take a VARLEN constexpr (False here: the dense code is unchanged); with it a program reads its
document's offsets and works on that document alone. Launchers and cost:
temperature_attention_varlen.py.

Tiles come from :func:`_candidates` (fastest first, each with a shared-memory estimate: pipeline
stages x the streamed tiles, mask tile included, + the resident tiles) through
``_common.launch``, which falls back to the next candidate on OutOfResources and remembers it.
"""
from __future__ import annotations

import os
import struct
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import temperature_attention_decode as _decode
from ._common import INTERPRET, _capturing, cdiv, device_spec, launch, next_power_of_2
from .temperature_attention_nonfinite import (_doc_span, _key_bad, _key_bias, _nan_on_bad_q, _serves, any_hostile,
                                              key_flags)
from .temperature_attention_tiles import TILE_OVERRIDES, _candidates, _estimate, _hostile_tiles  # noqa: F401

try:  # host-side TMA descriptors (Triton >= 3.4); the Hopper forward path needs them
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

# Hopper forward through TMA descriptors: off until a GPU sweep shows it faster (bench/sweep_attention.py)
USE_TMA = os.environ.get("TRAJOPS_ATTN_TMA", "1") == "1"

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
def _query_block(Q, sqb, sqh, sqm, sqd, Tq, Hq, G, D, FIRST, HOST, Hkv, Tk, CU_Q, CU_K, total_q, total_k,
                 CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, HAS_HOST: tl.constexpr, HOSTILE: tl.constexpr,
                 VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The prologue of a program that owns a query block: (pid_m, bh, b, h, kv head as int64, start_m,
    start_m as int64, rows, query offsets, head-dim columns, value-dim columns, the q tile, kv = the
    (batch, kv head) index, mine = whether this launch serves that head (see _serves); q is not read
    when it does not), then (q0, k0, Tq, Tk).
    VARLEN (packed tokens, batch strides 0, Tq / Tk the longest documents): b is the document; q0, k0
    are its first query / key token and Tq, Tk its lengths (from CU_Q / CU_K, clamped into the
    tensors); m64 is then the absolute token of the block's first row (offs_m stay relative).
    Otherwise q0 = k0 = 0 and Tq, Tk pass through."""
    pid_m, bh, b, h, hk = _row_program(Tq, Hq, G, CAUSAL, BLOCK_M)
    start_m = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    b64, h64, m64 = tl.cast(b, tl.int64), tl.cast(h, tl.int64), tl.cast(start_m, tl.int64)
    if VARLEN:
        q0, Tq = _doc_span(CU_Q, b64, total_q)
        k0, Tk = _doc_span(CU_K, b64, total_k)
        m64 = q0 + m64
    else:
        q0 = 0
        k0 = 0
    kv = b64 * Hkv + hk
    mine = _serves(FIRST, HOST, kv, Tk, HAS_HOST, HOSTILE)
    dcols = tl.arange(0, BLOCK_D)
    q = _tile(Q + b64 * sqb + h64 * sqh + m64 * sqm, rows, dcols, sqm, sqd, tl.where(mine, Tq - start_m, 0), D,
              True, not EVEN_D)
    return (pid_m, bh, b64, h64, tl.cast(hk, tl.int64), start_m, m64, rows, start_m + rows, dcols,
            tl.arange(0, BLOCK_DV), q, kv, mine, q0, k0, Tq, Tk)


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
    """c = scale / tau per query row in cdt; NaN where tau is not positive finite or the quotient
    overflows (a subnormal tau); 0 on rows >= Tq (inert padding rows). scale arrives as an fp32
    hi + lo pair (float arguments are fp32 on a GPU). A true division as on the CPU backends (on a GPU
    fp32 `/` is within 2 ulp: only a tau within an ulp or two of overflowing c may be judged otherwise;
    tl.math.div_rn would be exact, but it made the sm_80 dk/dv kernel spill 3 KB)."""
    m_ok = offs_m < Tq
    t = tl.load(TAUh + offs_m * stm, mask=m_ok, other=1.0).to(cdt)
    scale = tl.zeros_like(t) + scale_hi + scale_lo  # in cdt: fp64 rows get the fp64 scale
    c = scale / t
    c = tl.where((t > 0) & (t < float("inf")) & (tl.abs(c) < float("inf")), c, float("nan"))
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
def _online_update(acc, l_i, m_i, s, c2, v, kbias, Mblk, rows, cols, offs_m, offs_n, Tq, Tk, shift, smm, smn,
                   CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, MASK_KIND: tl.constexpr, HOSTILE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step (base 2) of a key block: s = q k^T (unscaled), v its values; HOSTILE:
    in tiles that test a mask or bounds, kbias (NaN on flagged keys, whose v rows are 0 here) makes
    the allowed scores of flagged keys NaN."""
    if BOUNDS or MASK_KIND != 0:
        ok = _allowed(Mblk, rows, cols, offs_m, offs_n, Tq, Tk, shift, smm, smn,
                      CAUSAL, BOUNDS, MASK_KIND, BLOCK_M, BLOCK_N)
        if HOSTILE:
            s = tl.where(ok, s * c2[:, None] + kbias[None, :], float("-inf"))
        else:
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
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC, out_dtype=acc.dtype)
    return acc, l_i, m_new


@triton.jit
def _tile_rows(ptr, rows, cols, srow, scol, row_ok, ncols, COL_MASK: tl.constexpr):
    """A (rows x cols) tile at ptr with only the rows where row_ok is True read (the others 0)."""
    ptrs = ptr + rows[:, None] * srow + cols[None, :] * scol
    if COL_MASK:
        return tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < ncols), other=0.0)
    return tl.load(ptrs, mask=row_ok[:, None], other=0.0)


@triton.jit
def _fwd_block(acc, l_i, m_i, q, c2, Kh, Vh, KFh, Mrow, rows, offs_m, start_n, Tq, Tk, shift,
               skn, skd, svn, svd, smm, smn, dcols, dvcols, D, Dv,
               CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, MASK_KIND: tl.constexpr, EVEN_D: tl.constexpr,
               EVEN_DV: tl.constexpr, HOSTILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               PREC: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    n64 = tl.cast(start_n, tl.int64)
    kT = _tile(Kh + n64 * skn, dcols, cols, skd, skn, D, Tk - start_n, not EVEN_D, BOUNDS)
    v = _tile(Vh + n64 * svn, cols, dvcols, svn, svd, Tk - start_n, Dv, BOUNDS, not EVEN_DV)
    kbias = tl.zeros([BLOCK_N], c2.dtype)
    if HOSTILE:
        if BOUNDS or MASK_KIND != 0:  # a flagged key's v row is 0 here: 0 weight * NaN would leak
            kb = _key_bad(KFh, start_n, cols, Tk)
            v = tl.where(kb[:, None], 0.0, v)
            kbias = _key_bias(kb, c2.dtype)
    s = tl.dot(q, kT, input_precision=PREC).to(c2.dtype)
    return _online_update(acc, l_i, m_i, s, c2, v, kbias, Mrow + n64 * smn, rows, cols, offs_m, start_n + cols,
                          Tq, Tk, shift, smm, smn, CAUSAL, BOUNDS, MASK_KIND, HOSTILE, BLOCK_M, BLOCK_N, PREC)


@triton.jit
def _fwd_block_tma(acc, l_i, m_i, q, c2, k_desc, v_desc, b, hk, Mrow, rows, offs_m, start_n, Tq, Tk, shift,
                   smm, smn, CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, MASK_KIND: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    k = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)  # zero past Tk and D (TMA fill)
    s = tl.dot(q, k.T).to(c2.dtype)
    v = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
    kbias = tl.zeros([BLOCK_N], c2.dtype)  # (unused: the fast kernel never meets a flagged key)
    return _online_update(acc, l_i, m_i, s, c2, v, kbias, Mrow + tl.cast(start_n, tl.int64) * smn,
                          rows, cols, offs_m, start_n + cols, Tq, Tk, shift, smm, smn, CAUSAL, BOUNDS, MASK_KIND,
                          False, BLOCK_M, BLOCK_N, "tf32")


@triton.jit
def _fwd_kernel_tma(q_desc, k_desc, v_desc, TAU, MASK, O, LSE, FIRST, stb, sth, stm, smb, smh, smm, smn,
                    sob, soh, som, sod, scale_hi, scale_lo, Hq, Hkv, G, Tq, Tk, Dv,
                    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Hopper forward: q, k, v tiles through TMA descriptors (4-D, (B, H, T, D), any 16-byte-aligned
    strides), so that the copy engine, not per-thread address arithmetic, feeds the pipeline."""
    pid_m, bh, b, h, hk = _row_program(Tq, Hq, G, CAUSAL, BLOCK_M)
    cdt = LSE.dtype.element_ty
    b64, h64 = tl.cast(b, tl.int64), tl.cast(h, tl.int64)
    start_m = pid_m * BLOCK_M
    m64 = tl.cast(start_m, tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    dvcols = tl.arange(0, BLOCK_DV)
    q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    c2 = _coefficient(TAU + b64 * stb + h64 * sth, offs_m, Tq, stm, scale_hi, scale_lo, cdt) * 1.4426950408889634
    c2 = _nan_on_bad_q(c2, q, cdt)
    Mrow = MASK + b64 * smb + h64 * smh + m64 * smm
    mine = _serves(FIRST, FIRST, b64 * Hkv + hk, Tk, False, False)  # heads without a flagged key
    m_i = tl.full([BLOCK_M], float("-inf"), cdt)
    l_i = tl.zeros([BLOCK_M], cdt)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], cdt)
    shift = Tk - Tq
    free, hi = _key_ranges(pid_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    free, hi = tl.where(mine, free, 0), tl.where(mine, hi, 0)
    for start_n in range(0, free, BLOCK_N):
        acc, l_i, m_i = _fwd_block_tma(acc, l_i, m_i, q, c2, k_desc, v_desc, b, hk, Mrow, rows, offs_m, start_n, Tq,
                                       Tk, shift, smm, smn, CAUSAL, False, MASK_KIND, BLOCK_M, BLOCK_N, BLOCK_D,
                                       BLOCK_DV)
    for start_n in range(free, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block_tma(acc, l_i, m_i, q, c2, k_desc, v_desc, b, hk, Mrow, rows, offs_m, start_n, Tq,
                                       Tk, shift, smm, smn, CAUSAL, True, MASK_KIND, BLOCK_M, BLOCK_N, BLOCK_D,
                                       BLOCK_DV)
    _fwd_epilogue(acc, l_i, m_i, O, LSE, b64, h64, m64, tl.cast(bh, tl.int64) * Tq, offs_m, rows, offs_m, dvcols,
                  Tq, Dv, sob, soh, som, sod, mine, False, cdt)


@triton.jit
def _fwd_epilogue(acc, l_i, m_i, O, LSE, b64, h64, m64, lrow0, rr, rows, offs_m, dvcols, Tq, Dv, sob, soh, som, sod,
                  mine, block_bad, cdt: tl.constexpr):
    """out = acc / l and lse (natural log); rows without an allowed key (l = 0): out 0, lse -inf;
    every row NaN when block_bad (they all attend a flagged key); nothing written unless mine."""
    empty = l_i == 0
    l_safe = tl.where(empty, 1.0, l_i).to(cdt)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    out = tl.where(block_bad, float("nan"), out)
    lse = tl.where(block_bad, float("nan"), lse)
    m_ok = offs_m < tl.where(mine, Tq, 0)  # (a bound, not "& mine": the interpreter mistypes int1 scalars)
    tl.store(O + b64 * sob + h64 * soh + m64 * som + rows[:, None] * som + dvcols[None, :] * sod,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & (dvcols[None, :] < Dv))
    tl.store(LSE + lrow0 + rr, lse, mask=m_ok)


@triton.jit
def _fwd_kernel(Q, K, V, TAU, MASK, O, LSE, KF, FIRST, CU_Q, CU_K,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                stb, sth, stm, smb, smh, smm, smn, sob, soh, som, sod,
                scale_hi, scale_lo, Hq, Hkv, G, Tq, Tk, D, Dv, total_q, total_k,
                CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PREC: tl.constexpr,
                EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, HOSTILE: tl.constexpr, VARLEN: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The pointer forward. VARLEN: packed documents (temperature_attention_varlen.py): the grid's
    second axis is document x head, Tq / Tk arrive as the longest documents and become the program's
    document lengths, batch strides are 0 and the token axis starts at the document's first token;
    lse is (total_q, Hq)."""
    pid_m, bh, b64, h64, hk64, start_m, m64, rows, offs_m, dcols, dvcols, q, kv, mine, q0, k0, Tq, Tk = _query_block(
        Q, sqb, sqh, sqm, sqd, Tq, Hq, G, D, FIRST, FIRST, Hkv, Tk, CU_Q, CU_K, total_q, total_k, CAUSAL, EVEN_D,
        False, HOSTILE, VARLEN, BLOCK_M, BLOCK_D, BLOCK_DV)
    cdt = LSE.dtype.element_ty
    if VARLEN:
        c2 = _coefficient(TAU + h64 * sth + q0 * stm, offs_m, Tq, stm, scale_hi, scale_lo, cdt) * 1.4426950408889634
        Kh = K + hk64 * skh + k0 * skn
        Vh = V + hk64 * svh + k0 * svn
        KFh = KF + hk64 * total_k + k0
        lrow0 = q0 * Hq + h64  # (total_q, Hq) lse: rows Hq apart
        rr = offs_m * Hq
    else:
        c2 = _coefficient(TAU + b64 * stb + h64 * sth, offs_m, Tq, stm, scale_hi, scale_lo, cdt) * 1.4426950408889634
        Kh = K + b64 * skb + hk64 * skh
        Vh = V + b64 * svb + hk64 * svh
        KFh = KF + kv * Tk
        lrow0 = tl.cast(bh, tl.int64) * Tq
        rr = offs_m
    c2 = _nan_on_bad_q(c2, q, cdt)
    Mrow = MASK + b64 * smb + h64 * smh + m64 * smm

    m_i = tl.full([BLOCK_M], float("-inf"), cdt)
    l_i = tl.zeros([BLOCK_M], cdt)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], cdt)
    shift = Tk - Tq
    free, hi = _key_ranges(pid_m, Tq, Tk, CAUSAL, BLOCK_M, BLOCK_N)
    free, hi = tl.where(mine, free, 0), tl.where(mine, hi, 0)
    if VARLEN:  # a block past its document's end: no key to visit (its stores are masked off)
        hi = tl.where(start_m < Tq, hi, 0)
        free = tl.minimum(free, hi)
    for start_n in range(0, free, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, c2, Kh, Vh, KFh, Mrow, rows, offs_m, start_n, Tq, Tk, shift,
                                   skn, skd, svn, svd, smm, smn, dcols, dvcols, D, Dv,
                                   CAUSAL, False, MASK_KIND, EVEN_D, EVEN_DV, HOSTILE, BLOCK_M, BLOCK_N, PREC)
    for start_n in range(free, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, c2, Kh, Vh, KFh, Mrow, rows, offs_m, start_n, Tq, Tk, shift,
                                   skn, skd, svn, svd, smm, smn, dcols, dvcols, D, Dv,
                                   CAUSAL, True, MASK_KIND, EVEN_D, EVEN_DV, HOSTILE, BLOCK_M, BLOCK_N, PREC)
    # HOSTILE: tiles every row of the block attends (no mask, below the diagonal) were not checked
    # key by key; the block is NaN when a flagged key lies among them
    block_bad = False
    if HOSTILE and MASK_KIND == 0:
        block_bad = tl.load(FIRST + kv) < free
    _fwd_epilogue(acc, l_i, m_i, O, LSE, b64, h64, m64, lrow0, rr, rows, offs_m, dvcols, Tq, Dv, sob, soh, som, sod,
                  mine, block_bad, cdt)


# --------------------------------------------------------------------------------------------
# launch configurations
# --------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep full fp32 products (as the reference and SDPA do), not TF32.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _block(n: int) -> int:
    return max(16, next_power_of_2(n))


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


def _tma_eligible(q, k, v, bd: int, bdv: int) -> bool:
    """Hopper, half precision, every tensor 16-byte aligned with a contiguous last dimension and
    16-byte-aligned strides (what a TMA descriptor needs), boxes of at most 256 elements."""
    if not USE_TMA or INTERPRET or TensorDescriptor is None or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if not (q.is_cuda or _capturing() is not None) or device_spec(q.device).capability[0] != 9:
        return False
    if max(bd, bdv) > 256:
        return False
    for t in (q, k, v):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:-1]):
            return False
    return True


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
    if Tq == 1 and _decode.ENABLED and _decode.per_key(mask):  # flash-decoding through the paged kernels
        return _decode.attention(q, k, v, tau, scale, mask)
    tau = tau.expand(B, Hq, Tq)
    m8, ms, mk = _mask_args(mask, q)
    kf, first = key_flags(k, v)
    bd, bdv = _block(D), _block(Dv)
    es = q.element_size()
    cands = _candidates("fwd", es, bd, bdv, mk, Tq, device_spec(q.device).capability[0])
    key = ("fwd", q.dtype, bd, bdv, mk, bool(causal), Tq <= 16)
    what = _what(q, k, v, mk, causal)
    grid = lambda cfg: (cdiv(Tq, cfg["BLOCK_M"]), B * Hq)  # noqa: E731
    common = (*tau.stride(), *ms, *out.stride(), *_scale_pair(scale), Hq, Hkv, Hq // Hkv, Tq, Tk)
    tma = _tma_eligible(q, k, v, bd, bdv)
    if tma:
        def tma_args(cfg):
            bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
            descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, cols])
                     for t, rows, cols in ((q, bm, bd), (k, bn, bd), (v, bn, bdv))]
            return (*descs, tau, m8, out, lse, first, *common, Dv)
        launch(_fwd_kernel_tma, grid, tma_args, cands, key + ("tma",), q.device, what,
               CAUSAL=bool(causal), MASK_KIND=mk, BLOCK_D=bd, BLOCK_DV=bdv)
    args = (q, k, v, tau, m8, out, lse, kf, first, first, first, *q.stride(), *k.stride(), *v.stride(),
            *tau.stride(), *ms, *out.stride(), *_scale_pair(scale), Hq, Hkv, Hq // Hkv, Tq, Tk, D, Dv, 0, 0)
    flags = dict(CAUSAL=bool(causal), MASK_KIND=mk, PREC=_precision(q.dtype), EVEN_D=D == bd, EVEN_DV=Dv == bdv,
                 VARLEN=False, BLOCK_D=bd, BLOCK_DV=bdv)
    if not tma:
        launch(_fwd_kernel, grid, args, cands, key, q.device, what, HOSTILE=False, **flags)
    # the heads with a flagged key (the programs of the others return at once), on small tiles
    if any_hostile(first, Tk):
        launch(_fwd_kernel, grid, args, _hostile_tiles("fwd", es, bd, bdv, mk), key + ("hostile",), q.device, what,
               HOSTILE=True, **flags)
    return out, lse


from .temperature_attention_bwd import attention_bwd  # noqa: E402  (its kernels share the helpers above)
