"""Triton kernels of decode attention read straight from a paged KV cache (semantics:
trajops/reference/paged_temperature_attention.py; op registration: trajops/ops/paged_temperature_attention.py).

Public launcher:

* :func:`paged_attention` ``(q, k_pool, v_pool, page_table, live_pool, tau, scale, slots) -> (out, lse)``

q (B, Hq, n, D) any strides; k_pool (P, S, Hkv, D), v_pool (P, S, Hkv, Dv) any strides (one layer);
page_table (>= B, MP) int64, -1 = no page; live_pool (P, S) bool; tau broadcastable to (B, Hq, n), any
float dtype, read through its broadcast strides; the kernels form c = scale / tau in the
compute dtype (fp32, fp64 for fp64), NaN where tau is invalid; slots None (the keys of row b are its
logical slots 0..MP*S-1) or (B, k) int64 logical slots (-1 / out of range = no key, repeats count).
Logical slot j of row b lives at page page_table[b, j // S], offset j % S; it is a key iff that page
is >= 0 and live_pool[page, offset]. out (B, Hq, n, Dv) in q's dtype, lse (B, Hq, n) in the compute dtype.
Forming c inside the kernels matters on the GPU: decode attention is launch-bound at these sizes,
and the host-side coefficient cost ~8 small launches, more than the attention itself.

Flash-decoding design (no dense gather copy, no host sync, shapes fixed by the cache so the launch is
CUDA-graph capturable):
  split kernel  grid (B * Hkv, num_splits, cdiv(G * n, BLOCK_M)). A program owns the G * n query rows
                that read one kv head (G = Hq / Hkv; row r is head hk * G + r // n, query r % n), so
                every key is loaded once for the whole group, and one contiguous chunk of the row's
                logical slots (or of its ``slots`` list). It gathers BLOCK_N keys at a time through
                the page table by pointer (masked loads: pages that are -1 and dead slots are never
                read), runs an online softmax in base 2 in fp32 (fp64 for fp64), and writes its
                partial (m, l, acc) to scratch; with a single split it normalizes and writes out/lse
                itself (no scratch, no merge).
  merge kernel  grid (B * Hq * n,): combines the splits' partials of one row; with new tokens
                (k_new / v_new, query i sees new keys 0..i) it then scores them itself, one
                online-softmax step per 16 new keys (elementwise products: one query row), so that a
                decode step is 2 launches and never the dense kernel + a log-sum-exp merge. With new
                keys the merge always runs (no direct path); with no pool key (L = 0) it runs alone.
  num_splits    from the row's slot count (MP * S or k, known from shapes), so that the split grid
                holds about TARGET_PROGRAMS_PER_SM (2) programs per SM; chunks are whole BLOCK_N blocks.
  tiles         fixed (no autotuning): 4 warps, BLOCK_M = G * n padded to 16..64 rows (tl.dot needs 16),
                BLOCK_N = 64 keys unless one stage of K + V tiles would pass 32 KB (fp32 with D = 128:
                32 keys), up to 3 pipeline stages within 96 KB of shared memory.
NaN/Inf (the rule: trajops/reference/paged_temperature_attention.py): bad tau rows (c not finite)
run with c = 0 (every key then counts, so l > 0 iff the row has a key) and are written NaN at the
end where the row has a key; rows without a key keep m = -inf, l = 0 and give out = 0, lse = -inf
whatever their c. Only a row's keys are loaded (masked loads), so dead slots and unlisted pages never
matter, and every query row of a program attends the same keys. A key's score that is not finite (a
NaN/Inf in the q row or in its k row: such a dot product never is) is made NaN, so that the row turns
NaN (never a silent -inf); a NaN/Inf in a key's v row reaches the outputs of the rows that attend it
(p * v, 0 * Inf included), and an output row that is not finite is written all NaN, lse included.
Cost: a select per score and a test per output element.
fp64: tl.dot is avoided (Triton 3.6 fails to compile some fp64 kernels with byte-mask loads on sm90),
the products are elementwise multiply + tl.sum over small tiles; fp64 is for accuracy checks. The same
elementwise path serves bf16 under the interpreter, whose bf16 tl.dot is wrong.
"""
from __future__ import annotations

import functools
import struct
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, Config, cdiv, launch, next_power_of_2, plan

__all__ = ["paged_attention"]



@triton.jit
def _gather_keys(PT, LIVE, SLOTS, b, pos, hi, L_logical, S, NP, sptb, sptp, slp, sls, sslb, ssln,
                 HAS_SLOTS: tl.constexpr):
    """(page, offset, ok, corrupt) of the keys at positions ``pos`` of row b's key list; ok False = no key.

    A page-table entry outside [-1, NP) (corrupt input; the host checks it only for CPU tensors, a
    check here on the GPU would sync) reads nothing: it counts as a key read from page 0 with
    ``corrupt`` set, and the caller makes its value NaN, so the row comes out NaN (flagged)."""
    in_range = pos < hi
    if HAS_SLOTS:
        j = tl.load(SLOTS + b * sslb + pos * ssln, mask=in_range, other=-1)
        in_range = (j >= 0) & (j < L_logical)
    else:
        j = pos
    j = tl.where(in_range, j, 0).to(tl.int32)  # < MP * S: 32-bit division; page ids stay int64
    page = tl.load(PT + b * sptb + (j // S) * sptp, mask=in_range, other=-1)
    off = j % S
    corrupt = in_range & ((page < -1) | (page >= NP))
    has_page = (page >= 0) & (page < NP)
    page = tl.where(has_page, page, 0)
    live = tl.load(LIVE + page * slp + off * sls, mask=has_page, other=0) != 0
    return page, off, (has_page & live) | corrupt, corrupt


@triton.jit
def _softmax_block(acc, l_i, m_i, q, c2, k, v, ok, cdt: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step (base 2) over a gathered (BLOCK_N keys) tile; keys with ok False are skipped."""
    if USE_DOT:
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(cdt)
    else:
        s = tl.sum(q.to(cdt)[:, None, :] * k.to(cdt)[None, :, :], 2)
    s = s * c2[:, None]
    s = tl.where(ok[None, :], tl.where(tl.abs(s) < float("inf"), s, float("nan")), float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # rows with no key so far keep m = -inf: shifting by 0 there keeps every exp2 at 0
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new).to(cdt)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if USE_DOT:
        pv = tl.dot(p.to(v.dtype), v, input_precision=PREC).to(cdt)
    else:
        pv = tl.sum(p[:, :, None] * v.to(cdt)[None, :, :], 1)
    return acc * alpha[:, None] + pv, l_i, m_new


@triton.jit
def _coefficient(TAU, b, head, qi, stb, sth, stn, scale_hi, scale_lo, mask, cdt: tl.constexpr):
    """(c, bad): c = scale / tau in cdt, bad where tau is not positive finite (then c = NaN)."""
    t = tl.load(TAU + b * stb + head * sth + qi * stn, mask=mask, other=1.0).to(cdt)
    # float arguments are fp32 on the GPU: scale comes as hi + lo so that fp64 rows get an fp64 scale;
    # a true division, as the CPU backends form it (a subnormal tau overflows it: bad); on a GPU fp32
    # `/` is within 2 ulp, so only a tau within an ulp or two of overflowing c may be judged differently
    c = (tl.zeros_like(t) + scale_hi + scale_lo) / t
    bad = ~((t > 0) & (t < float("inf")) & (tl.abs(c) < float("inf")))
    return tl.where(bad, float("nan"), c).to(cdt), bad


@triton.jit
def _split_kernel(Q, K, V, PT, LIVE, SLOTS, TAU, O, LSE, MPART, LPART, APART,
                  sqb, sqh, sqm, sqd, skp, sks, skh, skd, svp, svs, svh, svd,
                  sptb, sptp, slp, sls, sslb, ssln, stb, sth, stn, scale_hi, scale_lo,
                  Hkv, G, n, R, S, L, L_logical, chunk, D, Dv, NS, NP,
                  HAS_SLOTS: tl.constexpr, DIRECT: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr,
                  SKIP_EMPTY: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    bhk = tl.program_id(0)
    split = tl.program_id(1)
    b = bhk // Hkv
    hk = bhk % Hkv
    cdt = LSE.dtype.element_ty
    LOG2E = tl.full([], 1.4426950408889634, cdt)
    LN2 = tl.full([], 0.6931471805599453, cdt)

    offs_r = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = offs_r < R
    head = hk * G + offs_r // n
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < Dv
    q_ptrs = Q + b * sqb + head[:, None] * sqh + (offs_r % n)[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    row = bhk * R + offs_r  # = (b * Hq + head) * n + query: the row of c, out and lse
    c, bad_tau = _coefficient(TAU, b, head, offs_r % n, stb, sth, stn, scale_hi, scale_lo, r_ok, cdt)
    c2 = tl.where(bad_tau, 0.0, c) * LOG2E  # bad-tau rows run with c = 0, made NaN at the end

    K += hk * skh
    V += hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), cdt)
    l_i = tl.zeros([BLOCK_M], cdt)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], cdt)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, L)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        page, off, ok, corrupt = _gather_keys(PT, LIVE, SLOTS, b, pos, hi, L_logical, S, NP, sptb, sptp, slp, sls,
                                              sslb, ssln, HAS_SLOTS)
        k = tl.load(K + page[:, None] * skp + off[:, None] * sks + offs_d[None, :] * skd,
                    mask=ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + page[:, None] * svp + off[:, None] * svs + offs_dv[None, :] * svd,
                    mask=ok[:, None] & dv_ok[None, :], other=0.0)
        v = tl.where(corrupt[:, None], float("nan"), v)
        if SKIP_EMPTY:
            # a block without a key (unallocated pages, evicted runs) costs its index loads only
            if tl.max(ok.to(tl.int32), 0) != 0:
                acc, l_i, m_i = _softmax_block(acc, l_i, m_i, q, c2, k, v, ok, cdt, USE_DOT, PREC)
        else:
            acc, l_i, m_i = _softmax_block(acc, l_i, m_i, q, c2, k, v, ok, cdt, USE_DOT, PREC)

    if DIRECT:
        empty = l_i == 0
        l_safe = tl.where(empty, 1.0, l_i).to(cdt)
        out = acc / l_safe[:, None]
        finite = tl.min((tl.abs(out) < float("inf")).to(tl.int32), 1) != 0  # (a NaN/Inf in a v row)
        bad = (bad_tau | ~finite) & (~empty)
        out = tl.where(bad[:, None], float("nan"), out)
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
        lse = tl.where(bad, float("nan"), lse)
        tl.store(O + row[:, None] * Dv + offs_dv[None, :], out.to(O.dtype.element_ty),
                 mask=r_ok[:, None] & dv_ok[None, :])
        tl.store(LSE + row, lse, mask=r_ok)
    else:
        part = row * NS + split
        tl.store(MPART + part, m_i, mask=r_ok)
        tl.store(LPART + part, l_i, mask=r_ok)
        tl.store(APART + part[:, None] * Dv + offs_dv[None, :], acc, mask=r_ok[:, None] & dv_ok[None, :])


@triton.jit
def _merge_kernel(Q, KN, VN, TAU, O, LSE, MPART, LPART, APART, D, Dv, NS, Hq, G, n,
                  sqb, sqh, sqm, sqd, sknb, sknh, sknm, sknd, svnb, svnh, svnm, svnd, stb, sth, stn, scale_hi, scale_lo,
                  HAS_NEW: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_SC: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr):
    """One output row: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over its NS splits (NS may be
    0: no pool key), then, with HAS_NEW, the online-softmax update over the row's new keys 0..i (query i)."""
    row = tl.program_id(0)
    cdt = LSE.dtype.element_ty
    LN2 = tl.full([], 0.6931471805599453, cdt)
    LOG2E = tl.full([], 1.4426950408889634, cdt)
    b = row // (Hq * n)
    head = (row // n) % Hq
    qi = row % n
    offs_s = tl.arange(0, BLOCK_S)
    m_all = tl.load(MPART + row * NS + offs_s, mask=offs_s < NS, other=float("-inf"))
    m_i = tl.max(m_all, 0)
    m_use = tl.where(m_i == float("-inf"), 0.0, m_i).to(cdt)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < Dv
    l_i = tl.zeros([], cdt)
    acc = tl.zeros([BLOCK_DV], cdt)
    for s0 in range(0, NS, BLOCK_SC):
        sc = s0 + tl.arange(0, BLOCK_SC)
        s_ok = sc < NS
        w = tl.math.exp2(tl.load(MPART + row * NS + sc, mask=s_ok, other=float("-inf")) - m_use)
        l_i += tl.sum(w * tl.load(LPART + row * NS + sc, mask=s_ok, other=0.0), 0)
        a = tl.load(APART + (row * NS + sc)[:, None] * Dv + offs_dv[None, :], mask=s_ok[:, None] & dv_ok[None, :],
                    other=0.0)
        acc += tl.sum(w[:, None] * a, 0)
    t = tl.load(TAU + b * stb + head * sth + qi * stn).to(cdt)
    c = (tl.zeros_like(t) + scale_hi + scale_lo) / t
    bad_tau = ~((t > 0) & (t < float("inf")) & (tl.abs(c) < float("inf")))
    if HAS_NEW:
        # the row's new keys 0..qi (same rules as _softmax_block; bad-tau rows with c = 0): at most n keys of
        # one kv head, products elementwise in cdt (one query row: no tile for tl.dot)
        c2 = tl.where(bad_tau, 0.0, c).to(cdt) * LOG2E
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q = tl.load(Q + b * sqb + head * sqh + qi * sqm + offs_d * sqd, mask=d_ok, other=0.0).to(cdt)
        KN += b * sknb + (head // G) * sknh
        VN += b * svnb + (head // G) * svnh
        for j0 in range(0, qi + 1, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            ok = j <= qi
            k = tl.load(KN + j[:, None] * sknm + offs_d[None, :] * sknd, mask=ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(VN + j[:, None] * svnm + offs_dv[None, :] * svnd, mask=ok[:, None] & dv_ok[None, :],
                        other=0.0)
            s = tl.sum(q[None, :] * k.to(cdt), 1) * c2
            s = tl.where(ok, tl.where(tl.abs(s) < float("inf"), s, float("nan")), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new).to(cdt)
            p = tl.math.exp2(s - m_use)
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(cdt), 0)
            m_i = m_new
    empty = l_i == 0
    l_safe = tl.where(empty, 1.0, l_i).to(cdt)
    out = acc / l_safe
    # (a NaN/Inf in the v row of a key)
    finite = tl.min((tl.abs(tl.where(dv_ok, out, 0.0)) < float("inf")).to(tl.int32), 0) != 0
    bad = (bad_tau | ~finite) & (~empty)
    out = tl.where(bad, float("nan"), out)
    lse = tl.where(empty, float("-inf"), (m_use + tl.math.log2(l_safe)) * LN2)
    lse = tl.where(bad, float("nan"), lse)
    tl.store(O + row * Dv + offs_dv, out.to(O.dtype.element_ty), mask=dv_ok)
    tl.store(LSE + row, lse)


# --------------------------------------------------------------------------------------------
# launch configuration (fixed, no autotuning: device time is scarce and every autotune key would
# compile every candidate on first use)
# --------------------------------------------------------------------------------------------

_MAX_SPLITS = 512  # also bounds the merge kernel's (BLOCK_S,) vector of split maxima

# Knobs for tuning sweeps on a GPU (bench), not for users:
TARGET_PROGRAMS_PER_SM = 2  # split-kernel programs per SM that num_splits aims at
FP32_PRECISION = "ieee"  # fp32 products as the reference computes them; "tf32x3" is the faster option to try
SKIP_EMPTY = True  # branch around the math of blocks without a key (loads are masked either way)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return TARGET_PROGRAMS_PER_SM * _sm_count(index)
    return 8  # interpreter: a few splits, so that the merge path is exercised by small tests


@functools.lru_cache(maxsize=None)  # ~30 us of Python per call otherwise: a decode step is launch-bound
def _candidates(dtype: torch.dtype, R: int, D: int, Dv: int) -> Tuple[Config, ...]:
    """The planned tiles of _config, then fewer stages and shorter key blocks (each with its
    shared-memory estimate: stages x (K + V tiles) + the q tile), for _common.launch."""
    cfg = _config(dtype, R, D, Dv)
    if INTERPRET:
        return (Config.make(**cfg),)
    esize = torch.finfo(dtype).bits // 8
    fixed = {k: v for k, v in cfg.items() if k not in ("BLOCK_N", "num_warps", "num_stages")}
    out, bn = [], cfg["BLOCK_N"]
    while True:
        for st in range(cfg["num_stages"], 0, -1):
            smem = st * bn * (cfg["BLOCK_D"] + cfg["BLOCK_DV"]) * esize + cfg["BLOCK_M"] * cfg["BLOCK_D"] * esize
            out.append(Config.make(smem, cfg["num_warps"], st, BLOCK_N=bn, **fixed))
        if bn <= 16:
            return tuple(out)
        bn //= 2


def _config(dtype: torch.dtype, R: int, D: int, Dv: int) -> dict:
    bd, bdv = next_power_of_2(D), next_power_of_2(Dv)
    if dtype == torch.float64:
        # elementwise products on (BLOCK_M, BLOCK_N, BLOCK_D) tiles: keep them near 4k elements
        bm = min(16, next_power_of_2(R))
        bn = max(1, min(16, 4096 // (bm * max(bd, bdv))))
        return dict(USE_DOT=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, num_warps=4, num_stages=1)
    # tl.dot needs >= 16 rows/cols; groups of more than 64 rows take several row blocks (keys reloaded)
    bm = min(64, max(16, next_power_of_2(R)))
    bd, bdv = max(16, bd), max(16, bdv)
    esize = torch.finfo(dtype).bits // 8
    # the q tile and the fp32 accumulator live in registers across the key loop: past ~128 words per
    # thread (4 warps) ptxas spills (AOT, sm_90: fp32 D = 256 with 64 rows took 255 registers + 1 KB of stack)
    while bm > 16 and bm * (bd * esize // 4 + bdv) > 128 * 128:
        bm //= 2
    cfg = dict(USE_DOT=True, BLOCK_M=bm, BLOCK_D=bd, BLOCK_DV=bdv)
    if INTERPRET:
        # the interpreter's bf16 tl.dot returns garbage (numpy has no bf16): products elementwise there
        return dict(cfg, BLOCK_N=16, USE_DOT=dtype != torch.bfloat16)
    # K + V tiles of one stage <= 32 KB (fp32 with D = 128 takes 32 keys), up to 3 stages in 96 KB:
    # two programs then fit an SM's shared memory (228 KB on an H100)
    bn = 64
    while bn > 16 and bn * (bd + bdv) * esize > 32 * 1024:
        bn //= 2
    stages = max(1, min(3, (96 * 1024) // (bn * (bd + bdv) * esize)))
    return dict(cfg, BLOCK_N=bn, num_warps=4, num_stages=stages)


@functools.lru_cache(maxsize=64)
def _split_scale(scale: float) -> Tuple[float, float]:
    """(hi, lo): scale rounded to fp32 and the remainder (kernel float arguments are fp32 on the GPU; fp64
    rows add lo back). Cached: a model calls with one scale, at every layer of every step."""
    hi = struct.unpack("f", struct.pack("f", scale))[0]
    return hi, scale - hi


def _num_splits(device: torch.device, programs: int, L: int, block_n: int) -> Tuple[int, int]:
    """(num_splits, chunk): chunk a multiple of block_n, every split non-empty."""
    blocks = cdiv(L, block_n)
    want = max(1, min(_MAX_SPLITS, blocks, cdiv(_target_programs(device), programs)))
    chunk = cdiv(blocks, want) * block_n
    return cdiv(L, chunk), chunk


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, page_table: torch.Tensor,
                    live_pool: torch.Tensor, tau: torch.Tensor, scale: float, slots: Optional[torch.Tensor],
                    num_splits: Optional[int] = None, k_new: Optional[torch.Tensor] = None,
                    v_new: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, n, Dv) in q's dtype and lse (B, Hq, n) in the compute dtype (fp64 for fp64 q, else
    fp32); see the module docstring. tau: any float dtype, broadcastable to (B, Hq, n), read through
    its (broadcast) strides; c = scale / tau is formed in the kernels (no extra launches).

    k_new, v_new: None or (B, Hkv, n, D) / (B, Hkv, n, Dv), any strides, q's dtype: the new tokens'
    keys, query i also attending new keys 0..i in the same softmax. The merge kernel scores them
    (n(n+1)/2 dot products per kv head: meant for a decode step or a short chunk), so a decode step
    is these two launches, with no dense attention and no log-sum-exp merge of separate results.

    ``num_splits`` forces the number of key chunks per row (tests of the merge); None picks it from
    the shapes. No host sync: the launch depends on shapes only (CUDA-graph capturable).
    """
    B, Hq, n, D = q.shape
    S, Hkv, Dv = k_pool.shape[1], k_pool.shape[2], v_pool.shape[3]
    MP = page_table.shape[1]
    out = torch.empty((B, Hq, n, Dv), dtype=q.dtype, device=q.device)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.empty((B, Hq, n), dtype=cdt, device=q.device)
    L_logical = MP * S
    L = L_logical if slots is None else slots.shape[1]
    if B * Hq * n == 0:
        return out, lse
    has_new = k_new is not None
    if L == 0 and not has_new:
        return out.zero_(), lse.fill_(float("-inf"))
    tau = tau.expand(B, Hq, n)  # a view: stride 0 on the broadcast dimensions
    scale_hi, scale_lo = _split_scale(scale)
    G = Hq // Hkv
    R = G * n
    rows = B * Hq * n
    if L == 0:  # only the new keys: the merge kernel alone, over zero splits
        ns, direct = 0, False
        mpart = lpart = apart = lse  # never read (NS = 0)
    else:
        cands = _candidates(q.dtype, R, D, Dv)
        key = (q.dtype, cands[0]["BLOCK_M"], cands[0]["BLOCK_D"], cands[0]["BLOCK_DV"], slots is not None)
        def what() -> str:  # formatted only for an error or a fallback warning
            return f"paged_temperature_attention on {q.device} ({q.dtype}, D={D}, Dv={Dv}, {R} rows per kv head)"
        cfg = plan(_split_kernel, cands, key, q.device, what)
        # chunks are whole planned key blocks; a fallback to a shorter block keeps them whole
        m_blocks = cdiv(R, cfg["BLOCK_M"])
        if num_splits is None:
            ns, chunk = _num_splits(q.device, B * Hkv * m_blocks, L, cfg["BLOCK_N"])
        else:
            chunk = cdiv(cdiv(L, max(1, min(num_splits, _MAX_SPLITS))), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
            ns = cdiv(L, chunk)
        direct = ns == 1 and not has_new  # the new keys are scored by the merge kernel
        if direct:
            mpart = lpart = apart = lse  # never written
        else:
            mpart = torch.empty((rows, ns), dtype=cdt, device=q.device)
            lpart = torch.empty((rows, ns), dtype=cdt, device=q.device)
            apart = torch.empty((rows, ns, Dv), dtype=cdt, device=q.device)
        live8 = live_pool.view(torch.uint8)
        slots_t = page_table if slots is None else slots  # never read without slots
        slot_strides = (0, 0) if slots is None else tuple(slots.stride())
        launch(_split_kernel, lambda c: (B * Hkv, ns, m_blocks),
               (q, k_pool, v_pool, page_table, live8, slots_t, tau, out, lse, mpart, lpart, apart,
                *q.stride(), *k_pool.stride(), *v_pool.stride(), *page_table.stride(), *live8.stride(), *slot_strides,
                *tau.stride(), scale_hi, scale_lo,
                Hkv, G, n, R, S, L, L_logical, chunk, D, Dv, ns, k_pool.shape[0]),
               cands, key, q.device, what,
               HAS_SLOTS=slots is not None, DIRECT=direct,
               PREC=FP32_PRECISION if q.dtype == torch.float32 else "tf32",  # (halves ignore it)
               SKIP_EMPTY=SKIP_EMPTY)
    if not direct:
        block_s = next_power_of_2(max(ns, 1))
        kn, vn = (k_new, v_new) if has_new else (q, q)  # never read without new keys
        kn_strides = tuple(kn.stride()) if has_new else (0,) * 4
        vn_strides = tuple(vn.stride()) if has_new else (0,) * 4
        _merge_kernel[(rows,)](q, kn, vn, tau, out, lse, mpart, lpart, apart, D, Dv, ns, Hq, G, n,
                               *q.stride(), *kn_strides, *vn_strides, *tau.stride(), scale_hi, scale_lo,
                               HAS_NEW=has_new, BLOCK_S=block_s, BLOCK_SC=min(16, block_s),
                               BLOCK_DV=next_power_of_2(Dv),
                               # (1: unused without new keys, so that those launches compile once per Dv)
                               BLOCK_D=next_power_of_2(D) if has_new else 1,
                               BLOCK_J=min(16, next_power_of_2(n)) if has_new else 1)
    return out, lse
