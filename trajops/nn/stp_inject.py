"""STPInject: the module form of trajops.stp_inject (a forward-neutral STP gradient seam)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.stp_inject import nonnegative_number, stp_inject

__all__ = ["STPInject"]


class STPInject(nn.Module):
    """Identity in the forward; injects ``weight * scale * d stp_loss(h)/dh`` in the backward.

    Put it on the hidden states a pipeline stage sends on (``h = self.stp(h)``): the STP gradient of
    this stage then rejoins the main backward stream (see :func:`trajops.stp_inject` for ``scale``
    under microbatching, aliasing and activation checkpointing).

    Args:
        weight: STP coefficient, finite and >= 0 (seed default 0.02).
        n_spans: triples sampled per row and call.
        scale: gradient-accumulation factor (1 under ``torch.distributed.pipelining`` with its
            default ``scale_grads=True``; 1/M for M summed microbatches).
        start_step: the seam is a plain identity (no loss computed) while ``step < start_step``.

    Call: ``forward(hidden, *, step=None, triples=None, lengths=None, generator=None,
    cu_seqlens=None)`` with ``hidden`` (B, T, D) -> the same tensor (a view); a packed batch
    ((1, total, D) or (total, D) with ``cu_seqlens``) is passed through to :func:`trajops.stp_inject`. There is no call counter: a pipeline calls
    the stage once per microbatch, so the caller passes the optimizer ``step``; ``step=None`` means
    "on". ``last_loss`` holds the last unweighted STP loss value (a detached 0-d tensor, no host
    sync; None when the seam was off) for logging.
    """

    last_loss: Optional[Tensor]

    def __init__(self, weight: float = 0.02, n_spans: int = 4, scale: float = 1.0, start_step: int = 0):
        super().__init__()
        if isinstance(n_spans, bool) or not isinstance(n_spans, int) or n_spans < 1:
            raise ValueError(f"STPInject: n_spans must be an int >= 1, got {n_spans!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"STPInject: start_step must be an int >= 0, got {start_step!r}")
        self.weight = nonnegative_number("STPInject", "weight", weight)
        self.scale = nonnegative_number("STPInject", "scale", scale)
        self.n_spans = n_spans
        self.start_step = start_step
        self.last_loss = None

    def forward(
        self,
        hidden: Tensor,
        *,
        step: Optional[int] = None,
        triples: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        cu_seqlens: Optional[Tensor] = None,
    ) -> Tensor:
        if step is not None and step < self.start_step:
            self.last_loss = None
            return hidden
        out, loss = stp_inject(
            hidden,
            self.weight,
            n_spans=self.n_spans,
            triples=triples,
            lengths=lengths,
            scale=self.scale,
            generator=generator,
            return_loss=True,
            cu_seqlens=cu_seqlens,
        )
        self.last_loss = loss
        return out

    def extra_repr(self) -> str:
        return f"weight={self.weight}, n_spans={self.n_spans}, scale={self.scale}, start_step={self.start_step}"
