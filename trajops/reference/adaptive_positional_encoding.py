"""Reference of adaptive_positional_encoding (the trajectory-adaptive positional encoding lookup).

Vectorized (no Python loop over positions), differentiable through plain autograd. The semantic
positions are accumulated in fp64 for every dtype (see :func:`semantic_positions`); the table
interpolation runs in fp32 (fp64 for fp64 inputs) before casting back to the table's dtype.

NaN/Inf rule (every backend, forward and backward, the same NaN positions): IEEE arithmetic on the
formula, read where the formula reads.

* s = positions + cumsum(displacement) (fp64): a NaN displacement (or +inf and -inf in one row)
  makes s NaN from its position to the end of the row; a NaN position only its own s.
* A NaN s gives a NaN output row (table rows 0 and min(1, L-1) are read with a NaN weight);
  s = +-inf clamps to the table's ends (out = pe[L-1] or pe[0]).
* A NaN/Inf in a table row reaches every output that reads the row, even with weight 0
  (0 * inf = NaN; also at s >= L-1, where f = c = L-1); rows an output does not read never matter.
* Backward: dL/ds is clamp's: 0 where s is NaN or outside [0, L-1] (a NaN s passes no gradient to
  displacement or positions), else grad_out . (pe[c] - pe[f]) with NaN/Inf propagating; the
  reverse cumsum carries a NaN/Inf of dL/ds to the earlier positions of its row only. The table
  gradient gets (1 - a) grad_out in row f and a grad_out in row c: a NaN s puts NaN into rows 0
  and min(1, L-1), a NaN/Inf grad_out into the rows its position reads.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._common import compute_dtype as _compute_dtype

__all__ = [
    "adaptive_positional_encoding",
    "adaptive_positional_encoding_backward",
    "semantic_positions",
    "sinusoidal_table",
]


def sinusoidal_table(max_len: int, embedding_dim: int, dtype: torch.dtype = torch.float32,
                     device: Optional[torch.device] = None) -> Tensor:
    """The standard sinusoidal table (max_len, embedding_dim), built in fp32 like the seed.

    pe[p, 2i] = sin(p * w_i), pe[p, 2i + 1] = cos(p * w_i), w_i = exp(-2i ln(10000) / embedding_dim).
    An odd embedding_dim keeps its last sine column (the seed cannot build that table at all).
    """
    pos = torch.arange(max_len, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, embedding_dim, 2, device=device, dtype=torch.float32)
                     * -(math.log(10000.0) / embedding_dim))
    angle = pos * freq
    pe = torch.zeros(max_len, embedding_dim, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : embedding_dim // 2])
    return pe.to(dtype)


def semantic_positions(displacement: Tensor, positions: Optional[Tensor] = None) -> Tensor:
    """s[b, t] = positions[(b,) t] + sum_{j <= t} displacement[b, j], in fp64; shape (B, T).

    fp64 because a position near 8192 keeps only ~11 fractional bits in fp32, and those bits are
    the interpolation weight; the scan is O(B T) next to the O(B T E) lookup, so it costs nothing.
    ``positions`` None means 0, 1, ..., T-1.
    """
    d = displacement.unsqueeze(0) if displacement.dim() == 1 else displacement
    s = torch.cumsum(d.to(torch.float64), dim=1)
    if positions is None:
        return s + torch.arange(d.shape[1], device=d.device, dtype=torch.float64)
    return s + positions.to(torch.float64)


def _lookup_terms(s: Tensor, L: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(clamped position p, its floor f, floor index, ceil index, in-range mask) for semantic positions s.

    NaN positions read rows 0 and min(1, L-1) with a NaN weight, so their output rows are NaN
    (and no index is ever out of the table).
    """
    p = s.clamp(0, L - 1)
    f = p.detach().floor()
    fi = f.nan_to_num(0.0).long()
    ci = (fi + 1).clamp(max=L - 1)
    inside = (s >= 0) & (s <= L - 1)  # clamp's own gradient mask (closed interval, False for NaN)
    return p, f, fi, ci, inside


def _check_table(pe_table: Tensor) -> None:
    if pe_table.dim() != 2 or pe_table.shape[0] < 1:
        raise ValueError(f"adaptive_positional_encoding: pe_table must have shape (max_len, E) with "
                         f"max_len >= 1, got shape {list(pe_table.shape)}")


def adaptive_positional_encoding(displacement: Tensor, pe_table: Tensor, positions: Optional[Tensor] = None) -> Tensor:
    """Reference lookup (see :func:`trajops.adaptive_positional_encoding` for the contract).

    With s = positions + cumsum(displacement) along T (fp64), p = clamp(s, 0, L-1), f = floor(p),
    c = min(f + 1, L-1), a = p - f:  out[b, t] = (1 - a) pe_table[f] + a pe_table[c].
    displacement (B, T) or (T,), pe_table (L, E) -> (B, T, E) or (T, E).
    """
    _check_table(pe_table)
    L = pe_table.shape[0]
    cdt = _compute_dtype(pe_table.dtype)
    p, f, fi, ci, _ = _lookup_terms(semantic_positions(displacement, positions), L)
    a = (p - f).to(cdt).unsqueeze(-1)  # floor has no gradient: a carries d/ds = 1 inside the range
    pe = pe_table.to(cdt)
    out = ((1 - a) * pe[fi] + a * pe[ci]).to(pe_table.dtype)
    return out.squeeze(0) if displacement.dim() == 1 else out


def adaptive_positional_encoding_backward(
    grad_out: Tensor, displacement: Tensor, pe_table: Tensor, positions: Optional[Tensor] = None,
    need_table: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Analytic gradients of :func:`adaptive_positional_encoding`, vectorized.

    gs[b, t] = [0 <= s <= L-1] * sum_e grad_out[b, t, e] (pe[c, e] - pe[f, e])   (dL/ds)
    grad_displacement[b, j] = sum_{t >= j} gs[b, t]                             (reverse cumsum, fp64)
    grad_table[f] += (1 - a) grad_out,  grad_table[c] += a grad_out             (need_table only)

    Returns (grad_displacement: displacement's shape and dtype, grad_position: gs in displacement's
    shape and dtype (dL/dpositions before any broadcast reduction), grad_table: (L, E) in the
    table's dtype, or an empty (0,) tensor when not need_table).
    """
    _check_table(pe_table)
    L, E = pe_table.shape
    cdt = _compute_dtype(pe_table.dtype)
    p, f, fi, ci, inside = _lookup_terms(semantic_positions(displacement, positions), L)
    g = (grad_out.unsqueeze(0) if displacement.dim() == 1 else grad_out).to(cdt)
    pe = pe_table.to(cdt)
    gs = (g * (pe[ci] - pe[fi])).sum(-1).to(torch.float64)
    gs = torch.where(inside, gs, torch.zeros_like(gs))
    gd = gs.flip(1).cumsum(1).flip(1)
    if need_table:
        a = (p - f).to(cdt).unsqueeze(-1)
        gt = torch.zeros(L, E, device=pe_table.device, dtype=cdt)
        n = fi.numel()  # explicit row count: reshape(-1, E) is ambiguous when E == 0
        gt.index_add_(0, fi.reshape(n), ((1 - a) * g).reshape(n, E))
        gt.index_add_(0, ci.reshape(n), (a * g).reshape(n, E))
        gt = gt.to(pe_table.dtype)
    else:
        gt = pe_table.new_empty(0)
    shape = displacement.shape
    return gd.to(displacement.dtype).reshape(shape), gs.to(displacement.dtype).reshape(shape), gt
