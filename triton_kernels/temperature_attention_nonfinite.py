"""NaN/Inf handling shared by the temperature-attention Triton kernels (the design: the NaN/Inf
paragraph of temperature_attention.py's docstring; the rule: trajops/reference/temperature_attention.py).

* :func:`key_flags` ``(k, v) -> (flags, first)``: one read of k and v; per key whether its k or v row
  holds a NaN/Inf, and per (batch, kv head) the first such key.
* :func:`key_flags_varlen`: the same over packed documents (FIRST per (document, kv head)).
* jit helpers: _serves (which launch serves a head), _nan_on_bad_q, _key_bad, _key_bias, _doc_span.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_power_of_2

__all__ = ["any_hostile", "key_flags", "key_flags_varlen", "NO_FLAGGED_KEY"]


ALWAYS_HOSTILE = False  # the AOT resource check (tests/triton_resources.py) captures every launch


def any_hostile(first: torch.Tensor, Tk: int, host=None) -> bool:
    """Whether a HOSTILE launch has a head to serve. Known only by reading the flags, which on a GPU
    would sync: there the launch always runs (its programs for clean heads return at once). On CPU
    tensors (the interpreter, where every program costs Python time) the read is free and a clean
    call skips the launch."""
    if ALWAYS_HOSTILE or first.device.type != "cpu":
        return True
    return bool((first < Tk).any()) or (host is not None and bool((host != 0).any()))


@triton.jit
def _serves(FIRST, HOST, kv, Tk, HAS_HOST: tl.constexpr, HOSTILE: tl.constexpr):
    """Whether a launch with this HOSTILE serves (batch, kv head) kv. A head is hostile when one of its
    keys is flagged (FIRST[kv] < Tk: a NaN/Inf in its k or v row) or, with HAS_HOST, HOST[kv] != 0 (the
    backward's rows with a NaN/Inf or a NaN lse). The fast kernels serve the other heads and never meet
    a NaN/Inf in k, v (nor, in the backward, in q, dO); a second launch of the same kernel with
    HOSTILE (small tiles: its extra work must not make the fast tiles spill) serves hostile heads."""
    bad = tl.load(FIRST + kv) < Tk
    if HAS_HOST:
        bad = bad | (tl.load(HOST + kv) != 0)
    if HOSTILE:
        return bad
    return ~bad


@triton.jit
def _nan_on_bad_q(c, q, cdt: tl.constexpr):
    """c with NaN on the rows whose q holds a NaN/Inf: all their scores are then NaN (never -inf).
    Tested on the exponent bits (no conversion of the tile to fp32: fewer registers)."""
    if q.dtype == tl.bfloat16:
        bad = (q.to(tl.int16, bitcast=True) & 0x7F80) == 0x7F80
    elif q.dtype == tl.float16:
        bad = (q.to(tl.int16, bitcast=True) & 0x7C00) == 0x7C00
    elif q.dtype == tl.float32:
        bad = (q.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000
    else:
        bad = ~(tl.abs(q) < float("inf"))
    return tl.where(tl.max(bad.to(tl.int32), 1) != 0, float("nan"), c)


@triton.jit
def _key_bad(KFh, start_n, cols, Tk):
    """(BN,) bool: keys whose k or v row holds a NaN/Inf (flags of _key_flags_kernel); False past Tk."""
    return tl.load(KFh + start_n + cols, mask=start_n + cols < Tk, other=0) != 0


@triton.jit
def _key_bias(kb, cdt: tl.constexpr):
    """(BN,) NaN on flagged keys, 0 elsewhere: added to the scores (one FMA with the scaling)."""
    return tl.where(kb, float("nan"), 0.0).to(cdt)


@triton.jit
def _doc_span(CU, doc, total):
    """(start (int64), length (int32)) of packed document ``doc`` from the offsets CU, both clamped into
    [0, total] so that no access leaves the tensor whatever the offsets hold (invalid offsets are
    reported by a separate device flag: trajops.varlen.cu_seqlens_invalid)."""
    s = tl.minimum(tl.maximum(tl.load(CU + doc).to(tl.int64), 0), total)
    e = tl.minimum(tl.maximum(tl.load(CU + doc + 1).to(tl.int64), s), total)
    return s, (e - s).to(tl.int32)


@triton.jit
def _key_flags_kernel(K, V, KF, FIRST, CU_K, skb, skh, skn, skd, svb, svh, svn, svd, Hkv, Tk, D, Dv, total_k,
                      VARLEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_DV: tl.constexpr, cdt: tl.constexpr):
    """KF[b * Hkv + h, j] = 1 where k[b, h, j] or v[b, h, j] holds a NaN/Inf, else 0; FIRST[b * Hkv + h]
    = min(its initial Tk, the first such j). Grid (B * Hkv, cdiv(Tk, BLOCK_T)).
    VARLEN (packed k (total_k, Hkv, D): b is the document, Tk the longest document): KF is (Hkv,
    total_k) by absolute key, FIRST[doc * Hkv + h] the first flagged key relative to the document's
    start, left at its initial value (int32 max) when there is none."""
    bh = tl.program_id(0)
    b64, h64 = tl.cast(bh // Hkv, tl.int64), tl.cast(bh % Hkv, tl.int64)
    offs = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    if VARLEN:
        k0, Tk = _doc_span(CU_K, b64, total_k)
        t64 = k0 + tl.cast(offs, tl.int64)
    else:
        t64 = tl.cast(offs, tl.int64)
    t_ok = offs < Tk
    dc = tl.arange(0, BLOCK_D)
    dvc = tl.arange(0, BLOCK_DV)
    k = tl.load(K + b64 * skb + h64 * skh + t64[:, None] * skn + dc[None, :] * skd,
                mask=t_ok[:, None] & (dc[None, :] < D), other=0.0).to(cdt)
    v = tl.load(V + b64 * svb + h64 * svh + t64[:, None] * svn + dvc[None, :] * svd,
                mask=t_ok[:, None] & (dvc[None, :] < Dv), other=0.0).to(cdt)
    bad = (tl.max((~(tl.abs(k) < float("inf"))).to(tl.int32), 1)
           | tl.max((~(tl.abs(v) < float("inf"))).to(tl.int32), 1))
    if VARLEN:
        tl.store(KF + h64 * total_k + t64, bad.to(tl.uint8), mask=t_ok)
        tl.atomic_min(FIRST + bh, tl.min(tl.where(bad != 0, offs, 2147483647), 0))
    else:
        tl.store(KF + tl.cast(bh, tl.int64) * Tk + offs, bad.to(tl.uint8), mask=t_ok)
        tl.atomic_min(FIRST + bh, tl.min(tl.where(bad != 0, offs, Tk), 0))


def key_flags(k, v) -> Tuple[torch.Tensor, torch.Tensor]:
    """(flags (B * Hkv, Tk) uint8: the key's k or v row holds a NaN/Inf; first (B * Hkv,) int32: the
    first flagged key, Tk if none). One read of k and v, two launches, no host sync."""
    B, Hkv, Tk, D = k.shape
    Dv = v.shape[3]
    flags = torch.empty((B * Hkv, Tk), dtype=torch.uint8, device=k.device)
    first = torch.full((B * Hkv,), Tk, dtype=torch.int32, device=k.device)
    bd, bdv = next_power_of_2(D), next_power_of_2(Dv)
    block_t = max(1, min(next_power_of_2(Tk), 4096 // max(bd, bdv)))
    cdt = tl.float64 if k.dtype == torch.float64 else tl.float32
    _key_flags_kernel[(B * Hkv, cdiv(Tk, block_t))](
        k, v, flags, first, first, *k.stride(), *v.stride(), Hkv, Tk, D, Dv, 0,
        VARLEN=False, BLOCK_T=block_t, BLOCK_D=bd, BLOCK_DV=bdv, cdt=cdt)
    return flags, first


NO_FLAGGED_KEY = 2147483647  # FIRST of a (document, kv head) without a flagged key (varlen)


def key_flags_varlen(k, v, cu_k, max_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed k (total_k, Hkv, D), v (total_k, Hkv, Dv), offsets cu_k (N + 1,): (flags (Hkv, total_k)
    uint8 by absolute key; first (N * Hkv,) int32: per (document, kv head) the first flagged key
    relative to the document's start, NO_FLAGGED_KEY if none). Offsets are clamped into [0, total_k].
    ``max_k`` >= 1 (the caller handles empty packs)."""
    total_k, Hkv, D = k.shape
    Dv = v.shape[2]
    N = cu_k.shape[0] - 1
    flags = torch.zeros((Hkv, total_k), dtype=torch.uint8, device=k.device)
    first = torch.full((N * Hkv,), NO_FLAGGED_KEY, dtype=torch.int32, device=k.device)
    if N == 0:
        return flags, first
    bd, bdv = next_power_of_2(D), next_power_of_2(Dv)
    block_t = max(1, min(next_power_of_2(max_k), 4096 // max(bd, bdv)))
    cdt = tl.float64 if k.dtype == torch.float64 else tl.float32
    # (B, H, T, D) strides with a zero batch stride: the document start comes from cu_k
    _key_flags_kernel[(N * Hkv, cdiv(max_k, block_t))](
        k, v, flags, first, cu_k, 0, k.stride(1), k.stride(0), k.stride(2), 0, v.stride(1), v.stride(0), v.stride(2),
        Hkv, max_k, D, Dv, total_k, VARLEN=True, BLOCK_T=block_t, BLOCK_D=bd, BLOCK_DV=bdv, cdt=cdt)
    return flags, first
