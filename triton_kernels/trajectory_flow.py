"""Triton kernels for the windowed trajectory flow (semantics: :mod:`trajops.reference.trajectory_flow`).

Only ``@triton.jit`` kernels and their host launchers live here; op registration and autograd are
done elsewhere (trajops/ops/trajectory_flow.py). Public launchers (x, grad_out: (B, T, D)
contiguous, or (1, total, D) packed documents with ``cu_seqlens`` (N + 1,), see trajops/varlen.py):

* :func:`trajectory_flow_fwd`        ``x -> out``
* :func:`trajectory_flow_fwd_stats`  ``x -> (out, stats)``, stats (2, B, T) in the compute dtype:
  ``stats[0, b, i] = n_i`` (step norms), ``stats[1, b, p] = a_p = 1 / S_p`` (0 where S_p = 0).
  Not differentiable; the op layer may save it for the backward.
* :func:`trajectory_flow_bwd`        ``(grad_out, x[, stats]) -> dL/dx``

Notation (per sequence or document): step ``d_i = x[i+1] - x[i]``, ``n_i = ||d_i||``,
``t_i = tanh(n_i)``, step i counts iff ``n_i > eps``; position p sees the steps i = p-k for
k = 1..ws_p, ``ws_p = min(window, p - start(p))`` (start(p): first token of p's document, 0 without
cu_seqlens), recency ``r(p, k) = (ws_p - k + 1) / ws_p``, ``S_p = sum_k r t``, ``a_p = 1 / S_p``,
``out_p = sum_k r (t / n) d / S_p``. A step that crosses a document boundary lies in no window.
``eps`` is a compile-time constant (fp64 compares against the exact fp64 eps, as the reference).

Design: one program per (sequence, BLOCK_T rows), owning the full D
------------------------------------------------------------------
Each program first reduces over D (walking D chunks) everything that needs a full-D reduction for
its rows and for the window's halo rows, keeps those per-row scalars in a private scratch slot, then
walks D again (in *reverse* chunk order, so the chunks it read last, still in L2, are re-read first)
to write its output tile. The halo is recomputed by each program (no cross-program dependency). The
scratch slots are O(B*T) fp32 per pass (a few bytes per row against 2*D bytes of a bf16 row).

Bytes (DRAM, e = element size, N = B*T*D; "L2" = the second walk over the program's rows):

==============  ==========================================  =====================================
                before (3 + 4 launches)                     now
==============  ==========================================  =====================================
forward         3 launches; x read 2x, out written 1x:       1 launch; x read 1x + L2, out 1x:
                3 N e (ideal 2 N e)                          2 N e (+ 8 B/row of stats)
backward        4 launches; x 3x, grad_out 2x, dx 1x:        1 launch with the forward's stats:
                6 N e (ideal 3 N e)                          x 1x + L2, grad_out 1x + L2, dx 1x:
                                                             3 N e (+ 8 B/row); without stats one
                                                             more launch reads x once: 4 N e
fwd + bwd       9 N e                                        5 N e, the issue's floor (6 N e while
                                                             the op layer does not pass the stats)
==============  ==========================================  =====================================

The second walk hits L2 only while the programs in flight fit in it: a program touches
(BLOCK_T + K + 1) rows of x (forward) and about (BLOCK_T + 2K + 1) rows of x plus
(BLOCK_T + K + 1) of grad_out (backward). The launcher bounds BLOCK_T by that footprint
(:func:`_blocks`); for bf16 D=4096, K=8 the forward program holds 136 KiB (264 programs of 8 warps
in flight on an H200: ~36 MB < its 50 MB L2), the backward ~0.5 MiB (it does not fit: the reverse
walk makes the last chunks hit, the rest re-reads from DRAM, so between 3 and ~5 N e). Not yet
measured on a GPU. Packed documents add a per-token start array (int32, built by torch on device:
~20 B/token over 3 launches, 4 B/token read back, from L1 for the window rows) and a 0-d validity
flag read by each program.

Work per element (K = min(window, T-1)): forward 2 loads + 2 flops per row for the norms
((BLOCK_T + K) / BLOCK_T rows each), then K loads + 2K flops for the weighted sum; backward
2K (out and V) over BLOCK_T rows, K (out only) over K halo rows, then 2(K+1) for dd_{j-1}, dd_j.

Backward, with ``q_p = a_p (g_p . out_p)``, ``V_i = sum_k r(i+k, k) a_{i+k} g_{i+k}``,
``s_i = V_i . d_i / n_i``, ``Q_i = sum_k r(i+k, k) q_{i+k}``: ``dd_i = alpha_i V_i + beta_i d_i``,
``alpha = t / n``, ``beta = ((1 - t^2)(s - Q) - alpha s) / n`` (counted steps inside one document
only), ``dx_j = dd_{j-1} - dd_j``. The program needs s for steps [p0-1, p0+BT) and q for rows
[p0, p0+BT+K): its own rows give both, a halo of K rows after it gives q (no V), the row p0-1 gives s.

Masked steps are excluded with ``where`` (never multiplied by 0), so a NaN step does not leak into
outputs the reference keeps finite. Invalid cu_seqlens (CUDA: not checked by the host) make every
output NaN; every offset is clamped first, so no kernel reads outside a tensor whatever the values.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, compute_dtypes

__all__ = ["trajectory_flow_fwd", "trajectory_flow_fwd_stats", "trajectory_flow_bwd"]


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# host launchers
# --------------------------------------------------------------------------------------------

# Bytes a program may touch in its two walks over D for them to hit L2 the second time, with
# ~2 programs of 8 warps per SM in flight (132 SMs x 2 x 144 KiB ~ 38 MB of an H100/H200's 50 MB).
_FOOTPRINT = 144 * 1024
_MIN_PROGRAMS = 264
# Rows per program under the interpreter: large (one program per short sequence), but tests set it
# small to exercise the halos and multi-tile paths on tiny shapes.
INTERPRET_BLOCK_T = 256


def _blocks(B: int, T: int, D: int, K: int, elem: int, backward: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_D, num_warps) for a launch.

    BLOCK_T: the most rows (8..64) whose footprint (own + halo rows, x and for the backward
    grad_out) stays within _FOOTPRINT, at least 16 for the backward (its K-row q halo costs K^2 /
    BLOCK_T flops per element), fewer while the grid would leave SMs idle. Tiles hold one 16-byte
    vector per thread and row tile when Triton can prove rows 16-byte aligned (D % 16 == 0), else 2
    scalars (the register budget that kept the previous kernels spill-free); rows of D <= 512 are
    whole in a tile. The halo tile (BLOCK_H rows) shares BLOCK_D.
    """
    bh = min(64, triton.next_power_of_2(max(K, 1)))
    tp = triton.next_power_of_2(T)
    if INTERPRET:  # programs run one by one in Python: few, large tiles (and halos rarely needed)
        bt = min(INTERPRET_BLOCK_T, tp)
        return bt, bh, min(triton.next_power_of_2(D), max(16, 8192 // max(bt, bh))), 4
    per_thread = 16 // elem if D % 16 == 0 else 2
    # 8 warps, except short rows and fp64: ptxas gave those 64 (128) registers and a stack frame at
    # 8 (4) warps with 8-warp tiles on sm_90 (tests/triton_resources.py); 4-warp tiles have none
    warps = 4 if (D <= 512 or elem == 8) else 8
    tile = 32 * warps * per_thread
    row = D * elem * (2 if backward else 1)
    rows = _FOOTPRINT // max(row, 1) - (2 * K + 1 if backward else K + 1)
    bt = min(64, triton.next_power_of_2(max(rows, 1) + 1) // 2)
    # short rows: whole rows per tile (coalesced), rows filling the rest of the register tile
    bt = max(16 if backward else 8, min(bt, tile // min(triton.next_power_of_2(D), max(16, tile // 8))))
    while bt > 8 and B * triton.cdiv(T, bt) < _MIN_PROGRAMS:
        bt //= 2
    bt = max(1, min(bt, tp))
    bd = max(16, min(triton.next_power_of_2(D), tile // max(bt, bh)))
    warps = max(1, min(warps, max(bt, bh) * bd // (32 * per_thread)))
    return bt, bh, bd, warps


def _varlen(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor]):
    """(start, bad) for packed x (1, total, D): start (total,) int32, each token's document start
    (offsets clamped into [0, total]; the kernels clamp it into [0, token] too, so they never look
    before row 0 or outside a tensor whatever the offsets), bad a 0-d int32 device flag (1: invalid
    offsets, every output NaN). No host sync; 3 launches over tokens, ~20 bytes per token."""
    if cu_seqlens is None:
        return None
    from ..varlen import check_cu_seqlens, cu_seqlens_invalid

    if x.shape[0] != 1:
        raise ValueError(f"trajectory_flow: packed x must have shape (1, total, D), got {list(x.shape)}")
    total = x.shape[1]
    check_cu_seqlens("trajectory_flow", cu_seqlens, total, x.device, values=False)
    c = cu_seqlens.to(torch.int64).clamp(0, total).to(torch.int32)
    # doc = #offsets <= token in [0, N + 1]; prev[doc] = c[doc - 1], the token's document start
    prev = torch.cat([c.new_zeros(1), c])
    pos = torch.arange(total, device=x.device, dtype=torch.int32)
    start = prev[torch.searchsorted(c, pos, right=True, out_int32=True)]
    return start, cu_seqlens_invalid(cu_seqlens, total).to(torch.int32)


def _nan_if(t: torch.Tensor, vl) -> torch.Tensor:
    return t if vl is None else torch.where(vl[1] != 0, torch.full_like(t, float("nan")), t)


def _forward(x: torch.Tensor, window: int, eps: float, vl, want_out: bool):
    """(out or None, stats (2, B, T)) for x (B, T, D) contiguous; vl from :func:`_varlen`."""
    B, T, D = x.shape
    cdt, tcdt = compute_dtypes(x.dtype)
    stats = torch.zeros((2, B, T), device=x.device, dtype=cdt)
    if T < 2 or x.numel() == 0:
        return (_nan_if(torch.zeros_like(x), vl) if want_out else None), _nan_if(stats, vl)
    window = min(int(window), T)  # every window >= T - 1 means the whole prefix; keeps int32 math safe
    K = min(window, T - 1)
    bt, bh, bd, warps = _blocks(B, T, D, K, x.element_size(), backward=False)
    nt = triton.cdiv(T, bt)
    KH = triton.cdiv(K, bh) * bh
    slot = KH + bt
    scr = torch.empty(B * nt * 3 * slot, device=x.device, dtype=cdt)
    out = torch.empty_like(x) if want_out else x
    st, bad = vl if vl is not None else (x, x)
    _fwd_kernel[(B * nt,)](x, out, stats[0], stats[1], scr, st, bad, T, D, window, K, KH, slot, nt,
                           EPS=float(eps), CDT=tcdt, VARLEN=vl is not None, WRITE_OUT=want_out,
                           BLOCK_T=bt, BLOCK_H=bh, BLOCK_D=bd, num_warps=warps)
    return (out if want_out else None), stats


def trajectory_flow_fwd(x: torch.Tensor, window: int, eps: float,
                        cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Trajectory flow of x: (B, T, D) contiguous (or (1, total, D) with cu_seqlens (N + 1,)) ->
    out of x's shape, dtype and device. Computes in fp32 (fp64 for fp64 x); one launch (plus the
    small start-array ops with cu_seqlens). Each new ``eps`` value compiles once."""
    return trajectory_flow_fwd_stats(x, window, eps, cu_seqlens)[0]


def trajectory_flow_fwd_stats(x: torch.Tensor, window: int, eps: float,
                              cu_seqlens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, stats): out as :func:`trajectory_flow_fwd`, stats (2, B, T) in the compute dtype
    (n_i, then a_p = 1 / S_p or 0), for :func:`trajectory_flow_bwd` (not differentiable)."""
    return _forward(x, window, eps, _varlen(x, cu_seqlens), want_out=True)


def trajectory_flow_bwd(grad_out: torch.Tensor, x: torch.Tensor, window: int, eps: float,
                        cu_seqlens: Optional[torch.Tensor] = None,
                        stats: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dL/dx given grad_out = dL/dout; both (B, T, D) contiguous (or (1, total, D) with cu_seqlens).

    ``stats`` is the forward's second output for the same x, window, eps and cu_seqlens: with it
    the backward is one launch; without it one more launch recomputes it (x read once more).
    Returns a tensor of x's shape and dtype; matches :func:`trajops.reference.trajectory_flow_backward`.
    """
    B, T, D = x.shape
    cdt, tcdt = compute_dtypes(x.dtype)
    if stats is not None and (tuple(stats.shape) != (2, B, T) or stats.dtype != cdt or not stats.is_contiguous()):
        raise ValueError(f"trajectory_flow_bwd: stats must be a contiguous {cdt} tensor of shape {[2, B, T]}, "
                         f"got {stats.dtype} {list(stats.shape)}")
    vl = _varlen(x, cu_seqlens)
    if T < 2 or x.numel() == 0:
        return _nan_if(torch.zeros_like(x), vl)
    if stats is None:
        stats = _forward(x, window, eps, vl, want_out=False)[1]
    window = min(int(window), T)
    K = min(window, T - 1)
    bt, bh, bd, warps = _blocks(B, T, D, K, x.element_size(), backward=True)
    nt = triton.cdiv(T, bt)
    KH = triton.cdiv(K, bh) * bh
    slot_q = 1 + bt + KH
    bs = min(128, triton.next_power_of_2(2 * KH + bt))
    slot_u = triton.cdiv(2 * KH + bt, bs) * bs
    scr = torch.empty(B * nt * (2 * slot_q + slot_u), device=x.device, dtype=cdt)
    dx = torch.empty_like(x)
    st, bad = vl if vl is not None else (x, x)
    _bwd_kernel[(B * nt,)](x, grad_out, dx, stats[0], stats[1], scr, st, bad, T, D, window, K, KH,
                           slot_q, slot_u, nt, EPS=float(eps), CDT=tcdt, VARLEN=vl is not None,
                           BLOCK_T=bt, BLOCK_H=bh, BLOCK_S=bs, BLOCK_D=bd, num_warps=warps)
    return dx
