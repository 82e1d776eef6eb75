"""Hostile cases of kv_evict_append_ (the raw op that mutates the cache) and of the cache classes.

kv_evict_append_ is called with 3 new tokens per row on the state of hostile_cases_kv.cache(), so
that each row needs a page from the free stack (a corrupt stack is then really read). Corrupt state
raises an error naming the argument; valid extreme inputs must give the reference's outputs and
state bit for bit.
"""
from __future__ import annotations

import math

import torch

import trajops
from hostile_cases import ANY_ERROR, RESULT, check, check_shape, either, noncontiguous, raises, register, same
from hostile_cases_kv import DT, L, P, S, cache, clone, state
from trajops import reference as R

N = 3
OP = "torch.ops.trajops.kv_evict_append_"
MUTATED = ("traj_pool", "ts_pool", "live_pool", "pinned_pool", "page_table", "live_count", "free_pages", "free_top",
           "evicted_total", "pos_pool", "next_position")


def evict(st, new_traj, lengths, pin=None, alpha=0.7, decay=0.1, fn=None, positions=True):
    """positions: pass the state's pos_pool / next_position (the optional trailing pair), as the store does."""
    fn = fn or torch.ops.trajops.kv_evict_append_
    pos = (st["pos_pool"], st["next_position"]) if positions else ()
    return fn(st["traj_pool"], st["ts_pool"], st["live_pool"], st["pinned_pool"], st["page_table"], st["live_count"],
              st["capacity"], st["free_pages"], st["free_top"], st["evicted_total"], st["now"], new_traj, lengths,
              pin, alpha, decay, *pos)


def compare_with_reference(st, new_traj, lengths, pin=None, alpha=0.7, decay=0.1, positions=True) -> None:
    """Runs the op and the reference on copies of st: same outputs and same state after."""
    a, b = clone(st), clone(st)
    got = evict(a, new_traj, lengths, pin, alpha, decay, positions=positions)
    want = evict(b, new_traj, lengths, pin, alpha, decay, fn=R.kv_evict_append_, positions=positions)
    for name, g, w in zip(("evicted", "written", "ok"), got, want):
        same(g, w, f"kv_evict_append_ {name} vs the reference")
    for name in MUTATED:
        same(a[name], b[name], f"kv_evict_append_ {name} after the call vs the reference")


def check_invariants(st) -> None:
    """What must hold after any successful call, whatever the values: every index stays in range."""
    pt, top = st["page_table"], int(st["free_top"])
    check(bool(((pt >= -1) & (pt < P)).all()), f"page_table entries out of [-1, {P}): {pt.tolist()}")
    check(0 <= top <= P, f"free_top out of [0, {P}]: {top}")
    check(bool(((st["free_pages"][:top] >= 0) & (st["free_pages"][:top] < P)).all()),
          f"free pages out of range: {st['free_pages'].tolist()}")
    check(bool(((st["live_count"] >= 0) & (st["live_count"] <= L)).all()), f"live_count: {st['live_count'].tolist()}")


def _case(name, mutate, expect, mode=None):
    """mutate(st, args) edits the state dict and/or args (new_traj, lengths, pin, alpha, decay) in place.
    mode: "reference" (compare everything with the reference), "invariants", or None."""
    def fn():
        st = state()
        args = {"new_traj": torch.randn(2, N, DT), "lengths": torch.full((2,), N), "pin": None,
                "alpha": 0.7, "decay": 0.1, "positions": True}
        mutate(st, args)
        if mode == "reference":
            compare_with_reference(st, **args)
            return
        evicted, written, ok = evict(st, **args)
        B, n = args["new_traj"].shape[0], args["new_traj"].shape[1]
        check_shape(evicted, (B, n), "evicted")
        check_shape(written, (B, n), "written")
        if mode == "invariants":
            check_invariants(st)
    register(f"kv_evict_append_.{name}", fn, expect, OP)


def put(key, idx, value):
    return lambda st, a: st[key].__setitem__(idx, value)


def rep(key, make):
    return lambda st, a: st.__setitem__(key, make(st[key]))


def arg(key, make):
    return lambda st, a: a.__setitem__(key, make(a[key]))


TRAJ = ("new_traj", "trajectories")
_case("page_table_huge", put("page_table", (0, 0), 10**6), raises("page_table"))
_case("page_table_eq_num_pages", put("page_table", (1, 0), P), raises("page_table"))
_case("page_table_below_minus1", put("page_table", (0, 1), -2), raises("page_table"))
_case("page_table_int64_min", put("page_table", (0, 1), -2**63), raises("page_table"))
_case("page_table_int32", rep("page_table", lambda t: t.int()), raises("page_table", also=("torch.int32",)))
_case("page_table_1d", rep("page_table", lambda t: t[0]), raises("page_table"))
_case("page_table_fewer_rows", rep("page_table", lambda t: t[:1]), raises("page_table", *TRAJ))
_case("free_top_above_num_pages", rep("free_top", lambda t: torch.full_like(t, P + 1)), raises("free_top"))
_case("free_top_int64_max", rep("free_top", lambda t: torch.full_like(t, 2**63 - 1)), raises("free_top"))
_case("free_top_negative", rep("free_top", lambda t: torch.full_like(t, -1)), raises("free_top"))
_case("free_top_int64_min", rep("free_top", lambda t: torch.full_like(t, -2**63)), raises("free_top"))
_case("free_top_1d", rep("free_top", lambda t: t.reshape(1)), raises("free_top"))
_case("free_top_int32", rep("free_top", lambda t: t.int()), raises("free_top"))
_case("free_pages_short", rep("free_pages", lambda t: t[:-1]), raises("free_pages"))
_case("free_pages_empty", rep("free_pages", lambda t: t[:0]), raises("free_pages", "free_top"))
_case("free_pages_top_eq_num_pages", lambda st, a: st["free_pages"].__setitem__(int(st["free_top"]) - 1, P),
      raises("free_pages"))
_case("free_pages_top_huge", lambda st, a: st["free_pages"].__setitem__(int(st["free_top"]) - 1, 10**9),
      raises("free_pages"))
_case("free_pages_top_negative", lambda st, a: st["free_pages"].__setitem__(int(st["free_top"]) - 1, -1),
      raises("free_pages"))
_case("free_pages_int32", rep("free_pages", lambda t: t.int()), raises("free_pages"))
_case("lengths_short", arg("lengths", lambda t: t[:1]), raises("lengths"))
_case("lengths_above_n", arg("lengths", lambda t: torch.tensor([N + 1, N])), raises("lengths"))
_case("lengths_negative", arg("lengths", lambda t: torch.tensor([-1, N])), raises("lengths"))
_case("lengths_int64_max", arg("lengths", lambda t: torch.tensor([2**63 - 1, N])), raises("lengths"))
_case("lengths_int64_min", arg("lengths", lambda t: torch.tensor([N, -2**63])), raises("lengths"))
_case("lengths_int32", arg("lengths", lambda t: t.int()), raises("lengths", also=("torch.int32",)))
_case("lengths_float", arg("lengths", lambda t: t.float()), raises("lengths"))
_case("lengths_2d", arg("lengths", lambda t: t[None]), raises("lengths"))
_case("capacity_short", rep("capacity", lambda t: t[:1]), raises("capacity"))
_case("capacity_negative", rep("capacity", lambda t: torch.tensor([-1, L])), raises("capacity"))
_case("capacity_int64_min", rep("capacity", lambda t: torch.tensor([L, -2**63])), raises("capacity"))
_case("capacity_int32", rep("capacity", lambda t: t.int()), raises("capacity"))
_case("capacity_above_slots", rep("capacity", lambda t: torch.tensor([L + 5, L])), either("capacity"), "invariants")
_case("capacity_int64_max", rep("capacity", lambda t: torch.tensor([2**63 - 1, 2**63 - 1])), either("capacity"),
      "invariants")
_case("live_count_short", rep("live_count", lambda t: t[:1]), raises("live_count"))
_case("live_count_negative", rep("live_count", lambda t: torch.tensor([-1, 2])), raises("live_count"))
_case("live_count_2pow62", rep("live_count", lambda t: torch.tensor([2**62, 2])), raises("live_count"))
_case("live_count_int32", rep("live_count", lambda t: t.int()), raises("live_count"))
_case("live_count_inconsistent", rep("live_count", lambda t: torch.tensor([7, 2])), either("live_count"),
      "invariants")
_case("evicted_total_short", rep("evicted_total", lambda t: t[:1]), raises("evicted_total"))
_case("evicted_total_int32", rep("evicted_total", lambda t: t.int()), raises("evicted_total"))
_case("evicted_total_int64_max", rep("evicted_total", lambda t: torch.full_like(t, 2**63 - 1)),
      either("evicted_total"), "invariants")
_case("pin_short", arg("pin", lambda _: torch.zeros(1, N, dtype=torch.bool)), raises("pin"))
_case("pin_wrong_columns", arg("pin", lambda _: torch.zeros(2, N + 1, dtype=torch.bool)), raises("pin"))
_case("pin_1d", arg("pin", lambda _: torch.zeros(2, dtype=torch.bool)), raises("pin"))
_case("pin_int64", arg("pin", lambda _: torch.ones(2, N, dtype=torch.long)), either("pin"))
_case("pin_float", arg("pin", lambda _: torch.ones(2, N)), either("pin"))
_case("new_traj_2d", arg("new_traj", lambda t: t[:, 0]), raises(*TRAJ))
_case("new_traj_4d", arg("new_traj", lambda t: t[None]), raises(*TRAJ))
_case("new_traj_wrong_traj_dim", arg("new_traj", lambda t: torch.randn(2, N, DT + 2)), raises(*TRAJ))
_case("new_traj_more_rows_than_table", lambda st, a: a.update(new_traj=torch.randn(3, N, DT),
                                                              lengths=torch.full((3,), N)), raises(*TRAJ, "page_table"))
_case("new_traj_int64", arg("new_traj", lambda t: t.long()), either(*TRAJ))
_case("now_float", rep("now", lambda t: t.double()), raises("now"))
_case("now_1d", rep("now", lambda t: t.reshape(1)), raises("now"))
_case("traj_pool_float64", rep("traj_pool", lambda t: t.double()), raises("traj_pool"))
_case("ts_pool_short", rep("ts_pool", lambda t: t[:-1]), raises("ts_pool"))
_case("live_pool_int64", rep("live_pool", lambda t: t.long()), raises("live_pool"))
_case("pinned_pool_short", rep("pinned_pool", lambda t: t[:-1]), raises("pinned_pool"))
_case("pinned_pool_narrow", rep("pinned_pool", lambda t: t[:, :1]), raises("pinned_pool"))
_case("pinned_pool_uint8", rep("pinned_pool", lambda t: t.to(torch.uint8)), raises("pinned_pool"))
_case("pos_pool_without_next_position", lambda st, a: st.__setitem__("next_position", None),
      raises("pos_pool", "next_position"))
_case("pos_pool_int32", rep("pos_pool", lambda t: t.int()), raises("pos_pool"))
_case("pos_pool_short", rep("pos_pool", lambda t: t[:-1]), raises("pos_pool"))
_case("next_position_short", rep("next_position", lambda t: t[:1]), raises("next_position"))
_case("next_position_float", rep("next_position", lambda t: t.double()), raises("next_position"))
_case("pos_pool_noncontiguous", rep("pos_pool", lambda t: t.t().contiguous().t()),
      raises("contiguous", types=ANY_ERROR))
_case("page_shared_by_two_rows", lambda st, a: st["page_table"].__setitem__((1, 0), int(st["page_table"][0, 0])),
      either("page_table"), "invariants")
_case("page_both_owned_and_free", lambda st, a: st["free_pages"].__setitem__(int(st["free_top"]) - 1,
                                                                           int(st["page_table"][0, 0])),
      either("free_pages", "page_table"), "invariants")

# valid but extreme values: the reference's outputs and state, bit for bit
_case("batch0", lambda st, a: a.update(new_traj=torch.randn(0, N, DT), lengths=torch.zeros(0, dtype=torch.long)),
      RESULT, "reference")
_case("n0", lambda st, a: a.update(new_traj=torch.randn(2, 0, DT), lengths=torch.zeros(2, dtype=torch.long)),
      RESULT, "reference")
_case("new_traj_nan_row", lambda st, a: a["new_traj"][1].fill_(math.nan), RESULT, "reference")
_case("new_traj_nan_one_token", lambda st, a: a["new_traj"][0, 1].fill_(math.nan), RESULT, "reference")
_case("new_traj_inf", lambda st, a: a["new_traj"][0, 2].copy_(torch.tensor([math.inf, -math.inf, 0.0])), RESULT,
      "reference")
_case("new_traj_huge", lambda st, a: a["new_traj"].fill_(3e38), RESULT, "reference")
_case("new_traj_zero", lambda st, a: a["new_traj"].zero_(), RESULT, "reference")
_case("new_traj_noncontiguous", arg("new_traj", noncontiguous), RESULT, "reference")
_case("new_traj_float64", arg("new_traj", lambda t: t.double()), either(*TRAJ), "reference")
_case("stored_nan_entry_evicting", lambda st, a: (st["traj_pool"][0, 1].fill_(math.nan),
                                                  st["capacity"].fill_(3)), RESULT, "reference")
_case("lengths_zero", arg("lengths", lambda t: torch.zeros_like(t)), RESULT, "reference")
_case("capacity_zero", rep("capacity", lambda t: torch.zeros_like(t)), either("capacity"), "reference")
_case("alpha_nan", lambda st, a: a.update(alpha=math.nan, lengths=torch.full((2,), N)), either("alpha"), "reference")
_case("decay_inf", lambda st, a: a.update(decay=math.inf), either("decay"), "reference")
_case("positions_absent", lambda st, a: a.update(positions=False), RESULT, "reference")
_case("next_position_near_int64_max", rep("next_position", lambda t: torch.full_like(t, 2**63 - 1 - N)), RESULT,
      "reference")
_case("next_position_int64_max", rep("next_position", lambda t: torch.full_like(t, 2**63 - 1)), RESULT,
      "reference")  # positions wrap as int64 arithmetic does (C++ is built with -fwrapv): no crash, no access
_case("now_int64_max", rep("now", lambda t: torch.full_like(t, 2**63 - 1)), either("now"), "invariants")


# ---------------------------------------------------------------- PagedTrajectoryKVCache
CLS = "trajops.PagedTrajectoryKVCache"


def _ctor(name, kwargs, expect):
    def fn():
        base = dict(num_layers=1, num_pages=P, page_size=S, num_kv_heads=1, head_dim=4, traj_dim=DT, max_batch=2,
                    capacity=L)
        base.update(kwargs)
        c = trajops.PagedTrajectoryKVCache(**base)
        kv = torch.ones(1, 1, 2, 4) * 3.75
        c.append(0, kv, kv, torch.randn(1, DT))
        k, _ = c.gather(0, torch.tensor([[0, 1]]))
        same(k, kv, "K read back")
    register(f"PagedTrajectoryKVCache.{name}", fn, expect, CLS)


_ctor("dtype_int32", {"dtype": torch.int32}, raises("dtype", types=("TypeError", "ValueError")))
_ctor("dtype_bool", {"dtype": torch.bool}, raises("dtype", types=("TypeError", "ValueError")))
_ctor("capacity_2pow62", {"capacity": 2**62}, raises("capacity"))
_ctor("num_pages_2pow62", {"num_pages": 2**62}, raises(types=ANY_ERROR))
_ctor("max_batch_int64_max", {"max_batch": 2**63 - 1}, raises(types=ANY_ERROR))
_ctor("num_layers_zero", {"num_layers": 0}, raises("num_layers"))
_ctor("page_size_negative", {"page_size": -2**63}, raises("page_size"))
_ctor("alpha_nan", {"alpha": math.nan}, raises("alpha"))
_ctor("decay_inf", {"decay": math.inf}, raises("decay"))
_ctor("decay_nan", {"decay": math.nan}, raises("decay"))


def _method(name, call, expect):
    def fn():
        c = cache()
        call(c)
    register(f"PagedTrajectoryKVCache.{name}", fn, expect, CLS)


def _kv(B=2, n=2):
    return torch.randn(B, 1, n, 4)


def _gather_zeros(c, slots):
    k, v = c.gather(0, slots)
    check(bool((k == 0).all() and (v == 0).all()), "gather of out-of-range slots must read zeros")


_method("append_lengths_short", lambda c: c.append(0, _kv(), _kv(), torch.randn(2, DT), lengths=torch.tensor([1])),
        raises("lengths"))
_method("append_lengths_int32", lambda c: c.append(0, _kv(), _kv(), torch.randn(2, DT),
                                                   lengths=torch.tensor([1, 1], dtype=torch.int32)), raises("lengths"))
_method("append_lengths_above_n", lambda c: c.append(0, _kv(), _kv(), torch.randn(2, DT),
                                                     lengths=torch.tensor([3, 1])), raises("lengths"))
_method("append_pin_short", lambda c: c.append(0, _kv(), _kv(), torch.randn(2, DT),
                                               pin=torch.zeros(1, 2, dtype=torch.bool)), raises("pin"))
_method("append_trajectory_4d", lambda c: c.append(0, _kv(), _kv(), torch.randn(2, 2, 1, DT)), raises("trajectory"))
_method("append_layer_int64_max", lambda c: c.append(2**63 - 1, _kv(), _kv(), torch.randn(2, DT)), raises("layer"))
_method("append_nan_trajectory", lambda c: check_shape(c.append(0, _kv(), _kv(), torch.full((2, DT), math.nan)),
                                                       (2, 2), "evicted"), RESULT)
_method("topk_k_2pow62", lambda c: c.topk(torch.randn(2, DT), 2**62), raises("k", types=ANY_ERROR))
_method("topk_k_negative", lambda c: c.topk(torch.randn(2, DT), -1), raises("k"))
_method("topk_nan_query", lambda c: check_shape(c.topk(torch.full((2, DT), math.nan), 3)[0], (2, 3), "slots"),
        RESULT)
_method("relevance_3d_trajectory", lambda c: c.relevance(torch.randn(2, 1, DT)), raises("trajectory"))
_method("gather_slots_int64_limits", lambda c: _gather_zeros(c, torch.tensor([[2**63 - 1, -2**63]])), RESULT)
_method("gather_slots_int32", lambda c: c.gather(0, torch.tensor([[0, 1]], dtype=torch.int32)), raises("slots"))


# ---------------------------------------------------------------- nn.TrajectoryAwareKVCache
NN = "trajops.nn.TrajectoryAwareKVCache"


def _nn(name, body, expect):
    register(f"nn.TrajectoryAwareKVCache.{name}", body, expect, NN)


def _nn_nan():
    c = trajops.nn.TrajectoryAwareKVCache(3, 2)
    for t in ([1.0, 0.0], [math.nan, 0.0], [math.inf, 1.0]):
        x = torch.randn(1, 2, 2)
        c.update_cache(x, x, torch.tensor(t))
    keys, values = c.get_relevant_cache(torch.tensor([math.nan, math.nan]))
    check_shape(keys, (3, 2), "keys")
    check_shape(c.compute_cache_relevance(torch.tensor([0.0, 1.0])), (3,), "relevance")


_nn("nan_inf_trajectories", _nn_nan, RESULT)
_nn("max_cache_size_2pow62", lambda: trajops.nn.TrajectoryAwareKVCache(2**62, 2).update_cache(
    torch.randn(1, 1, 2), torch.randn(1, 1, 2), torch.ones(2)), raises(types=ANY_ERROR))


def _nn_topk(top_k, n_live=2):
    c = trajops.nn.TrajectoryAwareKVCache(4, 2)
    x = torch.randn(1, n_live, 2)
    c.update_cache(x, x, torch.ones(2))
    keys, _ = c.get_relevant_cache(torch.ones(2), top_k)
    check_shape(keys, (min(top_k, n_live), 2), "keys")


_nn("top_k_negative", lambda: _nn_topk(-1), raises("top_k"))
_nn("top_k_int64_max", lambda: _nn_topk(2**63 - 1), RESULT)
_nn("empty_update_seq_len0", lambda: trajops.nn.TrajectoryAwareKVCache(2, 2).update_cache(
    torch.randn(1, 0, 2), torch.randn(1, 0, 2), torch.ones(2)), RESULT)
