"""trajops::trajectory_flow_with_stats (the forward that returns its per-row stats) and the backward
that takes them (issue 15: on CUDA the public function's forward + backward move 5 N e, not 6).

Runs on every backend (`make test`: C++, TRAJOPS_BACKEND=reference, Triton interpreter). The new op
has no C++ kernel: on CPU it runs the reference in the C++ pass and the Triton kernel under the
interpreter, so the stats comparisons below check the Triton kernel there. The backward with stats
runs each backend's own trajectory_flow_backward (C++ and the reference validate and ignore stats).
"""
from __future__ import annotations

import math

import pytest
import torch

import trajops
from trajops import reference

from conftest import INTERPRETER, assert_close

with_stats = torch.ops.trajops.trajectory_flow_with_stats
op = torch.ops.trajops.trajectory_flow
op_backward = torch.ops.trajops.trajectory_flow_backward
EPS = 1e-6


@pytest.fixture(autouse=True)
def _small_triton_tiles(monkeypatch):
    """Under the interpreter, several programs per sequence: stats rows written by each tile and halo."""
    if INTERPRETER:
        from trajops.triton_kernels import trajectory_flow as k

        monkeypatch.setattr(k, "INTERPRET_BLOCK_T", 4)


def _x(shape, dtype=torch.float64, seed=0, nan_row=None):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if shape[-2] > 4:
        x[..., 3, :] = x[..., 2, :]  # a zero step (never counted)
    if nan_row is not None:
        x[..., nan_row, :] = math.nan
    return x.to(dtype)


def _stats_loop(x: torch.Tensor, window: int, eps: float, starts) -> torch.Tensor:
    """(2, T) stats of one sequence x (T, D) by a direct loop over the documented semantics;
    starts[p] = first token of p's document."""
    T = x.shape[0]
    xd = x.double()
    n = [float(torch.linalg.vector_norm(xd[i + 1] - xd[i])) if i < T - 1 else 0.0 for i in range(T)]
    a = []
    for p in range(T):
        ws = min(window, p - starts[p])
        S = sum((ws - k + 1) / ws * math.tanh(n[p - k]) for k in range(1, ws + 1) if n[p - k] > eps)
        a.append(1.0 / S if S > 0 else 0.0)
    return torch.tensor([n, a], dtype=torch.float64)


CASES = {  # name: (shape, window, nan_row)
    "B2_T7_D5_w3": ((2, 7, 5), 3, None),
    "B2_T7_D5_w7": ((2, 7, 5), 7, None),
    "B2_T7_D5_w100": ((2, 7, 5), 100, None),
    "2d_T7_D5_w3": ((7, 5), 3, None),
    "B2_T9_D3_w3_nan_row": ((2, 9, 3), 3, 5),
    "B1_T5_D1_w2": ((1, 5, 1), 2, None),
    "B2_T1_D4": ((2, 1, 4), 3, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_out_is_trajectory_flow_and_stats_are_the_reference(case, dtype):
    shape, window, nan_row = CASES[case]
    x = _x(shape, dtype, nan_row=nan_row)
    out, stats = with_stats(x, window, EPS)
    assert out.dtype == dtype and out.shape == x.shape
    assert stats.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    B = 1 if x.dim() == 2 else shape[0]
    assert stats.shape == (2, B, shape[-2]) and stats.is_contiguous()
    assert_close(out, op(x, window, EPS))
    assert_close(stats, reference.trajectory_flow_stats(x, window, EPS), dtype)
    if nan_row is not None:  # the steps touching the NaN row: NaN norms; every a_p finite
        assert stats[0, :, nan_row - 1 : nan_row + 1].isnan().all() and stats[1].isfinite().all()


def test_reference_stats_follow_the_documented_loop():
    """The reference stats against a direct loop (n_{T-1} = 0, a_0 = 0, a NaN row skipped)."""
    x = _x((2, 9, 3), nan_row=5)
    stats = reference.trajectory_flow_stats(x, 3, EPS)
    for b in range(2):
        assert_close(stats[:, b], _stats_loop(x[b], 3, EPS, [0] * 9))
    assert stats[0, :, -1].eq(0).all() and stats[1, :, 0].eq(0).all()
    assert stats[0, :, 2].eq(0).all()  # the zero step x2 -> x3
    assert stats[0, :, 4:6].isnan().all() and stats[1].isfinite().all()


def test_reference_stats_zero_where_no_step_counts():
    x = torch.zeros(1, 4, 2, dtype=torch.float64)
    x[0, 3] = 1.0  # only the last step counts
    stats = reference.trajectory_flow_stats(x, 8, EPS)
    assert stats[1, 0, :3].eq(0).all() and stats[1, 0, 3] == pytest.approx(1 / ((3 / 3) * math.tanh(math.sqrt(2))))


CU = torch.tensor([0, 4, 5, 11])  # three documents, the middle one a single token


@pytest.mark.parametrize("window", [2, 3, 100])
@pytest.mark.parametrize("dim", [2, 3])
def test_packed(window, dim):
    x = _x((11, 3), nan_row=8)
    x = x if dim == 2 else x.unsqueeze(0)
    out, stats = with_stats(x, window, EPS, CU)
    assert stats.shape == (2, 1, 11)
    assert_close(out, op(x, window, EPS, CU))
    want = reference.trajectory_flow_stats(x, window, EPS, cu_seqlens=CU)
    assert_close(stats, want)
    starts = [0] * 4 + [4] + [5] * 6
    assert_close(want[:, 0], _stats_loop(x.reshape(11, 3), window, EPS, starts))
    assert stats[1, 0, [0, 4, 5]].eq(0).all()  # each document's first token


BWD_CASES = {  # name: (shape, window, cu_seqlens)
    "B2_T7_D5_w3": ((2, 7, 5), 3, None),
    "B2_T7_D5_w100": ((2, 7, 5), 100, None),
    "2d_T7_D5_w2": ((7, 5), 2, None),
    "packed_2d": ((11, 3), 3, CU),
    "packed_3d": ((1, 11, 3), 2, CU),
}


# fp32 adds little under the interpreter (the same kernel code) and costs ~6 s there
@pytest.mark.parametrize("dtype", [torch.float64] + ([] if INTERPRETER else [torch.float32]))
@pytest.mark.parametrize("case", list(BWD_CASES))
def test_backward_with_stats_is_the_backward_without(case, dtype):
    shape, window, cu = BWD_CASES[case]
    x = _x(shape, dtype)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    _, stats = with_stats(x, window, EPS, cu)
    got = op_backward(g, x, window, EPS, cu, stats)
    assert_close(got, op_backward(g, x, window, EPS, cu))
    assert_close(got, reference.trajectory_flow_backward(g, x, window, EPS, cu_seqlens=cu))
    # and through autograd: the op's saved stats reach the same backward
    xl = x.clone().requires_grad_()
    (with_stats(xl, window, EPS, cu)[0] * g).sum().backward()
    assert_close(xl.grad, got)


def test_stats_reach_the_triton_backward_only():
    """Valid but wrong stats change the Triton backward's result (it reads them instead of
    recomputing); the C++ kernel and the reference ignore them (they recompute from x)."""
    x = _x((2, 7, 5))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    _, stats = with_stats(x, 3, EPS)
    want = op_backward(g, x, 3, EPS)
    got = op_backward(g, x, 3, EPS, None, stats * 2)
    if INTERPRETER:
        assert (got - want).abs().max() > 1e-3
    else:
        assert torch.equal(got, want)


def test_stats_output_is_not_differentiable():
    x = _x((2, 7, 5)).requires_grad_()
    out, stats = with_stats(x, 3, EPS)
    assert out.requires_grad and not stats.requires_grad
    # a loss on out only, stats left unused: the backward still runs (stats get no gradient)
    (out.sum() + stats.sum().detach()).backward()
    assert x.grad is not None and x.grad.isfinite().all()


@pytest.mark.parametrize("cu", [None, CU], ids=["dense", "packed"])
def test_gradcheck_fp64(cu):
    # plain random rows: a zero step is a kink of the norm that finite differences straddle
    shape = (2, 7, 3) if cu is None else (11, 3)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).requires_grad_()
    # fast mode under the interpreter (one random direction: ~30x fewer kernel runs)
    assert torch.autograd.gradcheck(lambda t: with_stats(t, 3, EPS, cu)[0], (x,), fast_mode=INTERPRETER)


def test_opcheck():
    x = _x((2, 7, 5), torch.float32)
    torch.library.opcheck(with_stats.default, (x, 3, EPS))
    torch.library.opcheck(with_stats.default, (x.clone().requires_grad_(), 3, EPS))
    xp = _x((1, 11, 3), torch.float32)
    torch.library.opcheck(with_stats.default, (xp.clone().requires_grad_(), 2, EPS, CU))
    _, stats = with_stats(x, 3, EPS)
    torch.library.opcheck(op_backward.default, (torch.randn_like(x), x, 3, EPS, None, stats))
    _, pstats = with_stats(xp, 2, EPS, CU)
    torch.library.opcheck(op_backward.default, (torch.randn_like(xp), xp, 2, EPS, CU, pstats))


def test_compile_fullgraph_forward_and_backward():
    def f(x):
        out, stats = with_stats(x, 3, EPS)
        return out * 2 + stats[1].unsqueeze(-1)  # the stats are a plain (constant) output

    x = _x((2, 7, 5), torch.float32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = f(xe), compiled(xc)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    (want * g).sum().backward()
    (got * g).sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    assert_close(xc.grad, op_backward(g * 2, x, 3, EPS))


def test_public_function_compiles_fullgraph_on_cpu():
    x = _x((2, 7, 5), torch.float32)
    compiled = torch.compile(lambda t: trajops.trajectory_flow(t, 3), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), op(x, 3, EPS))


def _bad_stats():
    x = _x((2, 7, 5), torch.float32)
    good = with_stats(x, 3, EPS)[1]
    return x, {
        "short_T": (good[:, :, :-1], "[2, 2, 6]"),
        "one_row": (good[:1], "[1, 2, 7]"),
        "batch_as_2d": (torch.zeros(2, 1, 7), "[2, 1, 7]"),
        "float64": (good.double(), "torch.float64"),
        "bfloat16": (good.bfloat16(), "torch.bfloat16"),
        "int": (good.long(), "torch.int64"),
        "meta": (good.to("meta"), "on meta"),
    }


@pytest.mark.parametrize("name", ["short_T", "one_row", "batch_as_2d", "float64", "bfloat16", "int", "meta"])
def test_bad_stats_raise_value_error(name):
    x, bad = _bad_stats()
    stats, got = bad[name]
    g = torch.ones_like(x)
    expected = r"trajectory_flow_backward: stats must be a torch\.float32 tensor of shape \[2, 2, 7\]"
    with pytest.raises(ValueError, match=expected) as info:
        op_backward(g, x, 3, EPS, None, stats)  # a meta tensor dispatches to the fake impl
    assert got in str(info.value)
    # This backend's CPU kernel itself (C++, reference or Triton), whatever the other argument's device.
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(ValueError, match=expected):
        op_backward.default.redispatch(cpu, g, x, 3, EPS, None, stats)


def test_bad_stats_for_2d_and_packed_x():
    x = _x((11, 3), torch.float32)
    stats = with_stats(x, 3, EPS, CU)[1]
    assert stats.shape == (2, 1, 11)
    with pytest.raises(ValueError, match=r"shape \[2, 1, 11\]"):
        op_backward(torch.ones_like(x), x, 3, EPS, CU, stats[:, :, 1:])
    x64 = x.double()
    with pytest.raises(ValueError, match=r"torch\.float64 tensor of shape \[2, 1, 11\]"):
        op_backward(torch.ones_like(x64), x64, 3, EPS, CU, stats)


def test_half_input_stats_are_fp32():
    if INTERPRETER:
        pytest.skip("the Triton interpreter has gaps for half types (conftest.DTYPES)")
    x = _x((2, 7, 5), torch.bfloat16)
    out, stats = with_stats(x, 3, EPS)
    assert stats.dtype == torch.float32
    assert_close(out, op(x, 3, EPS), torch.bfloat16)
    assert_close(stats, reference.trajectory_flow_stats(x, 3, EPS), torch.float32)
    g = torch.randn_like(x)
    assert_close(op_backward(g, x, 3, EPS, None, stats), op_backward(g, x, 3, EPS), torch.bfloat16)
