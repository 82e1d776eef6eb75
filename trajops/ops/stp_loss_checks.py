"""Argument checks of trajops::stp_loss / stp_loss_dense and their backwards (split out of
trajops/ops/stp_loss.py; messages match csrc/cpu/stp_loss_checks.h so every backend fails the same way).

Shape/dtype/device checks run everywhere (fake impls too); ``_check_values`` reads index values and
therefore runs only where that costs no device sync (the reference and the CPU kernels).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import varlen
from ..reference._common import compute_dtype as _acc_dtype
from ._checks import DTYPES as _DTYPES
from ._checks import check, check_type, check_value

# Messages match csrc/cpu/stp_loss_checks.h so every backend fails the same way.
def _check_hidden(op: str, hidden: Sequence[Tensor]) -> None:
    check_value(len(hidden) >= 1, lambda: f"{op}: hidden must hold at least one (B, T, D) tensor, got none")
    h0 = hidden[0]
    check_value(
        h0.dim() == 3, lambda: f"{op}: hidden[0] must have shape (B, T, D), got shape {list(h0.shape)}"
    )
    check_type(
        h0.dtype in _DTYPES, lambda: f"{op}: hidden must be float32, float64, float16 or bfloat16, got {h0.dtype}"
    )
    for i, h in enumerate(hidden[1:], 1):
        check_value(
            h.shape == h0.shape,
            lambda: f"{op}: every layer must have the shape of hidden[0] {list(h0.shape)}, "
            f"got {list(h.shape)} for hidden[{i}]",
        )
        check_type(
            h.dtype == h0.dtype,
            lambda: f"{op}: every layer must have the dtype of hidden[0] ({h0.dtype}), got {h.dtype} for hidden[{i}]",
        )
        check(
            h.device == h0.device,
            lambda: f"{op}: every layer must be on the device of hidden[0] ({h0.device}), "
            f"got {h.device} for hidden[{i}]",
        )


def _check_index(op: str, name: str, t: Tensor, shape: Tuple[int, ...], spec: str, h0: Tensor) -> None:
    check_type(t.dtype == torch.int64, lambda: f"{op}: {name} must be int64, got {t.dtype}")
    check_value(
        tuple(t.shape) == shape, lambda: f"{op}: {name} must have shape {spec}, got shape {list(t.shape)}"
    )
    check(
        t.device == h0.device, lambda: f"{op}: {name} must be on the device of hidden ({h0.device}), got {t.device}"
    )


def _check_lengths(op: str, lengths: Optional[Tensor], h0: Tensor) -> None:
    if lengths is not None:
        B = h0.shape[0]
        _check_index(op, "lengths", lengths, (B,), f"(B,) = ({B},)", h0)


def _check_triples(op: str, triples: Tensor, h0: Tensor, n_rows: int, packed: bool) -> None:
    # The rows of a packed batch are its N documents.
    spec = "(n_spans, N, 3)" if packed else "(n_spans, B, 3)"
    S = triples.shape[0] if triples.dim() == 3 else 0
    check_value(
        triples.dim() == 3 and S >= 1,
        lambda: f"{op}: triples must have shape {spec} with n_spans >= 1, got shape {list(triples.shape)}",
    )
    _check_index(op, "triples", triples, (S, n_rows, 3), f"{spec} = ({S}, {n_rows}, 3)", h0)


def _check_packed(op: str, h0: Tensor, lengths: Optional[Tensor], cu_seqlens: Optional[Tensor]) -> int:
    """cu_seqlens: one packed row, no lengths, valid offsets (values on CPU). Returns the number of
    rows of the loss (B, or N documents)."""
    if cu_seqlens is None:
        return h0.shape[0]
    check_value(
        h0.shape[0] == 1,
        lambda: f"{op}: with cu_seqlens, hidden must be one packed row (1, total, D), got batch size {h0.shape[0]}",
    )
    check_value(lengths is None, lambda: f"{op}: pass either lengths or cu_seqlens, not both")
    varlen.check_cu_seqlens(op, cu_seqlens, h0.shape[1], h0.device)
    return cu_seqlens.shape[0] - 1


def _check_grad(op: str, name: str, t: Tensor, shape: Tuple[int, ...], h0: Tensor) -> None:
    acc = _acc_dtype(h0.dtype)
    check_type(t.dtype == acc, lambda: f"{op}: {name} must be {acc}, got {t.dtype}")
    check_value(
        tuple(t.shape) == shape, lambda: f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}"
    )
    check(t.device == h0.device, lambda: f"{op}: {name} must be on the device of hidden ({h0.device})")


def _check_sampled(
    hidden: Sequence[Tensor], triples: Tensor, lengths: Optional[Tensor], cu_seqlens=None, op: str = "stp_loss"
) -> int:
    _check_hidden(op, hidden)
    rows = _check_packed(op, hidden[0], lengths, cu_seqlens)
    _check_triples(op, triples, hidden[0], rows, cu_seqlens is not None)
    _check_lengths(op, lengths, hidden[0])
    return rows


def _check_sampled_backward(grad_loss, stats, hidden, triples, lengths, cu_seqlens=None) -> None:
    # The backward op's own name leads its messages, as in csrc/cpu/stp_loss.cpp.
    B = _check_sampled(hidden, triples, lengths, cu_seqlens, op="stp_loss_backward")
    L, S = len(hidden), triples.shape[0]
    _check_grad("stp_loss_backward", "grad_loss", grad_loss, (L, S, B), hidden[0])
    _check_grad("stp_loss_backward", "stats", stats, (L, S, B, 3), hidden[0])


def _dense_shapes(hidden: Sequence[Tensor]) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    B, T, _ = hidden[0].shape
    L = len(hidden)
    return (L, B, max(T - 2, 0)), (L, B, max(T - 1, 0), 2)


def _check_dense(hidden: Sequence[Tensor], lengths: Optional[Tensor], cu_seqlens=None, op="stp_loss_dense") -> None:
    _check_hidden(op, hidden)
    _check_packed(op, hidden[0], lengths, cu_seqlens)
    _check_lengths(op, lengths, hidden[0])


def _check_dense_backward(grad_loss, stats, hidden, lengths, cu_seqlens=None) -> None:
    _check_dense(hidden, lengths, cu_seqlens, op="stp_loss_dense_backward")
    loss_shape, stats_shape = _dense_shapes(hidden)
    _check_grad("stp_loss_dense_backward", "grad_loss", grad_loss, loss_shape, hidden[0])
    _check_grad("stp_loss_dense_backward", "stats", stats, stats_shape, hidden[0])


def _check_values(
    op: str, T: int, triples: Optional[Tensor], lengths: Optional[Tensor], cu_seqlens: Optional[Tensor] = None
) -> None:
    """Range checks of index *values*. They read the tensors, so on CUDA they would cost a host sync:
    the reference and the CPU kernels run them; the CUDA kernels write NaN losses instead.
    With cu_seqlens (already checked) the rows are the documents and their lengths the limits."""
    if lengths is not None:
        bad = (lengths < 0) | (lengths > T)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: lengths must be in [0, T] = [0, {T}], got {int(lengths[b])} for row {b}")
    if triples is None:
        return
    if cu_seqlens is not None:
        c = cu_seqlens.to(torch.int64)
        lengths = c[1:] - c[:-1]
    active = triples.new_full((triples.shape[1],), T >= 3, dtype=torch.bool) if lengths is None else lengths >= 3
    limit = torch.full_like(triples[0, :, 0], T) if lengths is None else lengths
    s, r, t = triples.unbind(-1)
    bad = active & ~((0 <= s) & (s < r) & (r < t) & (t < limit))
    if bool(bad.any()):
        i, b = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"{op}: triples must satisfy 0 <= s < r < t < length for every row of length >= 3; got "
            f"(s, r, t) = {tuple(int(v) for v in triples[i, b])} for span {i}, row {b} (length {int(limit[b])})"
        )
