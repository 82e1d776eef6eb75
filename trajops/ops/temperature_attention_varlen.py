"""trajops::temperature_attention_varlen — temperature attention on packed documents (cu_seqlens).

The packed form of trajops::temperature_attention, as FlashAttention's ``flash_attn_varlen_func``
lays it out (conventions of cu_seqlens: trajops/varlen.py). This module registers the op's checks,
fake impls, autograd (the backward is trajops::temperature_attention_varlen_backward) and kernels;
the public entry point is ``trajops.temperature_attention(..., cu_seqlens_q=..., cu_seqlens_k=...)``.
The C++ kernel (csrc/cpu/temperature_attention_varlen.cpp) runs the dense CPU kernel on each
document's views; the Triton launchers live in triton_kernels/temperature_attention_varlen.py.

Canonical op arguments:
  q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), Hq % Hkv == 0, one float dtype;
  tau: any float dtype, broadcastable to (total_q, Hq) (token-major, like q);
  cu_seqlens_q, cu_seqlens_k: (N + 1,) int32/int64 offsets on q's device, one N;
  max_seqlen_q, max_seqlen_k: ints >= the longest document's length (the CUDA grid's size only; on
  CPU tensors, where the offsets are read anyway, a too-small value raises);
  causal: bottom-right aligned inside each document; scale: None (1/sqrt(D)) or a finite float > 0.
Outputs: out (total_q, Hq, Dv) in q's dtype and lse (total_q, Hq) in fp32 (fp64 for fp64 inputs).
NOTE: lse is token-major like q; FlashAttention's varlen lse is (Hq, total_q).

Semantics: document j's rows are trajops::temperature_attention of its own q, k, v and tau rows
(NaN/Inf rule included), so a key of another document never matters; a document without keys, or
a causal row that sees none, gives out 0 and lse -inf.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .._library import register_kernels
from ..reference._common import compute_dtype
from ..varlen import _is_fake, check_cu_seqlens, cu_seqlens_invalid
from ._checks import broadcastable as _broadcastable
from ._checks import check_backward_tensors, check_head_sizes, check_qkv, check_value

__all__: list = []

_OP = "temperature_attention_varlen"


# ---------------------------------------------------------------- input checks
# Messages match csrc/cpu/temperature_attention_varlen.cpp so every backend fails the same way.
def _longest(cu: Tensor) -> int:
    return int((cu[1:] - cu[:-1]).max()) if cu.shape[0] > 1 else 0


def _check(q, k, v, tau, cu_q, cu_k, max_q, max_k, scale) -> None:
    check_qkv(_OP, q, k, v, tau, 3, "(total, H, D) (packed tokens)")
    total_q, Hq, D = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    check_value(
        Hkv >= 1 and v.shape[1] == Hkv and Hq % Hkv == 0,
        lambda: f"{_OP}: k and v must have the same number of heads Hkv >= 1 dividing q's Hq, got Hq={Hq}, "
        f"k {list(k.shape)} and v {list(v.shape)}",
    )
    check_value(
        v.shape[0] == total_k,
        lambda: f"{_OP}: k and v must have one number of packed tokens total_k, got k {list(k.shape)} and "
        f"v {list(v.shape)}",
    )
    check_head_sizes(_OP, q, k, v, tau)
    check_value(
        _broadcastable(tau.shape, (total_q, Hq)),
        lambda: f"{_OP}: tau must be broadcastable to (total_q, Hq) = ({total_q}, {Hq}), got shape "
        f"{list(tau.shape)}",
    )
    check_cu_seqlens(_OP, cu_q, total_q, q.device, name="cu_seqlens_q")
    check_cu_seqlens(_OP, cu_k, total_k, q.device, name="cu_seqlens_k")
    check_value(
        cu_q.shape[0] == cu_k.shape[0],
        lambda: f"{_OP}: cu_seqlens_q and cu_seqlens_k must have one length N + 1 (N documents), got "
        f"{cu_q.shape[0]} and {cu_k.shape[0]}",
    )
    for name, m, cu in (("max_seqlen_q", max_q, cu_q), ("max_seqlen_k", max_k, cu_k)):
        check_value(m >= 0, lambda: f"{_OP}: {name} must be >= 0, got {m}")
        if cu.device.type == "cpu" and not _is_fake(cu):  # values already read on CPU: free to check
            longest = _longest(cu)
            check_value(
                m >= longest,
                lambda: f"{_OP}: {name} must be at least the longest document's length {longest}, got {m}",
            )
    if scale is not None:
        check_value(
            math.isfinite(scale) and scale > 0, lambda: f"{_OP}: scale must be a finite number > 0, got {scale}"
        )


def _check_backward(grad_out, grad_lse, q, k, v, tau, cu_q, cu_k, max_q, max_k, scale, out, lse) -> None:
    _check(q, k, v, tau, cu_q, cu_k, max_q, max_k, scale)
    total_q, Hq, _ = q.shape
    out_shape = (total_q, Hq, v.shape[2])
    check_backward_tensors(f"{_OP}_backward", q, out_shape, (total_q, Hq), grad_out, out, lse, grad_lse)


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ---------------------------------------------------------------- fake (meta) impls
@torch.library.register_fake("trajops::temperature_attention_varlen")
def _fake(q, k, v, tau, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
    _check(q, k, v, tau, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    total_q, Hq, _ = q.shape
    return q.new_empty((total_q, Hq, v.shape[2])), q.new_empty((total_q, Hq), dtype=compute_dtype(q.dtype))


@torch.library.register_fake("trajops::temperature_attention_varlen_backward")
def _backward_fake(grad_out, grad_lse, q, k, v, tau, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   causal, scale, out, lse):
    _check_backward(grad_out, grad_lse, q, k, v, tau, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    scale, out, lse)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), tau.new_empty(tau.shape)


# ---------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output) -> None:
    q, k, v, tau, cu_q, cu_k, max_q, max_k, causal, scale = inputs
    out, lse = output
    ctx.args = (max_q, max_k, causal, scale)
    ctx.save_for_backward(q, k, v, tau, cu_q, cu_k, out, lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out: Optional[Tensor], grad_lse: Optional[Tensor]):
    q, k, v, tau, cu_q, cu_k, out, lse = ctx.saved_tensors
    max_q, max_k, causal, scale = ctx.args
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dtau = torch.ops.trajops.temperature_attention_varlen_backward(
        grad_out, grad_lse, q, k, v, tau, cu_q, cu_k, max_q, max_k, causal, scale, out, lse
    )
    # the offsets are integer tensors: no gradient
    return dq, dk, dv, dtau, None, None, None, None, None, None


torch.library.register_autograd(
    "trajops::temperature_attention_varlen", _backward, setup_context=_setup_context
)


# ---------------------------------------------------------------- reference kernels
def _offsets(cu: Tensor, total: int) -> Tensor:
    """int64 offsets clamped into [0, total] and made non-decreasing: unchecked (CUDA) values then index
    nothing out of range (such calls are NaN anyway, see cu_seqlens_invalid); valid ones are unchanged."""
    return cu.to(torch.int64).clamp(0, total).cummax(0).values


def _document_of(c: Tensor, total: int) -> Tensor:
    """(total,) int64: each token's document, N for a token after the last one (no host sync)."""
    i = torch.arange(total, device=c.device)
    return torch.searchsorted(c[1:].contiguous(), i, right=True)  # the number of ends <= i


def _allowed(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int, causal: bool) -> Tensor:
    """(1, 1, total_q, total_k) bool: the block-diagonal document mask, bottom-right causal per document."""
    n_docs = cu_q.shape[0] - 1
    cq, ck = _offsets(cu_q, total_q), _offsets(cu_k, total_k)
    doc_q, doc_k = _document_of(cq, total_q), _document_of(ck, total_k)
    allowed = (doc_q[:, None] == doc_k[None, :]) & (doc_q < n_docs)[:, None]
    if causal and n_docs > 0:  # in a document of Lq queries and Lk keys, query i sees keys j <= i + Lk - Lq
        dq, dk = doc_q.clamp(max=n_docs - 1), doc_k.clamp(max=n_docs - 1)
        pos_q = torch.arange(total_q, device=cq.device) - cq[dq]
        pos_k = torch.arange(total_k, device=ck.device) - ck[dk]
        shift = (ck[1:] - ck[:-1])[dq] - (cq[1:] - cq[:-1])[dq]
        allowed = allowed & (pos_k[None, :] <= (pos_q + shift)[:, None])
    return allowed[None, None]


def _dense(x: Tensor) -> Tensor:
    """(total, H, D) -> (1, H, total, D): the packed tensor as one dense batch row."""
    return x.transpose(0, 1).unsqueeze(0)


def _prepare(q, k, tau, cu_q, cu_k, causal, scale):
    total_q, Hq, _ = q.shape
    allowed = _allowed(cu_q, cu_k, total_q, k.shape[0], causal)
    c = reference.temperature_coefficient(
        tau.expand(total_q, Hq).transpose(0, 1).unsqueeze(0), (1, Hq, total_q), _scale(q, scale),
        compute_dtype(q.dtype), allowed.any(-1),
    )
    # Unchecked offsets (CUDA): every output NaN, the project's rule for corrupt index tensors.
    flag = None
    if q.device.type != "cpu":
        flag = cu_seqlens_invalid(cu_q, total_q) | cu_seqlens_invalid(cu_k, k.shape[0])
    return allowed, c, flag


def _poison(t: Tensor, flag: Optional[Tensor]) -> Tensor:
    return t if flag is None else torch.where(flag, torch.full((), math.nan, dtype=t.dtype, device=t.device), t)


def _reference_forward(q, k, v, tau, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
    """The block-diagonal (+ causal per document) mask into the dense reference: one batched call,
    no host sync, but (Hq, total_q, total_k) scores: for testing and small inputs."""
    _check(q, k, v, tau, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    allowed, c, flag = _prepare(q, k, tau, cu_seqlens_q, cu_seqlens_k, causal, scale)
    out, lse = reference.temperature_attention(_dense(q), _dense(k), _dense(v), c, allowed, False)
    out = _poison(out[0].transpose(0, 1).to(q.dtype), flag)
    return out.contiguous(), _poison(lse[0].transpose(0, 1), flag).contiguous()


def _reference_backward(grad_out, grad_lse, q, k, v, tau, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        causal, scale, out, lse):
    _check_backward(grad_out, grad_lse, q, k, v, tau, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    scale, out, lse)
    allowed, c, flag = _prepare(q, k, tau, cu_seqlens_q, cu_seqlens_k, causal, scale)
    gl = None if grad_lse is None else grad_lse.transpose(0, 1).unsqueeze(0)
    dq, dk, dv, rowdot = reference.temperature_attention_backward(
        _dense(grad_out), gl, _dense(q), _dense(k), _dense(v), c, allowed, False
    )
    dtau_rows = (-rowdot * (c / _scale(q, scale)))[0].transpose(0, 1)  # dtau = -(q . dq) / tau per row
    grads = (
        dq[0].transpose(0, 1).to(q.dtype),
        dk[0].transpose(0, 1).to(k.dtype),
        dv[0].transpose(0, 1).to(v.dtype),
        dtau_rows.sum_to_size(tau.shape).to(tau.dtype),
    )
    return tuple(_poison(g, flag).contiguous() for g in grads)


# ---------------------------------------------------------------- Triton kernels
def _triton_forward(q, k, v, tau, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
    if q.is_cuda and q.dtype == torch.float64:  # as the dense op: Triton 3.6 cannot lower fp64 on sm_90
        return _reference_forward(q, k, v, tau, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                  scale)
    _check(q, k, v, tau, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    from ..triton_kernels import temperature_attention_varlen as kernels  # lazily: lands with its own branch

    return kernels.attention_varlen_fwd(
        q, k, v, tau.expand(q.shape[0], q.shape[1]), _scale(q, scale), cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, causal,
    )


def _triton_backward(grad_out, grad_lse, q, k, v, tau, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     causal, scale, out, lse):
    if q.is_cuda and q.dtype == torch.float64:
        return _reference_backward(grad_out, grad_lse, q, k, v, tau, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, causal, scale, out, lse)
    _check_backward(grad_out, grad_lse, q, k, v, tau, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    scale, out, lse)
    from ..triton_kernels import temperature_attention_varlen as kernels

    dq, dk, dv, dtau_rows = kernels.attention_varlen_bwd(
        grad_out, grad_lse, q, k, v, tau.expand(q.shape[0], q.shape[1]), _scale(q, scale), cu_seqlens_q,
        cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, out, lse,
    )
    # per-row dtau summed to tau's own shape: a deterministic reduction, as the dense op's
    return dq, dk, dv, dtau_rows.sum_to_size(tau.shape).to(tau.dtype).contiguous()


register_kernels("temperature_attention_varlen", _reference_forward, _triton_forward)
register_kernels("temperature_attention_varlen_backward", _reference_backward, _triton_backward)
