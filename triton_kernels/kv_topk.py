"""Fused KV relevance and top-k (score and select in one pass); semantics: trajops/reference/kv_cache.py.

Public launchers (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1):

* :func:`kv_relevance` ``(traj_pool (P, S, Dt), ts_pool, live_pool, page_table (MB, MP), query (B, Dt),
  now (), alpha, decay) -> (B, MP*S)`` fp32: one launch (page table, query normalization and the row's
  corrupt-entry flag folded in).
* :func:`kv_topk` ``(..., k) -> (slots (B, k) int64, scores (B, k) fp32)``, or None when k > K_MAX (the
  caller keeps the unfused path: the reference's ranking around the Triton scorer).

Ranking key. The reference ranks live slots by score descending (NaN as -inf), then older timestamp,
then lower logical slot; dead slots last. That order is the descending order of one 128-bit key per
slot, held as two uint64 words (hi, lo) and compared lexicographically:

    hi = score field (32) | ts field high 32      lo = ts field low 32 | slot field (32)

score field: 0 for a dead slot; else the fp32 score mapped to an order-preserving uint32 (sign set: all
bits flipped; else the sign bit set), NaN given -inf's code (so a NaN ties with -inf and goes to the
timestamp, as in the reference) and -0.0 read as +0.0 (they compare equal in the reference). A live
slot never scores -inf (alpha in [0, 1], |cos| <= 1, recency >= 0 or NaN), so -inf's code decodes back
to NaN. ts field: ts ^ 0x7FFF...F (signed order, reversed: older is larger), 0 for dead slots. slot
field: 2^32 - 1 - j (lower is larger; L < 2^31). Keys are distinct within a row, so any correct
selection of the K largest reproduces the reference exactly, ties included; the whole int64 range
of timestamps is covered (a 64-bit key could not hold score, ts and slot together).

Selection: bitonic networks on the (hi, lo) pair (compare-exchange at distance 2^j through an
(A, 2, 2^j) reshape; the partner is read by a sum over the middle axis). Each block of
BLOCK keys is cut to its top K (sorted runs of K, then pairwise maxima of opposite-order runs, which
halves the candidates and leaves bitonic runs) and merged into a running top K held in registers
(elementwise max of the running list, descending, and the block's, ascending, then one bitonic merge).
Rows of at most SMALL = 32 slots (one block, one program) are ranked by counting instead: each key's
rank is the number of larger keys ((N, N) compare), the top K gathered through an (N, K) one-hot.
Compute per 256-slot block at K = 64: 21 + 2 * (1 + 6) + (1 + 6) = 42 compare-exchange steps on 2 x 256
words (~10 integer ops per element each), against ~256 * Dt fp64 FMAs for the scores: comparable work,
hidden under the loads only if enough programs are resident (127 registers x 256 threads at
K = 64: 2 programs per SM). Not measured yet (no GPU this session): the floor is the 69.6 MB read,
~21 us at an H100's ~3.3 TB/s; the issue's goal is <= 0.5x torch.compile of the eager scorer + topk.

Count (B rows of L = MP*S slots, trajectories of Dt fp32; bench: B=8, L=32768, S=16, Dt=64):
  ideal   read each slot's trajectory (4*Dt B), ts (8 B), live (1 B) once, its page-table entry
          (8 B / S slots), the query; write B*k*12 B: 8*32768*(256+8+1) + 8*2048*8 = 69.6 MB.
  kv_topk grid (B, C) with C chunks of whole BLOCK-slot blocks per row, C*B ~ 4 programs per SM (C=64
          on an H100 for the bench: 528 programs); each reads its slots once (dead slots: live flag and
          page entry only) and folds them into its running top K. C == 1: the program writes the
          k outputs (one launch). C > 1: it writes its K keys (16 B each) and a second launch (one
          program per row) folds the C*K candidates and writes the outputs: 8*64*64*16 = 0.5 MB of
          scratch written and read (+1.5%), 2 launches in all. Both read the row's page table once
          more (MP*8 B, L2-resident) for the corrupt-entry flag: final program only.
          Unfused path it replaces: kv_unit (5 launches), logical->physical, the scorer, 3 gathers,
          3 stable argsorts + gathers over (B, L) and wheres: ~20 launches, the (B, L) scores, ts and
          flags written and re-read several times.
          The interpreter runs one program per row (it pays per program and per op, not per slot).
  kv_relevance  grid (B, C): reads as above, writes B*L*4 B; each program reads the page-table row
          once for the flag (C*MP*8 B per row, L2-resident). One launch.
Scores are computed as in the reference: fp64 dot of the fp32 entry and the fp32 unit query (itself
q / max(|q|, 1e-8) in fp64, rounded once), alpha, 1 - alpha and -decay passed as exact fp64 bits,
rounded once to fp32; backends agree up to double rounding of the fp64 exp and sums.
"""
from __future__ import annotations

import struct
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common
from ._common import cdiv, next_power_of_2

__all__ = ["K_MAX", "kv_relevance", "kv_topk"]

K_MAX = 128  # largest k served by the fused kernel (K = next power of two >= k, held in registers)
BLOCK = 256  # slots per fold (at least K); tests lower it to reach the multi-chunk merge on tiny rows
SMALL = 32  # rows of at most this many slots: one block, selected by counting instead of a bitonic network
PROGRAMS_PER_SM = 4
SPLIT_ROWS_IN_INTERPRETER = False  # the interpreter runs one program per row unless a test asks for chunks
_EPS_BITS = struct.unpack("<q", struct.pack("<d", 1e-8))[0]  # reference.KV_EPS as exact fp64 bits


@triton.jit
def _merge(h, l, N: tl.constexpr, s: tl.constexpr, DIR: tl.constexpr):
    """Bitonic merge stage s of (h, l) [N]: runs of 2^(s-1) (pairwise bitonic) -> sorted runs of 2^s.
    DIR 0: ascending, 1: descending, 2: run r ascending if r is even, descending if odd.

    Each step compare-exchanges at distance 2^j through an (A, 2, 2^j) view; the partner's words are
    the pair's sum minus one's own (wrapping uint64 arithmetic: exact). One function, no helper calls:
    the interpreter pays ~1 ms per device-function call."""
    for i in tl.static_range(s):
        # distance C = 2^(s-1-i), A = N / 2C pairs of C-runs (inline: a constexpr cannot be reassigned)
        h3 = tl.reshape(h, [N // (2 << (s - 1 - i)), 2, 1 << (s - 1 - i)])
        l3 = tl.reshape(l, [N // (2 << (s - 1 - i)), 2, 1 << (s - 1 - i)])
        ph = tl.sum(h3, 1, keep_dims=True) - h3
        pl = tl.sum(l3, 1, keep_dims=True) - l3
        right = (tl.arange(0, 2) == 1)[None, :, None]
        if DIR == 2:  # (global index >> s) & 1 == (pair index >> i) & 1
            desc = ((tl.arange(0, N // (2 << (s - 1 - i)))[:, None, None] >> i) & 1) == 1
        else:
            desc = tl.full([N // (2 << (s - 1 - i)), 1, 1], DIR, tl.int32) == 1
        gt = (h3 > ph) | ((h3 == ph) & (l3 > pl))
        keep = gt == (right != desc)  # ascending: the right element keeps the larger key
        h = tl.reshape(tl.where(keep, h3, ph), [N])
        l = tl.reshape(tl.where(keep, l3, pl), [N])
    return h, l


@triton.jit
def _top_sorted(h, l, N: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr, DIR: tl.constexpr):
    """The 2^LOG_K largest keys of (h, l) [N = 2^LOG_N], sorted (DIR 0 ascending, 1 descending)."""
    for s in tl.static_range(1, LOG_K + 1):
        if s == LOG_N:
            h, l = _merge(h, l, N, s, DIR)
        else:
            h, l = _merge(h, l, N, s, 2)
    K: tl.constexpr = 1 << LOG_K
    for r in tl.static_range(LOG_N - LOG_K):
        # runs 2i (ascending) and 2i+1 (descending): their elementwise maxima are the top K of
        # the pair, as a bitonic run
        h3 = tl.reshape(h, [(N >> r) // (2 * K), 2, K])
        l3 = tl.reshape(l, [(N >> r) // (2 * K), 2, K])
        ph = tl.sum(h3, 1, keep_dims=True) - h3
        pl = tl.sum(l3, 1, keep_dims=True) - l3
        left = (tl.arange(0, 2) == 0)[None, :, None]
        gt = (h3 > ph) | ((h3 == ph) & (l3 > pl))
        h = tl.reshape(tl.sum(tl.where(left, tl.where(gt, h3, ph), 0), 1), [N >> (r + 1)])
        l = tl.reshape(tl.sum(tl.where(left, tl.where(gt, l3, pl), 0), 1), [N >> (r + 1)])
        if r == LOG_N - LOG_K - 1:
            h, l = _merge(h, l, N >> (r + 1), LOG_K, DIR)
        else:
            h, l = _merge(h, l, N >> (r + 1), LOG_K, 2)
    return h, l


@triton.jit
def _top_small(h, l, N: tl.constexpr, K: tl.constexpr):
    """The K <= N largest keys of (h, l) [N], descending, by counting (rank = number of larger keys):
    a handful of ops on (N, N) and (N, K) tiles, used for rows of at most SMALL slots. Keys are
    distinct but for the (0, 0) padding, which is the minimum: tied ranks there leave zeros, i.e.
    padding again."""
    larger = (h[None, :] > h[:, None]) | ((h[None, :] == h[:, None]) & (l[None, :] > l[:, None]))
    rank = tl.sum(larger.to(tl.int32), 1)
    sel = rank[:, None] == tl.arange(0, K)[None, :]
    return tl.sum(tl.where(sel, h[:, None], 0), 0), tl.sum(tl.where(sel, l[:, None], 0), 0)


@triton.jit
def _fold(rh, rl, bh, bl, N: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr):
    """Running top K (rh, rl) [K], descending, merged with the keys (bh, bl) [N]: the new running top K."""
    th, tl_ = _top_sorted(bh, bl, N, LOG_N, LOG_K, 0)
    gt = (rh > th) | ((rh == th) & (rl > tl_))
    return _merge(tl.where(gt, rh, th), tl.where(gt, rl, tl_), 1 << LOG_K, LOG_K, 1)


@triton.jit
def _query_norm(q_ptr, Dt, eps_bits, BLOCK_D: tl.constexpr):
    """max(|q|, eps) in fp64 of one query row (the reference's kv_unit denominator)."""
    acc = tl.zeros([BLOCK_D], tl.float64)
    for d0 in range(0, Dt, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + cols, mask=cols < Dt, other=0.0).to(tl.float64)
        acc += q * q
    return tl.maximum(tl.sqrt(tl.sum(acc, 0)), eps_bits.to(tl.int64).to(tl.float64, bitcast=True))


@triton.jit
def _row_ok(pt_ptr, MP, P, BLOCK: tl.constexpr):
    """True when every page-table entry of the row is -1 or a page in [0, P)."""
    bad = tl.zeros([BLOCK], tl.int32)
    for m0 in range(0, MP, BLOCK):
        offs = m0 + tl.arange(0, BLOCK)
        pg = tl.load(pt_ptr + offs, mask=offs < MP, other=-1)
        bad = tl.maximum(bad, ((pg < -1) | (pg >= P)).to(tl.int32))
    return tl.max(bad, 0) == 0


@triton.jit
def _scores(traj_ptr, ts_ptr, live_ptr, pt_ptr, q_ptr, j, L, P, S, Dt, nrm, now, alpha, rest, neg_decay,
            BLOCK_D: tl.constexpr):
    """(score fp32, live, ts) of the logical slots j [BLOCK] of one row (pt_ptr, q_ptr: that row)."""
    in_row = j < L
    page = tl.load(pt_ptr + j // S, mask=in_row, other=-1)
    page = tl.where((page >= 0) & (page < P), page, -1)  # corrupt entries read as absent
    has = page >= 0
    slot = tl.where(has, page * S + j % S, 0)
    live = (tl.load(live_ptr + slot, mask=has, other=0) != 0) & has
    dot = tl.zeros([j.shape[0]], tl.float64)
    for d0 in range(0, Dt, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        in_d = cols < Dt
        u = (tl.load(q_ptr + cols, mask=in_d, other=0.0).to(tl.float64) / nrm).to(tl.float32)
        e = tl.load(traj_ptr + slot[:, None] * Dt + cols[None, :], mask=live[:, None] & in_d[None, :], other=0.0)
        dot += tl.sum(e.to(tl.float64) * u.to(tl.float64)[None, :], 1)
    ts = tl.load(ts_ptr + slot, mask=live, other=0)
    age = (now - ts).to(tl.float64)
    score = (alpha * dot + rest * tl.exp(neg_decay * age)).to(tl.float32)
    return score, live, ts


@triton.jit
def _keys(score, live, ts, j, L):
    """(hi, lo) uint64 ranking keys (module docstring); 0, 0 past the row's end."""
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ranks as +0.0
    bits = score.to(tl.uint32, bitcast=True).to(tl.uint64)
    neg = bits >= 0x80000000
    sf = tl.where(neg, bits ^ 0xFFFFFFFF, bits ^ 0x80000000)
    sf = tl.where(score != score, 0x007FFFFF, sf)  # NaN: -inf's code
    sf = tl.where(live, sf, 0)
    tsf = tl.where(live, ts.to(tl.uint64, bitcast=True) ^ 0x7FFFFFFFFFFFFFFF, 0)
    slotf = 0xFFFFFFFF - j.to(tl.uint64)
    hi = (sf << 32) | (tsf >> 32)
    lo = ((tsf & 0xFFFFFFFF) << 32) | slotf
    in_row = j < L
    return tl.where(in_row, hi, 0), tl.where(in_row, lo, 0)


@triton.jit
def _write_top(rh, rl, ok, slots_ptr, scores_ptr, k, K: tl.constexpr):
    """Decode the running top K (descending) into the row's k outputs; positions K..k-1 (k > K only when
    the row has fewer than k slots) are dead: -1, -inf (NaN scores on a flagged row)."""
    sf = rh >> 32
    live = sf != 0
    bits = tl.where(sf >= 0x80000000, sf ^ 0x80000000, sf ^ 0xFFFFFFFF).to(tl.uint32)
    score = bits.to(tl.float32, bitcast=True)
    score = tl.where(sf == 0x007FFFFF, float("nan"), score)  # -inf's code on a live slot came from NaN
    score = tl.where(live, score, float("-inf"))
    slot = tl.where(live, (0xFFFFFFFF - (rl & 0xFFFFFFFF)).to(tl.int64), -1)
    offs = tl.arange(0, K)
    tl.store(slots_ptr + offs, tl.where(ok, slot, -1), mask=offs < k)
    tl.store(scores_ptr + offs, tl.where(ok, score, float("nan")), mask=offs < k)
    pad = tl.where(ok, float("-inf"), float("nan"))
    for o in range(K, k, K):
        tl.store(slots_ptr + o + offs, tl.full([K], -1, tl.int64), mask=o + offs < k)
        tl.store(scores_ptr + o + offs, tl.full([K], 0.0, tl.float32) + pad, mask=o + offs < k)


@triton.jit(do_not_specialize=["alpha_bits", "rest_bits", "neg_decay_bits", "eps_bits"])
def _topk_kernel(traj_ptr, ts_ptr, live_ptr, pt_ptr, q_ptr, now_ptr, cand_ptr, slots_ptr, scores_ptr,
                 P, S, MP, L, Dt, k, n_chunks, blocks_per_prog, alpha_bits, rest_bits, neg_decay_bits, eps_bits,
                 LOG_K: tl.constexpr, LOG_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, FINAL: tl.constexpr,
                 ONE_SMALL_BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    K: tl.constexpr = 1 << LOG_K
    BLOCK_: tl.constexpr = 1 << LOG_BLOCK
    alpha = alpha_bits.to(tl.int64).to(tl.float64, bitcast=True)  # exact fp64 weights (module docstring)
    rest = rest_bits.to(tl.int64).to(tl.float64, bitcast=True)
    neg_decay = neg_decay_bits.to(tl.int64).to(tl.float64, bitcast=True)
    nrm = _query_norm(q_ptr + b * Dt, Dt, eps_bits, BLOCK_D)
    now = tl.load(now_ptr)
    rh = tl.zeros([K], tl.uint64)
    rl = tl.zeros([K], tl.uint64)
    start = c.to(tl.int64) * blocks_per_prog * BLOCK_
    for i in range(blocks_per_prog):
        j = start + i * BLOCK_ + tl.arange(0, BLOCK_)
        score, live, ts = _scores(traj_ptr, ts_ptr, live_ptr, pt_ptr + b * MP, q_ptr + b * Dt, j, L, P, S, Dt,
                                  nrm, now, alpha, rest, neg_decay, BLOCK_D)
        bh, bl = _keys(score, live, ts, j, L)
        if ONE_SMALL_BLOCK:
            rh, rl = _top_small(bh, bl, BLOCK_, K)
        else:
            rh, rl = _fold(rh, rl, bh, bl, BLOCK_, LOG_BLOCK, LOG_K)
    if FINAL:
        _write_top(rh, rl, _row_ok(pt_ptr + b * MP, MP, P, BLOCK_), slots_ptr + b * k, scores_ptr + b * k, k, K)
    else:
        offs = tl.arange(0, K)
        dst = cand_ptr + (b * 2 * n_chunks + 2 * c) * K  # (B, C, 2, K): hi words, then lo words
        tl.store(dst + offs, rh.to(tl.int64, bitcast=True))
        tl.store(dst + K + offs, rl.to(tl.int64, bitcast=True))


@triton.jit
def _topk_merge_kernel(cand_ptr, pt_ptr, slots_ptr, scores_ptr, P, MP, n_chunks, k,
                       LOG_K: tl.constexpr, LOG_BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    K: tl.constexpr = 1 << LOG_K
    BLOCK_: tl.constexpr = 1 << LOG_BLOCK
    rh = tl.zeros([K], tl.uint64)
    rl = tl.zeros([K], tl.uint64)
    n = n_chunks * K
    for c0 in range(0, n, BLOCK_):
        idx = c0 + tl.arange(0, BLOCK_)
        src = cand_ptr + b * 2 * n + (idx // K) * 2 * K + idx % K
        h = tl.load(src, mask=idx < n, other=0).to(tl.uint64, bitcast=True)
        l = tl.load(src + K, mask=idx < n, other=0).to(tl.uint64, bitcast=True)
        rh, rl = _fold(rh, rl, h, l, BLOCK_, LOG_BLOCK, LOG_K)
    _write_top(rh, rl, _row_ok(pt_ptr + b * MP, MP, P, BLOCK_), slots_ptr + b * k, scores_ptr + b * k, k, K)


@triton.jit(do_not_specialize=["alpha_bits", "rest_bits", "neg_decay_bits", "eps_bits"])
def _relevance_kernel(traj_ptr, ts_ptr, live_ptr, pt_ptr, q_ptr, now_ptr, out_ptr, P, S, MP, L, Dt, blocks_per_prog,
                      alpha_bits, rest_bits, neg_decay_bits, eps_bits, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    alpha = alpha_bits.to(tl.int64).to(tl.float64, bitcast=True)  # exact fp64 weights (module docstring)
    rest = rest_bits.to(tl.int64).to(tl.float64, bitcast=True)
    neg_decay = neg_decay_bits.to(tl.int64).to(tl.float64, bitcast=True)
    nrm = _query_norm(q_ptr + b * Dt, Dt, eps_bits, BLOCK_D)
    ok = _row_ok(pt_ptr + b * MP, MP, P, BLOCK)
    now = tl.load(now_ptr)
    start = c.to(tl.int64) * blocks_per_prog * BLOCK
    for i in range(blocks_per_prog):
        j = start + i * BLOCK + tl.arange(0, BLOCK)
        score, live, ts = _scores(traj_ptr, ts_ptr, live_ptr, pt_ptr + b * MP, q_ptr + b * Dt, j, L, P, S, Dt,
                                  nrm, now, alpha, rest, neg_decay, BLOCK_D)
        score = tl.where(live, score, float("-inf"))
        tl.store(out_ptr + b * L + j, tl.where(ok, score, float("nan")), mask=j < L)


# ---------------------------------------------------------------- host launchers
def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _prepare(traj_pool, ts_pool, live_pool, page_table, query):
    """Contiguous views the kernels index flat; the query in fp32/fp64 (bf16/fp16 widen exactly)."""
    if query.dtype not in (torch.float32, torch.float64):
        query = query.float()
    B = query.shape[0]
    return (traj_pool.contiguous(), ts_pool.contiguous(), live_pool.contiguous().view(torch.uint8),
            page_table[:B].contiguous(), query.contiguous())


def _chunks(B: int, n_blocks: int, device) -> Tuple[int, int]:
    """(chunks per row, blocks per chunk): about PROGRAMS_PER_SM programs per SM over the B rows."""
    if _common.INTERPRET and not SPLIT_ROWS_IN_INTERPRETER:
        return 1, n_blocks  # the interpreter pays per program and per device-function call, not per slot
    want = max(1, -(-PROGRAMS_PER_SM * _common.device_spec(device).sm_count // max(B, 1)))
    per = -(-n_blocks // min(n_blocks, want))
    return -(-n_blocks // per), per


def _weights(alpha: float, decay: float) -> tuple:
    return _bits(alpha), _bits(1.0 - alpha), _bits(-decay), _EPS_BITS


# No fma contraction on a GPU: the reference rounds each fp64 product and sum (the interpreter never fuses)
_FLAGS = {} if _common.INTERPRET else {"enable_fp_fusion": False}


def _block_d(Dt: int) -> int:
    return min(16, next_power_of_2(max(Dt, 1)))


def kv_relevance(traj_pool: torch.Tensor, ts_pool: torch.Tensor, live_pool: torch.Tensor, page_table: torch.Tensor,
                 query: torch.Tensor, now: torch.Tensor, alpha: float, decay: float) -> torch.Tensor:
    """(B, MP*S) fp32 relevance of every logical slot of the first B = query.shape[0] rows (one launch)."""
    P, S, Dt = traj_pool.shape
    B, MP = query.shape[0], page_table.shape[1]
    L = MP * S
    out = torch.empty((B, L), dtype=torch.float32, device=query.device)
    if B * L == 0:
        return out
    traj, ts, live, pt, q = _prepare(traj_pool, ts_pool, live_pool, page_table, query)
    block = min(BLOCK, next_power_of_2(L))
    n_chunks, per = _chunks(B, cdiv(L, block), query.device)
    cfg = _common.Config.make(num_warps=8 if block >= 256 else 4, BLOCK=block, BLOCK_D=_block_d(Dt))
    _common.launch(_relevance_kernel, lambda c: (B, n_chunks),
                   (traj, ts, live, pt, q, now.reshape(1), out, P, S, MP, L, Dt, per, *_weights(alpha, decay)),
                   [cfg], ("kv_relevance",), query.device, "kv_relevance", **_FLAGS)
    return out


def kv_topk(traj_pool: torch.Tensor, ts_pool: torch.Tensor, live_pool: torch.Tensor, page_table: torch.Tensor,
            query: torch.Tensor, now: torch.Tensor, alpha: float, decay: float,
            k: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(slots (B, k) int64, scores (B, k) fp32) as reference.kv_topk, or None when k > K_MAX (or a row
    has 2^31 slots or more).

    One launch when a row fits one chunk of programs, else two (per-chunk top K, then a per-row merge)."""
    P, S, Dt = traj_pool.shape
    B, MP = query.shape[0], page_table.shape[1]
    L = MP * S
    if k > K_MAX or L >= 2**31:  # the key's slot field holds 32 bits
        return None
    dev = query.device
    slots = torch.empty((B, k), dtype=torch.long, device=dev)
    scores = torch.empty((B, k), dtype=torch.float32, device=dev)
    if B * k == 0:
        return slots, scores
    # K = 2^log_k >= min(k, L) candidates are kept (a row has no more than L; the rest is padding)
    log_k = max(min(k, L) - 1, 0).bit_length()
    block = max(min(BLOCK, next_power_of_2(max(L, 1))), 1 << log_k)
    log_block = block.bit_length() - 1
    traj, ts, live, pt, q = _prepare(traj_pool, ts_pool, live_pool, page_table, query)
    n_chunks, per = _chunks(B, max(cdiv(L, block), 1), dev)
    final = n_chunks == 1  # (S = 0 below: L = 0, every slot masked; 1 keeps j // S defined)
    small = final and per == 1 and block <= SMALL
    cand = torch.empty((B, n_chunks, 2, 1 << log_k) if not final else (1,), dtype=torch.long, device=dev)
    warps = 8 if block >= 256 else 4
    cfg = _common.Config.make(num_warps=warps, LOG_K=log_k, LOG_BLOCK=log_block, BLOCK_D=_block_d(Dt), FINAL=final,
                              ONE_SMALL_BLOCK=small)
    _common.launch(_topk_kernel, lambda c: (B, n_chunks),
                   (traj, ts, live, pt, q, now.reshape(1), cand, slots, scores, P, max(S, 1), MP, L, Dt, k, n_chunks,
                    per, *_weights(alpha, decay)),
                   [cfg], ("kv_topk", log_k, log_block, final, small), dev, "kv_topk", **_FLAGS)
    if not final:
        cfg = _common.Config.make(num_warps=warps, LOG_K=log_k, LOG_BLOCK=log_block)
        _common.launch(_topk_merge_kernel, lambda c: (B,), (cand, pt, slots, scores, P, MP, n_chunks, k),
                       [cfg], ("kv_topk_merge", log_k, log_block), dev, "kv_topk merge")
    return slots, scores
