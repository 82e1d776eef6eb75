"""Attention of one forward's queries over a paged store's old entries ++ the forward's own tokens, without a gather.

Used by :meth:`trajops.kv_forward.ForwardKVCache.attend` (and through it by the transformers attention
``"trajops_paged"`` of trajops/hf_attention.py). The keys of a query are two disjoint sets:

* the **old** entries (live before this forward, minus the ones a key-padding mask hides): every new query of a
  row sees all of them, which is what ``trajops::paged_temperature_attention`` computes straight from the page
  pools (given a page table and a live mask that describe the store *before* this forward);
* the forward's **new** tokens, dense (B, Hkv, n, D): causal among themselves (or as a given mask says), which
  the paged op cannot express (it gives all n queries the same keys); ``trajops.temperature_attention`` with
  ``causal=True`` does, and a decode step (n = 1) needs no kernel at all (one key: out = v, lse = scale q.k).

Both halves return their log-sum-exp, so the exact softmax over the union is their log-sum-exp merge:
``out = (e^{lse_a} out_a + e^{lse_b} out_b) / (e^{lse_a} + e^{lse_b})``, computed against the larger lse.
A query with no key in either half gives 0 (as the ops do for a row without keys), never NaN.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .ops import paged_temperature_attention as _paged  # noqa: F401  (registers trajops::paged_temperature_attention)
from .ops.temperature_attention import temperature_attention
from .reference._common import compute_dtype as _compute_dtype

__all__ = ["attend_old_and_new", "merge_by_lse"]


def merge_by_lse(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Softmax attention over the union of two disjoint key sets from each set's (out, lse).

    out_a, out_b: (B, H, n, Dv); lse_a, lse_b: (B, H, n), -inf for a query without keys in that set.
    Returns (B, H, n, Dv) in the compute dtype (fp32, fp64 for fp64 lse); 0 where neither set has a key.
    """
    cd = _compute_dtype(lse_a.dtype)
    lse_a, lse_b = lse_a.to(cd), lse_b.to(cd)
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(m == float("-inf"), 0.0, m)  # no key anywhere: both weights exp(-inf) = 0
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    den = wa + wb
    num = wa.unsqueeze(-1) * out_a.to(cd) + wb.unsqueeze(-1) * out_b.to(cd)
    return num / torch.where(den > 0, den, 1.0).unsqueeze(-1)


def _attend_new(query: Tensor, keys: Tensor, values: Tensor, scale: float,
                mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(out (B, Hq, n, Dv), lse (B, Hq, n)) of the queries over the new tokens: causal, or as ``mask`` says."""
    B, Hq, n, D = query.shape
    Hkv, Dv = keys.shape[1], values.shape[3]
    if n > 1:
        return temperature_attention(query, keys, values, 1.0, causal=mask is None, attn_mask=mask, scale=scale,
                                     return_lse=True)
    # decode: each query's only new key is its own token (GQA: a group of g query heads shares one kv head)
    g, cd = Hq // Hkv, _compute_dtype(query.dtype)
    lse = scale * (query.to(cd).reshape(B, Hkv, g, D) * keys.to(cd).reshape(B, Hkv, 1, D)).sum(-1)
    lse = lse.reshape(B, Hq, 1)
    out = values.reshape(B, Hkv, 1, Dv).expand(B, Hkv, g, Dv).reshape(B, Hq, 1, Dv)
    if mask is not None:  # (B, 1 or Hq, 1, 1): a masked self key leaves the query with only old keys
        lse = torch.where(mask[..., 0], lse, float("-inf"))
    return out, lse


def attend_old_and_new(query: Tensor, store, layer: int, page_table: Tensor, visible: Tensor, keys: Tensor,
                       values: Tensor, *, has_old: bool = True, scale: Optional[float] = None,
                       new_mask: Optional[Tensor] = None) -> Tensor:
    """Attention (tau = 1) of ``query`` over the old entries of one layer of ``store`` ++ the new ``keys``/``values``.

    query: (B, Hq, n, D). store: a :class:`~trajops.PagedTrajectoryKVCache` whose ``layer`` pools still hold the old
    entries (the new tokens not yet written over evicted slots). page_table: (>= B, MP) int64 and visible: (P, S)
    bool, the pages and the old entries the queries may see (not the store's own tensors if layer 0 of this forward
    has already evicted). keys, values: (B, Hkv, n, D) / (B, Hkv, n, Dv) the forward's tokens. has_old: False skips
    the pool read (nothing live before this forward). scale: default 1/sqrt(D). new_mask: None (causal) or bool
    (B, 1 or Hq, n, n), True = attend, over the new keys.
    Returns (B, Hq, n, Dv) in query's dtype.
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    out_new, lse_new = _attend_new(query, keys, values, scale, new_mask)
    if not has_old:
        return out_new.to(query.dtype)
    q = query.to(store.dtype)  # the paged op reads the pools in their dtype
    tau = torch.ones((), dtype=_compute_dtype(q.dtype), device=q.device)
    out_old, lse_old = torch.ops.trajops.paged_temperature_attention(
        q, store.k_pool[layer], store.v_pool[layer], page_table, visible, tau, None, scale)
    return merge_by_lse(out_old, lse_old, out_new, lse_new).to(query.dtype)
