"""Attention of one forward's queries over a paged store's old entries ++ the forward's own tokens, without a gather.

Used by :meth:`trajops.kv_forward.ForwardKVCache.attend` (and through it by the transformers attention
``"trajops_paged"`` of trajops/hf_attention.py). The keys of a query are two disjoint sets:

* the **old** entries (live before this forward, minus the ones a key-padding mask hides): every new query of a
  row sees all of them, which is what ``trajops::paged_temperature_attention`` computes straight from the page
  pools (given a page table and a live mask that describe the store *before* this forward);
* the forward's **new** tokens, dense (B, Hkv, n, D): causal among themselves (or as a given mask says). The
  paged op takes them as ``k_new``/``v_new`` (query i: new keys 0..i) in the same softmax: one call for a decode
  step or a short causal chunk. Otherwise (long chunks, other masks, a mask during a CUDA-graph capture)
  ``trajops.temperature_attention`` attends them apart (a decode step needs no kernel: one key, out = v).

Then both halves return their log-sum-exp, and the exact softmax over the union is their log-sum-exp merge:
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
from .reference._common import merge_by_lse

__all__ = ["attend_old_and_new", "causal_new_keys", "host_reads_allowed", "merge_by_lse"]


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
                       new_mask: Optional[Tensor] = None, new_causal: Optional[bool] = None,
                       validated: bool = False) -> Tensor:
    """Attention (tau = 1) of ``query`` over the old entries of one layer of ``store`` ++ the new ``keys``/``values``.

    query: (B, Hq, n, D). store: a :class:`~trajops.PagedTrajectoryKVCache` whose ``layer`` pools still hold the old
    entries (the new tokens not yet written over evicted slots). page_table: (>= B, MP) int64 and visible: (P, S)
    bool, the pages and the old entries the queries may see (not the store's own tensors if layer 0 of this forward
    has already evicted). keys, values: (B, Hkv, n, D) / (B, Hkv, n, Dv) the forward's tokens. has_old: False skips
    the pool read (nothing live before this forward). scale: default 1/sqrt(D). new_mask: None (causal) or bool
    (B, 1 or Hq, n, n), True = attend, over the new keys. new_causal: :func:`causal_new_keys` of new_mask if the
    caller already knows it (the layers of one forward share one mask: ForwardKVCache asks once per forward).
    validated: a call with the same shapes, devices, scale, page_table and visible already passed the paged op's
    checks (ForwardKVCache: layer 0 of the same forward); where the op runs Triton, the launcher is then called
    directly (see :func:`_paged_call`).
    Returns (B, Hq, n, Dv) in query's dtype.
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    n = query.shape[2]
    if new_causal is None:
        new_causal = causal_new_keys(new_mask, n, query.device)
    k_pool, v_pool = store.layer_pools(layer)
    dt = store.dtype  # the paged op reads the pools in their dtype; casts only when the model's differs (each
    same = query.dtype == dt  # no-op .to() is still a dispatch, and a decode step makes four per layer)
    if has_old and new_causal:
        # one op: the pools and the new tokens (k_new / v_new, causal) in a single softmax, no merge
        q = query if same else query.to(dt)
        out = _paged_call(q, k_pool, v_pool, page_table, visible, scale, _cast(keys, dt), _cast(values, dt),
                          validated=validated)[0]
        return out if same else out.to(query.dtype)
    out_new, lse_new = _attend_new(query, keys, values, scale, new_mask)
    if not has_old:
        return _cast(out_new, query.dtype)
    q = query if same else query.to(dt)
    out_old, lse_old = _paged_call(q, k_pool, v_pool, page_table, visible, scale, validated=validated)
    return _cast(merge_by_lse(out_old, lse_old, out_new, lse_new)[0], query.dtype)


_DIRECT: dict = {}  # device type -> the Triton launcher module where the op dispatches there to Triton, else None


def _direct_launcher(device: torch.device):
    kind = device.type
    if kind not in _DIRECT:
        from ._library import triton_runs_on

        mod = None
        if triton_runs_on(device):
            from .triton_kernels import paged_temperature_attention as mod
        _DIRECT[kind] = mod
    return _DIRECT[kind]


def _paged_call(q: Tensor, k_pool: Tensor, v_pool: Tensor, page_table: Tensor, visible: Tensor, scale: float,
                k_new: Optional[Tensor] = None, v_new: Optional[Tensor] = None, *,
                validated: bool = False) -> Tuple[Tensor, Tensor]:
    """trajops::paged_temperature_attention (tau = 1) -> (out, lse). ``validated`` (the same call's arguments passed
    the op's checks earlier in this forward) and a Triton backend on q's device: the launcher directly, which is
    what the op would run after its checks. On a GPU a decode step is host-bound; the op's Python checks and its
    dispatch cost about 20 us per layer there (30 layers: ~0.6 ms per token). Inference only (no autograd here;
    ForwardKVCache refuses inputs that need a gradient)."""
    tau = _unit_tau(q)
    mod = _direct_launcher(q.device) if validated else None
    if mod is not None:
        return mod.paged_attention(q, k_pool, v_pool, page_table, visible, tau, scale, None, k_new=k_new, v_new=v_new)
    return torch.ops.trajops.paged_temperature_attention(q, k_pool, v_pool, page_table, visible, tau, None, scale,
                                                         k_new, v_new)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


_UNIT_TAU: dict = {}


def _unit_tau(q: Tensor) -> Tensor:
    """tau = 1 as a 0-d tensor in q's compute dtype on q's device, made once (a decode step asks per layer)."""
    key = (q.dtype, q.device)
    t = _UNIT_TAU.get(key)
    if t is None:
        t = _UNIT_TAU[key] = torch.ones((), dtype=_compute_dtype(q.dtype), device=q.device)
    return t


# The op scores its new keys with a loop per query (O(n^2 D)): for longer spans of new tokens the dense
# kernel + a merge is faster.
_MAX_FUSED_NEW = 16


def host_reads_allowed(device: torch.device) -> bool:
    """Whether the once-per-forward host reads of a mask (ForwardKVCache) may be made on ``device``: on CPU (free),
    on CUDA outside a CUDA-graph capture (a read cannot be captured; transformers syncs each step anyway, so the
    first read of a forward waits for work that was already due and later ones cost a round trip). Never on other
    devices (their cost is unknown): the paths that need no read run there."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def causal_new_keys(new_mask: Optional[Tensor], n: int, device: torch.device) -> bool:
    """Whether the new keys are seen causally (query i: new keys 0..i), what the paged op's k_new/v_new compute.

    None is causal. A given mask is read on the host: free on CPU; on CUDA one sync, which ForwardKVCache makes
    once per forward (transformers has already synced that step to build the mask), and which then saves every
    layer the separate attention over the new keys and the log-sum-exp merge (~15 launches). Not while a CUDA
    graph is being captured (a read cannot be captured): the new keys then run apart. Other devices: apart."""
    if n > _MAX_FUSED_NEW:
        return False
    if new_mask is None:
        return True
    if not host_reads_allowed(device):
        return False
    if n == 1:  # a decode step: its one query sees its own token
        return bool(new_mask.all())
    return bool((new_mask == torch.ones(n, n, dtype=torch.bool, device=new_mask.device).tril()).all())
