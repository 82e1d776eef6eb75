"""Hostile cases of paged_temperature_attention (the raw op and the public function).

State: hostile_cases_kv.cache() (rows 0 and 1 with 2 live tokens each); q (2, 2 heads, 1, 4) over
one KV head. Corrupt page tables / pools raise naming the argument; slots that are -1, out of range
or dead are skipped (documented); the NaN rules are those of temperature_attention.
"""
from __future__ import annotations

import math

import torch

import trajops
from hostile_cases import RESULT, check, check_shape, either, raises, register, rows_nan, same
from hostile_cases_kv import MP, P, S, cache
from trajops.ops import paged_temperature_attention as _pta

OP, PUB = "torch.ops.trajops.paged_temperature_attention", "trajops.paged_temperature_attention"
TOL = 1e-5


def args(c=None) -> dict:
    c = c or cache()
    return {"q": torch.randn(2, 2, 1, 4), "k_pool": c.k_pool[0].clone(), "v_pool": c.v_pool[0].clone(),
            "page_table": c.page_table.clone(), "live_pool": c.live_pool.clone(), "tau": torch.tensor(1.0),
            "slots": None, "scale": None}


def call(a, fn=None):
    fn = fn or torch.ops.trajops.paged_temperature_attention
    new = (a["k_new"], a["v_new"]) if "k_new" in a else ()
    return fn(a["q"], a["k_pool"], a["v_pool"], a["page_table"], a["live_pool"], a["tau"], a["slots"], a["scale"],
              *new)


def with_new(a):
    """The new-token keys of the decode step (one per row, the one KV head)."""
    a.update(k_new=torch.randn(2, 1, 1, 4), v_new=torch.randn(2, 1, 1, 4))


def _case(name, fn, expect=RESULT, targets=(OP,)):
    register(f"paged_temperature_attention.{name}", fn, expect, *targets)


def _bad(name, edit, *names, also=()):
    def fn():
        a = args()
        edit(a)
        call(a)
    _case(name, fn, raises(*names, also=also))


def put(key, idx, value):
    return lambda a: a[key].__setitem__(idx, value)


def rep(key, make):
    return lambda a: a.__setitem__(key, make(a[key]))


PT = ("page_table",)
_bad("page_table_huge", put("page_table", (0, 1), 10**6), *PT)
_bad("page_table_eq_num_pages", put("page_table", (1, 1), P), *PT)
_bad("page_table_below_minus1", put("page_table", (0, 1), -2), *PT)
_bad("page_table_int64_min", put("page_table", (1, 0), -2**63), *PT)
_bad("page_table_int64_max", put("page_table", (1, 0), 2**63 - 1), *PT)
_bad("page_table_int32", rep("page_table", lambda t: t.int()), *PT, also=("torch.int32",))
_bad("page_table_fewer_rows", rep("page_table", lambda t: t[:1]), *PT)
_bad("page_table_1d", rep("page_table", lambda t: t[0]), *PT)
_bad("live_pool_short", rep("live_pool", lambda t: t[:-1]), "live_pool")
_bad("live_pool_uint8", rep("live_pool", lambda t: t.to(torch.uint8)), "live_pool")
_bad("slots_int32", lambda a: a.update(slots=torch.zeros(2, 2, dtype=torch.int32)), "slots", also=("torch.int32",))
_bad("slots_wrong_rows", lambda a: a.update(slots=torch.zeros(3, 2, dtype=torch.long)), "slots")
_bad("slots_1d", lambda a: a.update(slots=torch.zeros(2, dtype=torch.long)), "slots")
_bad("k_pool_float64", rep("k_pool", lambda t: t.double()), "k_pool", "q")
_bad("v_pool_other_pages", rep("v_pool", lambda t: t[:-1]), "v_pool")
_bad("heads_not_dividing", lambda a: a.update(q=torch.randn(2, 3, 1, 4), k_pool=torch.randn(P, S, 2, 4),
                                              v_pool=torch.randn(P, S, 2, 4)), "Hq", "Hkv", "q")
_bad("q_3d", rep("q", lambda t: t[0]), "q")
_bad("tau_int64", lambda a: a.update(tau=torch.tensor(1)), "tau")
_bad("tau_not_broadcastable", lambda a: a.update(tau=torch.ones(3, 1)), "tau")
for _name, _s in (("nan", math.nan), ("inf", math.inf), ("zero", 0.0), ("negative", -2.0)):
    _bad(f"scale_{_name}", lambda a, s=_s: a.update(scale=s), "scale")


def _skipped_slots(slots):
    def fn():
        a = args()
        a["slots"] = torch.as_tensor(slots)
        out, lse = call(a)
        check(bool((out == 0).all() and (lse == -math.inf).all()),
              f"slots {slots}: skipped (no key) -> out 0, lse -inf; got out {out.flatten().tolist()}, lse "
              f"{lse.flatten().tolist()}")
    return fn


_case("slots_out_of_range", _skipped_slots([[100, -5], [MP * S, -2]]))
_case("slots_int64_limits", _skipped_slots([[2**63 - 1, -2**63], [-2**63, 2**63 - 1]]))
_case("slots_dead", _skipped_slots([[2, 3], [7, 6]]))
_case("slots_zero_columns", _skipped_slots(torch.zeros(2, 0, dtype=torch.long)))


def _slots_mixed():
    a = args()
    a["slots"] = torch.tensor([[0, 2**62, 1], [-7, 1, MP * S + 1]])
    got = call(a)
    a["slots"] = torch.tensor([[0, 1], [1, -1]])
    want = call(a)
    same(got[0], want[0], "out: invalid slots are skipped", TOL)
    same(got[1], want[1], "lse: invalid slots are skipped", TOL)


_case("slots_mixed_valid_and_out_of_range", _slots_mixed)


def check_rows(got, clean, bad, what):
    out, lse = got
    check(bool(rows_nan(out, 1)[bad].all() and lse[bad].isnan().all()),
          f"{what}: the poisoned rows must be NaN, got out {out[bad].tolist()} lse {lse[bad].tolist()}")
    same(out[~bad], clean[0][~bad], f"{what}: out of the other rows vs a clean run", TOL)
    same(lse[~bad], clean[1][~bad], f"{what}: lse of the other rows vs a clean run", TOL)


def _poisoned(poison, bad_rows, slots=None):
    """poison(a) edits the arguments; bad_rows: the (b, h) rows that must become NaN."""
    def fn():
        a = args()
        a["tau"] = torch.ones(2, 2, 1)
        if slots is not None:
            a["slots"] = torch.tensor(slots)
        clean = call(a)
        poison(a)
        bad = torch.zeros(2, 2, 1, dtype=torch.bool)
        for b, h in bad_rows:
            bad[b, h] = True
        check_rows(call(a), clean, bad, "paged_temperature_attention")
    return fn


def _logical(a, b, j):
    """(page, offset) of row b's logical slot j."""
    return int(a["page_table"][b, j // S]), j % S


def _nan_key(a, b, j, pool="k_pool"):
    page, off = _logical(a, b, j)
    a[pool][page, off] = math.nan


_case("nan_query_row", _poisoned(lambda a: a["q"][1, 0, 0].fill_(math.nan), [(1, 0)]))
_case("only_key_nan", _poisoned(lambda a: _nan_key(a, 1, 0), [(1, 0), (1, 1)], slots=[[0, 1], [0, -1]]))
_case("dead_slot_nan_no_effect", _poisoned(lambda a: _nan_key(a, 0, 2) or _nan_key(a, 0, 3, "v_pool"), []))
_case("unowned_page_nan_no_effect", _poisoned(lambda a: a["k_pool"][P - 1].fill_(math.nan), []))
for _name, _t in (("nan", math.nan), ("subnormal", 1e-45), ("zero", 0.0), ("negative", -1.0), ("inf", math.inf)):
    _case(f"tau_{_name}_row", _poisoned(lambda a, t=_t: a["tau"].__setitem__((0, 1, 0), t), [(0, 1)]))


def _vs_reference(edit):
    def fn():
        a = args()
        edit(a)
        got = call(a)
        want = call(a, fn=_pta._reference)
        same(got[0], want[0], "out vs the reference", TOL)
        same(got[1], want[1], "lse vs the reference", TOL)
    return fn


_case("inf_key", _vs_reference(lambda a: a["k_pool"].__setitem__((*_logical(a, 0, 1), 0, 2), math.inf)))
_case("huge_logits", _vs_reference(lambda a: a.update(q=a["q"] * 1e20)))
_case("noncontiguous_q_and_tau", _vs_reference(lambda a: a.update(
    q=a["q"].transpose(0, 2).contiguous().transpose(0, 2), tau=torch.rand(2, 1, 1).expand(2, 2, 1) + 0.5)))
_case("shared_page_two_rows", _vs_reference(lambda a: a["page_table"].__setitem__((1, 1), int(a["page_table"][0, 0]))),
      either(*PT))


def _empty(edit, shape_out):
    def fn():
        a = args()
        edit(a)
        out, lse = call(a)
        check_shape(out, shape_out, "out")
        check_shape(lse, shape_out[:3], "lse")
        check(bool((out == 0).all() and (lse == -math.inf).all()), "rows without keys: out 0, lse -inf")
    return fn


_case("batch0", _empty(lambda a: a.update(q=torch.randn(0, 2, 1, 4)), (0, 2, 1, 4)))
_case("n0", _empty(lambda a: a.update(q=torch.randn(2, 2, 0, 4)), (2, 2, 0, 4)))
_case("no_live_entry", _empty(lambda a: a["live_pool"].zero_(), (2, 2, 1, 4)))
_case("page_table_zero_columns", _empty(lambda a: a.update(page_table=a["page_table"][:, :0]), (2, 2, 1, 4)))


# ---------------------------------------------------------------- the public function
def _public(layer, tau=1.0):
    c = cache()
    with torch.no_grad():
        return trajops.paged_temperature_attention(torch.randn(2, 2, 1, 4), c, layer, tau, return_lse=True)


# ---------------------------------------------------------------- new tokens (k_new / v_new)
_bad("new_keys_without_values", lambda a: with_new(a) or a.update(v_new=None), "k_new", "v_new")
_bad("new_keys_wrong_tokens", lambda a: with_new(a) or a.update(k_new=torch.randn(2, 1, 3, 4)), "k_new")
_bad("new_values_wrong_head_size", lambda a: with_new(a) or a.update(v_new=torch.randn(2, 1, 1, 7)), "v_new")
_bad("new_keys_int64", lambda a: with_new(a) or a.update(k_new=torch.zeros(2, 1, 1, 4, dtype=torch.long)), "k_new",
     also=("torch.int64",))
_bad("new_keys_huge_batch", lambda a: with_new(a) or a.update(k_new=torch.randn(1, 1, 1, 4).expand(2**40, 1, 1, 4)),
     "k_new")
_case("new_key_nan", _vs_reference(lambda a: with_new(a) or a["k_new"][1, 0, 0].fill_(math.nan)))
_case("new_value_inf", _vs_reference(lambda a: with_new(a) or a["v_new"][0, 0, 0, 1].fill_(math.inf)))
_case("new_keys_rows_without_live_entry", _vs_reference(lambda a: with_new(a) or a["live_pool"].zero_()))
_case("new_keys_nan_tau", _vs_reference(lambda a: with_new(a) or a.update(tau=torch.tensor(math.nan))))


_case("public_layer_int64_max", lambda: _public(2**63 - 1), raises("layer"), targets=(PUB,))
_case("public_layer_negative", lambda: _public(-1), raises("layer"), targets=(PUB,))


def _public_nan_tau():
    out, lse = _public(0, math.nan)
    check(bool(out.isnan().all() and lse.isnan().all()), "a NaN tau makes every row with keys NaN")


_case("public_nan_tau", _public_nan_tau, targets=(PUB,))
