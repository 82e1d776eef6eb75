"""Triton kernels for the windowed trajectory flow (semantics: :mod:`trajops.reference`).

Only ``@triton.jit`` kernels and their host launchers live here; op registration and autograd are
done elsewhere. Public launchers:

* :func:`trajectory_flow_fwd`  ``x (B, T, D) -> out (B, T, D)``
* :func:`trajectory_flow_bwd`  ``(grad_out (B, T, D), x (B, T, D)) -> dL/dx (B, T, D)``

Notation (per sequence b): step ``d_i = x[i+1] - x[i]`` (i = 0..T-2), ``n_i = ||d_i||``,
``t_i = tanh(n_i)``, step i counts iff ``n_i > eps``; position p sees the steps i = p-k for
k = 1..ws_p, ws_p = min(window, p), with recency weight ``r(p, k) = (ws_p - k + 1) / ws_p``;
``S_p = sum_k r t``, ``a_p = 1 / S_p`` (0 when S_p = 0), ``out_p = sum_k r (t / n) d / S_p``.
``eps`` is a compile-time constant of the kernels (so that fp64 compares against the exact fp64
eps, as the reference does; a Triton float argument would be fp32): each new value compiles once.

Design
------
Everything that needs a full reduction over D (step norms, the dot products of the backward) is
kept in per-position scalar buffers of shape (B, T) in the compute dtype (fp32, fp64 for fp64
inputs); the vector work runs on (BLOCK_T rows x BLOCK_D columns) tiles, so the window's shifted
rows are re-read from L1 by the same program instead of from L2 by one program per row, and no
(B, T, window, D) intermediate exists. Masked steps are excluded with ``where`` (never multiplied
by 0) so a NaN step does not leak into outputs that the reference keeps finite.

Forward (3 launches, x read twice from DRAM, out written once):
  1. ``_steps_kernel``  grid B*cdiv(T, BT): n_i, t_i  (loops over D).
  2. ``_scale_kernel``  grid B*cdiv(T, BT): S_p from n, t (scalar only).
  3. ``_fwd_kernel``    grid B*cdiv(T, BT)*cdiv(D, BD): out tile = (sum over k of the shifted
     step tiles) / S, each step recomputed as x[i+1] - x[i] exactly like the reference.
  The norms need a full reduction over D before any output, hence the separate first pass.

Backward (4 launches, x read 3 times, grad_out twice, dx written once), with
``q_p = a_p (g_p . out_p)``, ``V_i = sum_k r(i+k, k) a_{i+k} g_{i+k}``, ``s_i = V_i . u_i`` and
``Q_i = sum_k r(i+k, k) q_{i+k}``, the step gradient is ``dd_i = alpha_i V_i + beta_i d_i`` with
``alpha = t / n``, ``beta = ((1 - t^2)(s - Q) - alpha s) / n`` (counted steps only):
  1. ``_steps_kernel`` and 2. ``_scale_kernel`` (writing a_p) as in the forward.
  3. ``_bwd_dots_kernel`` grid B*cdiv(T, BT), loops over D: q_p and s_i (out_p and V_i are
     rebuilt tile by tile and only their dot products leave the program).
  4. ``_bwd_dx_kernel`` grid B*cdiv(T, BT)*cdiv(D, BD): dx_j = dd_{j-1} - dd_j, computing both
     dd_{j-1} and dd_j in registers. The alternative, dd in an fp32 (B, T-1, D) buffer plus a
     diff kernel, adds a 4-byte write and a 4-byte read per element, more than the whole
     essential traffic of a bf16 backward (2 + 2 + 2 bytes); recomputing the second dd costs
     only L1-resident loads (the K+1 grad rows and 3 x rows of a tile are shared by both
     dd's) and about 2K extra FMAs per element.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["trajectory_flow_fwd", "trajectory_flow_bwd"]


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
def _load_rows(ptr, row0, rows, D, cols, mask):
    """(len(rows), len(cols)) tile of a (B*T, D) row-major tensor; row0 is int64, masked -> 0."""
    offs = (row0 + rows)[:, None] * D + cols[None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _tile_coords(T, n_t_tiles, n_d_tiles, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """(rows, cols, row0) of this program's (BLOCK_T, BLOCK_D) tile on a grid of
    B * n_t_tiles * n_d_tiles programs, D tiles fastest; row0 = b * T as int64."""
    pid = tl.program_id(0)
    pid_d = pid % n_d_tiles
    pid_bt = pid // n_d_tiles
    b = pid_bt // n_t_tiles
    rows = (pid_bt % n_t_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    return rows, cols, b.to(tl.int64) * T


@triton.jit
def _flow_tile(x_ptr, n_ptr, th_ptr, row0, p, p_ok, scale, window, K, D, cols, c_ok, x_p,
               eps, CDT: tl.constexpr):
    """scale_p * sum_k r(p, k) (t/n)_{p-k} d_{p-k} over counted steps, for a tile of rows p.

    x_p is the already loaded tile x[p]; the steps are rebuilt as x[i+1] - x[i] walking back one
    row per k, so each x row is loaded once per tile (and the shifted loads hit L1).
    """
    ws = tl.minimum(p, window)
    acc = tl.zeros(x_p.shape, dtype=CDT)
    prev = x_p
    for k in range(1, K + 1):
        i = p - k
        ok = p_ok & (k <= ws)  # k <= ws also means i >= 0
        cur = _load_rows(x_ptr, row0, i, D, cols, ok[:, None] & c_ok[None, :]).to(CDT)
        n = tl.load(n_ptr + row0 + i, mask=ok, other=1.0)
        th = tl.load(th_ptr + row0 + i, mask=ok, other=0.0)
        coef = _recency(ws, k, CDT) * (th / n) * scale
        counted = ok & (n > eps)  # False for NaN norms
        acc += tl.where(counted[:, None], coef[:, None] * (prev - cur), 0.0)
        prev = cur
    return acc


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _steps_kernel(x_ptr, n_ptr, th_ptr, T, D, n_t_tiles,
                  CDT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """n_i = ||x[i+1] - x[i]||, t_i = tanh(n_i) into (B, T) buffers (column T-1 unused).

    x: (B, T, D). Grid: B * n_t_tiles programs, each BLOCK_T steps, looping over D.
    """
    pid = tl.program_id(0)
    b = pid // n_t_tiles
    i = (pid % n_t_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    row0 = b.to(tl.int64) * T
    i_ok = i < T - 1
    ss = tl.zeros([BLOCK_T, BLOCK_D], dtype=CDT)
    l1 = tl.zeros([BLOCK_T, BLOCK_D], dtype=CDT)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = i_ok[:, None] & (cols < D)[None, :]
        x0 = _load_rows(x_ptr, row0, i, D, cols, m).to(CDT)
        x1 = _load_rows(x_ptr, row0, i + 1, D, cols, m).to(CDT)
        d = x1 - x0
        ss += d * d
        l1 += tl.abs(d)
    # Plain sum of squares like torch.linalg.vector_norm (no rescaling: it under/overflows the
    # same way), except that torch returns |d| over a size-1 dim, so D == 1 does too.
    n = tl.sqrt(tl.sum(ss, axis=1))
    if D == 1:
        n = tl.sum(l1, axis=1)
    tl.store(n_ptr + row0 + i, n, mask=i_ok)
    tl.store(th_ptr + row0 + i, _tanh_nonneg(n), mask=i_ok)


@triton.jit
def _scale_kernel(n_ptr, th_ptr, out_ptr, T, window, K, n_t_tiles,
                  EPS: tl.constexpr, INVERT: tl.constexpr, CDT: tl.constexpr,
                  BLOCK_T: tl.constexpr):
    """S_p = sum_k r(p, k) t_{p-k} over counted steps, or with INVERT a_p = 1 / S_p (0 where
    S_p = 0) as the backward reference uses it.

    Buffers (B, T). Grid: B * n_t_tiles programs of BLOCK_T positions; K = min(window, T - 1).
    """
    pid = tl.program_id(0)
    b = pid // n_t_tiles
    p = (pid % n_t_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    row0 = b.to(tl.int64) * T
    p_ok = p < T
    eps = tl.full([], EPS, CDT)
    ws = tl.minimum(p, window)
    S = tl.zeros([BLOCK_T], dtype=CDT)
    for k in range(1, K + 1):
        ok = p_ok & (k <= ws)
        n = tl.load(n_ptr + row0 + p - k, mask=ok, other=0.0)
        th = tl.load(th_ptr + row0 + p - k, mask=ok, other=0.0)
        S += tl.where(ok & (n > eps), _recency(ws, k, CDT) * th, 0.0)
    if INVERT:
        pos = S > 0
        S = tl.where(pos, 1 / tl.where(pos, S, 1.0), 0.0)
    tl.store(out_ptr + row0 + p, S, mask=p_ok)


@triton.jit
def _fwd_kernel(x_ptr, n_ptr, th_ptr, s_ptr, out_ptr, T, D, window, K, n_t_tiles, n_d_tiles,
                EPS: tl.constexpr, CDT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, p, cols] for a (BLOCK_T, BLOCK_D) tile; x, out: (B, T, D); n, t, S: (B, T).

    Grid: B * n_t_tiles * n_d_tiles programs on axis 0 (D tiles fastest, so programs running
    together cover whole rows and share the window's halo rows through L2).
    """
    p, cols, row0 = _tile_coords(T, n_t_tiles, n_d_tiles, BLOCK_T, BLOCK_D)
    p_ok = p < T
    c_ok = cols < D
    m = p_ok[:, None] & c_ok[None, :]
    eps = tl.full([], EPS, CDT)
    S = tl.load(s_ptr + row0 + p, mask=p_ok, other=0.0)
    x_p = _load_rows(x_ptr, row0, p, D, cols, m).to(CDT)
    num = _flow_tile(x_ptr, n_ptr, th_ptr, row0, p, p_ok, 1.0, window, K, D, cols, c_ok, x_p,
                     eps, CDT)
    # num / S like the reference (1/S overflows for a subnormal S), and exactly 0 where S = 0.
    pos = S > 0
    out = tl.where(pos[:, None], num / tl.where(pos, S, 1.0)[:, None], 0.0)
    offs = (row0 + p)[:, None] * D + cols[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_dots_kernel(x_ptr, g_ptr, n_ptr, th_ptr, a_ptr, q_ptr, s_ptr, T, D, window, K, n_t_tiles,
                     EPS: tl.constexpr, CDT: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """q_p = a_p (g_p . out_p) and s_i = V_i . d_i / n_i into (B, T) buffers.

    x, g: (B, T, D). Grid: B * n_t_tiles programs of BLOCK_T rows, each looping over D in
    BLOCK_D chunks: row p of the tile yields q_p and (for p <= T-2) s_p of step p.
    """
    pid = tl.program_id(0)
    b = pid // n_t_tiles
    p = (pid % n_t_tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    row0 = b.to(tl.int64) * T
    p_ok = p < T
    i_ok = p < T - 1  # row p as a step index
    eps = tl.full([], EPS, CDT)
    a = tl.load(a_ptr + row0 + p, mask=p_ok, other=0.0)
    q_acc = tl.zeros([BLOCK_T], dtype=CDT)
    s_acc = tl.zeros([BLOCK_T], dtype=CDT)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_ok = cols < D
        m = p_ok[:, None] & c_ok[None, :]
        x_p = _load_rows(x_ptr, row0, p, D, cols, m).to(CDT)
        g_p = _load_rows(g_ptr, row0, p, D, cols, m).to(CDT)
        # out_p = a_p * num_p (no S_p = 0 zeroing: the reference's q uses a * num as is).
        out = _flow_tile(x_ptr, n_ptr, th_ptr, row0, p, p_ok, a, window, K, D, cols, c_ok, x_p,
                         eps, CDT)
        q_acc += tl.sum(g_p * out, axis=1)
        # V_i for step i = p: the positions p + k that see step p at lag k.
        v = tl.zeros([BLOCK_T, BLOCK_D], dtype=CDT)
        for k in range(1, K + 1):
            pk = p + k
            ok = i_ok & (pk < T)
            a_k = tl.load(a_ptr + row0 + pk, mask=ok, other=0.0)
            c = _recency(tl.minimum(pk, window), k, CDT) * a_k
            g_k = _load_rows(g_ptr, row0, pk, D, cols, ok[:, None] & c_ok[None, :]).to(CDT)
            v += tl.where(ok[:, None], c[:, None] * g_k, 0.0)
        x_n = _load_rows(x_ptr, row0, p + 1, D, cols, i_ok[:, None] & c_ok[None, :]).to(CDT)
        s_acc += tl.sum(v * (x_n - x_p), axis=1)
    n = tl.load(n_ptr + row0 + p, mask=i_ok, other=1.0)
    tl.store(q_ptr + row0 + p, a * q_acc, mask=p_ok)
    tl.store(s_ptr + row0 + p, s_acc / n, mask=i_ok)


@triton.jit
def _dd_coefs(i, row0, T, window, K, n_ptr, th_ptr, q_ptr, s_ptr, eps, CDT: tl.constexpr):
    """For step indices i (vector): (counted, alpha, beta) with dd_i = alpha V_i + beta d_i.

    Steps outside 0..T-2 are not counted (they are the zero pads of dx = dd_{j-1} - dd_j).
    """
    ok = (i >= 0) & (i < T - 1)
    n = tl.load(n_ptr + row0 + i, mask=ok, other=1.0)
    th = tl.load(th_ptr + row0 + i, mask=ok, other=0.0)
    s = tl.load(s_ptr + row0 + i, mask=ok, other=0.0)
    Q = tl.zeros(i.shape, dtype=CDT)
    for k in range(1, K + 1):
        pk = i + k
        okk = ok & (pk < T)
        q = tl.load(q_ptr + row0 + pk, mask=okk, other=0.0)
        Q += tl.where(okk, _recency(tl.minimum(pk, window), k, CDT) * q, 0.0)
    alpha = th / n
    beta = ((1 - th * th) * (s - Q) - alpha * s) / n
    return ok & (n > eps), alpha, beta


@triton.jit
def _bwd_dx_kernel(x_ptr, g_ptr, n_ptr, th_ptr, a_ptr, q_ptr, s_ptr, dx_ptr,
                   T, D, window, K, n_t_tiles, n_d_tiles,
                   EPS: tl.constexpr, CDT: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx[b, j, cols] = dd_{j-1} - dd_j for a (BLOCK_T, BLOCK_D) tile; x, g, dx: (B, T, D).

    Grid as in ``_fwd_kernel``. V_{j-1} and V_j share the grad rows j..j+K: row j+m enters
    V_{j-1} at lag m+1 and V_j at lag m.
    """
    j, cols, row0 = _tile_coords(T, n_t_tiles, n_d_tiles, BLOCK_T, BLOCK_D)
    j_ok = j < T
    c_ok = cols < D
    eps = tl.full([], EPS, CDT)
    use_l, alpha_l, beta_l = _dd_coefs(j - 1, row0, T, window, K, n_ptr, th_ptr, q_ptr, s_ptr,
                                       eps, CDT)
    use_r, alpha_r, beta_r = _dd_coefs(j, row0, T, window, K, n_ptr, th_ptr, q_ptr, s_ptr,
                                       eps, CDT)
    # x rows first: their loads (the tile's only x traffic) are in flight during the grad loop.
    m = j_ok[:, None] & c_ok[None, :]
    x_l = _load_rows(x_ptr, row0, j - 1, D, cols, (j_ok & (j >= 1))[:, None] & c_ok[None, :])
    x_c = _load_rows(x_ptr, row0, j, D, cols, m)
    x_r = _load_rows(x_ptr, row0, j + 1, D, cols, (j + 1 < T)[:, None] & c_ok[None, :])
    v_l = tl.zeros([BLOCK_T, BLOCK_D], dtype=CDT)
    v_r = tl.zeros([BLOCK_T, BLOCK_D], dtype=CDT)
    for mm in range(0, K + 1):
        pm = j + mm
        ok = pm < T
        a_m = tl.load(a_ptr + row0 + pm, mask=ok, other=0.0)
        ws = tl.minimum(pm, window)
        g_m = _load_rows(g_ptr, row0, pm, D, cols, ok[:, None] & c_ok[None, :]).to(CDT)
        ok_l = ok & (mm + 1 <= K)
        ok_r = ok & (mm >= 1)
        c_l = _recency(ws, mm + 1, CDT) * a_m
        c_r = _recency(ws, mm, CDT) * a_m
        v_l += tl.where(ok_l[:, None], c_l[:, None] * g_m, 0.0)
        v_r += tl.where(ok_r[:, None], c_r[:, None] * g_m, 0.0)
    x_l = x_l.to(CDT)
    x_c = x_c.to(CDT)
    x_r = x_r.to(CDT)
    dd_l = tl.where(use_l[:, None], alpha_l[:, None] * v_l + beta_l[:, None] * (x_c - x_l), 0.0)
    dd_r = tl.where(use_r[:, None], alpha_r[:, None] * v_r + beta_r[:, None] * (x_r - x_c), 0.0)
    offs = (row0 + j)[:, None] * D + cols[None, :]
    tl.store(dx_ptr + offs, (dd_l - dd_r).to(dx_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------------
# host launchers
# --------------------------------------------------------------------------------------------

# Programs wanted, when rows allow, for the kernels whose grid has no D axis (~4 per H100 SM). The
# Triton interpreter (TRITON_INTERPRET=1) runs programs one by one in Python, where fewer, larger
# programs are much faster and occupancy means nothing.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MIN_PROGRAMS = 1 if _INTERPRET else 512


def _compute_dtypes(dtype: torch.dtype):
    if dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _per_thread(D: int, elem_size: int) -> int:
    """x values per thread per register tile.

    One 16-byte vector when Triton can prove the rows 16-byte aligned (it specializes D % 16 == 0),
    else 2 scalar loads. Compiled for sm_90 this keeps every kernel at 40-64 registers per thread
    (80-122 for fp64) and spill-free, so 4 programs of 8 warps share an SM; twice as many values
    per thread doubled the backward kernels' registers (>200 with unaligned rows).
    """
    return 16 // elem_size if D % 16 == 0 else 2


def _tile_elems(D: int, elem_size: int) -> int:
    if _INTERPRET:  # no registers to save there; each tile op costs a Python-level numpy call
        return 2048
    return 256 * _per_thread(D, elem_size)  # 8 warps


def _num_warps(elems: int, D: int, elem_size: int) -> int:
    return max(1, min(8, elems // (32 * _per_thread(D, elem_size))))


def _chunked_blocks(T: int, D: int, K: int, elem_size: int):
    """(BLOCK_T, BLOCK_D) for the kernels with a grid over (rows, D tiles).

    Taller tiles amortize the K halo rows that each tile re-reads (BLOCK_T + K rows loaded per
    BLOCK_T outputs); with K = 8 a 32-row tile reads 1.25x its rows.
    """
    tile = _tile_elems(D, elem_size)
    block_t = min(64, max(16, triton.next_power_of_2(4 * K)), tile)
    block_d = min(triton.next_power_of_2(D), tile // block_t)
    block_t = max(1, min(tile // block_d, triton.next_power_of_2(T)))
    return block_t, block_d


def _looped_blocks(B: int, T: int, D: int, elem_size: int):
    """(BLOCK_T, BLOCK_D) for the kernels that loop over all of D (one program per row tile).

    Rows fill the tile that D leaves free, then shrink until there are enough programs to keep
    every SM busy (these grids have no D axis); columns then take back the room rows gave up, so
    a program with few rows walks a wide D in fewer, wider steps.
    """
    tile = _tile_elems(D, elem_size)
    block_d = min(triton.next_power_of_2(D), tile // 16)
    block_t = min(tile // block_d, triton.next_power_of_2(T))
    while block_t > 1 and B * triton.cdiv(T, block_t) < _MIN_PROGRAMS:
        block_t //= 2
    block_d = min(triton.next_power_of_2(D), tile // block_t)
    return block_t, block_d


def _step_stats(x: torch.Tensor, window: int, eps: float, invert: bool):
    """Launch the norm/tanh and the S kernels (x: (B, T, D), T >= 2).

    Returns (n, t, S, K, tcdt) or, with invert, (n, t, a = 1/S, K, tcdt): three (B, T) buffers in
    the compute dtype, K = min(window, T - 1) and the compute dtype as a Triton type.
    """
    B, T, D = x.shape
    K = min(window, T - 1)
    cdt, tcdt = _compute_dtypes(x.dtype)
    n = torch.empty((B, T), device=x.device, dtype=cdt)
    th = torch.empty_like(n)
    sa = torch.empty_like(n)
    bt, bd = _looped_blocks(B, T, D, x.element_size())
    nt = triton.cdiv(T, bt)
    _steps_kernel[(B * nt,)](x, n, th, T, D, nt, CDT=tcdt, BLOCK_T=bt, BLOCK_D=bd,
                             num_warps=_num_warps(bt * bd, D, x.element_size()))
    # Small blocks: the loop over the window is latency-bound, so many programs beat wide ones.
    bt = min(256, triton.next_power_of_2(T))
    nt = triton.cdiv(T, bt)
    _scale_kernel[(B * nt,)](n, th, sa, T, window, K, nt, EPS=eps, INVERT=invert, CDT=tcdt,
                             BLOCK_T=bt, num_warps=4)
    return n, th, sa, K, tcdt


def _clamp_window(window: int, T: int) -> int:
    """Position p sees min(window, p) <= T - 1 steps, so every window >= T acts as T; clamping keeps
    the kernels' index arithmetic (p + k, window as an int32 argument) far from any overflow."""
    return min(int(window), T)


def trajectory_flow_fwd(x: torch.Tensor, window: int, eps: float) -> torch.Tensor:
    """Trajectory flow of x: (B, T, D) contiguous -> out (B, T, D), x's dtype and device.

    Computes in fp32 (fp64 for fp64 x). ``eps`` is a compile-time constant of the kernels (it is
    compared in the compute dtype, exactly like the reference), so each new eps value compiles once.
    """
    B, T, D = x.shape
    if T < 2 or x.numel() == 0:
        return torch.zeros_like(x)
    window, eps = _clamp_window(window, T), float(eps)
    n, th, S, K, tcdt = _step_stats(x, window, eps, invert=False)
    out = torch.empty_like(x)
    bt, bd = _chunked_blocks(T, D, K, x.element_size())
    nt, nd = triton.cdiv(T, bt), triton.cdiv(D, bd)
    _fwd_kernel[(B * nt * nd,)](x, n, th, S, out, T, D, window, K, nt, nd,
                                EPS=eps, CDT=tcdt, BLOCK_T=bt, BLOCK_D=bd,
                                num_warps=_num_warps(bt * bd, D, x.element_size()))
    return out


def trajectory_flow_bwd(grad_out: torch.Tensor, x: torch.Tensor, window: int, eps: float) -> torch.Tensor:
    """dL/dx of the trajectory flow given grad_out = dL/dout; both (B, T, D) contiguous.

    Returns a (B, T, D) tensor of x's dtype; computes in fp32 (fp64 for fp64 x). Matches
    :func:`trajops.reference.trajectory_flow_backward`.
    """
    B, T, D = x.shape
    if T < 2 or x.numel() == 0:
        return torch.zeros_like(x)
    window, eps = _clamp_window(window, T), float(eps)
    n, th, a, K, tcdt = _step_stats(x, window, eps, invert=True)
    q = torch.empty_like(n)
    s = torch.empty_like(n)
    bt, bd = _looped_blocks(B, T, D, x.element_size())
    nt = triton.cdiv(T, bt)
    _bwd_dots_kernel[(B * nt,)](x, grad_out, n, th, a, q, s, T, D, window, K, nt,
                                EPS=eps, CDT=tcdt, BLOCK_T=bt, BLOCK_D=bd,
                                num_warps=_num_warps(bt * bd, D, x.element_size()))
    dx = torch.empty_like(x)
    bt, bd = _chunked_blocks(T, D, K, x.element_size())
    nt, nd = triton.cdiv(T, bt), triton.cdiv(D, bd)
    _bwd_dx_kernel[(B * nt * nd,)](x, grad_out, n, th, a, q, s, dx, T, D, window, K, nt, nd,
                                   EPS=eps, CDT=tcdt, BLOCK_T=bt, BLOCK_D=bd,
                                   num_warps=_num_warps(bt * bd, D, x.element_size()))
    return dx
