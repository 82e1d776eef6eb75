"""The paged store: PagedTrajectoryKVCache, a paged, batched, device-resident KV cache with trajectory-guided eviction.

The KV-cache pieces and their roles:

* ``trajops.ops.kv_cache`` -- the op group (``trajops::kv_relevance``, ``kv_topk``, ``kv_evict_append_``,
  ``kv_write_``): stateless kernels over the store's tensors; semantics in trajops/reference/kv_cache.py.
* ``trajops.kv_cache`` (this module) -- the paged store: owns every tensor of the cache and its invariants
  (pages, live/pinned flags, timestamps, positions, per-row counters); integrations call its public methods
  and never write its tensors.
* ``trajops.kv_forward`` -- the forward-level cache ``ForwardKVCache``: what one model forward sees (per layer,
  the entries live before it in position order ++ its own tokens), trajectories, padding pins; framework-free.
* ``trajops.nn.kv_cache`` -- the seed's drop-in class ``TrajectoryAwareKVCache`` (one global sequence).
* ``trajops.hf`` -- the transformers cache ``TrajectoryEvictionCache``: a thin adapter of the Cache API onto
  ``ForwardKVCache``.

All state lives in preallocated tensors on one device; no method syncs with the host, except ``append``
and ``select_rows`` on an overcommitted pool (fewer pages than max_batch full sequences need), which read
one value to raise cleanly when the pool runs out, ``live_entries`` without ``count``, and the checks of
index values given as CPU tensors.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import _library
from . import reference as _ref
from .ops import kv_cache as _ops  # noqa: F401  (registers the trajops::kv_* ops)

__all__ = ["PagedTrajectoryKVCache"]

_NO_POSITION = torch.iinfo(torch.long).max  # sorts after every real position


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"PagedTrajectoryKVCache: {name} must be an int >= 1, got {value!r}")
    return value


class PagedTrajectoryKVCache:
    """Paged KV cache whose entries carry the trajectory they were written under and a timestamp.

    Args:
        num_layers, num_kv_heads, head_dim: shape of the K/V pools, one pair per layer:
            (num_pages, page_size, num_kv_heads, head_dim) in ``dtype``.
        num_pages, page_size: the page pool shared by all sequences.
        traj_dim: size of the trajectory vectors (stored as fp32 unit vectors, shared by all layers:
            one eviction decision per token).
        max_batch: number of sequences (rows) the cache holds.
        capacity: live tokens per sequence; beyond it the least relevant entries are evicted.
        alpha, decay: relevance = alpha * cos(query, entry) + (1 - alpha) * exp(-decay * age).

    Per step: ``append(0, ...)`` decides evictions and slots for the new tokens, ``append(l, ...)``
    for the other layers writes their K/V into the same slots, ``step()`` advances the clock.

    Positions: every row counts the valid tokens appended to it (``next_position``, (max_batch,) int64);
    a token is stored with its position in that stream (``pos_pool``, (num_pages, page_size) int64), so
    :meth:`live_entries` lists a row's live entries in sequence order whatever slots they occupy.
    Slots: a logical slot j of row b is offset j % page_size of page page_table[b, j // page_size];
    a physical slot is page * page_size + offset, an index into ``k_pool[layer].view(-1, H, D)``.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        traj_dim: int,
        max_batch: int,
        capacity: int,
        alpha: float = 0.7,
        decay: float = 0.1,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> None:
        for name, value in (("num_layers", num_layers), ("num_pages", num_pages), ("page_size", page_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("traj_dim", traj_dim),
                            ("max_batch", max_batch), ("capacity", capacity)):
            _positive(name, value)
        if not (0.0 <= alpha <= 1.0):
            raise ValueError(f"PagedTrajectoryKVCache: alpha must be in [0, 1], got {alpha}")
        if not (math.isfinite(decay) and decay >= 0.0):
            raise ValueError(f"PagedTrajectoryKVCache: decay must be a finite number >= 0, got {decay}")
        if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            # an integer pool would silently truncate K/V
            raise TypeError(f"PagedTrajectoryKVCache: dtype must be float32, float64, float16 or bfloat16, got {dtype}")
        self.max_pages_per_seq = -(-capacity // page_size)
        if self.max_pages_per_seq > num_pages:
            raise ValueError(
                f"PagedTrajectoryKVCache: capacity {capacity} needs {self.max_pages_per_seq} pages of "
                f"{page_size} slots, more than the pool's num_pages={num_pages}"
            )
        self.num_layers, self.num_pages, self.page_size = num_layers, num_pages, page_size
        self.num_kv_heads, self.head_dim, self.traj_dim = num_kv_heads, head_dim, traj_dim
        self.max_batch, self.alpha, self.decay, self.dtype = max_batch, float(alpha), float(decay), dtype
        self.max_slots = self.max_pages_per_seq * page_size
        self.overcommitted = num_pages < max_batch * self.max_pages_per_seq
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type != "cpu" and dev.index is None:  # "cuda" -> "cuda:0": tensors report an index
            dev = torch.empty(0, device=dev).device
        self.device = dev
        P, S = num_pages, page_size
        self.k_pool = torch.zeros((num_layers, P, S, num_kv_heads, head_dim), dtype=dtype, device=dev)
        self.v_pool = torch.zeros_like(self.k_pool)
        self._layer_views: Optional[tuple] = None  # see layer_pools
        self.traj_pool = torch.zeros((P, S, traj_dim), dtype=torch.float32, device=dev)
        self.ts_pool = torch.zeros((P, S), dtype=torch.long, device=dev)
        self.live_pool = torch.zeros((P, S), dtype=torch.bool, device=dev)
        self.pinned_pool = torch.zeros((P, S), dtype=torch.bool, device=dev)
        self.page_table = torch.full((max_batch, self.max_pages_per_seq), -1, dtype=torch.long, device=dev)
        self.live_count = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.capacity = torch.full((max_batch,), capacity, dtype=torch.long, device=dev)
        self.free_pages = torch.arange(P - 1, -1, -1, dtype=torch.long, device=dev)  # page 0 on top
        self.free_top = torch.tensor(P, dtype=torch.long, device=dev)
        self.evicted_total = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.now = torch.zeros((), dtype=torch.long, device=dev)
        # positions: kv_evict_append_ records them with the slots (no extra ops per step)
        self.pos_pool = torch.full((P, S), -1, dtype=torch.long, device=dev)
        self.next_position = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self._written: Optional[Tensor] = None  # physical slots of the current step's tokens
        self._full_lengths: Dict[Tuple[int, int], Tensor] = {}  # reused default `lengths` per (B, n)
        self._next_layer = 0
        self._direct_write = None  # the Triton write launcher where kv_write_ dispatches to Triton (see _write_kv)
        if _library.triton_runs_on(dev):
            from .triton_kernels import kv_cache as _write_kernels

            self._direct_write = _write_kernels

    # ------------------------------------------------------------------ writing
    def _check_rows(self, name: str, B: int) -> None:
        if not 1 <= B <= self.max_batch:
            raise ValueError(f"PagedTrajectoryKVCache: {name} has {B} rows, expected 1..max_batch={self.max_batch}")

    def append(
        self,
        layer: int,
        k: Tensor,
        v: Tensor,
        trajectory: Tensor,
        *,
        lengths: Optional[Tensor] = None,
        pin: Optional[Tensor] = None,
    ) -> Tensor:
        """Write n new tokens of the first B sequences for one layer; returns evicted slots (B, n).

        k, v: (B, num_kv_heads, n, head_dim). trajectory: (B, traj_dim) for all new tokens of a
        row, or (B, n, traj_dim) per token. lengths: (B,) int64, valid new tokens per row (default
        n). pin: (B, n) bool, tokens that are never evicted (e.g. attention sinks; when n exceeds
        the capacity only the last capacity tokens are written, pinned or not). Layer 0 evicts and
        picks slots (scored with the trajectory of each row's newest valid token); layers 1.. then
        write into the same slots, in order, and ignore trajectory, lengths and pin. The returned tensor lists the evicted logical slots (-1
        padded); for layers other than 0 it is the one layer 0 returned.
        """
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise IndexError(f"PagedTrajectoryKVCache.append: layer must be in [0, {self.num_layers}), got {layer}")
        if k.dim() != 4 or tuple(k.shape[1::2]) != (self.num_kv_heads, self.head_dim) or v.shape != k.shape:
            raise ValueError(
                f"PagedTrajectoryKVCache.append: k and v must both have shape (B, {self.num_kv_heads}, n, "
                f"{self.head_dim}), got {list(k.shape)} and {list(v.shape)}"
            )
        B, n = k.shape[0], k.shape[2]
        self._check_rows("k", B)
        for name, t in (("k", k), ("v", v), ("trajectory", trajectory)):
            if t.device != self.device:
                raise ValueError(f"PagedTrajectoryKVCache.append: {name} must be on {self.device}, got {t.device}")
        if layer == 0:
            evicted = self._evict_append(B, n, trajectory, lengths, pin)
        else:
            if self._written is None or layer != self._next_layer or self._written.shape != (B, n):
                raise RuntimeError(
                    f"PagedTrajectoryKVCache.append: layer {layer} must follow layer {layer - 1} of the same step "
                    f"with the same (B, n); expected layer {self._next_layer}"
                    + ("" if self._written is None else f" and (B, n) = {tuple(self._written.shape)}")
                )
            evicted = self._evicted
        self._write_kv(layer, k, v)
        self._next_layer = layer + 1
        return evicted

    def _evict_append(self, B, n, trajectory, lengths, pin) -> Tensor:
        if trajectory.dim() == 2:
            if tuple(trajectory.shape) != (B, self.traj_dim):
                raise ValueError(
                    f"PagedTrajectoryKVCache.append: trajectory must have shape (B, traj_dim) = ({B}, "
                    f"{self.traj_dim}) or (B, n, traj_dim), got {list(trajectory.shape)}"
                )
            trajectory = trajectory.unsqueeze(1).expand(B, n, self.traj_dim)
        elif tuple(trajectory.shape) != (B, n, self.traj_dim):
            raise ValueError(
                f"PagedTrajectoryKVCache.append: trajectory must have shape (B, traj_dim) or (B, n, traj_dim) = "
                f"({B}, {n}, {self.traj_dim}), got {list(trajectory.shape)}"
            )
        given_lengths = lengths is not None
        if lengths is None:
            lengths = self._full_lengths.get((B, n))
            if lengths is None:
                lengths = self._full_lengths[(B, n)] = torch.full((B,), n, dtype=torch.long, device=self.device)
        elif lengths.dtype != torch.long or tuple(lengths.shape) != (B,) or lengths.device != self.device:
            raise ValueError(
                f"PagedTrajectoryKVCache.append: lengths must be int64 of shape ({B},) on {self.device}, got "
                f"{lengths.dtype} {list(lengths.shape)} on {lengths.device}"
            )
        if pin is not None and (pin.dtype != torch.bool or tuple(pin.shape) != (B, n) or pin.device != self.device):
            raise ValueError(
                f"PagedTrajectoryKVCache.append: pin must be bool of shape ({B}, {n}) on {self.device}, got "
                f"{pin.dtype} {list(pin.shape)}"
            )
        if given_lengths and lengths.device.type == "cpu" and bool(((lengths < 0) | (lengths > n)).any()):
            raise ValueError(f"PagedTrajectoryKVCache.append: lengths must be in [0, {n}], got {lengths.tolist()}")
        # the op records each written token's position (its index in the row's stream of valid tokens) too
        evicted, written, ok = torch.ops.trajops.kv_evict_append_(
            self.traj_pool, self.ts_pool, self.live_pool, self.pinned_pool, self.page_table, self.live_count,
            self.capacity, self.free_pages, self.free_top, self.evicted_total, self.now, trajectory, lengths,
            pin, self.alpha, self.decay, self.pos_pool, self.next_position,
        )
        if self.overcommitted and not bool(ok):
            raise RuntimeError(
                "PagedTrajectoryKVCache.append: the page pool is exhausted (num_pages="
                f"{self.num_pages}); the cache was left unchanged"
            )
        self._written, self._evicted = written, evicted
        return evicted

    def _write_kv(self, layer: int, k: Tensor, v: Tensor) -> None:
        # detached: the cache stores values, it must not keep the caller's autograd graph alive (under no_grad
        # there is nothing to detach: two ops per layer saved on the launch-bound decode path)
        k_pool, v_pool = self.layer_pools(layer)
        if k.requires_grad or v.requires_grad:
            k, v = k.detach(), v.detach()
        if self._direct_write is not None:
            # append checked what kv_write_'s checks would (shapes against the pools, devices, written from the
            # eviction op); where the op runs Triton, its launcher directly: no dispatch and no re-check per layer
            self._direct_write.kv_write(k_pool, v_pool, self._written, k, v)
        else:
            torch.ops.trajops.kv_write_(k_pool, v_pool, self._written, k, v)

    def layer_pools(self, layer: int) -> Tuple[Tensor, Tensor]:
        """(k_pool[layer], v_pool[layer]): views (P, S, num_kv_heads, head_dim) of one layer's pools, made once.

        A decode step reads and writes every layer's pools: indexing ``k_pool[layer]`` each time is an op per
        access (on a GPU a host-side dispatch each). The views stay valid because the pools are only ever
        modified in place; they are rebuilt if ``k_pool``/``v_pool`` were replaced."""
        views = self._layer_views
        if views is None or views[0] is not self.k_pool or views[1] is not self.v_pool:
            views = self._layer_views = (self.k_pool, self.v_pool, self.k_pool.unbind(0), self.v_pool.unbind(0))
        return views[2][layer], views[3][layer]

    def step(self) -> None:
        """Advance the clock by one (timestamps of later appends are one larger)."""
        self.now += 1
        self._next_layer = 0

    def last_append_slots(self) -> Tensor:
        """(B, n) int64 physical slots the tokens of the last ``append(0, ...)`` were written to; -1 for a token
        that got no slot (beyond ``lengths``, beyond the capacity, or all slots pinned). The other layers of the
        step write into the same slots. Cleared by :meth:`select_rows` (the slots move)."""
        if self._written is None:
            raise RuntimeError("PagedTrajectoryKVCache.last_append_slots: no append(0, ...) since the cache was "
                               "created or its rows were selected")
        return self._written

    # ------------------------------------------------------------------ rows (beam search, batch surgery)
    def select_rows(self, indices: Tensor) -> None:
        """Rebuild the rows so that row b holds a copy of what row ``indices[b]`` held; rows >= len(indices) end empty.

        indices: (B',) integer row ids in [0, max_batch), 1 <= B' <= max_batch; repeats and omissions are allowed,
        so this is beam search's reorder (B' = B), a batch selection (a subset) and repeat_interleave alike.
        Every per-slot tensor (K/V of all layers, trajectories, timestamps, live and pinned flags, positions) is
        copied page by page into a compact layout (the selected rows' pages first, in row order) with one
        indexed copy per tensor; per-row state (live_count, capacity, evicted_total, next_position) follows its
        row; the clock does not move. Afterwards the cache behaves exactly as one that had been fed the selected
        rows from the start (same logical slots, scores, positions and counters). Not allowed between layers of
        one step. Index values are checked when ``indices`` is a CPU tensor (on CUDA that would sync; there
        out-of-range ids are the caller's bug).
        """
        if 0 < self._next_layer < self.num_layers:
            raise RuntimeError("PagedTrajectoryKVCache.select_rows: called in the middle of a step (after layer "
                               f"{self._next_layer - 1} of {self.num_layers}); finish the step first")
        if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.dtype.is_floating_point \
                or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError("PagedTrajectoryKVCache.select_rows: indices must be a 1-D integer tensor, got "
                             f"{getattr(indices, 'dtype', type(indices))} {list(getattr(indices, 'shape', []))}")
        nb = indices.shape[0]
        self._check_rows("indices", nb)
        if indices.device.type == "cpu" and bool(((indices < 0) | (indices >= self.max_batch)).any()):
            raise ValueError(f"PagedTrajectoryKVCache.select_rows: indices must be in [0, {self.max_batch}), got "
                             f"{indices.tolist()}")
        idx = indices.to(device=self.device, dtype=torch.long)
        P, MP = self.num_pages, self.max_pages_per_seq
        src_pt = self.page_table[idx]  # (nb, MP): the pages each new row copies
        valid = (src_pt >= 0).reshape(-1)
        dst = torch.cumsum(valid, 0) - 1  # compact numbering of the pages in use
        used = valid.sum()
        if self.overcommitted and int(used) > P:
            raise RuntimeError(f"PagedTrajectoryKVCache.select_rows: the selected rows hold {int(used)} pages, more "
                               f"than the pool's num_pages={P}; the cache was left unchanged")
        src_page = torch.zeros(P + 1, dtype=torch.long, device=self.device)  # new page -> old page; [P]: spare
        src_page[torch.where(valid, dst, P)] = src_pt.reshape(-1).clamp_min(0)
        src_page = src_page[:P]
        in_use = torch.arange(P, device=self.device) < used
        for pool in (self.k_pool, self.v_pool):
            pool.copy_(pool[:, src_page])
        for pool in (self.traj_pool, self.ts_pool, self.pos_pool):
            pool.copy_(pool[src_page])
        for pool in (self.live_pool, self.pinned_pool):
            pool.copy_(pool[src_page] & in_use[:, None])  # pages not in use hold no entry
        self.page_table.fill_(-1)
        self.page_table[:nb] = torch.where(valid, dst, -1).view(nb, MP)
        # free stack: the pages not in use, the lowest on top (as the constructor stacks them)
        self.free_pages.copy_(torch.arange(P - 1, -1, -1, dtype=torch.long, device=self.device))
        self.free_top.copy_(P - used)
        for row_state in (self.live_count, self.evicted_total, self.next_position):
            fresh = torch.zeros_like(row_state)
            fresh[:nb] = row_state[idx]
            row_state.copy_(fresh)
        self.capacity[:nb] = self.capacity[idx].clone()  # rows beyond B' keep theirs (they stay usable)
        self._written = self._evicted = None
        self._next_layer = 0

    # ------------------------------------------------------------------ reading
    def _query(self, trajectory: Tensor) -> Tensor:
        if trajectory.dim() != 2 or trajectory.shape[1] != self.traj_dim:
            raise ValueError(
                f"PagedTrajectoryKVCache: trajectory must have shape (B, {self.traj_dim}), got {list(trajectory.shape)}"
            )
        self._check_rows("trajectory", trajectory.shape[0])
        return trajectory

    def relevance(self, trajectory: Tensor) -> Tensor:
        """(B, max_slots) fp32 relevance of every logical slot for each row's query trajectory; -inf on dead slots."""
        return torch.ops.trajops.kv_relevance(self.traj_pool, self.ts_pool, self.live_pool, self.page_table,
                                 self._query(trajectory), self.now, self.alpha, self.decay)

    def topk(self, trajectory: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """The k most relevant live slots per row: (slots (B, k) int64, scores (B, k)); -1 / -inf padded."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"PagedTrajectoryKVCache.topk: k must be an int >= 0, got {k!r}")
        return torch.ops.trajops.kv_topk(self.traj_pool, self.ts_pool, self.live_pool, self.page_table,
                            self._query(trajectory), self.now, self.alpha, self.decay, k)

    def gather(self, layer: int, slots: Tensor) -> Tuple[Tensor, Tensor]:
        """Dense K and V (B, num_kv_heads, k, head_dim) of logical slots (B, k) of one layer; zeros for -1."""
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise IndexError(f"PagedTrajectoryKVCache.gather: layer must be in [0, {self.num_layers}), got {layer}")
        if slots.dim() != 2 or slots.dtype != torch.long:
            raise ValueError(f"PagedTrajectoryKVCache.gather: slots must be int64 (B, k), got {slots.dtype} "
                             f"{list(slots.shape)}")
        B = slots.shape[0]
        self._check_rows("slots", B)
        phys_all = _ref.kv_logical_to_physical(self.page_table[:B], self.page_size)
        inside = (slots >= 0) & (slots < self.max_slots)  # out-of-range slots read as 0, like -1
        phys = torch.where(inside, phys_all.gather(1, slots.clamp(0, self.max_slots - 1)), -1)
        H, D = self.num_kv_heads, self.head_dim
        keep = (phys >= 0)[..., None, None]
        keep = keep & self.live_pool.view(-1)[phys.clamp_min(0)][..., None, None]  # dead slots read as 0
        k = torch.where(keep, self.k_pool[layer].view(-1, H, D)[phys.clamp_min(0)], 0).transpose(1, 2)
        v = torch.where(keep, self.v_pool[layer].view(-1, H, D)[phys.clamp_min(0)], 0).transpose(1, 2)
        return k, v

    def live_entries(self, rows: int, count: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """The live entries of rows 0..rows-1 in position order: (slots, positions), both (rows, count) int64.

        slots are physical (see the class docstring; :meth:`read_slots` reads them), positions the tokens'
        positions (see ``next_position``); both -1 past a row's live entries. count: entries per row to list;
        default: the most live entries of any of the rows, read from the device (one host sync) -- pass it when
        the caller knows it. Ties cannot occur (a row's positions are distinct).
        """
        if not isinstance(rows, int) or isinstance(rows, bool):
            raise ValueError(f"PagedTrajectoryKVCache.live_entries: rows must be an int, got {rows!r}")
        self._check_rows("rows", rows)
        if count is None:
            count = int(self.live_count[:rows].max())
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= self.max_slots:
            raise ValueError(f"PagedTrajectoryKVCache.live_entries: count must be an int in [0, max_slots="
                             f"{self.max_slots}], got {count!r}")
        phys = _ref.kv_logical_to_physical(self.page_table[:rows], self.page_size)
        idx = phys.clamp_min(0)
        alive = (phys >= 0) & self.live_pool.view(-1)[idx]
        pos = torch.where(alive, self.pos_pool.view(-1)[idx], _NO_POSITION)
        pos, order = torch.sort(pos, dim=1, stable=True)
        pos, slots = pos[:, :count], phys.gather(1, order[:, :count])
        found = pos != _NO_POSITION
        return torch.where(found, slots, -1), torch.where(found, pos, -1)

    def read_slots(self, layer: int, slots: Tensor) -> Tuple[Tensor, Tensor]:
        """K and V (B, num_kv_heads, k, head_dim) in the pool dtype at physical slots (B, k) of one layer; 0 for -1.

        Reads the pools as they are, live or not: within a step, the slots :meth:`live_entries` listed before
        ``append(0, ...)`` still hold layer l's old entries until ``append(l, ...)`` overwrites the evicted ones,
        so an attention over "the entries live before this step" reads layer l before appending layer l.
        Slot values are checked when ``slots`` is a CPU tensor; on other devices out-of-range slots read as 0.
        """
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise IndexError(f"PagedTrajectoryKVCache.read_slots: layer must be in [0, {self.num_layers}), got {layer}")
        if not isinstance(slots, Tensor) or slots.dim() != 2 or slots.dtype != torch.long \
                or slots.device != self.device:
            raise ValueError(f"PagedTrajectoryKVCache.read_slots: slots must be int64 (B, k) on {self.device}, got "
                             f"{getattr(slots, 'dtype', type(slots))} {list(getattr(slots, 'shape', []))}")
        n_phys = self.num_pages * self.page_size
        H, D = self.num_kv_heads, self.head_dim
        k, v = self.k_pool[layer].view(-1, H, D), self.v_pool[layer].view(-1, H, D)
        if slots.device.type == "cpu":  # values checked; masking only when a -1 is there (the decode path has none)
            lo, hi = torch.aminmax(slots) if slots.numel() else (torch.tensor(0), torch.tensor(0))
            if int(lo) < -1 or int(hi) >= n_phys:
                raise ValueError(f"PagedTrajectoryKVCache.read_slots: slots must be -1 or in [0, {n_phys})")
            if int(lo) >= 0:
                return k[slots].transpose(1, 2), v[slots].transpose(1, 2)
        ok = ((slots >= 0) & (slots < n_phys))[..., None, None]
        idx = slots.clamp(0, n_phys - 1)
        return torch.where(ok, k[idx], 0).transpose(1, 2), torch.where(ok, v[idx], 0).transpose(1, 2)

    def live_slots(self) -> Tensor:
        """(max_batch, max_slots) bool: logical slots that hold a live entry."""
        phys = _ref.kv_logical_to_physical(self.page_table, self.page_size)
        return (phys >= 0) & self.live_pool.reshape(-1)[phys.clamp_min(0)]

    def stats(self) -> Dict[str, Tensor]:
        """live (max_batch,), capacity (max_batch,), pages_in_use, pages_free (0-d), evicted_total (max_batch,)."""
        return {
            "live": self.live_count.clone(),
            "capacity": self.capacity.clone(),
            "pages_in_use": self.num_pages - self.free_top,
            "pages_free": self.free_top.clone(),
            "evicted_total": self.evicted_total.clone(),
        }
