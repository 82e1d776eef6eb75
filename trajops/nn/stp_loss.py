"""STPLoss: the training policy around trajops.stp_loss (which layers, how strong, from when)."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..ops.stp_loss import stp_loss

__all__ = ["STPLoss"]


class STPLoss(nn.Module):
    """Weighted STP trajectory-straightness loss on selected layers, with a delayed start.

    ``loss = weight * trajops.stp_loss([hidden_states[i] for i in layers], n_spans)`` once the step
    count reaches ``start_step``, and a zero that is still connected to the graph before (so
    ``backward()`` and DDP see the same graph either way). The kernel knows nothing of this policy.

    Args:
        weight: multiplier of the loss (seed default 0.02).
        n_spans: triples sampled per row and call.
        layers: indices into the ``hidden_states`` sequence (e.g. ``(4, 8, 12)``; negative indices
            count from the end, so ``(-1,)`` is the last layer).
        start_step: first step at which the loss is on.

    Call: ``forward(hidden_states, *, step=None, lengths=None, triples=None, generator=None)`` with
    ``hidden_states`` a (B, T, D) tensor or a sequence of them (e.g. a transformers model's
    ``output_hidden_states``). ``step`` defaults to the module's own counter, which counts the calls
    made in training mode (pass ``step`` explicitly when you accumulate gradients). The counter is
    saved in the ``state_dict``.
    """

    def __init__(self, weight: float = 0.02, n_spans: int = 4, layers: Sequence[int] = (-1,), start_step: int = 0):
        super().__init__()
        if isinstance(n_spans, bool) or not isinstance(n_spans, int) or n_spans < 1:
            raise ValueError(f"STPLoss: n_spans must be an int >= 1, got {n_spans!r}")
        layers = tuple(layers)
        if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"STPLoss: layers must be a non-empty sequence of ints, got {layers!r}")
        self.weight = float(weight)
        self.n_spans = n_spans
        self.layers = layers
        self.start_step = int(start_step)
        self.step = 0

    def forward(
        self,
        hidden_states: Union[Tensor, Sequence[Tensor]],
        *,
        step: Optional[int] = None,
        lengths: Optional[Tensor] = None,
        triples: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        states = [hidden_states] if isinstance(hidden_states, Tensor) else list(hidden_states)
        n = len(states)
        for i in self.layers:
            if not -n <= i < n:
                raise IndexError(f"STPLoss: layer index {i} is out of range for {n} hidden state tensor(s)")
        selected = [states[i] for i in self.layers]
        current = self.step if step is None else int(step)
        if step is None and self.training:
            self.step += 1
        if current < self.start_step:
            acc = torch.float64 if selected[0].dtype == torch.float64 else torch.float32
            # A sum over an empty slice: exactly 0 (even if h holds NaN) and still part of the graph.
            return sum(h.narrow(1, 0, 0).sum(dtype=acc) for h in selected) * self.weight
        return self.weight * stp_loss(selected, self.n_spans, triples=triples, lengths=lengths, generator=generator)

    def get_extra_state(self) -> Any:
        return {"step": self.step}

    def set_extra_state(self, state: Any) -> None:
        self.step = int(state["step"])

    def extra_repr(self) -> str:
        return f"weight={self.weight}, n_spans={self.n_spans}, layers={self.layers}, start_step={self.start_step}"
