"""Reference of the STP (trajectory-straightness) loss: 1 - cos(h[t] - h[r], h[r] - h[s]).

For a triple s < r < t of positions of one sequence, with a = h[r] - h[s] and b = h[t] - h[r]:

    loss = 1 - cos(b, a),   cos(b, a) = a.b / (max(|a|, eps) * max(|b|, eps)),   eps = 1e-8

as ``torch.nn.functional.cosine_similarity(b, a, dim=-1, eps=1e-8)`` computes it, including its
gradient when a norm is below eps (the clamped norm divides, the unclamped norm is differentiated),
except that no intermediate overflows: the norms are taken of the steps divided by a power of two
near their largest component (exact, so every value that does not overflow is bit for bit
cosine_similarity's), and cos = sum((a / Na) (b / Nb)) never squares a raw component. A straight
line of steps of size 1e20 in fp32 has loss 0 (cosine_similarity itself gives 1 there: its |a|^2
overflows to inf for any step above ~1.8e19).

Row validity: with lengths (B,) (default: all T), row b is *active* iff lengths[b] >= 3. Triples of
inactive rows are ignored: their loss, stats and gradient are 0. A dense triple (p, p+1, p+2) is
valid iff p + 2 < lengths[b].

Packed sequences (cu_seqlens (N + 1,), hidden (1, total, D); see :mod:`trajops.varlen`): the packed
batch is the padded batch (N, max_len, D) whose row j is document j with lengths = the document
lengths. The sampled loss takes triples (S, N, 3) of document-local positions (s < r < t <
len_j; documents shorter than 3 are inactive) and returns loss (L, S, N) and stats (L, S, N, 3),
exactly the padded batch's; its gradient is the padded one scattered back to the packed rows.
The dense loss keeps the packed layout: loss (L, 1, total - 2) and stats (L, 1, total - 1, 2),
triple (p, p+1, p+2) valid iff all three lie in one document, a step (q, q+1) kept (its norm in
the stats) iff both lie in one document; the valid entries are the padded batch's, moved. On a
device where the offsets are not checked (CUDA), invalid offsets make every loss and stat NaN.

NaN/Inf rule (every backend, forward and backward, the same NaN positions): only what a valid
triple reads matters. Rows of inactive sequences, positions at or past a row's length and, for the
sampled loss, positions no triple names are never read: NaN/Inf there changes nothing. A valid
triple whose rows hold a NaN or an Inf (or whose step overflows the dtype) has a NaN loss and a NaN
cosine in its stats, and its three gradient rows (a dense triple: the rows of its two steps) are NaN
in every component, whatever grad_loss is, 0 included. A NaN or +-Inf grad_loss of a valid triple
also makes its gradient rows NaN: Inf times a term that rounds to 0 on one backend and not on
another would make an Inf/NaN pattern depend on the backend. grad_loss of an excluded triple is
never read. Finite hidden states never overflow (see above), so the loss is NaN only where an input
it reads is not finite.

Every function takes a list of layers (L tensors of one shape (B, T, D)) and computes in fp32 (fp64
for fp64 inputs). ``stats`` are what the backward needs from the forward, per triple: for sampled
triples (L, S, B, 3) = (|a|, |b|, cos); for the dense loss (L, B, T-1, 2) = (|d_q|, cos_q) per step
d_q = h[q+1] - h[q], cos_q = cos(d_{q+1}, d_q) the cosine of triple q (the last cos, and everything
beyond a row's length, is 0). The cosine, not the dot a.b, because a.b overflows long before the
loss does.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import varlen
from ._common import compute_dtype

__all__ = [
    "STP_EPS",
    "stp_active_rows",
    "stp_dense_valid",
    "stp_loss",
    "stp_loss_backward",
    "stp_loss_dense",
    "stp_loss_dense_backward",
]

STP_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default


def _sane_offsets(cu_seqlens: Tensor, total: int) -> Tuple[Tensor, Tensor]:
    """(int64 offsets made valid for ``total``, 0-d bool: the given ones were invalid).

    The identity on valid offsets; otherwise clamped into [0, total], made non-decreasing and
    closed at total, so that no index leaves the tensor (the flag then NaNs the outputs). No sync.
    """
    bad = varlen.cu_seqlens_invalid(cu_seqlens, total)
    c = torch.cummax(cu_seqlens.to(torch.int64).clamp(0, total), 0).values
    c = torch.cat([c[:1] * 0, c[1:-1], c.new_full((1,), total)]) if c.shape[0] > 1 else c * 0
    return c, bad


def _packed_lengths(cu_seqlens: Tensor, total: int) -> Tensor:
    """(N,) int64 document lengths of valid-made offsets (see :func:`_sane_offsets`)."""
    c, _ = _sane_offsets(cu_seqlens, total)
    return c[1:] - c[:-1]


def _document_ends(cu_seqlens: Tensor, total: int) -> Tensor:
    """(total,) int64: the end (exclusive) of each packed position's document."""
    c, _ = _sane_offsets(cu_seqlens, total)
    return c[1:][varlen.document_ids(c, total)]


def stp_active_rows(
    B: int, T: int, lengths: Optional[Tensor], device: torch.device, cu_seqlens: Optional[Tensor] = None
) -> Tensor:
    """(B,) bool: rows with at least 3 valid tokens ((N,): documents of >= 3 tokens when packed)."""
    if cu_seqlens is not None:
        return _packed_lengths(cu_seqlens, T) >= 3
    if lengths is None:
        return torch.full((B,), T >= 3, dtype=torch.bool, device=device)
    return lengths >= 3


def stp_dense_valid(
    B: int, T: int, lengths: Optional[Tensor], device: torch.device, cu_seqlens: Optional[Tensor] = None
) -> Tensor:
    """(B, max(T-2, 0)) bool: dense triples (p, p+1, p+2) inside their row's length (packed, B = 1:
    inside one document)."""
    return _dense_masks(B, T, lengths, device, cu_seqlens)[0]


def _dense_masks(
    B: int, T: int, lengths: Optional[Tensor], device: torch.device, cu_seqlens: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """(valid triples (B, max(T-2, 0)), kept steps (B, max(T-1, 0))) bool."""
    p = torch.arange(max(T - 2, 0), device=device)
    q = torch.arange(max(T - 1, 0), device=device)
    if cu_seqlens is not None:
        ends = _document_ends(cu_seqlens, T)
        return (p + 2 < ends[p]).expand(B, -1), (q + 1 < ends[q]).expand(B, -1)
    if lengths is None:
        return (p + 2 < T).expand(B, -1), (q + 1 < T).expand(B, -1)
    return p.unsqueeze(0) + 2 < lengths.unsqueeze(1), q.unsqueeze(0) + 1 < lengths.unsqueeze(1)


def _flag_nan(t: Tensor, bad: Optional[Tensor]) -> Tensor:
    return t if bad is None else torch.where(bad, torch.full_like(t, float("nan")), t)


def _sampled_rows(
    B: int, T: int, lengths: Optional[Tensor], cu_seqlens: Optional[Tensor], device: torch.device
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(first flat token of each row (R,), active rows (R,), invalid-offsets flag or None): R = B
    rows of T tokens, or the N packed documents."""
    if cu_seqlens is None:
        return torch.arange(B, device=device) * T, stp_active_rows(B, T, lengths, device), None
    c, bad = _sane_offsets(cu_seqlens, T)
    return c[:-1], (c[1:] - c[:-1]) >= 3, bad


class _ClampEps(torch.autograd.Function):
    """max(n, eps) whose gradient passes to n unchanged, as cosine_similarity's in-place clamp."""

    @staticmethod
    def forward(ctx, n: Tensor) -> Tensor:
        return n.clamp_min(STP_EPS)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def _norm(v: Tensor) -> Tensor:
    """|v| over the last dim without overflow or underflow of the squares.

    v is divided by a power of two s = 2^(e-1) with max|v| = m 2^e, m in [0.5, 1) (exact), so the
    squares stay in [0, 4); s is 1 for a zero, NaN or infinite max (the result is then exact or
    non-finite anyway). s carries no gradient: the scaling cancels exactly.
    """
    if v.shape[-1] == 0:
        return torch.linalg.vector_norm(v, dim=-1)
    m = v.detach().abs().amax(-1, keepdim=True)
    s = torch.ldexp(torch.ones_like(m), torch.frexp(m).exponent - 1)
    s = torch.where(torch.isfinite(m) & (m > 0), s, torch.ones_like(m))
    return torch.linalg.vector_norm(v / s, dim=-1) * s.squeeze(-1)


def _cosine(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(|a|, |b|, cos(b, a)) over the last dim, cosine_similarity's formula without its overflow."""
    na, nb = _norm(a), _norm(b)
    cos = ((a / _ClampEps.apply(na).unsqueeze(-1)) * (b / _ClampEps.apply(nb).unsqueeze(-1))).sum(-1)
    return na, nb, cos


def _cos_grads(
    a: Tensor, b: Tensor, na: Tensor, nb: Tensor, cos: Tensor, w: Tensor, mask: Tensor
) -> Tuple[Tensor, Tensor]:
    """w * d cos(b, a) / da and w * d cos(b, a) / db, with cosine_similarity's eps semantics.

    Zero where ``mask`` is False, even if a or b hold NaN there (padding is never read into a gradient).
    Every factor is formed so that none overflows or underflows where the gradient does not.
    """
    # A non-finite weight gives NaN rows: inf * (a term that may round to 0 or not) would make
    # the Inf/NaN pattern depend on each backend's rounding.
    w = torch.where(torch.isfinite(w), w, torch.full_like(w, float("nan")))
    Na, Nb = na.clamp_min(STP_EPS), nb.clamp_min(STP_EPS)
    # cos / |a| (bounded by 1 / Na, unlike 1 / |a| of a subnormal norm); 0 at a = 0, where the
    # norm's own gradient a / |a| is 0 (as linalg.vector_norm's backward).
    ca = torch.where(na > 0, cos / torch.where(na > 0, na, torch.ones_like(na)), torch.zeros_like(na))
    cb = torch.where(nb > 0, cos / torch.where(nb > 0, nb, torch.ones_like(nb)), torch.zeros_like(nb))
    wa, wb = (w / Na).unsqueeze(-1), (w / Nb).unsqueeze(-1)
    ga = wa * (b / Nb.unsqueeze(-1) - ca.unsqueeze(-1) * a)
    gb = wb * (a / Na.unsqueeze(-1) - cb.unsqueeze(-1) * b)
    m = mask.unsqueeze(-1)
    return torch.where(m, ga, torch.zeros_like(ga)), torch.where(m, gb, torch.zeros_like(gb))


def _gather(h: Tensor, flat: Tensor, acc: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """Rows flat[..., k] of h viewed as (B*T, D) for k = 0, 1, 2, each (S, R, D) in the
    accumulation dtype."""
    rows = h.reshape(h.shape[0] * h.shape[1], h.shape[2])  # explicit: D may be 0
    return tuple(rows[flat[..., k]].to(acc) for k in range(3))


def stp_loss(
    hidden: Sequence[Tensor], triples: Tensor, lengths: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Per-triple STP loss of sampled triples.

    Args:
        hidden: L tensors (B, T, D) ((1, total, D) with cu_seqlens).
        triples: (S, B, 3) int64 positions s < r < t < lengths[b] (for active rows); (S, N, 3)
            document-local positions with cu_seqlens.
        lengths: optional (B,) int64 valid prefix lengths.
        cu_seqlens: optional (N + 1,) document offsets of a packed batch (not with lengths).

    Returns:
        loss (L, S, R) and stats (L, S, R, 3) = (|a|, |b|, cos), 0 for inactive rows; R = B rows
        or N documents.
    """
    B, T, _ = hidden[0].shape
    acc = compute_dtype(hidden[0].dtype)
    S, R = triples.shape[0], triples.shape[1]
    base, act, bad = _sampled_rows(B, T, lengths, cu_seqlens, hidden[0].device)
    if T < 3:  # no row can be active (and with T = 0 there is no row to gather)
        z = hidden[0].new_zeros((len(hidden), S, R), dtype=acc)
        return _flag_nan(z, bad), _flag_nan(hidden[0].new_zeros((len(hidden), S, R, 3), dtype=acc), bad)
    active = act.unsqueeze(0)  # (1, R)
    # inactive rows read row 0 (an empty document's base may be total)
    flat = torch.where(active.unsqueeze(-1), base.view(1, -1, 1) + triples, torch.zeros_like(triples))
    losses, stats = [], []
    for h in hidden:
        hs, hr, ht = _gather(h, flat, acc)
        a, b = hr - hs, ht - hr
        na, nb, cos = _cosine(a, b)
        loss = 1.0 - cos
        st = torch.stack([na, nb, cos], -1)
        losses.append(torch.where(active, loss, torch.zeros_like(loss)))
        stats.append(torch.where(active.unsqueeze(-1), st, torch.zeros_like(st)))
    return _flag_nan(torch.stack(losses), bad), _flag_nan(torch.stack(stats), bad)


def stp_loss_backward(
    grad_loss: Tensor,
    stats: Tensor,
    hidden: Sequence[Tensor],
    triples: Tensor,
    lengths: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
) -> List[Tensor]:
    """Gradient of ``sum(grad_loss * stp_loss(hidden, triples, lengths, cu_seqlens)[0])`` w.r.t.
    each layer.

    Repeated positions accumulate (index_add_). Returns L tensors of the layers' shape and dtype.
    """
    B, T, D = hidden[0].shape
    acc = compute_dtype(hidden[0].dtype)
    if T < 3:
        return [torch.zeros_like(h) for h in hidden]
    base, act, _ = _sampled_rows(B, T, lengths, cu_seqlens, hidden[0].device)
    active = act.unsqueeze(0)
    # (S, R, 3) rows of (B*T, D); inactive rows add 0 * row 0 (masked in _cos_grads)
    flat = torch.where(active.unsqueeze(-1), base.view(1, -1, 1) + triples, torch.zeros_like(triples))
    grads = []
    for layer, h in enumerate(hidden):
        hs, hr, ht = _gather(h, flat, acc)
        a, b = hr - hs, ht - hr
        st = stats[layer].to(acc)
        w = torch.where(active, -grad_loss[layer].to(acc), torch.zeros((), dtype=acc, device=h.device))
        ga, gb = _cos_grads(a, b, st[..., 0], st[..., 1], st[..., 2], w, active.expand_as(w))
        contrib = torch.stack([-ga, ga - gb, gb], dim=2)  # (S, B, 3, D)
        g = torch.zeros(B * T, D, dtype=acc, device=h.device)
        g.index_add_(0, flat.reshape(-1), contrib.reshape(flat.numel(), D))
        grads.append(g.view(B, T, D).to(h.dtype))
    return grads


def stp_loss_dense(
    hidden: Sequence[Tensor], lengths: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Per-triple STP loss of every consecutive triple (p, p+1, p+2).

    Returns loss (L, B, max(T-2, 0)) (0 where p + 2 >= lengths[b], or, packed, where the triple
    leaves its document) and stats (L, B, max(T-1, 0), 2).
    """
    B, T, _ = hidden[0].shape
    acc = compute_dtype(hidden[0].dtype)
    dev = hidden[0].device
    valid, step_ok = _dense_masks(B, T, lengths, dev, cu_seqlens)  # (B, T-2), (B, T-1)
    bad = None if cu_seqlens is None else varlen.cu_seqlens_invalid(cu_seqlens, T)
    losses, stats = [], []
    for h in hidden:
        hc = h.to(acc)
        d = hc[:, 1:] - hc[:, :-1]  # (B, T-1, D)
        n = _norm(d)
        Nd = _ClampEps.apply(n).unsqueeze(-1)
        cos = ((d[:, :-1] / Nd[:, :-1]) * (d[:, 1:] / Nd[:, 1:])).sum(-1)  # triple q: (d_q, d_{q+1})
        zero = torch.zeros((), dtype=acc, device=dev)
        losses.append(torch.where(valid, 1.0 - cos, zero))
        n = torch.where(step_ok, n, zero)
        cos = F.pad(torch.where(valid, cos, zero), (0, 1))
        stats.append(torch.stack([n, cos[:, : n.shape[1]]], -1))
    return _flag_nan(torch.stack(losses), bad), _flag_nan(torch.stack(stats), bad)


def stp_loss_dense_backward(
    grad_loss: Tensor,
    stats: Tensor,
    hidden: Sequence[Tensor],
    lengths: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
) -> List[Tensor]:
    """Gradient of ``sum(grad_loss * stp_loss_dense(hidden, lengths, cu_seqlens)[0])`` w.r.t. each layer."""
    B, T, D = hidden[0].shape
    acc = compute_dtype(hidden[0].dtype)
    dev = hidden[0].device
    if T < 3:
        return [torch.zeros_like(h) for h in hidden]
    valid = stp_dense_valid(B, T, lengths, dev, cu_seqlens)
    grads = []
    for layer, h in enumerate(hidden):
        hc = h.to(acc)
        d = hc[:, 1:] - hc[:, :-1]
        n, cos = stats[layer, :, :, 0].to(acc), stats[layer, :, :, 1].to(acc)
        w = torch.where(valid, -grad_loss[layer].to(acc), torch.zeros((), dtype=acc, device=dev))
        ga, gb = _cos_grads(d[:, :-1], d[:, 1:], n[:, :-1], n[:, 1:], cos[:, :-1], w, valid)
        gd = F.pad(ga, (0, 0, 0, 1)) + F.pad(gb, (0, 0, 1, 0))  # (B, T-1, D): d(loss)/d(step q)
        g = F.pad(gd, (0, 0, 1, 0)) - F.pad(gd, (0, 0, 0, 1))  # dh[p] = gd[p-1] - gd[p]
        grads.append(g.to(h.dtype))
    return grads
