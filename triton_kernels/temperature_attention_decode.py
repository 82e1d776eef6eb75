"""Decode steps (Tq = 1) of the dense temperature attention, through the paged kernels.

A decode step is memory-bound: the dense forward kernel runs B * Hq programs (64 at B=4, H=16), too few to
stream K and V at an H100/H200's bandwidth, and its key-flag pass (NaN/Inf detection) reads K and V a second
time before it. The paged kernels (triton_kernels/paged_temperature_attention.py) are flash-decoding: key
splits spread over the SMs, then a merge; they follow the same NaN/Inf rules (their reference is this op
over the live keys) without a flag pass. Here each batch row is one "page" of Tk slots, read through K's and
V's own strides, and a key-padding mask is the live map: 2 launches, reading K and V once.

Used by :func:`triton_kernels.temperature_attention.attention_fwd` when Tq = 1 and the mask (if any) has one
value per (batch, key). Causal does not matter at Tq = 1 (bottom-right: the query sees every key). The
backward is unchanged (it takes out and lse, however they were computed). Not yet run on a GPU.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import paged_temperature_attention as _paged

__all__ = ["ENABLED", "attention", "per_key"]

ENABLED = True  # knob for GPU sweeps (bench) and tests, not for users
_PAGE_TABLES: dict = {}  # (device, B) -> arange(B) as (B, 1) int64: one page per row, made once
_ALL_LIVE: dict = {}  # device -> a 0-d True, expanded to (B, Tk) without memory


def per_key(mask: Optional[torch.Tensor]) -> bool:
    """Whether a decode step's mask (B, Hq, 1, Tk) is a key-padding mask: one value per (batch, key)."""
    return mask is None or (mask.dtype == torch.bool and (mask.shape[1] == 1 or mask.stride(1) == 0))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tau: torch.Tensor, scale: float,
              mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, 1, Dv) in q's dtype, lse (B, Hq, 1) in the compute dtype) for q (B, Hq, 1, D), k (B, Hkv,
    Tk, D), v (B, Hkv, Tk, Dv) any strides, Tk >= 1, tau broadcastable to (B, Hq, 1), mask None or bool
    (B, Hq, 1, Tk) with :func:`per_key`."""
    B, Tk, dev = q.shape[0], k.shape[2], q.device
    pt = _PAGE_TABLES.get((dev, B))
    if pt is None:
        pt = _PAGE_TABLES[(dev, B)] = torch.arange(B, dtype=torch.int64, device=dev).view(B, 1)
    if mask is None:
        one = _ALL_LIVE.get(dev)
        if one is None:
            one = _ALL_LIVE[dev] = torch.ones((), dtype=torch.bool, device=dev)
        live = one.expand(B, Tk)
    else:
        live = mask[:, 0, 0, :]
    # (B, Hkv, Tk, D) -> (P = B, S = Tk, Hkv, D): views
    return _paged.paged_attention(q, k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3), pt, live, tau, scale, None)
