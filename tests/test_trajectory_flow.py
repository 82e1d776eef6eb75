"""trajops.trajectory_flow: semantics, every backend against the reference, gradients, compile.

The op-level tests run against whatever this process dispatches to (see conftest.CPU_BACKEND):
`make test` runs this file once with the C++ kernels, once with TRAJOPS_BACKEND=reference and once
with TRAJOPS_BACKEND=triton TRITON_INTERPRET=1 (the Triton kernels on CPU).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trajops
from trajops import reference
from trajops._library import SCHEMAS

from trajops.reference.trajectory_flow import _flow_terms

from conftest import CPU_BACKEND, DTYPES, INTERPRETER, TOL, assert_close

op = torch.ops.trajops.trajectory_flow
op_backward = torch.ops.trajops.trajectory_flow_backward


def seed_loop(x: torch.Tensor, window: int, eps: float) -> torch.Tensor:
    """A direct per-position loop over the seed's math (one sequence (T, D), fp64)."""
    T, D = x.shape
    out = torch.zeros(T, D, dtype=torch.float64)
    for p in range(1, T):
        ws = min(window, p)
        start = p - ws
        num = torch.zeros(D, dtype=torch.float64)
        den = 0.0
        for i in range(start, p):
            d = x[i + 1].double() - x[i].double()
            n = float(torch.linalg.vector_norm(d))
            if n > eps:
                w = (i - start + 1) / ws * math.tanh(n)
                num += w * d / n
                den += w
        if den > 0:
            out[p] = num / den
    return out


def make_x(B, T, D, dtype, seed=0, repeat_rows=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    if repeat_rows and T > 4:
        x[:, 3] = x[:, 2]  # a zero step in every sequence
        x[0, -1] = x[0, -2]
    return x.to(dtype)


# The Triton interpreter runs every program in Python, one numpy call per tile op and window step,
# so its share of the grid is cut where it would take minutes (`-m "not slow"` in that run).
def slow_forward(T, D, window):
    return T * D * min(window, T) > 3_000_000


def slow_backward(T, D, window):
    return T * D * min(window, T) > 300_000


def grid(is_slow):
    return [
        pytest.param(T, D, w, marks=[pytest.mark.slow] if is_slow(T, D, w) else [])
        for T in (1, 2, 3, 9, 129)
        for D in (1, 3, 64, 1000)
        for w in sorted({1, 2, 8, T + 5})
    ]


# ---------------------------------------------------------------- the reference is the seed's math
@pytest.mark.parametrize("T,D,window", [(1, 3, 8), (2, 1, 1), (5, 4, 2), (12, 7, 8), (12, 7, 30), (30, 16, 4)])
def test_reference_matches_seed_loop(T, D, window):
    x = make_x(2, T, D, torch.float64, seed=T * 31 + D)
    got = reference.trajectory_flow(x, window, 1e-6)
    for b in range(2):
        torch.testing.assert_close(got[b], seed_loop(x[b], window, 1e-6), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("T,D,window", [(2, 1, 1), (9, 5, 2), (17, 6, 8), (11, 3, 20)])
def test_reference_backward_is_autograd_of_reference(T, D, window):
    x = make_x(2, T, D, torch.float64, seed=7).requires_grad_()
    g = torch.randn_like(x)
    (expected,) = torch.autograd.grad(reference.trajectory_flow(x, window, 1e-6), x, g)
    got = reference.trajectory_flow_backward(g, x.detach(), window, 1e-6)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


def test_seed_semantics_small_cases():
    # A straight line: every step points the same way, so the flow is that unit direction.
    x = torch.arange(6, dtype=torch.float64).unsqueeze(1) * torch.tensor([[3.0, 4.0]])
    out = trajops.trajectory_flow(x, window=3)
    assert torch.equal(out[0], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(out[1:], torch.tensor([[0.6, 0.8]], dtype=torch.float64).expand(5, 2))
    # Two steps in orthogonal directions, the later one counts twice (recency 2/2 vs 1/2).
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    out = trajops.trajectory_flow(x, window=8)
    t = math.tanh(1.0)
    torch.testing.assert_close(out[2], torch.tensor([0.5 * t, 1.0 * t], dtype=torch.float64) / (1.5 * t))


# ---------------------------------------------------------------- kernels == reference
@pytest.mark.parametrize("T,D,window", grid(slow_forward))
def test_forward_matches_reference_fp32(T, D, window):
    x = make_x(2, T, D, torch.float32, seed=T + D + window)
    assert_close(op(x, window, 1e-6), reference.trajectory_flow(x, window, 1e-6))


@pytest.mark.parametrize("T,D,window", grid(slow_backward))
def test_backward_matches_reference_fp32(T, D, window):
    x = make_x(2, T, D, torch.float32, seed=T + D + window)
    # seeded, not the global RNG: the cases must not change with what other test files consume
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(T + D + window + 1)).to(x.dtype)
    assert_close(op_backward(g, x, window, 1e-6), reference.trajectory_flow_backward(g, x, window, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D,window", [(1, 3, 8), (2, 1, 1), (9, 64, 2), (33, 100, 8), (20, 5, 17)])
def test_matches_reference_dtypes(dtype, T, D, window):
    x = make_x(3, T, D, dtype, seed=T * D)
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    out = op(x, window, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert_close(out, reference.trajectory_flow(x, window, 1e-6))
    dx = op_backward(g, x, window, 1e-6)
    assert dx.dtype == dtype and dx.shape == x.shape
    # Half types: compare against the fp64 result of the same (rounded) inputs.
    expected = reference.trajectory_flow_backward(g.double(), x.double(), window, 1e-6)
    assert_close(dx, expected, dtype)


def test_steps_at_eps_are_ignored():
    eps = 1e-3
    e = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    f = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    # steps: 0.5 eps (ignored), exactly eps (ignored: strict >), 2 eps (counts), a long step
    rows = [torch.zeros(3, dtype=torch.float64)]
    for step in (0.5 * eps * e, eps * f, 2 * eps * e, 3.0 * f):
        rows.append(rows[-1] + step)
    x = torch.stack(rows)
    for dtype in (torch.float64, torch.float32):
        xd = x.to(dtype)
        out = op(xd, 8, eps)
        assert_close(out, reference.trajectory_flow(xd, 8, eps))
        assert torch.equal(out[:3], torch.zeros(3, 3, dtype=dtype))  # nothing before the 2 eps step counts
        torch.testing.assert_close(out[3], e.to(dtype))  # only the 2 eps step counts here
    # eps = 0: every nonzero step counts, repeated rows still do not.
    x0 = torch.stack([x[0], x[0], x[1], x[1], x[2]])
    assert_close(op(x0, 8, 0.0), reference.trajectory_flow(x0, 8, 0.0))
    assert torch.equal(op(x0, 8, 0.0)[1], torch.zeros(3, dtype=torch.float64))


def test_all_rows_equal_gives_zeros_and_zero_grad():
    x = torch.ones(2, 7, 5, dtype=torch.float64, requires_grad=True)
    out = trajops.trajectory_flow(x)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_inputs(dtype):
    base = make_x(5, 12, 8, dtype, seed=3)
    views = [base.transpose(1, 2).contiguous().transpose(1, 2), base[:, ::2], base[..., ::2], base[1].t().contiguous().t()]
    for x in views:
        assert not x.is_contiguous()
        assert_close(op(x, 3, 1e-6), reference.trajectory_flow(x.contiguous(), 3, 1e-6))
        g = torch.randn(x.shape, dtype=dtype).transpose(-1, -2).contiguous().transpose(-1, -2)
        assert_close(op_backward(g, x, 3, 1e-6), reference.trajectory_flow_backward(g, x, 3, 1e-6))


def test_two_dim_input_equals_batch_of_one():
    x = make_x(1, 17, 6, torch.float32, seed=5)
    assert torch.equal(trajops.trajectory_flow(x[0], 4), trajops.trajectory_flow(x, 4)[0])
    g = torch.randn_like(x)
    assert torch.equal(op_backward(g[0], x[0], 4, 1e-6), op_backward(g, x, 4, 1e-6)[0])


def test_empty_inputs():
    for shape in [(0, 5, 3), (2, 0, 3), (2, 5, 0), (0, 4)]:
        x = torch.randn(shape)
        out = op(x, 8, 1e-6)
        assert out.shape == x.shape
        assert op_backward(torch.randn(shape), x, 8, 1e-6).shape == x.shape


def test_nan_and_inf_inputs():
    x = make_x(1, 12, 4, torch.float32, seed=11, repeat_rows=False)
    x_nan = x.clone()
    x_nan[0, 5, 2] = float("nan")
    out = op(x_nan, 3, 1e-6)
    assert torch.isfinite(out).all()  # the two steps touching row 5 are skipped
    assert_close(out, reference.trajectory_flow(x_nan, 3, 1e-6))
    # Positions 0..4 hold neither step in their window of 3: unchanged.
    assert torch.equal(out[0, :5], op(x, 3, 1e-6)[0, :5])

    x_inf = x.clone()
    x_inf[0, 5, 1] = float("inf")
    out = op(x_inf, 3, 1e-6)
    assert_close(out, reference.trajectory_flow(x_inf, 3, 1e-6))
    # Steps 4 (x5 - x4 = +inf) and 5 (x6 - x5 = -inf) count with direction NaN in component 1.
    assert torch.isfinite(out[0, :5]).all()
    assert out[0, 5:9, 1].isnan().all()
    assert torch.isfinite(out[0, 5:9, [0, 2, 3]]).all()
    assert torch.isfinite(out[0, 9:]).all()  # windows of 3 no longer hold steps 4 and 5
    g = torch.randn_like(x)
    assert_close(op_backward(g, x_nan, 3, 1e-6), reference.trajectory_flow_backward(g, x_nan, 3, 1e-6))


def test_output_rows_have_norm_at_most_one():
    x = make_x(3, 50, 16, torch.float64, seed=2)
    norms = torch.linalg.vector_norm(op(x, 8, 1e-6), dim=-1)
    assert (norms <= 1 + 1e-12).all()
    assert (norms[:, 1:] > 0).all()


# ---------------------------------------------------------------- autograd, opcheck, compile
@pytest.mark.parametrize("B,T,D,window", [(1, 1, 3, 8), (2, 2, 1, 1), (2, 5, 3, 2), (1, 9, 4, 8), (2, 6, 3, 11), (1, 13, 2, 4)])
def test_gradcheck(B, T, D, window):
    x = make_x(B, T, D, torch.float64, seed=B * T * D, repeat_rows=False).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: trajops.trajectory_flow(t, window, 1e-6), (x,), atol=1e-7, rtol=1e-6)


def test_gradcheck_two_dim_input():
    x = make_x(1, 7, 3, torch.float64, seed=9, repeat_rows=False)[0].requires_grad_()
    assert torch.autograd.gradcheck(lambda t: trajops.trajectory_flow(t, 3, 1e-6), (x,))


@pytest.mark.parametrize("shape,window", [((2, 7, 5), 3), ((1, 1, 4), 8), ((9, 3), 20)])
def test_opcheck(shape, window):
    x = torch.randn(shape, dtype=torch.float64)
    torch.library.opcheck(op.default, (x, window, 1e-6))
    torch.library.opcheck(op.default, (x.clone().requires_grad_(), window, 1e-6))
    torch.library.opcheck(op_backward.default, (torch.randn_like(x), x, window, 1e-6))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x = make_x(2, 19, 8, torch.float32, seed=4)

    def f(t):
        return trajops.trajectory_flow(t * 1.5, window=4).sum(-1) * 2

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    f(xa).pow(2).sum().backward()
    compiled(xb).pow(2).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)


def test_deterministic_and_thread_count_independent():
    x = make_x(2, 40, 33, torch.float32, seed=8) if INTERPRETER else make_x(3, 300, 33, torch.float32, seed=8)
    g = torch.randn_like(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (op(x, 8, 1e-6), op_backward(g, x, 8, 1e-6))
        torch.set_num_threads(max(2, threads))
        many = (op(x, 8, 1e-6), op_backward(g, x, 8, 1e-6))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    assert torch.equal(op(x, 8, 1e-6), many[0])


# ---------------------------------------------------------------- fuzz
@settings(max_examples=8 if INTERPRETER else 60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 16 if INTERPRETER else 40),
    D=st.integers(1, 70),
    window=st.integers(1, 12 if INTERPRETER else 45),
    eps=st.sampled_from([0.0, 1e-6, 0.5]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_against_reference(B, T, D, window, eps, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # Small integer-valued steps make exact zero and tiny steps common.
    x = torch.randint(-2, 3, (B, T, D), generator=g).to(dtype) * torch.rand(1, generator=g).to(dtype)
    grad = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype)
    assert_close(op(x, window, eps), reference.trajectory_flow(x, window, eps))
    # dx sums terms of size ~ |g_p| / S_p that cancel (exactly, for D = 1, in the reference's form):
    # with tiny steps S_p is tiny, so the kernels' fp32 rounding is relative to those terms.
    dx, want = op_backward(grad, x, window, eps), reference.trajectory_flow_backward(grad, x, window, eps)
    terms = 1.0
    if T >= 2:
        S = _flow_terms(x.double(), window, eps)[-1]
        a = torch.where(S > 0, 1.0 / torch.where(S > 0, S, torch.ones_like(S)), torch.zeros_like(S))
        terms = max(1.0, float((grad.double().abs().amax(-1) * a).max()))
    tol = TOL[dtype]
    torch.testing.assert_close(dx.double(), want.double(), atol=tol * terms, rtol=tol, equal_nan=True)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make,window,eps,exc,match",
    [
        (lambda: torch.randn(5), 8, 1e-6, ValueError, r"x must have shape \(B, T, D\) or \(T, D\)"),
        (lambda: torch.randn(2, 3, 4, 5), 8, 1e-6, ValueError, r"x must have shape \(B, T, D\) or \(T, D\)"),
        (lambda: torch.randn(2, 3, 4), 0, 1e-6, ValueError, "window must be >= 1"),
        (lambda: torch.randn(2, 3, 4), -3, 1e-6, ValueError, "window must be >= 1"),
        (lambda: torch.randn(2, 3, 4), 8, -1.0, ValueError, "eps must be a finite number >= 0"),
        (lambda: torch.randn(2, 3, 4), 8, float("nan"), ValueError, "eps must be a finite number >= 0"),
        (lambda: torch.ones(2, 3, 4, dtype=torch.int64), 8, 1e-6, TypeError, "x must be float32, float64"),
        (lambda: torch.ones(2, 3, 4, dtype=torch.complex64), 8, 1e-6, TypeError, "x must be float32, float64"),
    ],
)
def test_bad_inputs(make, window, eps, exc, match):
    with pytest.raises(exc, match=match):
        trajops.trajectory_flow(make(), window, eps)
    with pytest.raises(exc, match=match):  # the fake impl (torch.compile's tracing) says the same
        with torch._subclasses.fake_tensor.FakeTensorMode():
            op(make(), window, eps)


def test_bad_backward_inputs():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="grad_out must have the shape of x"):
        op_backward(torch.randn(2, 5, 4), x, 8, 1e-6)
    with pytest.raises(TypeError, match="grad_out must have the dtype of x"):
        op_backward(torch.randn(2, 5, 3, dtype=torch.float64), x, 8, 1e-6)
    with pytest.raises(RuntimeError, match="one device"):
        op_backward(torch.randn(2, 5, 3, device="meta"), x, 8, 1e-6)


def test_wrong_argument_types():
    x = torch.randn(2, 5, 3)
    with pytest.raises((TypeError, RuntimeError), match="window"):
        trajops.trajectory_flow(x, 2.5)
    with pytest.raises((TypeError, RuntimeError)):
        trajops.trajectory_flow(x.numpy())


# ---------------------------------------------------------------- packaging and dispatch
def test_backend_of_this_run():
    expected = {"auto": "cpp" if trajops.HAS_EXTENSION else "reference", "reference": "reference"}
    if trajops.BACKEND == "triton":
        assert CPU_BACKEND == ("triton-interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "reference")
    else:
        assert CPU_BACKEND == expected[trajops.BACKEND]


@pytest.mark.skipif(not trajops.HAS_EXTENSION, reason="the schemas come from trajops._C only when it is loaded")
def test_cpp_schemas_match_python_schemas():
    for name, schema in SCHEMAS.items():
        registered = getattr(torch.ops.trajops, name).default._schema
        assert str(registered) == str(torch._C.parse_schema("trajops::" + schema))


@pytest.mark.skipif(CPU_BACKEND != "cpp", reason="checks the no-extension fallback from a build that has one")
def test_import_without_extension_warns_once_and_uses_reference():
    code = (
        "import sys, warnings\n"
        "sys.modules['trajops._C'] = None\n"  # makes `from trajops import _C` raise ImportError
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, trajops\n"
        "mine = [str(m.message) for m in w if 'trajops' in str(m.message)]\n"
        "assert len(mine) == 1 and 'reference' in mine[0], mine\n"
        "assert trajops.backends()['cpu'] == 'reference' and not trajops.HAS_EXTENSION\n"
        "x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)\n"
        "out = torch.ops.trajops.trajectory_flow(x, 3, 1e-6)\n"
        "assert torch.equal(out, trajops.reference.trajectory_flow(x, 3, 1e-6))\n"
        "assert torch.autograd.gradcheck(lambda t: trajops.trajectory_flow(t, 3), (x,))\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRAJOPS_BACKEND"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
