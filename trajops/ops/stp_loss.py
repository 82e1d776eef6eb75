"""trajops::stp_loss and trajops::stp_loss_dense — the STP trajectory-straightness loss.

This module registers the ops' fake impls, autograd formulas (the backwards are their own ops) and
kernels by device, and exposes the public functions ``sample_stp_triples``, ``stp_loss`` and
``stp_loss_dense``. The CPU C++ kernels live in csrc/cpu/stp_loss.cpp (sampled) and
csrc/cpu/stp_loss_dense.cpp, the Triton ones behind triton_kernels/stp_loss.py, the semantics in
trajops/reference/stp_loss.py.

The ops return per-triple losses plus small ``stats`` (norms and cosines per triple) that the
backward reuses, so that neither backward recomputes a reduction over D: the backward of the sampled
loss is then one pass over the touched rows, the dense backward one pass over h.

Packed sequences: every op takes ``cu_seqlens`` (N + 1,) with hidden (1, total, D), equivalent to
the padded batch of the N documents (the rule: :mod:`trajops.reference.stp_loss`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import reference, varlen
from .._library import register_kernels
from ..reference._common import compute_dtype as _acc_dtype
from ..reference.stp_loss import _sane_offsets
from .stp_loss_checks import (
    _check_dense,
    _check_dense_backward,
    _check_sampled,
    _check_sampled_backward,
    _check_values,
    _dense_shapes,
)

__all__ = ["sample_stp_triples", "stp_loss", "stp_loss_dense"]

_REDUCTIONS = ("mean", "sum", "none")
Hidden = Union[Tensor, Sequence[Tensor]]


# ---------------------------------------------------------------- fake (meta) impls
@torch.library.register_fake("trajops::stp_loss")
def _stp_fake(
    hidden: List[Tensor], triples: Tensor, lengths: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    B = _check_sampled(hidden, triples, lengths, cu_seqlens)
    L, S = len(hidden), triples.shape[0]
    acc = _acc_dtype(hidden[0].dtype)
    return hidden[0].new_empty((L, S, B), dtype=acc), hidden[0].new_empty((L, S, B, 3), dtype=acc)


@torch.library.register_fake("trajops::stp_loss_backward")
def _stp_backward_fake(grad_loss, stats, hidden, triples, lengths, cu_seqlens=None) -> List[Tensor]:
    _check_sampled_backward(grad_loss, stats, hidden, triples, lengths, cu_seqlens)
    return [h.new_empty(h.shape) for h in hidden]


@torch.library.register_fake("trajops::stp_loss_dense")
def _dense_fake(
    hidden: List[Tensor], lengths: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    _check_dense(hidden, lengths, cu_seqlens)
    loss_shape, stats_shape = _dense_shapes(hidden)
    acc = _acc_dtype(hidden[0].dtype)
    return hidden[0].new_empty(loss_shape, dtype=acc), hidden[0].new_empty(stats_shape, dtype=acc)


@torch.library.register_fake("trajops::stp_loss_dense_backward")
def _dense_backward_fake(grad_loss, stats, hidden, lengths, cu_seqlens=None) -> List[Tensor]:
    _check_dense_backward(grad_loss, stats, hidden, lengths, cu_seqlens)
    return [h.new_empty(h.shape) for h in hidden]


# ---------------------------------------------------------------- autograd
def _optional_args(rest: Sequence, n: int) -> List[Optional[Tensor]]:
    # The dispatcher drops trailing arguments equal to their schema default (None) before
    # autograd sees them: pad them back.
    return list(rest) + [None] * (n - len(rest))


def _stp_setup(ctx, inputs, output) -> None:
    hidden, triples, *rest = inputs
    lengths, cu_seqlens = _optional_args(rest, 2)
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(stats, triples, lengths, cu_seqlens, *hidden)


def _grads(ctx, grads):
    # Tensor[] ops must return exactly one gradient per argument passed.
    return (grads,) + (None,) * (len(ctx.needs_input_grad) - 1)


def _stp_backward(ctx, grad_loss: Tensor, _grad_stats):
    stats, triples, lengths, cu_seqlens, *hidden = ctx.saved_tensors
    if grad_loss is None or not any(ctx.needs_input_grad[0]):
        return _grads(ctx, None)
    grads = torch.ops.trajops.stp_loss_backward(grad_loss.contiguous(), stats, hidden, triples, lengths, cu_seqlens)
    return _grads(ctx, list(grads))


def _dense_setup(ctx, inputs, output) -> None:
    hidden, *rest = inputs
    lengths, cu_seqlens = _optional_args(rest, 2)
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(stats, lengths, cu_seqlens, *hidden)


def _dense_backward(ctx, grad_loss: Tensor, _grad_stats):
    stats, lengths, cu_seqlens, *hidden = ctx.saved_tensors
    if grad_loss is None or not any(ctx.needs_input_grad[0]):
        return _grads(ctx, None)
    grads = torch.ops.trajops.stp_loss_dense_backward(grad_loss.contiguous(), stats, hidden, lengths, cu_seqlens)
    return _grads(ctx, list(grads))


torch.library.register_autograd("trajops::stp_loss", _stp_backward, setup_context=_stp_setup)
torch.library.register_autograd("trajops::stp_loss_dense", _dense_backward, setup_context=_dense_setup)


# ---------------------------------------------------------------- kernels
def _reference_stp(hidden, triples, lengths=None, cu_seqlens=None):
    _check_sampled(hidden, triples, lengths, cu_seqlens)
    _check_values("stp_loss", hidden[0].shape[1], triples, lengths, cu_seqlens)
    return tuple(t.contiguous() for t in reference.stp_loss(hidden, triples, lengths, cu_seqlens))


def _reference_stp_backward(grad_loss, stats, hidden, triples, lengths, cu_seqlens=None):
    _check_sampled_backward(grad_loss, stats, hidden, triples, lengths, cu_seqlens)
    _check_values("stp_loss_backward", hidden[0].shape[1], triples, lengths, cu_seqlens)
    return reference.stp_loss_backward(grad_loss, stats, hidden, triples, lengths, cu_seqlens)


def _reference_dense(hidden, lengths=None, cu_seqlens=None):
    _check_dense(hidden, lengths, cu_seqlens)
    _check_values("stp_loss_dense", hidden[0].shape[1], None, lengths)
    return tuple(t.contiguous() for t in reference.stp_loss_dense(hidden, lengths, cu_seqlens))


def _reference_dense_backward(grad_loss, stats, hidden, lengths, cu_seqlens=None):
    _check_dense_backward(grad_loss, stats, hidden, lengths, cu_seqlens)
    _check_values("stp_loss_dense_backward", hidden[0].shape[1], None, lengths)
    return reference.stp_loss_dense_backward(grad_loss, stats, hidden, lengths, cu_seqlens)


def _contig(ts: Sequence[Tensor]) -> List[Tensor]:
    return [t.contiguous() for t in ts]


def _opt_contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _host_checks(op: str, hidden, triples, lengths, cu_seqlens=None) -> None:
    # Value checks are free on CPU tensors (the Triton interpreter); on CUDA the kernels flag bad
    # indices with NaN losses instead of paying a host sync.
    if hidden[0].device.type == "cpu":
        _check_values(op, hidden[0].shape[1], triples, lengths, cu_seqlens)


def _packed_rows(cu_seqlens: Optional[Tensor], total: int, lengths: Optional[Tensor]):
    """(lengths, row_base) for the sampled Triton kernels: per document its length and first
    token, from offsets clamped into [0, total]; all lengths -1 (NaN outputs) when the offsets are
    invalid. Vectorized: no host sync on CUDA."""
    if cu_seqlens is None:
        return lengths, None
    c, bad = _sane_offsets(cu_seqlens, total)
    lens = torch.where(bad, torch.full_like(c[1:], -1), c[1:] - c[:-1])
    return lens.contiguous(), c[:-1].contiguous()


def _packed_ends(cu_seqlens: Optional[Tensor], total: int, lengths: Optional[Tensor]):
    """(lengths, ends) for the dense Triton kernels: the one packed row's length (-1 when the
    offsets are invalid) and each position's document end."""
    if cu_seqlens is None:
        return lengths, None
    c, bad = _sane_offsets(cu_seqlens, total)
    lens = torch.where(bad, -1, total).reshape(1).to(torch.int64)
    return lens, c[1:][varlen.document_ids(c, total)].contiguous()


def _triton_stp(hidden, triples, lengths=None, cu_seqlens=None):
    _check_sampled(hidden, triples, lengths, cu_seqlens)
    _host_checks("stp_loss", hidden, triples, lengths, cu_seqlens)
    from ..triton_kernels import stp_loss as kernels

    lens, base = _packed_rows(cu_seqlens, hidden[0].shape[1], _opt_contig(lengths))
    return kernels.stp_fwd(_contig(hidden), triples.contiguous(), lens, base)


def _triton_stp_backward(grad_loss, stats, hidden, triples, lengths, cu_seqlens=None):
    _check_sampled_backward(grad_loss, stats, hidden, triples, lengths, cu_seqlens)
    _host_checks("stp_loss_backward", hidden, triples, lengths, cu_seqlens)
    from ..triton_kernels import stp_loss as kernels

    lens, base = _packed_rows(cu_seqlens, hidden[0].shape[1], _opt_contig(lengths))
    return kernels.stp_bwd(grad_loss.contiguous(), stats.contiguous(), _contig(hidden), triples.contiguous(), lens, base)


def _triton_dense(hidden, lengths=None, cu_seqlens=None):
    _check_dense(hidden, lengths, cu_seqlens)
    _host_checks("stp_loss_dense", hidden, None, lengths)
    from ..triton_kernels import stp_loss as kernels

    lens, ends = _packed_ends(cu_seqlens, hidden[0].shape[1], _opt_contig(lengths))
    return kernels.stp_dense_fwd(_contig(hidden), lens, ends)


def _triton_dense_backward(grad_loss, stats, hidden, lengths, cu_seqlens=None):
    _check_dense_backward(grad_loss, stats, hidden, lengths, cu_seqlens)
    _host_checks("stp_loss_dense_backward", hidden, None, lengths)
    from ..triton_kernels import stp_loss as kernels

    lens, ends = _packed_ends(cu_seqlens, hidden[0].shape[1], _opt_contig(lengths))
    return kernels.stp_dense_bwd(grad_loss.contiguous(), stats.contiguous(), _contig(hidden), lens, ends)


register_kernels("stp_loss", _reference_stp, _triton_stp)
register_kernels("stp_loss_backward", _reference_stp_backward, _triton_stp_backward)
register_kernels("stp_loss_dense", _reference_dense, _triton_dense)
register_kernels("stp_loss_dense_backward", _reference_dense_backward, _triton_dense_backward)


# ---------------------------------------------------------------- public functions
def sample_stp_triples(
    batch: int,
    seq_len: int,
    n_spans: int,
    *,
    lengths: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[torch.device, str]] = None,
    cu_seqlens: Optional[Tensor] = None,
) -> Tensor:
    """Samples ordered position triples s < r < t for the STP loss, vectorized, without a host sync.

    Without ``lengths`` this is the seed's sampler: per span and row, 3 integers drawn uniformly
    from [0, T-2), sorted, plus (0, 1, 2), clamped to T-1 (one ``torch.randint`` call of shape
    (n_spans, batch, 3): on CPU it draws the same numbers as the seed's per-span loop). With
    ``lengths`` (B,), row b's draws come from [0, lengths[b]-2) instead, so its triples stay inside
    its valid prefix.

    Rows shorter than 3 tokens (all rows when seq_len < 3) get placeholder triples inside [0, T-1]
    that the losses ignore: such rows contribute nothing and are excluded from the mean.

    Packed sequences: with ``cu_seqlens`` (N + 1,) (``batch`` = N documents, ``seq_len`` = total
    packed tokens), document j is row j with length ``cu_seqlens[j+1] - cu_seqlens[j]``: the
    triples (n_spans, N, 3) are document-local positions, and the same generator draws exactly what
    ``sample_stp_triples(N, max_len, n_spans, lengths=document_lengths)`` draws for every document
    of >= 3 tokens (the placeholders of shorter ones may differ: they are clamped to total - 1,
    not max_len - 1, which would need a host sync).

    Args:
        batch: B >= 0.
        seq_len: T >= 0.
        n_spans: triples per row, >= 1.
        lengths: optional (B,) integer tensor (or list), values in [0, T].
        generator: optional torch.Generator on ``device`` (for reproducible draws).
        device: where to sample; defaults to lengths' (or cu_seqlens') device, else the
            generator's, else CPU.
        cu_seqlens: optional (N + 1,) int32/int64 document offsets of a packed batch (not with
            ``lengths``); see :mod:`trajops.varlen`.

    Returns:
        int64 tensor (n_spans, batch, 3).
    """
    if isinstance(n_spans, bool) or not isinstance(n_spans, int) or n_spans < 1:
        raise ValueError(f"sample_stp_triples: n_spans must be an int >= 1, got {n_spans!r}")
    if batch < 0 or seq_len < 0:
        raise ValueError(f"sample_stp_triples: batch and seq_len must be >= 0, got {batch} and {seq_len}")
    if cu_seqlens is not None:
        lengths = _packed_lengths("sample_stp_triples", cu_seqlens, batch, seq_len, lengths)
    if device is None:
        if isinstance(lengths, Tensor):
            device = lengths.device
        else:
            device = generator.device if generator is not None else "cpu"
    device = torch.device(device)
    shape = (n_spans, batch, 3)
    offsets = torch.arange(3, device=device)
    if lengths is None:
        if seq_len >= 3:
            base = torch.randint(0, seq_len - 2, shape, generator=generator, device=device)
        else:
            base = torch.zeros(shape, dtype=torch.int64, device=device)
    else:
        lengths = torch.as_tensor(lengths, device=device)
        if lengths.shape != (batch,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise ValueError(
                f"sample_stp_triples: lengths must be an integer tensor of shape (batch,) = ({batch},), "
                f"got {lengths.dtype} of shape {list(lengths.shape)}"
            )
        high = (lengths.to(torch.int64).clamp(0, seq_len) - 2).clamp_min(1)
        # One uniform int64 draw reduced modulo each row's range: per-row bounds without a loop
        # (the modulo bias is below 2**-31 for any realistic length).
        base = torch.randint(0, 2**62, shape, generator=generator, device=device) % high[None, :, None]
    triples = base.sort(dim=-1).values + offsets
    return triples.clamp_(max=max(seq_len - 1, 0))


def _packed_lengths(op: str, cu_seqlens, batch: int, total: int, lengths) -> Tensor:
    """(N,) int64 document lengths of cu_seqlens for the sampler (no host sync; the offsets'
    values are checked here only on CPU outside compiled code, and by the ops)."""
    if lengths is not None:
        raise ValueError(f"{op}: pass either lengths or cu_seqlens, not both")
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{op}: cu_seqlens must be a tensor, got {type(cu_seqlens).__name__}")
    if not torch.compiler.is_compiling():
        varlen.check_cu_seqlens(op, cu_seqlens, total, cu_seqlens.device)
    elif cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{op}: cu_seqlens must be a (N + 1,) int32 or int64 tensor")
    if cu_seqlens.shape[0] - 1 != batch:
        raise ValueError(
            f"{op}: batch must be the number of packed documents len(cu_seqlens) - 1 = "
            f"{cu_seqlens.shape[0] - 1}, got {batch}"
        )
    c, _ = _sane_offsets(cu_seqlens, total)
    return c[1:] - c[:-1]


def _as_layers(op: str, hidden: Hidden, packed: bool = False) -> List[Tensor]:
    if isinstance(hidden, Tensor):
        hidden = [hidden]
    if not isinstance(hidden, (list, tuple)) or not all(isinstance(h, Tensor) for h in hidden):
        raise TypeError(f"{op}: hidden must be a (B, T, D) tensor or a list of them, got {type(hidden).__name__}")
    if len(hidden) == 0:
        raise ValueError(f"{op}: hidden must hold at least one (B, T, D) tensor, got none")
    if packed and hidden[0].dim() == 2:  # (total, D): the one packed row
        hidden = [h.unsqueeze(0) if h.dim() == 2 else h for h in hidden]
    # Plain raises (not torch._check): this runs under dynamo; the ops check everything else.
    if hidden[0].dim() != 3:
        raise ValueError(f"{op}: hidden[0] must have shape (B, T, D), got shape {list(hidden[0].shape)}")
    return list(hidden)


def _as_lengths(op: str, lengths, h0: Tensor) -> Optional[Tensor]:
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths, device=h0.device)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{op}: lengths must be an integer tensor, got {lengths.dtype}")
    return lengths.to(torch.int64)


def _reduce(losses: Tensor, count: Tensor, n_layers: int, reduction: str) -> Tensor:
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    # Every layer has the same valid triples: the mean over layers of per-layer means is one division.
    return total / (count.clamp_min(1) * n_layers).to(total.dtype)


def _prepare(
    op: str, hidden: Hidden, lengths, reduction: str, cu_seqlens: Optional[Tensor] = None
) -> Tuple[List[Tensor], Optional[Tensor]]:
    """The public functions' argument handling: (layers, int64 lengths or None)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if cu_seqlens is not None and lengths is not None:
        raise ValueError(f"{op}: pass either lengths or cu_seqlens, not both")
    layers = _as_layers(op, hidden, packed=cu_seqlens is not None)
    return layers, _as_lengths(op, lengths, layers[0])


def stp_loss(
    hidden: Hidden,
    n_spans: int = 4,
    *,
    triples: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    reduction: str = "mean",
    cu_seqlens: Optional[Tensor] = None,
) -> Tensor:
    """STP trajectory-straightness loss on sampled triples: mean of 1 - cos(h[t] - h[r], h[r] - h[s]).

    Penalizes the curvature of hidden-state trajectories (seed 003; arXiv 2602.22617). For every
    layer, span i and row b with its triple (s, r, t)::

        loss[l, i, b] = 1 - cosine_similarity(h_l[b, t] - h_l[b, r], h_l[b, r] - h_l[b, s], eps=1e-8)

    One kernel launch computes every layer and span; the backward writes gradient only into the
    touched rows and accumulates repeated positions deterministically.

    Args:
        hidden: (B, T, D) tensor, or a list/tuple of L such tensors (layers; one shape, dtype and
            device; never stacked). float32, float64, float16 or bfloat16.
        n_spans: triples sampled per row (>= 1); ignored when ``triples`` is given.
        triples: optional int64 (n_spans, B, 3) positions with 0 <= s < r < t < length for rows of
            length >= 3 (e.g. from :func:`sample_stp_triples`); every layer uses the same triples.
            On CPU an invalid triple raises ValueError; on CUDA (no host sync) it gives a NaN loss.
        lengths: optional (B,) integer valid lengths (padding at the end). Rows shorter than 3
            contribute nothing and are excluded from the mean.
        generator: optional torch.Generator for the sampling.
        reduction: "mean" (mean over layers of the mean over spans and active rows; 0 when no row
            is active), "sum", or "none" -> (L, n_spans, B) with zeros for inactive rows (L = 1
            for a single tensor).
        cu_seqlens: optional (N + 1,) int32/int64 offsets of a packed batch (FlashAttention's
            varlen convention, :mod:`trajops.varlen`); hidden is then (1, total, D) or
            (total, D). Equivalent to the padded batch (N, max_len, D) of the documents with
            ``lengths`` = their lengths: triples (n_spans, N, 3) are document-local, documents
            shorter than 3 tokens are inactive, every reduction (and "none": (L, n_spans, N))
            equals the padded call's, and the gradient is the padded one on the packed rows.
            Not with ``lengths``; hidden with B > 1 raises ValueError.

    Returns:
        The loss, float32 (float64 for float64 inputs), in [0, 2] up to rounding (a straight line
        can give -1e-7 in fp32).

    Same as ``torch.ops.trajops.stp_loss(hidden, triples, lengths)[0]`` plus the sampling and the
    reduction (the op's second output holds per-triple norms and cosines reused by its backward).

    No intermediate overflows: steps of any finite size give the right loss (a straight line of
    1e20-sized fp32 steps has loss 0). NaN / Inf: only the rows a valid triple reads matter
    (padding and inactive rows never do); a triple that reads a NaN or Inf has a NaN loss and NaN
    gradient rows, on every backend (full rule: :mod:`trajops.reference.stp_loss`).
    """
    layers, lens = _prepare("stp_loss", hidden, lengths, reduction, cu_seqlens)
    h0 = layers[0]
    B, T, _ = h0.shape
    if cu_seqlens is not None:
        if h0.shape[0] != 1:
            raise ValueError(
                f"stp_loss: with cu_seqlens, hidden must be one packed row (1, total, D), got batch size {B}"
            )
        B = cu_seqlens.shape[0] - 1  # the rows are the documents
    if triples is None:
        triples = sample_stp_triples(
            B, T, n_spans, lengths=lens, generator=generator, device=h0.device, cu_seqlens=cu_seqlens
        )
    losses, _ = torch.ops.trajops.stp_loss(layers, triples, lens, cu_seqlens)
    count = reference.stp_active_rows(B, T, lens, h0.device, cu_seqlens).sum() * triples.shape[0]
    return _reduce(losses, count, len(layers), reduction)


def stp_loss_dense(
    hidden: Hidden,
    *,
    lengths: Optional[Tensor] = None,
    reduction: str = "mean",
    cu_seqlens: Optional[Tensor] = None,
) -> Tensor:
    """Dense local-curvature STP loss: every consecutive triple (p, p+1, p+2) of every row.

    loss[l, b, p] = 1 - cosine_similarity(d[p+1], d[p], eps=1e-8) with steps d[q] = h_l[b, q+1] - h_l[b, q],
    for p + 2 < lengths[b]. Forward and backward are each one pass over h.

    Args:
        hidden: (B, T, D) tensor or a list/tuple of L such tensors (see :func:`stp_loss`).
        lengths: optional (B,) integer valid lengths; triples reaching past them are excluded.
        reduction: "mean" (mean over layers of the mean over valid triples; 0 if there are none),
            "sum", or "none" -> (L, B, max(T-2, 0)) with zeros for excluded triples.
        cu_seqlens: optional (N + 1,) offsets of a packed batch, hidden (1, total, D) or
            (total, D) (see :func:`stp_loss`): triple (p, p+1, p+2) of packed positions counts iff
            all three lie in one document. "mean" and "sum" equal the padded batch's; "none" keeps
            the packed layout (L, 1, max(total-2, 0)), entry p the triple starting at packed p.

    Returns:
        The loss, float32 (float64 for float64 inputs).

    NaN / Inf and overflow as :func:`stp_loss`: positions past ``lengths`` are never read; a triple
    whose steps hold a NaN or Inf has a NaN loss and NaN gradient rows.
    """
    layers, lens = _prepare("stp_loss_dense", hidden, lengths, reduction, cu_seqlens)
    h0 = layers[0]
    B, T, _ = h0.shape
    losses, _ = torch.ops.trajops.stp_loss_dense(layers, lens, cu_seqlens)
    count = reference.stp_dense_valid(B, T, lens, h0.device, cu_seqlens).sum()
    return _reduce(losses, count, len(layers), reduction)
