"""trajops::trajectory_flow — the windowed trajectory flow of the trajectory-guided MoE router.

This module registers the op's fake impl, its autograd formula (the backward is its own op,
trajops::trajectory_flow_backward) and its kernels by device, and exposes the public function.
trajops::trajectory_flow_with_stats is the same forward that also returns the per-row stats
(n_i, a_p) and saves them, so that on CUDA the backward is one launch (see the public function).
The CPU C++ kernels live in csrc/cpu/trajectory_flow.cpp, the Triton ones in
triton_kernels/trajectory_flow.py, the semantics in trajops/reference/trajectory_flow.py.

Packed sequences: every op takes a trailing ``cu_seqlens`` (conventions: trajops/varlen.py).
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from .._library import register_kernels
from ..reference._common import compute_dtype
from ..varlen import check_cu_seqlens, cu_seqlens_invalid
from ._checks import check, check_type, check_value

__all__ = ["trajectory_flow"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check(x: Tensor, window: int, eps: float) -> None:
    # Messages match csrc/cpu/trajectory_flow.cpp so every backend fails the same way.
    check_value(
        x.dim() in (2, 3),
        lambda: f"trajectory_flow: x must have shape (B, T, D) or (T, D), got shape {list(x.shape)}",
    )
    check_type(
        x.dtype in _DTYPES,
        lambda: f"trajectory_flow: x must be float32, float64, float16 or bfloat16, got {x.dtype}",
    )
    check_value(window >= 1, lambda: f"trajectory_flow: window must be >= 1, got {window}")
    check_value(
        math.isfinite(eps) and eps >= 0.0,
        lambda: f"trajectory_flow: eps must be a finite number >= 0, got {eps}",
    )


def _check_packed(op: str, x: Tensor, cu_seqlens: Optional[Tensor]) -> None:
    """x (total, D) or (1, total, D) and valid offsets (values on CPU only; C++: segments_of)."""
    if cu_seqlens is None:
        return
    check_value(
        x.dim() == 2 or x.shape[0] == 1,
        lambda: f"{op}: x must have shape (total, D) or (1, total, D) when cu_seqlens is given, "
        f"got shape {list(x.shape)}",
    )
    check_cu_seqlens(op, cu_seqlens, x.shape[-2], x.device)


def _stats_shape(x: Tensor) -> list:
    """[2, B, T] of the stats of x (B = 1 for a 2-D or packed x)."""
    return [2, 1 if x.dim() == 2 else x.shape[0], x.shape[-2]]


def _check_stats(x: Tensor, stats: Optional[Tensor]) -> None:
    """The backward's stats: (2, B, T) in the compute dtype on x's device (message as in C++).

    Every backend checks it, also those that ignore it, so that a bad tensor fails the same way
    everywhere and the Triton kernel (which trusts the shape) never reads out of bounds.
    """
    if stats is None:
        return
    want, cdt = _stats_shape(x), compute_dtype(x.dtype)
    check_value(
        list(stats.shape) == want and stats.dtype == cdt and stats.device == x.device,
        lambda: f"trajectory_flow_backward: stats must be a {cdt} tensor of shape "
        f"{want} on x's device ({x.device}), got {stats.dtype} {list(stats.shape)} on {stats.device}",
    )


def _check_backward(grad_out: Tensor, x: Tensor, window: int, eps: float) -> None:
    _check(x, window, eps)
    check_value(
        grad_out.shape == x.shape,
        lambda: f"trajectory_flow_backward: grad_out must have the shape of x {list(x.shape)}, "
        f"got {list(grad_out.shape)}",
    )
    check_type(
        grad_out.dtype == x.dtype,
        lambda: f"trajectory_flow_backward: grad_out must have the dtype of x ({x.dtype}), got {grad_out.dtype}",
    )
    check(
        grad_out.device == x.device,
        lambda: f"trajectory_flow_backward: grad_out and x must be on one device, got {grad_out.device} and {x.device}",
    )


# ---------------------------------------------------------------- fake (meta) impls
# Python impls repeat the schema's defaults: the dispatcher may drop trailing default arguments.
@torch.library.register_fake("trajops::trajectory_flow")
def _flow_fake(x: Tensor, window: int = 8, eps: float = 1e-6, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    _check(x, window, eps)
    _check_packed("trajectory_flow", x, cu_seqlens)  # values are not read from fake tensors
    return x.new_empty(x.shape)


@torch.library.register_fake("trajops::trajectory_flow_with_stats")
def _flow_stats_fake(
    x: Tensor, window: int = 8, eps: float = 1e-6, cu_seqlens: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    _check(x, window, eps)
    _check_packed("trajectory_flow", x, cu_seqlens)
    return x.new_empty(x.shape), x.new_empty(_stats_shape(x), dtype=compute_dtype(x.dtype))


@torch.library.register_fake("trajops::trajectory_flow_backward")
def _flow_backward_fake(
    grad_out: Tensor, x: Tensor, window: int, eps: float, cu_seqlens: Optional[Tensor] = None,
    stats: Optional[Tensor] = None,
) -> Tensor:
    _check_backward(grad_out, x, window, eps)
    _check_stats(x, stats)
    _check_packed("trajectory_flow_backward", x, cu_seqlens)
    return x.new_empty(x.shape)


# ---------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output) -> None:
    # The dispatcher may drop the trailing cu_seqlens=None.
    x, window, eps = inputs[:3]
    cu_seqlens = inputs[3] if len(inputs) > 3 else None
    ctx.window, ctx.eps, ctx.packed = window, eps, cu_seqlens is not None
    # Only x (and the offsets) are needed: the backward recomputes the step norms instead of
    # keeping a (B, T) buffer.
    ctx.save_for_backward(x, cu_seqlens)


def _backward(ctx, grad: Tensor):
    x, cu_seqlens = ctx.saved_tensors
    if ctx.packed:
        dx = torch.ops.trajops.trajectory_flow_backward(grad, x, ctx.window, ctx.eps, cu_seqlens)
    else:
        dx = torch.ops.trajops.trajectory_flow_backward(grad, x, ctx.window, ctx.eps)
    # One gradient per argument passed; the offsets get none.
    return (dx,) + (None,) * (len(ctx.needs_input_grad) - 1)


torch.library.register_autograd("trajops::trajectory_flow", _backward, setup_context=_setup_context)


def _stats_setup_context(ctx, inputs, output) -> None:
    x, window, eps = inputs[:3]
    cu_seqlens = inputs[3] if len(inputs) > 3 else None
    _, stats = output
    ctx.window, ctx.eps = window, eps
    ctx.mark_non_differentiable(stats)
    # 8 bytes per row (fp32) saved instead of re-reading x in the backward (a full N e pass on CUDA).
    ctx.save_for_backward(x, cu_seqlens, stats)


def _stats_backward(ctx, grad: Tensor, _grad_stats: Optional[Tensor]):
    x, cu_seqlens, stats = ctx.saved_tensors
    dx = torch.ops.trajops.trajectory_flow_backward(grad, x, ctx.window, ctx.eps, cu_seqlens, stats)
    return (dx,) + (None,) * (len(ctx.needs_input_grad) - 1)


torch.library.register_autograd(
    "trajops::trajectory_flow_with_stats", _stats_backward, setup_context=_stats_setup_context
)


# ---------------------------------------------------------------- kernels
def _sanitized(cu_seqlens: Optional[Tensor], total: int):
    """(offsets safe to index with, 0-d invalid flag or None) for the reference off the CPU.

    CPU offsets were checked (ValueError); elsewhere their values are not read by the host: the
    reference then runs on offsets clamped into a valid vector, and the flag makes the output NaN
    (the project's rule for corrupt index tensors on a GPU, as the Triton kernels do).
    """
    if cu_seqlens is None or cu_seqlens.device.type == "cpu":
        return cu_seqlens, None
    return _safe_offsets(cu_seqlens, total), cu_seqlens_invalid(cu_seqlens, total)


def _safe_offsets(cu_seqlens: Tensor, total: int) -> Tensor:
    """int64 offsets that are valid for ``total`` whatever ``cu_seqlens`` holds (valid ones unchanged)."""
    c = torch.cummax(cu_seqlens.to(torch.int64).clamp(0, total), 0).values
    if c.shape[0] == 1:
        # No document: valid only if total == 0, else the flag is set; one document covering the
        # tokens keeps them indexable meanwhile.
        return torch.tensor([0, total], dtype=torch.int64, device=c.device)
    return torch.cat([c.new_zeros(1), c[1:-1], c.new_full((1,), total)])


def _nan_if(out: Tensor, bad: Optional[Tensor]) -> Tensor:
    return out if bad is None else torch.where(bad, torch.full_like(out, math.nan), out)


def _reference_forward(x: Tensor, window: int = 8, eps: float = 1e-6, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    _check(x, window, eps)
    _check_packed("trajectory_flow", x, cu_seqlens)
    cu, bad = _sanitized(cu_seqlens, x.shape[-2])
    return _nan_if(reference.trajectory_flow(x, window, eps, cu_seqlens=cu), bad).contiguous()


def _reference_with_stats(
    x: Tensor, window: int = 8, eps: float = 1e-6, cu_seqlens: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    _check(x, window, eps)
    _check_packed("trajectory_flow", x, cu_seqlens)
    cu, bad = _sanitized(cu_seqlens, x.shape[-2])
    out = reference.trajectory_flow(x, window, eps, cu_seqlens=cu)
    stats = reference.trajectory_flow_stats(x, window, eps, cu_seqlens=cu)
    return _nan_if(out, bad).contiguous(), _nan_if(stats, bad).contiguous()


def _reference_backward(
    grad_out: Tensor, x: Tensor, window: int, eps: float, cu_seqlens: Optional[Tensor] = None,
    stats: Optional[Tensor] = None,
) -> Tensor:
    # The reference recomputes everything from x: stats are only validated.
    _check_backward(grad_out, x, window, eps)
    _check_stats(x, stats)
    _check_packed("trajectory_flow_backward", x, cu_seqlens)
    cu, bad = _sanitized(cu_seqlens, x.shape[-2])
    return _nan_if(reference.trajectory_flow_backward(grad_out, x, window, eps, cu_seqlens=cu), bad).contiguous()


def _as_3d(t: Tensor) -> Tensor:
    return (t.unsqueeze(0) if t.dim() == 2 else t).contiguous()


@functools.lru_cache(maxsize=None)
def _takes_cu_seqlens(fn) -> bool:
    return "cu_seqlens" in inspect.signature(fn).parameters


def _packed_kwargs(fn, cu_seqlens: Optional[Tensor]) -> dict:
    """cu_seqlens for a Triton launcher, passed only when given (launchers without it keep working)."""
    if cu_seqlens is None:
        return {}
    if not _takes_cu_seqlens(fn):
        raise NotImplementedError(
            "trajectory_flow: cu_seqlens is not supported by this build's Triton kernels "
            "(triton_kernels/trajectory_flow.py has no varlen launcher)"
        )
    return {"cu_seqlens": cu_seqlens}


def _triton_forward(x: Tensor, window: int = 8, eps: float = 1e-6, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    _check(x, window, eps)
    _check_packed("trajectory_flow", x, cu_seqlens)
    if x.numel() == 0:
        return x.new_empty(x.shape)
    from ..triton_kernels import trajectory_flow as kernels

    fn = kernels.trajectory_flow_fwd
    return fn(_as_3d(x), window, eps, **_packed_kwargs(fn, cu_seqlens)).view(x.shape)


def _triton_with_stats(
    x: Tensor, window: int = 8, eps: float = 1e-6, cu_seqlens: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    _check(x, window, eps)
    _check_packed("trajectory_flow", x, cu_seqlens)
    if x.numel() == 0:
        return x.new_empty(x.shape), x.new_zeros(_stats_shape(x), dtype=compute_dtype(x.dtype))
    from ..triton_kernels import trajectory_flow as kernels

    fn = kernels.trajectory_flow_fwd_stats
    out, stats = fn(_as_3d(x), window, eps, **_packed_kwargs(fn, cu_seqlens))
    return out.view(x.shape), stats


def _triton_backward(
    grad_out: Tensor, x: Tensor, window: int, eps: float, cu_seqlens: Optional[Tensor] = None,
    stats: Optional[Tensor] = None,
) -> Tensor:
    _check_backward(grad_out, x, window, eps)
    _check_stats(x, stats)
    _check_packed("trajectory_flow_backward", x, cu_seqlens)
    if x.numel() == 0:
        return x.new_empty(x.shape)
    from ..triton_kernels import trajectory_flow as kernels

    fn = kernels.trajectory_flow_bwd
    # With the forward's stats the launcher skips its recomputing launch (x read once less).
    extra = {} if stats is None else {"stats": stats.contiguous()}
    return fn(_as_3d(grad_out), _as_3d(x), window, eps, **_packed_kwargs(fn, cu_seqlens), **extra).view(x.shape)


register_kernels("trajectory_flow", _reference_forward, _triton_forward)
register_kernels("trajectory_flow_with_stats", _reference_with_stats, _triton_with_stats)
register_kernels("trajectory_flow_backward", _reference_backward, _triton_backward)


# ---------------------------------------------------------------- public function
def trajectory_flow(x: Tensor, window: int = 8, eps: float = 1e-6, *, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """Windowed trajectory flow: the recency- and magnitude-weighted mean direction of recent steps.

    For every sequence and position p, with ws = min(window, p) and the steps
    d_i = x[i+1] - x[i], n_i = ||d_i||_2 for i = p-ws .. p-1::

        w_i    = ((i - (p - ws) + 1) / ws) * tanh(n_i)      (only steps with n_i > eps count)
        out[p] = sum_i w_i * d_i / n_i  /  sum_i w_i          (0 where no step counts, always at p = 0)

    This is ``TrajectoryGuidedMoERouter.compute_trajectory_context`` of the seed (before its
    projector) for every position at once. Same as ``torch.ops.trajops.trajectory_flow``.

    Args:
        x: (B, T, D) or (T, D) hidden states; float32, float64, float16 or bfloat16; any strides.
        window: how many steps back each position looks (>= 1; may exceed T).
        eps: steps with norm <= eps are ignored (finite, >= 0).
        cu_seqlens: packed sequences (conventions: :mod:`trajops.varlen`): x is (total, D) or
            (1, total, D) holding N documents and cu_seqlens the (N + 1,) int32/int64 offsets on x's
            device. Each document is computed as if alone (p above is the position inside its
            document, so no step crosses a boundary); equal to running each document separately,
            in one launch. Offsets are checked on CPU (ValueError); on CUDA invalid offsets give
            NaN outputs instead (no host sync). No gradient flows to cu_seqlens.

    Returns:
        Tensor of x's shape and dtype (contiguous). Each nonzero row is a convex combination of
        unit vectors, so its norm is at most 1. Computed in fp32 (fp64 for fp64 inputs).

    Differentiable in x (backward: ``torch.ops.trajops.trajectory_flow_backward``); not twice.
    On CUDA this calls ``torch.ops.trajops.trajectory_flow_with_stats`` and keeps its per-row stats
    (8 bytes per row) for the backward, which is then one launch: forward + backward move 5 N e
    (N = x.numel(), e its element size; the Triton kernels' floor). Elsewhere it calls
    ``torch.ops.trajops.trajectory_flow`` (the CPU C++ kernel recomputes the norms cheaply). The raw
    op ``torch.ops.trajops.trajectory_flow`` keeps its semantics on every device: it saves only x,
    so its CUDA backward recomputes the stats (6 N e for forward + backward).

    NaN / Inf: a step touching a NaN row has a NaN norm, which fails ``n > eps``, so it is skipped
    like a zero step and the output stays finite (the seed's comparison does the same). A step with
    an infinite component counts with weight tanh(inf) = 1 but has direction inf / inf = NaN, so
    every output whose window holds it is NaN in those components (0 in the finite ones). The
    gradient follows the same rule on every backend (full rule: :mod:`trajops.reference.trajectory_flow`).
    Any ``window`` >= T - 1 (up to 2**63 - 1) means the whole prefix.
    """
    # x.device is static under torch.compile: the branch costs no graph break. A non-tensor x goes
    # on to the op, whose schema rejects it (TypeError) as before.
    if isinstance(x, Tensor) and x.device.type == "cuda":
        if cu_seqlens is None:
            return torch.ops.trajops.trajectory_flow_with_stats(x, window, eps)[0]
        return torch.ops.trajops.trajectory_flow_with_stats(x, window, eps, cu_seqlens)[0]
    if cu_seqlens is None:
        return torch.ops.trajops.trajectory_flow(x, window, eps)
    return torch.ops.trajops.trajectory_flow(x, window, eps, cu_seqlens)
