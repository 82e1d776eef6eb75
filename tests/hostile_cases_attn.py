"""Hostile cases of temperature_attention (+ its backward op) and of MultiScaleTrajectoryAttention.

NaN rules from issue 20: a NaN in one query row makes that row's out and lse NaN and leaves the other
rows equal to a clean run; a row whose only key is NaN is NaN; a NaN in a masked-out key changes
nothing; a tau that is not a positive finite number (NaN, <= 0, inf, and positive subnormals that
overflow scale / tau) makes its row NaN. Other non-finite inputs must give the reference's result.
"""
from __future__ import annotations

import math

import torch

import trajops
from hostile_cases import RESULT, check, check_shape, either, noncontiguous, raises, register, rows_nan, same
from trajops.ops import temperature_attention as _ta

OP, BWD, PUB = ("torch.ops.trajops.temperature_attention", "torch.ops.trajops.temperature_attention_backward",
                "trajops.temperature_attention")
TOL = 1e-5


def qkv(B=1, Hq=2, Hkv=2, Tq=3, Tk=4, D=8, Dv=8, dtype=torch.float32):
    return (torch.randn(B, Hq, Tq, D, dtype=dtype), torch.randn(B, Hkv, Tk, D, dtype=dtype),
            torch.randn(B, Hkv, Tk, Dv, dtype=dtype))


def attn(q, k, v, tau=1.0, **kw):
    return trajops.temperature_attention(q, k, v, tau, return_lse=True, **kw)


def reference(q, k, v, tau=1.0, attn_mask=None, causal=False, scale=None):
    if not isinstance(tau, torch.Tensor):
        tau = torch.tensor(float(tau), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    mask = None if attn_mask is None else _ta._canonical_mask(attn_mask, q, k)
    return _ta._reference_forward(q, k, v, tau, mask, causal, scale)


def check_rows(got, clean, bad, what):
    """Rows (b, h, i) in `bad` (bool (B, Hq, Tq)) are all NaN in out and lse; the others equal `clean`."""
    out, lse = got
    check(bool(rows_nan(out, 1)[bad].all()), f"{what}: out of the poisoned rows must be NaN, got {out[bad].tolist()}")
    check(bool(lse[bad].isnan().all()), f"{what}: lse of the poisoned rows must be NaN, got {lse[bad].tolist()}")
    same(out[~bad], clean[0][~bad], f"{what}: out of the other rows vs a clean run", TOL)
    same(lse[~bad], clean[1][~bad], f"{what}: lse of the other rows vs a clean run", TOL)


def _case(name, fn, expect=RESULT, targets=(PUB, OP)):
    register(f"temperature_attention.{name}", fn, expect, *targets)


# ---------------------------------------------------------------- NaN rules
def _nan_query(dtype, Hkv, causal):
    def fn():
        q, k, v = qkv(Hkv=Hkv, Tq=4, dtype=dtype)
        clean = attn(q, k, v, 0.7, causal=causal)
        q[0, 1, 2, 0] = math.nan
        bad = torch.zeros(1, 2, 4, dtype=torch.bool)
        bad[0, 1, 2] = True
        check_rows(attn(q, k, v, 0.7, causal=causal), clean, bad, "NaN query row")
    return fn


_case("nan_query_row_fp64", _nan_query(torch.float64, 2, False))
_case("nan_query_row_gqa_causal", _nan_query(torch.float32, 1, True))
if trajops.backends()["cpu"] != "triton-interpreter":  # the interpreter's half types are wrong even on
    _case("nan_query_row_bf16", _nan_query(torch.bfloat16, 2, False))  # clean inputs (conftest.DTYPES)


def _only_key_nan(where):
    def fn():
        q, k, v = qkv()
        mask = torch.ones(1, 1, 3, 4, dtype=torch.bool)
        mask[..., 2] = False  # no row reads key 2 ...
        mask[0, 0, 1] = torch.tensor([False, False, True, False])  # ... except row 1, which reads only it
        clean = attn(q, k, v, attn_mask=mask)
        (k if where == "k" else v)[:, :, 2] = math.nan
        bad = torch.zeros(1, 2, 3, dtype=torch.bool)
        bad[0, :, 1] = True
        out, lse = attn(q, k, v, attn_mask=mask)
        if where == "k":
            check_rows((out, lse), clean, bad, "a row's only key NaN")
        else:  # the documented rule: a non-finite v row of an allowed key makes the whole row NaN, lse too
            check_rows((out, lse), clean, bad, "a row's only value NaN")
    return fn


_case("only_key_nan", _only_key_nan("k"))
_case("only_value_nan", _only_key_nan("v"))


def _masked_key_nan(causal):
    def fn():
        q, k, v = qkv(Tq=4)
        if causal:  # key 3 is in the future of rows 0..2 only; row 3 sees it
            clean = attn(q, k, v, causal=True)
            k[:, :, 3], v[:, :, 3] = math.nan, math.inf
            bad = torch.zeros(1, 2, 4, dtype=torch.bool)
            bad[..., 3] = True
            check_rows(attn(q, k, v, causal=True), clean, bad, "a NaN key only the last row sees")
            return
        mask = torch.tensor([True, True, True, False]).view(1, 1, 1, 4)
        clean = attn(q, k, v, attn_mask=mask)
        k[:, :, 3], v[:, :, 3] = math.nan, math.nan
        got = attn(q, k, v, attn_mask=mask)
        same(got[0], clean[0], "out with a NaN masked-out key", TOL)
        same(got[1], clean[1], "lse with a NaN masked-out key", TOL)
    return fn


_case("masked_key_nan_no_effect", _masked_key_nan(False))
_case("causal_future_key_nan", _masked_key_nan(True))


def _bad_tau(value, dtype=torch.float32):
    def fn():
        q, k, v = qkv(dtype=dtype)
        tau = torch.ones(1, 2, 3, dtype=dtype)
        clean = attn(q, k, v, tau)
        tau[0, 1, 2] = value
        bad = torch.zeros(1, 2, 3, dtype=torch.bool)
        bad[0, 1, 2] = True
        check_rows(attn(q, k, v, tau), clean, bad, f"tau = {value}")
    return fn


_case("tau_subnormal_fp32", _bad_tau(1e-45))
_case("tau_subnormal_fp64", _bad_tau(5e-324, torch.float64))
_case("tau_nan", _bad_tau(math.nan))
_case("tau_zero", _bad_tau(0.0))
_case("tau_negative", _bad_tau(-1.0))
_case("tau_inf", _bad_tau(math.inf))
_case("tau_neg_inf", _bad_tau(-math.inf))


def _tau_subnormal_scalar():
    q, k, v = qkv()
    out, lse = attn(q, k, v, torch.tensor(1e-45))
    check(bool(out.isnan().all() and lse.isnan().all()), "a subnormal scalar tau must make every row NaN")


_case("tau_subnormal_scalar", _tau_subnormal_scalar)


def _vs_reference(make, **kw):
    def fn():
        q, k, v, tau = make()
        got, want = attn(q, k, v, tau, **kw), reference(q, k, v, tau, **kw)
        same(got[0], want[0], "out vs the reference", TOL)
        same(got[1], want[1], "lse vs the reference", TOL)
    return fn


def _neg_inf_v_underflow():
    """Issue item 7: -inf in v where that key's weight underflows to 0."""
    q, k, v = qkv()
    k[:, :, 0] = -q.mean(2) * 1e3  # key 0's logit is far below the others for every query
    v[:, :, 0, 0] = -math.inf
    return q, k, v, 1.0


_case("neg_inf_value_underflowing_weight", _vs_reference(_neg_inf_v_underflow))
_case("inf_query", _vs_reference(lambda: (*_with(qkv(), 0, (0, 0, 1, 3), math.inf), 1.0)))
_case("inf_key", _vs_reference(lambda: (*_with(qkv(), 1, (0, 1, 2, 0), -math.inf), 1.0)))
def _huge_logits():
    # finite inputs whose scores overflow fp32: the one corner the rule leaves to each backend's IEEE
    # arithmetic (README); it must not crash and keeps its shapes
    q, k, v = (t * 1e20 for t in qkv())
    out, lse = attn(q, k, v)
    check(out.shape == q.shape[:3] + v.shape[3:] and lse.shape == q.shape[:3], "shapes")


_case("huge_logits_fp32", _huge_logits)
_case("huge_tau", _vs_reference(lambda: (*qkv(), 3e38)))
_case("tiny_normal_tau", _vs_reference(lambda: (*qkv(), 1.2e-38)))
_case("scale_subnormal", _vs_reference(lambda: (*qkv(), 1.0), scale=1e-45))
_case("scale_huge", _vs_reference(lambda: (*qkv(), 1.0), scale=1e38))


def _with(tensors, i, idx, value):
    tensors = list(tensors)
    tensors[i][idx] = value
    return tensors


# ---------------------------------------------------------------- empty and zero-size
def _shapes(B=1, Hq=2, Hkv=2, Tq=3, Tk=4, D=8, Dv=8, causal=False, mask=None):
    def fn():
        q, k, v = qkv(B, Hq, Hkv, Tq, Tk, D, Dv)
        out, lse = attn(q, k, v, causal=causal, attn_mask=mask)
        check_shape(out, (B, Hq, Tq, Dv), "out")
        check_shape(lse, (B, Hq, Tq), "lse")
        if Tk == 0 or mask is not None:  # documented: a row with no key gives out 0, lse -inf
            check(bool((out == 0).all() and (lse == -math.inf).all()), "rows without keys: out 0, lse -inf")
    return fn


_case("batch0", _shapes(B=0))
_case("tq0", _shapes(Tq=0))
_case("tk0_rows_without_keys", _shapes(Tk=0))
_case("fully_masked", _shapes(mask=torch.zeros(1, 1, 1, 4, dtype=torch.bool)))
_case("hq0", _shapes(Hq=0, Hkv=1), either("q", "Hq"))
_case("d0", _shapes(D=0), raises("q", "k", "D"))
_case("dv0", _shapes(Dv=0), raises("v", "Dv"))
_case("hkv0", _shapes(Hkv=0), raises("k", "v", "Hkv"))


def _causal_more_queries():
    q, k, v = qkv(Tq=5, Tk=2)
    out, lse = attn(q, k, v, causal=True)
    check(bool((out[:, :, :3] == 0).all() and (lse[:, :, :3] == -math.inf).all()), "rows without keys: 0 / -inf")
    same(out, reference(q, k, v, causal=True)[0], "out vs the reference", TOL)


_case("causal_tq_above_tk", _causal_more_queries)


def _keyless_grads():
    q, k, v = (t.requires_grad_() for t in qkv(Tk=0))
    tau = torch.ones(1, 2, 3, requires_grad=True)
    out, lse = attn(q, k, v, tau)
    (out.sum() + lse.clamp_min(-1).sum()).backward()
    for name, t in (("q", q), ("tau", tau)):
        same(t.grad, torch.zeros_like(t), f"grad of {name} with no keys")


_case("tk0_zero_gradients", _keyless_grads, targets=(PUB, OP, BWD))


# ---------------------------------------------------------------- bad arguments
def _bad(name, build, expect):
    def fn():
        q, k, v, tau, kw = build()
        trajops.temperature_attention(q, k, v, tau, **kw)
    _case(name, fn, expect)


def _qkvt(**over):
    q, k, v = qkv()
    d = {"q": q, "k": k, "v": v, "tau": torch.tensor(1.0), "kw": {}}
    d.update(over)
    return d["q"], d["k"], d["v"], d["tau"], d["kw"]


for _name, _scale in (("nan", math.nan), ("inf", math.inf), ("zero", 0.0), ("negative", -1.0)):
    _bad(f"scale_{_name}", lambda s=_scale: _qkvt(kw={"scale": s}), raises("scale", also=(f"got {_scale}",)))
_bad("tau_not_broadcastable", lambda: _qkvt(tau=torch.ones(2, 2)), raises("tau"))
_bad("tau_rank4", lambda: _qkvt(tau=torch.ones(1, 1, 1, 1)), raises("tau"))
_bad("tau_int64", lambda: _qkvt(tau=torch.tensor(1)), raises("tau"))
_bad("mask_float", lambda: _qkvt(kw={"attn_mask": torch.ones(1, 1, 3, 4)}), raises("attn_mask"))
_bad("mask_wrong_shape", lambda: _qkvt(kw={"attn_mask": torch.ones(1, 1, 3, 5, dtype=torch.bool)}),
     raises("attn_mask"))
_bad("mask_5d", lambda: _qkvt(kw={"attn_mask": torch.ones(1, 1, 1, 3, 4, dtype=torch.bool)}), raises("attn_mask"))
_bad("k_float64", lambda: _qkvt(k=torch.randn(1, 2, 4, 8, dtype=torch.float64)), raises("k", "q", "v"))
_bad("q_int64", lambda: _qkvt(q=torch.ones(1, 2, 3, 8, dtype=torch.long)), raises("q"))
_bad("q_3d", lambda: _qkvt(q=torch.randn(2, 3, 8)), raises("q"))
_bad("heads_not_dividing", lambda: _qkvt(k=torch.randn(1, 3, 4, 8), v=torch.randn(1, 3, 4, 8)), raises("k", "v", "Hq"))
_bad("batch_mismatch", lambda: _qkvt(k=torch.randn(2, 2, 4, 8), v=torch.randn(2, 2, 4, 8)), raises("q", "k", "v"))


def _raw_mask_int8():
    q, k, v = qkv()
    torch.ops.trajops.temperature_attention(q, k, v, torch.tensor(1.0), torch.ones(1, 1, 3, 4, dtype=torch.int8))


_case("raw_mask_int8", _raw_mask_int8, raises("attn_mask"), targets=(OP,))


def _noncontiguous():
    q, k, v = qkv()
    tau = torch.rand(1, 2, 3) + 0.5
    nq, nk, nv = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v))
    ntau = noncontiguous(tau)
    got, want = attn(nq, nk[:, :, :], nv, ntau), attn(q, k, v, tau)
    same(got[0], want[0], "out on non-contiguous inputs", TOL)
    same(got[1], want[1], "lse on non-contiguous inputs", TOL)
    eq, ek = torch.randn(1, 1, 3, 8).expand(1, 2, 3, 8), torch.randn(1, 1, 4, 8).expand(1, 2, 4, 8)
    same(attn(eq, ek, v)[0], attn(eq.contiguous(), ek.contiguous(), v)[0], "out on expanded (stride 0) inputs", TOL)


_case("noncontiguous_and_expanded", _noncontiguous)


# ---------------------------------------------------------------- the backward op
def _fwd_bwd_args(poison=None):
    q, k, v = qkv()
    tau = torch.ones(1, 2, 3)
    if poison:
        poison(q, k, v, tau)
    out, lse = torch.ops.trajops.temperature_attention(q, k, v, tau, None, False, None)
    return dict(grad_out=torch.randn_like(out), grad_lse=torch.randn_like(lse), q=q, k=k, v=v, tau=tau,
                attn_mask=None, causal=False, scale=None, out=out, lse=lse)


def _backward(a):
    return torch.ops.trajops.temperature_attention_backward(
        a["grad_out"], a["grad_lse"], a["q"], a["k"], a["v"], a["tau"], a["attn_mask"], a["causal"], a["scale"],
        a["out"], a["lse"])


def _bwd_bad(name, edit, names):
    def fn():
        a = _fwd_bwd_args()
        edit(a)
        _backward(a)
    register(f"temperature_attention_backward.{name}", fn, raises(*names), BWD)


_bwd_bad("grad_out_wrong_shape", lambda a: a.update(grad_out=a["grad_out"][:, :, :2]), ("grad_out",))
_bwd_bad("grad_out_float64", lambda a: a.update(grad_out=a["grad_out"].double()), ("grad_out",))
_bwd_bad("grad_out_3d", lambda a: a.update(grad_out=a["grad_out"][0]), ("grad_out",))
_bwd_bad("grad_lse_wrong_shape", lambda a: a.update(grad_lse=a["grad_lse"][..., None]), ("grad_lse",))
_bwd_bad("out_wrong_shape", lambda a: a.update(out=a["out"][..., :4]), ("out",))
_bwd_bad("lse_float64", lambda a: a.update(lse=a["lse"].double()), ("lse",))
_bwd_bad("lse_wrong_shape", lambda a: a.update(lse=a["lse"][:, :1]), ("lse",))


def _bwd_vs_reference(poison, edit=None):
    def fn():
        a = _fwd_bwd_args(poison)
        got = _backward(dict(a, **edit(a)) if edit else a)
        ref = _ta._reference_forward(a["q"], a["k"], a["v"], a["tau"], None, False, None)
        b = dict(a, out=ref[0], lse=ref[1])
        want = _ta._reference_backward(*(b[n] for n in ("grad_out", "grad_lse", "q", "k", "v", "tau", "attn_mask",
                                                        "causal", "scale", "out", "lse")))
        for name, g, w in zip(("dq", "dk", "dv", "dtau"), got, want):
            same(g, w, f"{name} vs the reference", 1e-4)
    return fn


def _nan_q_row(q, k, v, tau):
    q[0, 0, 1, 3] = math.nan


def _nan_tau_row(q, k, v, tau):
    tau[0, 1, 0] = math.nan


register("temperature_attention_backward.nan_query_row", _bwd_vs_reference(_nan_q_row), RESULT, BWD)
register("temperature_attention_backward.nan_tau_row", _bwd_vs_reference(_nan_tau_row), RESULT, BWD)
register("temperature_attention_backward.noncontiguous_grads", _bwd_vs_reference(None, lambda a: {
    "grad_out": a["grad_out"].transpose(2, 3).contiguous().transpose(2, 3),
    "grad_lse": noncontiguous(a["grad_lse"])}), RESULT, BWD)


# ---------------------------------------------------------------- nn.MultiScaleTrajectoryAttention
MSA = "trajops.nn.MultiScaleTrajectoryAttention"


def _msa(name, B=1, Tq=3, Tk=3, poison=None, mask=None, expect=either()):
    def fn():
        m = trajops.nn.MultiScaleTrajectoryAttention(8, 2)
        x, kv = torch.randn(B, Tq, 8), torch.randn(B, Tk, 8)
        if poison:
            poison(x)
        out = m(x, kv, kv, mask)
        check_shape(out, (B, Tq, 8), "out")
        if mask is not None:
            check(bool(out.isfinite().all()), "a fully masked row averages the values (finite)")
    register(f"nn.MultiScaleTrajectoryAttention.{name}", fn, expect, MSA)


_msa("tq0", Tq=0)
_msa("tk0", Tk=0)
_msa("batch0", B=0)
_msa("nan_query_token", poison=lambda x: x[0, 1].fill_(math.nan))
_msa("fully_masked", mask=torch.zeros(3, 3), expect=RESULT)
_msa("huge_queries", poison=lambda x: x.mul_(1e30))
