"""Hostile cases of trajectory_flow (+ its backward op), TrajectoryGuidedMoERouter, the optimizer, backends().

A window larger than T means "every earlier step": any window >= T - 1, up to 2**63 - 1, must give
the window = T result in the forward and the backward (issue 20, item 1: int64 overflow of i + window).
"""
from __future__ import annotations

import math

import torch

import trajops
from hostile_cases import (ANY_ERROR, RESULT, WrongResult, check, check_shape, either, noncontiguous, raises, register,
                           same)
from trajops.ops import trajectory_flow as _tf

OP, BWD, PUB = "torch.ops.trajops.trajectory_flow", "torch.ops.trajops.trajectory_flow_backward", \
    "trajops.trajectory_flow"
TOL = 1e-6


def _case(name, fn, expect=RESULT, targets=(PUB, OP)):
    register(f"trajectory_flow.{name}", fn, expect, *targets)


def _fwd_bwd(x, window):
    x = x.detach().clone().requires_grad_()
    out = trajops.trajectory_flow(x, window)
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
    (out * g).sum().backward()
    return out.detach(), x.grad


def _huge_window(window, T=3, dtype=torch.float32):
    def fn():
        x = torch.randn(2, T, 4, dtype=dtype)
        got = _fwd_bwd(x, window)
        want = _fwd_bwd(x, T)
        same(got[0], want[0], f"forward with window={window} vs window=T", TOL)
        same(got[1], want[1], f"backward with window={window} vs window=T", TOL)
        raw = torch.ops.trajops.trajectory_flow_backward(torch.ones_like(x), x, window, 1e-6)
        same(raw, torch.ops.trajops.trajectory_flow_backward(torch.ones_like(x), x, T, 1e-6),
             f"trajectory_flow_backward with window={window} vs window=T", TOL)
    return fn


for _name, _w in (("int64_max", 2**63 - 1), ("int64_max_minus_T", 2**63 - 3), ("2pow62", 2**62),
                  ("2pow32_plus1", 2**32 + 1), ("2pow31", 2**31), ("T_plus_1", 4)):
    _case(f"window_{_name}", _huge_window(_w), targets=(PUB, OP, BWD))
_case("window_int64_max_fp64_long", _huge_window(2**63 - 1, T=13, dtype=torch.float64), targets=(PUB, OP, BWD))


def _call(x=None, window=8, eps=1e-6):
    return trajops.trajectory_flow(torch.randn(1, 3, 2) if x is None else x, window, eps)


for _name, _w in (("zero", 0), ("negative", -1), ("int64_min", -2**63)):
    _case(f"window_{_name}", lambda w=_w: _call(window=w), raises("window"))
_case("window_2pow63_not_int64", lambda: _call(window=2**63), raises(types=ANY_ERROR + ("OverflowError",)))
for _name, _e in (("nan", math.nan), ("inf", math.inf), ("negative", -1.0), ("neg_inf", -math.inf)):
    # Python's spelling of the value in the message on every backend ("-1.0", not "-1")
    _case(f"eps_{_name}", lambda e=_e: _call(eps=e), raises("eps", also=(f"got {_e}",)))


def _eps_huge():
    same(_call(torch.randn(2, 5, 3), eps=1e300), torch.zeros(2, 5, 3), "eps above every step norm: zeros")


_case("eps_huge", _eps_huge)
_case("x_1d", lambda: _call(torch.randn(3)), raises("x"))
_case("x_4d", lambda: _call(torch.randn(1, 1, 3, 2)), raises("x"))
_case("x_int64", lambda: _call(torch.ones(1, 3, 2, dtype=torch.long)), raises("x", also=("torch.int64",)))
_case("x_bool", lambda: _call(torch.ones(1, 3, 2, dtype=torch.bool)), raises("x", also=("torch.bool",)))


def _vs_reference(make, window=8, finite=False):
    def fn():
        x = make()
        got = _call(x, window)
        want = _tf._reference_forward(x, window, 1e-6)
        same(got, want, "trajectory_flow vs the reference", TOL)
        if finite:
            check(bool(got.isfinite().all()), "documented: steps touching a NaN row are skipped (finite output)")
        g = torch.randn_like(x)
        same(torch.ops.trajops.trajectory_flow_backward(g, x, window, 1e-6),
             _tf._reference_backward(g, x, window, 1e-6), "trajectory_flow_backward vs the reference", 1e-5)
    return fn


def _poison(idx, value, shape=(2, 6, 3), dtype=torch.float32):
    def make():
        x = torch.randn(*shape, dtype=dtype)
        x[idx] = value
        return x
    return make


_case("nan_row", _vs_reference(_poison((0, 2), math.nan), finite=True), targets=(PUB, OP, BWD))
_case("nan_row_window1", _vs_reference(_poison((1, 3), math.nan), window=1, finite=True), targets=(PUB, OP, BWD))
_case("inf_component", _vs_reference(_poison((0, 2, 1), math.inf)), targets=(PUB, OP, BWD))
_case("neg_inf_row", _vs_reference(_poison((1, 0), -math.inf)), targets=(PUB, OP, BWD))
_case("huge_values_fp32", _vs_reference(lambda: torch.randn(2, 6, 3) * 3e38), targets=(PUB, OP, BWD))
_case("fp16_max_values", _vs_reference(lambda: (torch.randn(1, 5, 3) * 6e4).half()), targets=(PUB, OP, BWD))


def _shape_case(shape):
    def fn():
        x = torch.randn(*shape, requires_grad=True)
        out = trajops.trajectory_flow(x, 2**63 - 1)
        check_shape(out, shape, "out")
        out.sum().backward()
        check_shape(x.grad, shape, "grad")
        if len(shape) == 3 and shape[1] == 1:
            same(out, torch.zeros(shape), "T = 1 has no step: zeros")
    return fn


for _shape in ((0, 3, 2), (2, 0, 2), (2, 3, 0), (2, 1, 4), (0, 2), (3, 0)):
    _case("shape_" + "x".join(map(str, _shape)), _shape_case(_shape), targets=(PUB, OP, BWD))


def _noncontiguous():
    x = torch.randn(3, 2, 8)
    nx = x.transpose(0, 1)[:, :, ::2]
    same(_call(nx), _call(nx.contiguous()), "non-contiguous x vs contiguous", TOL)
    ex = torch.randn(1, 1, 4).expand(2, 5, 4)
    same(_call(ex), torch.zeros(2, 5, 4), "expanded x (every step zero): zeros")


_case("noncontiguous_and_expanded", _noncontiguous)


def _bwd_bad(name, grad, expect):
    def fn():
        x = torch.randn(1, 3, 2)
        torch.ops.trajops.trajectory_flow_backward(grad(x), x, 8, 1e-6)
    register(f"trajectory_flow_backward.{name}", fn, expect, BWD)


_bwd_bad("grad_out_wrong_shape", lambda x: torch.ones(1, 2, 2), raises("grad_out"))
_bwd_bad("grad_out_3d_vs_2d", lambda x: torch.ones(3, 2), raises("grad_out"))
_bwd_bad("grad_out_float64", lambda x: torch.ones_like(x).double(), raises("grad_out", also=("torch.float64",)))
_bwd_bad("grad_out_int", lambda x: torch.ones_like(x).long(), raises("grad_out", also=("torch.int64",)))
register("trajectory_flow_backward.window_zero",
         lambda: torch.ops.trajops.trajectory_flow_backward(torch.ones(1, 3, 2), torch.ones(1, 3, 2), 0, 1e-6),
         raises("window"), BWD)
register("trajectory_flow_backward.eps_nan",
         lambda: torch.ops.trajops.trajectory_flow_backward(torch.ones(1, 3, 2), torch.ones(1, 3, 2), 2, math.nan),
         raises("eps"), BWD)


def _bwd_noncontiguous():
    x, g = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    nx, ng = x.transpose(0, 1)[:, :, ::2], g.transpose(0, 1)[:, :, ::2]
    same(torch.ops.trajops.trajectory_flow_backward(ng, nx, 3, 1e-6),
         torch.ops.trajops.trajectory_flow_backward(ng.contiguous(), nx.contiguous(), 3, 1e-6),
         "backward on non-contiguous inputs", TOL)


register("trajectory_flow_backward.noncontiguous", _bwd_noncontiguous, RESULT, BWD)


# ---------------------------------------------------------------- trajectory_flow_with_stats + stats
WS = "torch.ops.trajops.trajectory_flow_with_stats"


def _ws_huge_window():
    x = torch.randn(2, 5, 3)
    out, stats = torch.ops.trajops.trajectory_flow_with_stats(x, 2**63 - 1, 1e-6)
    want_out, want_stats = torch.ops.trajops.trajectory_flow_with_stats(x, 5, 1e-6)
    same(out, want_out, "with_stats out with window=2**63-1 vs window=T", TOL)
    same(stats, want_stats, "with_stats stats with window=2**63-1 vs window=T", TOL)
    g = torch.ones_like(x)
    same(torch.ops.trajops.trajectory_flow_backward(g, x, 2**63 - 1, 1e-6, None, stats),
         torch.ops.trajops.trajectory_flow_backward(g, x, 5, 1e-6), "backward with stats, huge window", TOL)


register("trajectory_flow_with_stats.window_int64_max", _ws_huge_window, RESULT, WS, BWD)
register("trajectory_flow_with_stats.window_zero",
         lambda: torch.ops.trajops.trajectory_flow_with_stats(torch.ones(1, 3, 2), 0, 1e-6), raises("window"), WS)
register("trajectory_flow_with_stats.x_int64",
         lambda: torch.ops.trajops.trajectory_flow_with_stats(torch.ones(1, 3, 2, dtype=torch.long)),
         raises("x", also=("torch.int64",)), WS)
register("trajectory_flow_with_stats.cu_decreasing",
         lambda: torch.ops.trajops.trajectory_flow_with_stats(torch.ones(6, 2), 3, 1e-6, torch.tensor([0, 4, 2, 6])),
         raises("cu_seqlens", also=("non-decreasing",)), WS)


def _bwd_stats(make):
    def fn():
        x = torch.randn(1, 3, 2)
        torch.ops.trajops.trajectory_flow_backward(torch.ones_like(x), x, 8, 1e-6, None, make(x))
    return fn


# A bad stats tensor is rejected before any kernel reads it (the Triton kernel trusts its shape).
for _name, _make, _also in (("stats_short", lambda x: torch.zeros(2, 1, 2), "[2, 1, 2]"),
                            ("stats_huge_T", lambda x: torch.zeros(2, 1, 2**20), "[2, 1, 1048576]"),
                            ("stats_1d", lambda x: torch.zeros(6), "[6]"),
                            ("stats_float64", lambda x: torch.zeros(2, 1, 3, dtype=torch.float64), "torch.float64"),
                            ("stats_int", lambda x: torch.zeros(2, 1, 3, dtype=torch.long), "torch.int64"),
                            ("stats_meta", lambda x: torch.zeros(2, 1, 3, device="meta"), "on meta")):
    register(f"trajectory_flow_backward.{_name}", _bwd_stats(_make), raises("stats", also=(_also,)), BWD)


def _bwd_stats_noncontiguous():
    x, g = torch.randn(2, 6, 3), torch.randn(2, 6, 3)
    stats = torch.ops.trajops.trajectory_flow_with_stats(x, 3, 1e-6)[1]
    nstats = stats.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    same(torch.ops.trajops.trajectory_flow_backward(g, x, 3, 1e-6, None, nstats),
         torch.ops.trajops.trajectory_flow_backward(g, x, 3, 1e-6), "backward with non-contiguous stats", TOL)


register("trajectory_flow_backward.stats_noncontiguous", _bwd_stats_noncontiguous, RESULT, BWD)


# ---------------------------------------------------------------- nn.TrajectoryGuidedMoERouter
ROUTER = "trajops.nn.TrajectoryGuidedMoERouter"


def _router(name, call, expect):
    def fn():
        m = trajops.nn.TrajectoryGuidedMoERouter(4, 3)
        call(m)
    register(f"nn.TrajectoryGuidedMoERouter.{name}", fn, expect, ROUTER)


_router("position_int64_max", lambda m: m(torch.randn(5, 4), 2**63 - 1), raises("position"))
_router("position_int64_min", lambda m: m(torch.randn(5, 4), -2**63), raises("position"))
_router("position_float", lambda m: m(torch.randn(5, 4), 1.5), raises("position"))
_router("position_in_empty_sequence", lambda m: m(torch.randn(0, 4), 0), raises("position"))
_router("t0_batched", lambda m: check_shape(m(torch.randn(2, 0, 4)), (2, 0, 3), "scores"), RESULT)
_router("t0_2d", lambda m: check_shape(m(torch.randn(0, 4)), (0, 3), "scores"), RESULT)
_router("batch0", lambda m: check_shape(m(torch.randn(0, 5, 4)), (0, 5, 3), "scores"), RESULT)
_router("nan_token", lambda m: check_shape(m(torch.randn(1, 5, 4).index_fill_(1, torch.tensor([2]), math.nan)),
                                           (1, 5, 3), "scores"), either())
_router("nan_token_position", lambda m: check_shape(m(torch.randn(5, 4).index_fill_(0, torch.tensor([1]), math.nan),
                                                      4), (3,), "scores"), either())
_router("int_embeddings", lambda m: m(torch.ones(5, 4, dtype=torch.long)), raises("token_embeddings"))


# ---------------------------------------------------------------- optim, backends()
OPT, STAB = "trajops.optim.TrajectoryGuidedOptimizer", "trajops.optim.trajectory_stability"


def _opt(lr=0.1, losses=(1.0,), window=100):
    p = torch.nn.Parameter(torch.ones(3))
    opt = trajops.optim.TrajectoryGuidedOptimizer([p], lr=lr, trajectory_window=window)
    for loss in losses:
        p.grad = torch.ones(3)
        opt.step(current_loss=loss)
    return p


for _name, _lr in (("nan", math.nan), ("inf", math.inf), ("negative", -1.0)):
    register(f"optim.TrajectoryGuidedOptimizer.lr_{_name}", lambda lr=_lr: _opt(lr=lr), raises("lr"), OPT)
register("optim.TrajectoryGuidedOptimizer.window_int64_min", lambda: _opt(window=-2**63),
         raises("trajectory_window"), OPT)
register("optim.TrajectoryGuidedOptimizer.nan_and_inf_losses",
         lambda: check_shape(_opt(losses=[math.nan, math.inf] * 6).detach(), (3,), "param"), either(), OPT)
register("optim.trajectory_stability.nan", lambda: trajops.optim.trajectory_stability([math.nan] * 10), either(),
         STAB)


def _stability_huge():
    s = trajops.optim.trajectory_stability([1e30, -1e30] * 5)  # the fp32 variance overflows to inf
    check(s == 0.0, f"an infinite variance gives stability exp(-inf) = 0, got {s}")


register("optim.trajectory_stability.infinite_variance", _stability_huge, RESULT, STAB)
register("backends.returns_cpu", lambda: check(trajops.backends()["cpu"] in ("cpp", "reference",
                                                                              "triton-interpreter"), "backends()"),
         RESULT, "trajops.backends")


# ---------------------------------------------------------------- packed sequences (cu_seqlens) and the offset helpers
def _varlen_ready() -> bool:
    """False on a Triton backend whose launchers do not take cu_seqlens yet (they raise NotImplementedError)."""
    if trajops.backends()["cpu"] != "triton-interpreter":
        return True
    import inspect

    from trajops.triton_kernels import trajectory_flow as kernels

    return "cu_seqlens" in inspect.signature(kernels.trajectory_flow_fwd).parameters


def _packed(cu, x=None, total=6):
    x = torch.randn(total, 3) if x is None else x
    return trajops.trajectory_flow(x, 3, cu_seqlens=cu)


def _packed_bwd(cu, total=6):
    x = torch.randn(1, total, 3)
    return torch.ops.trajops.trajectory_flow_backward(torch.ones_like(x), x, 3, 1e-6, cu)


_BAD_CU = {
    "cu_decreasing_huge": (lambda: torch.tensor([0, 2**62, 6]), raises("cu_seqlens", also=("non-decreasing",))),
    "cu_negative_inside": (lambda: torch.tensor([0, -1, 6]), raises("cu_seqlens", also=("non-decreasing",))),
    "cu_int64_min_first": (lambda: torch.tensor([-2**63, 6]), raises("cu_seqlens", also=("start at 0",))),
    "cu_int32_max_last": (lambda: torch.tensor([0, 2**31 - 1], dtype=torch.int32),
                          raises("cu_seqlens", also=("must end at the number of packed tokens 6",))),
    "cu_no_document": (lambda: torch.tensor([0]), raises("cu_seqlens", also=("got 0",))),
    "cu_0d": (lambda: torch.tensor(0), raises("cu_seqlens", also=("shape",))),
    "cu_empty": (lambda: torch.zeros(0, dtype=torch.long), raises("cu_seqlens", also=("shape",))),
    "cu_bool": (lambda: torch.tensor([False, True]), raises("cu_seqlens", also=("torch.bool",))),
    "cu_uint8": (lambda: torch.tensor([0, 6], dtype=torch.uint8), raises("cu_seqlens", also=("torch.uint8",))),
    "cu_float64": (lambda: torch.tensor([0.0, 6.0], dtype=torch.float64), raises("cu_seqlens", also=("float64",))),
    "cu_meta": (lambda: torch.tensor([0, 6], device="meta"), raises("cu_seqlens", also=("device",))),
    "cu_list": (lambda: [0, 6], raises("cu_seqlens", types=ANY_ERROR)),
}
for _name, (_make, _expect) in _BAD_CU.items():
    _case(_name, lambda m=_make: _packed(m()), _expect)
    register(f"trajectory_flow_backward.{_name}", lambda m=_make: _packed_bwd(m()), _expect, BWD)

_case("cu_with_batched_x", lambda: _packed(torch.tensor([0, 3]), torch.randn(2, 3, 3)),
      raises("cu_seqlens", also=("(total, D) or (1, total, D)",)))
_case("cu_with_1d_x", lambda: _packed(torch.tensor([0, 3]), torch.randn(3)), raises("x"))


def _when_ready(fn):
    """Runs fn where the backend has packed kernels; elsewhere checks the documented NotImplementedError."""
    def run():
        if _varlen_ready():
            fn()
            return
        try:
            _packed(torch.tensor([0, 6]))
        except NotImplementedError:
            return
        raise WrongResult("a Triton launcher without cu_seqlens must raise NotImplementedError")
    return run


def _packed_vs_alone(x, cu, window=3):
    offs = cu.tolist()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    got = _fwd_bwd_packed(x, cu, window, g)
    for a, b in zip(offs[:-1], offs[1:]):
        if b == a:
            continue
        xa = x[a:b].detach().clone().requires_grad_()
        want = trajops.trajectory_flow(xa, window)
        (want * g[a:b]).sum().backward()
        same(got[0][a:b], want.detach(), f"document [{a}, {b}) packed vs alone", 1e-5)
        same(got[1][a:b], xa.grad, f"gradient of document [{a}, {b}) packed vs alone", 1e-5)


def _fwd_bwd_packed(x, cu, window, g=None):
    x = x.detach().clone().requires_grad_()
    out = trajops.trajectory_flow(x, window, cu_seqlens=cu)
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(1)) if g is None else g
    (out * g).sum().backward()
    return out.detach(), x.grad


def _nan_in_one_document():
    x = torch.randn(9, 3)
    x[5] = math.nan
    x[6, 1] = math.inf
    _packed_vs_alone(x, torch.tensor([0, 4, 9]))


def _zero_tokens():
    out = _packed(torch.tensor([0, 0, 0]), torch.randn(0, 3))
    check_shape(out, (0, 3), "out")


def _huge_window_packed():
    x = torch.randn(8, 2)
    cu = torch.tensor([0, 1, 3, 3, 8])
    same(_fwd_bwd_packed(x, cu, 2**63 - 1)[0], _fwd_bwd_packed(x, cu, 8)[0], "window=2**63-1 vs window=total", TOL)
    _packed_vs_alone(x, cu, 2**63 - 1)


def _noncontiguous_cu():
    x = torch.randn(6, 3)
    cu = noncontiguous(torch.tensor([0, 2, 6]))
    same(_packed(cu, x), _packed(cu.contiguous(), x), "non-contiguous cu_seqlens vs contiguous", TOL)


_case("cu_nan_inf_in_one_document", _when_ready(_nan_in_one_document))
_case("cu_zero_tokens", _when_ready(_zero_tokens))
_case("cu_huge_window", _when_ready(_huge_window_packed))
_case("cu_noncontiguous", _when_ready(_noncontiguous_cu))

LENGTHS, POS_IDS = "trajops.cu_seqlens_from_lengths", "trajops.cu_seqlens_from_position_ids"


def _helper(name, fn, expect, target):
    register(f"{target.split('.')[-1]}.{name}", fn, expect, target)


_lengths = trajops.cu_seqlens_from_lengths
_helper("list", lambda: _lengths([1, 2]), raises("lengths"), LENGTHS)
_helper("float", lambda: _lengths(torch.tensor([1.0])), raises("lengths", also=("torch.float32",)), LENGTHS)
_helper("bool", lambda: _lengths(torch.tensor([True])), raises("lengths"), LENGTHS)
_helper("negative", lambda: _lengths(torch.tensor([3, -1])), raises("lengths"), LENGTHS)
_helper("int64_min", lambda: _lengths(torch.tensor([-2**63])), raises("lengths"), LENGTHS)
_helper("two_dim", lambda: _lengths(torch.tensor([[1, 2]])), raises("lengths"), LENGTHS)
_helper("overflow_int32", lambda: _lengths(torch.tensor([2**31 - 1, 1])), raises("dtype"), LENGTHS)
_helper("overflow_int64", lambda: _lengths(torch.tensor([2**62, 2**62]), torch.int64), raises("dtype"), LENGTHS)
_helper("dtype_float", lambda: _lengths(torch.tensor([1]), torch.float32), raises("dtype"), LENGTHS)
_helper("empty", lambda: same(_lengths(torch.zeros(0, dtype=torch.long)), torch.zeros(1, dtype=torch.int32),
                              "no document: [0]"), RESULT, LENGTHS)
_helper("int64_big", lambda: same(_lengths(torch.tensor([2**40, 0]), torch.int64),
                                  torch.tensor([0, 2**40, 2**40]), "int64 offsets past int32"), RESULT, LENGTHS)

_pos = trajops.cu_seqlens_from_position_ids
_helper("list", lambda: _pos([0, 1]), raises("position_ids"), POS_IDS)
_helper("float", lambda: _pos(torch.tensor([0.0, 1.0])), raises("position_ids", also=("torch.float32",)), POS_IDS)
_helper("zero_dim", lambda: _pos(torch.tensor(0)), raises("position_ids"), POS_IDS)
_helper("three_dim", lambda: _pos(torch.zeros(1, 1, 2, dtype=torch.long)), raises("position_ids"), POS_IDS)
_helper("dtype_float", lambda: _pos(torch.tensor([0, 1]), torch.float64), raises("dtype"), POS_IDS)
_helper("empty", lambda: same(_pos(torch.zeros(0, dtype=torch.long)), torch.zeros(1, dtype=torch.int32),
                              "no token: [0]"), RESULT, POS_IDS)
_helper("all_zero", lambda: same(_pos(torch.zeros(2, 3, dtype=torch.long)), torch.arange(7, dtype=torch.int32),
                                 "every token its own document"), RESULT, POS_IDS)
_helper("no_zero_huge_ids", lambda: same(_pos(torch.tensor([[2**62, -5, 7]])), torch.tensor([0, 3], dtype=torch.int32),
                                         "ids without 0: one document per row"), RESULT, POS_IDS)


_router("packed_position_ids_float", lambda m: m(torch.randn(1, 5, 4), position_ids=torch.zeros(1, 5)),
        raises("position_ids"))
_router("packed_position_ids_wrong_size", lambda m: m(torch.randn(1, 5, 4), position_ids=torch.zeros(1, 4,
                                                                                                    dtype=torch.long)),
        raises("position_ids"))
_router("packed_cu_bad", lambda m: m(torch.randn(1, 5, 4), cu_seqlens=torch.tensor([0, 6])), raises("cu_seqlens"))
_router("packed_both", lambda m: m(torch.randn(5, 4), cu_seqlens=torch.tensor([0, 5]), position_ids=torch.arange(5)),
        raises("cu_seqlens", "position_ids"))
