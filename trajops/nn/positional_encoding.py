"""TrajectoryAdaptivePositionalEncoding: the seed's content-shifted sinusoidal encoding, batched."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.adaptive_positional_encoding import adaptive_positional_encoding
from ..reference.adaptive_positional_encoding import sinusoidal_table

__all__ = ["TrajectoryAdaptivePositionalEncoding"]


class TrajectoryAdaptivePositionalEncoding(nn.Module):
    """Sinusoidal positional encodings read at positions that drift with the content.

    Drop-in for the seed class of the same name (same constructor, ``state_dict`` keys
    ``pe_table`` and ``trajectory_predictor.{0,2}.{weight,bias}``, same call), computing every
    position of every sequence at once with :func:`trajops.adaptive_positional_encoding` and no
    host sync. For a sequence x (T, E)::

        delta[0] = 0,  delta[t] = trajectory_strength * trajectory_predictor(x[t] - x[t-1])
        s[t] = positions[t] + sum_{j <= t} delta[j]
        out[t] = the table linearly interpolated at clamp(s[t], 0, max_len - 1)

    Args:
        embedding_dim: E, the width of the embeddings and of the table (an odd E keeps its last
            sine column; the seed cannot build that table).
        max_len: rows of the table; semantic positions are clamped to [0, max_len - 1].
        trajectory_strength: scale of the per-step displacement (tanh output in [-1, 1]).

    Call: ``forward(token_embeddings, positions=None)`` with token_embeddings (B, T, E) or (T, E)
    and positions (T,) or (B, T) physical positions (default 0..T-1) -> encodings of the
    embeddings' shape in the table's dtype. Differentiable in the embeddings and the predictor's
    weights (and in floating positions); positions accumulate in fp64 (see the op).
    """

    def __init__(self, embedding_dim: int, max_len: int = 8192, trajectory_strength: float = 0.2):
        super().__init__()
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"TrajectoryAdaptivePositionalEncoding: embedding_dim must be an int >= 1, "
                             f"got {embedding_dim!r}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"TrajectoryAdaptivePositionalEncoding: max_len must be an int >= 1, got {max_len!r}")
        self.embedding_dim = embedding_dim
        self.max_len = max_len
        self.trajectory_strength = trajectory_strength
        self.register_buffer("pe_table", sinusoidal_table(max_len, embedding_dim))
        hidden = embedding_dim // 2
        self.trajectory_predictor = nn.Sequential(
            nn.Linear(embedding_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Tanh()
        )

    def compute_trajectory_displacements(self, token_embeddings: Tensor) -> Tensor:
        """Per-step displacements (B, T) (or (T,) for a (T, E) input), 0 at t = 0.

        The seed's method of this name returns their running sum instead; this one returns the
        steps that :func:`trajops.adaptive_positional_encoding` accumulates.
        """
        x = token_embeddings
        steps = x[..., 1:, :] - x[..., :-1, :]
        delta = self.trajectory_predictor(steps).squeeze(-1) * self.trajectory_strength
        # t = 0 has no previous token; a zero column keeps delta attached to the graph. With T = 0
        # there are no steps either, and the slice keeps the result at length T (not 1).
        return torch.nn.functional.pad(delta, (1, 0))[..., : x.shape[-2]]

    def forward(self, token_embeddings: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        x = token_embeddings
        if not isinstance(x, Tensor):
            raise TypeError(f"TrajectoryAdaptivePositionalEncoding: token_embeddings must be a Tensor, "
                            f"got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.shape[-1] != self.embedding_dim:
            raise ValueError(f"TrajectoryAdaptivePositionalEncoding: token_embeddings must have shape (B, T, "
                             f"{self.embedding_dim}) or (T, {self.embedding_dim}), got {list(x.shape)}")
        if positions is not None:
            T = x.shape[-2]
            if not isinstance(positions, Tensor) or tuple(positions.shape) not in ((T,), tuple(x.shape[:-1])):
                got = list(positions.shape) if isinstance(positions, Tensor) else type(positions).__name__
                raise ValueError(f"TrajectoryAdaptivePositionalEncoding: positions must have shape (T,) = ({T},) "
                                 f"or {list(x.shape[:-1])}, got {got}")
        delta = self.compute_trajectory_displacements(x).to(self.pe_table.dtype)
        return adaptive_positional_encoding(delta, self.pe_table, positions)
