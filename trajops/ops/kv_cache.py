"""trajops::kv_relevance, trajops::kv_topk and trajops::kv_evict_append_ — the paged KV cache's ops.

This module registers the ops' fake impls and kernels. Semantics: trajops/reference/kv_cache.py; the
state they read and mutate is described in trajops/kv_cache.py (PagedTrajectoryKVCache).
kv_evict_append_ mutates the cache state in place (declared with Tensor(a!) in its schema) and
returns new tensors (evicted, written, ok), never aliases.

Backends: C++ on CPU (csrc/cpu/kv_cache.cpp, registered by trajops._C). On CUDA (and on CPU tensors
under TRAJOPS_BACKEND=triton TRITON_INTERPRET=1): Triton kernels (triton_kernels/kv_cache.py) for
the fused scoring and the K/V writes; the ranking and page bookkeeping around the scorer are the
reference's device-side torch ops (fixed shapes, no host sync, so CUDA-graph capturable). Anything
else: the pure-PyTorch reference, which loops over the batch (a shape) and is vectorized over slots.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._library import register_kernels

__all__: list = []

_OP = "kv_cache"


def _check_pool(traj_pool: Tensor, ts_pool: Tensor, live_pool: Tensor, page_table: Tensor, query: Tensor) -> None:
    torch._check_value(
        traj_pool.dim() == 3 and traj_pool.dtype == torch.float32,
        lambda: f"{_OP}: traj_pool must be float32 (num_pages, page_size, traj_dim), got {traj_pool.dtype} "
        f"{list(traj_pool.shape)}",
    )
    P, S, Dt = traj_pool.shape
    torch._check_value(
        tuple(ts_pool.shape) == (P, S) and ts_pool.dtype == torch.long,
        lambda: f"{_OP}: ts_pool must be int64 ({P}, {S}), got {ts_pool.dtype} {list(ts_pool.shape)}",
    )
    torch._check_value(
        tuple(live_pool.shape) == (P, S) and live_pool.dtype == torch.bool,
        lambda: f"{_OP}: live_pool must be bool ({P}, {S}), got {live_pool.dtype} {list(live_pool.shape)}",
    )
    torch._check_value(
        page_table.dim() == 2 and page_table.dtype == torch.long,
        lambda: f"{_OP}: page_table must be int64 (max_batch, max_pages), got {page_table.dtype} "
        f"{list(page_table.shape)}",
    )
    torch._check_value(
        query.dim() in (2, 3) and query.shape[-1] == Dt and query.shape[0] <= page_table.shape[0],
        lambda: f"{_OP}: trajectories must be (B, {Dt}) or (B, n, {Dt}) with B <= {page_table.shape[0]}, got "
        f"{list(query.shape)}",
    )


# ---------------------------------------------------------------- fake impls
@torch.library.register_fake("trajops::kv_relevance")
def _relevance_fake(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay):
    _check_pool(traj_pool, ts_pool, live_pool, page_table, query)
    return query.new_empty((query.shape[0], page_table.shape[1] * traj_pool.shape[1]), dtype=torch.float32)


@torch.library.register_fake("trajops::kv_topk")
def _topk_fake(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay, k):
    _check_pool(traj_pool, ts_pool, live_pool, page_table, query)
    torch._check_value(k >= 0, lambda: f"{_OP}: k must be >= 0, got {k}")
    B = query.shape[0]
    return query.new_empty((B, k), dtype=torch.long), query.new_empty((B, k), dtype=torch.float32)


@torch.library.register_fake("trajops::kv_evict_append_")
def _evict_append_fake(traj_pool, ts_pool, live_pool, pinned_pool, page_table, live_count, capacity, free_pages,
                       free_top, evicted_total, now, new_traj, lengths, pin, alpha, decay):
    _check_pool(traj_pool, ts_pool, live_pool, page_table, new_traj)
    B, n = new_traj.shape[0], new_traj.shape[1]
    return (new_traj.new_empty((B, n), dtype=torch.long), new_traj.new_empty((B, n), dtype=torch.long),
            new_traj.new_empty((), dtype=torch.bool))


# ---------------------------------------------------------------- kernels
# One checked wrapper per op around the reference; the Triton variant only swaps in the fused scorer
# (the ranking and bookkeeping around it are the reference's device-side torch ops).
def _triton_scorer():
    from ..triton_kernels import kv_cache as kernels

    return kernels.kv_scores


def _relevance(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay, *, scorer=None):
    _check_pool(traj_pool, ts_pool, live_pool, page_table, query)
    return reference.kv_relevance(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay,
                                  scorer=scorer)


def _topk(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay, k, *, scorer=None):
    _check_pool(traj_pool, ts_pool, live_pool, page_table, query)
    torch._check_value(k >= 0, lambda: f"{_OP}: k must be >= 0, got {k}")
    return reference.kv_topk(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay, k, scorer=scorer)


def _evict_append(traj_pool, ts_pool, live_pool, pinned_pool, page_table, live_count, capacity, free_pages,
                  free_top, evicted_total, now, new_traj, lengths, pin: Optional[Tensor], alpha, decay, *,
                  scorer=None):
    _check_pool(traj_pool, ts_pool, live_pool, page_table, new_traj)
    return reference.kv_evict_append_(traj_pool, ts_pool, live_pool, pinned_pool, page_table, live_count, capacity,
                                      free_pages, free_top, evicted_total, now, new_traj, lengths, pin, alpha, decay,
                                      scorer=scorer)


def _with_triton_scorer(fn):
    return lambda *args: fn(*args, scorer=_triton_scorer())


register_kernels("kv_relevance", _relevance, _with_triton_scorer(_relevance))
register_kernels("kv_topk", _topk, _with_triton_scorer(_topk))
register_kernels("kv_evict_append_", _evict_append, _with_triton_scorer(_evict_append))


# ---------------------------------------------------------------- kv_write_
def _check_write(k_pool: Tensor, v_pool: Tensor, written: Tensor, k: Tensor, v: Tensor) -> None:
    torch._check_value(
        k_pool.dim() == 4 and v_pool.shape == k_pool.shape and v_pool.dtype == k_pool.dtype,
        lambda: f"{_OP}: k_pool and v_pool must have one shape (num_pages, page_size, H, D) and dtype, got "
        f"{list(k_pool.shape)} {k_pool.dtype} and {list(v_pool.shape)} {v_pool.dtype}",
    )
    torch._check_value(
        written.dim() == 2 and written.dtype == torch.long,
        lambda: f"{_OP}: written must be int64 (B, n), got {written.dtype} {list(written.shape)}",
    )
    shape = (written.shape[0], k_pool.shape[2], written.shape[1], k_pool.shape[3])
    torch._check_value(
        tuple(k.shape) == shape and v.shape == k.shape,
        lambda: f"{_OP}: k and v must have shape {shape}, got {list(k.shape)} and {list(v.shape)}",
    )


@torch.library.register_fake("trajops::kv_write_")
def _write_fake(k_pool, v_pool, written, k, v):
    _check_write(k_pool, v_pool, written, k, v)


def _write(k_pool, v_pool, written, k, v):
    _check_write(k_pool, v_pool, written, k, v)
    reference.kv_write_(k_pool, v_pool, written, k, v)


def _write_triton(k_pool, v_pool, written, k, v):
    _check_write(k_pool, v_pool, written, k, v)
    torch._check(k_pool.is_contiguous() and v_pool.is_contiguous(),
                 lambda: f"{_OP}: k_pool and v_pool must be contiguous")
    from ..triton_kernels import kv_cache as kernels

    kernels.kv_write(k_pool, v_pool, written, k, v)


register_kernels("kv_write_", _write, _write_triton)
