"""The seed's drop-in class: TrajectoryAwareKVCache (001, section 2) on top of the paged store PagedTrajectoryKVCache.

Role: the seed's API (one global sequence, per-call trajectory); the roles of the other KV-cache modules are
listed in trajops/kv_cache.py.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference as _ref
from ..kv_cache import PagedTrajectoryKVCache

__all__ = ["TrajectoryAwareKVCache"]


class TrajectoryAwareKVCache:
    """Drop-in for the seed's ``TrajectoryAwareKVCache(max_cache_size, embedding_dim)``.

    Same constructor and methods; one global cache (every token of every batch row goes into it,
    as in the seed), relevance = 0.7 cos + 0.3 exp(-0.1 age), the least relevant entry evicted per
    new token once full, ties to the older entry. Entries live in a paged, device-resident cache
    (created at the first update, on the keys' device and dtype); eviction is one fused call per
    update instead of one Python pass over the cache per token.

    The seed's methods return tensors whose length is the number of live entries, so
    ``compute_cache_relevance`` and ``get_relevant_cache`` read that count from the device (one
    host sync each); ``update_cache`` does not sync.

    Decisions are taken in fp32 like the seed's; where two different entries' relevances are
    within fp32 rounding of each other, which one is evicted depends on the rounding of each
    implementation and may differ from the seed's.
    """

    def __init__(self, max_cache_size: int, embedding_dim: int, *, page_size: int = 16) -> None:
        if not isinstance(max_cache_size, int) or max_cache_size < 1:
            raise ValueError(f"TrajectoryAwareKVCache: max_cache_size must be an int >= 1, got {max_cache_size!r}")
        if not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"TrajectoryAwareKVCache: embedding_dim must be an int >= 1, got {embedding_dim!r}")
        self.max_cache_size = max_cache_size
        self.embedding_dim = embedding_dim
        self.page_size = min(page_size, max_cache_size)
        self.cache: Optional[PagedTrajectoryKVCache] = None
        self._time = 0

    @property
    def current_time(self) -> int:
        return self._time

    def _ensure(self, like: Tensor) -> PagedTrajectoryKVCache:
        if self.cache is None:
            pages = -(-self.max_cache_size // self.page_size)
            self.cache = PagedTrajectoryKVCache(
                1, pages, self.page_size, 1, self.embedding_dim, self.embedding_dim, 1, self.max_cache_size,
                alpha=0.7, decay=0.1, dtype=like.dtype, device=like.device,
            )
        return self.cache

    def _check_traj(self, name: str, t: Tensor) -> Tensor:
        if t.shape != (self.embedding_dim,):
            raise ValueError(
                f"TrajectoryAwareKVCache: {name} must have shape ({self.embedding_dim},), got {list(t.shape)}"
            )
        return t.view(1, self.embedding_dim)

    def update_cache(self, new_keys: Tensor, new_values: Tensor, current_trajectory: Tensor) -> None:
        """new_keys, new_values (batch, seq_len, embedding_dim); current_trajectory (embedding_dim,)."""
        E = self.embedding_dim
        if new_keys.dim() != 3 or new_keys.shape[-1] != E or new_values.shape != new_keys.shape:
            raise ValueError(
                f"TrajectoryAwareKVCache.update_cache: new_keys and new_values must both have shape (batch, seq_len, "
                f"{E}), got {list(new_keys.shape)} and {list(new_values.shape)}"
            )
        traj = self._check_traj("current_trajectory", current_trajectory)
        cache = self._ensure(new_keys)
        n = new_keys.shape[0] * new_keys.shape[1]
        if n:
            # every (b, s) token in the seed's loop order, as n new tokens of the one sequence
            traj = traj.to(new_keys.device)
            k_new = self._tokens_kept(cache, traj, n)
            # the kept tokens are the last k_new of the call: rotate them to the front, where the op
            # takes `lengths` valid tokens from
            order = (torch.arange(n, device=new_keys.device) + (n - k_new)) % n
            keys = new_keys.reshape(n, E).index_select(0, order).view(1, 1, n, E)
            values = new_values.reshape(n, E).index_select(0, order).view(1, 1, n, E)
            cache.append(0, keys, values, traj, lengths=k_new.view(1))
        cache.step()
        self._time += 1

    def _tokens_kept(self, cache: PagedTrajectoryKVCache, traj: Tensor, n: int) -> Tensor:
        """How many of the call's n tokens the seed keeps (0-d int64 on the cache's device, no sync).

        The seed adds tokens one by one and, once full, evicts the least relevant entry, which may be
        a token of this very call: those share the call's trajectory t and timestamp and score
        s_new = 0.7 cos(t, t) + 0.3, and cos(t, t) = min(|t| / eps, 1)^2 is below 1 only when
        0 < |t| < eps. Old entries keep their scores during the call, so the seed evicts the old
        entries scoring <= s_new in rank order (ties: the older entry, i.e. old before new; NaN
        counts as the lowest, as its argmin does) — and at least one when the cache was full before
        the call (the first eviction then has no new token to choose) — and then the earliest new
        tokens. Whenever |t| >= eps or t = 0 this keeps all min(n, capacity) last tokens, as the op
        alone does.
        """
        cap = self.max_cache_size
        live0 = cache.live_count[0]
        evictions = (live0 + n - cap).clamp_min(0)
        u = _ref.kv_unit(traj[0]).double()
        s_new = (cache.alpha * (u * u).sum() + (1.0 - cache.alpha)).float()
        scores = cache.relevance(traj)[0]
        live = cache.live_slots()[0]
        below = live & ((scores <= s_new) | torch.isnan(scores) | torch.isnan(s_new))
        e_old = torch.minimum(torch.maximum(below.sum(), (live0 == cap).long()), torch.minimum(evictions, live0))
        return n - (evictions - e_old)

    def _live_in_order(self) -> Tensor:
        """Live logical slots in insertion order (timestamp, then slot: new tokens take ascending slots)."""
        cache = self.cache
        live = cache.live_slots()[0]
        slots = torch.nonzero(live).squeeze(1)
        phys = (cache.page_table[0].repeat_interleave(cache.page_size) * cache.page_size
                + torch.arange(cache.max_slots, device=live.device) % cache.page_size)[slots]
        order = torch.argsort(cache.ts_pool.reshape(-1)[phys], stable=True)
        return slots[order]

    def compute_cache_relevance(self, current_trajectory: Tensor) -> Tensor:
        """(cache_size,) relevance of every entry, in insertion order (fp32)."""
        traj = self._check_traj("current_trajectory", current_trajectory)
        if self.cache is None or int(self.cache.live_count[0]) == 0:
            return torch.tensor([])
        scores = self.cache.relevance(traj.to(self.cache.device))[0]
        return scores[self._live_in_order()]

    def get_relevant_cache(self, query_trajectory: Tensor, top_k: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """(keys (k, embedding_dim), values (k, embedding_dim)) of the k most relevant entries, most relevant first."""
        traj = self._check_traj("query_trajectory", query_trajectory)
        E = self.embedding_dim
        live = 0 if self.cache is None else int(self.cache.live_count[0])
        if live == 0:
            return torch.empty(0, E), torch.empty(0, E)
        k = live if top_k is None else min(int(top_k), live)
        if k < 0:
            raise ValueError(f"TrajectoryAwareKVCache.get_relevant_cache: top_k must be >= 0, got {top_k}")
        slots, _ = self.cache.topk(traj.to(self.cache.device), k)
        keys, values = self.cache.gather(0, slots)
        return keys[0, 0], values[0, 0]
