"""TrajectoryCharLM: a small character-level transformer built from the trajops modules.

Every block is pre-norm::

    x = x + MultiScaleTrajectoryAttention(ln1(x), ln1(x), ln1(x), causal=True)
    x = x + MoEFeedForward(ln2(x))        # expert weights from TrajectoryGuidedMoERouter(ln2(x))

after token embeddings plus TrajectoryAdaptivePositionalEncoding, and followed by a final LayerNorm
and a linear LM head. ``forward`` also returns each block's output (the residual stream), the hidden
states that :class:`trajops.nn.STPLoss` straightens.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from trajops.nn import MultiScaleTrajectoryAttention, TrajectoryAdaptivePositionalEncoding, TrajectoryGuidedMoERouter

__all__ = ["MoEFeedForward", "TrajectoryBlock", "TrajectoryCharLM"]


def _positive_int(owner: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{owner}: {name} must be an int >= 1, got {v!r}")
    return v


class MoEFeedForward(nn.Module):
    """Dense soft mixture of ``num_experts`` GELU MLPs (E -> hidden -> E) weighted by the router.

    ``out[b, t] = sum_e probs[b, t, e] * expert_e(x[b, t])`` with ``probs`` from
    :class:`trajops.nn.TrajectoryGuidedMoERouter` (softmax over experts, trajectory-aware). Every
    expert runs on every token (no top-k dispatch): at this size a dense mixture is cheaper than
    routing, it is deterministic, and it keeps every expert in the graph (DDP needs no
    ``find_unused_parameters``). Expert weights are stacked so that all experts are one einsum.

    Call: ``forward(x)`` with x (B, T, E) -> (B, T, E); ``forward(x, probs=p)`` uses the given
    (B, T, num_experts) weights instead of calling the router (cached decoding does that).
    """

    def __init__(self, embedding_dim: int, num_experts: int, hidden_dim: int, trajectory_influence: float = 0.3):
        super().__init__()
        E, N, Hd = embedding_dim, num_experts, hidden_dim
        self.router = TrajectoryGuidedMoERouter(E, N, trajectory_influence)
        self.w1 = nn.Parameter(torch.empty(N, E, Hd))
        self.b1 = nn.Parameter(torch.zeros(N, Hd))
        self.w2 = nn.Parameter(torch.empty(N, Hd, E))
        self.b2 = nn.Parameter(torch.zeros(N, E))
        nn.init.normal_(self.w1, std=1.0 / math.sqrt(E))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(Hd))

    def experts(self, x: Tensor) -> Tensor:
        """Every expert's output: x (..., E) -> (..., num_experts, E)."""
        h = torch.nn.functional.gelu(torch.einsum("...e,neh->...nh", x, self.w1) + self.b1)
        return torch.einsum("...nh,nhe->...ne", h, self.w2) + self.b2

    def forward(self, x: Tensor, probs: Optional[Tensor] = None) -> Tensor:
        if probs is None:
            probs = self.router(x)
        return torch.einsum("...n,...ne->...e", probs, self.experts(x))


class TrajectoryBlock(nn.Module):
    """Pre-norm block: causal multi-scale trajectory attention, then the routed MoE feed-forward.

    forward(x (B, T, E)) -> (B, T, E).
    """

    def __init__(self, embedding_dim: int, num_heads: int, num_experts: int, expert_hidden: int,
                 trajectory_influence: float = 0.3):
        super().__init__()
        self.ln1 = nn.LayerNorm(embedding_dim)
        self.attn = MultiScaleTrajectoryAttention(embedding_dim, num_heads)
        self.ln2 = nn.LayerNorm(embedding_dim)
        self.moe = MoEFeedForward(embedding_dim, num_experts, expert_hidden, trajectory_influence)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, causal=True)
        return x + self.moe(self.ln2(x))


class TrajectoryCharLM(nn.Module):
    """Character-level trajectory-guided transformer.

    Args:
        vocab_size: number of distinct characters V.
        embedding_dim: E (a multiple of num_heads, and >= 4 for the attention's scale predictor).
        num_heads: attention heads H (head size E / H).
        num_layers: blocks.
        num_experts: MLP experts per block, mixed by the router.
        expert_hidden: hidden width of each expert (default 2 E).
        max_len: rows of the positional table; semantic positions beyond it are clamped.
        trajectory_influence: the router's weight of the trajectory context.
        trajectory_strength: the positional encoding's per-step displacement scale.

    ``forward(idx)`` with idx (B, T) int64 -> (logits (B, T, V), hidden) where ``hidden`` is the
    list of the num_layers block outputs, each (B, T, E). Causal: position t only sees tokens <= t
    (attention is causal; the router, the attention temperatures and the adaptive positions only
    look back). No host sync in forward.
    """

    def __init__(self, vocab_size: int, embedding_dim: int = 128, num_heads: int = 4, num_layers: int = 2,
                 num_experts: int = 4, expert_hidden: Optional[int] = None, max_len: int = 8192,
                 trajectory_influence: float = 0.3, trajectory_strength: float = 0.2):
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("embedding_dim", embedding_dim), ("num_heads", num_heads),
                        ("num_layers", num_layers), ("num_experts", num_experts), ("max_len", max_len)):
            _positive_int("TrajectoryCharLM", name, v)
        if embedding_dim < 4:
            raise ValueError(f"TrajectoryCharLM: embedding_dim must be >= 4 (the attention's scale predictor "
                             f"has embedding_dim // 4 units), got {embedding_dim}")
        expert_hidden = 2 * embedding_dim if expert_hidden is None else expert_hidden
        _positive_int("TrajectoryCharLM", "expert_hidden", expert_hidden)
        self.vocab_size, self.embedding_dim, self.num_heads = vocab_size, embedding_dim, num_heads
        self.num_layers, self.num_experts, self.max_len = num_layers, num_experts, max_len
        self.tok_emb = nn.Embedding(vocab_size, embedding_dim)
        self.pos = TrajectoryAdaptivePositionalEncoding(embedding_dim, max_len, trajectory_strength)
        self.blocks = nn.ModuleList(
            TrajectoryBlock(embedding_dim, num_heads, num_experts, expert_hidden, trajectory_influence)
            for _ in range(num_layers)
        )
        self.ln_f = nn.LayerNorm(embedding_dim)
        self.head = nn.Linear(embedding_dim, vocab_size)

    def embed(self, idx: Tensor) -> Tensor:
        """idx (B, T) -> the first block's input (B, T, E): token embeddings + adaptive positions."""
        e = self.tok_emb(idx)
        return e + self.pos(e)

    def forward(self, idx: Tensor) -> Tuple[Tensor, List[Tensor]]:
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
            got = f"{idx.dtype} {list(idx.shape)}" if isinstance(idx, Tensor) else type(idx).__name__
            raise ValueError(f"TrajectoryCharLM: idx must be an int64 tensor of shape (B, T), got {got}")
        x = self.embed(idx)
        hidden = []
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        return self.head(self.ln_f(x)), hidden
