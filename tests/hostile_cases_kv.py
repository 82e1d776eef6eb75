"""Hostile cases of the raw KV cache ops that read the cache: kv_relevance, kv_topk, and kv_write_.

The state comes from a real trajops.PagedTrajectoryKVCache (2 rows of 2 tokens each, 8 pages of 4
slots, traj_dim 3); each case corrupts a clone of one argument and calls the raw op. Corrupt state
must raise an error naming the argument (on CPU the ops check what they index); valid but extreme
values must give the reference's result (the README promises the KV ops agree bit for bit).
"""
from __future__ import annotations

import math

import torch

import trajops
from hostile_cases import ANY_ERROR, RESULT, check, check_shape, either, noncontiguous, raises, register, same
from trajops import reference as R

P, S, DT, MP = 8, 4, 3, 2  # pages, page size, traj_dim, pages per row (capacity 8)
L = MP * S
STATE = ("traj_pool", "ts_pool", "live_pool", "pinned_pool", "page_table", "live_count", "capacity", "free_pages",
         "free_top", "evicted_total", "now", "pos_pool", "next_position")
ALPHA, DECAY = 0.7, 0.1
OPS = "torch.ops.trajops."


def cache() -> trajops.PagedTrajectoryKVCache:
    """The issue's reproducer state, one clock step later: rows 0 and 1 hold 2 live tokens each."""
    c = trajops.PagedTrajectoryKVCache(1, P, S, 1, 4, DT, 2, L)
    k = torch.randn(2, 1, 2, 4)
    c.append(0, k, k, torch.randn(2, DT))
    c.step()
    return c


def state(c=None) -> dict:
    c = c or cache()
    return {name: getattr(c, name).clone() for name in STATE}


def clone(st: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}


def relevance(st, query, alpha=ALPHA, decay=DECAY, fn=None):
    fn = fn or torch.ops.trajops.kv_relevance
    return fn(st["traj_pool"], st["ts_pool"], st["live_pool"], st["page_table"], query, st["now"], alpha, decay)


def topk(st, query, k, alpha=ALPHA, decay=DECAY, fn=None):
    fn = fn or torch.ops.trajops.kv_topk
    return fn(st["traj_pool"], st["ts_pool"], st["live_pool"], st["page_table"], query, st["now"], alpha, decay, k)


def check_padding_last(slots: torch.Tensor) -> None:
    # -1 pads the end of a top-k row, never sits in front of a valid slot (issue 20, item 6)
    for row in slots.tolist():
        tail = row[row.index(-1):] if -1 in row else []
        check(all(s == -1 for s in tail), f"kv_topk: -1 before a valid slot in {row}")


# ---------------------------------------------------------------- kv_relevance / kv_topk
def _read_case(name, mutate, expect, compare=None, k=3):
    """One case per read op: mutate(st) -> query; compare in ("reference", "contiguous", None)."""
    for op in ("kv_relevance", "kv_topk"):
        def fn(op=op):
            st = state()
            query = mutate(st)
            if op == "kv_relevance":
                got = relevance(st, query)
                check_shape(got, (query.shape[0], st["page_table"].shape[-1] * S), "kv_relevance")
            else:
                got = topk(st, query, k)
                check_shape(got[0], (query.shape[0], k), "kv_topk slots")
                check_padding_last(got[0])
            if compare == "reference":
                want = relevance(st, query, fn=R.kv_relevance) if op == "kv_relevance" else \
                    topk(st, query, k, fn=R.kv_topk)
                for g, w in zip(got if op == "kv_topk" else (got,), want if op == "kv_topk" else (want,)):
                    same(g, w, f"{op} vs the reference")
            elif compare == "contiguous":
                st2 = {n: t.contiguous() for n, t in st.items()}
                want = relevance(st2, query.contiguous()) if op == "kv_relevance" else topk(st2, query.contiguous(), k)
                for g, w in zip(got if op == "kv_topk" else (got,), want if op == "kv_topk" else (want,)):
                    same(g, w, f"{op} on non-contiguous inputs vs contiguous")
        register(f"{op}.{name}", fn, expect, OPS + op)


def _q(B=2, dt=DT):
    return torch.randn(B, dt)


def _set(key, idx, value):
    def mutate(st):
        st[key][idx] = value
        return _q()
    return mutate


def _replace(key, make, query=None):
    def mutate(st):
        st[key] = make(st[key])
        return _q() if query is None else query()
    return mutate


PT = ("page_table",)
QUERY = ("query", "trajectories")
_read_case("issue_reproducer", _set("page_table", (0, 1), 10**6), raises(*PT))
_read_case("page_table_eq_num_pages", _set("page_table", (1, 1), P), raises(*PT))
_read_case("page_table_below_minus1", _set("page_table", (0, 1), -2), raises(*PT))
_read_case("page_table_int64_min", _set("page_table", (0, 0), -2**63), raises(*PT))
_read_case("page_table_int64_max", _set("page_table", (0, 0), 2**63 - 1), raises(*PT))
_read_case("page_table_int32", _replace("page_table", lambda t: t.int()), raises(*PT, also=("torch.int32",)))
_read_case("page_table_float", _replace("page_table", lambda t: t.float()), raises(*PT))
_read_case("page_table_bool", _replace("page_table", lambda t: t >= 0), raises(*PT))
_read_case("page_table_1d", _replace("page_table", lambda t: t[0]), raises(*PT))
_read_case("page_table_3d", _replace("page_table", lambda t: t[None]), raises(*PT))
_read_case("page_table_fewer_rows_than_query", _replace("page_table", lambda t: t[:1]), raises(*PT, *QUERY))
_read_case("page_table_noncontiguous", _replace("page_table", lambda t: t.t().contiguous().t()), RESULT,
           compare="contiguous")
_read_case("page_table_zero_columns", _replace("page_table", lambda t: t[:, :0]), RESULT, compare="reference")
_read_case("query_3d", lambda st: torch.randn(2, 1, DT), raises(*QUERY))
_read_case("query_1d", lambda st: torch.randn(DT), raises(*QUERY))
_read_case("query_wrong_traj_dim", lambda st: torch.randn(2, DT + 1), raises(*QUERY))
_read_case("query_int64", lambda st: torch.ones(2, DT, dtype=torch.long), either(*QUERY))
_read_case("query_float64", lambda st: torch.randn(2, DT, dtype=torch.float64), either(*QUERY), compare="reference")
_read_case("query_batch0", lambda st: torch.randn(0, DT), RESULT, compare="reference")
_read_case("query_noncontiguous", lambda st: torch.randn(2, 2 * DT)[:, ::2], RESULT, compare="contiguous")
_read_case("query_nan_row", lambda st: torch.stack([torch.randn(DT), torch.full((DT,), math.nan)]), RESULT,
           compare="reference")
_read_case("query_inf", lambda st: torch.tensor([[math.inf, 0.0, 1.0], [-math.inf, math.inf, 0.0]]), RESULT,
           compare="reference")
_read_case("query_zero", lambda st: torch.zeros(2, DT), RESULT, compare="reference")
_read_case("query_huge", lambda st: torch.full((2, DT), 3e38), RESULT, compare="reference")
_read_case("stored_nan_entry", _set("traj_pool", (0, 1), math.nan), RESULT, compare="reference", k=4)
_read_case("stored_inf_entry", _set("traj_pool", (1, 0), math.inf), RESULT, compare="reference", k=4)
_read_case("traj_pool_float64", _replace("traj_pool", lambda t: t.double()), raises("traj_pool"))
_read_case("traj_pool_2d", _replace("traj_pool", lambda t: t.reshape(P * S, DT)), raises("traj_pool"))
_read_case("traj_pool_noncontiguous", _replace("traj_pool", noncontiguous), RESULT,
           compare="contiguous")
_read_case("traj_pool_traj_dim0", _replace("traj_pool", lambda t: t[..., :0], query=lambda: torch.randn(2, 0)),
           either("traj_pool", *QUERY))
_read_case("ts_pool_short", _replace("ts_pool", lambda t: t[:-1]), raises("ts_pool"))
_read_case("ts_pool_int32", _replace("ts_pool", lambda t: t.int()), raises("ts_pool"))
_read_case("ts_pool_int64_min", _set("ts_pool", (0, 0), -2**63), either("ts_pool"))
_read_case("live_pool_uint8", _replace("live_pool", lambda t: t.to(torch.uint8)), raises("live_pool"))
_read_case("live_pool_short", _replace("live_pool", lambda t: t[:, :-1]), raises("live_pool"))
_read_case("now_float", _replace("now", lambda t: t.double()), raises("now"))
_read_case("now_int32", _replace("now", lambda t: t.int()), raises("now"))
_read_case("now_two_elements", _replace("now", lambda t: t.expand(2).clone()), raises("now"))
_read_case("now_int64_max", _replace("now", lambda t: torch.full_like(t, 2**63 - 1)), either("now"))
_read_case("now_int64_min", _replace("now", lambda t: torch.full_like(t, -2**63)), either("now"))


def _param_case(name, alpha, decay):
    for op in ("kv_relevance", "kv_topk"):
        def fn(op=op):
            st = state()
            query = _q()
            if op == "kv_relevance":
                same(relevance(st, query, alpha, decay), relevance(st, query, alpha, decay, fn=R.kv_relevance),
                     "kv_relevance vs the reference")
            else:
                got, want = topk(st, query, 4, alpha, decay), topk(st, query, 4, alpha, decay, fn=R.kv_topk)
                check_padding_last(got[0])
                same(got[0], want[0], "kv_topk slots vs the reference")
                same(got[1], want[1], "kv_topk scores vs the reference")
        register(f"{op}.{name}", fn, either("alpha", "decay"), OPS + op)


_param_case("alpha_nan", math.nan, DECAY)
_param_case("alpha_inf", math.inf, DECAY)
_param_case("decay_nan", ALPHA, math.nan)
_param_case("decay_inf", ALPHA, math.inf)
_param_case("decay_huge_negative", ALPHA, -1e308)


def _topk_k(name, k, expect):
    def fn():
        st, query = state(), _q()
        slots, scores = topk(st, query, k)
        want = topk(st, query, k, fn=R.kv_topk)
        same(slots, want[0], "kv_topk slots vs the reference")
        same(scores, want[1], "kv_topk scores vs the reference")
    register(f"kv_topk.{name}", fn, expect, OPS + "kv_topk")


_topk_k("k_negative", -1, raises("k"))
_topk_k("k_int64_min", -2**63, raises("k"))
_topk_k("k_2pow62", 2**62, raises("k", types=ANY_ERROR))
_topk_k("k_int64_max", 2**63 - 1, raises("k", types=ANY_ERROR))
_topk_k("k_zero", 0, RESULT)
_topk_k("k_above_slots", L + 3, RESULT)


# ---------------------------------------------------------------- kv_write_
def _write_args():
    c = cache()
    kp, vp = c.k_pool[0].clone(), c.v_pool[0].clone()
    written = torch.tensor([[8, 9], [12, 13]])  # free physical slots of pages 2 and 3
    k, v = torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4)
    return {"k_pool": kp, "v_pool": vp, "written": written, "k": k, "v": v}


def _write_case(name, mutate, expect, compare=True):
    def fn():
        a = _write_args()
        mutate(a)
        b = {n: t.clone() for n, t in a.items()}
        torch.ops.trajops.kv_write_(a["k_pool"], a["v_pool"], a["written"], a["k"], a["v"])
        if compare:
            R.kv_write_(b["k_pool"], b["v_pool"], b["written"], b["k"], b["v"])
            same(a["k_pool"], b["k_pool"], "k_pool after kv_write_ vs the reference")
            same(a["v_pool"], b["v_pool"], "v_pool after kv_write_ vs the reference")
    register(f"kv_write_.{name}", fn, expect, OPS + "kv_write_")


def _wset(idx, value):
    def mutate(a):
        a["written"][idx] = value
    return mutate


def _wrep(key, make):
    def mutate(a):
        a[key] = make(a[key])
    return mutate


W = ("written",)
_write_case("written_eq_num_slots", _wset((0, 0), P * S), raises(*W))
_write_case("written_huge", _wset((1, 1), 10**6), raises(*W))
_write_case("written_below_minus1", _wset((0, 1), -2), raises(*W))
_write_case("written_int64_max", _wset((0, 0), 2**63 - 1), raises(*W))
_write_case("written_int64_min", _wset((0, 0), -2**63), raises(*W))
_write_case("written_int32", _wrep("written", lambda t: t.int()), raises(*W, also=("torch.int32",)))
_write_case("written_float", _wrep("written", lambda t: t.float()), raises(*W))
_write_case("written_bool", _wrep("written", lambda t: t > 0), raises(*W))
_write_case("written_1d", _wrep("written", lambda t: t.reshape(-1)), raises(*W))
_write_case("written_3d", _wrep("written", lambda t: t[None]), raises(*W))
_write_case("written_more_tokens_than_k", _wrep("written", lambda t: torch.tensor([[8, 9, 10], [12, 13, 14]])),
            raises("k", "v", *W))
_write_case("k_wrong_shape", _wrep("k", lambda t: t[:, :, :1]), raises("k", "v"))
_write_case("v_wrong_shape", _wrep("v", lambda t: t[..., :3]), raises("k", "v"))
_write_case("k_float64_cast_to_pool", _wrep("k", lambda t: t.double()), RESULT)
_write_case("k_int64", _wrep("k", lambda t: t.long()), either("k"))
_write_case("v_pool_other_shape", _wrep("v_pool", lambda t: t[:-1]), raises("v_pool", "k_pool"))
_write_case("v_pool_other_dtype", _wrep("v_pool", lambda t: t.double()), raises("v_pool", "k_pool"))
_write_case("k_pool_3d", _wrep("k_pool", lambda t: t[0]), raises("k_pool", "v_pool"))
_write_case("all_minus1", _wrep("written", lambda t: torch.full_like(t, -1)), RESULT)
_write_case("batch0", lambda a: a.update(written=a["written"][:0], k=a["k"][:0], v=a["v"][:0]), RESULT)
_write_case("n0", lambda a: a.update(written=a["written"][:, :0], k=a["k"][:, :, :0], v=a["v"][:, :, :0]), RESULT)
_write_case("k_nan_inf", lambda a: a["k"].view(-1)[:3].copy_(torch.tensor([math.nan, math.inf, -math.inf])), RESULT)
_write_case("k_noncontiguous", _wrep("k", lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)), RESULT)
_write_case("written_noncontiguous", _wrep("written", lambda t: t.t().contiguous().t()), RESULT)
_write_case("pools_noncontiguous", lambda a: a.update(k_pool=noncontiguous(a["k_pool"]),
                                                        v_pool=noncontiguous(a["v_pool"])),
            either("k_pool", "v_pool"))
_write_case("written_duplicate_slot", _wset((1, 1), 8), either(*W), compare=False)
_write_case("head_dim0", lambda a: a.update(k_pool=a["k_pool"][..., :0], v_pool=a["v_pool"][..., :0],
                                            k=a["k"][..., :0], v=a["v"][..., :0]), either("k_pool", "k"))
