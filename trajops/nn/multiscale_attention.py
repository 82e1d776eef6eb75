"""MultiScaleTrajectoryAttention: the seed's attention (001, section 5) on trajops.temperature_attention."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.temperature_attention import temperature_attention
from ..reference.temperature_attention import rows_with_keys
from ..varlen import cu_seqlens_from_position_ids, positions_in_document

__all__ = ["MultiScaleTrajectoryAttention"]


class MultiScaleTrajectoryAttention(nn.Module):
    """Drop-in for the seed's ``MultiScaleTrajectoryAttention(embedding_dim, num_heads)``.

    With Q, K, V the projected heads (B, H, T, E/H) and s (B, H, Tq) the predicted scales
    ``scale_predictor(queries[:, t] - queries[:, t-1])`` (a zero difference at t = 0)::

        out = out_proj(concat_heads(softmax(Q K^T / s) V))

    computed by :func:`trajops.temperature_attention` with tau = s and scale = 1.0 (the seed does not
    divide by sqrt(head_dim); its ``default_scale`` buffer is kept for the state_dict only). The
    (Tq, Tk) scores are never materialized.

    Masks: ``attention_mask`` is what the seed accepts: any tensor of rank <= 4 broadcastable to the
    scores (B, H, Tq, Tk) by the usual right-aligned rules — so a 2-D mask is (Tq, Tk) — of any dtype;
    an entry equal to 0 (False) masks the key, anything else attends. ``causal=True`` also masks the
    keys after each query (j > i + Tk - Tq), i.e. the seed given ``attention_mask & tril``.

    A query row with no key left (fully masked) gets, as in the seed (whose -1e9 fill makes every
    score equal), the uniform average of all Tk values, and no gradient to Q, K or the scales.

    Differences from the seed: keys and values may have their own length Tk (the seed requires
    Tk = Tq); a mask of rank > 4, or one that does not broadcast to (B, H, Tq, Tk), is rejected (the
    seed would broadcast the scores up and scramble or fail in its final reshape). The seed's -1e9
    fill lets a masked key through where every allowed score is below about -1e9; this module never
    does. embedding_dim must be a multiple of num_heads at construction (the seed fails at its first
    forward instead). A predicted scale that underflows to 0 gives NaN rows (the seed's division
    gives inf/NaN scores there too).

    Packed documents (not in the seed): ``cu_seqlens`` (FlashAttention's offsets, see
    :mod:`trajops.varlen`) or ``position_ids`` (transformers' ``DataCollatorWithFlattening``: ids
    restarting at 0 per document; costs one host read of the ids) with inputs (1, total, E) that
    concatenate self-attention documents (keys and values packed like the queries). Each document
    is then computed alone: it attends only its own tokens and its query trajectory restarts at 0.
    """

    def __init__(self, embedding_dim: int, num_heads: int) -> None:
        super().__init__()
        for name, v in (("embedding_dim", embedding_dim), ("num_heads", num_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MultiScaleTrajectoryAttention: {name} must be an int >= 1, got {v!r}")
        if embedding_dim % num_heads:
            raise ValueError(
                f"MultiScaleTrajectoryAttention: embedding_dim ({embedding_dim}) must be a multiple of "
                f"num_heads ({num_heads})"
            )
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.head_dim = embedding_dim // num_heads
        self.q_proj = nn.Linear(embedding_dim, embedding_dim)
        self.k_proj = nn.Linear(embedding_dim, embedding_dim)
        self.v_proj = nn.Linear(embedding_dim, embedding_dim)
        self.out_proj = nn.Linear(embedding_dim, embedding_dim)
        self.scale_predictor = nn.Sequential(
            nn.Linear(embedding_dim, embedding_dim // 4),
            nn.ReLU(),
            nn.Linear(embedding_dim // 4, num_heads),
            nn.Softplus(),
        )
        # Unused by the math (as in the seed) but part of a seed checkpoint.
        self.register_buffer("default_scale", torch.tensor(float(self.head_dim), dtype=torch.float32).sqrt())

    def compute_query_trajectory(self, queries: Tensor) -> Tensor:
        """(B, T, E) -> (B, T, E): queries[:, t] - queries[:, t - 1], and 0 at t = 0."""
        step = queries[:, 1:] - queries[:, :-1]
        return torch.cat([torch.zeros_like(queries[:, :1]), step], dim=1)

    def _scales(self, trajectory: Tensor) -> Tensor:
        """scale_predictor(trajectory (B, T, E)) transposed to (B, H, T), contiguous.

        The last linear layer is applied as W @ h^T so that the scales are born in the op's (B, H, T)
        layout: a transposed view would give the op's contiguous tau gradient a layout that makes
        AOTAutograd's traced backward (softplus_backward, then the linear's view) fail at run time.
        """
        first, act, last, softplus = self.scale_predictor
        hidden = act(first(trajectory))  # (B, T, E // 4)
        return softplus(torch.matmul(last.weight, hidden.transpose(1, 2)) + last.bias.unsqueeze(-1))

    def _heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def _check(self, queries: Tensor, keys: Tensor, values: Tensor) -> None:
        E = self.embedding_dim
        for name, t in (("queries", queries), ("keys", keys), ("values", values)):
            if not isinstance(t, Tensor):
                raise TypeError(f"MultiScaleTrajectoryAttention: {name} must be a tensor, got {type(t).__name__}")
            if t.dim() != 3 or t.shape[-1] != E:
                raise ValueError(
                    f"MultiScaleTrajectoryAttention: {name} must have shape (B, T, {E}) (E = embedding_dim), "
                    f"got {list(t.shape)}"
                )
        if keys.shape[0] != queries.shape[0] or values.shape[:2] != keys.shape[:2]:
            raise ValueError(
                "MultiScaleTrajectoryAttention: queries (B, Tq, E), keys and values (B, Tk, E) must share B, and "
                f"keys and values Tk; got {list(queries.shape)}, {list(keys.shape)} and {list(values.shape)}"
            )

    def _mask(self, attention_mask, B: int, Tq: int, Tk: int) -> Tensor:
        """The seed's mask (entry == 0 masks) as the op's rank-4 bool mask (True = attend)."""
        if not isinstance(attention_mask, Tensor):
            raise TypeError(
                f"MultiScaleTrajectoryAttention: attention_mask must be a tensor or None, got "
                f"{type(attention_mask).__name__}"
            )
        target = (B, self.num_heads, Tq, Tk)
        shape = tuple(attention_mask.shape)
        if len(shape) > 4 or any(s != 1 and s != t for s, t in zip(reversed(shape), reversed(target))):
            raise ValueError(
                f"MultiScaleTrajectoryAttention: attention_mask must have rank <= 4 and broadcast to the scores "
                f"(B, H, Tq, Tk) = {target}, got shape {list(shape)}"
            )
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
        return allowed.reshape((1,) * (4 - len(shape)) + shape)

    def forward(
        self,
        queries: Tensor,
        keys: Tensor,
        values: Tensor,
        attention_mask: Optional[Tensor] = None,
        *,
        causal: bool = False,
        cu_seqlens: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
    ) -> Tensor:
        """queries (B, Tq, E), keys and values (B, Tk, E) -> (B, Tq, E).

        attention_mask: optional, rank <= 4, broadcastable to (B, H, Tq, Tk); 0 / False = masked.
        causal: also mask keys j > i + (Tk - Tq) (per document when packed).
        cu_seqlens: (N + 1,) int32/int64 document offsets of packed inputs (1, total, E), or
        position_ids: (1, total) / (total,) ids restarting at 0 per document (transformers' packing);
            at most one of the two, and no attention_mask with them.
        """
        self._check(queries, keys, values)
        if cu_seqlens is not None or position_ids is not None:
            return self._packed(queries, keys, values, attention_mask, bool(causal), cu_seqlens, position_ids)
        B, Tq, _ = queries.shape
        Tk = keys.shape[1]
        q = self._heads(self.q_proj(queries))
        k = self._heads(self.k_proj(keys))
        v = self._heads(self.v_proj(values))
        # The seed divides the scores by s; the op computes scale * q.k / tau, so tau = s, scale = 1.
        tau = self._scales(self.compute_query_trajectory(queries))
        mask = None if attention_mask is None else self._mask(attention_mask, B, Tq, Tk)
        out = temperature_attention(q, k, v, tau, causal=bool(causal), attn_mask=mask, scale=1.0)
        has_keys = rows_with_keys(B, self.num_heads, Tq, Tk, mask, bool(causal), queries.device)
        if has_keys is not None and Tk > 0:
            # The op leaves key-less rows at 0; the seed's softmax over equal scores averages all values.
            out = torch.where(has_keys.unsqueeze(-1), out, v.mean(dim=-2, keepdim=True).to(out.dtype))
        out = out.transpose(1, 2).reshape(B, Tq, self.embedding_dim)
        return self.out_proj(out)

    def _packed(self, queries: Tensor, keys: Tensor, values: Tensor, attention_mask: Optional[Tensor], causal: bool,
                cu_seqlens: Optional[Tensor], position_ids: Optional[Tensor]) -> Tensor:
        """Packed documents: (1, total, E) -> (1, total, E), each document computed alone."""
        if cu_seqlens is not None and position_ids is not None:
            raise ValueError("MultiScaleTrajectoryAttention: give cu_seqlens or position_ids, not both")
        if attention_mask is not None:
            raise ValueError(
                "MultiScaleTrajectoryAttention: attention_mask must be None with cu_seqlens/position_ids "
                "(the documents are the mask; use causal=True to mask inside each)"
            )
        if queries.shape[0] != 1 or keys.shape[1] != queries.shape[1]:
            raise ValueError(
                "MultiScaleTrajectoryAttention: packed documents (cu_seqlens/position_ids) need queries, keys and "
                f"values of shape (1, total, E) with one total, got {list(queries.shape)} and {list(keys.shape)}"
            )
        if cu_seqlens is None:
            cu_seqlens = cu_seqlens_from_position_ids(position_ids)  # reads the ids (one sync on CUDA)
        total, H, hd = queries.shape[1], self.num_heads, self.head_dim
        # token-major (total, H, hd) heads and (total, H) scales: the packed op's own layout
        q = self.q_proj(queries[0]).view(total, H, hd)
        k = self.k_proj(keys[0]).view(total, H, hd)
        v = self.v_proj(values[0]).view(total, H, hd)
        step = self.compute_query_trajectory(queries)[0]
        if total > 0:  # the trajectory restarts at each document's first token (no step across documents)
            first = positions_in_document(cu_seqlens, total) == 0
            step = torch.where(first.unsqueeze(-1), torch.zeros_like(step), step)
        tau = self.scale_predictor(step)
        out = temperature_attention(q, k, v, tau, causal=causal, scale=1.0, cu_seqlens_q=cu_seqlens,
                                    cu_seqlens_k=cu_seqlens)
        return self.out_proj(out.reshape(1, total, self.embedding_dim))

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, num_heads={self.num_heads}"
