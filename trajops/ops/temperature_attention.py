"""trajops::temperature_attention — attention whose logits are divided by a learned temperature.

This module registers the op's fake impl, its autograd formula (the backward is its own op,
trajops::temperature_attention_backward) and its kernels by device, and exposes the public
function. The CPU kernel lives in csrc/cpu/temperature_attention.cpp (ATen's flash attention on a
pre-scaled q, see there why), the Triton kernels in triton_kernels/temperature_attention.py, the
semantics in trajops/reference/temperature_attention.py.

Canonical op arguments (the public function maps friendlier forms onto them):
  q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv), Hq % Hkv == 0, one float dtype;
  tau: any float dtype, rank <= 3, broadcastable to (B, Hq, Tq);
  attn_mask: None or bool of rank 4 broadcastable to (B, Hq, Tq, Tk), True = attend;
  scale: None (1/sqrt(D)) or a finite float > 0.
Outputs: out (B, Hq, Tq, Dv) in q's dtype and lse (B, Hq, Tq) in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import reference
from .. import varlen
from ._checks import broadcastable as _broadcastable
from ._checks import check, check_backward_tensors, check_head_sizes, check_qkv, check_type, check_value
from .._library import register_kernels
from ..reference._common import compute_dtype
from . import temperature_attention_varlen as _varlen  # noqa: F401  (registers the packed op)

__all__ = ["temperature_attention"]

_OP = "temperature_attention"


# ---------------------------------------------------------------- input checks
# Messages match csrc/cpu/temperature_attention.cpp so every backend fails the same way.
def _check(q: Tensor, k: Tensor, v: Tensor, tau: Tensor, attn_mask: Optional[Tensor], scale: Optional[float]) -> None:
    check_qkv(_OP, q, k, v, tau, 4, "(B, H, T, D)")
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    check_value(
        k.shape[0] == B and v.shape[0] == B,
        lambda: f"{_OP}: q, k and v must have one batch size, got {B}, {k.shape[0]} and {v.shape[0]}",
    )
    check_value(
        Hkv >= 1 and v.shape[1] == Hkv and Hq % Hkv == 0,
        lambda: f"{_OP}: k and v must have the same number of heads Hkv >= 1 dividing q's Hq, got Hq={Hq}, "
        f"k {list(k.shape)} and v {list(v.shape)}",
    )
    check_value(
        v.shape[2] == Tk, lambda: f"{_OP}: k and v must have one length Tk, got k {list(k.shape)} and v {list(v.shape)}"
    )
    check_head_sizes(_OP, q, k, v, tau)
    check_value(
        _broadcastable(tau.shape, (B, Hq, Tq)),
        lambda: f"{_OP}: tau must be broadcastable to (B, Hq, Tq) = ({B}, {Hq}, {Tq}), got shape {list(tau.shape)}",
    )
    if attn_mask is not None:
        check_type(
            attn_mask.dtype == torch.bool, lambda: f"{_OP}: attn_mask must be bool (True = attend), got {attn_mask.dtype}"
        )
        check(
            attn_mask.device == q.device,
            lambda: f"{_OP}: attn_mask must be on q's device ({q.device}), got {attn_mask.device}",
        )
        check_value(
            attn_mask.dim() == 4 and _broadcastable(attn_mask.shape, (B, Hq, Tq, Tk)),
            lambda: f"{_OP}: attn_mask must have rank 4 and be broadcastable to (B, Hq, Tq, Tk) = "
            f"({B}, {Hq}, {Tq}, {Tk}), got shape {list(attn_mask.shape)}",
        )
    if scale is not None:
        check_value(
            math.isfinite(scale) and scale > 0, lambda: f"{_OP}: scale must be a finite number > 0, got {scale}"
        )


def _check_backward(grad_out, grad_lse, q, k, v, tau, attn_mask, scale, out, lse) -> None:
    _check(q, k, v, tau, attn_mask, scale)
    B, Hq, Tq, _ = q.shape
    out_shape = (B, Hq, Tq, v.shape[3])
    check_backward_tensors(f"{_OP}_backward", q, out_shape, (B, Hq, Tq), grad_out, out, lse, grad_lse)


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ---------------------------------------------------------------- fake (meta) impls
def _outputs_like(q: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    B, Hq, Tq, _ = q.shape
    out = q.new_empty((B, Hq, Tq, v.shape[3]))
    lse = q.new_empty((B, Hq, Tq), dtype=compute_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("trajops::temperature_attention")
def _fake(q, k, v, tau, attn_mask=None, causal=False, scale=None):
    _check(q, k, v, tau, attn_mask, scale)
    return _outputs_like(q, v)


@torch.library.register_fake("trajops::temperature_attention_backward")
def _backward_fake(grad_out, grad_lse, q, k, v, tau, attn_mask, causal, scale, out, lse):
    _check_backward(grad_out, grad_lse, q, k, v, tau, attn_mask, scale, out, lse)
    # Every output is contiguous, whatever the inputs' strides.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), tau.new_empty(tau.shape)


# ---------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output) -> None:
    q, k, v, tau, attn_mask, causal, scale = inputs
    out, lse = output
    ctx.causal, ctx.scale = causal, scale
    ctx.save_for_backward(q, k, v, tau, attn_mask, out, lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out: Optional[Tensor], grad_lse: Optional[Tensor]):
    q, k, v, tau, attn_mask, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dtau = torch.ops.trajops.temperature_attention_backward(
        grad_out, grad_lse, q, k, v, tau, attn_mask, ctx.causal, ctx.scale, out, lse
    )
    return dq, dk, dv, dtau, None, None, None


torch.library.register_autograd("trajops::temperature_attention", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------- kernels
def _coefficient(q: Tensor, k: Tensor, tau: Tensor, attn_mask: Optional[Tensor], causal: bool,
                 scale: Optional[float]) -> Tensor:
    B, Hq, Tq, _ = q.shape
    has_keys = reference.rows_with_keys(B, Hq, Tq, k.shape[2], attn_mask, causal, q.device)
    return reference.temperature_coefficient(tau, (B, Hq, Tq), _scale(q, scale), compute_dtype(q.dtype), has_keys)


def _dtau(rowdot: Tensor, c: Tensor, tau: Tensor, scale: float) -> Tensor:
    """dtau = -(q . dq) / tau per query, reduced to tau's own shape (a deterministic sum)."""
    return (-rowdot * (c / scale)).sum_to_size(tau.shape).to(tau.dtype)


def _reference_forward(q, k, v, tau, attn_mask=None, causal=False, scale=None):
    _check(q, k, v, tau, attn_mask, scale)
    c = _coefficient(q, k, tau, attn_mask, causal, scale)
    out, lse = reference.temperature_attention(q, k, v, c, attn_mask, causal)
    return out.to(q.dtype).contiguous(), lse.contiguous()


def _reference_backward(grad_out, grad_lse, q, k, v, tau, attn_mask, causal, scale, out, lse):
    _check_backward(grad_out, grad_lse, q, k, v, tau, attn_mask, scale, out, lse)
    c = _coefficient(q, k, tau, attn_mask, causal, scale)
    dq, dk, dv, rowdot = reference.temperature_attention_backward(grad_out, grad_lse, q, k, v, c, attn_mask, causal)
    grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), _dtau(rowdot, c, tau, _scale(q, scale)))
    return tuple(g.contiguous() for g in grads)


def _mask4(q: Tensor, k: Tensor, attn_mask: Optional[Tensor]) -> Optional[Tensor]:
    if attn_mask is None:
        return None
    return attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _fp64_on_gpu(q: Tensor, attn_mask: Optional[Tensor]) -> bool:
    # Triton 3.6 (the GPU boxes' version) fails to lower the fp64 kernels on sm_90: those that load
    # a mask, and since the non-finite flags all of them ("fp64 don't support largeK MMA" in
    # ConvertTritonGPUToLLVM; Triton 3.9 compiles them). fp64 is for gradchecks, so it takes the
    # reference on a GPU; the interpreter still runs the kernels in fp64 on the CPU.
    return q.is_cuda and q.dtype == torch.float64


def _triton_forward(q, k, v, tau, attn_mask=None, causal=False, scale=None):
    if _fp64_on_gpu(q, attn_mask):
        return _reference_forward(q, k, v, tau, attn_mask, causal, scale)
    _check(q, k, v, tau, attn_mask, scale)
    from ..triton_kernels import temperature_attention as kernels

    # c = scale / tau (NaN where tau is invalid) is formed inside the kernels from tau's strides
    return kernels.attention_fwd(q, k, v, tau, _scale(q, scale), _mask4(q, k, attn_mask), causal)


def _triton_backward(grad_out, grad_lse, q, k, v, tau, attn_mask, causal, scale, out, lse):
    if _fp64_on_gpu(q, attn_mask):
        return _reference_backward(grad_out, grad_lse, q, k, v, tau, attn_mask, causal, scale, out, lse)
    _check_backward(grad_out, grad_lse, q, k, v, tau, attn_mask, scale, out, lse)
    from ..triton_kernels import temperature_attention as kernels

    dq, dk, dv, dtau_rows = kernels.attention_bwd(
        grad_out, grad_lse, q, k, v, tau, _scale(q, scale), _mask4(q, k, attn_mask), causal, out, lse
    )
    # per-row dtau (0 on rows without a key) summed to tau's own shape: a deterministic reduction
    return dq, dk, dv, dtau_rows.sum_to_size(tau.shape).to(tau.dtype).contiguous()


register_kernels("temperature_attention", _reference_forward, _triton_forward)
register_kernels("temperature_attention_backward", _reference_backward, _triton_backward)


# ---------------------------------------------------------------- public function
def _canonical_mask(attn_mask: Optional[Tensor], q: Tensor, k: Tensor) -> Optional[Tensor]:
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"{_OP}: attn_mask must be a bool tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool:
        raise TypeError(
            f"{_OP}: attn_mask must be bool (True = attend), got {attn_mask.dtype}; for an additive float "
            "mask use F.scaled_dot_product_attention"
        )
    B, Tk = q.shape[0], k.shape[2]
    if attn_mask.dim() == 2:
        if tuple(attn_mask.shape) != (B, Tk):
            raise ValueError(
                f"{_OP}: a 2-D attn_mask is a (B, Tk) = ({B}, {Tk}) key-padding mask, got shape "
                f"{list(attn_mask.shape)}; pass a (Tq, Tk) mask as attn_mask[None, None]"
            )
        return attn_mask[:, None, None, :]
    if attn_mask.dim() in (1, 3):
        return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    return attn_mask


def _max_seqlen(name: str, given, cu: Tensor, device: torch.device) -> int:
    if given is None:
        # shape, dtype and device (the op's own messages) before the values are read
        varlen.check_cu_seqlens(_varlen._OP, cu, 0, device, name=name.replace("max_seqlen", "cu_seqlens"),
                                values=False)
        return varlen.max_seqlen(cu)  # reads the offsets: one device sync on CUDA
    if isinstance(given, bool) or not isinstance(given, (int, torch.SymInt)):
        raise TypeError(f"{_OP}: {name} must be an int or None, got {type(given).__name__}")
    return given


def _packed(q, k, v, tau, causal, attn_mask, scale, cu_q, cu_k, max_q, max_k) -> Tuple[Tensor, Tensor]:
    """The packed (varlen) call: checks what only the public signature can get wrong, then the op."""
    if cu_q is None or cu_k is None:
        given = "cu_seqlens_q" if cu_k is None else "cu_seqlens_k"
        raise ValueError(
            f"{_OP}: cu_seqlens_q and cu_seqlens_k must be given together (packed sequences), got only {given}"
        )
    if attn_mask is not None:
        raise ValueError(
            f"{_OP}: attn_mask must be None with cu_seqlens_q/cu_seqlens_k (the documents are the mask; "
            "causal=True masks inside each document)"
        )
    max_q = _max_seqlen("max_seqlen_q", max_q, cu_q, q.device)
    max_k = _max_seqlen("max_seqlen_k", max_k, cu_k, q.device)
    return torch.ops.trajops.temperature_attention_varlen(q, k, v, tau, cu_q, cu_k, max_q, max_k, bool(causal), scale)


def temperature_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tau: Union[Tensor, float],
    *,
    causal: bool = False,
    attn_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_k: Optional[Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention with a per-query temperature: ``softmax(scale * q k^T / tau) v``, fused (flash-style).

    Args:
        q: (B, Hq, Tq, D) queries; float32, float64, float16 or bfloat16; any strides.
            Packed: (total_q, Hq, D) (see cu_seqlens_q).
        k: (B, Hkv, Tk, D) keys, Hq a multiple of Hkv (grouped-query / multi-query attention).
            Packed: (total_k, Hkv, D).
        v: (B, Hkv, Tk, Dv) values. Packed: (total_k, Hkv, Dv).
        tau: the temperature, positive, broadcastable to (B, Hq, Tq): a float or 0-d tensor, (Hq, 1)
            (a per-head parameter), (1, Hq, 1), (B, 1, Tq), (B, Hq, Tq) (per-query scales)... Any
            float dtype (an fp32 parameter with bf16 activations is fine). Its gradient has tau's
            own shape (summed over the broadcast dimensions, deterministically). Packed: broadcastable
            to (total_q, Hq), token-major like q: a float, (Hq,) per head, (total_q, Hq) per query.
        causal: query i attends keys j <= i + (Tk - Tq) (bottom-right aligned: the last query sees
            every key, as in decoding with a cache). Tq = Tk is the usual lower triangle. Packed: the
            same inside each document (Tq, Tk its own lengths).
        attn_mask: bool, True = attend. Broadcastable to (B, Hq, Tq, Tk) by the usual rules, except
            that a 2-D mask is a (B, Tk) key-padding mask (pass a (Tq, Tk) mask as mask[None, None]).
            Combined with ``causal`` by "and". Must be None when packed.
        scale: multiplies the logits; default 1/sqrt(D). ``scale=1.0`` is the seed's
            ``MultiScaleTrajectoryAttention`` (logits q.k / tau).
        return_lse: also return the log-sum-exp of each row's logits (natural log), which is
            differentiable too (e.g. to merge attention over split key sets).
        cu_seqlens_q, cu_seqlens_k: packed documents (FlashAttention's varlen convention, see
            :mod:`trajops.varlen`): (N + 1,) int32/int64 offsets into q's and k's token axes, both
            or neither, with one N. Document j attends only its own keys, exactly as
            ``temperature_attention(q_j, k_j, v_j, tau_j)`` alone; a document with no query or no
            key is allowed (out 0, lse -inf on its rows). They get no gradient.
        max_seqlen_q, max_seqlen_k: ints, the longest document of q and of k (only the CUDA
            kernels' grid uses them; on CPU a too-small value raises). None: computed from the
            offsets, one device sync each on CUDA, and a graph break under torch.compile (pass them
            for ``fullgraph=True``).

    Returns:
        out (B, Hq, Tq, Dv) in q's dtype; with return_lse, (out, lse) with lse (B, Hq, Tq) in fp32
        (fp64 for fp64 inputs). Packed: out (total_q, Hq, Dv) and lse (total_q, Hq) -- token-major
        like q, where FlashAttention's varlen lse is (Hq, total_q).

    A query row with no key to attend (masked out, or causal with Tq > Tk) gives out = 0, lse = -inf
    and zero gradients, never NaN. NaN/Inf, the same on every backend (the full rule is in
    trajops/reference/temperature_attention.py, and applies to each packed document alone): keys a
    row may not attend never matter, whatever their k and v hold; a row is all NaN (out and lse) when
    scale / tau is not finite (tau <= 0, NaN, inf or subnormal), or when its q row or the k or v row
    of a key it may attend holds a NaN/Inf; the NaN gradients of such a row (and of a row whose
    grad_out is not finite) stay in its dq, dtau and the dk, dv rows of the keys it may attend. Every
    other value is exactly what the finite inputs give. Detected without a host sync on CUDA (where
    invalid offsets make every output NaN instead of raising). Differentiable in q, k, v and tau (and
    through lse), not twice.
    Same as ``torch.ops.trajops.temperature_attention`` after ``attn_mask`` is made 4-D, or
    ``torch.ops.trajops.temperature_attention_varlen`` when packed.
    """
    if not isinstance(tau, Tensor):
        tau = torch.tensor(float(tau), dtype=compute_dtype(q.dtype), device=q.device)
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        out, lse = _packed(q, k, v, tau, causal, attn_mask, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                           max_seqlen_k)
        return (out, lse) if return_lse else out
    if max_seqlen_q is not None or max_seqlen_k is not None:
        raise ValueError(f"{_OP}: max_seqlen_q/max_seqlen_k are only used with cu_seqlens_q/cu_seqlens_k")
    out, lse = torch.ops.trajops.temperature_attention(
        q, k, v, tau, _canonical_mask(attn_mask, q, k), bool(causal), scale
    )
    return (out, lse) if return_lse else out
