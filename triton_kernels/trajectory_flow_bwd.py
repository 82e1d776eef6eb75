"""Triton backward kernel of the windowed trajectory flow (dL/dx from grad_out and the stats).

Launched by :func:`trajectory_flow_bwd` in triton_kernels/trajectory_flow.py, whose docstring
holds the notation, the one-program-per-tile design and the byte counts. Shared device helpers:
trajectory_flow_helpers.py.

Backward, with ``q_p = a_p (g_p . out_p)``, ``V_i = sum_k r(i+k, k) a_{i+k} g_{i+k}``,
``s_i = V_i . d_i / n_i``, ``Q_i = sum_k r(i+k, k) q_{i+k}``: ``dd_i = alpha_i V_i + beta_i d_i``,
``alpha = t / n``, ``beta = ((1 - t^2)(s - Q) - alpha s) / n`` (counted steps inside one document
only), ``dx_j = dd_{j-1} - dd_j``. The program needs s for steps [p0-1, p0+BT) and q for rows
[p0, p0+BT+K): its own rows give both, a halo of K rows after it gives q (no V), the row p0-1 gives s.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .trajectory_flow_helpers import _flow_tile, _load_rows, _recency, _tanh_nonneg, _ws


@triton.jit
def _qs_rows(x_ptr, g_ptr, n_ptr, a_ptr, st_ptr, ub, qs, row0, p, T, D, window, K, SLOTQ,
             CDT: tl.constexpr, VARLEN: tl.constexpr, WITH_Q: tl.constexpr, WITH_S: tl.constexpr,
             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """q_p = a_p (g_p . out_p) and/or s_p = V_p . d_p / n_p for rows p (BLOCK_R, any values),
    reduced over all of D, stored at qs + p (q) and qs + SLOTQ + p (s)."""
    p_ok = (p >= 0) & (p < T)
    i_ok = (p >= 0) & (p < T - 1)  # row p as a step index
    a = tl.load(a_ptr + row0 + p, mask=p_ok, other=0.0)
    ws = _ws(p, T, window, st_ptr, VARLEN)
    q_acc = tl.zeros([BLOCK_R], dtype=CDT)
    s_acc = tl.zeros([BLOCK_R], dtype=CDT)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_ok = cols < D
        m = p_ok[:, None] & c_ok[None, :]
        x_p = _load_rows(x_ptr, row0, p, D, cols, m).to(CDT)
        if WITH_Q:
            g_p = _load_rows(g_ptr, row0, p, D, cols, m).to(CDT)
            # out_p = a_p * num_p (no S_p = 0 zeroing: the reference's q uses a * num as is).
            num = _flow_tile(x_ptr, ub, row0, p, p_ok, ws, K, D, cols, c_ok, x_p, CDT)
            q_acc += tl.sum(g_p * (a[:, None] * num), axis=1)
        if WITH_S:
            # V_p: the positions p + k whose window holds step p at lag k (same document only).
            v = tl.zeros([BLOCK_R, BLOCK_D], dtype=CDT)
            for k in range(1, K + 1):
                pk = p + k
                ws_k = _ws(pk, T, window, st_ptr, VARLEN)
                ok = i_ok & (pk < T) & (k <= ws_k)
                a_k = tl.load(a_ptr + row0 + pk, mask=ok, other=0.0)
                g_k = _load_rows(g_ptr, row0, pk, D, cols, ok[:, None] & c_ok[None, :]).to(CDT)
                v += tl.where(ok[:, None], (_recency(ws_k, k, CDT) * a_k)[:, None] * g_k, 0.0)
            x_n = _load_rows(x_ptr, row0, p + 1, D, cols, i_ok[:, None] & c_ok[None, :]).to(CDT)
            s_acc += tl.sum(v * (x_n - x_p), axis=1)
    if WITH_Q:
        tl.store(qs + p, a * q_acc)
    if WITH_S:
        n = tl.load(n_ptr + row0 + p, mask=i_ok, other=1.0)
        tl.store(qs + SLOTQ + p, s_acc / n)


@triton.jit
def _dd_coefs(i, row0, T, window, K, n_ptr, st_ptr, qs, SLOTQ, EPS: tl.constexpr,
              CDT: tl.constexpr, VARLEN: tl.constexpr):
    """For step indices i (vector): (counted, alpha, beta) with dd_i = alpha V_i + beta d_i.
    Steps outside 0..T-2, or crossing a document boundary, do not exist (dx's zero pads)."""
    ok = (i >= 0) & (i < T - 1)
    if VARLEN:
        ok = ok & (tl.load(st_ptr + i + 1, mask=ok, other=0) <= i)
    n = tl.load(n_ptr + row0 + i, mask=ok, other=1.0)
    th = _tanh_nonneg(n)
    s = tl.load(qs + SLOTQ + i, mask=ok, other=0.0)
    Q = tl.zeros(i.shape, dtype=CDT)
    for k in range(1, K + 1):
        pk = i + k
        ws = _ws(pk, T, window, st_ptr, VARLEN)
        okk = ok & (pk < T) & (k <= ws)
        q = tl.load(qs + pk, mask=okk, other=0.0)
        Q += tl.where(okk, _recency(ws, k, CDT) * q, 0.0)
    alpha = th / n
    beta = ((1 - th * th) * (s - Q) - alpha * s) / n
    return ok & (n > tl.full([], EPS, CDT)), alpha, beta


@triton.jit
def _bwd_kernel(x_ptr, g_ptr, dx_ptr, n_ptr, a_ptr, scr_ptr, st_ptr, bad_ptr, T, D, window, K, KH,
                SLOTQ, SLOTU, n_t_tiles, EPS: tl.constexpr, CDT: tl.constexpr, VARLEN: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """dx rows [j0, j0+BLOCK_T) of one sequence; x, g, dx: (B, T, D); n, a: (B, T) stats.

    Grid: B * n_t_tiles. Scratch per program: q and s of rows j0-1 .. j0+BT+KH-1 (SLOTQ each),
    u = t/n of the steps j0-KH .. (SLOTU). Phase 0: u; phase 1: q, s over all of D; phase 2
    walks D backwards writing dx_j = dd_{j-1} - dd_j (V_{j-1} and V_j share grad rows j..j+K).
    """
    pid = tl.program_id(0)
    b = pid // n_t_tiles
    j0 = (pid % n_t_tiles) * BLOCK_T
    row0 = b.to(tl.int64) * T
    scr = scr_ptr + pid.to(tl.int64) * (2 * SLOTQ + SLOTU)
    eps = tl.full([], EPS, CDT)
    ubase = j0 - KH
    for h in range(0, SLOTU, BLOCK_S):
        i = ubase + h + tl.arange(0, BLOCK_S)
        ok = (i >= 0) & (i < T - 1)
        n = tl.load(n_ptr + row0 + i, mask=ok, other=0.0)
        counted = ok & (n > eps)
        u = tl.where(counted, _tanh_nonneg(n) / tl.where(counted, n, 1.0), -1.0)
        tl.store(scr + 2 * SLOTQ + h + tl.arange(0, BLOCK_S), u)
    tl.debug_barrier()
    ub = scr + 2 * SLOTQ - ubase
    qs = scr - (j0 - 1)
    j = j0 + tl.arange(0, BLOCK_T)
    _qs_rows(x_ptr, g_ptr, n_ptr, a_ptr, st_ptr, ub, qs, row0, j, T, D, window, K, SLOTQ,
             CDT, VARLEN, True, True, BLOCK_T, BLOCK_D)
    # halo rows past T and the row before 0 are skipped (never read: their loads are masked)
    for h in range(0, tl.minimum(KH, tl.maximum(T - j0 - BLOCK_T, 0)), BLOCK_H):
        _qs_rows(x_ptr, g_ptr, n_ptr, a_ptr, st_ptr, ub, qs, row0, j0 + BLOCK_T + h + tl.arange(0, BLOCK_H),
                 T, D, window, K, SLOTQ, CDT, VARLEN, True, False, BLOCK_H, BLOCK_D)
    if j0 > 0:
        _qs_rows(x_ptr, g_ptr, n_ptr, a_ptr, st_ptr, ub, qs, row0, j0 - 1 + tl.arange(0, 1), T, D, window,
                 K, SLOTQ, CDT, VARLEN, False, True, 1, BLOCK_D)
    tl.debug_barrier()
    use_l, alpha_l, beta_l = _dd_coefs(j - 1, row0, T, window, K, n_ptr, st_ptr, qs, SLOTQ, EPS, CDT, VARLEN)
    use_r, alpha_r, beta_r = _dd_coefs(j, row0, T, window, K, n_ptr, st_ptr, qs, SLOTQ, EPS, CDT, VARLEN)
    j_ok = j < T
    if VARLEN:
        bad = tl.load(bad_ptr) != 0
    nd = tl.cdiv(D, BLOCK_D)
    for c in range(0, nd):
        cols = (nd - 1 - c) * BLOCK_D + tl.arange(0, BLOCK_D)
        c_ok = cols < D
        m = j_ok[:, None] & c_ok[None, :]
        x_l = _load_rows(x_ptr, row0, j - 1, D, cols, (j_ok & (j >= 1))[:, None] & c_ok[None, :]).to(CDT)
        x_c = _load_rows(x_ptr, row0, j, D, cols, m).to(CDT)
        x_r = _load_rows(x_ptr, row0, j + 1, D, cols, (j + 1 < T)[:, None] & c_ok[None, :]).to(CDT)
        v_l = tl.zeros([BLOCK_T, BLOCK_D], dtype=CDT)
        v_r = tl.zeros([BLOCK_T, BLOCK_D], dtype=CDT)
        for mm in range(0, K + 1):
            pm = j + mm
            ok = pm < T
            ws = _ws(pm, T, window, st_ptr, VARLEN)
            a_m = tl.load(a_ptr + row0 + pm, mask=ok, other=0.0)
            g_m = _load_rows(g_ptr, row0, pm, D, cols, ok[:, None] & c_ok[None, :]).to(CDT)
            ok_l = ok & (mm + 1 <= ws)
            ok_r = ok & (mm >= 1) & (mm <= ws)
            v_l += tl.where(ok_l[:, None], (_recency(ws, mm + 1, CDT) * a_m)[:, None] * g_m, 0.0)
            v_r += tl.where(ok_r[:, None], (_recency(ws, mm, CDT) * a_m)[:, None] * g_m, 0.0)
        dd_l = tl.where(use_l[:, None], alpha_l[:, None] * v_l + beta_l[:, None] * (x_c - x_l), 0.0)
        dd_r = tl.where(use_r[:, None], alpha_r[:, None] * v_r + beta_r[:, None] * (x_r - x_c), 0.0)
        dx = dd_l - dd_r
        if VARLEN:
            dx = tl.where(bad, float("nan"), dx)
        offs = (row0 + j)[:, None] * D + cols[None, :]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
