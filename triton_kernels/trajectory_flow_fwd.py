"""Triton forward kernel of the windowed trajectory flow (out and the (n, a) stats).

Launched by :func:`trajectory_flow_fwd_stats` (and by the backward without stats) in
triton_kernels/trajectory_flow.py, whose docstring holds the notation, the one-program-per-tile
design and the byte counts. Shared device helpers: trajectory_flow_helpers.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .trajectory_flow_helpers import _flow_tile, _load_rows, _recency, _tanh_nonneg, _ws


@triton.jit
def _step_norms(x_ptr, row0, i, T, D, scr, base, SLOT, EPS: tl.constexpr, CDT: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """n_i of the steps i (BLOCK_R indices, any values) over all of D; stores n, u = t/n (-1 for a
    step that does not count) and t into the scratch slot at i - base (+0, +SLOT, +2 SLOT)."""
    i_ok = (i >= 0) & (i < T - 1)
    ss = tl.zeros([BLOCK_R, BLOCK_D], dtype=CDT)
    l1 = tl.zeros([BLOCK_R, BLOCK_D], dtype=CDT)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = i_ok[:, None] & (cols < D)[None, :]
        d = _load_rows(x_ptr, row0, i + 1, D, cols, m).to(CDT) - _load_rows(x_ptr, row0, i, D, cols, m).to(CDT)
        ss += d * d
        l1 += tl.abs(d)
    # Plain sum of squares like torch.linalg.vector_norm (no rescaling: it under/overflows the
    # same way), except that torch returns |d| over a size-1 dim, so D == 1 does too.
    n = tl.sqrt(tl.sum(ss, axis=1))
    if D == 1:
        n = tl.sum(l1, axis=1)
    th = _tanh_nonneg(n)
    counted = i_ok & (n > tl.full([], EPS, CDT))  # False for NaN norms
    tl.store(scr + i - base, n)
    tl.store(scr + SLOT + i - base, tl.where(counted, th / tl.where(counted, n, 1.0), -1.0))
    tl.store(scr + 2 * SLOT + i - base, th)
    return n


@triton.jit
def _fwd_kernel(x_ptr, out_ptr, n_ptr, a_ptr, scr_ptr, st_ptr, bad_ptr, T, D, window, K, KH, SLOT,
                n_t_tiles, EPS: tl.constexpr, CDT: tl.constexpr, VARLEN: tl.constexpr,
                WRITE_OUT: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """out rows [p0, p0+BLOCK_T) of one sequence; x, out: (B, T, D); n, a: (B, T) stats.

    Grid: B * n_t_tiles. Scratch: 3 * SLOT per program (n, u, t of the steps p0-KH .. p0+BT-1;
    KH = K rounded up to BLOCK_H). Phase 1 reduces over D for the halo and own steps; phase 2
    walks D backwards writing out = num / S.
    """
    pid = tl.program_id(0)
    b = pid // n_t_tiles
    p0 = (pid % n_t_tiles) * BLOCK_T
    row0 = b.to(tl.int64) * T
    scr = scr_ptr + pid.to(tl.int64) * (3 * SLOT)
    base = p0 - KH
    # halo chunks holding only steps < 0 (the first tiles) are skipped: their slots are never read
    for h in range(tl.maximum(KH - p0, 0) // BLOCK_H * BLOCK_H, KH, BLOCK_H):
        _step_norms(x_ptr, row0, base + h + tl.arange(0, BLOCK_H), T, D, scr, base, SLOT,
                    EPS, CDT, BLOCK_H, BLOCK_D)
    p = p0 + tl.arange(0, BLOCK_T)
    p_ok = p < T
    n_own = _step_norms(x_ptr, row0, p, T, D, scr, base, SLOT, EPS, CDT, BLOCK_T, BLOCK_D)
    tl.debug_barrier()  # the scratch written above is read back by other threads of the program
    ws = _ws(p, T, window, st_ptr, VARLEN)
    S = tl.zeros([BLOCK_T], dtype=CDT)
    for k in range(1, K + 1):
        ok = p_ok & (k <= ws)
        u = tl.load(scr + SLOT + p - k - base, mask=ok, other=-1.0)
        th = tl.load(scr + 2 * SLOT + p - k - base, mask=ok, other=0.0)
        S += tl.where(u >= 0, _recency(ws, k, CDT) * th, 0.0)
    pos = S > 0
    S1 = tl.where(pos, S, 1.0)
    if VARLEN:
        bad = tl.load(bad_ptr) != 0
    a = tl.where(pos, 1 / S1, 0.0)
    if VARLEN:
        a = tl.where(bad, float("nan"), a)
        n_own = tl.where(bad, float("nan"), n_own)
    tl.store(n_ptr + row0 + p, n_own, mask=p_ok)
    tl.store(a_ptr + row0 + p, a, mask=p_ok)
    if WRITE_OUT:
        nd = tl.cdiv(D, BLOCK_D)
        for c in range(0, nd):
            cols = (nd - 1 - c) * BLOCK_D + tl.arange(0, BLOCK_D)
            c_ok = cols < D
            m = p_ok[:, None] & c_ok[None, :]
            x_p = _load_rows(x_ptr, row0, p, D, cols, m).to(CDT)
            num = _flow_tile(x_ptr, scr + SLOT - base, row0, p, p_ok, ws, K, D, cols, c_ok, x_p, CDT)
            # num / S like the reference (1/S overflows for a subnormal S), exactly 0 where S = 0.
            out = tl.where(pos[:, None], num / S1[:, None], 0.0)
            if VARLEN:
                out = tl.where(bad, float("nan"), out)
            offs = (row0 + p)[:, None] * D + cols[None, :]
            tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)
