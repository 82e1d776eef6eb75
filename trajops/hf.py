"""The transformers cache: ``TrajectoryEvictionCache``, a thin adapter of the transformers ``Cache`` API onto the paged
store (:class:`trajops.PagedTrajectoryKVCache`, which owns every tensor and invariant; see trajops/kv_cache.py for the
roles of the KV-cache modules). Pass it as ``past_key_values=`` to ``model.generate()`` or a forward: it keeps at most
``capacity`` tokens per row, evicting the entries least relevant to the row's newest trajectory (relevance = alpha *
cos(newest, entry) + (1 - alpha) * exp(-decay * age)); no attention weights needed (SDPA, eager, any batch size).

How a forward sees the cache: ``update`` of every layer returns ``cat([old, new], dim=-2)``, ``old`` = the entries
live BEFORE this forward in position order (``store.live_entries``), ``new`` = this forward's states. Every row holds
``Lc = min(seen, capacity)`` live entries, so ``get_mask_sizes(q) = (Lc + q, 0)``, ``get_query_offset() = Lc``, and
``get_seq_length()`` counts every token seen (RoPE positions keep counting past the capacity). Left padding must
never be evicted (the model masks a row's first keys): ``mark_padding(attention_mask)`` before the first forward pins
it; without it the batch is taken as unpadded (a padded row is exact until its first eviction, then wrong).

Trajectory (default): the per-token step of layer 0's values averaged over the KV heads, ``vbar_t - vbar_{t-1}``
(values, not keys: keys are RoPE-rotated). Override with ``trajectory_fn(keys, values) -> (B, n, traj_dim)`` (a
feature; the cache takes its steps) or ``set_trajectory(traj)`` for the next forward only.

Limits: full-attention decoder models only; no ``crop`` (assisted decoding); not ``torch.compile``-able; beam
search copies the pools per reorder. Supported transformers: ``SUPPORTED_TRANSFORMERS`` (checked at import).
"""
from __future__ import annotations

from importlib import metadata as _metadata
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version
from torch import Tensor

SUPPORTED_TRANSFORMERS = ">=5.17,<5.24"  # keep equal to pyproject's `hf` extra (tests check it)


def _transformers_version() -> Optional[str]:
    try:
        return _metadata.version("transformers")
    except _metadata.PackageNotFoundError:
        return None


def _check_transformers() -> None:
    """ImportError naming the supported range when transformers is absent or outside it (before importing it)."""
    found = _transformers_version()
    try:
        ok = found is not None and SpecifierSet(SUPPORTED_TRANSFORMERS).contains(Version(found), prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise ImportError(f"trajops.hf supports transformers {SUPPORTED_TRANSFORMERS}, found "
                          f"{found or 'none'}: pip install 'trajops[hf]'")


_check_transformers()
try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as exc:
    raise ImportError(f"trajops.hf needs the `transformers` package ({SUPPORTED_TRANSFORMERS}): pip install trajops[hf]"
                      ) from exc

from .kv_cache import PagedTrajectoryKVCache  # noqa: E402

__all__ = ["TrajectoryEvictionCache", "SUPPORTED_TRANSFORMERS"]

TrajectoryFn = Callable[[Tensor, Tensor], Tensor]


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"TrajectoryEvictionCache: {name} must be an int >= 1, got {value!r}")
    return value


class _EvictionLayer(CacheLayerMixin):
    """Per-layer view: the Cache API wants one object per layer; the owner does the work (one shared page layout)."""

    is_compileable = is_croppable = is_sliding = False

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

    def crop(self, tokens_to_remove: int) -> None:
        self._owner.crop(tokens_to_remove)

    # the owner resets / reorders / selects all layers at once
    def offload(self) -> None: ...
    def prefetch(self) -> None: ...
    def reset(self) -> None: ...
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None: ...
    def batch_repeat_interleave(self, repeats: int) -> None: ...
    def batch_select_indices(self, indices: Tensor) -> None: ...


class TrajectoryEvictionCache(Cache):
    """A transformers ``Cache`` holding at most ``capacity`` tokens per row, evicted by trajectory relevance.

    Args:
        config: the model's config (decoder text config used): layer count and default ``traj_dim`` (head dim).
        capacity: live tokens kept per row (padding marked with :meth:`mark_padding` counts towards it).
        max_batch_size: rows the page pools are sized for (generate's batch * num_beams must fit).
        page_size: tokens per page. alpha, decay: of the relevance, age in forward calls (``alpha=0``: by recency).
        device, dtype: of the pools; default: those of the first key states.
        trajectory_fn: ``(keys, values) -> (B, n, traj_dim)`` per-token feature of layer 0 (keys/values
            (B, num_kv_heads, n, head_dim)); the trajectory is its step between tokens. Default: values' head mean.
        traj_dim: size of the trajectory (default: the head dim).
        sinks: the first ``sinks`` tokens of each row's prefill (after its padding) are never evicted.

    Memory: ``2 * num_layers * max_batch_size * ceil(capacity / page_size) * page_size * num_kv_heads * head_dim``
    elements of K/V (:meth:`kv_bytes`), allocated at the first update, constant afterwards.
    """

    is_compileable = is_croppable = False

    def __init__(self, config, capacity: int, *, max_batch_size: int = 8, page_size: int = 16, alpha: float = 0.7,
                 decay: float = 0.1, device: Optional[Union[str, torch.device]] = None,
                 dtype: Optional[torch.dtype] = None, trajectory_fn: Optional[TrajectoryFn] = None,
                 traj_dim: Optional[int] = None, sinks: int = 0) -> None:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        num_layers = getattr(text, "num_hidden_layers", None)
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError("TrajectoryEvictionCache: config must define num_hidden_layers >= 1")
        types, window = getattr(text, "layer_types", None), getattr(text, "sliding_window", None)
        if window is not None or (types is not None and any(t != "full_attention" for t in types)):
            raise ValueError("TrajectoryEvictionCache: only full-attention models are supported (the config has "
                             f"sliding-window or non-attention layers: layer_types={types}, sliding_window={window})")
        self.capacity = _positive_int("capacity", capacity)
        self._max_batch_size = _positive_int("max_batch_size", max_batch_size)
        self.page_size = _positive_int("page_size", page_size)
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"TrajectoryEvictionCache: alpha must be in [0, 1], got {alpha!r}")
        if not (isinstance(decay, (int, float)) and 0.0 <= decay < float("inf")):
            raise ValueError(f"TrajectoryEvictionCache: decay must be a finite number >= 0, got {decay!r}")
        if trajectory_fn is not None and not callable(trajectory_fn):
            raise TypeError(f"TrajectoryEvictionCache: trajectory_fn must be callable, got {type(trajectory_fn)}")
        if not isinstance(sinks, int) or isinstance(sinks, bool) or not 0 <= sinks <= capacity:
            raise ValueError(f"TrajectoryEvictionCache: sinks must be an int in [0, capacity={capacity}], got {sinks!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"TrajectoryEvictionCache: dtype must be a floating torch.dtype, got {dtype!r}")
        heads = getattr(text, "num_attention_heads", None)
        if traj_dim is None:
            traj_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
        if traj_dim is None:
            raise ValueError("TrajectoryEvictionCache: traj_dim is needed (the config has no head_dim)")
        self.traj_dim = _positive_int("traj_dim", traj_dim)
        self.alpha, self.decay, self.sinks, self.trajectory_fn = float(alpha), float(decay), sinks, trajectory_fn
        self.num_layers = num_layers
        self._device, self._dtype = (torch.device(device) if device is not None else None), dtype
        super().__init__(layers=[_EvictionLayer(self, i) for i in range(num_layers)])
        self._pad_mask: Optional[Tensor] = None  # (rows, T) bool, set by mark_padding
        self._clear()

    @property
    def max_batch_size(self) -> int:  # transformers < 5.18 defines a read-only (deprecated) property of this name
        """Rows the page pools are sized for."""
        return self._max_batch_size

    def _clear(self) -> None:
        self.store: Optional[PagedTrajectoryKVCache] = None
        self._last_feat: Optional[Tensor] = None  # (max_batch, traj_dim) fp32: each row's last feature
        self._seen = self._live = self._rows = 0  # host ints (no sync): tokens seen / live per row, batch size
        self._pending_traj: Optional[Tensor] = None
        self._n = self._next_layer = 0  # tokens of the forward in flight, next layer expected
        self._old: Optional[Tensor] = None  # (B, live) physical slots of the entries live before this forward
        self._traj: Optional[Tensor] = None  # (B, n, traj_dim) trajectories of the forward in flight
        self._pin: Optional[Tensor] = None  # (B, n) bool pinned tokens of the prefill
        for layer in self.layers:
            layer.is_initialized = False

    def _lazy_init(self, key_states: Tensor) -> None:
        if self.store is not None:
            return
        if key_states.dim() != 4:
            raise ValueError("TrajectoryEvictionCache: key_states must be (B, num_kv_heads, n, head_dim), got "
                             f"{list(key_states.shape)}")
        self.store = PagedTrajectoryKVCache(
            num_layers=self.num_layers, num_pages=self.max_batch_size * -(-self.capacity // self.page_size),
            page_size=self.page_size, num_kv_heads=key_states.shape[1], head_dim=key_states.shape[3],
            traj_dim=self.traj_dim, max_batch=self.max_batch_size, capacity=self.capacity, alpha=self.alpha,
            decay=self.decay, dtype=self._dtype or key_states.dtype, device=self._device or key_states.device)
        self._last_feat = torch.zeros((self.max_batch_size, self.traj_dim), device=self.store.device)
        for layer in self.layers:
            layer.is_initialized = True

    @property
    def is_initialized(self) -> bool:
        return self.store is not None

    def __len__(self) -> int:
        return self.num_layers

    # ------------------------------------------------------------------ caller hooks
    def mark_padding(self, attention_mask: Tensor) -> "TrajectoryEvictionCache":
        """Declare the prompt's left padding so that the prefill pins it (returns self); call before the first forward.

        attention_mask: (B, T) 0/1 or bool, left padded (generate's ``attention_mask``). With ``num_beams`` /
        ``num_return_sequences`` > 1 the mask of the unexpanded batch is repeated as generate repeats the rows.
        """
        name = "TrajectoryEvictionCache.mark_padding"
        if self._seen:
            raise ValueError(f"{name}: call it before the first forward (the cache has seen {self._seen} tokens)")
        if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2 or attention_mask.shape[1] < 1:
            raise ValueError(f"{name}: attention_mask must be a (B, T) tensor with T >= 1, got "
                             f"{getattr(attention_mask, 'shape', type(attention_mask))}")
        m = attention_mask.detach().to("cpu")
        if m.dtype != torch.bool and bool(((m != 0) & (m != 1)).any()):
            raise ValueError(f"{name}: attention_mask must hold only 0 and 1")
        m = m != 0
        if m.shape[0] > self.max_batch_size:
            raise ValueError(f"{name}: attention_mask has {m.shape[0]} rows, more than max_batch_size="
                             f"{self.max_batch_size}")
        if bool((m[:, 1:].long() < m[:, :-1].long()).any()):
            raise ValueError(f"{name}: only left padding is supported (a row has a 0 after a 1); use "
                             "tokenizer.padding_side='left'")
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
        return self._live + (query_length.shape[0] if isinstance(query_length, Tensor) else int(query_length)), 0

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        """-1: the logical length is unbounded (``capacity`` bounds memory, not the tokens generated)."""
        return -1

    get_max_cache_shape = get_max_length  # the name older transformers releases call

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> Tuple[Tensor, Tensor]:
        """Store this forward's K/V of one layer; return (entries live before it, in position order) ++ (new), dim -2.

        key_states, value_states: (B, num_kv_heads, n, head_dim). Layers come in order 0, 1, ... in each forward.
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
        elif tuple(key_states.shape[::2]) != (self._old.shape[0], self._n):
            raise ValueError(f"TrajectoryEvictionCache.update: layer {layer_idx} got (B, n) = "
                             f"{tuple(key_states.shape[::2])}, layer 0 had {(self._old.shape[0], self._n)}")
        old_k, old_v = self.store.read_slots(layer_idx, self._old)  # before this layer's write reuses evicted slots
        self.store.append(layer_idx, key_states, value_states, self._traj, pin=self._pin if layer_idx == 0 else None)
        self._next_layer = layer_idx + 1
        if self._next_layer == self.num_layers:
            self._seen += self._n
            self._live = min(self._live + self._n, self.capacity)
            self.store.step()
            self._next_layer = 0
        dt = key_states.dtype
        return torch.cat([old_k.to(dt), key_states], dim=-2), torch.cat([old_v.to(dt), value_states], dim=-2)

    def _begin_forward(self, keys: Tensor, values: Tensor) -> None:
        self._lazy_init(keys)
        store, (B, H, n, D) = self.store, keys.shape
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
        # trajectories of the new tokens: steps of the feature (or the caller's, for this forward only)
        feat = self.trajectory_fn(keys, values) if self.trajectory_fn is not None else values.float().mean(dim=1)
        if not isinstance(feat, Tensor) or tuple(feat.shape) != (B, n, self.traj_dim):
            raise ValueError(f"TrajectoryEvictionCache: trajectory_fn must return (B, n, traj_dim) = ({B}, {n}, "
                             f"{self.traj_dim}), got {getattr(feat, 'shape', type(feat))}")
        feat = feat.to(device=store.device, dtype=torch.float32)
        traj = feat - torch.cat([self._last_feat[:B, None], feat[:, :-1]], dim=1)
        self._last_feat[:B] = feat[:, -1]
        if self._pending_traj is not None:
            given, self._pending_traj = self._pending_traj, None
            if tuple(given.shape) != (B, n, self.traj_dim):
                raise ValueError(f"TrajectoryEvictionCache: set_trajectory gave {list(given.shape)}, this forward needs "
                                 f"(B, n, traj_dim) = ({B}, {n}, {self.traj_dim})")
            traj = given.to(device=store.device, dtype=torch.float32)
        self._pin = self._prefill_pin(B, n) if self._seen == 0 else None
        self._old = store.live_entries(B, self._live)[0]  # every row has exactly `live` entries: no sync
        self._traj, self._n, self._rows = traj, n, B

    def _prefill_pin(self, B: int, n: int) -> Optional[Tensor]:
        """(B, n) bool: the prefill's padding and its first ``sinks`` real tokens per row (None if nothing to pin)."""
        first_real = torch.zeros(B, dtype=torch.long)
        if self._pad_mask is not None:
            m = self._pad_mask
            if m.shape[0] != B and B % m.shape[0]:
                raise ValueError(f"TrajectoryEvictionCache: mark_padding got {m.shape[0]} rows, the prefill has {B}")
            if m.shape[1] != n:
                raise ValueError(f"TrajectoryEvictionCache: mark_padding got a mask of length {m.shape[1]}, the prefill "
                                 f"has {n} tokens")
            first_real = (~m).sum(1).repeat_interleave(B // m.shape[0])
            if bool((first_real > 0).any()) and n > self.capacity:
                raise ValueError(f"TrajectoryEvictionCache: a padded prompt of {n} tokens is longer than capacity="
                                 f"{self.capacity}: the cache would keep only its last tokens and lose the padding the "
                                 "mask refers to; raise capacity or prefill without padding")
        elif self.sinks == 0:
            return None
        return (torch.arange(n)[None, :] < (first_real[:, None] + self.sinks)).to(self.store.device)

    # ------------------------------------------------------------------ batch surgery (beam search)
    def batch_select_indices(self, indices: Tensor) -> None:
        """Row b becomes a copy of row indices[b] (rows may repeat or be dropped): ``store.select_rows``.

        indices: (B',) integer row ids, or a (B,) bool mask over the current rows.
        """
        if self._next_layer:
            raise RuntimeError("TrajectoryEvictionCache: cannot select rows in the middle of a forward")
        indices = indices if isinstance(indices, Tensor) else torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            if indices.dim() != 1 or (self._rows and indices.shape[0] != self._rows):
                raise ValueError(f"TrajectoryEvictionCache: a bool row mask must have shape ({self._rows},), got "
                                 f"{list(indices.shape)}")
            indices = indices.nonzero().flatten()
        if indices.dim() != 1 or indices.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise ValueError(f"TrajectoryEvictionCache: indices must be a 1-D integer tensor, got {indices.dtype} "
                             f"{list(indices.shape)}")
        nb = indices.shape[0]
        if not 1 <= nb <= self.max_batch_size:
            raise ValueError(f"TrajectoryEvictionCache: selecting {nb} rows, expected 1..max_batch_size="
                             f"{self.max_batch_size}")
        if self.store is None or self._seen == 0:
            self._rows = nb if self._seen else self._rows
            return
        self.store.select_rows(indices)
        idx = indices.to(device=self.store.device, dtype=torch.long)
        fresh = torch.zeros_like(self._last_feat)
        fresh[:nb] = self._last_feat[idx]
        self._last_feat, self._rows = fresh, nb

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b becomes a copy of row beam_idx[b] (see :meth:`batch_select_indices`)."""
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times in place (row order as ``Tensor.repeat_interleave``)."""
        _positive_int("repeats", repeats)
        if self._rows:
            self.batch_select_indices(torch.arange(self._rows).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("TrajectoryEvictionCache.crop: an evicting cache cannot roll back (evicted entries "
                                  "are gone); assisted / speculative decoding and other crop-based modes are not supported")

    def reset(self) -> None:
        """Forget everything (tokens, padding marks, pending trajectory); pools are reallocated at the next update."""
        self._pad_mask = None
        self._clear()

    # ------------------------------------------------------------------ introspection
    def kept_positions(self) -> Tensor:
        """(B, live) int64: the positions (0-based index in the padded sequence) of each row's live entries, sorted."""
        if self.store is None or self._live == 0:
            return torch.empty((self._rows, 0), dtype=torch.long)
        return self.store.live_entries(self._rows, self._live)[1]

    def stats(self) -> Dict[str, Union[int, Tensor]]:
        """seen (int), live (B,), evicted_total (B,), pages_in_use (0-d), kv_bytes (int) of the current rows."""
        s = self.store.stats() if self.store is not None else None
        empty = torch.zeros(0, dtype=torch.long)
        return {"seen": self._seen, "live": s["live"][: self._rows] if s else empty,
                "evicted_total": s["evicted_total"][: self._rows] if s else empty,
                "pages_in_use": s["pages_in_use"] if s else torch.zeros((), dtype=torch.long), "kv_bytes": self.kv_bytes()}

    def kv_bytes(self) -> int:
        """Bytes of the K and V page pools (0 before the first update); constant once allocated."""
        st = self.store
        return 0 if st is None else sum(t.numel() * t.element_size() for t in (st.k_pool, st.v_pool))

    def __repr__(self) -> str:
        return (f"TrajectoryEvictionCache(capacity={self.capacity}, layers={self.num_layers}, rows={self._rows}, "
                f"seen={self._seen}, live={self._live})")
