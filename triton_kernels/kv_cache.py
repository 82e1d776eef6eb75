"""Triton kernels of the paged trajectory KV cache (semantics: trajops/reference/kv_cache.py).

Only ``@triton.jit`` kernels and their host launchers live here; op registration is in
trajops/ops/kv_cache.py. Public launchers:

* :func:`kv_scores`  ``(traj_pool (P, S, Dt), ts_pool (P, S), live_pool (P, S), phys (B, L),
  unit_query (B, Dt), now ()) -> (B, L)`` fp32 relevance of the physical slots ``phys`` (-1 = none),
  -inf where there is no live entry. Fused gather + fp64 dot + recency; rounded once to fp32 like
  the reference, so rankings agree with the other backends up to double rounding.
* :func:`kv_write`  ``(k_pool (P, S, H, D), v_pool, written (B, n), k (B, H, n, D), v)``: copies
  each written token's heads into its physical slot, skipping -1 (no host sync, capturable).

kv_relevance and kv_topk (k <= 128) on CUDA are the fused score-and-select kernels of
triton_kernels/kv_topk.py; kv_evict_append_ on a decode step (one token per row, rows of at most 2048
slots) is triton_kernels/kv_evict.py. Otherwise the ranking and the page bookkeeping of kv_evict_append_
(and kv_topk with k > 128) are device-side torch ops around kv_scores (trajops/reference/kv_cache.py with
this scorer): fixed shapes, no host sync.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_power_of_2

__all__ = ["kv_scores", "kv_write"]


@triton.jit
def _scores_kernel(traj_ptr, ts_ptr, live_ptr, phys_ptr, q_ptr, now_ptr, out_ptr, L, Dt,
                   alpha_hi, alpha_lo, rest_hi, rest_lo, decay_hi, decay_lo,
                   BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    in_row = offs < L
    phys = tl.load(phys_ptr + b * L + offs, mask=in_row, other=-1)
    has = phys >= 0
    slot = tl.where(has, phys, 0)
    live = tl.load(live_ptr + slot, mask=has, other=0) != 0
    dot = tl.zeros((BLOCK_L,), dtype=tl.float64)
    for d0 in range(0, Dt, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        in_d = cols < Dt
        e = tl.load(traj_ptr + slot[:, None] * Dt + cols[None, :], mask=live[:, None] & in_d[None, :], other=0.0)
        q = tl.load(q_ptr + b * Dt + cols, mask=in_d, other=0.0)
        dot += tl.sum(e.to(tl.float64) * q.to(tl.float64)[None, :], axis=1)
    now = tl.load(now_ptr)
    ts = tl.load(ts_ptr + slot, mask=live, other=0)
    age = (now - ts).to(tl.float64)
    # float arguments arrive as fp32 on the GPU: each fp64 constant comes as an (hi, lo) fp32 pair, and
    # scalar * fp64 tensor promotes exactly, so hi*x + lo*x is the fp64 product to ~1e-16
    recency = tl.exp(-(decay_hi * age + decay_lo * age))
    score = (alpha_hi * dot + alpha_lo * dot) + (rest_hi * recency + rest_lo * recency)
    score = tl.where(live, score.to(tl.float32), float("-inf"))
    tl.store(out_ptr + b * L + offs, score, mask=in_row)


def kv_scores(traj_pool: torch.Tensor, ts_pool: torch.Tensor, live_pool: torch.Tensor, phys: torch.Tensor,
              unit_query: torch.Tensor, now: torch.Tensor, alpha: float, decay: float) -> torch.Tensor:
    """(B, L) fp32 relevance of physical slots phys (B, L) for unit queries (B, Dt); -inf when not live."""
    B, L = phys.shape
    Dt = traj_pool.shape[-1]
    out = torch.empty((B, L), dtype=torch.float32, device=phys.device)
    if B * L == 0:
        return out
    BLOCK_L = 64
    BLOCK_D = min(64, next_power_of_2(max(Dt, 1)))
    grid = (B, cdiv(L, BLOCK_L))
    _scores_kernel[grid](traj_pool.contiguous(), ts_pool.contiguous(), live_pool.contiguous().view(torch.uint8),
                         phys.contiguous(), unit_query.float().contiguous(), now.reshape(1), out, L, Dt,
                         *_split(alpha), *_split(1.0 - alpha), *_split(decay), BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
    return out


def _split(x: float) -> tuple:
    """x as hi + lo, two fp32 values whose fp64 sum is x to ~48 bits (the reference scores in fp64)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


@triton.jit
def _write_kernel(k_pool_ptr, v_pool_ptr, k_ptr, v_ptr, written_ptr, n, slots, H, D, kb, kh, kt, kd, vb, vh, vt, vd,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # one launch writes K and V (two launches cost a decode step one more host-side launch per layer)
    tok = tl.program_id(0)  # b * n + t
    b = tok // n
    t = tok % n
    ph = tl.load(written_ptr + tok)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    # a skipped token (-1) writes no head; nor does a slot outside the pool (corrupt input on a GPU,
    # where checking it on the host would sync: it is dropped instead of written out of bounds)
    h_end = tl.where((ph >= 0) & (ph < slots), H, 0)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = (heads[:, None] < h_end) & (cols[None, :] < D)
        dst = (tl.where(ph >= 0, ph, 0) * H + heads[:, None]) * D + cols[None, :]
        x = tl.load(k_ptr + b * kb + heads[:, None] * kh + t * kt + cols[None, :] * kd, mask=m)
        tl.store(k_pool_ptr + dst, x, mask=m)
        y = tl.load(v_ptr + b * vb + heads[:, None] * vh + t * vt + cols[None, :] * vd, mask=m)
        tl.store(v_pool_ptr + dst, y, mask=m)


def kv_write(k_pool: torch.Tensor, v_pool: torch.Tensor, written: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """k_pool/v_pool (P, S, H, D) in place: token (b, t) -> physical slot written[b, t] (skip -1 and slots >= P*S)."""
    B, n = written.shape
    H, D = k_pool.shape[2], k_pool.shape[3]
    if B * n == 0 or H * D == 0:
        return
    BLOCK_H = min(16, next_power_of_2(H))
    BLOCK_D = min(128, next_power_of_2(D))
    w = written.contiguous()
    dt = k_pool.dtype  # (v_pool's too: checked by the op)
    # torch's rounding (the interpreter's bf16 cast truncates); new tokens only, no copy when the dtypes agree
    ks = k if k.dtype == dt else k.to(dt)
    vs = v if v.dtype == dt else v.to(dt)
    _write_kernel[(B * n, cdiv(H, BLOCK_H))](k_pool, v_pool, ks, vs, w, n, k_pool.shape[0] * k_pool.shape[1], H, D,
                                             *ks.stride(), *vs.stride(), BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D)
