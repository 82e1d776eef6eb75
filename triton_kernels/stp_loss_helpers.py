"""Device helpers shared by the STP Triton kernels (stp_loss_sampled.py, stp_loss_dense.py).

Notation, layer offsets and row validity: the docstring of triton_kernels/stp_loss.py. The cosine of
two steps without intermediate overflow (:func:`_pair_cosine`) serves both the sampled triples
(rows gathered by index) and the dense ones (row-shifted tiles); :func:`_cos_coefs` gives the
per-triple factors of both backwards.
"""
from __future__ import annotations

import triton
import triton.language as tl


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
