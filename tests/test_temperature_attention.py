"""trajops.temperature_attention: softmax(scale q k^T / tau) v against an independent fp64 oracle
(F.scaled_dot_product_attention on q / tau) and the reference; gradients of q, k, v and tau; tau
shapes, GQA, bottom-right causal, masks, empty rows, bad temperatures, lse, gradcheck, opcheck,
compile, determinism and bad inputs.

The op-level tests run against whatever this process dispatches to (see conftest.CPU_BACKEND):
`make test` runs this file once with the C++ kernels, once with TRAJOPS_BACKEND=reference and once
with TRAJOPS_BACKEND=triton TRITON_INTERPRET=1 (the Triton kernels on CPU, where every shape here is
cut to T <= 33, D <= 64 and B * Hq <= 4).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trajops
from trajops import reference

from conftest import CPU_BACKEND, DTYPES, INTERPRETER, TOL, assert_compiled_matches_eager

op = torch.ops.trajops.temperature_attention
op_backward = torch.ops.trajops.temperature_attention_backward
NEG_INF = float("-inf")
# Half types are compared with the fp64 oracle run on the same rounded inputs, at conftest's TOL:
# the kernels' extra roundings (q * scale / tau and the probabilities rounded to the half type
# before the matmuls, as ATen's flash kernel does) measured at most a third of it, so no slack.
TAU_KINDS = ["float", "0d", "h1", "1h1", "b1q", "bhq"]
MASK_KINDS = ["pad", "4d", "11qk", "b1qk", "hqk", "k", "bh1k", "none"]


def T_(t: int) -> int:
    """A sequence length, cut for the Triton interpreter (odd lengths stay odd: 129 -> 33)."""
    return min(t, 33) if INTERPRETER else t


def D_(d: int) -> int:
    return min(d, 64) if INTERPRETER else d


def batch_for(Hq: int) -> int:
    """2, or 1 where the interpreter would see more than 4 (batch, head) pairs."""
    return 1 if INTERPRETER and 2 * Hq > 4 else 2


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # the few tensors made without an explicit generator


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """conftest.assert_close with an explicit tolerance: atol = tol * max(1, |expected|), rtol = tol."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, (a.shape, e.shape)
    scale = max(1.0, float(e.nan_to_num(0.0, 0.0, 0.0).abs().max())) if e.numel() else 1.0
    torch.testing.assert_close(a, e, atol=tol * scale, rtol=tol, equal_nan=True)


# ---------------------------------------------------------------- inputs
def make(B, Hq, Hkv, Tq, Tk, D, Dv=None, dtype=torch.float32, seed=0, layout="bhtd"):
    """q, k, v; layout "bthd" gives the transposes of (B, T, H, D) tensors (non-contiguous)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(H, T, d):
        if layout == "bthd":
            return torch.randn(B, T, H, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
        return torch.randn(B, H, T, d, generator=g, dtype=torch.float64).to(dtype)

    return rnd(Hq, Tq, D), rnd(Hkv, Tk, D), rnd(Hkv, Tk, Dv or D)


def make_tau(kind, B, Hq, Tq, dtype=torch.float32, seed=0, lo=0.5, hi=2.0):
    """A temperature of the given kind, log-uniform in [lo, hi] (a python float for "float")."""
    if kind == "float":
        return 0.7
    shape = {"0d": (), "h1": (Hq, 1), "1h1": (1, Hq, 1), "b1q": (B, 1, Tq), "bhq": (B, Hq, Tq)}[kind]
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return (lo * (hi / lo) ** u).to(dtype)


def make_mask(kind, B, Hq, Tq, Tk, seed=0, p=0.7):
    """A bool mask in one of the accepted forms, each with (where its shape allows) an empty row."""
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed + 2)
    if kind in ("pad", "none"):  # (B, Tk) key padding; the last (or every) sequence is all padding
        lengths = torch.randint(1, Tk + 1, (B,), generator=g)
        lengths[-1 if kind == "pad" else slice(None)] = 0
        return torch.arange(Tk)[None] < lengths[:, None]
    shape = {"4d": (B, Hq, Tq, Tk), "11qk": (1, 1, Tq, Tk), "b1qk": (B, 1, Tq, Tk), "hqk": (Hq, Tq, Tk),
             "k": (Tk,), "bh1k": (B, Hq, 1, Tk)}[kind]
    m = torch.rand(shape, generator=g) < p
    if m.dim() >= 2:
        m[(0,) * (m.dim() - 2) + (min(Tq // 2, m.shape[-2] - 1),)] = False
    return m


# ---------------------------------------------------------------- the oracle
def as_4d(mask):
    """The documented mask forms: a 2-D mask is (B, Tk) key padding, the others align right."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask[:, None, None, :]
    return mask[(None,) * (4 - mask.dim())]


def allowed_of(B, Hq, Tq, Tk, mask4, causal):
    allowed = torch.ones(B, Hq, Tq, Tk, dtype=torch.bool)
    if causal:  # bottom-right: query i sees keys j <= i + (Tk - Tq)
        allowed = allowed & torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    if mask4 is not None:
        allowed = allowed & mask4
    return allowed


def oracle(q, k, v, tau, mask4, causal, scale):
    """fp64 (out, lse) through F.scaled_dot_product_attention on q / tau; differentiable in all four.

    Rows with no allowed key attend everything and are then replaced by out 0 and lse -inf, so their
    gradients are exactly 0 (SDPA alone gives NaN or 0 there, depending on the version).
    """
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    s = 1 / math.sqrt(D) if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    t = torch.as_tensor(tau, dtype=torch.float64).expand(B, Hq, Tq)
    allowed = allowed_of(B, Hq, Tq, Tk, mask4, causal)
    nonempty = allowed.any(-1)
    safe = allowed | ~nonempty[..., None]
    qt = q / t[..., None]
    out = F.scaled_dot_product_attention(qt, k, v, attn_mask=safe, scale=s, enable_gqa=True)
    logits = qt @ k.repeat_interleave(Hq // k.shape[1], dim=1).transpose(-1, -2) * s
    lse = torch.logsumexp(logits.masked_fill(~safe, NEG_INF), -1)
    return torch.where(nonempty[..., None], out, 0.0), torch.where(nonempty, lse, NEG_INF)


# ---------------------------------------------------------------- the check
def check(q, k, v, tau, *, mask=None, causal=False, scale=None, seed=0, ftol=None, btol=None):
    """Forward vs the oracle and the reference; gradients (out and lse both used) vs the oracle."""
    dtype = q.dtype
    B, Hq, Tq, _ = q.shape
    Tk, Dv = k.shape[2], v.shape[3]
    ftol, btol = ftol or TOL[dtype], btol or TOL[dtype]
    m4 = as_4d(mask)
    empty = ~allowed_of(B, Hq, Tq, Tk, m4, causal).any(-1)
    has_tau = isinstance(tau, torch.Tensor)
    leaves = [x.detach().requires_grad_() for x in ((q, k, v, tau) if has_tau else (q, k, v))]
    tau_arg = leaves[3] if has_tau else tau
    out, lse = trajops.temperature_attention(*leaves[:3], tau_arg, causal=causal, attn_mask=mask, scale=scale,
                                             return_lse=True)
    assert out.shape == (B, Hq, Tq, Dv) and out.dtype == dtype
    assert lse.shape == (B, Hq, Tq) and lse.dtype == acc_of(dtype)
    o_leaves = [x.detach().double().requires_grad_() for x in leaves]
    o_out, o_lse = oracle(*o_leaves[:3], o_leaves[3] if has_tau else tau, m4, causal, scale)
    close(out, o_out, ftol)
    close(lse, o_lse, ftol)
    # Rows with no allowed key: exactly 0 and -inf; NaN nowhere.
    assert torch.equal(out.detach()[empty], torch.zeros_like(out.detach()[empty]))
    assert bool((lse.detach()[empty] == NEG_INF).all()) and bool(lse.detach()[~empty].isfinite().all())
    assert bool(out.detach().isfinite().all())
    # The reference on the canonical arguments.
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    tau_t = tau if has_tau else torch.tensor(tau, dtype=acc_of(dtype))
    c = reference.temperature_coefficient(tau_t, (B, Hq, Tq), s, acc_of(dtype))
    r_out, r_lse = reference.temperature_attention(q, k, v, c, m4, causal)
    close(out, r_out, ftol)
    close(lse, r_lse, ftol)
    gen = torch.Generator().manual_seed(seed + 3)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    gl = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(lse.dtype)
    grads = torch.autograd.grad((out, lse), leaves, (g, gl))
    o_grads = torch.autograd.grad((o_out, o_lse), o_leaves, (g.double(), gl.double()))
    r_grads = reference.temperature_attention_backward(g, gl, q, k, v, c, m4, causal)
    for a, e, r, x in zip(grads[:3], o_grads[:3], r_grads[:3], leaves[:3]):
        assert a.shape == x.shape and a.dtype == x.dtype
        assert bool(a.isfinite().all())
        close(a, e, btol)
        close(a, r, btol)
    assert torch.equal(grads[0][empty], torch.zeros_like(grads[0][empty]))
    if has_tau:
        dtau, o_dtau = grads[3], o_grads[3]
        assert dtau.shape == tau.shape and dtau.dtype == tau.dtype and bool(dtau.isfinite().all())
        # dtau = -sum (q . dq) / tau over the rows tau broadcasts to: its rounding is relative to
        # the sum of the terms' sizes, not to the (possibly cancelling) result.
        t = tau.double().expand(B, Hq, Tq)
        terms = ((q.double().abs() * o_grads[0].abs()).sum(-1) / t).sum_to_size(tau.shape)
        err = (dtau.double() - o_dtau).abs()
        dtol = max(btol, TOL[tau.dtype])  # dtau is rounded to tau's dtype
        # A backend may form q . dq from its dq, which `close` above lets be off by dq_atol in every
        # element: in peaked rows (scale 1, small tau) dq is a cancelling sum whose rounding scales
        # with max |dq|, not with the row's |dq|, and q . dq inherits sum |q| * dq_atol.
        dq_atol = btol * max(1.0, float(o_grads[0].abs().max()))
        inherited = ((q.double().abs().sum(-1) * dq_atol) / t).sum_to_size(tau.shape)
        bound = dtol * (1 + terms + o_dtau.abs()) + inherited
        assert bool((err <= bound).all()), f"dtau: max error {float(err.max())}, bound {float(bound.min())}"
        if tau.shape == (B, Hq, Tq):
            assert torch.equal(dtau[empty], torch.zeros_like(dtau[empty]))


# ---------------------------------------------------------------- semantics by hand
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hand_computed_softmax(dtype):
    # logits (0, ln 2): p = (1/3, 2/3), out = 3/3 + 12/3 = 5, lse = ln 3.
    v = torch.tensor([3.0, 6.0], dtype=dtype).view(1, 1, 2, 1)
    q = torch.ones(1, 1, 1, 1, dtype=dtype)
    k = torch.tensor([0.0, 2 * math.log(2)], dtype=dtype).view(1, 1, 2, 1)
    out, lse = trajops.temperature_attention(q, k, v, 2.0, scale=1.0, return_lse=True)  # q.k / 2
    close(out, torch.full_like(out, 5.0), TOL[dtype])
    close(lse, torch.full_like(lse, math.log(3)), TOL[dtype])
    # Default scale 1/sqrt(D) = 1/2 with D = 4, tau = 0.5 as a 0-d tensor: logits (0, 4a).
    q4 = torch.ones(1, 1, 1, 4, dtype=dtype)
    k4 = torch.tensor([0.0, math.log(2) / 4], dtype=dtype).view(1, 1, 2, 1).repeat(1, 1, 1, 4)
    out, lse = trajops.temperature_attention(q4, k4, v, torch.tensor(0.5, dtype=dtype), return_lse=True)
    close(out, torch.full_like(out, 5.0), TOL[dtype])
    close(lse, torch.full_like(lse, math.log(3)), TOL[dtype])


CAUSAL_ALLOWED = {
    (3, 3): [[1, 0, 0], [1, 1, 0], [1, 1, 1]],
    (2, 4): [[1, 1, 1, 0], [1, 1, 1, 1]],
    (4, 2): [[0, 0], [0, 0], [1, 0], [1, 1]],
    (1, 3): [[1, 1, 1]],
}


@pytest.mark.parametrize("Tq,Tk", list(CAUSAL_ALLOWED))
def test_causal_is_bottom_right(Tq, Tk):
    allowed = torch.tensor(CAUSAL_ALLOWED[(Tq, Tk)], dtype=torch.float64)
    count = allowed.sum(-1, keepdim=True)
    q = torch.zeros(1, 1, Tq, 3, dtype=torch.float64)  # every logit 0: uniform over the allowed keys
    k = torch.randn(1, 1, Tk, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(Tq))
    v = torch.eye(Tk, dtype=torch.float64).view(1, 1, Tk, Tk)
    out, lse = trajops.temperature_attention(q, k, v, 0.9, causal=True, return_lse=True)
    close(out[0, 0], allowed / count.clamp_min(1), TOL[torch.float64])
    close(lse[0, 0], count.squeeze(-1).log(), TOL[torch.float64])


# ---------------------------------------------------------------- the op == oracle and reference
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hq,Hkv", [(1, 1), (4, 4), (4, 1)])
@pytest.mark.parametrize("tau_kind", TAU_KINDS)
def test_tau_shapes_and_gqa(tau_kind, Hq, Hkv, causal):
    B, T = batch_for(Hq), 17
    q, k, v = make(B, Hq, Hkv, T, T, 16, seed=Hq * 10 + Hkv)
    check(q, k, v, make_tau(tau_kind, B, Hq, T, seed=Hq), causal=causal, seed=Hkv)


SHAPES = [  # Tq, Tk, D, Dv, causal
    (1, 1, 16, 16, False), (1, 1, 16, 16, True), (1, 17, 40, 40, True), (1, 129, 64, 64, True),
    (17, 17, 40, 40, True), (17, 17, 64, 16, False), (17, 129, 16, 40, True), (129, 17, 64, 64, True),
    (129, 1, 16, 16, True), (33, 129, 40, 128, True), (129, 129, 128, 128, False), (129, 129, 128, 64, True),
]


@pytest.mark.parametrize("Tq,Tk,D,Dv,causal", sorted({(T_(a), T_(b), D_(c), D_(d), e) for a, b, c, d, e in SHAPES}))
def test_shapes(Tq, Tk, D, Dv, causal):
    q, k, v = make(1, 4, 2, Tq, Tk, D, Dv, seed=Tq + Tk + D)
    check(q, k, v, make_tau("bhq", 1, 4, Tq, seed=D), causal=causal, seed=Dv)


@pytest.mark.parametrize("Tq,Tk", [(17, 17), (9, 17), (17, 9)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_masks(kind, causal, Tq, Tk):
    B, Hq, Hkv = 2, 2, 1
    q, k, v = make(B, Hq, Hkv, Tq, Tk, 16, 8, seed=Tq * Tk)
    mask = make_mask(kind, B, Hq, Tq, Tk, seed=Tq)
    check(q, k, v, make_tau("bhq", B, Hq, Tq), mask=mask, causal=causal, seed=Tk)


DTYPE_CASES = [  # B, Hq, Hkv, Tq, Tk, D, Dv, causal, mask kind, tau kind, tau in fp32 (not q's dtype)
    pytest.param(2, 2, 1, 17, 33, 40, 40, True, "pad", "bhq", False, id="gqa-causal-pad"),
    pytest.param(1, 4, 1, T_(129), T_(129), 64, 40, False, None, "h1", True, id="long-Dv-fp32tau"),
    pytest.param(2, 2, 2, 1, T_(129), D_(128), 16, True, "4d", "0d", False, id="decode-4dmask"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,Dv,causal,mask_kind,tau_kind,tau_fp32", DTYPE_CASES)
def test_dtypes(dtype, B, Hq, Hkv, Tq, Tk, D, Dv, causal, mask_kind, tau_kind, tau_fp32):
    q, k, v = make(B, Hq, Hkv, Tq, Tk, D, Dv, dtype=dtype, seed=D)
    tau = make_tau(tau_kind, B, Hq, Tq, dtype=torch.float32 if tau_fp32 else dtype, seed=Tq)
    check(q, k, v, tau, mask=make_mask(mask_kind, B, Hq, Tq, Tk), causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_inputs(dtype):
    B, Hq, Hkv, Tq, Tk = 1, 4, 2, 13, 17
    q, k, v = make(B, Hq, Hkv, Tq, Tk, 16, 24, dtype=dtype, layout="bthd")
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    tau = make_tau("bhq", B, Tq, Hq, dtype=dtype).transpose(1, 2)  # (B, Hq, Tq) view of (B, Tq, Hq)
    mask = (torch.rand(B, Hq, Tk, Tq, generator=torch.Generator().manual_seed(1)) < 0.7).transpose(-1, -2)
    assert not (tau.is_contiguous() or mask.is_contiguous())
    check(q, k, v, tau, mask=mask, causal=True)
    # Strided along D (a fused kernel may assume unit stride there), and an expanded (stride 0) mask.
    q2, k2, v2 = (x.repeat_interleave(2, -1)[..., ::2] for x in make(B, Hq, Hkv, Tq, Tk, 16, 24, dtype=dtype))
    check(q2, k2, v2, tau, mask=mask[:1, :1].expand(B, Hq, Tq, Tk))
    # Expanded (stride 0) q, k, v.
    q3, k3, v3 = (x[..., :1].expand(x.shape) for x in (q, k, v))
    check(q3, k3[:, :, :1].expand(k.shape), v3, tau, causal=True)
    # Non-contiguous incoming gradients give what contiguous ones do.
    out, lse = op(q, k, v, tau, None, True, None)
    g = torch.randn(B, Hq, v.shape[-1], Tq, dtype=dtype).transpose(-1, -2)
    gl = torch.randn(B, Tq, Hq, dtype=lse.dtype).transpose(1, 2)
    got = op_backward(g, gl, q, k, v, tau, None, True, None, out, lse)
    want = op_backward(g.contiguous(), gl.contiguous(), q, k, v, tau, None, True, None, out, lse)
    for a, e in zip(got, want):
        close(a, e, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss", ["lse", "out", "both"])
def test_lse_and_partial_losses(dtype, loss):
    B, Hq, Hkv, Tq, Tk, D = 2, 2, 1, 9, 17, 16
    q, k, v = make(B, Hq, Hkv, Tq, Tk, D, dtype=dtype, seed=5)
    tau = make_tau("b1q", B, Hq, Tq, dtype=dtype)
    mask = make_mask("pad", B, Hq, Tq, Tk)
    leaves = [x.requires_grad_() for x in (q, k, v, tau)]
    out, lse = trajops.temperature_attention(*leaves, causal=True, attn_mask=mask, return_lse=True)
    o_leaves = [x.detach().double().requires_grad_() for x in leaves]
    o_out, o_lse = oracle(*o_leaves, as_4d(mask), True, None)  # lse: logsumexp of the masked logits
    close(lse, o_lse, TOL[dtype])
    if loss == "out":  # return_lse=False: autograd gives the backward no grad_lse
        out = trajops.temperature_attention(*leaves, causal=True, attn_mask=mask)
    finite = lse.isfinite()
    value = {"lse": lambda o, l: l[finite].sum(), "out": lambda o, l: o.sum(),
             "both": lambda o, l: o.sum() + l[finite].sum()}[loss]
    grads = torch.autograd.grad(value(out, lse), leaves, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(value(o_out, o_lse), o_leaves, allow_unused=True, materialize_grads=True)
    for a, e in zip(grads, want):
        assert bool(a.isfinite().all())
        close(a, e, TOL[dtype])
    # The backward op: grad_lse None is grad_lse 0.
    g = torch.randn(out.shape, dtype=dtype)
    none = op_backward(g, None, q, k, v, tau, as_4d(mask), True, None, out.detach(), lse.detach())
    zero = op_backward(g, torch.zeros_like(lse), q, k, v, tau, as_4d(mask), True, None, out.detach(), lse.detach())
    for a, e in zip(none, zero):
        close(a, e, TOL[dtype])


@pytest.mark.parametrize("scale", [None, 1.0, 0.3, 5.0])
def test_scale(scale):
    q, k, v = make(2, 2, 1, 11, 13, 40, seed=3)
    check(q, k, v, make_tau("bhq", 2, 2, 11), scale=scale, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_temperatures(dtype):
    # tau from 0.01 to 100 and |q| ~ 5: logits up to ~1e3. A kernel that does not subtract the row
    # max overflows here. Rounding of the logits is relative, so out's error grows with |logits|.
    B, Hq, Tq, Tk, D = 2, 2, 17, 33, 16
    q, k, v = make(B, Hq, 1, Tq, Tk, D, dtype=dtype, seed=9)
    q = q * 5
    tau = make_tau("bhq", B, Hq, Tq, dtype=dtype, lo=0.01, hi=100.0)
    biggest = float((q.double() @ k.double().transpose(-1, -2)).abs().max() / 4 / tau.double().min())
    assert biggest > 500
    tol = TOL[dtype] * biggest
    check(q, k, v, tau, mask=make_mask("b1qk", B, Hq, Tq, Tk), causal=True, ftol=tol, btol=tol)


# ---------------------------------------------------------------- bad temperatures, empty rows
def bad_tau_runs(bad, mask_kind=None):
    """(out, lse, dq, dk, dv, dtau) with a good tau and with tau[0, 1, 3] = bad, and that row's mask.

    mask_kind None: no attn_mask; "full": an all-True one; "empty": that row has no allowed key."""
    B, Hq, Hkv, Tq, Tk = 2, 2, 1, 7, 9
    mask = None if mask_kind is None else torch.ones(B, Hq, Tq, Tk, dtype=torch.bool)
    if mask_kind == "empty":
        mask[0, 1, 3] = False
    q, k, v = make(B, Hq, Hkv, Tq, Tk, 8, seed=1)
    tau = make_tau("bhq", B, Hq, Tq)
    bad_tau = tau.clone()
    bad_tau[0, 1, 3] = bad
    g = torch.randn(B, Hq, Tq, 8, generator=torch.Generator().manual_seed(0))
    runs = []
    for t in (tau, bad_tau):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, t)]
        out, lse = trajops.temperature_attention(*leaves, attn_mask=mask, return_lse=True)
        runs.append([out.detach(), lse.detach(), *torch.autograd.grad(out, leaves, g)])
    row = torch.zeros(B, Hq, Tq, dtype=torch.bool)
    row[0, 1, 3] = True
    return runs, row


BAD_TAUS = [0.0, -1.0, float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("bad", BAD_TAUS)
def test_bad_tau_leaves_other_rows_alone(bad):
    ((out, lse, dq, dk, dv, dtau), (b_out, b_lse, b_dq, b_dk, b_dv, b_dtau)), row = bad_tau_runs(bad)
    # The other rows of the same (batch, head), and every other batch, are finite and unchanged;
    # so are dq and dtau of the other rows and dk, dv of the other batch.
    for a, e in ((b_out, out), (b_lse, lse), (b_dq, dq), (b_dtau, dtau)):
        assert bool(a[~row].isfinite().all())
        close(a[~row], e[~row], TOL[torch.float32])
    for a, e in ((b_dk, dk), (b_dv, dv)):
        assert bool(a[1].isfinite().all())
        close(a[1], e[1], TOL[torch.float32])


@pytest.mark.parametrize("mask_kind", [None, "full"])
@pytest.mark.parametrize("bad", BAD_TAUS)
def test_bad_tau_makes_its_row_nan(bad, mask_kind):
    (_, (b_out, b_lse, _, b_dk, b_dv, _)), row = bad_tau_runs(bad, mask_kind)
    assert bool(b_lse[row].isnan().all())
    assert bool(b_out[row].isnan().all())
    # Every key meets that row, so NaN reaches k and v of its (batch, kv head).
    assert bool(b_dk[0].isnan().any()) and bool(b_dv[0].isnan().any())


@pytest.mark.parametrize("bad", [0.0, float("nan")])
def test_bad_tau_on_an_empty_row_changes_nothing(bad):
    # A row with no allowed key has out 0, lse -inf and zero gradients, whatever its tau.
    (good, bad_run), row = bad_tau_runs(bad, "empty")
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv", "dtau"), bad_run, good):
        assert not bool(a.isnan().any()), f"NaN in {name}"
        close(a, e, TOL[torch.float32])
    assert float(bad_run[5][row]) == 0.0


def test_scalar_and_shaped_taus_agree():
    B, Hq, Tq = 2, 2, 9
    q, k, v = make(B, Hq, 1, Tq, 11, 16, seed=4)
    want = trajops.temperature_attention(q, k, v, 0.7, causal=True)
    for tau in (torch.tensor(0.7), torch.full((Hq, 1), 0.7), torch.full((B, Hq, Tq), 0.7),
                torch.tensor(0.7, dtype=torch.float64), torch.full((1, 1, 1), 0.7, dtype=torch.bfloat16)):
        if tau.dtype == torch.bfloat16:  # any float dtype: this tau is 0.69921875
            want = trajops.temperature_attention(q, k, v, float(tau), causal=True)
        close(trajops.temperature_attention(q, k, v, tau, causal=True), want, TOL[torch.float32])
    # The gradient of a 0-d tau is the sum of the per-query ones, in tau's dtype.
    t0 = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    tf = torch.full((B, Hq, Tq), 0.7, requires_grad=True)
    (d0,) = torch.autograd.grad(trajops.temperature_attention(q, k, v, t0, causal=True).sum(), t0)
    (df,) = torch.autograd.grad(trajops.temperature_attention(q, k, v, tf, causal=True).sum(), tf)
    assert d0.shape == () and d0.dtype == torch.float64
    close(d0, df.sum(), TOL[torch.float32])


@pytest.mark.parametrize(
    "B,Hq,Hkv,Tq,Tk",
    [(0, 2, 1, 3, 5), (2, 2, 1, 0, 5), (2, 0, 1, 3, 5), (2, 2, 1, 3, 0)],
)
def test_empty_inputs(B, Hq, Hkv, Tq, Tk):
    q, k, v = make(B, Hq, Hkv, Tq, Tk, 4, 3)
    tau = make_tau("bhq", B, Hq, Tq)
    leaves = [x.requires_grad_() for x in (q, k, v, tau)]
    out, lse = trajops.temperature_attention(*leaves, causal=True, return_lse=True)
    assert out.shape == (B, Hq, Tq, 3) and lse.shape == (B, Hq, Tq)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == NEG_INF).all())
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    for grad, x in zip(grads, leaves):
        assert grad is None or (grad.shape == x.shape and torch.equal(grad, torch.zeros_like(x)))


# ---------------------------------------------------------------- autograd, opcheck, compile
GRADCHECK_CASES = [  # B, Hq, Hkv, Tq, Tk, D, Dv, causal, mask kind, tau kind, scale
    pytest.param(2, 2, 1, 3, 5, 4, 3, True, "pad", "bhq", None, id="causal-pad-gqa"),
    pytest.param(1, 4, 1, 4, 4, 3, 2, False, None, "h1", None, id="gqa4-headtau"),
    pytest.param(2, 2, 2, 4, 2, 3, 3, True, None, "0d", 1.0, id="causal-Tq>Tk"),
    pytest.param(2, 2, 1, 1, 5, 2, 4, True, "4d", "b1q", 0.7, id="decode-4dmask"),
    # decode steps with no mask / key padding: the Triton path runs the paged kernels (temperature_attention_decode)
    pytest.param(2, 4, 2, 1, 6, 3, 2, True, "pad", "bhq", None, id="decode-pad-paged-route"),
    pytest.param(1, 2, 2, 1, 5, 4, 4, False, None, "0d", 0.7, id="decode-nomask-paged-route"),
]


@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,Dv,causal,mask_kind,tau_kind,scale", GRADCHECK_CASES)
def test_gradcheck(B, Hq, Hkv, Tq, Tk, D, Dv, causal, mask_kind, tau_kind, scale):
    q, k, v = make(B, Hq, Hkv, Tq, Tk, D, Dv, dtype=torch.float64, seed=Tq * Tk)
    tau = make_tau(tau_kind, B, Hq, Tq, dtype=torch.float64)
    mask = make_mask(mask_kind, B, Hq, Tq, Tk)

    def f(q, k, v, tau):
        out, lse = trajops.temperature_attention(q, k, v, tau, causal=causal, attn_mask=mask, scale=scale,
                                                 return_lse=True)
        return out, torch.where(lse.isinf(), 0.0, lse)  # -inf on empty rows has no finite differences

    inputs = tuple(x.requires_grad_() for x in (q, k, v, tau))
    assert torch.autograd.gradcheck(f, inputs, fast_mode=INTERPRETER)


@pytest.mark.parametrize("case", ["plain", "gqa-causal-mask", "empty-rows", "decode"])
def test_opcheck(case):
    B, Hq, Hkv, Tq, Tk = {"plain": (1, 2, 2, 5, 5), "gqa-causal-mask": (1, 4, 2, 3, 6),
                          "empty-rows": (2, 2, 1, 6, 3), "decode": (2, 4, 2, 1, 7)}[case]
    q, k, v = make(B, Hq, Hkv, Tq, Tk, 8, 4, dtype=torch.float64)
    tau = make_tau("bhq" if case == "plain" else "h1", B, Hq, Tq, dtype=torch.float64)
    mask = None if case == "plain" else as_4d(make_mask("pad" if case == "decode" else "b1qk", B, Hq, Tq, Tk))
    causal, scale = case != "plain", None if case == "plain" else 0.5
    torch.library.opcheck(op.default, (q, k, v, tau, mask, causal, scale))
    leaves = tuple(x.clone().requires_grad_() for x in (q, k, v, tau))
    torch.library.opcheck(op.default, (*leaves, mask, causal, scale))
    out, lse = op(q, k, v, tau, mask, causal, scale)
    g = torch.randn_like(out)
    for gl in (None, torch.randn_like(lse)):
        torch.library.opcheck(op_backward.default, (g, gl, q, k, v, tau, mask, causal, scale, out, lse))


@pytest.mark.parametrize("Tq", [7, 1])  # 1: a decode step (the Triton path runs the paged kernels)
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager(backend, Tq):
    torch._dynamo.reset()
    B, Hq, Hkv, Tk = 2, 2, 1, 11
    q, k, v = make(B, Hq, Hkv, Tq, Tk, 16, 8, seed=6)
    tau = make_tau("h1", B, Hq, Tq)
    mask = make_mask("pad", B, Hq, Tq, Tk)

    def f(q, k, v, tau):
        out, lse = trajops.temperature_attention(q * 1.5, k, v, tau.exp(), causal=True, attn_mask=mask,
                                                 scale=0.5, return_lse=True)
        return out.sum(-1) * 2 + torch.where(lse.isinf(), 0.0, lse)

    assert_compiled_matches_eager(f, (q, k, v, tau), backend=backend)


def test_deterministic():
    B, Hq, T = 2, 2 if INTERPRETER else 4, T_(129)  # B = 2: the padding mask empties the last sequence
    q, k, v = make(B, Hq, 1, T, T, D_(64), seed=8)
    mask = make_mask("pad", B, Hq, T, T)
    runs = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, torch.tensor(0.8))]
        out, lse = trajops.temperature_attention(*leaves, causal=True, attn_mask=mask, return_lse=True)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        runs.append((out, lse, *torch.autograd.grad((out, lse), leaves, (g, torch.ones_like(lse)))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- fuzz
@settings(max_examples=8 if INTERPRETER else 40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    Hkv=st.integers(1, 2), group=st.sampled_from([1, 2]), B=st.integers(1, 2 if INTERPRETER else 3),
    Tq=st.integers(1, 16 if INTERPRETER else 40), Tk=st.integers(1, 16 if INTERPRETER else 40),
    D=st.integers(1, 64 if INTERPRETER else 70), Dv=st.integers(1, 64 if INTERPRETER else 70), causal=st.booleans(),
    mask_kind=st.sampled_from([None] + MASK_KINDS), tau_kind=st.sampled_from(TAU_KINDS),
    scale=st.sampled_from([None, 1.0, 0.05]), dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_against_oracle(Hkv, group, B, Tq, Tk, D, Dv, causal, mask_kind, tau_kind, scale, dtype, seed):
    if INTERPRETER:
        B = min(B, 4 // (Hkv * group))
    Hq = Hkv * group
    q, k, v = make(B, Hq, Hkv, Tq, Tk, D, Dv, dtype=dtype, seed=seed)
    tau = make_tau(tau_kind, B, Hq, Tq, dtype=dtype, seed=seed, lo=0.2, hi=5.0)
    check(q, k, v, tau, mask=make_mask(mask_kind, B, Hq, Tq, Tk, seed=seed), causal=causal, scale=scale, seed=seed)


# ---------------------------------------------------------------- bad input
def inputs(**over):
    d = dict(q=torch.ones(2, 4, 5, 8), k=torch.ones(2, 2, 7, 8), v=torch.ones(2, 2, 7, 6), tau=torch.ones(4, 1))
    d.update(over)
    return d


BAD = [  # overrides of inputs() (tensors and keyword arguments), exception, message
    (lambda: dict(q=torch.ones(4, 5, 8)), ValueError, r"q must have shape \(B, H, T, D\)"),
    (lambda: dict(k=torch.ones(2, 2, 7)), ValueError, r"k must have shape \(B, H, T, D\)"),
    (lambda: dict(k=torch.ones(2, 3, 7, 8), v=torch.ones(2, 3, 7, 6)), ValueError, "dividing q's Hq"),
    (lambda: dict(v=torch.ones(2, 1, 7, 6)), ValueError, "k and v must have the same number of heads"),
    (lambda: dict(k=torch.ones(2, 2, 7, 9)), ValueError, "q and k must have one head size"),
    (lambda: dict(v=torch.ones(2, 2, 6, 6)), ValueError, "k and v must have one length Tk"),
    (lambda: dict(k=torch.ones(3, 2, 7, 8), v=torch.ones(3, 2, 7, 6)), ValueError, "one batch size"),
    (lambda: dict(k=torch.ones(2, 2, 7, 8).half()), TypeError, "q, k and v must have one dtype"),
    (lambda: dict(q=torch.ones(2, 4, 5, 8, dtype=torch.int32)), TypeError, "q must be float32, float64"),
    (lambda: dict(tau=torch.ones(3, 1)), ValueError, r"tau must be broadcastable to \(B, Hq, Tq\)"),
    (lambda: dict(tau=torch.ones(1, 2, 4, 5)), ValueError, r"tau must be broadcastable to \(B, Hq, Tq\)"),
    (lambda: dict(tau=torch.ones(4, 1, dtype=torch.int64)), TypeError, "tau must be a floating-point tensor"),
    (lambda: dict(attn_mask=torch.ones(2, 7)), TypeError, "attn_mask must be bool"),
    (lambda: dict(attn_mask=torch.ones(2, 4, 5, 7, dtype=torch.uint8)), TypeError, "attn_mask must be bool"),
    (lambda: dict(attn_mask=torch.ones(2, 3, 5, 7, dtype=torch.bool)), ValueError,
     r"attn_mask must have rank 4 and be broadcastable to \(B, Hq, Tq, Tk\)"),
    (lambda: dict(attn_mask=torch.ones(3, 5, 7, dtype=torch.bool)), ValueError, "attn_mask must have rank 4"),
    (lambda: dict(attn_mask=torch.ones(1, 2, 4, 5, 7, dtype=torch.bool)), ValueError, "attn_mask must have rank 4"),
    (lambda: dict(attn_mask=torch.ones(5, 7, dtype=torch.bool)), ValueError,
     r"a 2-D attn_mask is a \(B, Tk\) = \(2, 7\) key-padding mask"),
    (lambda: dict(scale=0.0), ValueError, "scale must be a finite number > 0"),
    (lambda: dict(scale=-1.0), ValueError, "scale must be a finite number > 0"),
    (lambda: dict(scale=float("inf")), ValueError, "scale must be a finite number > 0"),
    (lambda: dict(scale=float("nan")), ValueError, "scale must be a finite number > 0"),
]


BAD_IDS = ["q-rank3", "k-rank3", "Hq%Hkv", "kv-heads", "D", "Tk", "batch", "dtype-mix", "q-int", "tau-shape",
           "tau-rank4", "tau-int", "mask-float", "mask-uint8", "mask-shape", "mask-3d", "mask-5d", "mask-2d",
           "scale-0", "scale-neg", "scale-inf", "scale-nan"]


@pytest.mark.parametrize("over,exc,match", BAD, ids=BAD_IDS)
def test_bad_inputs(over, exc, match):
    with pytest.raises(exc, match=match):
        trajops.temperature_attention(**inputs(**over()))
    with pytest.raises(exc, match=match):  # the fake impl (torch.compile's tracing) says the same
        with torch._subclasses.fake_tensor.FakeTensorMode():
            trajops.temperature_attention(**inputs(**over()))


def test_bad_backward_inputs():
    d = inputs()
    q, k, v, tau = d["q"], d["k"], d["v"], d["tau"]
    out, lse = op(q, k, v, tau, None, False, None)
    g, gl = torch.randn_like(out), torch.randn_like(lse)

    def call(**over):
        a = dict(grad_out=g, grad_lse=gl, out=out, lse=lse)
        a.update(over)
        return op_backward(a["grad_out"], a["grad_lse"], q, k, v, tau, None, False, None, a["out"], a["lse"])

    for over, exc, match in [
        (dict(grad_out=torch.ones(2, 4, 5, 8)), ValueError, "grad_out must have shape"),
        (dict(grad_out=g.double()), TypeError, "grad_out must be torch.float32"),
        (dict(grad_lse=torch.ones(2, 4, 6)), ValueError, "grad_lse must have shape"),
        (dict(lse=lse.double()), TypeError, "lse must be torch.float32"),
        (dict(out=out[..., :3]), ValueError, "out must have shape"),
    ]:
        with pytest.raises(exc, match=match):
            call(**over)
