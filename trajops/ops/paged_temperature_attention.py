"""trajops::paged_temperature_attention — decode attention read straight from a paged KV cache.

This module registers the op's fake impl and its kernels by device, and exposes the public function
(which takes a :class:`~trajops.PagedTrajectoryKVCache`). The CPU kernel lives in
csrc/cpu/paged_temperature_attention.cpp, the Triton kernels in
triton_kernels/paged_temperature_attention.py, the semantics in
trajops/reference/paged_temperature_attention.py (gather the live slots + temperature attention).

Canonical op arguments:
  q (B, Hq, n, D); k_pool (P, S, Hkv, D) and v_pool (P, S, Hkv, Dv): one layer's page pools, q's
  dtype, Hq % Hkv == 0; page_table (>= B, MP) int64 (-1 = no page; rows 0..B-1 are read);
  live_pool (P, S) bool; tau: float, rank <= 3, broadcastable to (B, Hq, n); slots: None (every
  logical slot 0..MP*S-1) or (B, k) int64 logical slots, -1 or out of range = no key;
  scale: None (1/sqrt(D)) or a finite float > 0; k_new (B, Hkv, n, D), v_new (B, Hkv, n, Dv): None, or both,
  q's dtype: n new tokens not in the pools, query i also attends new keys 0..i (causal).
Outputs: out (B, Hq, n, Dv) in q's dtype, lse (B, Hq, n) fp32 (fp64 for fp64 inputs). No autograd.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import reference
from .._library import register_kernels
from ..reference._common import compute_dtype
from ._checks import broadcastable as _broadcastable
from ._checks import check, check_type, check_value

__all__ = ["paged_temperature_attention"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_OP = "paged_temperature_attention"


# Messages match csrc/cpu/paged_temperature_attention.cpp so every backend fails the same way.
def _check(q: Tensor, k_pool: Tensor, v_pool: Tensor, page_table: Tensor, live_pool: Tensor, tau: Tensor,
           slots: Optional[Tensor], scale: Optional[float], k_new: Optional[Tensor] = None,
           v_new: Optional[Tensor] = None) -> None:
    check_value(q.dim() == 4, lambda: f"{_OP}: q must have shape (B, Hq, n, D), got {list(q.shape)}")
    check_value(
        k_pool.dim() == 4 and v_pool.dim() == 4,
        lambda: f"{_OP}: k_pool and v_pool must have shape (P, S, Hkv, D), got {list(k_pool.shape)} and "
        f"{list(v_pool.shape)}",
    )
    check_type(
        q.dtype in _DTYPES, lambda: f"{_OP}: q must be float32, float64, float16 or bfloat16, got {q.dtype}"
    )
    check_type(
        k_pool.dtype == q.dtype and v_pool.dtype == q.dtype,
        lambda: f"{_OP}: q, k_pool and v_pool must have one dtype, got {q.dtype}, {k_pool.dtype} and {v_pool.dtype}",
    )
    B, Hq, _, D = q.shape
    P, S, Hkv = k_pool.shape[0], k_pool.shape[1], k_pool.shape[2]
    check_value(
        tuple(v_pool.shape[:3]) == (P, S, Hkv) and v_pool.shape[3] >= 1,
        lambda: f"{_OP}: v_pool must have shape (P, S, Hkv, Dv) = ({P}, {S}, {Hkv}, Dv) like k_pool, got "
        f"{list(v_pool.shape)}",
    )
    check_value(
        k_pool.shape[3] == D and D >= 1 and S >= 1,
        lambda: f"{_OP}: q and k_pool must have one head size D >= 1, got q {list(q.shape)} and k_pool "
        f"{list(k_pool.shape)}",
    )
    check_value(
        Hkv >= 1 and Hq % Hkv == 0,
        lambda: f"{_OP}: the pools' Hkv={Hkv} heads must divide q's Hq={Hq}",
    )
    check_type(
        page_table.dtype == torch.long and live_pool.dtype == torch.bool,
        lambda: f"{_OP}: page_table must be int64 and live_pool bool, got {page_table.dtype} and {live_pool.dtype}",
    )
    check_value(
        page_table.dim() == 2 and page_table.shape[0] >= B,
        lambda: f"{_OP}: page_table must have shape (>= B, MP) with B={B}, got {list(page_table.shape)}",
    )
    check_value(
        tuple(live_pool.shape) == (P, S),
        lambda: f"{_OP}: live_pool must have shape (P, S) = ({P}, {S}), got {list(live_pool.shape)}",
    )
    check_type(tau.is_floating_point(), lambda: f"{_OP}: tau must be a floating-point tensor, got {tau.dtype}")
    check_value(
        _broadcastable(tau.shape, (B, Hq, q.shape[2])),
        lambda: f"{_OP}: tau must be broadcastable to (B, Hq, n) = ({B}, {Hq}, {q.shape[2]}), got shape "
        f"{list(tau.shape)}",
    )
    if slots is not None:
        check_type(slots.dtype == torch.long, lambda: f"{_OP}: slots must be int64, got {slots.dtype}")
        check_value(
            slots.dim() == 2 and slots.shape[0] == B,
            lambda: f"{_OP}: slots must have shape (B, k) with B={B}, got {list(slots.shape)}",
        )
    check_value((k_new is None) == (v_new is None), lambda: f"{_OP}: k_new and v_new must be given together")
    if k_new is not None:
        check_type(
            k_new.dtype == q.dtype and v_new.dtype == q.dtype,
            lambda: f"{_OP}: q, k_new and v_new must have one dtype, got {q.dtype}, {k_new.dtype} and {v_new.dtype}",
        )
        n, Dv = q.shape[2], v_pool.shape[3]
        check_value(
            tuple(k_new.shape) == (B, Hkv, n, D),
            lambda: f"{_OP}: k_new must have shape (B, Hkv, n, D) = ({B}, {Hkv}, {n}, {D}), got {list(k_new.shape)}",
        )
        check_value(
            tuple(v_new.shape) == (B, Hkv, n, Dv),
            lambda: f"{_OP}: v_new must have shape (B, Hkv, n, Dv) = ({B}, {Hkv}, {n}, {Dv}), got "
            f"{list(v_new.shape)}",
        )
    # one chained comparison (no generator, no tuple): this runs before every launch of a decode step
    qd = q.device
    check(
        k_pool.device == qd and v_pool.device == qd and page_table.device == qd and live_pool.device == qd
        and tau.device == qd and (slots is None or slots.device == qd)
        and (k_new is None or (k_new.device == qd and v_new.device == qd)),
        lambda: f"{_OP}: every tensor must be on q's device ({qd}), got "
        + str(_devices(k_pool, v_pool, page_table, live_pool, tau, slots, k_new, v_new)),
    )
    if scale is not None:
        check_value(
            math.isfinite(scale) and scale > 0, lambda: f"{_OP}: scale must be a finite number > 0, got {scale}"
        )


def _devices(*tensors: Optional[Tensor]) -> list:
    return [str(t.device) for t in tensors if t is not None]


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


@torch.library.register_fake("trajops::paged_temperature_attention")
def _fake(q, k_pool, v_pool, page_table, live_pool, tau, slots=None, scale=None, k_new=None, v_new=None):
    _check(q, k_pool, v_pool, page_table, live_pool, tau, slots, scale, k_new, v_new)
    B, Hq, n, _ = q.shape
    return q.new_empty((B, Hq, n, v_pool.shape[3])), q.new_empty((B, Hq, n), dtype=compute_dtype(q.dtype))


def _check_pages(q: Tensor, k_pool: Tensor, page_table: Tensor) -> None:
    """CPU only (reads values; C++ does the same): rows 0..B-1 of the page table hold -1 or a page of
    the pool. On CUDA the kernel flags such rows NaN instead (no host sync)."""
    if page_table.device.type != "cpu":
        return
    B, P = q.shape[0], k_pool.shape[0]
    pt = page_table[:B]
    bad = torch.nonzero((pt < -1) | (pt >= P))
    if bad.numel():
        b, p = int(bad[0, 0]), int(bad[0, 1])
        raise IndexError(f"{_OP}: page_table[{b}, {p}] = {int(pt[b, p])} is not a page of the pool (P={P})")


def _reference(q, k_pool, v_pool, page_table, live_pool, tau, slots=None, scale=None, k_new=None, v_new=None):
    _check(q, k_pool, v_pool, page_table, live_pool, tau, slots, scale, k_new, v_new)
    _check_pages(q, k_pool, page_table)
    out, lse = reference.paged_temperature_attention(
        q, k_pool, v_pool, page_table, live_pool, tau, slots, _scale(q, scale), k_new, v_new
    )
    return out.to(q.dtype).contiguous(), lse.contiguous()


def _triton(q, k_pool, v_pool, page_table, live_pool, tau, slots=None, scale=None, k_new=None, v_new=None):
    _check(q, k_pool, v_pool, page_table, live_pool, tau, slots, scale, k_new, v_new)
    _check_pages(q, k_pool, page_table)
    from ..triton_kernels import paged_temperature_attention as kernels

    # the kernels read tau through its broadcast strides and form c = scale / tau themselves; the merge
    # kernel scores the new keys (k_new / v_new) in the same softmax: a decode step is two launches
    return kernels.paged_attention(q, k_pool, v_pool, page_table, live_pool, tau, _scale(q, scale), slots,
                                   k_new=k_new, v_new=v_new)


def _has_triton_kernels() -> bool:
    import importlib.util

    return importlib.util.find_spec("trajops.triton_kernels.paged_temperature_attention") is not None


register_kernels(_OP, _reference, _triton if _has_triton_kernels() else None)


def paged_temperature_attention(
    q: Tensor,
    cache,
    layer: int,
    tau: Union[Tensor, float],
    *,
    scale: Optional[float] = None,
    slots: Optional[Tensor] = None,
    k_new: Optional[Tensor] = None,
    v_new: Optional[Tensor] = None,
    return_lse: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention of new queries over the live entries of one layer of a paged KV cache (inference).

    ``softmax(scale * q k^T / tau) v`` over the keys of each row, read straight from the cache's
    page pools through its page table: no dense (B, H, S, D) copy is made.

    Args:
        q: (B, Hq, n, D) queries of the first B rows of ``cache`` (B <= cache.max_batch), in the
            cache's dtype. Hq a multiple of the cache's num_kv_heads (GQA/MQA). All n queries of a
            row see the same pool keys (no causal order among them): append the new tokens first, then
            attend, or pass them as ``k_new``/``v_new``.
        cache: a :class:`~trajops.PagedTrajectoryKVCache`.
        layer: which layer's K/V pools to read.
        tau: positive temperature, broadcastable to (B, Hq, n): a float, a 0-d tensor, (Hq, 1),
            (1, Hq, 1), (B, 1, n), (B, Hq, n)... any float dtype. A row with no live key gives out 0
            and lse -inf; otherwise a query row is NaN (out and lse) when scale / tau is not finite
            (tau <= 0, NaN, inf or subnormal), or when its q row or the k or v row of one of its
            keys holds a NaN/Inf. Dead slots and pages the row does not list never matter.
        scale: multiplies the logits; default 1/sqrt(D).
        slots: optional (B, k) int64 logical slots to attend instead of every live slot (e.g. the
            top-k of :meth:`~trajops.PagedTrajectoryKVCache.topk`, Quest-style sparse retrieval);
            -1, out-of-range and dead slots are skipped; a slot listed twice counts twice.
        k_new, v_new: optional (B, Hkv, n, D) / (B, Hkv, n, Dv) K/V of the n query tokens, not (yet) in the
            pools, both or neither, q's dtype: query i also attends new keys 0..i (causal), in the same
            softmax. This is the attention of a decode step (n = 1: the token's own key) or a short chunk
            whose K/V are written to the cache afterwards, in one call. The new keys are scored per query
            (O(n^2 D) per head): for long chunks, ``temperature_attention`` over them merged by lse is faster.
        return_lse: also return the log-sum-exp of each row's logits (to merge with attention over
            other keys, e.g. a dense local window).

    Returns:
        out (B, Hq, n, Dv) in q's dtype; with return_lse, (out, lse) with lse (B, Hq, n) fp32 (fp64
        for fp64 inputs).

    Not differentiable (inference): raises if q, tau, k_new or v_new requires grad while grad mode is on.
    Same as ``torch.ops.trajops.paged_temperature_attention(q, cache.k_pool[layer],
    cache.v_pool[layer], cache.page_table, cache.live_pool, tau, slots, scale, k_new, v_new)``.
    """
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < cache.num_layers:
        raise IndexError(f"{_OP}: layer must be an int in [0, {cache.num_layers}), got {layer!r}")
    if not isinstance(tau, Tensor):
        tau = torch.tensor(float(tau), dtype=compute_dtype(q.dtype), device=q.device)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, tau, k_new, v_new)):
        raise RuntimeError(f"{_OP}: inference only (no backward); call it under torch.no_grad()")
    out, lse = torch.ops.trajops.paged_temperature_attention(
        q, cache.k_pool[layer], cache.v_pool[layer], cache.page_table, cache.live_pool, tau, slots, scale, k_new, v_new
    )
    return (out, lse) if return_lse else out
