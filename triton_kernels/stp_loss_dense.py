"""Triton kernels of the dense STP loss: forward and backward over every (p, p+1, p+2).

Launched by :func:`stp_dense_fwd` / :func:`stp_dense_bwd` in triton_kernels/stp_loss.py (notation,
layer offsets, row validity and packed documents: that module's docstring). Device helpers shared
with the sampled kernels: stp_loss_helpers.py.

Kernels (one launch each)
-------------------------
* ``_stp_dense_fwd_kernel``: grid L*B*cdiv(T-1, BLOCK_P); a program takes BLOCK_P steps
  q (d_q = h[q+1] - h[q]) and loops over D accumulating |d_q|^2, |d_{q+1}|^2 and d_q.d_{q+1} from
  three row-shifted tiles of h (the shifted loads hit L1/L2), so the loss of triple q needs no
  other program's norms.
* ``_stp_dense_bwd_kernel``: grid L*B*cdiv(T, BLOCK_T)*cdiv(D, BLOCK_D);
  ``dh[j] = (ga_{j-1} + gb_{j-2}) - (ga_j + gb_{j-1})`` from five row-shifted tiles of h and the
  stats of triples j-2, j-1, j. Every element is written exactly once (rows beyond a row's length
  get 0), so the gradient needs no zero-fill.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .stp_loss_helpers import _cos_coefs, _flagged, _layer_offset, _pair_cosine, _row_length


@triton.jit
def _doc_end(end_ptr, q, T, HAS_END: tl.constexpr):
    """End of the document of packed positions q (vector; T without ends), q clamped into [0, T)."""
    if HAS_END:
        e = tl.load(end_ptr + tl.minimum(tl.maximum(q, 0), T - 1))
    else:
        e = q.to(tl.int64) * 0 + T
    return e


@triton.jit
def _stp_dense_fwd_kernel(h_ptr, off_ptr, len_ptr, end_ptr, loss_ptr, stats_ptr,
                          B, T, D, n_q,
                          HAS_LEN: tl.constexpr, HAS_END: tl.constexpr, MULTI: tl.constexpr, OFF_ALIGNED: tl.constexpr,
                          IS_D1: tl.constexpr, EPS: tl.constexpr, CDT: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Dense loss of the triples q and stats of the steps q = q0 .. q0 + BLOCK_P - 1 of one row.

    loss (L, B, T-2); stats (L, B, T-1, 2) = (|d_q|, cos_q). Grid: L * B * n_q programs,
    n_q = cdiv(T - 1, BLOCK_P) (T >= 2; with T == 2 nothing is stored into loss).
    """
    pid = tl.program_id(0)
    qb = pid % n_q
    lb = pid // n_q
    layer = lb // B
    b = lb % B
    q = qb * BLOCK_P + tl.arange(0, BLOCK_P)
    ln = _row_length(len_ptr, b, T, HAS_LEN)
    bad_len = (ln < 0) | (ln > T)
    lenc = tl.where(bad_len, 0, ln)
    q_end = _doc_end(end_ptr, q, T, HAS_END)
    step_ok = (q + 1 < lenc) & (q + 1 < q_end)
    tri_ok = (q + 2 < lenc) & (q + 2 < q_end)
    row0 = _layer_offset(off_ptr, layer, MULTI, OFF_ALIGNED) + b.to(tl.int64) * T * D
    rows = row0 + q.to(tl.int64) * D
    n0, n1, cos = _pair_cosine(h_ptr, rows, rows, rows, step_ok, tri_ok, D, True, IS_D1, EPS, CDT,
                               BLOCK_P, BLOCK_D)
    loss = _flagged(bad_len, tri_ok, 1.0 - cos, CDT)
    n0 = _flagged(bad_len, step_ok, n0, CDT)
    cos = _flagged(bad_len, tri_ok, cos, CDT)
    tl.store(loss_ptr + lb.to(tl.int64) * (T - 2) + q, loss, mask=q < T - 2)
    st = stats_ptr + (lb.to(tl.int64) * (T - 1) + q) * 2
    tl.store(st, n0, mask=q < T - 1)
    tl.store(st + 1, cos, mask=q < T - 1)


@triton.jit
def _dense_triple(gl_ptr, stats_ptr, end_ptr, lb, T, p, lenc, HAS_END: tl.constexpr, EPS: tl.constexpr,
                  CDT: tl.constexpr):
    """(valid, wa, wb, Na, Nb, ca, cb) of the dense triples p (vector), p valid iff
    0 <= p and p + 2 < lenc (and inside p's document when packed); invalid ones get harmless
    finite values."""
    ok = (p >= 0) & (p + 2 < lenc) & (p + 2 < _doc_end(end_ptr, p, T, HAS_END))
    pc = tl.where(ok, p, 0).to(tl.int64)
    w = -tl.load(gl_ptr + lb * (T - 2) + pc, mask=ok, other=0.0)
    st = stats_ptr + (lb * (T - 1) + pc) * 2
    na = tl.load(st, mask=ok, other=1.0)
    cos = tl.load(st + 1, mask=ok, other=0.0)
    nb = tl.load(st + 2, mask=ok, other=1.0)
    wa, wb, Na, Nb, ca, cb = _cos_coefs(w, na, nb, cos, EPS, CDT)
    return ok, wa, wb, Na, Nb, ca, cb


@triton.jit
def _stp_dense_bwd_kernel(h_ptr, g_ptr, hoff_ptr, goff_ptr, len_ptr, end_ptr, gl_ptr, stats_ptr,
                          B, T, D, n_t, n_d,
                          HAS_LEN: tl.constexpr, HAS_END: tl.constexpr, MULTI: tl.constexpr, H_ALIGNED: tl.constexpr,
                          G_ALIGNED: tl.constexpr, EPS: tl.constexpr, CDT: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """dh[j, cols] = (ga_{j-1} + gb_{j-2}) - (ga_j + gb_{j-1}) for a (BLOCK_T, BLOCK_D) tile.

    ga_p / gb_p: gradients w.r.t. a = d_p / b = d_{p+1} of triple p. Grid: L * B * n_t * n_d
    (D chunks fastest), n_t = cdiv(T, BLOCK_T), n_d = cdiv(D, BLOCK_D); T >= 3.
    """
    pid = tl.program_id(0)
    pid_d = pid % n_d
    rest = pid // n_d
    tb = rest % n_t
    lb = (rest // n_t).to(tl.int64)
    layer = lb // B
    b = lb % B
    j = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = (cols < D)[None, :]
    ln = _row_length(len_ptr, b, T, HAS_LEN)
    lenc = tl.where((ln < 0) | (ln > T), 0, ln)
    h_row0 = _layer_offset(hoff_ptr, layer, MULTI, H_ALIGNED) + b * T * D
    g_row0 = _layer_offset(goff_ptr, layer, MULTI, G_ALIGNED) + b * T * D
    # rows j-2 .. j+2 (masked to the row's valid prefix)
    ok_m2 = (j >= 2) & (j - 2 < lenc)
    ok_m1 = (j >= 1) & (j - 1 < lenc)
    ok_0 = j < lenc
    ok_p1 = j + 1 < lenc
    ok_p2 = j + 2 < lenc
    p = h_ptr + h_row0 + j.to(tl.int64)[:, None] * D + cols[None, :]
    x_m2 = tl.load(p - 2 * D, mask=ok_m2[:, None] & c_ok, other=0.0).to(CDT)
    x_m1 = tl.load(p - D, mask=ok_m1[:, None] & c_ok, other=0.0).to(CDT)
    x_0 = tl.load(p, mask=ok_0[:, None] & c_ok, other=0.0).to(CDT)
    x_p1 = tl.load(p + D, mask=ok_p1[:, None] & c_ok, other=0.0).to(CDT)
    x_p2 = tl.load(p + 2 * D, mask=ok_p2[:, None] & c_ok, other=0.0).to(CDT)
    d_m2 = x_m1 - x_m2
    d_m1 = x_0 - x_m1
    d_0 = x_p1 - x_0
    d_p1 = x_p2 - x_p1
    # triple j-2 (a = d_m2, b = d_m1): gb; triple j-1 (a = d_m1, b = d_0): ga, gb;
    # triple j (a = d_0, b = d_p1): ga.
    v2, wa2, wb2, Na2, Nb2, ca2, cb2 = _dense_triple(gl_ptr, stats_ptr, end_ptr, lb, T, j - 2, lenc, HAS_END, EPS, CDT)
    v1, wa1, wb1, Na1, Nb1, ca1, cb1 = _dense_triple(gl_ptr, stats_ptr, end_ptr, lb, T, j - 1, lenc, HAS_END, EPS, CDT)
    v0, wa0, wb0, Na0, Nb0, ca0, cb0 = _dense_triple(gl_ptr, stats_ptr, end_ptr, lb, T, j, lenc, HAS_END, EPS, CDT)
    gb_2 = wb2[:, None] * (d_m2 / Na2[:, None] - cb2[:, None] * d_m1)
    ga_1 = wa1[:, None] * (d_0 / Nb1[:, None] - ca1[:, None] * d_m1)
    gb_1 = wb1[:, None] * (d_m1 / Na1[:, None] - cb1[:, None] * d_0)
    ga_0 = wa0[:, None] * (d_p1 / Nb0[:, None] - ca0[:, None] * d_0)
    gb_2 = tl.where(v2[:, None], gb_2, 0.0)
    ga_1 = tl.where(v1[:, None], ga_1, 0.0)
    gb_1 = tl.where(v1[:, None], gb_1, 0.0)
    ga_0 = tl.where(v0[:, None], ga_0, 0.0)
    dh = (ga_1 + gb_2) - (ga_0 + gb_1)
    out = g_ptr + g_row0 + j.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out, dh.to(g_ptr.dtype.element_ty), mask=(j < T)[:, None] & c_ok)
