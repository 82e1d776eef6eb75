"""transformers integration: a ``Cache`` that keeps at most ``capacity`` tokens per sequence, evicted by trajectory.

``TrajectoryEvictionCache(config, capacity)`` is passed as ``past_key_values=`` to ``model.generate()`` (or to a
forward). It is backed by :class:`trajops.PagedTrajectoryKVCache`: K/V live in fixed page pools sized for
``max_batch_size`` rows of ``capacity`` tokens, and when a row is full the entries least relevant to the row's newest
trajectory are evicted (relevance = alpha * cos(newest trajectory, entry trajectory) + (1 - alpha) * exp(-decay * age)).
It needs no attention weights, so it works with SDPA, eager or any attention implementation, at any batch size.

How a forward sees the cache (why the masks stay right):

* Eviction makes the kept keys non-contiguous in position. ``update`` of every layer returns
  ``cat([old, new], dim=-2)``: ``old`` = the entries that were live BEFORE this forward, sorted by original position,
  ``new`` = this forward's key/value states. All layers of one forward see the same set; the eviction decided at
  layer 0 only changes what the next forward sees (eviction happens between forward calls).
* Every row holds the same number of live entries ``Lc = min(seen, capacity)`` (all rows append the same number of
  tokens and evict only to stay at capacity), so ``get_mask_sizes(q) = (Lc + q, 0)`` and ``get_query_offset() = Lc``;
  ``get_seq_length()`` is the number of logical tokens seen, so generate's positions (RoPE) keep counting past the
  capacity.
* Left padding: transformers masks keys ``0..pad_b-1`` of row ``b``. That is right only if those are the padding
  tokens, so the padding must never be evicted: call ``cache.mark_padding(attention_mask)`` before the first forward
  and the prefill pins the padding (it counts towards the capacity). Without it the batch is assumed unpadded: a
  left-padded row is exact until its first eviction; afterwards its padding may be evicted and the mask then hides
  its ``pad_b`` oldest kept real tokens instead.

Trajectory (the default, overridable): the per-token step of layer 0's values averaged over the KV heads,
``traj_t = vbar_t - vbar_{t-1}`` (``vbar_{-1} = 0``; the last ``vbar`` of each row is kept across forwards). Values,
not keys: keys are RoPE-rotated, so differences of keys mix in the position. Override with
``trajectory_fn(keys, values) -> (B, n, traj_dim)`` (a per-token feature of layer 0; the cache takes its steps) or
with ``cache.set_trajectory(traj)``: the (B, n, traj_dim) trajectories of the next forward, given directly (e.g. from
a hidden-state hook), used for exactly one forward.

Limits: full-attention decoder models only (no sliding-window / hybrid layer types); no ``crop`` (assisted decoding,
DoLa-style rollbacks); not ``torch.compile``-able (the per-forward bookkeeping is Python); rows are rebuilt by copying
pages on ``reorder_cache`` (beam search), which costs a copy of the pools per beam step.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "trajops.hf needs the `transformers` package (>=5.17,<5.24): pip install trajops[hf]"
    ) from exc

from .kv_cache import PagedTrajectoryKVCache
from .reference.kv_cache import kv_logical_to_physical

__all__ = ["TrajectoryEvictionCache"]

TrajectoryFn = Callable[[Tensor, Tensor], Tensor]


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"TrajectoryEvictionCache: {name} must be an int >= 1, got {value!r}")
    return value


class _EvictionLayer(CacheLayerMixin):
    """Per-layer view of the shared store: the Cache API expects one object per layer; the data lives in the owner."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, owner: "TrajectoryEvictionCache", layer_idx: int) -> None:
        super().__init__()
        self._owner, self._layer_idx = owner, layer_idx

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self._owner._lazy_init(key_states)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> Tuple[Tensor, Tensor]:
        return self._owner.update(key_states, value_states, self._layer_idx)

    def get_mask_sizes(self, query_length) -> Tuple[int, int]:
        return self._owner.get_mask_sizes(query_length, self._layer_idx)

    def get_seq_length(self) -> int:
        return self._owner.get_seq_length(self._layer_idx)

    def get_max_length(self) -> int:
        return -1

    # the owner resets / reorders / selects all layers at once (one shared page layout)
    def offload(self) -> None: ...
    def prefetch(self) -> None: ...
    def reset(self) -> None: ...
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None: ...
    def batch_repeat_interleave(self, repeats: int) -> None: ...
    def batch_select_indices(self, indices: Tensor) -> None: ...

    def crop(self, tokens_to_remove: int) -> None:
        self._owner.crop(tokens_to_remove)


class TrajectoryEvictionCache(Cache):
    """A transformers ``Cache`` holding at most ``capacity`` tokens per row, evicted by trajectory relevance.

    Args:
        config: the model's config (a ``PretrainedConfig``; the decoder text config is used): gives the layer count
            and the default ``traj_dim`` (the head dim). Full-attention models only.
        capacity: live tokens kept per row (padding marked with :meth:`mark_padding` counts towards it).
        max_batch_size: rows the page pools are sized for (generate's batch * num_beams must fit).
        page_size: tokens per page of the pools.
        alpha, decay: relevance = alpha * cos + (1 - alpha) * exp(-decay * age), age in forward calls.
            ``alpha=0`` ranks by recency alone (a sliding window; with ``sinks`` a StreamingLLM-style window).
        device, dtype: of the pools; default: those of the first key states.
        trajectory_fn: ``(keys, values) -> (B, n, traj_dim)`` per-token feature of layer 0 (keys/values
            (B, num_kv_heads, n, head_dim), keys RoPE-rotated); the trajectory is its step between consecutive
            tokens. Default: values averaged over KV heads.
        traj_dim: size of the trajectory (default: the head dim).
        sinks: the first ``sinks`` tokens of each row's prefill (after its padding) are never evicted.

    Memory: ``2 * num_layers * max_batch_size * ceil(capacity / page_size) * page_size * num_kv_heads * head_dim``
    elements of K/V (see :meth:`kv_bytes`), allocated at the first update and constant afterwards.
    """

    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        config,
        capacity: int,
        *,
        max_batch_size: int = 8,
        page_size: int = 16,
        alpha: float = 0.7,
        decay: float = 0.1,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        trajectory_fn: Optional[TrajectoryFn] = None,
        traj_dim: Optional[int] = None,
        sinks: int = 0,
    ) -> None:
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        num_layers = getattr(text_config, "num_hidden_layers", None)
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError("TrajectoryEvictionCache: config must define num_hidden_layers >= 1")
        layer_types = getattr(text_config, "layer_types", None)
        if getattr(text_config, "sliding_window", None) is not None or (
            layer_types is not None and any(t != "full_attention" for t in layer_types)
        ):
            raise ValueError(
                "TrajectoryEvictionCache: only full-attention models are supported (the config has sliding-window "
                f"or non-attention layers: layer_types={layer_types}, "
                f"sliding_window={getattr(text_config, 'sliding_window', None)})"
            )
        self.capacity = _positive_int("capacity", capacity)
        self._max_batch_size = _positive_int("max_batch_size", max_batch_size)
        self.page_size = _positive_int("page_size", page_size)
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"TrajectoryEvictionCache: alpha must be in [0, 1], got {alpha!r}")
        if not (isinstance(decay, (int, float)) and decay >= 0.0 and decay != float("inf")):
            raise ValueError(f"TrajectoryEvictionCache: decay must be a finite number >= 0, got {decay!r}")
        if trajectory_fn is not None and not callable(trajectory_fn):
            raise TypeError(f"TrajectoryEvictionCache: trajectory_fn must be callable, got {type(trajectory_fn)}")
        if not isinstance(sinks, int) or isinstance(sinks, bool) or not 0 <= sinks <= capacity:
            raise ValueError(f"TrajectoryEvictionCache: sinks must be an int in [0, capacity={capacity}], got {sinks!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"TrajectoryEvictionCache: dtype must be a floating torch.dtype, got {dtype!r}")
        heads = getattr(text_config, "num_attention_heads", None)
        head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // heads if heads else None
        )
        if traj_dim is None:
            if head_dim is None:
                raise ValueError("TrajectoryEvictionCache: traj_dim is needed (the config has no head_dim)")
            traj_dim = head_dim
        self.traj_dim = _positive_int("traj_dim", traj_dim)
        self.alpha, self.decay, self.sinks = float(alpha), float(decay), sinks
        self.trajectory_fn = trajectory_fn
        self.num_layers = num_layers
        self._device = torch.device(device) if device is not None else None
        self._dtype = dtype
        super().__init__(layers=[_EvictionLayer(self, i) for i in range(num_layers)])
        self._pad_mask: Optional[Tensor] = None  # (rows, T) bool, set by mark_padding
        self._clear()

    @property
    def max_batch_size(self) -> int:  # transformers < 5.18 defines a read-only (deprecated) property of this name
        """Rows the page pools are sized for."""
        return self._max_batch_size

    # ------------------------------------------------------------------ state
    def _clear(self) -> None:
        self.store: Optional[PagedTrajectoryKVCache] = None
        self._pos: Optional[Tensor] = None  # (num_pages * page_size + 1,) int64: position of each slot; last = sink
        self._last_feat: Optional[Tensor] = None  # (max_batch, traj_dim) fp32: each row's last feature
        self._seen = 0  # logical tokens seen per row (host int: no sync to answer get_seq_length)
        self._live = 0  # live entries per row, the same in every row
        self._rows = 0  # batch size of the forwards so far
        self._pending_traj: Optional[Tensor] = None
        self._n = 0  # tokens of the forward in flight
        self._next_layer = 0
        self._old_phys: Optional[Tensor] = None  # (B, live) physical slots of the old entries, sorted by position
        self._traj: Optional[Tensor] = None  # (B, n, traj_dim) trajectories of the forward in flight
        self._pin: Optional[Tensor] = None  # (B, n) bool pinned tokens of the prefill
        for layer in self.layers:
            layer.is_initialized = False

    def _lazy_init(self, key_states: Tensor) -> None:
        if self.store is not None:
            return
        if key_states.dim() != 4:
            raise ValueError(f"TrajectoryEvictionCache: key_states must be (B, num_kv_heads, n, head_dim), got "
                             f"{list(key_states.shape)}")
        device = self._device if self._device is not None else key_states.device
        dtype = self._dtype if self._dtype is not None else key_states.dtype
        mp = -(-self.capacity // self.page_size)
        self.store = PagedTrajectoryKVCache(
            num_layers=self.num_layers, num_pages=self.max_batch_size * mp, page_size=self.page_size,
            num_kv_heads=key_states.shape[1], head_dim=key_states.shape[3], traj_dim=self.traj_dim,
            max_batch=self.max_batch_size, capacity=self.capacity, alpha=self.alpha, decay=self.decay,
            dtype=dtype, device=device,
        )
        dev = self.store.device
        self._pos = torch.full((self.store.num_pages * self.page_size + 1,), -1, dtype=torch.long, device=dev)
        self._last_feat = torch.zeros((self.max_batch_size, self.traj_dim), dtype=torch.float32, device=dev)
        for layer in self.layers:
            layer.is_initialized = True

    @property
    def is_initialized(self) -> bool:
        return self.store is not None

    def __len__(self) -> int:
        return self.num_layers

    # ------------------------------------------------------------------ caller hooks
    def mark_padding(self, attention_mask: Tensor) -> "TrajectoryEvictionCache":
        """Declare the left padding of the prompt so that the prefill pins it (returns self).

        attention_mask: (B, T) 0/1 (or bool) mask of the prompt, left padded (generate's ``attention_mask``). With
        ``num_beams`` / ``num_return_sequences`` > 1, generate repeats every row; the mask of the unexpanded batch is
        repeated the same way. Must be called before the first forward.
        """
        if self._seen:
            raise ValueError("TrajectoryEvictionCache.mark_padding: call it before the first forward (the cache has "
                             f"seen {self._seen} tokens)")
        if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2 or attention_mask.shape[1] < 1:
            raise ValueError("TrajectoryEvictionCache.mark_padding: attention_mask must be a (B, T) tensor with T >= 1, "
                             f"got {getattr(attention_mask, 'shape', type(attention_mask))}")
        m = attention_mask.detach().to("cpu")
        if m.dtype != torch.bool:
            if bool(((m != 0) & (m != 1)).any()):
                raise ValueError("TrajectoryEvictionCache.mark_padding: attention_mask must hold only 0 and 1")
            m = m != 0
        if m.shape[0] > self.max_batch_size:
            raise ValueError(f"TrajectoryEvictionCache.mark_padding: attention_mask has {m.shape[0]} rows, more than "
                             f"max_batch_size={self.max_batch_size}")
        if bool((m[:, 1:].long() < m[:, :-1].long()).any()):
            raise ValueError("TrajectoryEvictionCache.mark_padding: only left padding is supported (a row has a 0 "
                             "after a 1); use tokenizer.padding_side='left'")
        self._pad_mask = m
        return self

    def set_trajectory(self, trajectory: Tensor) -> None:
        """Trajectories (B, n, traj_dim) of the tokens of the next forward; used for that forward only."""
        if not isinstance(trajectory, Tensor) or trajectory.dim() != 3 or trajectory.shape[2] != self.traj_dim:
            raise ValueError(f"TrajectoryEvictionCache.set_trajectory: trajectory must be (B, n, {self.traj_dim}), "
                             f"got {getattr(trajectory, 'shape', type(trajectory))}")
        self._pending_traj = trajectory

    # ------------------------------------------------------------------ Cache API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Logical tokens seen per row (evicted ones included): generate derives positions from it."""
        return self._seen

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Index of this forward's first query among the keys ``update`` returns: the old live entries come first."""
        return self._live

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> Tuple[int, int]:
        """(kv_length, kv_offset) = (live + query_length, 0). Accepts a cache_position tensor (older signature)."""
        q = query_length.shape[0] if isinstance(query_length, Tensor) else int(query_length)
        return self._live + q, 0

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        """-1: the logical length is unbounded (``capacity`` bounds memory, not how many tokens can be generated)."""
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        """-1, as :meth:`get_max_length` (name used by older transformers releases)."""
        return -1

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> Tuple[Tensor, Tensor]:
        """Write this forward's K/V of one layer; return (old live entries sorted by position) ++ (new), on dim -2.

        key_states, value_states: (B, num_kv_heads, n, head_dim). Layers must come in order 0, 1, ... per forward.
        """
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"TrajectoryEvictionCache.update: layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
        if key_states.dim() != 4 or value_states.shape != key_states.shape:
            raise ValueError("TrajectoryEvictionCache.update: key_states and value_states must both be (B, num_kv_heads, "
                             f"n, head_dim), got {list(key_states.shape)} and {list(value_states.shape)}")
        if layer_idx != self._next_layer:
            raise RuntimeError(f"TrajectoryEvictionCache.update: expected layer {self._next_layer} next (layers are "
                               f"updated in order within a forward), got {layer_idx}")
        if layer_idx == 0:
            self._begin_forward(key_states, value_states)
        elif tuple(key_states.shape[::2]) != (self._old_phys.shape[0], self._n):
            raise ValueError(f"TrajectoryEvictionCache.update: layer {layer_idx} got (B, n) = "
                             f"{tuple(key_states.shape[::2])}, layer 0 had {(self._old_phys.shape[0], self._n)}")
        store = self.store
        old_k, old_v = self._gather_old(layer_idx)  # before this layer's write overwrites evicted slots
        store.append(layer_idx, key_states, value_states, self._traj, pin=self._pin if layer_idx == 0 else None)
        if layer_idx == 0:  # layer 0 chose the slots: record the new tokens' positions there
            written = store._written
            slots = torch.where(written >= 0, written, self._pos.shape[0] - 1)
            self._pos[slots] = self._seen + torch.arange(self._n, device=written.device).expand_as(written)
        self._next_layer = layer_idx + 1
        if self._next_layer == self.num_layers:
            self._end_forward()
        dt = key_states.dtype
        return (torch.cat([old_k.to(dt), key_states], dim=-2), torch.cat([old_v.to(dt), value_states], dim=-2))

    def _begin_forward(self, keys: Tensor, values: Tensor) -> None:
        self._lazy_init(keys)
        store = self.store
        B, H, n, D = keys.shape
        if (H, D) != (store.num_kv_heads, store.head_dim):
            raise ValueError(f"TrajectoryEvictionCache.update: key_states must have {store.num_kv_heads} heads of dim "
                             f"{store.head_dim}, got {H} x {D}")
        if not 1 <= B <= self.max_batch_size:
            raise ValueError(f"TrajectoryEvictionCache.update: batch size {B} must be in 1..max_batch_size="
                             f"{self.max_batch_size}")
        if self._seen and B != self._rows:
            raise ValueError(f"TrajectoryEvictionCache.update: batch size changed from {self._rows} to {B} without "
                             "reorder_cache / batch_select_indices")
        if n < 1:
            raise ValueError("TrajectoryEvictionCache.update: a forward needs at least one new token")
        dev = store.device
        # trajectories of the new tokens: steps of the feature (or the caller's, for this forward only)
        feat = self.trajectory_fn(keys, values) if self.trajectory_fn is not None else values.float().mean(dim=1)
        if not isinstance(feat, Tensor) or tuple(feat.shape) != (B, n, self.traj_dim):
            raise ValueError(f"TrajectoryEvictionCache: trajectory_fn must return (B, n, traj_dim) = ({B}, {n}, "
                             f"{self.traj_dim}), got {getattr(feat, 'shape', type(feat))}")
        feat = feat.to(device=dev, dtype=torch.float32)
        prev = torch.cat([self._last_feat[:B, None], feat[:, :-1]], dim=1)
        traj = feat - prev
        self._last_feat[:B] = feat[:, -1]
        if self._pending_traj is not None:
            given, self._pending_traj = self._pending_traj, None
            if tuple(given.shape) != (B, n, self.traj_dim):
                raise ValueError(f"TrajectoryEvictionCache: set_trajectory gave {list(given.shape)}, this forward needs "
                                 f"(B, n, traj_dim) = ({B}, {n}, {self.traj_dim})")
            traj = given.to(device=dev, dtype=torch.float32)
        self._traj = traj
        pin = self._prefill_pin(B, n, dev) if self._seen == 0 else None
        # the old entries, sorted by position, gathered from every layer's pool before that layer's write
        live = self._live
        if live:
            phys = kv_logical_to_physical(store.page_table[:B], self.page_size)
            idx = phys.clamp_min(0)
            alive = (phys >= 0) & store.live_pool.view(-1)[idx]
            pos = torch.where(alive, self._pos[idx], torch.iinfo(torch.long).max)
            order = torch.argsort(pos, dim=1, stable=True)[:, :live]  # every row has exactly `live` live slots
            self._old_phys = phys.gather(1, order)
        else:
            self._old_phys = torch.empty((B, 0), dtype=torch.long, device=dev)
        self._n, self._rows, self._pin = n, B, pin

    def _prefill_pin(self, B: int, n: int, dev: torch.device) -> Optional[Tensor]:
        pad = None
        if self._pad_mask is not None:
            m = self._pad_mask
            if m.shape[0] != B:
                if B % m.shape[0]:
                    raise ValueError(f"TrajectoryEvictionCache: mark_padding got {m.shape[0]} rows, the prefill has {B}")
                m = m.repeat_interleave(B // m.shape[0], dim=0)
            if m.shape[1] != n:
                raise ValueError(f"TrajectoryEvictionCache: mark_padding got a mask of length {m.shape[1]}, the prefill "
                                 f"has {n} tokens")
            pad = (~m).sum(1)
            if bool((pad > 0).any()) and n > self.capacity:
                raise ValueError(
                    f"TrajectoryEvictionCache: a padded prompt of {n} tokens is longer than capacity={self.capacity}: "
                    "the cache would keep only its last tokens and lose the padding the mask refers to; raise "
                    "capacity or prefill without padding"
                )
        if pad is None and self.sinks == 0:
            return None
        first_real = pad if pad is not None else torch.zeros(B, dtype=torch.long)
        ar = torch.arange(n)
        pin = ar[None, :] < (first_real[:, None] + self.sinks)
        return pin.to(dev)

    def _gather_old(self, layer: int) -> Tuple[Tensor, Tensor]:
        store = self.store
        H, D = store.num_kv_heads, store.head_dim
        phys = self._old_phys
        k = store.k_pool[layer].view(-1, H, D)[phys].transpose(1, 2)
        v = store.v_pool[layer].view(-1, H, D)[phys].transpose(1, 2)
        return k, v

    def _end_forward(self) -> None:
        store = self.store
        self._seen += self._n
        self._live = min(self._live + self._n, self.capacity)
        store.step()
        self._next_layer = 0

    # ------------------------------------------------------------------ batch surgery (beam search)
    def batch_select_indices(self, indices: Tensor) -> None:
        """Rebuild the cache so that row b holds what row indices[b] held (rows may repeat or be dropped).

        indices: (B',) int64 row ids, or a bool mask over the current rows. Every pool (K/V of all layers,
        trajectories, timestamps, flags, positions) is copied page by page into a fresh layout where row b owns pages
        [b * MP, (b + 1) * MP); one-off tensor copies, no per-token loop.
        """
        if self._next_layer:
            raise RuntimeError("TrajectoryEvictionCache: cannot select rows in the middle of a forward")
        if not isinstance(indices, Tensor):
            indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            if indices.dim() != 1 or (self._rows and indices.shape[0] != self._rows):
                raise ValueError(f"TrajectoryEvictionCache: a bool row mask must have shape ({self._rows},), got "
                                 f"{list(indices.shape)}")
            indices = indices.nonzero().flatten()
        if indices.dim() != 1 or indices.dtype not in (torch.long, torch.int, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"TrajectoryEvictionCache: indices must be a 1-D integer tensor, got {indices.dtype} "
                             f"{list(indices.shape)}")
        nb = indices.shape[0]
        if not 1 <= nb <= self.max_batch_size:
            raise ValueError(f"TrajectoryEvictionCache: selecting {nb} rows, expected 1..max_batch_size="
                             f"{self.max_batch_size}")
        if self.store is None or self._seen == 0:
            self._rows = nb if self._seen else self._rows
            return
        st = self.store
        dev = st.device
        idx = indices.to(device=dev, dtype=torch.long)
        MP, S, P = st.max_pages_per_seq, self.page_size, st.num_pages
        src_pt = st.page_table[idx]  # (nb, MP)
        valid = src_pt >= 0
        # new page b * MP + j takes the content of page src_pt[b, j]; pages of rows >= nb are free
        src_page = torch.zeros(P, dtype=torch.long, device=dev)
        in_use = torch.zeros(P, dtype=torch.bool, device=dev)
        src_page[: nb * MP] = src_pt.clamp_min(0).reshape(-1)
        in_use[: nb * MP] = valid.reshape(-1)
        for pool in (st.k_pool, st.v_pool):
            pool.copy_(pool[:, src_page])
        for pool in (st.traj_pool, st.ts_pool):
            pool.copy_(pool[src_page])
        for pool in (st.live_pool, st.pinned_pool):
            pool.copy_(pool[src_page] & in_use[:, None])
        pos = self._pos[:-1].view(P, S)
        pos.copy_(pos[src_page])
        new_pt = torch.full_like(st.page_table, -1)
        dst = torch.arange(nb * MP, device=dev).view(nb, MP)
        new_pt[:nb] = torch.where(valid, dst, -1)
        st.page_table.copy_(new_pt)
        # free stack: unused pages, the lowest on top (where the constructor puts page 0)
        pages = torch.arange(P, device=dev)
        st.free_pages.copy_(pages[torch.argsort(torch.where(in_use, P + pages, -pages))])
        st.free_top.copy_((~in_use).sum())
        for row_state in (st.live_count, st.evicted_total, self._last_feat):
            fresh = torch.zeros_like(row_state)
            fresh[:nb] = row_state[idx]
            row_state.copy_(fresh)
        self._rows = nb

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b becomes a copy of row beam_idx[b] (see :meth:`batch_select_indices`)."""
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times in place (row order as ``Tensor.repeat_interleave``)."""
        _positive_int("repeats", repeats)
        if self._rows:
            self.batch_select_indices(torch.arange(self._rows).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "TrajectoryEvictionCache.crop: an evicting cache cannot roll back (evicted entries are gone); assisted "
            "decoding / speculative decoding and other crop-based generation modes are not supported"
        )

    def reset(self) -> None:
        """Forget everything (tokens, padding marks, pending trajectory); pools are reallocated at the next update."""
        self._pad_mask = None
        self._clear()

    # ------------------------------------------------------------------ introspection
    def kept_positions(self) -> Tensor:
        """(B, live) int64: the positions (0-based index in the padded sequence) of each row's live entries, sorted."""
        if self.store is None or self._live == 0:
            return torch.empty((self._rows, 0), dtype=torch.long)
        st = self.store
        phys = kv_logical_to_physical(st.page_table[: self._rows], self.page_size)
        idx = phys.clamp_min(0)
        alive = (phys >= 0) & st.live_pool.view(-1)[idx]
        pos = torch.where(alive, self._pos[idx], torch.iinfo(torch.long).max)
        return pos.sort(dim=1).values[:, : self._live]

    def stats(self) -> Dict[str, Union[int, Tensor]]:
        """seen (int), live (B,), evicted_total (B,), pages_in_use (0-d), kv_bytes (int) of the current rows."""
        if self.store is None:
            return {"seen": 0, "live": torch.zeros(0, dtype=torch.long), "evicted_total": torch.zeros(0, dtype=torch.long),
                    "pages_in_use": torch.zeros((), dtype=torch.long), "kv_bytes": 0}
        s = self.store.stats()
        return {"seen": self._seen, "live": s["live"][: self._rows], "evicted_total": s["evicted_total"][: self._rows],
                "pages_in_use": s["pages_in_use"], "kv_bytes": self.kv_bytes()}

    def kv_bytes(self) -> int:
        """Bytes of the K and V page pools (0 before the first update); constant once allocated."""
        if self.store is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.store.k_pool, self.store.v_pool))

    def __repr__(self) -> str:
        return (f"TrajectoryEvictionCache(capacity={self.capacity}, layers={self.num_layers}, rows={self._rows}, "
                f"seen={self._seen}, live={self._live})")
