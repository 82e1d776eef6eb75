"""Hostile cases of adaptive_positional_encoding (+ its backward op) and TrajectoryAdaptivePositionalEncoding.

Documented: semantic positions are clamped to [0, L-1] (+-Inf and int64-limit positions read the
table's ends), a NaN position gives a NaN output row, and no index ever leaves the table.
"""
from __future__ import annotations

import math

import torch

import trajops
from hostile_cases import ANY_ERROR, RESULT, check, check_shape, raises, register, rows_nan, same
from trajops.ops import adaptive_positional_encoding as _ape
from trajops.reference import sinusoidal_table

OP, BWD, PUB = ("torch.ops.trajops.adaptive_positional_encoding",
                "torch.ops.trajops.adaptive_positional_encoding_backward", "trajops.adaptive_positional_encoding")
NN = "trajops.nn.TrajectoryAdaptivePositionalEncoding"
B, T, L, E = 2, 5, 16, 6
TOL = 1e-6


def table(n=L, e=E, dtype=torch.float32):
    return sinusoidal_table(n, e, dtype) if e else torch.zeros(n, 0, dtype=dtype)


def ape(d, tab=None, pos=None):
    return trajops.adaptive_positional_encoding(d, table() if tab is None else tab, pos)


def _case(name, fn, expect=RESULT, targets=(PUB, OP)):
    register(f"adaptive_positional_encoding.{name}", fn, expect, *targets)


_case("displacement_3d", lambda: ape(torch.zeros(B, T, 1)), raises("displacement"))
_case("displacement_0d", lambda: ape(torch.tensor(0.5)), raises("displacement"))
_case("displacement_int64", lambda: ape(torch.zeros(B, T, dtype=torch.long)), raises("displacement"))
_case("table_zero_rows", lambda: ape(torch.zeros(B, T), table()[:0]), raises("pe_table"))
_case("table_1d", lambda: ape(torch.zeros(B, T), table()[0]), raises("pe_table"))
_case("table_other_dtype", lambda: ape(torch.zeros(B, T), table().double()), raises("pe_table"))
_case("positions_wrong_shape", lambda: ape(torch.zeros(B, T), pos=torch.arange(T + 1)), raises("positions"))
_case("positions_bool", lambda: ape(torch.zeros(B, T), pos=torch.ones(T, dtype=torch.bool)), raises("positions"))
_case("positions_complex", lambda: ape(torch.zeros(B, T), pos=torch.zeros(T, dtype=torch.complex64)),
      raises("positions", also=("torch.complex64",)))


def _reads_rows(pos, rows, what):
    """displacement 0 and the given positions: output row t equals table row rows[t] exactly."""
    def fn():
        got = ape(torch.zeros(T), pos=pos())
        same(got, table()[torch.tensor(rows)], what)
    return fn


_case("positions_int64_max", _reads_rows(lambda: torch.full((T,), 2**63 - 1), [L - 1] * T, "clamped to L-1"))
_case("positions_int64_min", _reads_rows(lambda: torch.full((T,), -2**63), [0] * T, "clamped to 0"))
_case("positions_inf", _reads_rows(lambda: torch.tensor([math.inf, -math.inf] * 2 + [math.inf]),
                                   [L - 1, 0, L - 1, 0, L - 1], "+-inf read the table's ends"))
_case("positions_huge_fp64", _reads_rows(lambda: torch.full((T,), 1e300, dtype=torch.float64), [L - 1] * T,
                                         "clamped to L-1"))


def _nan_from(poison, first_bad, first_changed=None):
    """Rows t >= first_bad are NaN (the cumulative position is NaN); rows before first_changed (default
    first_bad) equal a clean run."""
    def fn():
        d = torch.rand(B, T)
        clean = ape(d)
        d, pos = poison(d)
        got = ape(d, pos=pos)
        check(bool(rows_nan(got, 1)[:, first_bad:].all()), f"rows >= {first_bad} must be NaN, got {got.tolist()}")
        n = first_bad if first_changed is None else first_changed
        same(got[:, :n], clean[:, :n], "rows before the poisoned position vs a clean run", TOL)
    return fn


_case("displacement_nan", _nan_from(lambda d: (d.index_fill_(1, torch.tensor([2]), math.nan), None), 2))
_case("displacement_inf_minus_inf", _nan_from(lambda d: (d.index_fill_(1, torch.tensor([1]), math.inf)
                                                         .index_fill_(1, torch.tensor([3]), -math.inf), None), 3, 1))
_case("positions_nan", _nan_from(lambda d: (d, torch.tensor([0.0, 1.0, 2.0, 3.0, math.nan])), 4))


def _inf_displacement():
    d = torch.zeros(B, T)
    d[:, 1] = math.inf
    got = ape(d)
    same(got[:, 1:], table()[L - 1].expand(B, T - 1, E), "+inf displacement reads the last row from then on")


_case("displacement_inf", _inf_displacement)


def _vs_reference(make):
    def fn():
        d, tab, pos = make()
        same(ape(d, tab, pos), _ape._reference_forward(d, tab, pos), "vs the reference", TOL)
        g = torch.randn(*d.shape, tab.shape[1])
        got = torch.ops.trajops.adaptive_positional_encoding_backward(g, d, tab, pos, True)
        want = _ape._reference_backward(g, d, tab, pos, True)
        for name, a, b in zip(("grad_displacement", "grad_position", "grad_table"), got, want):
            same(a, b, f"{name} vs the reference", 1e-5)
    return fn


def _nan_table():
    tab = table()
    tab[3, 1] = math.nan
    tab[L - 1, 0] = math.inf
    return torch.rand(B, T) * 2, tab, None


_case("table_nan_inf", _vs_reference(_nan_table), targets=(PUB, OP, BWD))
_case("displacement_nan_backward", _vs_reference(
    lambda: (torch.rand(B, T).index_fill_(1, torch.tensor([1]), math.nan), table(), None)), targets=(PUB, OP, BWD))
_case("positions_float_huge_backward", _vs_reference(
    lambda: (torch.rand(B, T), table(), torch.tensor([0.0, 1e30, -1e30, 2.5, math.inf]))), targets=(PUB, OP, BWD))
_case("table_one_row", _vs_reference(lambda: (torch.rand(B, T) * 3, table(1), None)), targets=(PUB, OP, BWD))
_case("noncontiguous", _vs_reference(lambda: (torch.rand(T, B).t(), table(L, 2 * E)[:, ::2], torch.arange(2 * T)[::2])),
      targets=(PUB, OP, BWD))


def _shapes(shape_d, e=E, need_table=True):
    def fn():
        d = torch.rand(*shape_d, requires_grad=True)
        tab = table(L, e).requires_grad_(need_table)
        out = trajops.adaptive_positional_encoding(d, tab)
        check_shape(out, tuple(shape_d) + (e,), "out")
        out.sum().backward()
        same(d.grad, torch.zeros(shape_d), "grad of displacement")
        if need_table:
            check_shape(tab.grad, (L, e), "grad of pe_table")
    return fn


_case("e0_backward_with_table_grad", _shapes((B, T), e=0), targets=(PUB, OP, BWD))
_case("t0", _shapes((B, 0)), targets=(PUB, OP, BWD))
_case("batch0", _shapes((0, T)), targets=(PUB, OP, BWD))
_case("t0_1d", _shapes((0,)), targets=(PUB, OP, BWD))


def _bwd_bad(name, grad, names):
    def fn():
        d = torch.rand(B, T)
        torch.ops.trajops.adaptive_positional_encoding_backward(grad(), d, table(), None, True)
    register(f"adaptive_positional_encoding_backward.{name}", fn, raises(*names), BWD)


_bwd_bad("grad_out_wrong_shape", lambda: torch.ones(B, T, E + 1), ("grad_out",))
_bwd_bad("grad_out_2d", lambda: torch.ones(B * T, E), ("grad_out",))
_bwd_bad("grad_out_float64", lambda: torch.ones(B, T, E, dtype=torch.float64), ("grad_out",))


def _bwd_e0_raw():
    gd, gs, gt = torch.ops.trajops.adaptive_positional_encoding_backward(torch.ones(B, T, 0), torch.rand(B, T),
                                                                         table(L, 0), None, True)
    same(gd, torch.zeros(B, T), "grad_displacement with E = 0")
    check_shape(gt, (L, 0), "grad_table")


register("adaptive_positional_encoding_backward.e0_need_table", _bwd_e0_raw, RESULT, BWD)


# ---------------------------------------------------------------- nn.TrajectoryAdaptivePositionalEncoding
def _nn(name, fn, expect=RESULT):
    register(f"nn.TrajectoryAdaptivePositionalEncoding.{name}", fn, expect, NN)


def _nn_shape(shape):
    def fn():
        m = trajops.nn.TrajectoryAdaptivePositionalEncoding(E, max_len=L)
        check_shape(m(torch.randn(*shape)), shape, "encodings")
    return fn


_nn("t0_batched", _nn_shape((B, 0, E)))
_nn("t0_2d", _nn_shape((0, E)))
_nn("batch0", _nn_shape((0, T, E)))


def _nn_t1():
    m = trajops.nn.TrajectoryAdaptivePositionalEncoding(E, max_len=L)
    same(m(torch.randn(B, 1, E)), table()[0].expand(B, 1, E), "T = 1 reads row 0")


_nn("t1", _nn_t1)
_nn("nan_token", lambda: check_shape(trajops.nn.TrajectoryAdaptivePositionalEncoding(E, max_len=L)(
    torch.randn(B, T, E).index_fill_(1, torch.tensor([2]), math.nan)), (B, T, E), "encodings"))
_nn("positions_wrong_shape", lambda: trajops.nn.TrajectoryAdaptivePositionalEncoding(E, max_len=L)(
    torch.randn(B, T, E), torch.arange(T - 1)), raises("positions"))
_nn("positions_int64_max", lambda: same(trajops.nn.TrajectoryAdaptivePositionalEncoding(E, max_len=L)(
    torch.zeros(B, T, E), torch.full((T,), 2**63 - 1)), table()[L - 1].expand(B, T, E), "clamped to L-1"))
_nn("max_len_2pow62", lambda: trajops.nn.TrajectoryAdaptivePositionalEncoding(E, max_len=2**62),
    raises(types=ANY_ERROR))
_nn("embedding_dim_zero", lambda: trajops.nn.TrajectoryAdaptivePositionalEncoding(0), raises("embedding_dim"))
