"""Reference of trajops::paged_temperature_attention: gather the live slots, then temperature attention.

The kernels read K/V straight from the page pools; this reference gathers a dense copy first and
runs the reference attention with a key mask, which defines what the kernels must compute.

NaN/Inf rule: that of trajops.temperature_attention (see reference/temperature_attention.py) with
the live slots of row b (its pages' live slots, or the listed ``slots`` that are live) as the keys
every query of row b may attend. So: dead slots, slots of pages the row's table does not list, and
unlisted slots never matter, whatever they hold; a row without a key gives out 0 and lse -inf;
otherwise a query row is NaN (out and lse) when c = scale / tau is not finite, when its q row holds
a NaN/Inf, or when the k or v row of any of its keys (in its kv head) does.

Corrupt page tables: the op raises an IndexError on CPU for an entry of rows 0..B-1 outside [-1, P);
this function (and the CUDA kernel, where checking would sync) reads such an entry as no page and
makes every query row of that batch row NaN when one of its keys (a logical slot, or a listed one)
lies on it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._common import compute_dtype
from .kv_cache import kv_logical_to_physical
from .temperature_attention import temperature_attention, temperature_coefficient

__all__ = ["paged_gather", "paged_temperature_attention"]


def paged_gather(
    k_pool: Tensor, v_pool: Tensor, page_table: Tensor, live_pool: Tensor, B: int, slots: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """Dense keys (B, Hkv, L, D), values (B, Hkv, L, Dv) and the key mask (B, L) of rows 0..B-1.

    k_pool (P, S, Hkv, D), v_pool (P, S, Hkv, Dv): one layer's pools. page_table (>= B, MP) int64,
    -1 = no page. live_pool (P, S) bool. Keys are the logical slots 0..MP*S-1 of each row (L =
    MP*S), or the logical slots listed in ``slots`` (B, k) (L = k; -1 or out of range = no key).
    The mask is True on slots that map to a live entry; other keys read as 0.
    """
    S, Hkv = k_pool.shape[1], k_pool.shape[2]
    pt = page_table[:B]
    # entries outside [-1, P) are read as no page (the op checks them on CPU; see the module docstring)
    phys = kv_logical_to_physical(torch.where((pt >= -1) & (pt < k_pool.shape[0]), pt, -1), S)
    if slots is not None:
        L = phys.shape[1]
        inside = (slots >= 0) & (slots < L)
        phys = torch.where(inside, phys.gather(1, slots.clamp(0, max(L - 1, 0))), -1)
    idx = phys.clamp_min(0)
    ok = (phys >= 0) & live_pool.reshape(-1)[idx]
    k = torch.where(ok[..., None, None], k_pool.reshape(-1, Hkv, k_pool.shape[3])[idx], 0).transpose(1, 2)
    v = torch.where(ok[..., None, None], v_pool.reshape(-1, Hkv, v_pool.shape[3])[idx], 0).transpose(1, 2)
    return k, v, ok


def paged_temperature_attention(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, page_table: Tensor, live_pool: Tensor, tau: Tensor,
    slots: Optional[Tensor] = None, scale: float = 1.0, k_new: Optional[Tensor] = None,
    v_new: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """out (B, Hq, n, Dv) in the compute dtype and lse (B, Hq, n): every query of row b attends every key
    of row b (see :func:`paged_gather`); tau as in trajops.temperature_attention (NaN rows for a tau
    that is not positive finite, 0 / -inf for a row without keys).

    k_new (B, Hkv, n, D), v_new (B, Hkv, n, Dv): optional new tokens, not in the pools, appended after the
    row's keys: query i also attends new keys 0..i (causal among the new tokens; so every query has a key)."""
    B, Hq, n, _ = q.shape
    k, v, ok = paged_gather(k_pool, v_pool, page_table, live_pool, B, slots)
    mask = ok[:, None, None, :]
    if k_new is not None:
        k, v = torch.cat([k, k_new.to(k.dtype)], dim=2), torch.cat([v, v_new.to(v.dtype)], dim=2)
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        mask = torch.cat([mask.expand(B, 1, n, ok.shape[1]), causal.expand(B, 1, n, n)], dim=3)
    has_keys = mask.any(-1)
    c = temperature_coefficient(tau, (B, Hq, n), scale, compute_dtype(q.dtype), has_keys)
    out, lse = temperature_attention(q, k, v, c, mask, False)
    corrupt = _corrupt_rows(page_table[:B], k_pool.shape[0], k_pool.shape[1], slots)[:, None, None]
    return torch.where(corrupt[..., None], torch.nan, out), torch.where(corrupt, torch.nan, lse)


def _corrupt_rows(pt: Tensor, P: int, S: int, slots: Optional[Tensor]) -> Tensor:
    """(B,) bool: a key of the row (any logical slot, or a listed in-range one) lies on an entry
    outside [-1, P) — the keys the CUDA kernel reads, and flags."""
    bad = ((pt < -1) | (pt >= P)).repeat_interleave(S, dim=1)  # per logical slot
    if slots is not None:
        L = bad.shape[1]
        inside = (slots >= 0) & (slots < L)
        bad = inside & bad.gather(1, slots.clamp(0, max(L - 1, 0)))
    return bad.any(1)
