"""NaN/Inf in temperature_attention and paged_temperature_attention: one rule on every backend.

The rule is written in trajops/reference/temperature_attention.py's docstring. Each case below puts
NaN or Inf somewhere (a q element, an allowed or masked or causally excluded k/v row, a subnormal
tau, an empty row, grad_out) and checks, on whatever backend this process dispatches to (conftest:
C++, TRAJOPS_BACKEND=reference, or the Triton interpreter):

- the NaNs are exactly where the rule (restated independently here) puts them, in out, lse and in
  every gradient;
- the reference puts them at the same places, and the finite values match it;
- every other element is bit for bit what the same backend gives when the hostile values are
  replaced by finite ones (masked-out data never matters; a NaN row leaks nowhere).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trajops

from trajops.ops import paged_temperature_attention as paged_ops
from trajops.ops import temperature_attention as attn_ops

from conftest import INTERPRETER, TOL

NAN, INF = math.nan, math.inf
FLOATS = [torch.float32, torch.float64]
ATTN = torch.ops.trajops.temperature_attention
PAGED = torch.ops.trajops.paged_temperature_attention


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def close(actual, expected, dtype):
    """NaN at the same places, everything else within the dtype's tolerance (infinities equal)."""
    assert torch.equal(actual.isnan(), expected.isnan()), (actual, expected)
    tol = TOL[dtype]
    scale = max(1.0, float(expected.double().nan_to_num(0.0, 0.0, 0.0).abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol * scale, rtol=tol, equal_nan=True)


def exact_outside(hostile, clean, nan_at, name):
    """hostile is NaN exactly at nan_at and equals clean bit for bit everywhere else."""
    nan_at = nan_at.expand(hostile.shape)
    assert torch.equal(hostile.isnan(), nan_at), f"{name}: NaN at {hostile.isnan().nonzero().tolist()}, " \
                                                 f"expected at {nan_at.nonzero().tolist()}"
    assert torch.equal(hostile[~nan_at], clean[~nan_at]), f"{name}: finite part differs from the clean run"


# ---------------------------------------------------------------- temperature_attention
def rule(q, k, v, tau, allowed, scale, gout, glse):
    """The rule, restated: (NaN rows of out/lse, NaN rows of dq/dtau, NaN keys of dk/dv (B, Hkv, Tk))."""
    B, Hq, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    t = tau.to(acc_of(q.dtype))
    c = torch.full((), scale, dtype=t.dtype) / t
    c_bad = ~((t > 0) & t.isfinite() & c.isfinite())
    key_bad = ~(k.isfinite().all(-1) & v.isfinite().all(-1)).repeat_interleave(G, 1)  # (B, Hq, Tk)
    nonempty = allowed.any(-1)
    rows = nonempty & (c_bad | ~q.isfinite().all(-1) | (allowed & key_bad[:, :, None, :]).any(-1))
    grad_rows = rows | (nonempty & (~gout.isfinite().all(-1) | ~glse.isfinite()))
    keys = (allowed & grad_rows[..., None]).reshape(B, Hkv, G, Tq, Tk).any(2).any(2)
    return rows, grad_rows, keys


def _views(t):
    """The same values in a non-contiguous layout: q, v dense but transposed, k a slice (not dense)."""
    D = t.shape[-1]
    return t.transpose(1, 2).contiguous().transpose(1, 2), torch.cat([t, t], -1)[..., :D]


def attention_run(x, op_forward=None, op_backward=None):
    """out, lse, dq, dk, dv, dtau of the op (or of the given forward/backward functions)."""
    q, k, v, tau, mask, causal, gout, glse = (x[n] for n in ("q", "k", "v", "tau", "mask", "causal", "gout", "glse"))
    if x.get("views"):
        q, v, k = _views(q)[0], _views(v)[0], _views(k)[1]
    if op_forward is not None:
        out, lse = op_forward(q, k, v, tau, mask, causal, None)
        return [out, lse, *op_backward(gout, glse, q, k, v, tau, mask, causal, None, out, lse)]
    leaves = [t.detach().requires_grad_() for t in (q, k, v, tau)]
    out, lse = ATTN(*leaves, mask, causal, None)
    return [out.detach(), lse.detach(), *torch.autograd.grad((out, lse), leaves, (gout, glse))]


def attention_inputs(dtype, B=2, Hq=2, Hkv=2, Tq=5, Tk=7, D=8, Dv=None, masked=True, causal=False, seed=0,
                     prep=None, views=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    mask = None
    if masked:
        mask = torch.rand(B, Hq, Tq, Tk, generator=g) < 0.7
        mask[1, 0, 2] = False  # an empty row
        mask[0, :, :, 6] = False  # key 6 of batch 0: padding
        mask[0, :, :, 5] = False  # key 5 of batch 0: seen by row (0, 1, 4) only
        mask[0, 1, 4, 5] = True
    tau = (torch.rand(B, Hq, Tq, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    Dv = Dv or D
    x = dict(q=rnd(B, Hq, Tq, D), k=rnd(B, Hkv, Tk, D), v=rnd(B, Hkv, Tk, Dv), tau=tau, mask=mask,
             causal=causal, gout=rnd(B, Hq, Tq, Dv), glse=rnd(B, Hq, Tq).to(acc_of(dtype)), views=views)
    if prep is not None:  # finite data a case needs, in the clean run too
        prep(x, dtype)
    return x


def _tiny_tau(dtype):
    # positive, finite, but scale / tau overflows the compute dtype (scale = 1/sqrt(8) here)
    return 1e-39 if dtype == torch.float32 else 1e-309


def _underflowing_key(x, dtype):
    """Key 2 of (b=0, kv head 0) scores so low for query 0 that its weight is exactly 0 (finite data)."""
    q0 = x["q"][0, 0, 0].double()
    x["k"][0, 0, 2] = (-(5000.0 if dtype == torch.float64 else 1000.0) * q0 / q0.dot(q0)).to(dtype)


def _positive_k0(x, dtype):
    x["k"][..., 0] = x["k"][..., 0].abs() + 0.5  # every score of a row with q[..., 0] = -inf is -inf


CASES = {  # name -> (attention_inputs kwargs, in-place edit making the inputs hostile)
    "q_nan": (dict(), lambda x, dt: x["q"][0, 1, 3].__setitem__(2, NAN)),
    "q_neginf_all_scores_neginf": (dict(masked=False, prep=_positive_k0),
                                   lambda x, dt: x["q"][0, 0, 1].__setitem__(0, -INF)),
    "empty_row_nan_q_nan_tau": (dict(), lambda x, dt: (x["q"][1, 0, 2].fill_(NAN), x["tau"][1, 0].__setitem__(2, NAN))),
    "k_nan_allowed_for_one_row": (dict(), lambda x, dt: x["k"][0, 1, 5].__setitem__(3, NAN)),
    "k_inf_allowed": (dict(), lambda x, dt: x["k"][1, 0, 1].__setitem__(0, INF)),
    "kv_nonfinite_masked": (dict(), lambda x, dt: (x["k"][0, 0, 6].fill_(NAN), x["v"][0, 0, 6].fill_(NAN),
                                                   x["k"][0, 1, 6].__setitem__(0, INF),
                                                   x["v"][0, 1, 6].__setitem__(0, -INF))),
    "v_neginf_allowed": (dict(), lambda x, dt: x["v"][1, 1, 3].__setitem__(2, -INF)),
    "v_posinf_allowed": (dict(), lambda x, dt: x["v"][1, 1, 3].__setitem__(2, INF)),
    "v_nan_allowed": (dict(), lambda x, dt: x["v"][1, 1, 3].__setitem__(2, NAN)),
    "v_neginf_weight_underflows": (dict(masked=False, prep=_underflowing_key),
                                   lambda x, dt: x["v"][0, 0, 2].__setitem__(1, -INF)),
    "causal_future_keys": (dict(masked=False, causal=True),
                           lambda x, dt: (x["k"][0, 0, 6].fill_(NAN), x["v"][1, 1, 5].__setitem__(0, INF))),
    "tau_overflows_c": (dict(), lambda x, dt: x["tau"][0, 1].__setitem__(2, _tiny_tau(dt))),
    "tau_smallest_subnormal": (dict(masked=False), lambda x, dt: x["tau"][1, 1].__setitem__(0, 5e-324)),
    "grad_out_nonfinite": (dict(), lambda x, dt: (x["gout"][0, 1, 2].__setitem__(0, NAN),
                                                  x["glse"][1, 1].__setitem__(3, INF))),
    "grad_out_nonfinite_on_empty_row": (dict(), lambda x, dt: (x["gout"][1, 0, 2].__setitem__(1, -INF),
                                                               x["glse"][1, 0].__setitem__(2, NAN))),
    "views_dv_differs": (dict(Dv=5, views=True), lambda x, dt: (x["k"][1, 1, 4].__setitem__(7, NAN),
                                                                x["v"][0, 0, 6].__setitem__(4, INF),
                                                                x["q"][1, 0, 0].__setitem__(0, NAN))),
    "gqa_k_inf": (dict(B=1, Hq=4, Hkv=2, masked=False), lambda x, dt: x["k"][0, 1, 3].fill_(INF)),
    "gqa_masked_v_nan": (dict(B=1, Hq=4, Hkv=2, causal=True, masked=False),
                         lambda x, dt: (x["v"][0, 0, 6].fill_(NAN), x["q"][0, 3, 0].__setitem__(0, NAN))),
}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", list(CASES))
def test_attention_nonfinite(case, dtype):
    kwargs, edit = CASES[case]
    clean = attention_inputs(dtype, **kwargs)
    x = {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in clean.items()}
    edit(x, dtype)
    B, Hq, Tq, D = x["q"].shape
    Tk = x["k"].shape[2]
    allowed = torch.ones(B, Hq, Tq, Tk, dtype=torch.bool)
    if x["causal"]:
        allowed &= torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    if x["mask"] is not None:
        allowed &= x["mask"]
    rows, grad_rows, keys = rule(x["q"], x["k"], x["v"], x["tau"], allowed, 1 / math.sqrt(D), x["gout"], x["glse"])
    harmless = ("kv_nonfinite_masked", "empty_row_nan_q_nan_tau", "grad_out_nonfinite_on_empty_row")
    assert bool(rows.any() or grad_rows.any()) != (case in harmless)
    nan_at = [rows[..., None], rows, grad_rows[..., None], keys[..., None], keys[..., None], grad_rows]
    names = ["out", "lse", "dq", "dk", "dv", "dtau"]
    got = attention_run(x)
    expected = attention_run(x, attn_ops._reference_forward, attn_ops._reference_backward)
    baseline = attention_run(clean)
    for name, a, e, b, where in zip(names, got, expected, baseline, nan_at):
        exact_outside(a, b, where, name)
        assert torch.equal(e.isnan(), where.expand(e.shape)), f"reference {name}"
        close(a, e, dtype)
    empty = ~allowed.any(-1)
    assert torch.equal(got[0][empty], torch.zeros_like(got[0][empty]))
    assert bool((got[1][empty] == -INF).all()) and bool((got[2][empty] == 0).all())


_SPOTS = st.tuples(st.sampled_from(["q", "k", "v", "tau", "gout", "glse"]), st.integers(0, 10**6),
                   st.sampled_from([NAN, INF, -INF]))


@settings(max_examples=12 if INTERPRETER else 40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spots=st.lists(_SPOTS, min_size=1, max_size=3), causal=st.booleans(), masked=st.booleans(),
       gqa=st.booleans(), dtype=st.sampled_from(FLOATS), seed=st.integers(0, 3))
def test_attention_nonfinite_fuzz(spots, causal, masked, gqa, dtype, seed):
    """NaN/±Inf at random places of any input: NaNs exactly where the rule puts them, on the backend
    under test and on the reference, and the rest bit for bit a clean run's."""
    clean = attention_inputs(dtype, Hq=4 if gqa else 2, causal=causal, masked=masked, seed=seed)
    _check_spots(clean, spots)


@settings(max_examples=8 if INTERPRETER else 30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spots=st.lists(_SPOTS, min_size=1, max_size=3), padded=st.booleans(), gqa=st.booleans(),
       dtype=st.sampled_from(FLOATS), seed=st.integers(0, 3))
def test_decode_step_nonfinite_fuzz(spots, padded, gqa, dtype, seed):
    """A decode step (Tq = 1, no mask or a key-padding mask): on the Triton backend it runs through the
    paged kernels (triton_kernels/temperature_attention_decode.py); the rule holds there too."""
    Hq = 4 if gqa else 2
    clean = attention_inputs(dtype, Hq=Hq, Tq=1, masked=False, seed=seed)
    if padded:
        keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
        keep[0, ..., 5:] = False  # row 0: two padded keys
        keep[1, ..., seed] = False
        clean["mask"] = keep.expand(2, Hq, 1, 7)
    _check_spots(clean, spots)


def _check_spots(clean, spots):
    """NaN/Inf written at ``spots`` of the clean inputs: the rule's NaNs on the backend and the reference."""
    causal, dtype = clean["causal"], clean["q"].dtype
    # (the mask is shared, not cloned: a clone of an expanded key-padding mask would be a per-head mask,
    # which a decode step serves with another kernel, and the finite parts are compared bit for bit)
    x = {n: (t.clone() if isinstance(t, torch.Tensor) and n != "mask" else t) for n, t in clean.items()}
    for name, at, value in spots:
        flat = x[name].view(-1)
        flat[at % flat.numel()] = value
    B, Hq, Tq, D = x["q"].shape
    Tk = x["k"].shape[2]
    allowed = torch.ones(B, Hq, Tq, Tk, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    if x["mask"] is not None:
        allowed &= x["mask"]
    rows, grad_rows, keys = rule(x["q"], x["k"], x["v"], x["tau"], allowed, 1 / math.sqrt(D), x["gout"], x["glse"])
    nan_at = [rows[..., None], rows, grad_rows[..., None], keys[..., None], keys[..., None], grad_rows]
    got = attention_run(x)
    expected = attention_run(x, attn_ops._reference_forward, attn_ops._reference_backward)
    baseline = attention_run(clean)
    for name, a, e, b, where in zip(["out", "lse", "dq", "dk", "dv", "dtau"], got, expected, baseline, nan_at):
        exact_outside(a, b, where, name)
        assert torch.equal(e.isnan(), where.expand(e.shape)), f"reference {name}"
        close(a, e, dtype)


def test_no_key_at_all_with_nan_everywhere():
    x = attention_inputs(torch.float32, Tk=0, masked=False)
    x["q"].fill_(NAN)
    x["tau"].fill_(NAN)
    out, lse, dq, dk, dv, dtau = attention_run(x)
    assert bool((out == 0).all()) and bool((lse == -INF).all()) and bool((dq == 0).all()) and bool((dtau == 0).all())


# ---------------------------------------------------------------- paged_temperature_attention
def paged_inputs(dtype, long_row=False, seed=1):
    """Pools with dead slots, a page no row lists, an empty row; q (B=3, Hq=4, n=2), Hkv=2 (GQA)."""
    g = torch.Generator().manual_seed(seed)
    if long_row:  # > 256 keys in row 0: the C++ kernel splits it into chunks, the Triton one too
        P, S, MP = 44, 8, 40
        table = torch.full((3, MP), -1, dtype=torch.long)
        table[0] = torch.arange(MP)
        table[1, :3] = torch.tensor([40, 41, 42])
        live = torch.rand(P, S, generator=g) < 0.95
    else:
        P, S, MP = 6, 4, 3
        table = torch.tensor([[0, 2, -1], [1, 3, 4], [-1, -1, -1]])
    Hkv, D = 2, 8
    if not long_row:
        live = torch.rand(P, S, generator=g) < 0.75
    live[:, 0] = True
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    tau = (torch.rand(3, 4, 2, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return dict(q=rnd(3, 4, 2, D), k_pool=rnd(P, S, Hkv, D), v_pool=rnd(P, S, Hkv, D), page_table=table,
                live_pool=live, tau=tau, slots=None)


def paged_rule(x):
    """NaN rows (B, Hq, n) by the rule: keys of row b = live slots of its listed pages (or slots)."""
    q, kp, vp, table, live, tau, slots = (x[n] for n in ("q", "k_pool", "v_pool", "page_table", "live_pool",
                                                        "tau", "slots"))
    B, Hq, n, D = q.shape
    S, Hkv = kp.shape[1], kp.shape[2]
    rows = torch.zeros(B, Hq, n, dtype=torch.bool)
    t = tau.to(acc_of(q.dtype))
    c = torch.full((), 1 / math.sqrt(D), dtype=t.dtype) / t
    c_bad = ~((t > 0) & t.isfinite() & c.isfinite())
    for b in range(B):
        logical = range(table.shape[1] * S) if slots is None else [int(j) for j in slots[b]]
        keys = [(int(table[b, j // S]), j % S) for j in logical if 0 <= j < table.shape[1] * S]
        keys = [(p, s) for p, s in keys if p >= 0 and bool(live[p, s])]
        if not keys:
            continue
        for h in range(Hq):
            hk = h // (Hq // Hkv)
            kv_bad = any(not bool(kp[p, s, hk].isfinite().all() and vp[p, s, hk].isfinite().all()) for p, s in keys)
            rows[b, h] = c_bad[b, h] | ~q[b, h].isfinite().all(-1) | kv_bad
    return rows


def _dead_slot(x):
    p, s = (~x["live_pool"]).nonzero()[0].tolist()
    return p, s


PAGED_CASES = {
    "dead_slot_and_unlisted_page": lambda x: (x["k_pool"].__setitem__(_dead_slot(x), NAN),
                                              x["v_pool"][5].fill_(INF), x["k_pool"][5].fill_(NAN)),
    "live_k_nan": lambda x: x["k_pool"][2, 0, 1].__setitem__(3, NAN),
    "live_v_neginf": lambda x: x["v_pool"][3, 0, 0].__setitem__(1, -INF),
    "live_v_posinf": lambda x: x["v_pool"][1, 0, 1].__setitem__(0, INF),
    "q_inf": lambda x: x["q"][0, 1, 1].__setitem__(3, INF),
    "empty_row_nan_q_nan_tau": lambda x: (x["q"][2].fill_(NAN), x["tau"][2].fill_(NAN)),
    "tau_subnormal": lambda x: x["tau"][1, 2].__setitem__(0, 1e-39 if x["q"].dtype == torch.float32 else 1e-309),
    "slots_skip_dead_and_out_of_range": lambda x: (
        x.__setitem__("slots", torch.tensor([[0, 99, -1, 4], [1, 5, -1, -7], [0, 1, 2, 3]])),
        x["k_pool"][2, 0].fill_(NAN),  # row 0's slot 4 is live: NaN
        x["v_pool"][3].fill_(NAN),  # row 1's slot 5 (page 3): not listed -> no effect unless listed
    ),
}


def paged_run(x, fn=None):
    args = [x[n] for n in ("q", "k_pool", "v_pool", "page_table", "live_pool", "tau", "slots")]
    return (fn or PAGED)(*args, None)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("case", list(PAGED_CASES) + ["long_row_v_nan", "long_row_dead_nan"])
def test_paged_nonfinite(case, dtype):
    clean = paged_inputs(dtype, long_row=case.startswith("long_row"))
    x = {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in clean.items()}
    if case == "long_row_v_nan":
        x["v_pool"][38, 0, 1, 2] = NAN  # about key 290 of row 0: past the first chunk
    elif case == "long_row_dead_nan":
        x["k_pool"].masked_fill_(~x["live_pool"][..., None, None], NAN)
        x["v_pool"].masked_fill_(~x["live_pool"][..., None, None], -INF)
    else:
        PAGED_CASES[case](x)
    clean["slots"] = x["slots"]
    rows = paged_rule(x)
    out, lse = paged_run(x)
    e_out, e_lse = paged_run(x, paged_ops._reference)
    b_out, b_lse = paged_run(clean)
    for name, a, e, b, where in (("out", out, e_out, b_out, rows[..., None]), ("lse", lse, e_lse, b_lse, rows)):
        exact_outside(a, b, where, name)
        assert torch.equal(e.isnan(), where.expand(e.shape)), f"reference {name}"
        close(a, e, dtype)
    empty = (x["page_table"][:3] < 0).all(-1)
    assert bool((out[empty] == 0).all()) and bool((lse[empty] == -INF).all())


def test_paged_corrupt_page_table_raises_on_cpu_and_is_flagged_by_the_reference():
    # issue 20, item 2: an entry past the pool (or below -1) is an IndexError naming page_table on every
    # CPU backend; the reference function (the semantics the CUDA kernel follows without a host check)
    # reads it as no page and makes the rows whose keys lie on it NaN
    from trajops import reference as R

    c = trajops.PagedTrajectoryKVCache(1, 8, 4, 1, 4, 3, 2, 8)
    k = torch.randn(2, 1, 2, 4)
    c.append(0, k, k, torch.randn(2, 3))
    q, tau = torch.randn(2, 1, 1, 4), torch.ones(())
    for bad in (10**6, 8, -2):
        pt = c.page_table.clone()
        pt[0, 1] = bad
        with pytest.raises(IndexError, match=rf"page_table\[0, 1\] = {bad} is not a page of the pool \(P=8\)"):
            torch.ops.trajops.paged_temperature_attention(q, c.k_pool[0], c.v_pool[0], pt, c.live_pool, tau, None, None)
        out, lse = R.paged_temperature_attention(q, c.k_pool[0], c.v_pool[0], pt, c.live_pool, tau)
        clean, clean_lse = R.paged_temperature_attention(q, c.k_pool[0], c.v_pool[0], c.page_table, c.live_pool, tau)
        assert bool(out[0].isnan().all()) and bool(lse[0].isnan().all())
        assert torch.equal(out[1], clean[1]) and torch.equal(lse[1], clean_lse[1])
        # with slots, only a listed slot on the corrupt page flags the row
        slots = torch.tensor([[0, 1], [0, 1]])  # page entry 0 only
        out, _ = R.paged_temperature_attention(q, c.k_pool[0], c.v_pool[0], pt, c.live_pool, tau, slots)
        assert not bool(out.isnan().any())


@pytest.mark.skipif(not INTERPRETER, reason="the Triton kernel itself runs only under TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_triton_kernel_flags_corrupt_pages_without_reading_them(num_splits):
    from trajops.triton_kernels import paged_temperature_attention as kernels

    c = trajops.PagedTrajectoryKVCache(1, 8, 2, 1, 4, 3, 2, 8)
    k = torch.randn(2, 1, 5, 4)
    c.append(0, k, k, torch.randn(2, 3))
    pt = c.page_table.clone()
    pt[0, 1] = 10**12  # far outside the pool: an unmasked read would fault
    q, tau = torch.randn(2, 1, 1, 4), torch.ones(())
    out, lse = kernels.paged_attention(q, c.k_pool[0], c.v_pool[0], pt, c.live_pool, tau, 0.5, None,
                                       num_splits=num_splits)
    assert bool(out[0].isnan().all()) and bool(lse[0].isnan().all())
    want, want_lse = torch.ops.trajops.paged_temperature_attention(q, c.k_pool[0], c.v_pool[0], c.page_table,
                                                                   c.live_pool, tau, None, 0.5)
    torch.testing.assert_close(out[1], want[1])
    torch.testing.assert_close(lse[1], want_lse[1])
