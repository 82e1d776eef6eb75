"""trajops::adaptive_positional_encoding — cumulative displacement + clamp + table interpolation.

This module registers the op's fake impl, its autograd formula (the backward is its own op,
trajops::adaptive_positional_encoding_backward) and its kernels by device, and exposes the public
function. The CPU C++ kernels live in csrc/cpu/adaptive_positional_encoding.cpp, the Triton ones in
triton_kernels/adaptive_positional_encoding.py, the semantics in
trajops/reference/adaptive_positional_encoding.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._library import register_kernels
from ._checks import check, check_type, check_value

__all__ = ["adaptive_positional_encoding"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_NAME = "adaptive_positional_encoding"


def _check(displacement: Tensor, pe_table: Tensor, positions: Optional[Tensor]) -> None:
    # Messages match csrc/cpu/adaptive_positional_encoding.cpp so every backend fails the same way.
    check_value(
        displacement.dim() in (1, 2),
        lambda: f"{_NAME}: displacement must have shape (B, T) or (T,), got shape {list(displacement.shape)}",
    )
    check_type(
        displacement.dtype in _DTYPES,
        lambda: f"{_NAME}: displacement must be float32, float64, float16 or bfloat16, got {displacement.dtype}",
    )
    check_value(
        pe_table.dim() == 2 and pe_table.shape[0] >= 1,
        lambda: f"{_NAME}: pe_table must have shape (max_len, E) with max_len >= 1, got shape {list(pe_table.shape)}",
    )
    check_type(
        pe_table.dtype == displacement.dtype,
        lambda: f"{_NAME}: pe_table must have the dtype of displacement ({displacement.dtype}), got {pe_table.dtype}",
    )
    check(
        pe_table.device == displacement.device,
        lambda: f"{_NAME}: displacement and pe_table must be on one device, got {displacement.device} and "
        f"{pe_table.device}",
    )
    if positions is None:
        return
    T = displacement.shape[-1]
    check_value(
        tuple(positions.shape) in ((T,), tuple(displacement.shape)),
        lambda: f"{_NAME}: positions must have shape (T,) = ({T},) or the shape of displacement "
        f"{list(displacement.shape)}, got shape {list(positions.shape)}",
    )
    check_type(
        positions.dtype != torch.bool and not positions.dtype.is_complex,
        lambda: f"{_NAME}: positions must be a real (integer or floating) tensor, got {positions.dtype}",
    )
    check(
        positions.device == displacement.device,
        lambda: f"{_NAME}: displacement and positions must be on one device, got {displacement.device} and "
        f"{positions.device}",
    )


def _out_shape(displacement: Tensor, pe_table: Tensor) -> list:
    return list(displacement.shape) + [pe_table.shape[1]]


def _check_backward(grad_out: Tensor, displacement: Tensor, pe_table: Tensor, positions: Optional[Tensor]) -> None:
    _check(displacement, pe_table, positions)
    shape = _out_shape(displacement, pe_table)
    check_value(
        list(grad_out.shape) == shape,
        lambda: f"{_NAME}_backward: grad_out must have the output's shape {shape}, got {list(grad_out.shape)}",
    )
    check_type(
        grad_out.dtype == pe_table.dtype,
        lambda: f"{_NAME}_backward: grad_out must have the dtype of pe_table ({pe_table.dtype}), got {grad_out.dtype}",
    )
    check(
        grad_out.device == displacement.device,
        lambda: f"{_NAME}_backward: grad_out and displacement must be on one device, got {grad_out.device} and "
        f"{displacement.device}",
    )


def _table_grad_like(pe_table: Tensor, need_table: bool) -> Tensor:
    return pe_table.new_empty(pe_table.shape if need_table else (0,))


# ---------------------------------------------------------------- fake (meta) impls
# Python impls repeat the schema's defaults: the dispatcher may drop trailing default arguments.
@torch.library.register_fake("trajops::adaptive_positional_encoding")
def _fake(displacement: Tensor, pe_table: Tensor, positions: Optional[Tensor] = None) -> Tensor:
    _check(displacement, pe_table, positions)
    return pe_table.new_empty(_out_shape(displacement, pe_table))


@torch.library.register_fake("trajops::adaptive_positional_encoding_backward")
def _backward_fake(grad_out: Tensor, displacement: Tensor, pe_table: Tensor, positions: Optional[Tensor],
                   need_table: bool):
    _check_backward(grad_out, displacement, pe_table, positions)
    return (displacement.new_empty(displacement.shape), displacement.new_empty(displacement.shape),
            _table_grad_like(pe_table, need_table))


# ---------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output) -> None:
    displacement, pe_table, positions = inputs
    ctx.need_table = bool(ctx.needs_input_grad[1])
    # The backward recomputes the positions from these (an O(B T) scan) instead of keeping buffers.
    ctx.save_for_backward(displacement, pe_table, positions)


def _backward(ctx, grad: Tensor):
    displacement, pe_table, positions = ctx.saved_tensors
    gd, gs, gt = torch.ops.trajops.adaptive_positional_encoding_backward(
        grad, displacement, pe_table, positions, ctx.need_table
    )
    gp = None
    if positions is not None and ctx.needs_input_grad[2]:
        # gs is dL/ds per (b, t); shared (T,) positions collect it over the batch.
        gp = (gs.sum(0) if positions.dim() < gs.dim() else gs).to(positions.dtype)
    return (gd if ctx.needs_input_grad[0] else None), (gt if ctx.need_table else None), gp


torch.library.register_autograd("trajops::adaptive_positional_encoding", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------- kernels
def _reference_forward(displacement: Tensor, pe_table: Tensor, positions: Optional[Tensor] = None) -> Tensor:
    _check(displacement, pe_table, positions)
    return reference.adaptive_positional_encoding(displacement, pe_table, positions).contiguous()


def _reference_backward(grad_out: Tensor, displacement: Tensor, pe_table: Tensor, positions: Optional[Tensor],
                        need_table: bool):
    _check_backward(grad_out, displacement, pe_table, positions)
    gd, gs, gt = reference.adaptive_positional_encoding_backward(grad_out, displacement, pe_table, positions,
                                                                 need_table)
    return gd.contiguous(), gs.contiguous(), gt.contiguous()


def _as_2d(t: Tensor) -> Tensor:
    return (t.unsqueeze(0) if t.dim() == 1 else t).contiguous()


def _triton_forward(displacement: Tensor, pe_table: Tensor, positions: Optional[Tensor] = None) -> Tensor:
    _check(displacement, pe_table, positions)
    shape = _out_shape(displacement, pe_table)
    if displacement.numel() == 0 or pe_table.shape[1] == 0:
        return pe_table.new_empty(shape)
    from ..triton_kernels import adaptive_positional_encoding as kernels

    pos = None if positions is None else positions.contiguous()
    return kernels.adaptive_positional_encoding_fwd(_as_2d(displacement), pe_table.contiguous(), pos).view(shape)


def _triton_backward(grad_out: Tensor, displacement: Tensor, pe_table: Tensor, positions: Optional[Tensor],
                     need_table: bool):
    _check_backward(grad_out, displacement, pe_table, positions)
    if displacement.numel() == 0:
        gt = pe_table.new_zeros(pe_table.shape) if need_table else pe_table.new_empty(0)
        return displacement.new_zeros(displacement.shape), displacement.new_zeros(displacement.shape), gt
    from ..triton_kernels import adaptive_positional_encoding as kernels

    d2 = _as_2d(displacement)
    g3 = grad_out.reshape(d2.shape + (pe_table.shape[1],)).contiguous()
    pos = None if positions is None else positions.contiguous()
    gd, gs, gt = kernels.adaptive_positional_encoding_bwd(g3, d2, pe_table.contiguous(), pos, need_table)
    return gd.view(displacement.shape), gs.view(displacement.shape), gt


register_kernels("adaptive_positional_encoding", _reference_forward, _triton_forward)
register_kernels("adaptive_positional_encoding_backward", _reference_backward, _triton_backward)


# ---------------------------------------------------------------- public function
def adaptive_positional_encoding(displacement: Tensor, pe_table: Tensor, positions: Optional[Tensor] = None) -> Tensor:
    """Positional encodings read at content-shifted positions, interpolated between table rows.

    For every sequence b and position t, with L = pe_table.shape[0]::

        s[b, t] = positions[t] + sum_{j <= t} displacement[b, j]     (semantic position; fp64)
        p = clamp(s, 0, L - 1),  f = floor(p),  c = min(f + 1, L - 1),  a = p - f
        out[b, t] = (1 - a) * pe_table[f] + a * pe_table[c]

    This is the body of ``TrajectoryAdaptivePositionalEncoding.forward`` of the seed (cumulative
    displacement, clamp, per-position linear interpolation with ``.item()``) for every position at
    once and without a host sync. Same as ``torch.ops.trajops.adaptive_positional_encoding``.

    Args:
        displacement: (B, T) or (T,) per-position step of the semantic position (the seed's
            ``trajectory_strength * tanh(...)``, with 0 at t = 0); float32, float64, float16 or
            bfloat16; any strides.
        pe_table: (L, E) table, L >= 1, of displacement's dtype and device.
        positions: physical positions, (T,) (shared by the batch) or displacement's shape; any
            integer or floating dtype; None means 0, 1, ..., T-1 (the seed's default).

    Returns:
        (B, T, E) or (T, E) contiguous tensor of pe_table's dtype. The semantic positions are
        accumulated in fp64 whatever the dtype (an fp32 position near 8192 has only ~11 fractional
        bits, and they are the interpolation weight); the interpolation runs in fp32 (fp64 for fp64).

    Gradients (backward: ``torch.ops.trajops.adaptive_positional_encoding_backward``; not twice
    differentiable): to displacement, to pe_table when it requires grad, and to floating positions.
    They are exactly autograd's for the formula above: floor is constant, so ``d out / d s =
    pe_table[c] - pe_table[f]`` inside the closed range [0, L-1] and 0 outside it (clamp's
    convention: at s = 0 and s = L-1 the gradient passes). At an integer s = k < L-1 that is the
    right-hand slope pe_table[k+1] - pe_table[k]; at s = L-1 it is 0 (f = c = L-1).

    NaN / Inf: a NaN semantic position gives a NaN output row (rows 0 and 1 are read with a NaN
    weight) and a zero gradient to the displacement; +-Inf clamps to the table's ends; a NaN/Inf in
    a table row reaches every output that reads the row, even with weight 0. Identical on every
    backend (full rule: :mod:`trajops.reference.adaptive_positional_encoding`).
    """
    return torch.ops.trajops.adaptive_positional_encoding(displacement, pe_table, positions)
