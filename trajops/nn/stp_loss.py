"""STPLoss: the training policy around trajops.stp_loss (which layers, how strong, from when)."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..ops.stp_inject import nonnegative_number
from ..ops.stp_loss import stp_loss
from ..reference._common import compute_dtype

__all__ = ["STPLoss", "STP_CONFIG_DEFAULTS", "parse_stp_config"]

# The seed's config surface (seed 003: "stp_enabled, stp_weight, start_step, stp_n_spans,
# stp_layers"). Off unless enabled: an auxiliary loss is opt-in. Never "every layer" by default.
STP_CONFIG_DEFAULTS: Dict[str, Any] = {
    "stp_enabled": False,
    "stp_weight": 0.02,
    "start_step": 1000,
    "stp_n_spans": 4,
    "stp_layers": "4,8,12",
}


def _parse_int(where: str, key: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {key} must be an int, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{where}: {key} must be >= {low}, got {value}")
    return value


def _parse_layers(where: str, value, num_hidden_states: Optional[int]) -> Tuple[int, ...]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            # int() of a stripped part: accepts "-1", rejects "", "4.0", "a", "4 8".
            layers = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(
                f'{where}: stp_layers must be comma-separated ints such as "4,8,12", got {value!r}'
            ) from None
    elif isinstance(value, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise ValueError(f"{where}: stp_layers must be a list of ints, got {value!r}")
        layers = tuple(value)
    else:
        raise TypeError(
            f'{where}: stp_layers must be a string such as "4,8,12" or a list of ints, got {type(value).__name__}'
        )
    if not layers:
        raise ValueError(f"{where}: stp_layers must name at least one layer (there is no all-layers default)")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{where}: stp_layers names a layer twice: {list(layers)}")
    if num_hidden_states is not None:
        n = num_hidden_states
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise ValueError(
                f"{where}: stp_layers {bad} out of range for {n} hidden state tensors "
                f"(valid indices: {-n}..{n - 1})"
            )
    return layers


def parse_stp_config(mapping: Mapping[str, Any], *, num_hidden_states: Optional[int] = None) -> Dict[str, Any]:
    """Validates the seed's STP config keys and fills the defaults (:data:`STP_CONFIG_DEFAULTS`).

    Returns ``{"stp_enabled": bool, "stp_weight": float, "start_step": int, "stp_n_spans": int,
    "stp_layers": tuple of ints}``. Unknown keys, wrong types, a negative or non-finite weight,
    ``stp_n_spans < 1``, ``start_step < 0`` and (when ``num_hidden_states`` is given) layer
    indices outside ``[-num_hidden_states, num_hidden_states)`` raise with the key's name.
    """
    where = "STP config"
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{where}: expected a mapping of STP keys, got {type(mapping).__name__}")
    unknown = sorted(str(k) for k in mapping if k not in STP_CONFIG_DEFAULTS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; the keys are {sorted(STP_CONFIG_DEFAULTS)}")
    cfg = {**STP_CONFIG_DEFAULTS, **mapping}
    if not isinstance(cfg["stp_enabled"], bool):
        # A string "false" is truthy: refuse it rather than turn STP on by accident.
        raise TypeError(f"{where}: stp_enabled must be a bool, got {cfg['stp_enabled']!r}")
    weight = nonnegative_number(where, "stp_weight", cfg["stp_weight"])
    if num_hidden_states is not None:
        _parse_int(where, "num_hidden_states", num_hidden_states, 1)
    return {
        "stp_enabled": cfg["stp_enabled"],
        "stp_weight": weight,
        "start_step": _parse_int(where, "start_step", cfg["start_step"], 0),
        "stp_n_spans": _parse_int(where, "stp_n_spans", cfg["stp_n_spans"], 1),
        "stp_layers": _parse_layers(where, cfg["stp_layers"], num_hidden_states),
    }


class STPLoss(nn.Module):
    """Weighted STP trajectory-straightness loss on selected layers, with a delayed start.

    ``loss = weight * trajops.stp_loss([hidden_states[i] for i in layers], n_spans)`` once the step
    count reaches ``start_step``, and a zero that is still connected to the graph before (so
    ``backward()`` and DDP see the same graph either way). The kernel knows nothing of this policy.

    Args:
        weight: multiplier of the loss, finite and >= 0 (seed default 0.02).
        n_spans: triples sampled per row and call.
        layers: indices into the ``hidden_states`` sequence (e.g. ``(4, 8, 12)``; negative indices
            count from the end, so ``(-1,)`` is the last layer).
        start_step: first step at which the loss is on.
        enabled: False makes the module return that connected zero at every step (a config's
            ``stp_enabled: false``; see :meth:`from_config`).

    Call: ``forward(hidden_states, *, step=None, lengths=None, triples=None, generator=None,
    cu_seqlens=None)`` with ``hidden_states`` a (B, T, D) tensor or a sequence of them (packed
    batches: (1, total, D) or (total, D) with ``cu_seqlens``, passed through to
    :func:`trajops.stp_loss`) (e.g. a transformers model's
    ``output_hidden_states``). ``step`` defaults to the module's own counter, which counts the calls
    made in training mode (pass ``step`` explicitly when you accumulate gradients). The counter is
    saved in the ``state_dict``.
    """

    def __init__(
        self,
        weight: float = 0.02,
        n_spans: int = 4,
        layers: Sequence[int] = (-1,),
        start_step: int = 0,
        enabled: bool = True,
    ):
        super().__init__()
        weight = nonnegative_number("STPLoss", "weight", weight)
        if isinstance(n_spans, bool) or not isinstance(n_spans, int) or n_spans < 1:
            raise ValueError(f"STPLoss: n_spans must be an int >= 1, got {n_spans!r}")
        layers = tuple(layers)
        if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"STPLoss: layers must be a non-empty sequence of ints, got {layers!r}")
        self.weight = float(weight)
        self.n_spans = n_spans
        self.layers = layers
        self.start_step = int(start_step)
        self.enabled = bool(enabled)
        self.step = 0

    @classmethod
    def from_config(cls, mapping: Mapping[str, Any], *, num_hidden_states: Optional[int] = None) -> "STPLoss":
        """Builds the module from the seed's config keys (all optional, defaults in brackets).

        ``stp_enabled`` [False], ``stp_weight`` [0.02] (finite, >= 0), ``start_step`` [1000],
        ``stp_n_spans`` [4], ``stp_layers`` ["4,8,12"]: a string of comma-separated indices into
        ``hidden_states`` or a list of ints; negative indices count from the end.

        Args:
            mapping: e.g. a parsed YAML/JSON training config holding only these keys; any other
                key raises ValueError (a typo must not silently keep a default).
            num_hidden_states: optional length of the ``hidden_states`` sequence the module will
                be called with (for a transformers model with ``output_hidden_states=True``,
                ``config.num_hidden_layers + 1``: index 0 is the embeddings); when given, layer
                indices out of range raise here instead of at the first call.

        Which layers the indices name depends on who feeds the module: called on a
        ``hidden_states`` sequence they index that sequence (with transformers' tuple, decoder
        layer i is index i + 1); :class:`trajops.hf_stp.STPHooks` reads them as 0-based decoder
        layers (``model.model.layers[i]``), the seed's meaning of ``"4,8,12"`` — there pass
        ``num_hidden_states=config.num_hidden_layers`` to check the range.

        Example: ``STPLoss.from_config({"stp_enabled": True, "stp_layers": "4,8,12"})``.
        """
        cfg = parse_stp_config(mapping, num_hidden_states=num_hidden_states)
        return cls(
            weight=cfg["stp_weight"],
            n_spans=cfg["stp_n_spans"],
            layers=cfg["stp_layers"],
            start_step=cfg["start_step"],
            enabled=cfg["stp_enabled"],
        )

    def forward(
        self,
        hidden_states: Union[Tensor, Sequence[Tensor]],
        *,
        step: Optional[int] = None,
        lengths: Optional[Tensor] = None,
        triples: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        cu_seqlens: Optional[Tensor] = None,
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
        if not self.enabled or current < self.start_step:
            acc = compute_dtype(selected[0].dtype)
            # A sum over an empty slice: exactly 0 (even if h holds NaN) and still part of the graph.
            return sum(h.narrow(-2, 0, 0).sum(dtype=acc) for h in selected) * self.weight
        return self.weight * stp_loss(
            selected, self.n_spans, triples=triples, lengths=lengths, generator=generator, cu_seqlens=cu_seqlens
        )

    def get_extra_state(self) -> Any:
        return {"step": self.step}

    def set_extra_state(self, state: Any) -> None:
        self.step = int(state["step"])

    def extra_repr(self) -> str:
        text = f"weight={self.weight}, n_spans={self.n_spans}, layers={self.layers}, start_step={self.start_step}"
        return text if self.enabled else text + ", enabled=False"
