"""Reference of attention with a learned temperature (seed 001, section 5).

    out[b, h, i] = softmax_j(c[b, h, i] * q[b, h, i] . k[b, g(h), j]) @ v[b, g(h)],   c = scale / tau

with g(h) = h // (Hq / Hkv) (grouped-query attention) and only the allowed keys j: those with
``attn_mask[b, h, i, j]`` True and, when causal, j <= i + (Tk - Tq) (bottom-right alignment, as in
decoding). A row with no allowed key has out = 0, lse = -inf and zero gradients.

Temperature: tau must be a positive finite number. Wherever it is not (tau <= 0, NaN, +-inf), c is
NaN, so that row's out and lse are NaN (if it has an allowed key); the gradients of k and v then
are NaN too, since every key meets that row. This is checked without a host sync, so it costs the
fast path nothing and cannot go unnoticed.

These functions materialize the (Tq, Tk) scores; the fused kernels never do. They compute in fp32
(fp64 for fp64 inputs) and take the canonical arguments of the op: ``c`` (B, Hq, Tq) in the compute
dtype (see :func:`temperature_coefficient`: the ops zero it on rows without an allowed key) and a
bool mask broadcastable to (B, Hq, Tq, Tk) or None.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._common import compute_dtype

__all__ = [
    "allowed_keys",
    "rows_with_keys",
    "temperature_attention",
    "temperature_attention_backward",
    "temperature_coefficient",
]


def temperature_coefficient(
    tau: Tensor, shape: Tuple[int, int, int], scale: float, dtype: torch.dtype, has_keys: Optional[Tensor] = None
) -> Tensor:
    """c = scale / tau expanded to ``shape`` (B, Hq, Tq), contiguous, NaN where tau is not positive finite.

    ``has_keys`` (bool, broadcastable to ``shape``; see :func:`rows_with_keys`) sets c = 0 on rows
    without an allowed key, so that their tau, whatever it is, cannot reach any output or gradient.
    """
    t = tau.to(dtype)
    valid = (t > 0) & torch.isfinite(t)
    c = torch.where(valid, scale / t, torch.full((), math.nan, dtype=dtype, device=t.device))
    if has_keys is not None:
        c = torch.where(has_keys, c, torch.zeros((), dtype=dtype, device=t.device))
    return c.expand(shape).contiguous()


def rows_with_keys(
    B: int, Hq: int, Tq: int, Tk: int, attn_mask: Optional[Tensor], causal: bool, device: torch.device
) -> Optional[Tensor]:
    """Bool broadcastable to (B, Hq, Tq): rows with at least one allowed key; None when all have one."""
    if attn_mask is None:
        if not causal or Tq <= Tk:
            return None if Tk > 0 else torch.zeros((), dtype=torch.bool, device=device)
        return torch.arange(Tq, device=device) >= Tq - Tk  # bottom-right causal: row i sees j <= i + Tk - Tq
    return allowed_keys(B, Hq, Tq, Tk, attn_mask, causal, device).any(-1)


def allowed_keys(
    B: int, Hq: int, Tq: int, Tk: int, attn_mask: Optional[Tensor], causal: bool, device: torch.device
) -> Optional[Tensor]:
    """Bool mask broadcastable to (B, Hq, Tq, Tk) of the keys each query may attend, or None (all)."""
    allowed = None
    if causal:
        i = torch.arange(Tq, device=device).unsqueeze(1)
        j = torch.arange(Tk, device=device).unsqueeze(0)
        allowed = j <= i + (Tk - Tq)
    if attn_mask is not None:
        allowed = attn_mask if allowed is None else attn_mask & allowed
    return allowed


def _grouped(q: Tensor, Hkv: int) -> Tensor:
    """(B, Hq, T, D) -> (B, Hkv, G, T, D): query heads grouped by the key/value head they read."""
    B, Hq, T, D = q.shape
    return q.reshape(B, Hkv, Hq // Hkv, T, D)


def _probabilities(q, k, c, attn_mask, causal) -> Tuple[Tensor, Tensor]:
    """Softmax probabilities P (B, Hkv, G, Tq, Tk) and lse (B, Hq, Tq), in the compute dtype."""
    B, Hq, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    s = torch.einsum("bhgid,bhjd->bhgij", _grouped(q, Hkv), k) * _grouped(c.unsqueeze(-1), Hkv)
    allowed = allowed_keys(B, Hq, Tq, Tk, attn_mask, causal, q.device)
    if allowed is not None:
        allowed = _grouped(allowed.expand(B, Hq, Tq, Tk), Hkv)
        s = s.masked_fill(~allowed, -math.inf)
    m = s.amax(dim=-1, keepdim=True)
    # Rows with no allowed key have m = -inf; shifting by 0 there keeps exp(-inf) = 0, not NaN.
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    lse = (m + torch.log(denom)).squeeze(-1).reshape(B, Hq, Tq)
    p = torch.where(denom == 0, torch.zeros_like(p), p / denom)  # a NaN row (bad tau) stays NaN
    return p, lse


def temperature_attention(
    q: Tensor, k: Tensor, v: Tensor, c: Tensor, attn_mask: Optional[Tensor] = None, causal: bool = False
) -> Tuple[Tensor, Tensor]:
    """out (B, Hq, Tq, Dv) in the compute dtype and lse (B, Hq, Tq) (natural log, -inf for empty rows).

    q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv), c (B, Hq, Tq) = scale / tau.
    """
    cd = compute_dtype(q.dtype)
    q, k, v, c = q.to(cd), k.to(cd), v.to(cd), c.to(cd)
    if k.shape[2] == 0:  # no keys at all: every row is empty
        return q.new_zeros(q.shape[:3] + v.shape[3:]), q.new_full(q.shape[:3], -math.inf)
    p, lse = _probabilities(q, k, c, attn_mask, causal)
    out = torch.einsum("bhgij,bhjd->bhgid", p, v).reshape(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    return out, lse


def temperature_attention_backward(
    grad_out: Tensor,
    grad_lse: Optional[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    c: Tensor,
    attn_mask: Optional[Tensor] = None,
    causal: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv (compute dtype) and rowdot (B, Hq, Tq) = q . dq, from which dtau = -rowdot / tau.

    With S = c * q k^T, P = softmax(S): dV = P^T dO, dS = P * (dO V^T - delta) where
    delta = rowsum(dO * O) - grad_lse, dq = c * dS K and dk = (c * dS)^T q (summed over the group).
    """
    cd = compute_dtype(q.dtype)
    q, k, v, c, g = q.to(cd), k.to(cd), v.to(cd), c.to(cd), grad_out.to(cd)
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    if k.shape[2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), q.new_zeros(q.shape[:3])
    p, _ = _probabilities(q, k, c, attn_mask, causal)
    gg = _grouped(g, Hkv)
    dv = torch.einsum("bhgij,bhgid->bhjd", p, gg)
    dp = torch.einsum("bhgid,bhjd->bhgij", gg, v)
    delta = (dp * p).sum(-1, keepdim=True)  # = rowsum(dO * O)
    if grad_lse is not None:
        delta = delta - _grouped(grad_lse.to(cd).unsqueeze(-1), Hkv)
    ds = p * (dp - delta) * _grouped(c.unsqueeze(-1), Hkv)
    dq = torch.einsum("bhgij,bhjd->bhgid", ds, k).reshape(B, Hq, Tq, D)
    dk = torch.einsum("bhgij,bhgid->bhjd", ds, _grouped(q, Hkv))
    rowdot = (q * dq).sum(-1)
    return dq, dk, dv, rowdot
