"""Triton kernels of the sampled STP loss: forward and backward over (S, B, 3) triples.

Launched by :func:`stp_fwd` / :func:`stp_bwd` in triton_kernels/stp_loss.py (notation, layer
offsets, row validity and packed rows: that module's docstring). Device helpers shared with the
dense kernels: stp_loss_helpers.py.

Kernels (one launch each)
-------------------------
* ``_stp_fwd_kernel``: grid cdiv(L*S*B, BLOCK_N); a program takes BLOCK_N triples (flat (l, s, b)
  order) and loops over D in BLOCK_D chunks accumulating |a|^2, |b|^2, a.b on
  (BLOCK_N, BLOCK_D) tiles gathered from the three rows.
* ``_stp_bwd_kernel``: grid L*B*cdiv(D, BLOCK_D); a program owns one (layer, row, D-chunk) of the
  gradient and walks the S spans in order, doing load-add-store on the three touched rows. The
  same program always owns an element, and a store and the next load of the same element use the
  same layout (the same thread), so repeated positions accumulate deterministically, in the
  reference's order (span-major, then s, r, t), without atomics. The loop is a chain of
  dependent read-modify-writes (latency-bound), so the next span's h rows and stats and the
  indices two spans ahead are prefetched by hand; launched with num_stages=1 so that the
  compiler's own software pipelining never hoists a gradient load above the previous span's store.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .stp_loss_helpers import _cos_coefs, _flagged, _layer_offset, _pair_cosine, _row_length


@triton.jit
def _row_start(base_ptr, b, T, HAS_BASE: tl.constexpr):
    """First token (int64) of row b in the flat (B*T) token axis: row_base[b] or b * T."""
    if HAS_BASE:
        st = tl.load(base_ptr + b)
    else:
        st = b.to(tl.int64) * T
    return st


@triton.jit
def _stp_fwd_kernel(h_ptr, off_ptr, tri_ptr, len_ptr, base_ptr, loss_ptr, stats_ptr,
                    N, SB, B, T, D,
                    HAS_LEN: tl.constexpr, HAS_BASE: tl.constexpr, MULTI: tl.constexpr, OFF_ALIGNED: tl.constexpr,
                    IS_D1: tl.constexpr, EPS: tl.constexpr, CDT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Loss and stats of BLOCK_N sampled triples, flat index n = (l * S + s) * B + b.

    h: layer 0 of L (B, T, D) layers (the others at element offsets off[l]); triples (S, B, 3);
    loss (L, S, B); stats (L, S, B, 3) = (|a|, |b|, cos). Grid: cdiv(N, BLOCK_N), N = L * S * B.
    """
    pid = tl.program_id(0)
    n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    n_c = tl.where(n_ok, n, 0)
    layer = n_c // SB
    sb = n_c % SB
    b = sb % B
    s = tl.load(tri_ptr + sb * 3)
    r = tl.load(tri_ptr + sb * 3 + 1)
    t = tl.load(tri_ptr + sb * 3 + 2)
    ln = _row_length(len_ptr, b, T, HAS_LEN)
    active = ln >= 3
    bad_len = (ln < 0) | (ln > T)
    ok_tri = (s >= 0) & (s < r) & (r < t) & (t < ln)
    flag = n_ok & (bad_len | (active & (ok_tri == 0)))  # NaN outputs
    use = n_ok & active & (ok_tri & (bad_len == 0))
    row0 = _layer_offset(off_ptr, layer, MULTI, OFF_ALIGNED) + _row_start(base_ptr, b, T, HAS_BASE) * D
    base_s = row0 + tl.where(use, s, 0) * D
    base_r = row0 + tl.where(use, r, 0) * D
    base_t = row0 + tl.where(use, t, 0) * D
    na, nb, cos = _pair_cosine(h_ptr, base_s, base_r, base_t, use, use, D, False, IS_D1, EPS, CDT,
                               BLOCK_N, BLOCK_D)
    loss = _flagged(flag, use, 1.0 - cos, CDT)
    na = _flagged(flag, use, na, CDT)
    nb = _flagged(flag, use, nb, CDT)
    cos = _flagged(flag, use, cos, CDT)
    tl.store(loss_ptr + n, loss, mask=n_ok)
    tl.store(stats_ptr + n * 3, na, mask=n_ok)
    tl.store(stats_ptr + n * 3 + 1, nb, mask=n_ok)
    tl.store(stats_ptr + n * 3 + 2, cos, mask=n_ok)


@triton.jit
def _span_indices(tri_ptr, i, S, B, b):
    """Raw (s, r, t) of span min(i, S - 1) of row b (int64 scalars; no mask needed)."""
    tri = tri_ptr + (tl.minimum(i, S - 1) * B + b).to(tl.int64) * 3
    return tl.load(tri), tl.load(tri + 1), tl.load(tri + 2)


@triton.jit
def _span_check(s, r, t, in_range, row_ok, ln):
    """(ok, s, r, t): ok iff the span exists, the row is active and 0 <= s < r < t < ln; the
    positions are replaced by 0 where not ok (so no address ever leaves the row)."""
    ok = in_range & row_ok & (s >= 0) & (s < r) & (r < t) & (t < ln)
    return ok, tl.where(ok, s, 0), tl.where(ok, r, 0), tl.where(ok, t, 0)


@triton.jit
def _span_loads(h_ptr, h_row0, gl_ptr, stats_ptr, k, ok, s, r, t, cols, D):
    """Issues the loads of one span: -grad, (|a|, |b|, cos) and the three h rows (raw dtype).

    Nothing here uses the loaded values, so the warp does not wait for them."""
    w = -tl.load(gl_ptr + k, mask=ok, other=0.0)
    na = tl.load(stats_ptr + k * 3, mask=ok, other=1.0)
    nb = tl.load(stats_ptr + k * 3 + 1, mask=ok, other=1.0)
    cos = tl.load(stats_ptr + k * 3 + 2, mask=ok, other=0.0)
    # (scalar ok) & (vector) as an integer bound: the interpreter mistypes a splat scalar i1.
    m = cols < tl.where(ok, D, 0)
    hs = tl.load(h_ptr + h_row0 + s * D + cols, mask=m, other=0.0)
    hr = tl.load(h_ptr + h_row0 + r * D + cols, mask=m, other=0.0)
    ht = tl.load(h_ptr + h_row0 + t * D + cols, mask=m, other=0.0)
    return w, na, nb, cos, hs, hr, ht


@triton.jit
def _stp_bwd_kernel(h_ptr, g_ptr, hoff_ptr, goff_ptr, tri_ptr, len_ptr, base_ptr, gl_ptr, stats_ptr,
                    S, B, T, D, n_d,
                    HAS_LEN: tl.constexpr, HAS_BASE: tl.constexpr, MULTI: tl.constexpr, H_ALIGNED: tl.constexpr,
                    G_ALIGNED: tl.constexpr, EPS: tl.constexpr, CDT: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Gradient of the sampled loss for one (layer, row, D chunk), all spans in order.

    g: layer 0 of the L (B, T, D) gradients (zero-filled by the host; offsets goff); grad_loss
    (L, S, B) and stats (L, S, B, 3) in the compute dtype. Grid: L * B * n_d, n_d = cdiv(D, BLOCK_D);
    S >= 1.

    The span loop is a chain of dependent read-modify-writes, so it is latency-bound; the loads
    that do not depend on the gradient are issued ahead by hand (the compiler cannot move a load
    above a store it cannot prove disjoint): while span i updates the gradient, span i+1's stats
    and h rows and span i+2's indices are in flight.
    """
    pid = tl.program_id(0)
    pid_d = pid % n_d
    lb = pid // n_d
    layer = lb // B
    b = lb % B
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ln = _row_length(len_ptr, b, T, HAS_LEN)
    row_ok = (ln >= 3) & (ln <= T)
    start = _row_start(base_ptr, b, T, HAS_BASE) * D
    h_row0 = _layer_offset(hoff_ptr, layer, MULTI, H_ALIGNED) + start
    g_row0 = _layer_offset(goff_ptr, layer, MULTI, G_ALIGNED) + start
    k_row = layer.to(tl.int64) * S * B + b  # (layer, span 0, b) in (L, S, B)
    # prologue: span 0 checked and loaded, span 1's raw indices
    s_, r_, t_ = _span_indices(tri_ptr, 0, S, B, b)
    ok0, s0, r0, t0 = _span_check(s_, r_, t_, S > 0, row_ok, ln)
    w0, na0, nb0, cos0, hs0, hr0, ht0 = _span_loads(h_ptr, h_row0, gl_ptr, stats_ptr, k_row,
                                                    ok0, s0, r0, t0, cols, D)
    s1, r1, t1 = _span_indices(tri_ptr, 1, S, B, b)
    for i in range(0, S):
        # prefetch: span i+1 (indices loaded one iteration ago) and span i+2's indices
        ok1, s1c, r1c, t1c = _span_check(s1, r1, t1, i + 1 < S, row_ok, ln)
        k1 = k_row + tl.minimum(i + 1, S - 1).to(tl.int64) * B
        w1, na1, nb1, cos1, hs1, hr1, ht1 = _span_loads(h_ptr, h_row0, gl_ptr, stats_ptr, k1,
                                                        ok1, s1c, r1c, t1c, cols, D)
        s2, r2, t2 = _span_indices(tri_ptr, i + 2, S, B, b)
        # read-modify-write of span i. s < r < t are distinct rows, so all three loads may
        # precede the stores; each element is loaded and stored by the thread that owns it
        # (same layout), after that thread's own store of the previous span.
        m = cols < tl.where(ok0, D, 0)
        ps = g_ptr + g_row0 + s0 * D + cols
        pr = g_ptr + g_row0 + r0 * D + cols
        pt = g_ptr + g_row0 + t0 * D + cols
        acc_s = tl.load(ps, mask=m, other=0.0).to(CDT)
        acc_r = tl.load(pr, mask=m, other=0.0).to(CDT)
        acc_t = tl.load(pt, mask=m, other=0.0).to(CDT)
        wa, wb, Na, Nb, ca, cb = _cos_coefs(w0, na0, nb0, cos0, EPS, CDT)
        hs = hs0.to(CDT)
        hr = hr0.to(CDT)
        ht = ht0.to(CDT)
        a = hr - hs
        bb = ht - hr
        ga = wa * (bb / Nb - ca * a)
        gb = wb * (a / Na - cb * bb)
        tl.store(ps, (acc_s + (-ga)).to(g_ptr.dtype.element_ty), mask=m)
        tl.store(pr, (acc_r + (ga - gb)).to(g_ptr.dtype.element_ty), mask=m)
        tl.store(pt, (acc_t + gb).to(g_ptr.dtype.element_ty), mask=m)
        # rotate
        ok0, s0, r0, t0 = ok1, s1c, r1c, t1c
        w0, na0, nb0, cos0 = w1, na1, nb1, cos1
        hs0, hr0, ht0 = hs1, hr1, ht1
        s1, r1, t1 = s2, r2, t2
