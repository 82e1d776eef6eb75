"""Reference of attention with a learned temperature (seed 001, section 5).

    out[b, h, i] = softmax_j(c[b, h, i] * q[b, h, i] . k[b, g(h), j]) @ v[b, g(h)],   c = scale / tau

with g(h) = h // (Hq / Hkv) (grouped-query attention) and only the allowed keys j: those with
``attn_mask[b, h, i, j]`` True and, when causal, j <= i + (Tk - Tq) (bottom-right alignment, as in
decoding). A row with no allowed key has out = 0, lse = -inf and zero gradients.

NaN/Inf rule (every backend implements it; the tests compare NaN positions exactly):

- Keys a row may not attend never matter: NaN/Inf in the k or v row of a key excluded by the mask
  or by causality reaches no output and no gradient.
- A row with no allowed key: out 0, lse -inf, zero gradients, whatever its q, tau, k and v hold.
- Any other row is NaN (every element of out, and lse) when c = scale / tau (formed in the compute
  dtype by true division) is not finite -- tau <= 0, NaN or +-inf, or a tau so small (subnormal)
  that scale / tau overflows -- or when its q row, or the k row or the v row of any key it may
  attend, holds a NaN or +-inf. Every other row is exactly what it would be with those values
  replaced by finite ones. (A row is all NaN or all valid: a non-finite v element does not only
  poison its column, so that one per-key flag decides it.)
- Gradients: a NaN row, and a row whose grad_out row or grad_lse is not finite (if it has an
  allowed key), gets NaN dq and dtau and makes the whole dk and dv rows of every key it may attend
  NaN. Every other gradient element is exactly that of the same finite computation.
- Overflow of finite inputs: scores are formed in the compute dtype (fp32, fp64 for fp64). A score
  that overflows to +inf makes its row NaN as above; one that overflows to -inf weighs 0 (and a row
  whose every score does has out 0 and lse -inf). Where exactly a product overflows depends on the
  evaluation order (the C++ backend forms c * q first, the fp16/bf16 C++ path in q's dtype), so
  only this corner (|c q.k| near the dtype's largest value) may differ between backends.

These functions materialize the (Tq, Tk) scores; the fused kernels never do. They compute in fp32
(fp64 for fp64 inputs) and take the canonical arguments of the op: ``c`` (B, Hq, Tq) in the compute
dtype (see :func:`temperature_coefficient`: NaN where tau is bad; the ops zero it on rows without
an allowed key) and a bool mask broadcastable to (B, Hq, Tq, Tk) or None. They implement the rule
above by computing on copies whose non-finite entries are 0 and writing the NaNs afterwards, from
per-row and per-key flags, so that a NaN never meets a zero weight (0 * NaN = NaN would leak it).
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
    """c = scale / tau expanded to ``shape`` (B, Hq, Tq), contiguous; NaN where tau is not positive
    finite or where scale / tau overflows (a subnormal tau).

    The quotient is a true division in ``dtype`` of scale (rounded to ``dtype``) by tau, as the C++
    and Triton kernels form it (``scale / t`` on a tensor would multiply by 1 / t, which overflows
    for more taus). ``has_keys`` (bool, broadcastable to ``shape``; see :func:`rows_with_keys`) sets
    c = 0 on rows without an allowed key, so that their tau, whatever it is, cannot reach any output
    or gradient.
    """
    t = tau.to(dtype)
    c = torch.full((), scale, dtype=dtype, device=t.device) / t
    valid = (t > 0) & torch.isfinite(t) & torch.isfinite(c)
    c = torch.where(valid, c, torch.full((), math.nan, dtype=dtype, device=t.device))
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
    """(B, Hq, T, ...) -> (B, Hkv, G, T, ...): query heads grouped by the key/value head they read."""
    return q.reshape(q.shape[0], Hkv, q.shape[1] // Hkv, *q.shape[2:])


def _finite(x: Tensor) -> Tensor:
    """x with every NaN/Inf replaced by 0: what the arithmetic sees (the flags carry the NaNs)."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


class _Rows:
    """Per-row facts of one call, in grouped shapes: allowed (B, Hkv, G, Tq, Tk) or None (every key),
    nonempty and bad (B, Hkv, G, Tq), and c_run: c with 0 on bad rows and wherever c is not finite."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, c: Tensor, attn_mask: Optional[Tensor], causal: bool):
        B, Hq, Tq, _ = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        allowed = allowed_keys(B, Hq, Tq, Tk, attn_mask, causal, q.device)
        self.allowed = None if allowed is None else _grouped(allowed.expand(B, Hq, Tq, Tk), Hkv)
        G = Hq // Hkv
        if self.allowed is None:
            self.nonempty = torch.ones(B, Hkv, G, Tq, dtype=torch.bool, device=q.device)
        else:
            self.nonempty = self.allowed.any(-1)
        key_bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (B, Hkv, Tk)
        if self.allowed is None:
            meets_bad_key = key_bad.any(-1)[:, :, None, None]
        else:
            meets_bad_key = (self.allowed & key_bad[:, :, None, None, :]).any(-1)
        cg = _grouped(c, Hkv)
        row_bad = ~torch.isfinite(cg) | ~torch.isfinite(_grouped(q, Hkv)).all(-1) | meets_bad_key
        self.bad = self.nonempty & row_bad
        self.c_run = torch.where(self.bad | ~torch.isfinite(cg), torch.zeros((), dtype=c.dtype, device=c.device), cg)

    def keys_met_by(self, rows: Tensor) -> Tensor:
        """(B, Hkv, Tk, 1) bool: the keys some row in ``rows`` (B, Hkv, G, Tq) may attend."""
        if self.allowed is None:
            return rows.flatten(2).any(-1)[:, :, None, None]
        return (self.allowed & rows[..., None]).flatten(2, 3).any(2)[..., None]


def _probabilities(q, k, rows: _Rows) -> Tuple[Tensor, Tensor]:
    """Softmax probabilities P (B, Hkv, G, Tq, Tk) and lse (B, Hkv, G, Tq) of the finite copies q, k
    at c_run, in the compute dtype. A row whose scores overflow to +inf joins rows.bad (its P is set
    to 0, so that it cannot leak into keys it may not attend)."""
    s = torch.einsum("bhgid,bhjd->bhgij", _grouped(q, k.shape[1]), k) * rows.c_run.unsqueeze(-1)
    if rows.allowed is not None:
        s = s.masked_fill(~rows.allowed, -math.inf)
    m = s.amax(dim=-1, keepdim=True)
    # Rows with no allowed key have m = -inf; shifting by 0 there keeps exp(-inf) = 0, not NaN.
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    lse = (m + torch.log(denom)).squeeze(-1)
    p = torch.where(denom == 0, torch.zeros_like(p), p / denom)
    overflow = torch.isnan(lse) | (lse == math.inf)  # a +inf score: inf - inf (no host sync: may run on CUDA)
    rows.bad = rows.bad | (overflow & rows.nonempty)
    p = torch.where(overflow[..., None], torch.zeros_like(p), p)
    return p, lse


def _ungroup(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


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
    rows = _Rows(q, k, v, c, attn_mask, causal)
    p, lse = _probabilities(_finite(q), _finite(k), rows)
    out = torch.einsum("bhgij,bhjd->bhgid", p, _finite(v))
    out = out.masked_fill(rows.bad[..., None], math.nan)
    lse = lse.masked_fill(rows.bad, math.nan)
    return _ungroup(out), _ungroup(lse)


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
    Computed on the finite copies; then NaN where the module docstring's rule puts it.
    """
    cd = compute_dtype(q.dtype)
    q, k, v, c, g = q.to(cd), k.to(cd), v.to(cd), c.to(cd), grad_out.to(cd)
    Hkv = k.shape[1]
    if k.shape[2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), q.new_zeros(q.shape[:3])
    rows = _Rows(q, k, v, c, attn_mask, causal)
    qf, kf, vf = _finite(q), _finite(k), _finite(v)
    p, _ = _probabilities(qf, kf, rows)
    grad_bad = ~torch.isfinite(_grouped(g, Hkv)).all(-1)
    gg = _grouped(_finite(g), Hkv)
    dv = torch.einsum("bhgij,bhgid->bhjd", p, gg)
    dp = torch.einsum("bhgid,bhjd->bhgij", gg, vf)
    delta = (dp * p).sum(-1, keepdim=True)  # = rowsum(dO * O)
    if grad_lse is not None:
        gl = _grouped(grad_lse.to(cd), Hkv)
        grad_bad = grad_bad | ~torch.isfinite(gl)
        delta = delta - _finite(gl).unsqueeze(-1)
    ds = p * (dp - delta) * rows.c_run.unsqueeze(-1)
    dq = torch.einsum("bhgij,bhjd->bhgid", ds, kf)
    dk = torch.einsum("bhgij,bhgid->bhjd", ds, _grouped(qf, Hkv))
    rowdot = (_grouped(qf, Hkv) * dq).sum(-1)
    nan_rows = rows.bad | (rows.nonempty & grad_bad)
    dq = dq.masked_fill(nan_rows[..., None], math.nan)
    rowdot = rowdot.masked_fill(nan_rows, math.nan)
    met = rows.keys_met_by(nan_rows)
    dk = dk.masked_fill(met, math.nan)
    dv = dv.masked_fill(met, math.nan)
    return _ungroup(dq), dk, dv, _ungroup(rowdot)
