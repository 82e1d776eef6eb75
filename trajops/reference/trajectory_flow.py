"""Reference of trajectory_flow (the windowed trajectory flow of the trajectory-guided MoE router).

Vectorized (no Python loop over the sequence), differentiable through plain autograd, computed in fp32
(fp64 for fp64 inputs) before casting back to the input dtype.

NaN/Inf rule (every backend, forward and backward, the same NaN positions):

* A step d_i = x[i+1] - x[i] counts iff its norm n_i > eps, the seed's test. A step holding a NaN
  has a NaN norm, fails the test and is skipped like a zero step: the outputs stay finite and its
  rows get no gradient through it. This is the one place a NaN input is not propagated, kept so
  that ``nn.TrajectoryGuidedMoERouter`` stays the seed's drop-in (the seed skips such steps too).
* A step with an infinite component (and no NaN) has n_i = inf: it counts with weight tanh(inf) = 1
  and direction d_i / n_i, which is NaN in its infinite components and 0 in the others, so exactly
  those components of every output whose window holds the step are NaN. (A finite step whose norm
  overflows the dtype likewise counts with direction 0.)
* Backward: the analytic gradient below in IEEE arithmetic. NaN/Inf in grad_out reaches dx only
  through the counted steps of the positions that carry it (never through skipped steps or a
  position whose window counts nothing); a NaN output makes the gradient of every counted step of
  its window NaN, even where grad_out is 0 (g_p . out_p = 0 * NaN).

Packed sequences (``cu_seqlens``, conventions in :mod:`trajops.varlen`): x is (total, D) or
(1, total, D) and every document is computed as if alone. The only change in the math is that
position p's window uses p's position inside its document, ws = min(window, p - start(p)); the step
from a document's last token to the next document's first is then in no window. It is also masked
out explicitly (it may hold an Inf that would otherwise reach the gradient as 0 * NaN), and every
windowed sum selects instead of multiplying by a zero weight, so that a NaN/Inf of one document
never reaches another.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..varlen import positions_in_document
from ._common import compute_dtype as _compute_dtype

__all__ = ["trajectory_flow", "trajectory_flow_backward", "trajectory_flow_stats"]


def _recency_weights(
    T: int, window: int, device: torch.device, dtype: torch.dtype, pos: Optional[Tensor] = None
) -> Tensor:
    """r[k-1, p]: recency weight of the step d_{p-k} inside out[p], for k = 1..min(window, T-1).

    With ws = min(window, p) the step d_i, i = p-k, has weight (i - (p - ws) + 1) / ws
    = (ws - k + 1) / ws when k <= ws, and is outside the window otherwise. ``pos`` (T,): each
    position's index inside its document (packed input), used instead of p.
    """
    K = min(window, T - 1)
    p = torch.arange(T, device=device) if pos is None else pos
    ws = p.clamp(max=window)
    k = torch.arange(1, K + 1, device=device).unsqueeze(1)
    r = (ws - k + 1).to(dtype) / ws.clamp(min=1).to(dtype)
    return torch.where(k <= ws, r, torch.zeros((), device=device, dtype=dtype))


def _steps(xc: Tensor, eps: float, pos: Optional[Tensor] = None):
    """Unit steps u_i, their norms n_i, and the mask n_i > eps (False for NaN norms and, with
    ``pos``, for the steps into a document's first token, which belong to no document)."""
    d = xc[:, 1:] - xc[:, :-1]
    n = torch.linalg.vector_norm(d, dim=-1)
    m = n > eps
    if pos is not None:
        m = m & (pos[1:] != 0)
    # where() instead of d / n so that masked steps carry no NaN into autograd.
    n_safe = torch.where(m, n, torch.ones_like(n))
    u = torch.where(m.unsqueeze(-1), d / n_safe.unsqueeze(-1), torch.zeros_like(d))
    return u, n, n_safe, m


def _shift_sum(r: Tensor, v: Tensor, T: int, forward: bool, select: bool = False) -> Tensor:
    """Windowed weighted sums along dim 1.

    forward=True:  out[p] = sum_k r[k-1, p] * v[p-k]   (v indexed by step i, length T-1; out length T)
    forward=False: out[i] = sum_k r[k-1, i+k] * v[i+k] (v indexed by position p, length T; out T-1)

    select=True drops the terms whose weight is 0 instead of multiplying them by 0 (packed input:
    there a zero weight means "another document", whose NaN/Inf must not leak in).
    """
    extra = v.dim() - 2
    total = None
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    for k in range(1, r.shape[0] + 1):
        w = r[k - 1, k:].reshape((1, T - k) + (1,) * extra)
        vk = v[:, : T - k] if forward else v[:, k:]
        wv = torch.where(w != 0, w * vk, zero) if select else w * vk
        if forward:
            term = torch.nn.functional.pad(wv, (0, 0) * extra + (k, 0))
        else:
            term = torch.nn.functional.pad(wv, (0, 0) * extra + (0, k - 1))
        total = term if total is None else total + term
    return total


def _flow_terms(xc: Tensor, window: int, eps: float, pos: Optional[Tensor] = None):
    """(u, n, n_safe, mask, r, num, S) for x in the compute dtype, T >= 2: out = num / S where S > 0.

    ``pos`` (T,): positions inside their documents for a packed x (1, T, D), else None.
    """
    T = xc.shape[1]
    u, n, n_safe, m = _steps(xc, eps, pos)
    w = torch.where(m, torch.tanh(n), torch.zeros_like(n))
    r = _recency_weights(T, window, xc.device, xc.dtype, pos)
    sel = pos is not None
    num = _shift_sum(r, w.unsqueeze(-1) * u, T, forward=True, select=sel)
    S = _shift_sum(r, w, T, forward=True, select=sel)
    return u, n, n_safe, m, r, num, S


def _packed_positions(op: str, xb: Tensor, cu_seqlens: Optional[Tensor]) -> Optional[Tensor]:
    """Positions inside their documents of the packed xb (1, total, D), or None without cu_seqlens.

    Valid offsets are assumed (the op layer checks them); no host sync.
    """
    if cu_seqlens is None:
        return None
    if xb.shape[0] != 1:
        raise ValueError(
            f"{op}: x must have shape (total, D) or (1, total, D) when cu_seqlens is given, got shape {list(xb.shape)}"
        )
    return positions_in_document(cu_seqlens, xb.shape[1])


def trajectory_flow(x: Tensor, window: int = 8, eps: float = 1e-6, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """Reference windowed trajectory flow (see :func:`trajops.trajectory_flow` for the contract).

    out[p] = sum_i w_i d_i / n_i / sum_i w_i over the steps d_i = x[i+1] - x[i] with
    i in [p - ws, p - 1], ws = min(window, p), w_i = ((i - (p - ws) + 1) / ws) * tanh(n_i),
    counting only steps with n_i > eps; out[p] = 0 where no step counts. With ``cu_seqlens``
    (x (total, D) or (1, total, D)), p is the position inside its document.
    """
    squeeze = x.dim() == 2
    xb = x.unsqueeze(0) if squeeze else x
    pos = _packed_positions("trajectory_flow", xb, cu_seqlens)
    B, T, D = xb.shape
    cdt = _compute_dtype(x.dtype)
    xc = xb.to(cdt)
    if T < 2:
        # No step exists; where() keeps the zeros attached to x so autograd still works.
        out = torch.where(torch.zeros_like(xc, dtype=torch.bool), xc, torch.zeros_like(xc))
    else:
        _, _, _, _, _, num, S = _flow_terms(xc, window, eps, pos)
        pos = S > 0
        S_safe = torch.where(pos, S, torch.ones_like(S))
        out = torch.where(pos.unsqueeze(-1), num / S_safe.unsqueeze(-1), torch.zeros_like(num))
    out = out.to(x.dtype)
    return out.squeeze(0) if squeeze else out


def trajectory_flow_stats(
    x: Tensor, window: int = 8, eps: float = 1e-6, cu_seqlens: Optional[Tensor] = None
) -> Tensor:
    """The forward's per-row stats (2, B, T) in the compute dtype (B = 1 for 2-D or packed x).

    Not differentiable (computed without autograd). Exactly what the Triton forward writes:

    * ``stats[0, b, i] = n_i = ||x[i+1] - x[i]||`` for i < T-1, NaN for a step touching a NaN row,
      and 0 at i = T-1 (there is no step). With cu_seqlens the rows are the packed tokens and the
      step from a document's last token into the next document's first is still its plain norm
      (stored, but in no window: the backward never reads it).
    * ``stats[1, b, p] = a_p = 1 / S_p``, S_p = sum of r tanh(n) over p's counted steps (n > eps,
      inside p's window and document); 0 where S_p = 0, so 0 at p = 0 and at a document's first
      token. S_p is never NaN (skipped steps add nothing, tanh(inf) = 1).
    * T < 2 (or no element): zeros.
    """
    squeeze = x.dim() == 2
    xb = (x.unsqueeze(0) if squeeze else x).detach()
    pos = _packed_positions("trajectory_flow", xb, cu_seqlens)
    B, T, D = xb.shape
    cdt = _compute_dtype(x.dtype)
    stats = torch.zeros((2, B, T), device=x.device, dtype=cdt)
    if T < 2 or xb.numel() == 0:
        return stats
    _, n, _, _, _, _, S = _flow_terms(xb.to(cdt), window, eps, pos)
    stats[0, :, : T - 1] = n
    stats[1] = torch.where(S > 0, 1.0 / torch.where(S > 0, S, torch.ones_like(S)), torch.zeros_like(S))
    return stats


def trajectory_flow_backward(
    grad_out: Tensor, x: Tensor, window: int = 8, eps: float = 1e-6, cu_seqlens: Optional[Tensor] = None
) -> Tensor:
    """Analytic dL/dx of :func:`trajectory_flow` given dL/dout, vectorized.

    With a_p = 1 / S_p (0 where S_p = 0), q_p = a_p (g_p . out_p), t_i = tanh(n_i):
      V_i = sum_p r_i(p) a_p g_p,  Q_i = sum_p r_i(p) q_p   over p in [i+1, i+window]
      dd_i = [n_i > eps] * ((t_i / n_i) (V_i - (V_i . u_i) u_i) + (1 - t_i^2) (V_i . u_i - Q_i) u_i)
      dx_j = dd_{j-1} - dd_j
    With ``cu_seqlens`` the step into a document's first token has dd = 0 (it is in no window).
    """
    squeeze = x.dim() == 2
    xb = x.unsqueeze(0) if squeeze else x
    gb = grad_out.unsqueeze(0) if squeeze else grad_out
    pos = _packed_positions("trajectory_flow_backward", xb, cu_seqlens)
    sel = pos is not None
    B, T, D = xb.shape
    cdt = _compute_dtype(x.dtype)
    if T < 2:
        dx = torch.zeros((B, T, D), device=x.device, dtype=cdt)
    else:
        xc, g = xb.to(cdt), gb.to(cdt)
        u, n, n_safe, m, r, num, S = _flow_terms(xc, window, eps, pos)
        t = torch.tanh(n)
        a = torch.where(S > 0, 1.0 / torch.where(S > 0, S, torch.ones_like(S)), torch.zeros_like(S))
        out = a.unsqueeze(-1) * num
        q = a * (g * out).sum(-1)
        V = _shift_sum(r, a.unsqueeze(-1) * g, T, forward=False, select=sel)
        Q = _shift_sum(r, q, T, forward=False, select=sel)
        vu = (V * u).sum(-1, keepdim=True)
        dd = (t / n_safe).unsqueeze(-1) * (V - vu * u) + (1 - t * t).unsqueeze(-1) * (vu - Q.unsqueeze(-1)) * u
        dd = torch.where(m.unsqueeze(-1), dd, torch.zeros_like(dd))
        pad = torch.nn.functional.pad
        dx = pad(dd, (0, 0, 1, 0)) - pad(dd, (0, 0, 0, 1))
    dx = dx.to(x.dtype)
    return dx.squeeze(0) if squeeze else dx
