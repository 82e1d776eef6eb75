"""Device helpers shared by the trajectory-flow Triton kernels (trajectory_flow_fwd.py,
trajectory_flow_bwd.py): tanh, recency weights, window sizes, row tiles and the windowed sum.
Notation: the docstring of triton_kernels/trajectory_flow.py.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh_nonneg(x):
    """tanh(x) for x >= 0 in x's dtype; +inf -> 1, NaN -> NaN.

    The interpreter has no tanh, and 1 - 2 / (exp(2x) + 1) loses the relative precision of small
    x, so x < 0.3 uses the odd Taylor series through x^23 (relative error < 1e-15 in fp64 there).
    Coefficients go through tl.full so that fp64 keeps them in fp64 (bare float literals become
    fp32 constants).
    """
    dt = x.dtype
    x2 = x * x
    p = tl.full([], -3.927832388331683e-05, dt)
    p = p * x2 + tl.full([], 9.691537956929451e-05, dt)
    p = p * x2 + tl.full([], -0.00023912911424355248, dt)
    p = p * x2 + tl.full([], 0.000590027440945586, dt)
    p = p * x2 + tl.full([], -0.0014558343870513183, dt)
    p = p * x2 + tl.full([], 0.003592128036572481, dt)
    p = p * x2 + tl.full([], -0.008863235529902197, dt)
    p = p * x2 + tl.full([], 0.021869488536155203, dt)
    p = p * x2 + tl.full([], -0.05396825396825397, dt)
    p = p * x2 + tl.full([], 0.13333333333333333, dt)
    p = p * x2 + tl.full([], -0.3333333333333333, dt)
    small = x + x * (p * x2)
    big = 1 - 2 / (tl.exp(2 * x) + 1)
    return tl.where(x < 0.3, small, big)


@triton.jit
def _recency(ws, k, CDT: tl.constexpr):
    """r(p, k) = (ws_p - k + 1) / ws_p, computed like the reference (meaningful for 1 <= k <= ws)."""
    return (ws - k + 1).to(CDT) / tl.maximum(ws, 1).to(CDT)


@triton.jit
def _ws(p, T, window, st_ptr, VARLEN: tl.constexpr):
    """Window sizes of positions p (any int vector; < 1 outside [1, T)): min(window, p - start(p)).
    start(p) is clamped into [0, p] whatever the offsets, so ws never reaches before row 0."""
    if VARLEN:
        start = tl.load(st_ptr + p, mask=(p >= 0) & (p < T), other=0)
        return tl.minimum(p - tl.minimum(tl.maximum(start, 0), p), window)
    return tl.minimum(p, window)


@triton.jit
def _load_rows(ptr, row0, rows, D, cols, mask):
    """(len(rows), len(cols)) tile of a (B*T, D) row-major tensor; row0 is int64, masked -> 0."""
    offs = (row0 + rows)[:, None] * D + cols[None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _flow_tile(x_ptr, ub, row0, p, p_ok, ws, K, D, cols, c_ok, x_p, CDT: tl.constexpr):
    """sum_k r(p, k) u_{p-k} d_{p-k} over counted steps (u = t/n read at ub + i, < 0: not
    counted) for a tile of rows p. x_p is the loaded tile x[p]; the steps are rebuilt as
    x[i+1] - x[i] (like the reference) walking back one row per k: one shifted (L1) load per k."""
    acc = tl.zeros(x_p.shape, dtype=CDT)
    prev = x_p
    for k in range(1, K + 1):
        i = p - k
        ok = p_ok & (k <= ws)  # k <= ws also means i >= start(p)
        cur = _load_rows(x_ptr, row0, i, D, cols, ok[:, None] & c_ok[None, :]).to(CDT)
        u = tl.load(ub + i, mask=ok, other=-1.0)
        acc += tl.where((u >= 0)[:, None], (_recency(ws, k, CDT) * u)[:, None] * (prev - cur), 0.0)
        prev = cur
    return acc
