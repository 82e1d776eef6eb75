"""The forward-level cache: ``ForwardKVCache``, what one model forward sees of the paged store, framework-free.

Roles of the KV-cache modules (see also trajops/kv_cache.py): ``trajops.ops.kv_cache`` the op group,
``trajops.kv_cache`` the paged store (owns every tensor and invariant), this module the per-forward protocol on
top of it, ``trajops.nn.kv_cache`` the seed's drop-in class, ``trajops.hf`` the transformers ``Cache`` (a thin
adapter of this class). Use this class directly from a hand-written decode loop; it imports no framework.

The protocol: a forward feeds every layer in order 0, 1, ... with (B, num_kv_heads, n, head_dim) keys/values of
the same n new tokens per row; ``update`` returns ``cat([old, new], dim=-2)``, ``old`` = the entries live BEFORE
this forward in position order (the store's ``live_entries``, read per layer before that layer's write), ``new`` =
this forward's states. All layers of one forward see the same set; the eviction decided at layer 0 changes what
the next forward sees. Every row holds ``live = min(seen, capacity)`` entries (all rows append the same tokens and
evict only to stay at capacity), so a mask over ``live + n`` keys with the queries at offset ``live`` is exact;
``seen`` counts every token (positions keep counting past the capacity).

The paged protocol (no gather): per layer, ``stage(k, v, layer)`` then ``attend(q, layer, scale, attn_mask)``,
which attends over the same keys as :meth:`update` returns (old entries read from the page pools via
``trajops::paged_temperature_attention``, the new tokens causally; trajops/kv_attention.py) and then writes the layer.
Writing after attending keeps the entries evicted at layer 0 readable by the later layers of the same forward; the
page table and live flags it reads are copied before layer 0's write. One forward uses one protocol for all layers.

Left padding: a model masks keys 0..pad_b-1 of row b, right only while those are the padding tokens, so the padding
must never be evicted: ``mark_padding(attention_mask)`` before the first forward pins it (it counts towards the
capacity). Without it the batch is taken as unpadded: a padded row is exact until its first eviction; afterwards
its padding may be evicted and the mask hides its oldest kept real tokens instead.

Trajectory (default, overridable): the per-token step of layer 0's values averaged over the KV heads,
``traj_t = vbar_t - vbar_{t-1}`` (``vbar_{-1} = 0``; each row's last ``vbar`` is kept across forwards). Values,
not keys: keys are RoPE-rotated, their differences mix in the position. Override with ``trajectory_fn(keys,
values) -> (B, n, traj_dim)`` (a per-token feature; the cache takes its steps) or ``set_trajectory(traj)``: the
(B, n, traj_dim) trajectories of the next forward, used for that forward only.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import kv_attention as _attn  # the attention math lives next door (module attributes: tests patch them)
from .kv_cache import PagedTrajectoryKVCache

__all__ = ["ForwardKVCache"]

TrajectoryFn = Callable[[Tensor, Tensor], Tensor]


class ForwardKVCache:
    """At most ``capacity`` tokens per row of a multi-layer model, evicted by trajectory relevance between forwards.

    Args:
        num_layers: attention layers of the model.
        capacity: live tokens kept per row (padding marked with :meth:`mark_padding` counts towards it).
        traj_dim: size of the trajectory (e.g. the head dim, with the default trajectory).
        max_batch_size: rows the page pools are sized for (batch * beams must fit).
        page_size: tokens per page. alpha, decay: relevance = alpha * cos(newest trajectory, entry's) +
            (1 - alpha) * exp(-decay * age), age in forwards (``alpha=0``: by recency alone, a sliding window).
        device, dtype: of the pools; default: those of the first key states.
        trajectory_fn: ``(keys, values) -> (B, n, traj_dim)`` per-token feature of layer 0 (keys/values
            (B, num_kv_heads, n, head_dim)); the trajectory is its step between tokens. Default: values' head mean.
        sinks: the first ``sinks`` tokens of each row's prefill (after its padding) are never evicted.

    Memory: ``2 * num_layers * max_batch_size * ceil(capacity / page_size) * page_size * num_kv_heads * head_dim``
    elements of K/V (:meth:`kv_bytes`), allocated at the first update, constant afterwards.
    """

    def __init__(self, num_layers: int, capacity: int, traj_dim: int, *, max_batch_size: int = 8, page_size: int = 16,
                 alpha: float = 0.7, decay: float = 0.1, device: Optional[Union[str, torch.device]] = None,
                 dtype: Optional[torch.dtype] = None, trajectory_fn: Optional[TrajectoryFn] = None,
                 sinks: int = 0) -> None:
        self.num_layers = self._positive_int("num_layers", num_layers)
        self.capacity = self._positive_int("capacity", capacity)
        self._max_batch_size = self._positive_int("max_batch_size", max_batch_size)
        self.page_size = self._positive_int("page_size", page_size)
        self.traj_dim = self._positive_int("traj_dim", traj_dim)
        name = type(self).__name__
        if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"{name}: alpha must be in [0, 1], got {alpha!r}")
        if not (isinstance(decay, (int, float)) and 0.0 <= decay < float("inf")):
            raise ValueError(f"{name}: decay must be a finite number >= 0, got {decay!r}")
        if trajectory_fn is not None and not callable(trajectory_fn):
            raise TypeError(f"{name}: trajectory_fn must be callable, got {type(trajectory_fn)}")
        if not isinstance(sinks, int) or isinstance(sinks, bool) or not 0 <= sinks <= capacity:
            raise ValueError(f"{name}: sinks must be an int in [0, capacity={capacity}], got {sinks!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{name}: dtype must be a floating torch.dtype, got {dtype!r}")
        self.alpha, self.decay, self.sinks, self.trajectory_fn = float(alpha), float(decay), sinks, trajectory_fn
        self._device, self._dtype = (torch.device(device) if device is not None else None), dtype
        self._pad_mask: Optional[Tensor] = None  # (rows, T) bool, set by mark_padding
        self._clear()

    def _positive_int(self, name: str, value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{type(self).__name__}: {name} must be an int >= 1, got {value!r}")
        return value

    @property
    def max_batch_size(self) -> int:  # transformers < 5.18 defines a read-only (deprecated) property of this name
        """Rows the page pools are sized for."""
        return self._max_batch_size

    @property
    def seen(self) -> int:
        """Tokens seen per row (evicted ones included)."""
        return self._seen

    @property
    def live(self) -> int:
        """Live entries per row (the same in every row): the ``old`` part the next forward's ``update`` returns."""
        return self._live

    def _clear(self) -> None:
        self.store: Optional[PagedTrajectoryKVCache] = None
        self._last_feat: Optional[Tensor] = None  # (max_batch, traj_dim) fp32: each row's last feature
        self._seen = self._live = self._rows = 0  # host ints (no sync): tokens seen / live per row, batch size
        self._pending_traj: Optional[Tensor] = None
        self._n = self._next_layer = 0  # tokens of the forward in flight, next layer expected
        self._old: Optional[Tensor] = None  # (B, live) physical slots of the entries live before this forward
        self._traj: Optional[Tensor] = None  # (B, n, traj_dim) trajectories of the forward in flight
        self._pin: Optional[Tensor] = None  # (B, n) bool pinned tokens of the prefill
        self._paged = False  # this forward uses stage + attend
        self._staged: Optional[Tuple[int, Tensor, Tensor]] = None  # (layer, keys, values) awaiting attend
        self._paged_view: Optional[Tuple[Tensor, Tensor]] = None  # (page_table, live) before this forward
        self._causal_seen: tuple = (None, True, None)  # (last attend's mask, new keys causal?, its new-key part)
        self._hidden_pins: Optional[Tuple[Tensor, Tensor]] = None  # (shown (B, live), live flags that hide them)
        self._views: Optional[tuple] = None  # see _row_views
        self._attend_sig: Optional[tuple] = None  # layer 0's paged-op call in this forward (see attend)

    def _lazy_init(self, key_states: Tensor) -> None:
        if self.store is not None:
            return
        if key_states.dim() != 4:
            raise ValueError(f"{type(self).__name__}: key_states must be (B, num_kv_heads, n, head_dim), got "
                             f"{list(key_states.shape)}")
        self.store = PagedTrajectoryKVCache(
            num_layers=self.num_layers, num_pages=self.max_batch_size * -(-self.capacity // self.page_size),
            page_size=self.page_size, num_kv_heads=key_states.shape[1], head_dim=key_states.shape[3],
            traj_dim=self.traj_dim, max_batch=self.max_batch_size, capacity=self.capacity, alpha=self.alpha,
            decay=self.decay, dtype=self._dtype or key_states.dtype, device=self._device or key_states.device)
        self._last_feat = torch.zeros((self.max_batch_size, self.traj_dim), device=self.store.device)

    @property
    def is_initialized(self) -> bool:
        return self.store is not None

    def __len__(self) -> int:
        return self.num_layers

    # ------------------------------------------------------------------ caller hooks
    def mark_padding(self, attention_mask: Tensor) -> "ForwardKVCache":
        """Declare the prompt's left padding so that the prefill pins it (returns self); call before the first forward.

        attention_mask: (B, T) 0/1 or bool, left padded (generate's ``attention_mask``). With ``num_beams`` /
        ``num_return_sequences`` > 1 the mask of the unexpanded batch is repeated as generate repeats the rows.
        """
        name = f"{type(self).__name__}.mark_padding"
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
            raise ValueError(f"{type(self).__name__}.set_trajectory: trajectory must be (B, n, {self.traj_dim}), "
                             f"got {getattr(trajectory, 'shape', type(trajectory))}")
        self._pending_traj = trajectory

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int) -> Tuple[Tensor, Tensor]:
        """Store this forward's K/V of one layer; return (entries live before it, in position order) ++ (new), dim -2.

        key_states, value_states: (B, num_kv_heads, n, head_dim). Layers come in order 0, 1, ... in each forward.
        """
        self._begin_layer(key_states, value_states, layer_idx, paged=False)
        old_k, old_v = self.store.read_slots(layer_idx, self._old)  # before this layer's write reuses evicted slots
        self._write_layer(layer_idx, key_states, value_states)
        dt = key_states.dtype
        return torch.cat([old_k.to(dt), key_states], dim=-2), torch.cat([old_v.to(dt), value_states], dim=-2)

    # ------------------------------------------------------------------ paged protocol: stage, then attend
    def stage(self, key_states: Tensor, value_states: Tensor, layer_idx: int) -> None:
        """The paged alternative to :meth:`update`: hold this forward's K/V of one layer until :meth:`attend`.

        key_states, value_states: (B, num_kv_heads, n, head_dim). Nothing is gathered; the layer is written to the
        store by ``attend(query, layer_idx, ...)``, which must come before the next layer's ``stage``. One forward
        uses either ``update`` or ``stage`` + ``attend`` for all its layers.
        """
        self._begin_layer(key_states, value_states, layer_idx, paged=True)
        self._staged = (layer_idx, key_states, value_states)

    def attend(self, query: Tensor, layer_idx: int, *, scale: Optional[float] = None,
               attn_mask: Optional[Tensor] = None) -> Tensor:
        """Attention (tau = 1) of the staged layer's queries over the entries live before this forward ++ the staged
        tokens, read from the page pools; then writes the staged K/V. Equals attention over :meth:`update`'s output.

        query: (B, Hq, n, head_dim), Hq a multiple of num_kv_heads. scale: default 1/sqrt(head_dim).
        attn_mask: None (causal among the new tokens, every old entry visible) or bool (B, 1 or Hq, n, live + n),
            True = attend, over the keys in :meth:`update`'s order (old in position order, then new). Old keys are
            masked per key (a key-padding mask: left padding, whose entries stay live when pinned by
            :meth:`mark_padding`); the new keys take the mask as given. A mask whose old-entry part differs between
            queries or heads raises NotImplementedError (checked at layer 0 when n > 1 or the mask has Hq heads:
            one host read per prefill; a decode step's (B, 1, 1, live + 1) mask has nothing to compare).
        Returns (B, Hq, n, head_dim) in query's dtype. Inference only (the paged op has no backward).
        """
        # a decode step runs this once per layer: the checks index shapes directly (tuple building and slicing
        # cost microseconds each, which add up over 30 layers per token)
        name, staged = f"{type(self).__name__}.attend", self._staged
        if staged is None or staged[0] != layer_idx:
            raise RuntimeError(f"{name}: layer {layer_idx} was not staged (call stage(k, v, {layer_idx}) first)")
        _, keys, values = staged
        qs, ks, live = query.shape, keys.shape, self._live
        if query.dim() != 4 or qs[0] != ks[0] or qs[2] != ks[2] or qs[3] != ks[3] or qs[1] % ks[1]:
            raise ValueError(f"{name}: query must be (B, Hq, n, head_dim) = ({ks[0]}, a multiple of {ks[1]}, "
                             f"{ks[2]}, {ks[3]}), got {list(qs)}")
        if attn_mask is not None:
            ms = attn_mask.shape
            if attn_mask.dtype != torch.bool or attn_mask.dim() != 4 or ms[0] != ks[0] or ms[2] != ks[2] \
                    or ms[1] not in (1, qs[1]) or ms[3] != live + ks[2]:
                raise ValueError(f"{name}: attn_mask must be bool (B, 1 or Hq, n, live + n) = ({ks[0]}, 1 or {qs[1]}, "
                                 f"{ks[2]}, {live + ks[2]}), got {attn_mask.dtype} {list(ms)}")
        if layer_idx == 0:  # what every layer of this forward may read: the store before layer 0's write
            self._attend_sig = None
            self._paged_view = self._visible_before(attn_mask)
        page_table, visible = self._paged_view
        # the mask over the new keys and whether they are causal: transformers hands every layer of a forward the
        # same mask object, so the slice and the host read are made once per forward (again for another mask)
        seen = self._causal_seen
        if layer_idx == 0 or attn_mask is not seen[0]:
            new_mask = None if attn_mask is None else attn_mask[..., live:]
            seen = self._causal_seen = (attn_mask, _attn.causal_new_keys(new_mask, ks[2], query.device), new_mask)
        # the op's checks run at layer 0; the later layers of the forward, whose calls match it in every shape,
        # device, scale and in the page view, may skip them (see kv_attention._paged_call)
        sig = (seen[1], live > 0, qs, ks, values.shape, scale, query.device, keys.device, values.device)
        validated = layer_idx > 0 and sig == self._attend_sig
        out = _attn.attend_old_and_new(query, self.store, layer_idx, page_table, visible, keys, values,
                                       has_old=live > 0, scale=scale, new_mask=seen[2], new_causal=seen[1],
                                       validated=validated)
        if layer_idx == 0:
            self._attend_sig = sig
        self._staged = None
        self._write_layer(layer_idx, keys, values)
        return out

    def _visible_before(self, attn_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(page_table (B, MP), live (P, S) bool): the pages and live entries before this forward, the old keys the
        mask hides removed. Copies: layer 0's append may evict, free and reuse pages before the later layers read."""
        store, B, live = self.store, self._rows, self._live
        table = self._row_views(B)[1].clone()
        if attn_mask is None or not live:
            return table, store.live_pool.clone()
        if attn_mask.shape[1] > 1 or attn_mask.shape[2] > 1:
            part = attn_mask[..., :live]
            # the paged op masks per key: refuse a mask it would silently read from one query row only
            if not bool((part == part[:, :1, -1:]).all()):
                raise NotImplementedError(
                    f"{type(self).__name__}.attend: attn_mask differs between queries or heads over the old entries; "
                    "the paged path masks old entries per key only (key padding). Use update() (the gather path) or "
                    "another attention implementation for such masks")
        shown = attn_mask[:, 0, -1, :live]  # (B, live): the old keys the (last) query may see
        # the padding map is reused while the mask hides the same ranks: one host read per forward (CPU, and CUDA
        # outside a graph capture: ~20 launches saved per decode step for one read at the step's first sync)
        reads = _attn.host_reads_allowed(store.device)
        cached = self._hidden_pins
        if reads and cached is not None and cached[0].shape == shown.shape and torch.equal(cached[0], shown):
            # every decode step of a left-padded batch: the same ranks hidden, the same (pinned) slots
            return table, torch.bitwise_and(store.live_pool, cached[1])
        hidden = ~shown
        if reads and not bool(hidden.any()):  # nothing hidden (no padding): no mapping
            return table, store.live_pool.clone()
        old = store.live_entries(B, live)[0]  # (B, live) physical slots in the mask's key order
        flat = torch.ones(store.live_pool.numel() + 1, dtype=torch.bool, device=store.device)  # [0]: spare, no-ops
        flat[torch.where(hidden & (old >= 0), old + 1, 0)] = False
        keep = flat[1:].view_as(store.live_pool)
        if reads:  # reusable while the mask hides the same ranks, if those are pinned (see _pinned_prefix)
            self._hidden_pins = (shown.clone(), keep) if self._pinned_prefix(hidden, old) else None
        return table, torch.bitwise_and(store.live_pool, keep)

    def _pinned_prefix(self, hidden: Tensor, old: Tensor) -> bool:
        """Whether every hidden rank of each row lies in the row's leading run of pinned entries (old: the live
        slots in position order). Pinned entries (the prefill's padding and sinks) have the row's smallest
        positions and are never evicted, so those ranks keep their slots in later forwards: the slots the mask
        hides can be reused while the mask hides the same ranks (left padding, every decode step)."""
        pinned = (old >= 0) & self.store.pinned_pool.view(-1)[old.clamp_min(0)]
        prefix = torch.cumprod(pinned.to(torch.uint8), dim=1).bool()
        return not bool((hidden & ~prefix).any())

    def _begin_layer(self, key_states: Tensor, value_states: Tensor, layer_idx: int, paged: bool) -> None:
        name = f"{type(self).__name__}.{'stage' if paged else 'update'}"
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"{name}: layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
        if key_states.dim() != 4 or value_states.shape != key_states.shape:
            raise ValueError(f"{name}: key_states and value_states must both be (B, num_kv_heads, n, head_dim), got "
                             f"{list(key_states.shape)} and {list(value_states.shape)}")
        if paged and torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            raise RuntimeError(f"{name}: the paged path is inference only (no backward): run under torch.no_grad() "
                               "(or use update() / another attention implementation to train)")
        if self._staged is not None:
            raise RuntimeError(f"{name}: layer {self._staged[0]} was staged but never attended: with stage(), the "
                               "attention must call attend() (for transformers: attn_implementation='trajops_paged')")
        if layer_idx != self._next_layer:
            raise RuntimeError(f"{name}: expected layer {self._next_layer} next (layers are updated in order within a "
                               f"forward), got {layer_idx}")
        if layer_idx == 0:
            self._begin_forward(key_states, value_states, paged)
        elif paged != self._paged:
            raise RuntimeError(f"{name}: one forward uses update() or stage() + attend() for all its layers")
        elif tuple(key_states.shape[::2]) != (self._rows, self._n):
            raise ValueError(f"{name}: layer {layer_idx} got (B, n) = {tuple(key_states.shape[::2])}, layer 0 had "
                             f"{(self._rows, self._n)}")

    def _write_layer(self, layer_idx: int, key_states: Tensor, value_states: Tensor) -> None:
        self.store.append(layer_idx, key_states, value_states, self._traj, pin=self._pin if layer_idx == 0 else None)
        self._next_layer = layer_idx + 1
        if self._next_layer == self.num_layers:
            self._seen += self._n
            self._live = min(self._live + self._n, self.capacity)
            self.store.step()
            self._next_layer = 0
            self._paged_view, self._causal_seen, self._attend_sig = None, (None, True, None), None

    def _begin_forward(self, keys: Tensor, values: Tensor, paged: bool) -> None:
        self._lazy_init(keys)
        store, (B, H, n, D) = self.store, keys.shape
        if (H, D) != (store.num_kv_heads, store.head_dim):
            raise ValueError(f"{type(self).__name__}.update: key_states must have {store.num_kv_heads} heads of dim "
                             f"{store.head_dim}, got {H} x {D}")
        if not 1 <= B <= self.max_batch_size:
            raise ValueError(f"{type(self).__name__}.update: batch size {B} must be in 1..max_batch_size="
                             f"{self.max_batch_size}")
        if self._seen and B != self._rows:
            raise ValueError(f"{type(self).__name__}.update: batch size changed from {self._rows} to {B} without "
                             "reorder_cache / batch_select_indices")
        if n < 1:
            raise ValueError(f"{type(self).__name__}.update: a forward needs at least one new token")
        # trajectories of the new tokens: steps of the feature (or the caller's, for this forward only)
        feat = self.trajectory_fn(keys, values) if self.trajectory_fn is not None else values.float().mean(dim=1)
        if not isinstance(feat, Tensor) or tuple(feat.shape) != (B, n, self.traj_dim):
            raise ValueError(f"{type(self).__name__}: trajectory_fn must return (B, n, traj_dim) = ({B}, {n}, "
                             f"{self.traj_dim}), got {getattr(feat, 'shape', type(feat))}")
        if feat.dtype != torch.float32 or feat.device != store.device:
            feat = feat.to(device=store.device, dtype=torch.float32)
        last = self._row_views(B)[0]  # (B, 1, traj_dim)
        if n == 1:  # a decode step: one step per row, from the row's last feature (no cat, no slicing)
            traj = feat - last
            last.copy_(feat)
        else:
            traj = feat - torch.cat([last, feat[:, :-1]], dim=1)
            last.copy_(feat[:, -1:])
        if self._pending_traj is not None:
            given, self._pending_traj = self._pending_traj, None
            if tuple(given.shape) != (B, n, self.traj_dim):
                raise ValueError(f"{type(self).__name__}: set_trajectory gave {list(given.shape)}, this forward needs "
                                 f"(B, n, traj_dim) = ({B}, {n}, {self.traj_dim})")
            traj = given.to(device=store.device, dtype=torch.float32)
        self._pin = self._prefill_pin(B, n) if self._seen == 0 else None
        # every row has exactly `live` entries: no sync; the paged path reads the pools instead
        self._old = None if paged else store.live_entries(B, self._live)[0]
        self._traj, self._n, self._rows, self._paged = traj, n, B, paged

    def _row_views(self, B: int) -> Tuple[Tensor, Tensor]:
        """(last features (B, 1, traj_dim), page_table[:B]): views of the first B rows, made once per (B, tensors).

        A decode step reads both every token; slicing them anew costs a dispatch each. Rebuilt when B changes or
        the tensors were replaced (select_rows replaces the features; the store modifies its table in place)."""
        v, last, table = self._views, self._last_feat, self.store.page_table
        if v is None or v[0] != B or v[1] is not last or v[2] is not table:
            v = self._views = (B, last, table, last[:B].unsqueeze(1), table[:B])
        return v[3], v[4]

    def _prefill_pin(self, B: int, n: int) -> Optional[Tensor]:
        """(B, n) bool: the prefill's padding and its first ``sinks`` real tokens per row (None if nothing to pin)."""
        first_real = torch.zeros(B, dtype=torch.long)
        if self._pad_mask is not None:
            m = self._pad_mask
            if m.shape[0] != B and B % m.shape[0]:
                raise ValueError(f"{type(self).__name__}: mark_padding got {m.shape[0]} rows, the prefill has {B}")
            if m.shape[1] != n:
                raise ValueError(f"{type(self).__name__}: mark_padding got a mask of length {m.shape[1]}, the prefill "
                                 f"has {n} tokens")
            first_real = (~m).sum(1).repeat_interleave(B // m.shape[0])
            if bool((first_real > 0).any()) and n > self.capacity:
                raise ValueError(f"{type(self).__name__}: a padded prompt of {n} tokens is longer than capacity="
                                 f"{self.capacity}: the cache would keep only its last tokens and lose the padding the "
                                 "mask refers to; raise capacity or prefill without padding")
        elif self.sinks == 0:
            return None
        return (torch.arange(n)[None, :] < (first_real[:, None] + self.sinks)).to(self.store.device)

    # ------------------------------------------------------------------ rows (beam search, batch surgery)
    def select_rows(self, indices: Tensor) -> None:
        """Row b becomes a copy of row indices[b] (rows may repeat or be dropped): ``store.select_rows``.

        indices: (B',) integer row ids, or a (B,) bool mask over the current rows.
        """
        if self._next_layer or self._staged is not None:
            raise RuntimeError(f"{type(self).__name__}: cannot select rows in the middle of a forward")
        indices = indices if isinstance(indices, Tensor) else torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            if indices.dim() != 1 or (self._rows and indices.shape[0] != self._rows):
                raise ValueError(f"{type(self).__name__}: a bool row mask must have shape ({self._rows},), got "
                                 f"{list(indices.shape)}")
            indices = indices.nonzero().flatten()
        if indices.dim() != 1 or indices.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise ValueError(f"{type(self).__name__}: indices must be a 1-D integer tensor, got {indices.dtype} "
                             f"{list(indices.shape)}")
        nb = indices.shape[0]
        if not 1 <= nb <= self.max_batch_size:
            raise ValueError(f"{type(self).__name__}: selecting {nb} rows, expected 1..max_batch_size="
                             f"{self.max_batch_size}")
        if self.store is None or self._seen == 0:
            self._rows = nb if self._seen else self._rows
            return
        self.store.select_rows(indices)
        self._hidden_pins = None  # rows moved: the cached slots are stale
        idx = indices.to(device=self.store.device, dtype=torch.long)
        fresh = torch.zeros_like(self._last_feat)
        fresh[:nb] = self._last_feat[idx]
        self._last_feat, self._rows = fresh, nb

    def repeat_rows(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times in place (row order as ``Tensor.repeat_interleave``)."""
        self._positive_int("repeats", repeats)
        if self._rows:
            self.select_rows(torch.arange(self._rows).repeat_interleave(repeats))

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
                "pages_in_use": s["pages_in_use"] if s else torch.zeros((), dtype=torch.long),
                "kv_bytes": self.kv_bytes()}

    def kv_bytes(self) -> int:
        """Bytes of the K and V page pools (0 before the first update); constant once allocated."""
        st = self.store
        return 0 if st is None else sum(t.numel() * t.element_size() for t in (st.k_pool, st.v_pool))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(capacity={self.capacity}, layers={self.num_layers}, rows={self._rows}, "
                f"seen={self._seen}, live={self._live})")
