"""trajops.adaptive_positional_encoding: semantics, every backend against the reference, gradients.

The op-level tests run against whatever this process dispatches to (see conftest.CPU_BACKEND):
`make test` runs this file with the C++ kernels, with TRAJOPS_BACKEND=reference and with
TRAJOPS_BACKEND=triton TRITON_INTERPRET=1 (the Triton kernels on CPU).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trajops
from trajops import reference

from conftest import DTYPES, INTERPRETER, assert_close

op = torch.ops.trajops.adaptive_positional_encoding
op_backward = torch.ops.trajops.adaptive_positional_encoding_backward


def seed_loop(disp: torch.Tensor, table: torch.Tensor, positions=None) -> torch.Tensor:
    """The seed's forward for one sequence, position by position with .item(), in fp64.

    disp (T,) are the per-step displacements (the seed's running sum is taken here).
    """
    T = disp.shape[0]
    L = table.shape[0]
    pos = torch.arange(T) if positions is None else positions
    running = torch.zeros(T, dtype=torch.float64)
    for i in range(T):
        running[i] = (running[i - 1] if i else 0.0) + disp[i].double()
    adapted = torch.clamp(pos.double() + running, 0, L - 1)
    rows = []
    for p in adapted:
        lo = int(torch.floor(p).item())
        hi = min(lo + 1, L - 1)
        a = p - lo
        rows.append((1 - a) * table[lo].double() + a * table[hi].double())
    return torch.stack(rows)


def make(B, T, L, E, dtype, seed=0, scale=0.6, sinusoid=False):
    """Displacements that wander both ways (some sequences leave the table at either end)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(B, T, generator=g, dtype=torch.float64) * scale
    if B > 1:
        d[0] += 1.5 * L / max(T, 1)  # runs past the end of the table
        d[-1] -= 2.0  # goes below 0
    table = reference.sinusoidal_table(L, E, torch.float64) if sinusoid else torch.randn(L, E, generator=g,
                                                                                       dtype=torch.float64)
    return d.to(dtype), table.to(dtype)


def slow_interp(B, T, E):
    return INTERPRETER and B * T * E > 200_000


def grid():
    return [
        pytest.param(T, E, marks=[pytest.mark.slow] if slow_interp(2, T, E) else [])
        for T in (1, 2, 3, 129)
        for E in (1, 3, 1000)
    ]


# ---------------------------------------------------------------- the reference is the seed's math
@pytest.mark.parametrize("T,L,E", [(1, 8, 4), (2, 5, 3), (17, 12, 6), (40, 30, 8), (40, 1, 3)])
@pytest.mark.parametrize("with_positions", [False, True])
def test_reference_matches_seed_loop(T, L, E, with_positions):
    d, table = make(3, T, L, E, torch.float64, seed=T * 7 + L)
    positions = torch.randperm(T) * 0.5 if with_positions else None
    got = reference.adaptive_positional_encoding(d, table, positions)
    for b in range(3):
        torch.testing.assert_close(got[b], seed_loop(d[b], table, positions), atol=1e-12, rtol=1e-12)


def test_sinusoidal_table_is_the_seeds():
    L, E = 50, 12
    pe = torch.zeros(L, E)
    pos = torch.arange(0, L).unsqueeze(1).float()
    div = torch.exp(torch.arange(0, E, 2).float() * -(math.log(10000.0) / E))
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    assert torch.equal(reference.sinusoidal_table(L, E), pe)
    odd = reference.sinusoidal_table(L, 5)  # the seed's recipe fails here; we keep the last sine column
    div = torch.exp(torch.arange(0, 5, 2).float() * -(math.log(10000.0) / 5))
    assert torch.equal(odd[:, 0::2], torch.sin(pos * div)) and torch.equal(odd[:, 1::2], torch.cos(pos * div[:2]))


@pytest.mark.parametrize("with_positions", [None, "shared", "batched"])
def test_reference_backward_is_autograd_of_reference(with_positions):
    d, table = make(3, 23, 15, 5, torch.float64, seed=3)
    positions = {None: None, "shared": torch.rand(23, dtype=torch.float64) * 20,
                 "batched": torch.rand(3, 23, dtype=torch.float64) * 20}[with_positions]
    leaves = [d.requires_grad_(), table.requires_grad_()] + ([positions.requires_grad_()] if positions is not None
                                                            else [])
    out = reference.adaptive_positional_encoding(d, table, positions)
    g = torch.randn_like(out)
    expected = torch.autograd.grad(out, leaves, g)
    gd, gs, gt = reference.adaptive_positional_encoding_backward(g, d.detach(), table.detach(),
                                                                 None if positions is None else positions.detach(),
                                                                 True)
    torch.testing.assert_close(gd, expected[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gt, expected[1], atol=1e-12, rtol=1e-10)
    if positions is not None:
        torch.testing.assert_close(gs.sum(0) if positions.dim() == 1 else gs, expected[2], atol=1e-12, rtol=1e-10)


def test_small_cases_by_hand():
    table = torch.tensor([[0.0, 10.0], [1.0, 20.0], [3.0, 40.0]], dtype=torch.float64)
    # s = t + cumsum(d) = 0, 1.5, 1.75, 2 (clamped from 5)
    d = torch.tensor([0.0, 0.5, -0.75, 3.25], dtype=torch.float64)
    out = trajops.adaptive_positional_encoding(d, table)
    expected = torch.tensor([[0.0, 10.0], [2.0, 30.0], [2.5, 35.0], [3.0, 40.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    # integer positions in reverse: s = 2, 1.5, -0.25, -2 (the last two clamp to row 0)
    out = trajops.adaptive_positional_encoding(d, table, torch.tensor([2, 1, 0, -5]))
    expected = torch.tensor([[3.0, 40.0], [2.0, 30.0], [0.0, 10.0], [0.0, 10.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------- kernels == reference
def _positions(kind, B, T, gen):
    if kind == "none":
        return None
    if kind == "shared_int":
        return torch.randint(-3, T + 3, (T,), generator=gen)
    return torch.rand(B, T, generator=gen, dtype=torch.float64) * (T + 4) - 2


@pytest.mark.parametrize("T,E", grid())
@pytest.mark.parametrize("pos_kind", ["none", "shared_int", "batched"])
def test_matches_reference_fp32(T, E, pos_kind):
    d, table = make(2, T, 50, E, torch.float32, seed=T + E)
    positions = _positions(pos_kind, 2, T, torch.Generator().manual_seed(T))
    out = op(d, table, positions)
    assert out.shape == (2, T, E) and out.dtype == torch.float32 and out.is_contiguous()
    assert_close(out, reference.adaptive_positional_encoding(d, table, positions))
    g = torch.randn(out.shape)
    for need_table in (False, True):
        got = op_backward(g, d, table, positions, need_table)
        exp = reference.adaptive_positional_encoding_backward(g, d, table, positions, need_table)
        for a, b in zip(got, exp):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert_close(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,L,E", [(1, 1, 4, 3), (3, 33, 40, 64), (2, 20, 7, 5)])
def test_matches_reference_dtypes(dtype, B, T, L, E):
    d, table = make(B, T, L, E, dtype, seed=B * T * E)
    out = op(d, table)
    assert out.dtype == dtype and out.shape == (B, T, E)
    # Half types: compare with the fp64 result of the same (rounded) inputs.
    assert_close(out, reference.adaptive_positional_encoding(d.double(), table.double()), dtype)
    g = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    got = op_backward(g, d, table, None, True)
    exp = reference.adaptive_positional_encoding_backward(g.double(), d.double(), table.double(), None, True)
    assert got[0].dtype == dtype and got[2].dtype == dtype
    for a, b in zip(got, exp):
        # the displacement gradient is a sum over up to T positions of E-long dot products
        assert_close(a, b, dtype) if dtype in (torch.float32, torch.float64) else \
            torch.testing.assert_close(a.double(), b, atol=0.05 * max(1.0, float(b.abs().max())), rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_inputs(dtype):
    d, table = make(4, 30, 25, 12, dtype, seed=5)
    d_views = [d.t().contiguous().t(), d[:, ::1][::2]]
    t_views = [table.t().contiguous().t(), table[:, ::2]]
    pos = (torch.arange(60, dtype=dtype) * 0.5)[::2]
    for dv in d_views:
        for tv in t_views:
            out = op(dv, tv, pos)
            assert_close(out, reference.adaptive_positional_encoding(dv.contiguous(), tv.contiguous(), pos))
            g = torch.randn(out.shape[::-1], dtype=dtype).permute(2, 1, 0)
            got = op_backward(g, dv, tv, pos, True)
            exp = reference.adaptive_positional_encoding_backward(g.contiguous(), dv.contiguous(), tv.contiguous(),
                                                                  pos, True)
            for a, b in zip(got, exp):
                assert_close(a, b)


def test_one_dim_input_equals_batch_of_one():
    d, table = make(1, 17, 30, 6, torch.float32, seed=2)
    assert torch.equal(op(d[0], table), op(d, table)[0])
    g = torch.randn(1, 17, 6)
    one = op_backward(g[0], d[0], table, None, True)
    batch = op_backward(g, d, table, None, True)
    assert torch.equal(one[0], batch[0][0]) and torch.equal(one[1], batch[1][0]) and torch.equal(one[2], batch[2])


def test_empty_inputs():
    table = torch.randn(5, 3)
    for shape in [(0, 4), (2, 0), (0,)]:
        d = torch.randn(shape)
        out = op(d, table)
        assert out.shape == shape + (3,)
        gd, gs, gt = op_backward(torch.randn(out.shape), d, table, None, True)
        assert gd.shape == shape and gs.shape == shape and torch.equal(gt, torch.zeros(5, 3))
    assert op(torch.randn(2, 4), torch.randn(5, 0)).shape == (2, 4, 0)


def test_positions_outside_the_table_clamp_and_get_no_gradient():
    L, E = 10, 4
    table = torch.randn(L, E, dtype=torch.float64)
    d = torch.tensor([[-3.0, 0.5, 20.0, -1.0, -40.0]], dtype=torch.float64)  # s = -3, -1.5, 20.5, 20.5, -18.5
    out = op(d, table)
    for t in (0, 1, 4):
        assert torch.equal(out[0, t], table[0])
    for t in (2, 3):
        assert torch.equal(out[0, t], table[L - 1])
    gd, gs, _ = op_backward(torch.ones_like(out), d, table, None, False)
    assert torch.equal(gs, torch.zeros_like(gs)) and torch.equal(gd, torch.zeros_like(gd))


def test_gradient_convention_at_integer_points():
    """At s = k (integer, inside) the slope is the right-hand one; at s = L-1 it is 0; at s = 0 it passes."""
    L, E = 6, 3
    table = torch.randn(L, E, dtype=torch.float64)
    positions = torch.tensor([0.0, 2.0, 5.0, 4.5], dtype=torch.float64)
    d = torch.zeros(1, 4, dtype=torch.float64)
    g = torch.randn(1, 4, E, dtype=torch.float64)
    gd, gs, _ = op_backward(g, d, table, positions, False)
    expected = torch.stack([(g[0, 0] * (table[1] - table[0])).sum(), (g[0, 1] * (table[3] - table[2])).sum(),
                            torch.zeros((), dtype=torch.float64), (g[0, 3] * (table[5] - table[4])).sum()])
    torch.testing.assert_close(gs[0], expected)
    torch.testing.assert_close(gd[0], expected.flip(0).cumsum(0).flip(0))


def test_nan_and_inf_displacements():
    d, table = make(2, 12, 20, 4, torch.float32, seed=11)
    d_nan = d.clone()
    d_nan[0, 5] = float("nan")
    out = op(d_nan, table)
    assert_close(out, reference.adaptive_positional_encoding(d_nan, table))
    assert out[0, 5:].isnan().all() and torch.isfinite(out[0, :5]).all() and torch.isfinite(out[1]).all()
    g = torch.randn_like(out)
    got = op_backward(g, d_nan, table, None, False)
    exp = reference.adaptive_positional_encoding_backward(g, d_nan, table, None, False)
    for a, b in zip(got, exp):
        assert_close(a, b)
    assert torch.isfinite(got[0]).all()  # NaN positions pass no gradient
    d_inf = d.clone()
    d_inf[1, 3] = float("inf")
    out = op(d_inf, table)
    assert_close(out, reference.adaptive_positional_encoding(d_inf, table))
    assert torch.equal(out[1, 3:], table[-1].expand(9, 4))


# ---------------------------------------------------------------- autograd, opcheck, compile
@pytest.mark.parametrize("B,T,L,E", [(1, 1, 3, 2), (2, 5, 9, 3), (1, 7, 1, 2),
                                     pytest.param(2, 13, 12, 4, marks=[pytest.mark.slow] if INTERPRETER else [])])
def test_gradcheck(B, T, L, E):
    d, table = make(B, T, L, E, torch.float64, seed=B * T + L)
    d = (d * 0.3).requires_grad_()  # mostly inside the table, away from integer points
    table = table.requires_grad_()
    positions = (torch.arange(T, dtype=torch.float64) * 0.7 + 0.31).requires_grad_()
    assert torch.autograd.gradcheck(trajops.adaptive_positional_encoding, (d, table, positions), atol=1e-7, rtol=1e-6)
    assert torch.autograd.gradcheck(lambda x: trajops.adaptive_positional_encoding(x, table.detach()), (d,))


@pytest.mark.parametrize("shape,pos", [((2, 7), None), ((1, 1), "shared"), ((9,), "shared"), ((3, 4), "batched")])
def test_opcheck(shape, pos):
    d = torch.randn(shape, dtype=torch.float64) * 0.5
    table = torch.randn(12, 5, dtype=torch.float64)
    T = shape[-1]
    positions = {None: None, "shared": torch.arange(T, dtype=torch.float64) + 0.25,
                 "batched": torch.rand(shape, dtype=torch.float64) * 8}[pos]
    torch.library.opcheck(op.default, (d, table, positions))
    torch.library.opcheck(op.default, (d.clone().requires_grad_(), table, positions))
    torch.library.opcheck(op.default, (d.clone().requires_grad_(), table.clone().requires_grad_(), positions))
    out_shape = tuple(shape) + (5,)
    for need in (False, True):
        torch.library.opcheck(op_backward.default, (torch.randn(out_shape, dtype=torch.float64), d, table, positions,
                                                    need))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    d, table = make(2, 19, 30, 8, torch.float32, seed=4)

    def f(x, tab):
        return (trajops.adaptive_positional_encoding(x * 0.5, tab) * 2).sum(-1)

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(d, table), f(d, table))
    xa, xb = d.clone().requires_grad_(), d.clone().requires_grad_()
    f(xa, table).pow(2).sum().backward()
    compiled(xb, table).pow(2).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)


# (1, 3001): the C++ tasks split a sequence; (3, 1001): with 2 threads the second task starts inside
# the middle sequence (re-summing its prefix) and runs on through the last one.
@pytest.mark.parametrize("B,T", [(4, 700), (1, 3001), (3, 1001)])
def test_deterministic_and_thread_count_independent(B, T):
    E = 65
    if INTERPRETER:
        B, T, E = min(B, 2), 40, 33
    # L > T: the middle sequence stays inside the table, so every row's position matters (rows
    # clamped to an end of the table would hide a wrong running sum).
    d, table = make(B, T, max(300, T + 100), E, torch.float32, seed=8)
    g = torch.randn(B, T, E)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (op(d, table),) + tuple(op_backward(g, d, table, None, True))
        torch.set_num_threads(max(2, threads))
        many = (op(d, table),) + tuple(op_backward(g, d, table, None, True))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    assert torch.equal(op_backward(g, d, table, None, True)[2], many[3])


@pytest.mark.skipif(not INTERPRETER, reason="drives the Triton launchers' tiling (TRITON_INTERPRET=1 pass)")
@pytest.mark.parametrize("pos_kind", ["none", "shared_int", "batched"])
def test_triton_several_programs_per_sequence(pos_kind):
    # The interpreter's own plan gives one program per sequence; force row tiles (each program
    # re-sums the displacements before its rows, the last one of a sequence runs the reverse scan)
    # and E splits, with a NaN displacement whose NaN must cross program boundaries.
    from trajops.triton_kernels import adaptive_positional_encoding as kernels

    B, T, L, E = 3, 13, 9, 10
    d, table = make(B, T, L, E, torch.float64, seed=5)
    d[1, 6] = math.nan
    positions = _positions(pos_kind, B, T, torch.Generator().manual_seed(1))
    g = torch.randn(B, T, E, dtype=torch.float64)
    prev = kernels.PLAN_OVERRIDE
    kernels.PLAN_OVERRIDE = {"block_t": 4, "block_e": 4, "tiles": 3, "splits": 2}
    try:
        assert kernels._plan(B, T, E, 8, True)["tiles"] == 2 and kernels._plan(B, T, E, 8, True)["splits"] == 2
        out = kernels.adaptive_positional_encoding_fwd(d, table, positions)
        got = kernels.adaptive_positional_encoding_bwd(g, d, table, positions, True)
    finally:
        kernels.PLAN_OVERRIDE = prev
    assert_close(out, reference.adaptive_positional_encoding(d, table, positions))
    for a, b in zip(got, reference.adaptive_positional_encoding_backward(g, d, table, positions, True)):
        assert_close(a, b)


# ---------------------------------------------------------------- fuzz
@settings(max_examples=8 if INTERPRETER else 50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 12 if INTERPRETER else 60),
    L=st.integers(1, 40),
    E=st.integers(1, 40),
    scale=st.sampled_from([0.0, 0.3, 2.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_against_reference(B, T, L, E, scale, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    # Quarter steps hit integer positions and the table's ends exactly.
    d = (torch.randint(-4, 5, (B, T), generator=gen) * 0.25 * scale).to(dtype)
    table = torch.randn(L, E, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(B, T, E, generator=gen, dtype=torch.float64).to(dtype)
    assert_close(op(d, table), reference.adaptive_positional_encoding(d, table))
    for a, b in zip(op_backward(g, d, table, None, True),
                    reference.adaptive_positional_encoding_backward(g, d, table, None, True)):
        assert_close(a, b)


# ---------------------------------------------------------------- bad input
def _T():
    return torch.randn(10, 4)


@pytest.mark.parametrize(
    "make_args,exc,match",
    [
        (lambda: (torch.randn(2, 3, 4), _T(), None), ValueError, r"displacement must have shape \(B, T\) or \(T,\)"),
        (lambda: (torch.randn(()), _T(), None), ValueError, r"displacement must have shape \(B, T\) or \(T,\)"),
        (lambda: (torch.ones(2, 3, dtype=torch.int64), _T(), None), TypeError, "displacement must be float32"),
        (lambda: (torch.randn(2, 3), torch.randn(10), None), ValueError, r"pe_table must have shape \(max_len, E\)"),
        (lambda: (torch.randn(2, 3), torch.randn(0, 4), None), ValueError, "max_len >= 1"),
        (lambda: (torch.randn(2, 3), _T().double(), None), TypeError, "pe_table must have the dtype of displacement"),
        (lambda: (torch.randn(2, 3), _T(), torch.arange(4)), ValueError, r"positions must have shape \(T,\) = \(3,\)"),
        (lambda: (torch.randn(2, 3), _T(), torch.zeros(3, 2)), ValueError, r"positions must have shape \(T,\)"),
        (lambda: (torch.randn(2, 3), _T(), torch.ones(3, dtype=torch.bool)), TypeError, "positions must be a real"),
        (lambda: (torch.randn(2, 3), _T(), torch.ones(3, dtype=torch.complex64)), TypeError, "positions must be a real"),
    ],
)
def test_bad_inputs(make_args, exc, match):
    with pytest.raises(exc, match=match):
        trajops.adaptive_positional_encoding(*make_args())
    with pytest.raises(exc, match=match):  # the fake impl (torch.compile's tracing) says the same
        with torch._subclasses.fake_tensor.FakeTensorMode():
            op(*make_args())


def test_bad_backward_inputs():
    d, table = torch.randn(2, 5), torch.randn(8, 3)
    with pytest.raises(ValueError, match=r"grad_out must have the output's shape \[2, 5, 3\]"):
        op_backward(torch.randn(2, 5, 4), d, table, None, False)
    with pytest.raises(TypeError, match="grad_out must have the dtype of pe_table"):
        op_backward(torch.randn(2, 5, 3, dtype=torch.float64), d, table, None, False)
    with pytest.raises(RuntimeError, match="one device"):
        op_backward(torch.randn(2, 5, 3, device="meta"), d, table, None, False)
    with pytest.raises(RuntimeError, match="one device"):
        op(d, table.to("meta"))
