"""Hostile cases of the STP seam: trajops.stp_inject and trajops.nn.STPInject.

Documented result: the forward returns hidden unchanged; the backward adds weight * scale * the
gradient of stp_loss(hidden) on the same triples (rows that no triple reads keep the incoming
gradient exactly; a triple that reads NaN/Inf gives NaN gradient rows, as stp_loss)."""
from __future__ import annotations

import math

import torch

import trajops
from hostile_cases import ANY_ERROR, RESULT, check, check_shape, raises, register, same

FN, MOD = "trajops.stp_inject", "trajops.nn.STPInject"
B, T, D = 2, 6, 4


def triples():
    return torch.tensor([[[0, 1, 2], [1, 3, 5]]])  # (n_spans=1, B=2, 3)


def _fn(name, call, expect):
    register(f"stp_inject.{name}", call, expect, FN)


def _inject(h, weight=0.5, **kw):
    return trajops.stp_inject(h, weight, **kw)


_fn("weight_nan", lambda: _inject(torch.randn(B, T, D), math.nan), raises("weight"))
_fn("weight_negative", lambda: _inject(torch.randn(B, T, D), -0.02), raises("weight"))
_fn("weight_neg_inf", lambda: _inject(torch.randn(B, T, D), -math.inf), raises("weight"))
_fn("weight_complex", lambda: _inject(torch.randn(B, T, D), 1j), raises("weight"))
_fn("scale_inf", lambda: _inject(torch.randn(B, T, D), scale=math.inf), raises("scale"))
_fn("weight_times_scale_overflows", lambda: _inject(torch.randn(B, T, D), 1e200, scale=1e200),
    raises("weight", "scale"))
_fn("n_spans_zero", lambda: _inject(torch.randn(B, T, D), n_spans=0), raises("n_spans"))
_fn("n_spans_int64_min", lambda: _inject(torch.randn(B, T, D), n_spans=-2**63), raises("n_spans"))
_fn("n_spans_2pow62", lambda: _inject(torch.randn(B, T, D), n_spans=2**62), raises(types=ANY_ERROR))
_fn("hidden_2d", lambda: _inject(torch.randn(T, D)), raises("hidden"))
_fn("hidden_list", lambda: _inject([torch.randn(B, T, D)]), raises("hidden"))
_fn("hidden_int", lambda: _inject(torch.ones(B, T, D, dtype=torch.int64), triples=triples()), raises("hidden"))
_fn("triples_out_of_range", lambda: _inject(torch.randn(B, T, D), triples=torch.tensor([[[0, 1, T]] * B])),
    raises("triples"))
_fn("lengths_float", lambda: _inject(torch.randn(B, T, D), lengths=torch.tensor([3.0, 4.0])), raises("lengths"))
_fn("lengths_too_long", lambda: _inject(torch.randn(B, T, D), lengths=torch.tensor([T + 1, T])), raises("lengths"))


def _nan_hidden():
    h = torch.randn(B, T, D, dtype=torch.float64)
    h[0, 3] = math.nan  # read by row 0's triple? no: row 0 reads 0, 1, 2; row 1 reads 1, 3, 5
    h[1, 3] = math.inf  # read by row 1's triple
    leaf = h.clone().requires_grad_()
    out = trajops.stp_inject(leaf, 1.0, triples=triples())
    same(out.detach(), h, "forward")
    g = torch.ones_like(h)
    out.backward(g)
    check(bool(torch.isfinite(leaf.grad[0]).all()), "row 0 reads no NaN: finite gradient")
    check(bool(torch.isnan(leaf.grad[1, 1]).all()), "row 1 reads an Inf: NaN gradient rows")
    same(leaf.grad[1, 0], g[1, 0], "a position no triple reads keeps the incoming gradient")


def _empty(shape):
    leaf = torch.randn(*shape).requires_grad_()
    out = trajops.stp_inject(leaf, 1.0)
    check_shape(out, shape, "out")
    out.backward(torch.ones(shape))
    same(leaf.grad, torch.ones(shape), "no active row: the incoming gradient, exactly")


_fn("nan_inf_hidden", _nan_hidden, RESULT)
_fn("t0", lambda: _empty((B, 0, D)), RESULT)
_fn("t2", lambda: _empty((B, 2, D)), RESULT)
_fn("b0", lambda: _empty((0, T, D)), RESULT)
_fn("d0", lambda: _empty((B, T, 0)), RESULT)

register("nn.STPInject.weight_negative", lambda: trajops.nn.STPInject(weight=-1.0), raises("weight"), MOD)
register("nn.STPInject.scale_nan", lambda: trajops.nn.STPInject(scale=math.nan), raises("scale"), MOD)
register("nn.STPInject.n_spans_zero", lambda: trajops.nn.STPInject(n_spans=0), raises("n_spans"), MOD)
register("nn.STPInject.start_step_negative", lambda: trajops.nn.STPInject(start_step=-1), raises("start_step"), MOD)
register("nn.STPInject.hidden_1d", lambda: trajops.nn.STPInject()(torch.randn(T)), raises("hidden"), MOD)
