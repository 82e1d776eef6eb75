"""Hostile cases of the STP losses: stp_loss / stp_loss_dense (+ their backward ops), the public
functions, sample_stp_triples and nn.STPLoss.

Documented result: loss = 1 - F.cosine_similarity(h[t] - h[r], h[r] - h[s], eps=1e-8); for finite
inputs the expected value is computed from the same fp32 values in fp64, so a step of 1e20 (whose
squared norm overflows fp32) must still give the cosine loss (issue 20, item 7).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import trajops
from hostile_cases import ANY_ERROR, RESULT, check, check_shape, either, raises, register, same
from trajops.ops import stp_loss as _stp

OP, BWD = "torch.ops.trajops.stp_loss", "torch.ops.trajops.stp_loss_backward"
DOP, DBWD = "torch.ops.trajops.stp_loss_dense", "torch.ops.trajops.stp_loss_dense_backward"
PUB, DPUB, SAMPLE = "trajops.stp_loss", "trajops.stp_loss_dense", "trajops.sample_stp_triples"
B, T, D = 2, 6, 4


def triples():
    return torch.tensor([[[0, 1, 2], [1, 3, 5]], [[2, 3, 4], [0, 2, 5]]])  # (n_spans=2, B=2, 3)


def cos_loss(h: torch.Tensor, tr: torch.Tensor) -> torch.Tensor:
    """(S, B) fp64 loss of the triples from h's own values (no fp32 overflow)."""
    h = h.double()
    rows = torch.arange(h.shape[0])
    s, r, t = (h[rows, tr[..., i]] for i in range(3))
    return 1 - F.cosine_similarity(t - r, r - s, dim=-1, eps=1e-8)


def dense_loss(h: torch.Tensor) -> torch.Tensor:
    d = h.double().diff(dim=1)
    return 1 - F.cosine_similarity(d[:, 1:], d[:, :-1], dim=-1, eps=1e-8)


def _raw(name, call, expect, targets=(OP,)):
    register(f"stp_loss.{name}", call, expect, *targets)


def _sampled(h=None, tr=None, lengths=None):
    return torch.ops.trajops.stp_loss([torch.randn(B, T, D) if h is None else h], triples() if tr is None else tr,
                                      lengths)


def _tr(idx, value):
    t = triples()
    t[idx] = value
    return t


TR = ("triples",)
_raw("triple_t_eq_T", lambda: _sampled(tr=_tr((0, 1, 2), T)), raises(*TR))
_raw("triple_s_negative", lambda: _sampled(tr=_tr((1, 0, 0), -1)), raises(*TR))
_raw("triple_not_increasing", lambda: _sampled(tr=_tr((0, 0, 1), 0)), raises(*TR))
_raw("triple_int64_max", lambda: _sampled(tr=_tr((1, 1, 2), 2**63 - 1)), raises(*TR))
_raw("triple_int64_min", lambda: _sampled(tr=_tr((1, 1, 0), -2**63)), raises(*TR))
_raw("triples_int32", lambda: _sampled(tr=triples().int()), raises(*TR, also=("torch.int32",)))
_raw("triples_float", lambda: _sampled(tr=triples().float()), raises(*TR))
_raw("triples_2d", lambda: _sampled(tr=triples()[0]), raises(*TR))
_raw("triples_zero_spans", lambda: _sampled(tr=triples()[:0]), raises(*TR))
_raw("triples_wrong_batch", lambda: _sampled(tr=triples()[:, :1]), raises(*TR))
_raw("lengths_short", lambda: _sampled(lengths=torch.tensor([T])), raises("lengths"))
_raw("lengths_above_T", lambda: _sampled(lengths=torch.tensor([T + 1, T])), raises("lengths"))
_raw("lengths_negative", lambda: _sampled(lengths=torch.tensor([T, -1])), raises("lengths"))
_raw("lengths_int64_max", lambda: _sampled(lengths=torch.tensor([2**63 - 1, T])), raises("lengths"))
_raw("lengths_int32", lambda: _sampled(lengths=torch.tensor([T, T], dtype=torch.int32)),
     raises("lengths", also=("torch.int32",)))
_raw("triple_past_row_length", lambda: _sampled(tr=_tr((1, 0, 2), 5), lengths=torch.tensor([5, T])), raises(*TR))
_raw("hidden_empty_list", lambda: torch.ops.trajops.stp_loss([], triples(), None), raises("hidden"))
_raw("hidden_layers_differ", lambda: torch.ops.trajops.stp_loss([torch.randn(B, T, D), torch.randn(B, T, D + 1)],
                                                                  triples(), None), raises("hidden", "hidden[1]"))
_raw("hidden_int", lambda: _sampled(h=torch.ones(B, T, D, dtype=torch.long)), raises("hidden"))
_raw("hidden_2d", lambda: _sampled(h=torch.randn(T, D)), raises("hidden", "hidden[0]"))


def _inactive_row_ignored():
    """A row shorter than 3 is inactive: its triple is never read, even one far out of range."""
    tr = _tr((slice(None), 1), torch.tensor([0, 1, 10**9]))
    loss, _ = _sampled(tr=tr, lengths=torch.tensor([T, 2]))
    same(loss[0, :, 1], torch.zeros(2), "loss of the inactive row")


_raw("inactive_row_triple_out_of_range", _inactive_row_ignored, RESULT)


def _vs_cos(make_h, tol=1e-5, dtype=torch.float32):
    def fn():
        h = make_h().to(dtype)
        loss, _ = _sampled(h=h)
        same(loss[0], cos_loss(h, triples()), "stp_loss vs the fp64 cosine loss", tol)
    return fn


def _line(step, n=T):
    u = torch.tensor([1.0, 2.0, -2.0, 0.5])
    return (torch.arange(n, dtype=torch.float64)[:, None] * step * u).expand(B, n, D).contiguous()


_raw("straight_line_step_1e20", _vs_cos(lambda: _line(1e20)), RESULT)
_raw("straight_line_step_1e30", _vs_cos(lambda: _line(1e30)), RESULT)
_raw("random_steps_1e20", _vs_cos(lambda: torch.randn(B, T, D).double() * 1e20), RESULT)
_raw("tiny_steps_1e-30", _vs_cos(lambda: torch.randn(B, T, D).double() * 1e-30), RESULT)
_raw("nan_row", _vs_cos(lambda: torch.randn(B, T, D).index_fill_(1, torch.tensor([3]), math.nan)), RESULT)
_raw("d0", _vs_cos(lambda: torch.randn(B, T, 0)), RESULT)


def _vs_reference(make_h):
    def fn():
        h = make_h()
        got = _sampled(h=h)
        want = _stp._reference_stp([h], triples(), None)
        same(got[0], want[0], "stp_loss vs the reference", 1e-5)
        g = torch.randn_like(got[0])
        same(torch.ops.trajops.stp_loss_backward(g, got[1], [h], triples(), None)[0],
             _stp._reference_stp_backward(g, want[1], [h], triples(), None)[0], "stp_loss_backward vs the reference",
             1e-5)
    return fn


def _with_inf():
    h = torch.randn(B, T, D)
    h[0, 3, 1] = math.inf
    return h


_raw("inf_component", _vs_reference(_with_inf), RESULT, targets=(OP, BWD))
_raw("fp32_overflowing_difference", _vs_reference(lambda: torch.randn(B, T, D) * 3e38), RESULT, targets=(OP, BWD))
_raw("nan_row_backward", _vs_reference(lambda: torch.randn(B, T, D).index_fill_(1, torch.tensor([1]), math.nan)),
     RESULT, targets=(OP, BWD))


def _empty(shape, tr, lengths=None):
    def fn():
        loss, stats = _sampled(h=torch.randn(*shape), tr=tr, lengths=lengths)
        check_shape(loss, (1, tr.shape[0], shape[0]), "loss")
        same(loss, torch.zeros_like(loss), "rows shorter than 3 contribute 0")
    return fn


_raw("batch0", _empty((0, T, D), torch.zeros(1, 0, 3, dtype=torch.long)), RESULT)
_raw("t0", _empty((B, 0, D), torch.zeros(1, B, 3, dtype=torch.long)), RESULT)
_raw("t2", _empty((B, 2, D), torch.tensor([[[0, 1, 1], [0, 0, 0]]])), RESULT)


def _noncontiguous():
    h = torch.randn(T, B, 2 * D).transpose(0, 1)[..., ::2]
    same(_sampled(h=h)[0], _sampled(h=h.contiguous())[0], "non-contiguous hidden vs contiguous", 1e-6)
    tr = triples().transpose(0, 1).contiguous().transpose(0, 1)
    same(_sampled(h=h, tr=tr)[0], _sampled(h=h)[0], "non-contiguous triples", 1e-6)


_raw("noncontiguous", _noncontiguous, RESULT)


def _bwd_bad(name, edit, names):
    def fn():
        h = torch.randn(B, T, D)
        loss, stats = _sampled(h=h)
        a = {"grad_loss": torch.ones_like(loss), "stats": stats, "triples": triples()}
        edit(a)
        torch.ops.trajops.stp_loss_backward(a["grad_loss"], a["stats"], [h], a["triples"], None)
    register(f"stp_loss_backward.{name}", fn, raises(*names), BWD)


_bwd_bad("grad_loss_wrong_shape", lambda a: a.update(grad_loss=a["grad_loss"][:, :1]), ("grad_loss",))
_bwd_bad("grad_loss_float64", lambda a: a.update(grad_loss=a["grad_loss"].double()), ("grad_loss",))
_bwd_bad("stats_wrong_shape", lambda a: a.update(stats=a["stats"][..., :2]), ("stats",))
_bwd_bad("stats_float64", lambda a: a.update(stats=a["stats"].double()), ("stats",))
_bwd_bad("triple_out_of_range", lambda a: a["triples"].__setitem__((0, 0, 2), 10**6), ("triples",))


# ---------------------------------------------------------------- dense
def _dense(h=None, lengths=None):
    return torch.ops.trajops.stp_loss_dense([torch.randn(B, T, D) if h is None else h], lengths)


def _draw(name, call, expect, targets=(DOP,)):
    register(f"stp_loss_dense.{name}", call, expect, *targets)


_draw("lengths_short", lambda: _dense(lengths=torch.tensor([T])), raises("lengths"))
_draw("lengths_above_T", lambda: _dense(lengths=torch.tensor([T, T + 1])), raises("lengths"))
_draw("lengths_int64_min", lambda: _dense(lengths=torch.tensor([-2**63, T])), raises("lengths"))
_draw("lengths_float", lambda: _dense(lengths=torch.tensor([T, T], dtype=torch.float32)), raises("lengths"))
_draw("hidden_4d", lambda: _dense(h=torch.randn(1, B, T, D)), raises("hidden", "hidden[0]"))


def _dense_vs_cos(make_h, tol=1e-5):
    def fn():
        h = make_h().float()
        same(_dense(h=h)[0][0], dense_loss(h), "stp_loss_dense vs the fp64 cosine loss", tol)
    return fn


_draw("straight_line_step_1e20", _dense_vs_cos(lambda: _line(1e20)), RESULT)
_draw("random_steps_1e20", _dense_vs_cos(lambda: torch.randn(B, T, D).double() * 1e20), RESULT)
_draw("nan_row", _dense_vs_cos(lambda: torch.randn(B, T, D).index_fill_(1, torch.tensor([2]), math.nan)), RESULT)
_draw("d0", _dense_vs_cos(lambda: torch.randn(B, T, 0)), RESULT)
for _t in (0, 1, 2):
    _draw(f"t{_t}", lambda t=_t: check_shape(_dense(h=torch.randn(B, t, D))[0], (1, B, 0), "loss"), RESULT)
_draw("batch0", lambda: check_shape(_dense(h=torch.randn(0, T, D))[0], (1, 0, T - 2), "loss"), RESULT)


def _dbwd_bad(name, edit, names):
    def fn():
        h = torch.randn(B, T, D)
        loss, stats = _dense(h=h)
        a = {"grad_loss": torch.ones_like(loss), "stats": stats}
        edit(a)
        torch.ops.trajops.stp_loss_dense_backward(a["grad_loss"], a["stats"], [h], None)
    register(f"stp_loss_dense_backward.{name}", fn, raises(*names), DBWD)


_dbwd_bad("grad_loss_wrong_shape", lambda a: a.update(grad_loss=a["grad_loss"][..., 1:]), ("grad_loss",))
_dbwd_bad("grad_loss_int", lambda a: a.update(grad_loss=a["grad_loss"].long()), ("grad_loss",))
_dbwd_bad("stats_wrong_shape", lambda a: a.update(stats=a["stats"][:, :, :-1]), ("stats",))


def _dbwd_nan():
    h = torch.randn(B, T, D).index_fill_(1, torch.tensor([4]), math.nan)
    loss, stats = _dense(h=h)
    g = torch.randn_like(loss)
    want = _stp._reference_dense_backward(g, _stp._reference_dense([h], None)[1], [h], None)[0]
    same(torch.ops.trajops.stp_loss_dense_backward(g, stats, [h], None)[0], want, "vs the reference", 1e-5)


register("stp_loss_dense_backward.nan_row", _dbwd_nan, RESULT, DBWD)


# ---------------------------------------------------------------- public functions and nn.STPLoss
def _pub(name, call, expect, target=PUB):
    register(f"{target.split('.')[-1]}.public_{name}", call, expect, target)


_pub("n_spans_zero", lambda: trajops.stp_loss(torch.randn(B, T, D), 0), raises("n_spans"))
_pub("n_spans_2pow62", lambda: trajops.stp_loss(torch.randn(B, T, D), 2**62), raises(types=ANY_ERROR))
_pub("n_spans_int64_max", lambda: trajops.stp_loss(torch.randn(B, T, D), 2**63 - 1), raises(types=ANY_ERROR))
_pub("reduction_bad", lambda: trajops.stp_loss(torch.randn(B, T, D), reduction="avg"), raises("reduction"))
_pub("hidden_not_tensor", lambda: trajops.stp_loss([1.0, 2.0]), raises("hidden"))
_pub("lengths_float", lambda: trajops.stp_loss(torch.randn(B, T, D), lengths=torch.tensor([1.0, 2.0])),
     raises("lengths"))
_pub("lengths_list_above_T", lambda: trajops.stp_loss(torch.randn(B, T, D), lengths=[T, 2**62]), raises("lengths"))


def _pub_large_step():
    h = _line(1e20).float()
    loss = trajops.stp_loss(h, triples=triples())
    check(abs(float(loss)) < 1e-6, f"a straight line with steps of 1e20 has loss 0, got {float(loss)}")
    dense = trajops.stp_loss_dense(h)
    check(abs(float(dense)) < 1e-6, f"stp_loss_dense of a straight line with steps of 1e20 is 0, got {float(dense)}")


_pub("straight_line_step_1e20", _pub_large_step, RESULT)
_pub("dense_lengths_int64_max", lambda: trajops.stp_loss_dense(torch.randn(B, T, D), lengths=[2**63 - 1, 3]),
     raises("lengths"), DPUB)
_pub("dense_reduction_bad", lambda: trajops.stp_loss_dense(torch.randn(B, T, D), reduction=None), raises("reduction"),
     DPUB)


def _triples_in_range(n, lengths=None):
    tr = trajops.sample_stp_triples(B, n, 3, lengths=lengths)
    check_shape(tr, (3, B, 3), "triples")
    check(bool(((tr >= 0) & (tr <= max(n - 1, 0))).all()), f"triples outside [0, T-1]: {tr.tolist()}")
    if n >= 3 and lengths is None:
        check(bool(((tr[..., 0] < tr[..., 1]) & (tr[..., 1] < tr[..., 2])).all()), "triples not increasing")


_pub("sample_n_spans_int64_min", lambda: trajops.sample_stp_triples(B, T, -2**63), raises("n_spans"), SAMPLE)
_pub("sample_n_spans_2pow62", lambda: trajops.sample_stp_triples(B, T, 2**62), raises(types=ANY_ERROR), SAMPLE)
_pub("sample_batch_negative", lambda: trajops.sample_stp_triples(-1, T, 2), raises("batch"), SAMPLE)
_pub("sample_seq_len_2pow62", lambda: _triples_in_range(2**62), RESULT, SAMPLE)
_pub("sample_seq_len_int64_max", lambda: _triples_in_range(2**63 - 1), RESULT, SAMPLE)
_pub("sample_lengths_int64_limits", lambda: _triples_in_range(T, torch.tensor([2**63 - 1, -2**63])), RESULT, SAMPLE)
_pub("sample_lengths_wrong_shape", lambda: trajops.sample_stp_triples(B, T, 2, lengths=torch.tensor([T])),
     raises("lengths"), SAMPLE)
_pub("sample_lengths_float", lambda: trajops.sample_stp_triples(B, T, 2, lengths=torch.tensor([3.0, 4.0])),
     raises("lengths"), SAMPLE)

STPL = "trajops.nn.STPLoss"
register("nn.STPLoss.layer_int64_max", lambda: trajops.nn.STPLoss(layers=(2**63 - 1,))(torch.randn(B, T, D)),
         raises("layer"), STPL)
register("nn.STPLoss.n_spans_zero", lambda: trajops.nn.STPLoss(n_spans=0), raises("n_spans"), STPL)
register("nn.STPLoss.nan_hidden", lambda: check_shape(trajops.nn.STPLoss()(torch.full((B, T, D), math.nan)), (),
                                                      "loss"), either(), STPL)
register("nn.STPLoss.t0", lambda: check_shape(trajops.nn.STPLoss()(torch.randn(B, 0, D)), (), "loss"), RESULT, STPL)


# ---------------------------------------------------------------- packed sequences (cu_seqlens)
# hidden (1, TOT, D) holds two documents of 4 and 5 tokens (issue 17).
TOT, CU = 9, (0, 4, 9)
_CUN = ("cu_seqlens",)


def _cu(*vals, dtype=torch.int32):
    return torch.tensor(vals if vals else CU, dtype=dtype)


def _packed(cu=None, tr=None, lengths=None, h=None):
    tr = torch.tensor([[[0, 1, 2], [1, 2, 4]]]) if tr is None else tr
    return torch.ops.trajops.stp_loss([torch.randn(1, TOT, D) if h is None else h], tr, lengths,
                                      _cu() if cu is None else cu)


def _packed_dense(cu=None, h=None):
    return torch.ops.trajops.stp_loss_dense([torch.randn(1, TOT, D) if h is None else h], None,
                                            _cu() if cu is None else cu)


def _packed_vs_padded():
    h = torch.randn(1, TOT, D)
    pad = torch.zeros(2, 5, D)
    pad[0, :4], pad[1, :5] = h[0, :4], h[0, 4:]
    tr = torch.tensor([[[0, 1, 3], [0, 2, 4]]])
    same(_packed(h=h, tr=tr)[0], torch.ops.trajops.stp_loss([pad], tr, torch.tensor([4, 5]))[0], "packed vs padded",
         1e-6)
    same(trajops.stp_loss_dense(h, cu_seqlens=_cu()), trajops.stp_loss_dense(pad, lengths=torch.tensor([4, 5])),
         "packed dense vs padded", 1e-6)


for _name, _cuv in [("cu_int64_max", _cu(0, 2**63 - 1, TOT, dtype=torch.int64)),
                    ("cu_int32_min", _cu(0, -2**31, TOT)), ("cu_first_nonzero", _cu(1, 4, TOT)),
                    ("cu_decreasing", _cu(0, 6, 4, TOT)), ("cu_last_short", _cu(0, 4, TOT - 1)),
                    ("cu_last_long", _cu(0, 4, TOT + 1)), ("cu_float", _cu().float()), ("cu_2d", _cu().view(1, 3)),
                    ("cu_empty", _cu()[:0])]:
    _raw(_name, lambda c=_cuv: _packed(cu=c), raises(*_CUN))
    _draw(_name, lambda c=_cuv: _packed_dense(cu=c), raises(*_CUN))
_raw("cu_with_lengths", lambda: _packed(lengths=torch.tensor([TOT])), raises(*_CUN))
_raw("cu_batch_two", lambda: _packed(h=torch.randn(2, TOT, D)), raises(*_CUN))
_raw("cu_triples_rows_not_documents", lambda: _packed(tr=torch.tensor([[[0, 1, 2]]])), raises(*TR))
_raw("cu_triple_past_document", lambda: _packed(tr=torch.tensor([[[0, 1, 4], [0, 1, 2]]])), raises(*TR))
_raw("cu_bwd_decreasing", lambda: torch.ops.trajops.stp_loss_backward(
    torch.zeros(1, 1, 2), torch.zeros(1, 1, 2, 3), [torch.randn(1, TOT, D)], torch.tensor([[[0, 1, 2], [0, 1, 2]]]),
    None, _cu(0, 6, 4)), raises(*_CUN), targets=(BWD,))
_draw("cu_bwd_last_short", lambda: torch.ops.trajops.stp_loss_dense_backward(
    torch.zeros(1, 1, TOT - 2), torch.zeros(1, 1, TOT - 1, 2), [torch.randn(1, TOT, D)], None, _cu(0, 4, 5)),
    raises(*_CUN), targets=(DBWD,))
_raw("cu_packed_vs_padded", _packed_vs_padded, RESULT, targets=(OP, DOP, DPUB))
_pub("cu_public_empty_documents", lambda: check_shape(
    trajops.stp_loss(torch.randn(TOT, D), cu_seqlens=_cu(0, 0, 4, 4, TOT)), (), "loss"), RESULT)
_pub("sample_cu_batch_mismatch", lambda: trajops.sample_stp_triples(3, TOT, 2, cu_seqlens=_cu()), raises("batch"),
     SAMPLE)
