"""Reference of the paged trajectory KV cache ops (seed 001, section 2): relevance, top-k, eviction.

Layout (see trajops.PagedTrajectoryKVCache): a pool of P pages of S token slots. Per slot, shared by
all layers: a unit trajectory ``traj_pool`` (P, S, Dt) fp32, a timestamp ``ts_pool`` (P, S) int64, a
live flag ``live_pool`` (P, S) bool and a pinned flag ``pinned_pool`` (P, S) bool. Sequence b owns
pages through ``page_table[b]`` (MP entries, -1 = none); its logical slot j is offset j % S of page
page_table[b, j // S]. Per-sequence outputs are indexed by logical slot (max_slots = MP * S).

Relevance of a live slot for a query trajectory t:

    alpha * cos(t, e) + (1 - alpha) * exp(-decay * (now - ts)),   cos = t.e / (max(|t|, eps) max(|e|, eps))

with eps = 1e-8 (a zero trajectory has cos 0); the query and entries are fp32 unit vectors, the
score is computed in fp64 and rounded to fp32 (the seed also ranks fp32-rounded scores, ties to the
older entry); dead slots score -inf. Ties in any
ranking are broken by older timestamp, then lower logical slot, which is also the insertion order
of the entries (new tokens take free slots in ascending logical order).

Non-finite values: a trajectory with a NaN or an infinite component has a NaN unit vector, so every
score it takes part in is NaN (a NaN query: every slot of the row; a NaN entry: that slot, for every
query); NaN alpha/decay likewise. In every ranking a NaN score counts as -inf, i.e. least relevant:
eviction takes NaN-scored entries first, kv_topk returns them after every other live slot (with their
NaN score, never as -1). Dead slots always come after live ones. So with a NaN query a row ranks by age
alone (oldest evicted first), as the seed's argmin over NaN scores does.

Corrupt state (the ops check it on CPU and raise; these functions, which also run on CUDA where
checking would sync, never index outside a tensor): page-table entries outside [-1, P) are read as
-1 and flag their row (kv_relevance: NaN scores; kv_topk: slots -1, scores NaN); in kv_evict_append_
any of those, free_top outside [0, P], a stack entry below free_top outside [0, P), a page held twice
by page_table[:B] and free_pages[:free_top], lengths outside
[0, n], live_count outside [0, max_slots] or a negative capacity make ok False and change nothing.

These functions loop over the batch in Python (a shape, never a value: no host sync) and are
vectorized over slots; the C++ and Triton kernels fuse the same steps.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "KV_EPS",
    "kv_evict_append_",
    "kv_relevance",
    "kv_scores",
    "kv_topk",
    "kv_unit",
    "kv_logical_to_physical",
    "kv_write_",
]

KV_EPS = 1e-8
Scorer = Callable[..., Tensor]  # the signature of kv_scores


def kv_unit(t: Tensor) -> Tensor:
    """t / max(|t|, eps) along the last dimension, rounded once to fp32 (a zero vector stays zero).

    Computed in fp64 so that every device stores the same fp32 bits: an fp32 norm's reduction
    order differs between CPU and CUDA and would move the stored units by an ulp.
    """
    t = t.double()
    return (t / t.norm(dim=-1, keepdim=True).clamp_min(KV_EPS)).float()


def kv_logical_to_physical(page_table: Tensor, page_size: int) -> Tensor:
    """(B, MP) page table -> (B, MP * S) physical slot ids (page * S + offset), -1 where no page."""
    B, MP = page_table.shape
    offs = torch.arange(page_size, device=page_table.device)
    phys = page_table.unsqueeze(-1) * page_size + offs
    return torch.where(page_table.unsqueeze(-1) >= 0, phys, -1).reshape(B, MP * page_size)


def _scatter_rows_(dst: Tensor, idx: Tensor, src: Tensor) -> None:
    """dst[idx[i]] = src[i] for every i with 0 <= idx[i] < R, in place; dst (R, ...), idx (N,), src (N, ...).

    No host sync (a boolean-mask index would need one): entries with idx < 0 are sent to the
    slot of a written entry with that entry's value, so duplicates carry equal values and the
    result does not depend on the write order. Valid indices must be distinct.
    """
    if idx.numel() == 0:
        return
    valid = (idx >= 0) & (idx < dst.shape[0])  # out-of-range indices are dropped, never written
    idx = torch.where(valid, idx, -1)
    anchor = torch.argmax(idx).view(1)  # a written entry, if there is one
    anchor_idx = idx.index_select(0, anchor)[0]  # (index_select: a 0-d tensor index would sync)
    # no entry written at all: every entry rewrites row 0 with its own value
    anchor_src = torch.where(anchor_idx >= 0, src.index_select(0, anchor)[0], dst[0])
    shape = (-1,) + (1,) * (src.dim() - 1)
    dst.index_put_((torch.where(valid, idx, anchor_idx.clamp_min(0)),),
                   torch.where(valid.view(shape), src, anchor_src.unsqueeze(0)))


def kv_write_(k_pool: Tensor, v_pool: Tensor, written: Tensor, k: Tensor, v: Tensor) -> None:
    """Write new tokens' K and V into one layer's pools, in place.

    k_pool, v_pool (num_pages, page_size, H, D); written (B, n) int64 physical slot per new token
    (page * page_size + offset), -1 for tokens not written; k, v (B, H, n, D), cast to the pools' dtype.
    """
    H, D = k_pool.shape[2], k_pool.shape[3]
    if H * D == 0:  # nothing to write (and view(-1, H, 0) would be ambiguous)
        return
    idx = written.reshape(-1)
    for pool, new in ((k_pool, k), (v_pool, v)):
        _scatter_rows_(pool.view(-1, H, D), idx, new.transpose(1, 2).reshape(-1, H, D).to(pool.dtype))


def kv_scores(traj_pool: Tensor, ts_pool: Tensor, live_pool: Tensor, phys: Tensor, unit_query: Tensor, now: Tensor,
              alpha: float, decay: float) -> Tensor:
    """Relevance (B, L) fp32 of physical slots phys (B, L) (-1 = none) for unit queries (B, Dt); -inf if not live."""
    flat_traj = traj_pool.reshape(traj_pool.shape[0] * traj_pool.shape[1], traj_pool.shape[-1])  # (Dt may be 0)
    idx = phys.clamp_min(0)
    present = (phys >= 0) & live_pool.reshape(-1)[idx]
    # fp64 arithmetic rounded once to fp32: every backend then agrees on the fp32 scores (and so on
    # rankings and their ties) up to double rounding, instead of up to fp32 summation order.
    cos = torch.einsum("bld,bd->bl", flat_traj[idx].double(), unit_query.double())
    age = (now - ts_pool.reshape(-1)[idx]).double()
    score = (alpha * cos + (1.0 - alpha) * torch.exp(-decay * age)).float()
    return torch.where(present, score, torch.full_like(score, -math.inf))


def _sanitize_pages(page_table: Tensor, P: int) -> Tuple[Tensor, Tensor]:
    """(page table with entries outside [-1, P) replaced by -1, per-row bool: the row had none)."""
    inside = (page_table >= -1) & (page_table < P)
    return torch.where(inside, page_table, -1), inside.all(1)


def kv_relevance(
    traj_pool: Tensor, ts_pool: Tensor, live_pool: Tensor, page_table: Tensor, query: Tensor, now: Tensor,
    alpha: float, decay: float, *, scorer: Optional[Scorer] = None,
) -> Tensor:
    """(B, max_slots) fp32 relevance of every logical slot of the first B = query.shape[0] sequences.

    ``scorer``: as in :func:`kv_topk`."""
    B = query.shape[0]
    pt, row_ok = _sanitize_pages(page_table[:B], traj_pool.shape[0])
    phys = kv_logical_to_physical(pt, traj_pool.shape[1])
    score = (scorer or kv_scores)(traj_pool, ts_pool, live_pool, phys, kv_unit(query), now, alpha, decay)
    return torch.where(row_ok[:, None], score, math.nan)


def _rank(score: Tensor, ts: Tensor, descending: bool, last: Tensor) -> Tensor:
    """Permutation of the last dim: entries with ``last`` False first; among them by score (desc or
    asc; NaN counts as -inf), then ts asc, then index asc (stable sorts, least significant key first)."""
    key = torch.where(torch.isnan(score), -math.inf, score)
    order = torch.argsort(ts, dim=-1, stable=True)
    order = order.gather(-1, torch.argsort(key.gather(-1, order), dim=-1, descending=descending, stable=True))
    return order.gather(-1, torch.argsort(last.gather(-1, order).to(torch.uint8), dim=-1, stable=True))


def kv_topk(
    traj_pool: Tensor, ts_pool: Tensor, live_pool: Tensor, page_table: Tensor, query: Tensor, now: Tensor,
    alpha: float, decay: float, k: int, *, scorer: Optional[Scorer] = None,
) -> Tuple[Tensor, Tensor]:
    """The k most relevant live logical slots per sequence: (slots (B, k) int64, scores (B, k) fp32).

    Ordered by score descending (NaN as -inf), ties by older timestamp then lower slot; every live
    slot that fits is returned, padded with -1 / -inf when fewer than k slots are live. ``scorer``
    replaces the reference scoring (a fused kernel with the signature of :func:`kv_scores`).
    """
    scorer = scorer or kv_scores
    B = query.shape[0]
    pt, row_ok = _sanitize_pages(page_table[:B], traj_pool.shape[0])
    phys = kv_logical_to_physical(pt, traj_pool.shape[1])
    score = scorer(traj_pool, ts_pool, live_pool, phys, kv_unit(query), now, alpha, decay)
    present = (phys >= 0) & live_pool.reshape(-1)[phys.clamp_min(0)]
    ts = ts_pool.reshape(-1)[phys.clamp_min(0)]
    L = score.shape[1]
    if k > L:  # pad so that every sequence has k candidates
        score = torch.cat([score, score.new_full((B, k - L), -math.inf)], 1)
        ts = torch.cat([ts, ts.new_zeros((B, k - L))], 1)
        present = torch.cat([present, present.new_zeros((B, k - L))], 1)
    order = _rank(score, ts, descending=True, last=~present)[:, :k]
    top = score.gather(1, order)
    slots = torch.where(present.gather(1, order) & row_ok[:, None], order, -1)
    return slots, torch.where(row_ok[:, None], top, math.nan)


def kv_evict_append_(
    traj_pool: Tensor, ts_pool: Tensor, live_pool: Tensor, pinned_pool: Tensor, page_table: Tensor,
    live_count: Tensor, capacity: Tensor, free_pages: Tensor, free_top: Tensor, evicted_total: Tensor,
    now: Tensor, new_traj: Tensor, lengths: Tensor, pin: Optional[Tensor], alpha: float, decay: float,
    pos_pool: Optional[Tensor] = None, next_position: Optional[Tensor] = None, *, scorer: Optional[Scorer] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Evict, allocate and write the metadata of n new tokens per sequence, in place.

    new_traj (B, n, Dt) (the trajectory each new token is written under), lengths (B,) valid new
    tokens per row, pin (B, n) bool or None. Per sequence b with m = lengths[b], cap = capacity[b]:
    the last min(m, cap) valid tokens are kept; e = max(0, live + min(m, cap) - cap) live unpinned
    slots are evicted (lowest relevance for the trajectory of the newest valid token, or by recency
    alone when the row has none; ties: older, then lower slot); the kept tokens take free slots in ascending logical order (owned pages first, then
    pages popped from the free stack into the lowest empty page-table entries); pages left with no
    live slot return to the stack.

    Positions (optional; pos_pool (P, S) and next_position (max_batch,) int64, given together): a
    written token t of row b records pos_pool[slot] = next_position[b] + t (its index in the row's
    stream of valid tokens), then next_position[b] += m.

    Returns (evicted (B, n) logical slots, -1 padded; written (B, n) physical slots per new token,
    -1 for tokens not written; ok 0-d bool). When ok is False (the free-page stack ran out, or the
    state is corrupt: see the module docstring) nothing is modified and evicted and written are all -1.
    ``scorer``: as in :func:`kv_topk`.
    """
    scorer = scorer or kv_scores
    P, S, Dt = traj_pool.shape
    B, n = new_traj.shape[0], new_traj.shape[1]
    MP = page_table.shape[1]
    L = MP * S
    dev = traj_pool.device
    ar_L = torch.arange(L, device=dev)
    ar_n = torch.arange(n, device=dev)
    # Work on copies; commit them only if every sequence fits in the pool.
    traj_w, ts_w, live_w, pinned_w = traj_pool.clone(), ts_pool.clone(), live_pool.clone(), pinned_pool.clone()
    pt_w, cnt_w, free_w, tot_w = page_table.clone(), live_count.clone(), free_pages.clone(), evicted_total.clone()
    has_pos = pos_pool is not None
    pos_w, next_w = (pos_pool.clone(), next_position.clone()) if has_pos else (None, None)
    # Corrupt state flags ok False (nothing is then committed); sanitized copies keep every index
    # inside its tensor meanwhile. Valid state passes through unchanged.
    pt_w[:B], rows_ok = _sanitize_pages(page_table[:B], P)
    below_top = torch.arange(P, device=dev) < free_top
    ok = (rows_ok.all() & (free_top >= 0) & (free_top <= P)
          & (~below_top | ((free_pages >= 0) & (free_pages < P))).all()
          & ((lengths >= 0) & (lengths <= n)).all()
          & ((live_count[:B] >= 0) & (live_count[:B] <= L)).all() & (capacity[:B] >= 0).all())
    top_w = free_top.clamp(0, P)
    held = torch.cat([torch.where(pt_w[:B] >= 0, pt_w[:B], P).reshape(-1),
                      torch.where(below_top, free_pages.clamp(0, P - 1), P)])
    ok = ok & (torch.zeros(P + 1, dtype=torch.long, device=dev).index_add_(0, held, torch.ones_like(held))[:P] <= 1).all()
    lengths = lengths.clamp(0, n)
    evicted = torch.full((B, n), -1, dtype=torch.long, device=dev)
    written = torch.full((B, n), -1, dtype=torch.long, device=dev)
    units = kv_unit(new_traj)
    for b in range(B):
        m, cap, live_b = lengths[b], capacity[b], cnt_w[b]
        pt = pt_w[b]
        phys = kv_logical_to_physical(pt.unsqueeze(0), S)[0]
        has_page = phys >= 0
        idx = phys.clamp_min(0)
        live = has_page & live_w.reshape(-1)[idx]
        cand = live & ~pinned_w.reshape(-1)[idx]
        keep = torch.minimum(m, cap)
        e = torch.minimum((live_b + keep - cap).clamp_min(0), cand.sum())
        n_write = torch.minimum(keep, cap - (live_b - e)).clamp_min(0)
        # evict the e lowest candidates
        # the newest valid token's unit trajectory (normalized once, with all the new tokens'; the
        # kernels use the same values); a row without one (m = 0) scores by recency alone
        # (index_select: indexing with a 0-d tensor would read it on the host)
        newest = units[b].index_select(0, (m - 1).clamp(0, max(n - 1, 0)).view(1))[0] if n else units.new_zeros(Dt)
        newest = torch.where(m > 0, newest, torch.zeros_like(newest))
        score = scorer(traj_w, ts_w, live_w, phys.unsqueeze(0), newest.unsqueeze(0), now, alpha, decay)[0]
        score = torch.where(cand, score, torch.full_like(score, math.inf))
        ts = torch.where(cand, ts_w.reshape(-1)[idx], torch.full_like(idx, torch.iinfo(torch.long).max))
        order = _rank(score.unsqueeze(0), ts.unsqueeze(0), descending=False, last=~cand.unsqueeze(0))[0]
        chosen = ar_L < e
        ev_slots = torch.where(chosen, order, torch.full_like(order, -1))
        evicted[b] = torch.cat([ev_slots, ev_slots.new_full((max(n - L, 0),), -1)])[:n]
        evict_mask = torch.zeros(L, dtype=torch.bool, device=dev).scatter(0, order, chosen)
        live_after = live & ~evict_mask
        # allocate pages for what the owned free slots cannot hold
        free_owned = (has_page & ~live_after).sum()
        need = (n_write - free_owned).clamp_min(0)
        need_pages = (need + S - 1) // S
        ok = ok & (need_pages <= top_w)
        empty = pt < 0
        rank_e = torch.cumsum(empty.long(), 0) - 1
        take = empty & (rank_e < need_pages)
        popped = free_w[(top_w - 1 - rank_e).clamp(0, P - 1)].clamp(0, P - 1)  # (a no-op when ok)
        pt = torch.where(take, popped, pt)
        top_w = top_w - torch.minimum(need_pages, top_w)
        phys = kv_logical_to_physical(pt.unsqueeze(0), S)[0]
        has_page = phys >= 0
        idx = phys.clamp_min(0)
        # the kept tokens (the last n_write valid ones) take the lowest free logical slots
        slot_free = has_page & ~live_after
        free_order = torch.argsort(torch.where(slot_free, ar_L, ar_L + L))
        first_tok = m - n_write
        tok_rank = ar_n - first_tok
        tok_ok = (tok_rank >= 0) & (ar_n < m)
        tok_slot = free_order[tok_rank.clamp(0, L - 1)]
        tok_phys = torch.where(tok_ok, idx[tok_slot], torch.full_like(tok_slot, -1))
        written[b] = tok_phys
        # metadata updates
        ev_phys = torch.where(evict_mask, idx, torch.full_like(idx, -1))
        _scatter_rows_(live_w.view(-1), ev_phys, torch.zeros_like(ev_phys, dtype=torch.bool))
        _scatter_rows_(pinned_w.view(-1), ev_phys, torch.zeros_like(ev_phys, dtype=torch.bool))
        _scatter_rows_(live_w.view(-1), tok_phys, torch.ones_like(tok_phys, dtype=torch.bool))
        _scatter_rows_(ts_w.view(-1), tok_phys, now.expand(n))
        _scatter_rows_(traj_w.view(P * S, Dt), tok_phys, units[b])
        _scatter_rows_(pinned_w.view(-1), tok_phys,
                       pin[b].to(torch.bool) if pin is not None else torch.zeros_like(tok_phys, dtype=torch.bool))
        if has_pos:
            _scatter_rows_(pos_w.view(-1), tok_phys, next_w[b] + ar_n)
            next_w[b] = next_w[b] + m
        # release pages with no live slot
        live_now = has_page & live_w.reshape(-1)[idx]
        page_live = live_now.view(MP, S).any(1)
        release = (pt >= 0) & ~page_live
        rank_r = torch.cumsum(release.long(), 0) - 1
        dest = torch.where(release, top_w + rank_r, torch.full_like(rank_r, P))  # P = dropped
        free_ext = torch.cat([free_w, free_w.new_zeros(1)])
        free_ext[dest.clamp(0, P)] = torch.where(release, pt, free_ext[dest.clamp(0, P)])
        free_w = free_ext[:P]
        top_w = top_w + release.sum()
        pt_w[b] = torch.where(release, torch.full_like(pt, -1), pt)
        cnt_w[b] = live_b - e + n_write
        tot_w[b] = tot_w[b] + e + (m - n_write)
    for dst, src in ((traj_pool, traj_w), (ts_pool, ts_w), (live_pool, live_w), (pinned_pool, pinned_w),
                     (page_table, pt_w), (live_count, cnt_w), (free_pages, free_w), (free_top, top_w),
                     (evicted_total, tot_w)) + (((pos_pool, pos_w), (next_position, next_w)) if has_pos else ()):
        dst.copy_(torch.where(ok, src, dst))
    none = torch.full_like(written, -1)
    return torch.where(ok, evicted, none), torch.where(ok, written, none), ok
