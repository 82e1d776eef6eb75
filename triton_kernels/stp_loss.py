"""Triton kernels for the STP (trajectory-straightness) loss (semantics: :mod:`trajops.reference`).

Only ``@triton.jit`` kernels and their host launchers live here; op registration and autograd are
done elsewhere. Public launchers (``hidden`` is a list of L >= 1 contiguous (B, T, D) tensors of one
shape, dtype and device; ``lengths`` an optional contiguous (B,) int64 tensor):

* :func:`stp_fwd`        ``(hidden, triples (S, B, 3), lengths) -> loss (L, S, B), stats (L, S, B, 3)``
* :func:`stp_bwd`        ``(grad_loss, stats, hidden, triples, lengths) -> [dL/dh] * L``
* :func:`stp_dense_fwd`  ``(hidden, lengths) -> loss (L, B, T-2), stats (L, B, T-1, 2)``
* :func:`stp_dense_bwd`  ``(grad_loss, stats, hidden, lengths) -> [dL/dh] * L``

Notation: for a triple s < r < t of row b, ``a = h[r] - h[s]``, ``b = h[t] - h[r]``,
``Na = max(|a|, eps)``, ``Nb = max(|b|, eps)``, ``cos = a.b / (Na Nb)``, ``loss = 1 - cos``; with
``w = -grad``, ``ga = (w / Na) (b / Nb - ca a)``, ``gb = (w / Nb) (a / Na - cb b)``
(``ca = cos / |a|``, 0 at |a| = 0; bounded by 1 / Na), and ``dh[s] -= ga``, ``dh[r] += ga - gb``,
``dh[t] += gb``. No intermediate overflows: when a plain sum of squares (or a.b) is not finite,
the forwards redo that program's sums on a / max|a| and b / max|b| (two more loops over D that
finite hidden states below ~1e19 in fp32 never take), and the stats carry cos, not a.b.
Everything is computed in fp32 (fp64 for fp64 inputs); losses and stats are stored in that dtype,
gradients in the input dtype.

Layers without a copy
---------------------
Every kernel covers all L layers in one launch without stacking them: it receives ``hidden[0]`` as
its base pointer plus an int64 tensor of per-layer element offsets
``(hidden[l].data_ptr() - hidden[0].data_ptr()) // element_size`` (the same for the list of output
gradients). One flat address space per device makes ``base + offset`` address layer l (CUDA's
unified virtual addressing; the interpreter reads raw CPU addresses). With one layer the offset
load is compiled out (``MULTI=False``); when every offset is a multiple of 16 elements the kernels
tell the compiler so (``OFF_ALIGNED``), so that the row loads stay vectorized.

Row validity
------------
Row b is active iff ``lengths[b] >= 3`` (all rows when T >= 3 without lengths). Inactive rows get 0
loss, 0 stats and no gradient. Index values are not checked on the host (that would cost a sync on
CUDA): instead, the sampled forward writes NaN loss and stats for a triple of an active row that is
not ``0 <= s < r < t < lengths[b]`` and for every triple of a row with ``lengths[b]`` outside
[0, T], and the dense forward writes NaN everywhere in a row with ``lengths[b]`` outside [0, T]. No
kernel ever reads or writes out of bounds for such indices (their loads and stores are masked) and
the backwards skip them (no gradient).

Packed sequences
----------------
With ``cu_seqlens`` the op layer passes hidden (1, total, D) and, for the sampled kernels, per
document j a row base ``row_base[j]`` (its first packed token) and its length as ``lengths[j]``
(``T`` = total): "row" j addresses tokens ``row_base[j] + pos`` instead of ``j * T + pos``. The
dense kernels keep the one packed row and get ``ends`` (total,): the end of each position's
document; a step q exists iff ``q + 1 < ends[q]``, a triple iff ``q + 2 < ends[q]``. Both are
built from offsets clamped into [0, total], so no address leaves a tensor whatever the values;
invalid offsets are passed as lengths -1, which NaN the outputs (the rule above).

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

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, compute_dtypes

__all__ = ["stp_fwd", "stp_bwd", "stp_dense_fwd", "stp_dense_bwd"]

STP_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default, as the reference


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _layer_offset(off_ptr, layer, MULTI: tl.constexpr, OFF_ALIGNED: tl.constexpr):
    """Element offset of layer ``layer`` (scalar or vector) from the base pointer (int64)."""
    if MULTI:
        off = tl.load(off_ptr + layer)
        if OFF_ALIGNED:
            off = tl.multiple_of(off, 16)
    else:
        off = layer.to(tl.int64) * 0
    return off


@triton.jit
def _row_length(len_ptr, b, T, HAS_LEN: tl.constexpr):
    """lengths[b] as int64 (T without lengths); b scalar or vector (already masked in range)."""
    if HAS_LEN:
        ln = tl.load(len_ptr + b)
    else:
        ln = b.to(tl.int64) * 0 + T
    return ln


@triton.jit
def _row_start(base_ptr, b, T, HAS_BASE: tl.constexpr):
    """First token (int64) of row b in the flat (B*T) token axis: row_base[b] or b * T."""
    if HAS_BASE:
        st = tl.load(base_ptr + b)
    else:
        st = b.to(tl.int64) * T
    return st


@triton.jit
def _doc_end(end_ptr, q, T, HAS_END: tl.constexpr):
    """End of the document of packed positions q (vector; T without ends), q clamped into [0, T)."""
    if HAS_END:
        e = tl.load(end_ptr + tl.minimum(tl.maximum(q, 0), T - 1))
    else:
        e = q.to(tl.int64) * 0 + T
    return e


@triton.jit
def _clamp_eps(n, EPS: tl.constexpr, CDT: tl.constexpr):
    """max(n, eps) as torch's clamp_min (NaN stays NaN); eps built in the compute dtype."""
    eps = tl.full([], EPS, CDT)
    return tl.where(n < eps, eps, n)


@triton.jit
def _cos_coefs(w, na, nb, cos, EPS: tl.constexpr, CDT: tl.constexpr):
    """Per-triple scalars of ga = wa (b / Nb - ca a) and gb = wb (a / Na - cb b).

    Returns (wa, wb, Na, Nb, ca, cb) with wa = w / Na, wb = w / Nb, ca = cos / |a|,
    cb = cos / |b| (0 at a zero norm), computed in the reference's order.
    """
    # A non-finite weight gives NaN rows, as the reference (Inf times a term that rounds to 0 or
    # not would make the Inf/NaN pattern depend on the rounding of each backend).
    w = w + (w - w)  # w - w: 0 for finite w, NaN for +-Inf (fewer registers than a where)
    Na = _clamp_eps(na, EPS, CDT)
    Nb = _clamp_eps(nb, EPS, CDT)
    pa = na > 0
    pb = nb > 0
    ca = tl.where(pa, cos / tl.where(pa, na, 1.0), 0.0)
    cb = tl.where(pb, cos / tl.where(pb, nb, 1.0), 0.0)
    return w / Na, w / Nb, Na, Nb, ca, cb


@triton.jit
def _norm_term(x, IS_D1: tl.constexpr):
    """Summand of a norm over D: x^2, or |x| when D == 1 (torch's vector_norm over a size-1 dim
    returns |x| exactly, without squaring)."""
    if IS_D1:
        r = tl.abs(x)
    else:
        r = x * x
    return r


@triton.jit
def _norm_finish(s, IS_D1: tl.constexpr):
    if IS_D1:
        r = s
    else:
        r = tl.sqrt(s)
    return r


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _flagged(bad, use, value, CDT: tl.constexpr):
    """NaN where the inputs were invalid (bad), value where it counts (use), 0 elsewhere."""
    return tl.where(bad, tl.full([], float("nan"), CDT), tl.where(use, value, 0.0))


@triton.jit
def _triple_finish(s_aa, s_bb, s_ab, sc_a, sc_b, IS_D1: tl.constexpr, EPS: tl.constexpr, CDT: tl.constexpr):
    """(|a|, |b|, cos(b, a), overflowed) of a tile of triples from the per-column partial sums of
    a / sc_a and b / sc_b (per-triple scales; 1 on the first pass).

    cos = (a.b / (sc_a sc_b)) (sc_a / Na) (sc_b / Nb): sc_a <= Na, so nothing overflows once the
    sums are finite. ``overflowed`` flags the triples whose sums were not (they need a scaled pass).
    """
    ss_a = tl.sum(s_aa, axis=1)
    ss_b = tl.sum(s_bb, axis=1)
    dot = tl.sum(s_ab, axis=1)
    na = _norm_finish(ss_a, IS_D1) * sc_a
    nb = _norm_finish(ss_b, IS_D1) * sc_b
    cos = dot * (sc_a / _clamp_eps(na, EPS, CDT)) * (sc_b / _clamp_eps(nb, EPS, CDT))
    # x - x is NaN exactly for an Inf or a NaN x
    overflowed = ((ss_a - ss_a) != 0) | ((ss_b - ss_b) != 0) | ((dot - dot) != 0)
    return na, nb, cos, overflowed


@triton.jit
def _scale_of(m, CDT: tl.constexpr):
    """The scale of a scaled pass: max|v| when it is finite and > 0, else 1 (a NaN or Inf step
    gives the same NaN either way)."""
    ok = (m > 0) & ((m - m) == 0)
    return tl.where(ok, m, tl.full([], 1.0, CDT))


@triton.jit
def _triple_steps(h_ptr, base_s, base_r, base_t, use, cols, D, CDT: tl.constexpr):
    """(a, b) = (h[r] - h[s], h[t] - h[r]) tiles of sampled triples at columns cols (0 where masked)."""
    m = use[:, None] & (cols < D)[None, :]
    hs = tl.load(h_ptr + base_s[:, None] + cols[None, :], mask=m, other=0.0).to(CDT)
    hr = tl.load(h_ptr + base_r[:, None] + cols[None, :], mask=m, other=0.0).to(CDT)
    ht = tl.load(h_ptr + base_t[:, None] + cols[None, :], mask=m, other=0.0).to(CDT)
    return hr - hs, ht - hr


@triton.jit
def _dense_steps(h_ptr, rows, step_ok, tri_ok, cols, D, CDT: tl.constexpr):
    """(d_q, d_{q+1}) tiles of the dense triples q at columns cols; d_{q+1} is 0 past the row's
    length (its h row is never loaded there)."""
    c_ok = (cols < D)[None, :]
    m2 = tri_ok[:, None] & c_ok
    p = h_ptr + rows[:, None] + cols[None, :]
    h0 = tl.load(p, mask=step_ok[:, None] & c_ok, other=0.0).to(CDT)
    h1 = tl.load(p + D, mask=step_ok[:, None] & c_ok, other=0.0).to(CDT)
    h2 = tl.load(p + 2 * D, mask=m2, other=0.0).to(CDT)
    return h1 - h0, tl.where(m2, h2 - h1, 0.0)


@triton.jit
def _pair_sums(h_ptr, base0, base1, base2, ok0, ok1, D, sc_a, sc_b, DENSE: tl.constexpr, SCALED: tl.constexpr,
               IS_D1: tl.constexpr, CDT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-column partial sums of |a|^2, |b|^2 and a.b (of a / sc_a and b / sc_b with SCALED) over
    all of D, for the sampled triples (bases of s, r, t; ok0 = use) or the dense ones (DENSE: base0
    = the rows of h[q], ok0 / ok1 = step_ok / tri_ok)."""
    s_aa = tl.zeros([BLOCK_R, BLOCK_D], dtype=CDT)
    s_bb = tl.zeros([BLOCK_R, BLOCK_D], dtype=CDT)
    s_ab = tl.zeros([BLOCK_R, BLOCK_D], dtype=CDT)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        if DENSE:
            a, b = _dense_steps(h_ptr, base0, ok0, ok1, cols, D, CDT)
        else:
            a, b = _triple_steps(h_ptr, base0, base1, base2, ok0, cols, D, CDT)
        if SCALED:
            a = a / sc_a[:, None]
            b = b / sc_b[:, None]
        s_aa += _norm_term(a, IS_D1)
        s_bb += _norm_term(b, IS_D1)
        s_ab += a * b
    return s_aa, s_bb, s_ab


@triton.jit
def _pair_scales(h_ptr, base0, base1, base2, ok0, ok1, D, DENSE: tl.constexpr, CDT: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """(scale of a, scale of b) per row for the scaled pass: max|a|, max|b| (see _scale_of)."""
    ma = tl.zeros([BLOCK_R, BLOCK_D], dtype=CDT)
    mb = tl.zeros([BLOCK_R, BLOCK_D], dtype=CDT)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        if DENSE:
            a, b = _dense_steps(h_ptr, base0, ok0, ok1, cols, D, CDT)
        else:
            a, b = _triple_steps(h_ptr, base0, base1, base2, ok0, cols, D, CDT)
        ma = tl.maximum(ma, tl.abs(a))
        mb = tl.maximum(mb, tl.abs(b))
    return _scale_of(tl.max(ma, axis=1), CDT), _scale_of(tl.max(mb, axis=1), CDT)


@triton.jit
def _pair_cosine(h_ptr, base0, base1, base2, ok0, ok1, D, DENSE: tl.constexpr, IS_D1: tl.constexpr,
                 EPS: tl.constexpr, CDT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """(|a|, |b|, cos(b, a)) per row without intermediate overflow: one pass of plain sums; if one
    overflowed (or met a NaN/Inf), two more passes (the scales, then the scaled sums) whose results
    replace the overflowed rows. The max accumulators live only in that rare branch: in the main
    loop they cost registers."""
    one = tl.full([BLOCK_R], 1.0, CDT)
    s_aa, s_bb, s_ab = _pair_sums(h_ptr, base0, base1, base2, ok0, ok1, D, one, one, DENSE, False, IS_D1, CDT,
                                  BLOCK_R, BLOCK_D)
    na, nb, cos, ovf = _triple_finish(s_aa, s_bb, s_ab, one, one, IS_D1, EPS, CDT)
    if tl.max(ovf.to(tl.int32), axis=0) > 0:
        sc_a, sc_b = _pair_scales(h_ptr, base0, base1, base2, ok0, ok1, D, DENSE, CDT, BLOCK_R, BLOCK_D)
        s_aa, s_bb, s_ab = _pair_sums(h_ptr, base0, base1, base2, ok0, ok1, D, sc_a, sc_b, DENSE, True, IS_D1,
                                      CDT, BLOCK_R, BLOCK_D)
        na2, nb2, cos2, ovf2 = _triple_finish(s_aa, s_bb, s_ab, sc_a, sc_b, IS_D1, EPS, CDT)
        na = tl.where(ovf, na2, na)
        nb = tl.where(ovf, nb2, nb)
        cos = tl.where(ovf, cos2, cos)
    return na, nb, cos


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


# --------------------------------------------------------------------------------------------
# host launchers
# --------------------------------------------------------------------------------------------

# The Triton interpreter (TRITON_INTERPRET=1) runs programs one by one in Python, where fewer,
# larger programs are much faster and occupancy means nothing.
_INTERPRET = INTERPRET
_MIN_PROGRAMS = 1 if _INTERPRET else 512  # ~4 per H100 SM, when the problem allows


def _per_thread(D: int, elem_size: int) -> int:
    """Elements per thread per tile row chunk: one 16-byte vector when rows can be 16-byte aligned
    (Triton specializes D % 16 == 0), else 2."""
    return 16 // elem_size if D % 16 == 0 else 2


def _tile_elems(D: int, elem_size: int) -> int:
    if _INTERPRET:  # each tile op is one numpy call there (~1 ms of Python): big tiles, few programs
        return 8192
    return 256 * _per_thread(D, elem_size)  # 8 warps


def _num_warps(elems: int, D: int, elem_size: int) -> int:
    return max(1, min(8, elems // (32 * _per_thread(D, elem_size))))


def _rows_cols(n_rows: int, n_programs_per_row_block: int, D: int, elem_size: int) -> Tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_D) for kernels that loop over D: rows fill the tile D leaves free, then
    shrink until there are enough programs; columns then take back the room rows gave up."""
    tile = _tile_elems(D, elem_size)
    block_d = min(triton.next_power_of_2(D), tile // 16 if n_rows > 1 else tile)
    block_r = max(1, min(tile // block_d, triton.next_power_of_2(n_rows)))
    while block_r > 1 and n_programs_per_row_block * triton.cdiv(n_rows, block_r) < _MIN_PROGRAMS:
        block_r //= 2
    block_d = min(triton.next_power_of_2(D), tile // block_r)
    return block_r, block_d


def _offsets(ts: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, bool]:
    """(int64 tensor of the element offsets of ts[l] from ts[0], on ts[0]'s device; whether every
    offset is a multiple of 16 elements). Pinned + non_blocking on CUDA: no wait for the copy."""
    base = ts[0].data_ptr()
    es = ts[0].element_size()
    offs = []
    for t in ts:
        delta = t.data_ptr() - base
        assert delta % es == 0, "layers must be element-aligned relative to hidden[0]"
        offs.append(delta // es)
    aligned = all(o % 16 == 0 for o in offs)
    dev = ts[0].device
    host = torch.tensor(offs, dtype=torch.int64)
    if dev.type == "cpu":
        return host, aligned
    if dev.type == "cuda":
        host = host.pin_memory()
    return host.to(dev, non_blocking=True), aligned


def _check_layers(hidden: Sequence[torch.Tensor]) -> None:
    assert len(hidden) >= 1, "hidden must hold at least one layer"
    h0 = hidden[0]
    assert h0.dim() == 3
    for h in hidden:
        assert h.shape == h0.shape and h.dtype == h0.dtype and h.device == h0.device
        assert h.is_contiguous(), "every layer must be contiguous"


def _len_arg(lengths: Optional[torch.Tensor], dummy: torch.Tensor):
    if lengths is None:
        return dummy, False
    assert lengths.dtype == torch.int64 and lengths.is_contiguous()
    return lengths, True


def _opt_arg(t: Optional[torch.Tensor], dummy: torch.Tensor):
    if t is None:
        return dummy, False
    assert t.dtype == torch.int64 and t.is_contiguous()
    return t, True


def stp_fwd(hidden: List[torch.Tensor], triples: torch.Tensor, lengths: Optional[torch.Tensor] = None,
            row_base: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sampled STP loss: loss (L, S, B) and stats (L, S, B, 3) = (|a|, |b|, cos), compute dtype.

    triples (S, B, 3) int64 contiguous. Packed (hidden (1, total, D)): B = N documents,
    ``row_base`` (N,) int64 their first tokens and ``lengths`` their lengths (required then). Invalid triples of active rows (and rows with lengths
    outside [0, T]) get NaN loss and stats; inactive rows get 0.
    """
    _check_layers(hidden)
    h0 = hidden[0]
    _, T, D = h0.shape
    B = h0.shape[0] if row_base is None else row_base.shape[0]
    assert row_base is None or lengths is not None
    L, S = len(hidden), triples.shape[0]
    assert triples.shape == (S, B, 3) and triples.dtype == torch.int64 and triples.is_contiguous()
    cdt, tcdt = compute_dtypes(h0.dtype)
    N = L * S * B
    if N == 0 or h0.numel() == 0:
        # No launch (T == 0 has no active rows). D == 0: a = b = 0, so the reference's loss is
        # 1 - 0 = 1 on active rows; bad indices are not flagged here (no kernel runs).
        loss = torch.zeros((L, S, B), dtype=cdt, device=h0.device)
        if N and T >= 3 and D == 0:
            if lengths is None:
                loss.fill_(1.0)
            else:
                loss[:] = (lengths >= 3).to(cdt)
        return loss, torch.zeros((L, S, B, 3), dtype=cdt, device=h0.device)
    loss = torch.empty((L, S, B), dtype=cdt, device=h0.device)
    stats = torch.empty((L, S, B, 3), dtype=cdt, device=h0.device)
    offs, aligned = _offsets(hidden)
    len_t, has_len = _len_arg(lengths, triples)
    base_t, has_base = _opt_arg(row_base, triples)
    es = h0.element_size()
    bn, bd = _rows_cols(N, 1, D, es)
    _stp_fwd_kernel[(triton.cdiv(N, bn),)](
        h0, offs, triples, len_t, base_t, loss, stats, N, S * B, B, T, D,
        HAS_LEN=has_len, HAS_BASE=has_base, MULTI=L > 1, OFF_ALIGNED=aligned, IS_D1=D == 1, EPS=STP_EPS, CDT=tcdt,
        BLOCK_N=bn, BLOCK_D=bd, num_warps=_num_warps(bn * bd, D, es))
    return loss, stats


def stp_bwd(grad_loss: torch.Tensor, stats: torch.Tensor, hidden: List[torch.Tensor],
            triples: torch.Tensor, lengths: Optional[torch.Tensor] = None,
            row_base: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """Gradient of sum(grad_loss * loss) w.r.t. each layer (L tensors of hidden's shape and dtype).
    Packed: ``row_base`` and ``lengths`` as :func:`stp_fwd`.

    grad_loss (L, S, B) and stats (L, S, B, 3) contiguous in the compute dtype. Repeated positions
    accumulate in span order, deterministically. Invalid triples contribute nothing.
    """
    _check_layers(hidden)
    h0 = hidden[0]
    _, T, D = h0.shape
    B = h0.shape[0] if row_base is None else row_base.shape[0]
    assert row_base is None or lengths is not None
    L, S = len(hidden), triples.shape[0]
    cdt, tcdt = compute_dtypes(h0.dtype)
    assert triples.shape == (S, B, 3) and triples.dtype == torch.int64 and triples.is_contiguous()
    assert grad_loss.shape == (L, S, B) and grad_loss.dtype == cdt and grad_loss.is_contiguous()
    assert stats.shape == (L, S, B, 3) and stats.dtype == cdt and stats.is_contiguous()
    grads = [torch.zeros_like(h) for h in hidden]
    if B == 0 or T < 3 or D == 0 or S == 0:
        return grads
    hoffs, h_al = _offsets(hidden)
    goffs, g_al = _offsets(grads)
    len_t, has_len = _len_arg(lengths, triples)
    base_t, has_base = _opt_arg(row_base, triples)
    es = h0.element_size()
    pt = _per_thread(D, es)
    if _INTERPRET:
        bd = min(triton.next_power_of_2(D), _tile_elems(D, es))
    else:
        # One program walks all S spans (latency-bound): prefer more, narrower programs.
        bd = min(triton.next_power_of_2(D), 128 * pt)
        while bd > 32 * pt and L * B * triton.cdiv(D, bd) < _MIN_PROGRAMS:
            bd //= 2
    nd = triton.cdiv(D, bd)
    _stp_bwd_kernel[(L * B * nd,)](
        h0, grads[0], hoffs, goffs, triples, len_t, base_t, grad_loss, stats, S, B, T, D, nd,
        HAS_LEN=has_len, HAS_BASE=has_base, MULTI=L > 1, H_ALIGNED=h_al, G_ALIGNED=g_al, EPS=STP_EPS, CDT=tcdt,
        BLOCK_D=bd, num_warps=max(1, min(8, bd // (32 * pt))), num_stages=1)
    return grads


def stp_dense_fwd(hidden: List[torch.Tensor], lengths: Optional[torch.Tensor] = None,
                  ends: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense STP loss over every (p, p+1, p+2): loss (L, B, max(T-2, 0)) and stats
    (L, B, max(T-1, 0), 2) = (|d_q|, cos_q), compute dtype (reference.stp_loss_dense).
    Packed (B = 1): ``ends`` (T,) int64, the end of each position's document."""
    _check_layers(hidden)
    h0 = hidden[0]
    B, T, D = h0.shape
    L = len(hidden)
    cdt, tcdt = compute_dtypes(h0.dtype)
    if B == 0 or T < 2 or D == 0:
        # No launch. D == 0: zero steps, so loss 1 on valid triples as the reference. (T == 2
        # launches: no triple, but the one step's norm is a stat.)
        loss = torch.zeros((L, B, max(T - 2, 0)), dtype=cdt, device=h0.device)
        if B and T >= 3:
            p = torch.arange(T - 2, device=h0.device)
            valid = (p + 2 < T).expand(B, -1) if lengths is None else p[None, :] + 2 < lengths[:, None]
            if ends is not None:
                valid = valid & (p + 2 < ends[p])[None, :]
            loss[:] = valid.to(cdt)
        return loss, torch.zeros((L, B, max(T - 1, 0), 2), dtype=cdt, device=h0.device)
    loss = torch.empty((L, B, T - 2), dtype=cdt, device=h0.device)
    stats = torch.empty((L, B, T - 1, 2), dtype=cdt, device=h0.device)
    offs, aligned = _offsets(hidden)
    len_t, has_len = _len_arg(lengths, stats)
    end_t, has_end = _opt_arg(ends, offs)
    loss_arg = loss if T > 2 else stats  # T == 2: nothing is stored into loss (empty)
    es = h0.element_size()
    bp, bd = _rows_cols(T - 1, L * B, D, es)
    nq = triton.cdiv(T - 1, bp)
    _stp_dense_fwd_kernel[(L * B * nq,)](
        h0, offs, len_t, end_t, loss_arg, stats, B, T, D, nq,
        HAS_LEN=has_len, HAS_END=has_end, MULTI=L > 1, OFF_ALIGNED=aligned, IS_D1=D == 1, EPS=STP_EPS, CDT=tcdt,
        BLOCK_P=bp, BLOCK_D=bd, num_warps=_num_warps(bp * bd, D, es))
    return loss, stats


def stp_dense_bwd(grad_loss: torch.Tensor, stats: torch.Tensor, hidden: List[torch.Tensor],
                  lengths: Optional[torch.Tensor] = None, ends: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """Gradient of sum(grad_loss * dense loss) w.r.t. each layer (reference.stp_loss_dense_backward).

    grad_loss (L, B, T-2), stats (L, B, T-1, 2), contiguous in the compute dtype.
    """
    _check_layers(hidden)
    h0 = hidden[0]
    B, T, D = h0.shape
    L = len(hidden)
    cdt, tcdt = compute_dtypes(h0.dtype)
    if B == 0 or T < 3 or D == 0:
        return [torch.zeros_like(h) for h in hidden]
    assert grad_loss.shape == (L, B, T - 2) and grad_loss.dtype == cdt and grad_loss.is_contiguous()
    assert stats.shape == (L, B, T - 1, 2) and stats.dtype == cdt and stats.is_contiguous()
    grads = [torch.empty_like(h) for h in hidden]
    hoffs, h_al = _offsets(hidden)
    goffs, g_al = _offsets(grads)
    len_t, has_len = _len_arg(lengths, grad_loss)
    end_t, has_end = _opt_arg(ends, hoffs)
    es = h0.element_size()
    tile = _tile_elems(D, es)
    if _INTERPRET:
        bd = min(triton.next_power_of_2(D), tile)
        bt = min(tile // bd, triton.next_power_of_2(T))
    else:
        # 16-row tiles: each tile also reads 4 halo rows (mostly L2 hits), 1.25x its rows.
        bt = min(16, triton.next_power_of_2(T))
        bd = min(triton.next_power_of_2(D), max(tile // bt, 16))
    nt, nd = triton.cdiv(T, bt), triton.cdiv(D, bd)
    _stp_dense_bwd_kernel[(L * B * nt * nd,)](
        h0, grads[0], hoffs, goffs, len_t, end_t, grad_loss, stats, B, T, D, nt, nd,
        HAS_LEN=has_len, HAS_END=has_end, MULTI=L > 1, H_ALIGNED=h_al, G_ALIGNED=g_al, EPS=STP_EPS, CDT=tcdt,
        BLOCK_T=bt, BLOCK_D=bd, num_warps=_num_warps(bt * bd, D, es))
    return grads
