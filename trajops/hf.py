"""The transformers cache: ``TrajectoryEvictionCache``, a thin adapter of the transformers ``Cache`` API.

Pass it as ``past_key_values=`` to ``model.generate()`` or a forward: it keeps at most ``capacity`` tokens per row,
evicting the entries least relevant to the row's newest trajectory; no attention weights needed (SDPA, eager, any
batch size, greedy / sampling / beam search). Left-padded batches: call ``mark_padding(attention_mask)`` first.

The pieces (roles in trajops/kv_cache.py): the engine is :class:`trajops.kv_forward.ForwardKVCache` (per forward,
each layer gets the entries live before the forward in position order ++ its own tokens; trajectories, padding
pins, row selection), on the paged store :class:`trajops.PagedTrajectoryKVCache` (which owns every tensor and
invariant). This module only maps the Cache API onto the engine: ``get_seq_length`` = tokens seen (positions keep
counting past the capacity), ``get_mask_sizes(q) = (live + q, 0)``, ``get_query_offset() = live``, beam search's
``reorder_cache`` / ``batch_select_indices`` / ``batch_repeat_interleave`` = row selection (copies the pools).

Attention on the pages: with ``attn_implementation="trajops_paged"`` (registered here, see trajops/hf_attention.py)
the attention reads the pools directly and ``update`` returns only the new tokens: no per-layer gather + cat.

Limits: full-attention decoder models only (no sliding-window / hybrid layer types); no ``crop`` (assisted
decoding, DoLa-style rollbacks); not ``torch.compile``-able (the per-forward bookkeeping is Python).
Supported transformers: ``SUPPORTED_TRANSFORMERS``, checked at import (ImportError naming the range otherwise).
"""
from __future__ import annotations

from importlib import metadata as _metadata
from typing import Optional, Tuple, Union

import torch
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
    try:  # packaging comes with transformers; without it, transformers is not installed properly either
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
        ok = found is not None and SpecifierSet(SUPPORTED_TRANSFORMERS).contains(Version(found), prereleases=True)
    except Exception:  # packaging missing (ImportError) or an unparsable version (InvalidVersion)
        ok = False
    if not ok:
        raise ImportError(f"trajops.hf needs transformers {SUPPORTED_TRANSFORMERS} (found: {found or 'none'}): "
                          "pip install trajops[hf]")


_check_transformers()
try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as exc:
    raise ImportError(f"trajops.hf needs the `transformers` package ({SUPPORTED_TRANSFORMERS}): pip install trajops[hf]"
                      ) from exc

from .hf_attention import PAGED_ATTENTION, register_paged_attention, tag_keys  # noqa: E402
from .kv_forward import ForwardKVCache, TrajectoryFn  # noqa: E402

register_paged_attention()  # attn_implementation="trajops_paged" works once trajops.hf is imported

__all__ = ["TrajectoryEvictionCache", "SUPPORTED_TRANSFORMERS", "PAGED_ATTENTION", "register_paged_attention"]


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

class TrajectoryEvictionCache(ForwardKVCache, Cache):
    """A transformers ``Cache`` holding at most ``capacity`` tokens per row, evicted by trajectory relevance.

    The engine is :class:`trajops.kv_forward.ForwardKVCache` (``mark_padding``, ``set_trajectory``, ``update``,
    ``kept_positions``, ``stats``, ``kv_bytes``, ``reset``); this class maps the Cache API onto it.

    Args:
        config: the model's config (decoder text config used): layer count and default ``traj_dim`` (the head dim).
            Full-attention models only.
        capacity, max_batch_size, page_size, alpha, decay, device, dtype, trajectory_fn, sinks: as
            :class:`~trajops.kv_forward.ForwardKVCache` (max_batch_size: generate's batch * num_beams must fit).
        traj_dim: size of the trajectory (default: the head dim).
        paged_attention: read the pools in the attention instead of returning the gathered old entries (see
            trajops/hf_attention.py). None (default): when ``config._attn_implementation == "trajops_paged"``,
            read at every forward (so ``model.set_attn_implementation`` is followed if ``config`` is the model's).
    """

    is_compileable = is_croppable = False

    def __init__(self, config, capacity: int, *, max_batch_size: int = 8, page_size: int = 16, alpha: float = 0.7,
                 decay: float = 0.1, device: Optional[Union[str, torch.device]] = None,
                 dtype: Optional[torch.dtype] = None, trajectory_fn: Optional[TrajectoryFn] = None,
                 traj_dim: Optional[int] = None, sinks: int = 0, paged_attention: Optional[bool] = None) -> None:
        if paged_attention not in (None, True, False):
            raise TypeError(f"TrajectoryEvictionCache: paged_attention must be None, True or False, got "
                            f"{paged_attention!r}")
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        num_layers = getattr(text, "num_hidden_layers", None)
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError("TrajectoryEvictionCache: config must define num_hidden_layers >= 1")
        types, window = getattr(text, "layer_types", None), getattr(text, "sliding_window", None)
        if window is not None or (types is not None and any(t != "full_attention" for t in types)):
            raise ValueError("TrajectoryEvictionCache: only full-attention models are supported (the config has "
                             f"sliding-window or non-attention layers: layer_types={types}, sliding_window={window})")
        if traj_dim is None:
            heads = getattr(text, "num_attention_heads", None)
            traj_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
            if traj_dim is None:
                raise ValueError("TrajectoryEvictionCache: traj_dim is needed (the config has no head_dim)")
        self._text_config, self._paged_attention = text, paged_attention
        self._paged_now = False  # the protocol of the forward in flight (read at its layer 0)
        Cache.__init__(self, layers=[_EvictionLayer(self, i) for i in range(num_layers)])
        ForwardKVCache.__init__(self, num_layers, capacity, traj_dim, max_batch_size=max_batch_size,
                                page_size=page_size, alpha=alpha, decay=decay, device=device, dtype=dtype,
                                trajectory_fn=trajectory_fn, sinks=sinks)

    # the per-layer views report the pools' state
    def _clear(self) -> None:
        super()._clear()
        for layer in self.layers:
            layer.is_initialized = False

    def _lazy_init(self, key_states: Tensor) -> None:
        if self.store is not None:  # runs at every forward: the per-layer flags are set once
            return
        super()._lazy_init(key_states)
        for layer in self.layers:
            layer.is_initialized = True

    # ------------------------------------------------------------------ Cache API
    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args,
               **kwargs) -> Tuple[Tensor, Tensor]:
        """(entries live before this forward, in position order) ++ (this forward's), on dim -2; see ForwardKVCache.

        With paged attention (see the class args): stages the layer and returns only this forward's K/V, the keys
        tagged for the "trajops_paged" attention, which attends over the pools and then writes the layer.
        """
        # the config is read at layer 0 of each forward only (its attribute access is slow); one forward uses
        # one protocol anyway
        if layer_idx == 0:
            self._paged_now = self.uses_paged_attention
        if self._paged_now:
            self.stage(key_states, value_states, layer_idx)
            return tag_keys(self, key_states), value_states
        return ForwardKVCache.update(self, key_states, value_states, layer_idx)

    @property
    def uses_paged_attention(self) -> bool:
        """Whether forwards use the paged protocol (stage + attend in the attention) rather than the gather."""
        if self._paged_attention is not None:
            return self._paged_attention
        return getattr(self._text_config, "_attn_implementation", None) == PAGED_ATTENTION

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Logical tokens seen per row (evicted ones included): generate derives positions from it."""
        return self.seen

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Index of this forward's first query among the keys ``update`` returns: the old live entries come first."""
        return self.live

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> Tuple[int, int]:
        """(kv_length, kv_offset) = (live + query_length, 0). Accepts a cache_position tensor (older signature)."""
        return self.live + (query_length.shape[0] if isinstance(query_length, Tensor) else int(query_length)), 0

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        """-1: the logical length is unbounded (``capacity`` bounds memory, not the tokens generated)."""
        return -1

    get_max_cache_shape = get_max_length  # the name older transformers releases call

    def batch_select_indices(self, indices: Tensor) -> None:
        """Row b becomes a copy of row indices[b] ((B',) row ids or a bool mask over the rows); copies the pools."""
        self.select_rows(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b becomes a copy of row beam_idx[b]."""
        self.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times in place (row order as ``Tensor.repeat_interleave``)."""
        self.repeat_rows(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("TrajectoryEvictionCache.crop: an evicting cache cannot roll back (evicted entries "
                                  "are gone); assisted / speculative decoding and other crop-based modes are not "
                                  "supported")
