"""transformers integration of the STP loss: forward hooks on chosen decoder layers, not ``output_hidden_states``.

``output_hidden_states=True`` returns (and so keeps referenced) every layer's output. :class:`STPHooks` hooks only
the decoder layers an :class:`~trajops.nn.STPLoss` names, keeps their outputs for the duration of one forward, and at
the end of the forward turns them into the STP term of the step::

    stp = trajops.nn.STPLoss(weight=0.02, n_spans=4, layers=(20, 25, 29), start_step=100)
    with STPHooks(model, stp) as hooks:
        out = model(input_ids, attention_mask=mask, labels=labels)
        loss = out.loss + hooks.pop_term()     # weight * stp, in the graph
        hooks.last_value                       # the same term, detached (for logging)

Layer indexing: ``stp.layers`` are **0-based decoder-layer indices** (``model.model.layers[i]``); negative counts from
the end, so ``-1`` is the last decoder layer. Layer ``i``'s output is ``hidden_states[i + 1]`` of
``output_hidden_states=True`` for every layer but the last: transformers 5.x puts the *final-norm* output in the last
entry, whereas the hook sees the last decoder layer's own (pre-norm) output. The seed's ``"4,8,12"`` thus means
decoder layers 4, 8 and 12.

Padding: the ``attention_mask`` given to the model is read by a pre-hook on the base model. Right padding (each row a
prefix of ones) becomes ``lengths = mask.sum(-1)``, so padding never enters a triple; any other 0/1 pattern (left
padding, holes) raises ValueError, since the STP kernels only know valid prefixes. No mask = every position valid.
(Checking the mask reads it on the host: one small sync per forward on a GPU.)

Packed batches: without an ``attention_mask``, a ``position_ids`` given to the model (transformers'
``DataCollatorWithFlattening``: position ids restart at 0 at each document) defines the documents
(:func:`trajops.varlen.cu_seqlens_from_position_ids`, one small sync), and the layer outputs, read as one packed
row (1, B*T, D), get the packed STP loss (``cu_seqlens``): no triple crosses a document boundary. Plain
``arange`` position ids give each row its own document: the unpacked loss with ``lengths = T``.

Eval mode or ``torch.no_grad()``: nothing is computed (``last_term`` stays None) unless ``compute_in_eval=True``; the
STP step counter only moves in training forwards. :class:`LayerCapture` alone collects chosen layers' outputs (e.g. to
measure straightness with :func:`trajops.stp_loss_dense` on held-out data). :class:`STPTrainer` is a thin
``transformers.Trainer`` that adds the term to the loss and logs ``lm_loss`` and ``stp`` apart.

Limits: Llama-like models whose decoder layers are ``model.model.layers`` (or ``model.layers``); with gradient
checkpointing the recomputed layers fire the hooks again, which is harmless (the term was already formed) but wasted.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from . import varlen
from .nn.stp_loss import STPLoss

__all__ = ["LayerCapture", "STPHooks", "STPTrainer", "decoder_layers", "resolve_layers"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a Llama-like transformers model (``model.model.layers`` or ``model.layers``)."""
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise TypeError(
        f"decoder_layers: {type(model).__name__} has no non-empty `model.layers` or `layers` ModuleList; "
        "STP hooks support Llama-like decoder models only"
    )


def _base_model(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers and receives ``attention_mask``."""
    inner = getattr(model, "model", None)
    return inner if isinstance(getattr(inner, "layers", None), nn.ModuleList) else model


def resolve_layers(layers: Sequence[int], n_layers: int) -> List[int]:
    """0-based decoder-layer indices (negative = from the end) -> sorted distinct non-negative indices."""
    out = set()
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"resolve_layers: layers must be ints, got {i!r}")
        if not -n_layers <= i < n_layers:
            raise IndexError(f"resolve_layers: layer {i} is out of range for a model with {n_layers} decoder layers")
        out.add(i % n_layers)
    return sorted(out)


def lengths_from_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """(B, T) right-padded 0/1 attention mask -> (B,) int64 lengths; None -> None. Raises on other patterns."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        shape = list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"STPHooks: attention_mask must be a (B, T) 0/1 tensor, got {shape}")
    valid = mask != 0
    lengths = valid.sum(-1)
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    if not bool((prefix == valid).all()):
        raise ValueError(
            "STPHooks: attention_mask must be right-padded (each row a prefix of ones); left padding or holes "
            "are not supported by the STP kernels (use tokenizer.padding_side = 'right' for training)"
        )
    return lengths.to(torch.int64)


class LayerCapture:
    """Forward hooks that keep the outputs of chosen decoder layers (and the attention mask) of one forward.

    Args:
        model: a Llama-like transformers model (see :func:`decoder_layers`).
        layers: 0-based decoder-layer indices, negative from the end.

    ``outputs`` maps each hooked layer index to its last output (B, T, D); ``lengths`` is the (B,) int64 valid
    lengths of the last forward (None without a mask). ``clear()`` drops them; ``remove()`` unhooks (also on
    leaving a ``with`` block).
    """

    def __init__(self, model: nn.Module, layers: Sequence[int]) -> None:
        mods = decoder_layers(model)
        self.n_layers = len(mods)
        self.layers = resolve_layers(layers, self.n_layers)
        self.outputs: Dict[int, Tensor] = {}
        self.lengths: Optional[Tensor] = None
        self.cu_seqlens: Optional[Tensor] = None  # documents of a packed batch (position_ids, no mask)
        self._handles = [_base_model(model).register_forward_pre_hook(self._pre, with_kwargs=True)]
        self._handles += [mods[i].register_forward_hook(self._make_hook(i)) for i in self.layers]

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.outputs = {}
        # LlamaModel.forward(input_ids, attention_mask, ...): the mask is the 2nd positional or a keyword.
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.lengths = lengths_from_mask(mask)
        pos = kwargs.get("position_ids", args[2] if len(args) > 2 else None)
        self.cu_seqlens = None
        if mask is None and isinstance(pos, Tensor):
            self.cu_seqlens = varlen.cu_seqlens_from_position_ids(pos, torch.int64)

    def _make_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            # transformers 5.x decoder layers return the hidden states; older ones a tuple led by them.
            self.outputs[i] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def states(self) -> List[Optional[Tensor]]:
        """A list with one entry per decoder layer: the captured output, None for layers not hooked."""
        return [self.outputs.get(i) for i in range(self.n_layers)]

    def clear(self) -> None:
        self.outputs, self.lengths, self.cu_seqlens = {}, None, None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "LayerCapture":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class STPHooks(LayerCapture):
    """Applies ``stp`` to the decoder layers it names, through forward hooks; see the module docstring.

    Args:
        model: a Llama-like transformers model.
        stp: the policy (weight, n_spans, layers as decoder-layer indices, start_step). Its step counter advances
            once per training forward.
        generator: optional torch.Generator for the triple sampling.
        compute_in_eval: also form the term in eval mode / under no_grad (e.g. to monitor it); the counter does
            not move there.

    After each forward of ``model``: ``last_term`` = ``weight * stp`` (0-dim, in the graph; None when nothing was
    computed), ``last_value`` = the same, detached. ``pop_term()`` returns ``last_term`` and forgets it, so a
    forgotten pop cannot be added twice; it raises if the last forward produced no term. ``step`` (default None =
    ``stp``'s own counter of training forwards) overrides the step given to ``stp``, e.g. the optimizer step when
    gradients are accumulated.
    """

    def __init__(
        self,
        model: nn.Module,
        stp: STPLoss,
        *,
        generator: Optional[torch.Generator] = None,
        compute_in_eval: bool = False,
    ) -> None:
        if not isinstance(stp, STPLoss):
            raise TypeError(f"STPHooks: stp must be a trajops.nn.STPLoss, got {type(stp).__name__}")
        self.model, self.stp, self.generator, self.compute_in_eval = model, stp, generator, compute_in_eval
        self.last_term: Optional[Tensor] = None
        self.last_value: Optional[Tensor] = None
        self.step: Optional[int] = None  # set it to drive the start policy by optimizer steps (grad accumulation)
        super().__init__(model, stp.layers)
        # After the layers' hooks: a post-hook on the base model forms the term and drops the captured outputs.
        self._handles.append(_base_model(model).register_forward_hook(self._post))

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        training = self.model.training and torch.is_grad_enabled()
        self.last_term = self.last_value = None
        if training or self.compute_in_eval:
            states, lengths, cu = self.states(), self.lengths, self.cu_seqlens
            if cu is not None:  # packed documents: the (B, T, D) outputs read as one row
                states = [None if h is None else h.reshape(1, -1, h.shape[-1]) for h in states]
            # Outside training the counter must not move: pass the current step explicitly.
            step = self.step if training or self.step is not None else self.stp.step
            term = self.stp(states, step=step, lengths=lengths, generator=self.generator, cu_seqlens=cu)
            self.last_term, self.last_value = term, term.detach()
        self.clear()  # only the autograd graph keeps the layer outputs from here on

    def pop_term(self) -> Tensor:
        """The STP term of the last forward (in the graph), once."""
        term, self.last_term = self.last_term, None
        if term is None:
            raise RuntimeError(
                "STPHooks.pop_term: no STP term since the last pop (no forward in training mode with grad enabled, "
                "or already popped)"
            )
        return term


try:  # the Trainer is optional: STPHooks works with any training loop
    from transformers import Trainer as _Trainer
except ImportError:  # pragma: no cover - exercised only without transformers
    _Trainer = object  # type: ignore[assignment,misc]


class STPTrainer(_Trainer):  # type: ignore[misc,valid-type]
    """``transformers.Trainer`` whose loss is ``lm_loss + weight * stp`` from :class:`STPHooks`; ``lm_loss`` and
    ``stp`` (the weighted term) are logged apart, averaged over the steps since the last log.

    Args: ``stp_hooks`` (attached to the same model) plus every ``Trainer`` argument.

    The start policy follows ``state.global_step`` (optimizer steps). When the Trainer normalizes the LM loss over
    the whole accumulation (``num_items_in_batch``), the per-micro-batch term is divided by the accumulation steps
    so that ``weight`` means the same with or without gradient accumulation.
    """

    def __init__(self, *args: Any, stp_hooks: STPHooks, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stp_hooks = stp_hooks
        self._stp_sums: Dict[str, float] = {"lm_loss": 0.0, "stp": 0.0}
        self._stp_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.stp_hooks.step = self.state.global_step
        lm, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.stp_hooks.last_term is None or not model.training:  # eval / prediction step: the LM loss only
            return (lm, outputs) if return_outputs else lm
        term = self.stp_hooks.pop_term()
        scaled = getattr(self, "loss_is_scaled_for_ga", None)  # the same rule as Trainer.training_step
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        if scaled:  # training_step will not divide this loss by the accumulation steps: scale the STP part here
            term = term / self.current_gradient_accumulation_steps
        self._stp_sums["lm_loss"] += float(lm.detach())
        self._stp_sums["stp"] += float(term.detach())
        self._stp_count += 1
        loss = lm + term
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: Dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._stp_count and "loss" in logs:  # training logs only, not eval ones
            logs = dict(logs, **{k: v / self._stp_count for k, v in self._stp_sums.items()})
            self._stp_sums = dict.fromkeys(self._stp_sums, 0.0)
            self._stp_count = 0
        super().log(logs, *args, **kwargs)
