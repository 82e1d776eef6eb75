"""The KV-cache op group: trajops::kv_relevance, kv_topk, kv_evict_append_ and kv_write_ — the paged store's ops.

Role: stateless kernels over the tensors of the paged store (trajops.kv_cache.PagedTrajectoryKVCache, which owns
them); the roles of the other KV-cache modules are listed in trajops/kv_cache.py.

This module registers the ops' fake impls and kernels. Semantics: trajops/reference/kv_cache.py; the
state they read and mutate is described in trajops/kv_cache.py (PagedTrajectoryKVCache).
kv_evict_append_ mutates the cache state in place (declared with Tensor(a!) in its schema) and
returns new tensors (evicted, written, ok), never aliases. Its optional trailing pos_pool / next_position
(given together) record each written token's position in the same pass: the store's bookkeeping costs no
extra ops per decode step (on a GPU, no extra launches).

Backends: C++ on CPU (csrc/cpu/kv_cache.cpp, registered by trajops._C). On CUDA (and on CPU tensors
under TRAJOPS_BACKEND=triton TRITON_INTERPRET=1): kv_relevance and kv_topk (k <= 128) are fused
score-and-select Triton kernels (triton_kernels/kv_topk.py: one launch, two for kv_topk when a row is
split over programs); kv_write_ a Triton copy; kv_evict_append_ on a decode step (n = 1) the fused
kernels of triton_kernels/kv_evict.py (5 launches), otherwise (and kv_topk with k > 128) the
reference's device-side torch ops around the Triton scorer (triton_kernels/kv_cache.py). All fixed
shapes, no host sync, so CUDA-graph capturable. Anything else: the pure-PyTorch reference, which
loops over the batch (a shape) and is vectorized over slots.

Bad input: shapes, dtypes and devices of every argument are checked first (fake impls too), then
on CPU every value an op indexes with or counts from (page-table rows 0..B-1, free_top and the
stack below it, each page held once, live_count, capacity, lengths, written slots) before any
access, with the text of csrc/cpu/kv_cache.cpp. On CUDA the reference treats corrupt entries as
absent and flags the result instead (NaN scores, slots -1, ok False), and the write kernel drops
slots outside the pool: no host sync, no access outside a tensor.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from .._library import register_kernels
from ._checks import check, check_value

__all__: list = []

_OP = "kv_cache"
_MAX_K = 2**31 - 1


def _check_pool(traj_pool: Tensor, ts_pool: Tensor, live_pool: Tensor, page_table: Tensor) -> None:
    """Ranks, shapes and dtypes of the pools and the page table (no values: fake impls run this too)."""
    check_value(
        traj_pool.dim() == 3 and traj_pool.dtype == torch.float32,
        lambda: f"{_OP}: traj_pool must be float32 (num_pages, page_size, traj_dim), got {traj_pool.dtype} "
        f"{list(traj_pool.shape)}",
    )
    P, S, Dt = traj_pool.shape
    check_value(
        tuple(ts_pool.shape) == (P, S) and ts_pool.dtype == torch.long,
        lambda: f"{_OP}: ts_pool must be int64 ({P}, {S}), got {ts_pool.dtype} {list(ts_pool.shape)}",
    )
    check_value(
        tuple(live_pool.shape) == (P, S) and live_pool.dtype == torch.bool,
        lambda: f"{_OP}: live_pool must be bool ({P}, {S}), got {live_pool.dtype} {list(live_pool.shape)}",
    )
    check_value(
        page_table.dim() == 2 and page_table.dtype == torch.long,
        lambda: f"{_OP}: page_table must be int64 (max_batch, max_pages), got {page_table.dtype} "
        f"{list(page_table.shape)}",
    )


def _check_trajectories(name: str, t: Tensor, dims: int, traj_pool: Tensor, page_table: Tensor) -> None:
    """query (B, Dt) or new_traj (B, n, Dt), floating point, B <= max_batch."""
    Dt, MB = traj_pool.shape[2], page_table.shape[0]
    want = f"(B, {Dt})" if dims == 2 else f"(B, n, {Dt})"
    check_value(
        t.dim() == dims and t.shape[-1] == Dt and t.shape[0] <= MB and t.dtype.is_floating_point,
        lambda: f"{_OP}: {name} must be a floating-point {want} tensor with B <= {MB}, got {t.dtype} {list(t.shape)}",
    )


def _check_int(name: str, t: Tensor, shape: tuple, what: str) -> None:
    check_value(
        tuple(t.shape) == shape and t.dtype == torch.long,
        lambda: f"{_OP}: {name} must be int64 {what}, got {t.dtype} {list(t.shape)}",
    )


def _check_state(traj_pool, pinned_pool, page_table, live_count, capacity, free_pages, free_top, evicted_total, now,
                 new_traj, lengths, pin, pos_pool=None, next_position=None) -> None:
    """Shapes and dtypes of kv_evict_append_'s state and per-call arguments (C++: the same checks, same order)."""
    P, S = traj_pool.shape[0], traj_pool.shape[1]
    MB = page_table.shape[0]
    check_value(
        tuple(pinned_pool.shape) == (P, S) and pinned_pool.dtype == torch.bool,
        lambda: f"{_OP}: pinned_pool must be bool ({P}, {S}), got {pinned_pool.dtype} {list(pinned_pool.shape)}",
    )
    _check_int("live_count", live_count, (MB,), f"({MB},)")
    _check_int("capacity", capacity, (MB,), f"({MB},)")
    _check_int("free_pages", free_pages, (P,), f"({P},)")
    _check_int("free_top", free_top, (), "0-d")
    _check_int("evicted_total", evicted_total, (MB,), f"({MB},)")
    _check_int("now", now, (), "0-d")
    B, n = new_traj.shape[0], new_traj.shape[1]
    _check_int("lengths", lengths, (B,), f"({B},)")
    if pin is not None:
        check_value(
            tuple(pin.shape) == (B, n) and pin.dtype == torch.bool,
            lambda: f"{_OP}: pin must be bool ({B}, {n}), got {pin.dtype} {list(pin.shape)}",
        )
    check_value((pos_pool is None) == (next_position is None),
                lambda: f"{_OP}: pos_pool and next_position must be given together (or neither)")
    if pos_pool is not None:
        _check_int("pos_pool", pos_pool, (P, S), f"({P}, {S})")
        _check_int("next_position", next_position, (MB,), f"({MB},)")


def _check_k(k: int) -> None:
    check_value(k >= 0, lambda: f"{_OP}: k must be >= 0, got {k}")
    # outputs are (B, k): a k beyond int32 is a bug, not an allocation to attempt
    check_value(k <= _MAX_K, lambda: f"{_OP}: k must be <= {_MAX_K}, got {k}")


def _check_weights(alpha: float, decay: float) -> None:
    """The relevance weights the cache itself accepts (alpha in [0, 1], decay finite >= 0): beyond them
    scores overflow or lose the meaning the rankings rely on."""
    check_value(0.0 <= alpha <= 1.0, lambda: f"{_OP}: alpha must be in [0, 1], got {alpha!r}")
    check_value(math.isfinite(decay) and decay >= 0.0,
                       lambda: f"{_OP}: decay must be a finite number >= 0, got {decay!r}")


def _check_devices(tensors: dict) -> None:
    devs = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devs.values()))
    bad = [name for name, d in devs.items() if d != first]
    check_value(not bad, lambda: f"{_OP}: every tensor must be on {first}, got {bad[0]} on {devs[bad[0]]}")


def _first_bad(bad: Tensor) -> tuple:
    """Index (tuple) of the first True of a CPU bool tensor, or None."""
    idx = torch.nonzero(bad.reshape(-1))
    if idx.numel() == 0:
        return None
    return tuple(int(i) for i in torch.unravel_index(idx[0, 0], bad.shape))


def _check_page_table_values(page_table: Tensor, B: int, P: int) -> None:
    """CPU only (reads values): the first B rows hold -1 or a page in [0, P)."""
    pt = page_table[:B]
    at = _first_bad((pt < -1) | (pt >= P))
    if at is not None:
        raise IndexError(f"{_OP}: page_table entries must be -1 or a page in [0, {P}), got {int(pt[at])} at "
                         f"[{at[0]}, {at[1]}]")


def _check_state_values(P, L, page_table, live_count, capacity, free_pages, free_top, new_traj, lengths) -> None:
    """CPU only: every value kv_evict_append_ indexes with or counts from (C++: same checks, same order)."""
    B, n = new_traj.shape[0], new_traj.shape[1]
    _check_page_table_values(page_table, B, P)
    top = int(free_top)
    if not 0 <= top <= P:
        raise IndexError(f"{_OP}: free_top must be in [0, {P}], got {top}")
    at = _first_bad((free_pages[:top] < 0) | (free_pages[:top] >= P))
    if at is not None:
        raise IndexError(f"{_OP}: free_pages[:free_top] must hold pages in [0, {P}), got {int(free_pages[at])} at "
                         f"{at[0]}")
    held = torch.cat([page_table[:B].reshape(-1), free_pages[:top]])
    held = held[held >= 0]
    if held.numel():
        uniq, inverse = torch.unique(held, return_inverse=True)
        pos = torch.arange(held.numel())
        first = torch.full((uniq.numel(),), held.numel()).scatter_reduce(0, inverse, pos, "amin")
        at = _first_bad(first[inverse] != pos)
        if at is not None:
            raise ValueError(f"{_OP}: page {int(held[at])} is held twice by page_table[:B] and free_pages[:free_top]")
    for name, t, lo, hi in (("live_count", live_count[:B], 0, L), ("capacity", capacity[:B], 0, None),
                            ("lengths", lengths, 0, n)):
        at = _first_bad((t < lo) | (t > hi) if hi is not None else t < lo)
        if at is not None:
            rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise ValueError(f"{_OP}: {name} must be {rng}, got {int(t[at])} for row {at[0]}")


# ---------------------------------------------------------------- fake impls
def _check_read(traj_pool, ts_pool, live_pool, page_table, query, now) -> None:
    _check_pool(traj_pool, ts_pool, live_pool, page_table)
    _check_trajectories("query", query, 2, traj_pool, page_table)
    _check_int("now", now, (), "0-d")
    _check_devices({"traj_pool": traj_pool, "ts_pool": ts_pool, "live_pool": live_pool, "page_table": page_table,
                    "query": query, "now": now})


@torch.library.register_fake("trajops::kv_relevance")
def _relevance_fake(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay):
    _check_read(traj_pool, ts_pool, live_pool, page_table, query, now)
    _check_weights(alpha, decay)
    return query.new_empty((query.shape[0], page_table.shape[1] * traj_pool.shape[1]), dtype=torch.float32)


@torch.library.register_fake("trajops::kv_topk")
def _topk_fake(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay, k):
    _check_read(traj_pool, ts_pool, live_pool, page_table, query, now)
    _check_weights(alpha, decay)
    _check_k(k)
    B = query.shape[0]
    return query.new_empty((B, k), dtype=torch.long), query.new_empty((B, k), dtype=torch.float32)


def _check_evict(traj_pool, ts_pool, live_pool, pinned_pool, page_table, live_count, capacity, free_pages,
                 free_top, evicted_total, now, new_traj, lengths, pin, pos_pool=None, next_position=None) -> None:
    _check_pool(traj_pool, ts_pool, live_pool, page_table)
    _check_trajectories("new_traj", new_traj, 3, traj_pool, page_table)
    _check_state(traj_pool, pinned_pool, page_table, live_count, capacity, free_pages, free_top, evicted_total, now,
                 new_traj, lengths, pin, pos_pool, next_position)
    for t in (traj_pool, ts_pool, live_pool, pinned_pool, page_table, live_count, free_pages, evicted_total,
              pos_pool, next_position):
        if t is not None:
            check(t.is_contiguous(), lambda: f"{_OP}: the cache state tensors must be contiguous")
    _check_devices({"traj_pool": traj_pool, "ts_pool": ts_pool, "live_pool": live_pool, "pinned_pool": pinned_pool,
                    "page_table": page_table, "live_count": live_count, "capacity": capacity,
                    "free_pages": free_pages, "free_top": free_top, "evicted_total": evicted_total, "now": now,
                    "new_traj": new_traj, "lengths": lengths, "pin": pin, "pos_pool": pos_pool,
                    "next_position": next_position})


@torch.library.register_fake("trajops::kv_evict_append_")
def _evict_append_fake(traj_pool, ts_pool, live_pool, pinned_pool, page_table, live_count, capacity, free_pages,
                       free_top, evicted_total, now, new_traj, lengths, pin, alpha, decay, pos_pool=None,
                       next_position=None):
    _check_evict(traj_pool, ts_pool, live_pool, pinned_pool, page_table, live_count, capacity, free_pages,
                 free_top, evicted_total, now, new_traj, lengths, pin, pos_pool, next_position)
    _check_weights(alpha, decay)
    B, n = new_traj.shape[0], new_traj.shape[1]
    return (new_traj.new_empty((B, n), dtype=torch.long), new_traj.new_empty((B, n), dtype=torch.long),
            new_traj.new_empty((), dtype=torch.bool))


# ---------------------------------------------------------------- kernels
# One checked wrapper per op around the reference. Triton: kv_relevance and kv_topk (k <= K_MAX) are
# the fused kernels of triton_kernels/kv_topk.py; kv_evict_append_ (and kv_topk above K_MAX) swap the
# Triton scorer into the reference (its ranking and bookkeeping are device-side torch ops). Values (page
# numbers, stack entries, counts) are checked here on CPU, where reading them costs no sync; on CUDA
# the reference treats corrupt entries as absent and flags the result instead (NaN scores, ok False).
def _triton_scorer():
    from ..triton_kernels import kv_cache as kernels

    return kernels.kv_scores


def _fused():
    from ..triton_kernels import kv_topk as fused

    return fused


def _check_relevance(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay) -> None:
    _check_read(traj_pool, ts_pool, live_pool, page_table, query, now)
    _check_weights(alpha, decay)
    if page_table.device.type == "cpu":
        _check_page_table_values(page_table, query.shape[0], traj_pool.shape[0])


def _relevance(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay):
    _check_relevance(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay)
    return reference.kv_relevance(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay)


def _relevance_triton(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay):
    """One fused launch (triton_kernels/kv_topk.py)."""
    _check_relevance(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay)
    return _fused().kv_relevance(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay)


def _topk(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay, k):
    _check_relevance(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay)
    _check_k(k)
    return reference.kv_topk(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay, k)


def _topk_triton(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay, k):
    """The fused score-and-select kernels for k <= K_MAX (one or two launches); above it the reference's
    ranking around the Triton scorer."""
    _check_relevance(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay)
    _check_k(k)
    out = _fused().kv_topk(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay, k)
    if out is None:
        return reference.kv_topk(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay, k,
                                 scorer=_triton_scorer())
    return out


def _checked_evict_args(traj_pool, ts_pool, live_pool, pinned_pool, page_table, live_count, capacity, free_pages,
                        free_top, evicted_total, now, new_traj, lengths, pin, alpha, decay, pos_pool=None,
                        next_position=None) -> tuple:
    """Checks of kv_evict_append_ (values too on CPU, where reading them costs no sync); the op's arguments."""
    args = (traj_pool, ts_pool, live_pool, pinned_pool, page_table, live_count, capacity, free_pages, free_top,
            evicted_total, now, new_traj, lengths, pin)
    _check_evict(*args, pos_pool, next_position)
    _check_weights(alpha, decay)
    if page_table.device.type == "cpu":
        P, S = traj_pool.shape[0], traj_pool.shape[1]
        _check_state_values(P, page_table.shape[1] * S, page_table, live_count, capacity, free_pages, free_top,
                            new_traj, lengths)
    return args + (alpha, decay, pos_pool, next_position)


def _evict_append(*args):
    return reference.kv_evict_append_(*_checked_evict_args(*args))


def _evict_append_triton(*args):
    """A decode step (one new token per row): the fused kernels of triton_kernels/kv_evict.py (5 launches);
    otherwise the reference's ranking and bookkeeping around the Triton scorer (device-side torch ops)."""
    from ..triton_kernels import kv_evict

    args = _checked_evict_args(*args)
    out = kv_evict.kv_evict_append_decode(*args)
    return out if out is not None else reference.kv_evict_append_(*args, scorer=_triton_scorer())


register_kernels("kv_relevance", _relevance, _relevance_triton)
register_kernels("kv_topk", _topk, _topk_triton)
register_kernels("kv_evict_append_", _evict_append, _evict_append_triton)


# ---------------------------------------------------------------- kv_write_
def _check_write(k_pool: Tensor, v_pool: Tensor, written: Tensor, k: Tensor, v: Tensor) -> None:
    check_value(
        k_pool.dim() == 4 and v_pool.shape == k_pool.shape and v_pool.dtype == k_pool.dtype,
        lambda: f"{_OP}: k_pool and v_pool must have one shape (num_pages, page_size, H, D) and dtype, got "
        f"{list(k_pool.shape)} {k_pool.dtype} and {list(v_pool.shape)} {v_pool.dtype}",
    )
    check_value(
        written.dim() == 2 and written.dtype == torch.long,
        lambda: f"{_OP}: written must be int64 (B, n), got {written.dtype} {list(written.shape)}",
    )
    shape = (written.shape[0], k_pool.shape[2], written.shape[1], k_pool.shape[3])
    check_value(
        tuple(k.shape) == shape and v.shape == k.shape,
        lambda: f"{_OP}: k and v must have shape {shape}, got {list(k.shape)} and {list(v.shape)}",
    )


@torch.library.register_fake("trajops::kv_write_")
def _write_fake(k_pool, v_pool, written, k, v):
    _check_write(k_pool, v_pool, written, k, v)


def _check_written_values(k_pool: Tensor, written: Tensor) -> None:
    """As C++ on CPU; on CUDA the kernel drops slots outside the pool instead (no sync)."""
    if written.device.type == "cpu":
        slots = k_pool.shape[0] * k_pool.shape[1]
        at = _first_bad((written < -1) | (written >= slots))
        if at is not None:
            raise ValueError(f"{_OP}: written slot {int(written[at])} is outside the pool of {slots} slots "
                             "(-1 = not written)")


def _write(k_pool, v_pool, written, k, v):
    _check_write(k_pool, v_pool, written, k, v)
    _check_written_values(k_pool, written)
    reference.kv_write_(k_pool, v_pool, written, k, v)


def _write_triton(k_pool, v_pool, written, k, v):
    _check_write(k_pool, v_pool, written, k, v)
    _check_written_values(k_pool, written)
    check(k_pool.is_contiguous() and v_pool.is_contiguous(),
                 lambda: f"{_OP}: k_pool and v_pool must be contiguous")
    from ..triton_kernels import kv_cache as kernels

    kernels.kv_write(k_pool, v_pool, written, k, v)


register_kernels("kv_write_", _write, _write_triton)
