"""stp_inject — a forward-neutral, backward-injecting seam for the STP loss (seed 003, issue 18).

A pipeline stage (or any code that cannot return a second loss) applies STP to its own hidden states
with ``h = stp_inject(h, weight)``: the forward returns ``h`` unchanged, the backward adds
``d(weight * scale * stp_loss(h)) / dh`` to the gradient arriving at ``h``. The auxiliary gradient
thus rides the main backward stream across the stage boundary instead of being dropped.

How: the STP loss is computed with the public, differentiable :func:`trajops.stp_loss` (same
sampling, same mean over spans and active rows, same op and backward op), and a tiny
``autograd.Function`` takes (hidden, loss) and returns hidden. Its backward hands the arriving
gradient to ``hidden`` untouched and a constant ``weight * scale`` to ``loss``; autograd then runs
the STP loss's own backward and sums both contributions into ``hidden``'s gradient. Nothing of the
mean/count logic is restated here, and ``torch.compile(fullgraph=True)`` traces it (dynamo inlines
autograd.Functions; the STP ops have fake impls).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .stp_loss import _as_lengths, sample_stp_triples, stp_loss

__all__ = ["stp_inject"]


class _AttachLossGrad(torch.autograd.Function):
    """Identity on ``hidden``; in the backward, the constant gradient ``coef`` for the scalar ``loss``."""

    @staticmethod
    def forward(ctx, hidden: Tensor, loss: Tensor, coef: float) -> Tensor:
        ctx.coef = coef
        ctx.loss_dtype = loss.dtype
        # Returned as is: autograd makes the output a view of ``hidden`` (an alias: the seam costs
        # no copy and no memory in the forward, which is what a stage boundary wants).
        return hidden

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # The loss is float32 (float64) even when hidden is bf16: its gradient has the loss's dtype.
        return grad_out, torch.full((), ctx.coef, dtype=ctx.loss_dtype, device=grad_out.device), None


def nonnegative_number(where: str, name: str, value) -> float:
    """``value`` as a float if it is a real number, finite and >= 0 (an STP weight or scale), else a named error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        # A negative weight would reward curvature; NaN/Inf would poison every gradient.
        raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    return value


def stp_inject(
    hidden: Tensor,
    weight: float,
    *,
    n_spans: int = 4,
    triples: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
    return_loss: bool = False,
    cu_seqlens: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Optional[Tensor]]]:
    """Identity in the forward; adds the gradient of ``weight * scale * stp_loss(hidden)`` in the backward.

    ``out = stp_inject(h, w)`` equals ``h`` (``out`` is a view of ``h``: no copy); for any
    downstream loss ``f``, ``d f(out) / dh = df/dout + w * scale * d stp_loss(h) / dh`` with the
    same triples as the forward. Use it where the STP loss has nowhere to go, e.g. on the hidden
    states a pipeline stage sends to the next one (no second loss output is needed).

    Args:
        hidden: (B, T, D) float32, float64, float16 or bfloat16. One tensor: for several layers
            inside one stage, call ``stp_inject`` on each with ``weight / L`` (exactly the mean
            over layers that ``stp_loss`` of a list computes, since every layer has the same triples).
        weight: STP coefficient, finite and >= 0 (seed default 0.02). 0 leaves the gradient
            untouched (the loss gets no gradient at all, so even a NaN in ``hidden`` stays out).
        n_spans: triples sampled per row (>= 1); ignored when ``triples`` is given.
        triples: optional int64 (n_spans, B, 3), as in :func:`trajops.stp_loss`.
        lengths: optional (B,) integer valid lengths; rows shorter than 3 contribute nothing (when
            no row is active the injected gradient is exactly 0).
        scale: extra finite factor >= 0 on the injected gradient, to match how the caller
            accumulates gradients. Under ``torch.distributed.pipelining`` (torch 2.13) the schedules
            run one backward per microbatch and, with ``scale_grads=True`` (the default), divide the
            stage's parameter gradients by the number of microbatches M at the end: the injected
            gradient is divided too, so ``scale=1`` trains ``mean_m(main_m + weight * stp_m)``, the
            single-process loss when the main loss is a per-microbatch mean. With
            ``scale_grads=False`` (a loss_fn that returns per-microbatch sums, nothing is divided)
            use ``scale=1/M`` to keep STP a mean. The same holds for plain gradient accumulation:
            ``scale`` is whatever factor the main loss of each micro-step is multiplied by.
            (Equal to the full-batch STP mean only when every microbatch has as many active rows.)
        generator: optional torch.Generator for the sampling. Activation checkpointing
            (``torch.utils.checkpoint``) re-runs the forward and restores only the default
            generators, so with the default generator the recomputation samples the same triples;
            with your own generator, sample the triples outside the checkpointed region
            (:func:`trajops.sample_stp_triples`) and pass ``triples=``, otherwise the backward
            uses other triples than the forward. ``torch.compile(fullgraph=True)`` traces the
            default-generator path (its random stream differs from eager's) and explicit triples.
        return_loss: also return the (unweighted) STP loss value, detached, for logging (a 0-d
            float32 tensor, float64 for float64 input; no host sync).
        cu_seqlens: optional (N + 1,) document offsets of a packed batch: hidden is then
            (1, total, D) or (total, D) and the loss is :func:`trajops.stp_loss`'s packed one
            (triples (n_spans, N, 3) inside documents). Not with ``lengths``.

    Returns:
        ``out`` (B, T, D), or ``(out, loss)`` with ``return_loss=True`` (``loss`` is None when
        ``weight == 0``: nothing is computed then).

    The injected term does not scale with the incoming gradient (it is the gradient of another
    loss), so ``torch.autograd.gradcheck``'s "backward multiplied by grad_output" check does not
    apply; the tests compare it with finite differences of ``main + weight * scale * STP`` instead.

    ``out`` is an alias made by a custom autograd Function: modifying it in place raises
    PyTorch's "view ... created inside a custom Function" error; ``.clone()`` it first if you must.
    """
    if not isinstance(hidden, Tensor):
        raise TypeError(f"stp_inject: hidden must be a (B, T, D) tensor, got {type(hidden).__name__}")
    if hidden.dim() != 3 and not (cu_seqlens is not None and hidden.dim() == 2):
        raise ValueError(f"stp_inject: hidden must have shape (B, T, D), got shape {list(hidden.shape)}")
    if cu_seqlens is not None and lengths is not None:
        raise ValueError("stp_inject: pass either lengths or cu_seqlens, not both")
    weight = nonnegative_number("stp_inject", "weight", weight)
    scale = nonnegative_number("stp_inject", "scale", scale)
    if isinstance(n_spans, bool) or not isinstance(n_spans, int) or n_spans < 1:
        raise ValueError(f"stp_inject: n_spans must be an int >= 1, got {n_spans!r}")
    coef = weight * scale
    if not math.isfinite(coef):
        raise ValueError(f"stp_inject: weight * scale must be finite, got {weight!r} * {scale!r}")
    if coef == 0:
        # Nothing to inject: skip the loss (and its sampling) entirely. ``hidden`` itself is
        # returned, not a view: there is no backward to attach.
        return (hidden, None) if return_loss else hidden
    lens = _as_lengths("stp_inject", lengths, hidden)
    if cu_seqlens is not None:
        # stp_loss samples per document (and checks the packed layout).
        loss = stp_loss(hidden, n_spans, triples=triples, generator=generator, cu_seqlens=cu_seqlens)
        out = _AttachLossGrad.apply(hidden, loss, coef)
        return (out, loss.detach()) if return_loss else out
    if triples is None:
        B, T, _ = hidden.shape
        triples = sample_stp_triples(B, T, n_spans, lengths=lens, generator=generator, device=hidden.device)
    loss = stp_loss(hidden, triples=triples, lengths=lens)
    out = _AttachLossGrad.apply(hidden, loss, coef)
    return (out, loss.detach()) if return_loss else out
