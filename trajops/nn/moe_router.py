"""TrajectoryGuidedMoERouter: the seed's router (001, section 1) for every position at once."""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.trajectory_flow import _sanitized, trajectory_flow
from ..varlen import cu_seqlens_from_position_ids, positions_in_document

__all__ = ["TrajectoryGuidedMoERouter"]

# The seed's constants: each position looks back over at most 8 steps and ignores steps whose
# norm is <= 1e-6.
WINDOW = 8
EPS = 1e-6


class TrajectoryGuidedMoERouter(nn.Module):
    """Drop-in for the seed's ``TrajectoryGuidedMoERouter(embedding_dim, num_experts, trajectory_influence)``.

    For a position p of a sequence x (T, E), with the trajectory flow f_p (see
    :func:`trajops.trajectory_flow`, window 8, eps 1e-6) and v_p = "at least one step of p's window
    has norm > 1e-6"::

        context_p = trajectory_projector(f_p) if v_p else 0
        scores_p  = softmax(router(x_p + trajectory_influence * context_p))

    The projector (and its bias) is left out where no step counts, as in the seed: position 0, and
    windows made only of repeated (or NaN) tokens.

    Calls:
        ``forward(token_embeddings, position)`` — the seed's call: token_embeddings (T, E), an int
        0 <= position < T -> (num_experts,). Reads only the window before ``position``.
        ``forward(x)`` — batched: x (B, T, E) -> (B, T, num_experts), or x (T, E) -> (T, num_experts);
        every position at once, no host sync (torch.compile(fullgraph=True) works).
        ``forward(x, cu_seqlens=cu)`` — packed documents (conventions: :mod:`trajops.varlen`): x
        (total, E) or (1, total, E) and cu (N + 1,) int32/int64 offsets; every document is routed
        as if alone (its windows never reach into the previous document), in one call, no host sync.
        ``forward(x, position_ids=ids)`` — transformers' packing (``DataCollatorWithFlattening``):
        ids restart at 0 at each document; ids has x's shape without E ((1, total) for x
        (1, total, E); (B, T) for x (B, T, E), rows read one after the other, a row start also
        starting a document). The offsets are derived with
        :func:`trajops.cu_seqlens_from_position_ids`, which reads the ids (one host sync).

    Parameters and state_dict keys are the seed's (``router``, ``trajectory_projector``);
    ``trajectory_influence`` is a plain attribute, as in the seed (not saved).

    Differences from the seed (all documented, none in the forward values):
      * Gradient with respect to the embeddings: the seed builds its weights with
        ``torch.tensor(list_of_tensors)``, which detaches the recency x tanh(norm) weights from the
        graph, so its input gradient leaves out their derivative. This module differentiates the
        function it computes (the weights included). Parameter gradients are the seed's.
      * A negative ``position`` (which the seed indexes from the end, with an empty window) is
        rejected, as is one >= T (an IndexError in the seed).
    """

    def __init__(self, embedding_dim: int, num_experts: int, trajectory_influence: float = 0.3) -> None:
        super().__init__()
        for name, v in (("embedding_dim", embedding_dim), ("num_experts", num_experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrajectoryGuidedMoERouter: {name} must be an int >= 1, got {v!r}")
        self.embedding_dim = embedding_dim
        self.num_experts = num_experts
        self.trajectory_influence = trajectory_influence
        self.router = nn.Linear(embedding_dim, num_experts)
        self.trajectory_projector = nn.Linear(embedding_dim, embedding_dim)

    # ------------------------------------------------------------------ helpers
    def _check_embeddings(self, x: Tensor, ranks: tuple, shape: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"TrajectoryGuidedMoERouter: token_embeddings must be a tensor, got {type(x).__name__}")
        if x.dim() not in ranks or x.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"TrajectoryGuidedMoERouter: token_embeddings must have shape {shape} with E = embedding_dim = "
                f"{self.embedding_dim}, got shape {list(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"TrajectoryGuidedMoERouter: token_embeddings must be floating point, got {x.dtype}")

    def _position(self, token_embeddings: Tensor, position) -> int:
        self._check_embeddings(token_embeddings, (2,), "(T, E)")
        if isinstance(position, bool):
            raise TypeError("TrajectoryGuidedMoERouter: position must be an int, got bool")
        try:
            p = operator.index(position)
        except TypeError:
            raise TypeError(
                f"TrajectoryGuidedMoERouter: position must be an int, got {type(position).__name__}"
            ) from None
        T = token_embeddings.shape[0]
        if not 0 <= p < T:
            raise ValueError(f"TrajectoryGuidedMoERouter: position must be in [0, T) = [0, {T}), got {p}")
        return p

    @staticmethod
    def _has_step(x: Tensor, pos: Optional[Tensor] = None) -> Tensor:
        """Bool (..., T): does position p's window [max(0, p - 8), p - 1] hold a step with norm > eps?

        A windowed count of the counting steps from a prefix sum; NaN norms fail ``> eps`` like the
        seed's comparison. ``pos`` (T,): positions inside their documents (packed x), whose windows
        start no earlier than their document.
        """
        n = torch.linalg.vector_norm(x[..., 1:, :] - x[..., :-1, :], dim=-1)
        counts = torch.nn.functional.pad((n > EPS).to(torch.int32).cumsum(-1), (1, 0))  # (..., T): steps < p
        T = x.shape[-2]
        p = torch.arange(T, device=x.device)
        lo = p - (p if pos is None else pos).clamp(max=WINDOW)
        return (counts - counts.index_select(-1, lo)) > 0

    def _context(self, flow: Tensor, has_step: Tensor) -> Tensor:
        projected = self.trajectory_projector(flow)
        return torch.where(has_step.unsqueeze(-1), projected, torch.zeros_like(projected))

    # ------------------------------------------------------------------ the seed's API
    def compute_trajectory_context(self, token_embeddings: Tensor, position: int) -> Tensor:
        """The projected trajectory context (E,) of ``position`` in token_embeddings (T, E), as the seed.

        Zeros (without the projector's bias) when no step of the window counts.
        """
        p = self._position(token_embeddings, position)
        # The window of p only reaches back WINDOW steps, so p's flow in that slice is its flow in x.
        lo = max(0, p - WINDOW)
        window = token_embeddings[lo : p + 1]
        flow = trajectory_flow(window, WINDOW, EPS)[-1]
        return self._context(flow, self._has_step(window)[-1])

    def forward(
        self,
        token_embeddings: Tensor,
        position: Optional[int] = None,
        *,
        cu_seqlens: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
    ) -> Tensor:
        """Expert probabilities: (num_experts,) for ``(token_embeddings (T, E), position)``, as the seed;
        (B, T, num_experts) for a batched x (B, T, E) (or (T, num_experts) for x (T, E)) with no position;
        for packed documents (``cu_seqlens`` or ``position_ids``, see the class docstring) x's shape
        with E replaced by num_experts.
        """
        if position is not None:
            if cu_seqlens is not None or position_ids is not None:
                raise ValueError(
                    "TrajectoryGuidedMoERouter: position (the seed's single-position call) cannot be "
                    "combined with cu_seqlens or position_ids"
                )
            p = self._position(token_embeddings, position)
            context = self.compute_trajectory_context(token_embeddings, p)
            return torch.softmax(self.router(token_embeddings[p] + self.trajectory_influence * context), dim=-1)
        x = token_embeddings
        self._check_embeddings(x, (2, 3), "(B, T, E) or (T, E)")
        if cu_seqlens is None and position_ids is None:
            context = self._context(trajectory_flow(x, WINDOW, EPS), self._has_step(x))
            return torch.softmax(self.router(x + self.trajectory_influence * context), dim=-1)
        shape = x.shape
        if position_ids is not None:
            if cu_seqlens is not None:
                raise ValueError("TrajectoryGuidedMoERouter: pass cu_seqlens or position_ids, not both")
            if not isinstance(position_ids, Tensor) or position_ids.numel() != x.numel() // self.embedding_dim:
                got = list(position_ids.shape) if isinstance(position_ids, Tensor) else type(position_ids).__name__
                raise ValueError(
                    f"TrajectoryGuidedMoERouter: position_ids must have one id per token, x's shape "
                    f"{list(shape[:-1])}, got {got}"
                )
            cu_seqlens = cu_seqlens_from_position_ids(position_ids.reshape(shape[:-1]))
            x = x.reshape(-1, self.embedding_dim)  # rows one after the other, as the offsets read them
        flow = trajectory_flow(x, WINDOW, EPS, cu_seqlens=cu_seqlens)
        # The offsets were checked by trajectory_flow on CPU; off the CPU invalid ones made flow NaN
        # and are made safe to index with here.
        total = x.shape[-2]
        has_step = self._has_step(x, positions_in_document(_sanitized(cu_seqlens, total)[0], total))
        context = self._context(flow, has_step)
        return torch.softmax(self.router(x + self.trajectory_influence * context), dim=-1).reshape(
            shape[:-1] + (self.num_experts,)
        )

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_experts={self.num_experts}, "
            f"trajectory_influence={self.trajectory_influence}"
        )
