"""The raw KV ops under corrupt state and non-finite trajectories (issue 20, items 2 and 6).

Every backend (C++, reference, Triton interpreter) checks what it indexes before any access and fails
with the same exception and text; the reference functions themselves (the CUDA path, where checking
would sync) treat corrupt entries as absent and flag the result. NaN scores rank as -inf everywhere.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CPU_BACKEND, INTERPRETER
from trajops import reference as R
from trajops.kv_cache import PagedTrajectoryKVCache

OPS = torch.ops.trajops
STATE = ("traj_pool", "ts_pool", "live_pool", "pinned_pool", "page_table", "live_count", "capacity", "free_pages",
         "free_top", "evicted_total", "now")


def _cache(B=2, capacity=8, page_size=4, Dt=3, steps=3):
    """A cache with a few live entries per row (pages 8, so some stay free)."""
    c = PagedTrajectoryKVCache(1, 8, page_size, 1, 4, Dt, B, capacity)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        k = torch.randn(B, 1, 2, 4, generator=gen)
        c.append(0, k, k, torch.randn(B, Dt, generator=gen))
        c.step()
    return c


def _state(c, **over):
    st = {name: getattr(c, name).clone() for name in STATE}
    st.update(over)
    return st


def _evict(st, traj, lengths, pin=None, fn=None):
    args = [st[name] for name in STATE] + [traj, lengths, pin, 0.7, 0.1]
    return (fn or OPS.kv_evict_append_)(*args)


def _read_args(st, q):
    return st["traj_pool"], st["ts_pool"], st["live_pool"], st["page_table"], q, st["now"]


# ---------------------------------------------------------------- structure (shapes, dtypes)
def _bad_structure():
    c = _cache()
    B, n, Dt, P = 2, 3, 3, 8
    traj, lengths = torch.randn(B, n, Dt), torch.full((B,), n)
    yield "new_traj 2-D", _state(c), torch.randn(B, Dt), lengths, None, ValueError, "new_traj must be a floating-point"
    yield "new_traj int", _state(c), torch.ones(B, n, Dt, dtype=torch.long), lengths, None, ValueError, "new_traj"
    yield "lengths short", _state(c), traj, torch.full((1,), n), None, ValueError, r"lengths must be int64 \(2,\)"
    yield "lengths int32", _state(c), traj, lengths.int(), None, ValueError, "lengths must be int64"
    for name in ("live_count", "capacity", "evicted_total"):
        yield f"{name} short", _state(c, **{name: torch.zeros(1, dtype=torch.long)}), traj, lengths, None, \
            ValueError, rf"{name} must be int64 \(2,\)"
    yield "capacity float", _state(c, capacity=c.capacity.float()), traj, lengths, None, ValueError, "capacity"
    yield "free_pages short", _state(c, free_pages=c.free_pages[:3].clone()), traj, lengths, None, ValueError, \
        rf"free_pages must be int64 \({P},\)"
    yield "free_top 1-d", _state(c, free_top=c.free_top.view(1)), traj, lengths, None, ValueError, "free_top"
    yield "now 1-d", _state(c, now=c.now.view(1)), traj, lengths, None, ValueError, "now must be int64 0-d"
    yield "pinned_pool", _state(c, pinned_pool=c.pinned_pool[:, :2].clone()), traj, lengths, None, ValueError, \
        "pinned_pool must be bool"
    yield "pin short", _state(c), traj, lengths, torch.zeros(1, n, dtype=torch.bool), ValueError, \
        r"pin must be bool \(2, 3\)"
    yield "pin float", _state(c), traj, lengths, torch.zeros(B, n), ValueError, "pin must be bool"


@pytest.mark.parametrize("case", list(_bad_structure()), ids=lambda case: case[0])
def test_evict_append_structure_errors_name_the_argument(case):
    _, st, traj, lengths, pin, exc, match = case
    before = {k: v.clone() for k, v in st.items()}
    with pytest.raises(exc, match=match):
        _evict(st, traj, lengths, pin)
    assert all(torch.equal(before[k], st[k]) for k in st)


def test_read_ops_check_query_and_now():
    st = _state(_cache())
    for q, match in ((torch.randn(2, 1, 3), r"query must be a floating-point \(B, 3\)"),
                     (torch.randn(3, 3), r"B <= 2"), (torch.ones(2, 3, dtype=torch.long), "query")):
        with pytest.raises(ValueError, match=match):
            OPS.kv_relevance(*_read_args(st, q), 0.7, 0.1)
        with pytest.raises(ValueError, match=match):
            OPS.kv_topk(*_read_args(st, q), 0.7, 0.1, 2)
    with pytest.raises(ValueError, match="now must be int64 0-d"):
        OPS.kv_relevance(*_read_args(_state(_cache(), now=torch.zeros(2, dtype=torch.long)), torch.randn(2, 3)),
                         0.7, 0.1)


# ---------------------------------------------------------------- values (the issue's reproducers)
def test_corrupt_page_table_raises_in_every_op():
    # issue 20: a page-table entry >= num_pages was a SIGSEGV in all three ops
    c = PagedTrajectoryKVCache(1, 8, 4, 1, 4, 3, 2, 8)
    k = torch.randn(2, 1, 2, 4)
    c.append(0, k, k, torch.randn(2, 3))
    for bad in (10**6, 8, -2, -(2**63)):
        st = _state(c)
        st["page_table"][0, 1] = bad
        match = rf"page_table entries must be -1 or a page in \[0, 8\), got {bad} at \[0, 1\]"
        with pytest.raises(IndexError, match=match):
            OPS.kv_relevance(*_read_args(st, torch.randn(2, 3)), 0.7, 0.1)
        with pytest.raises(IndexError, match=match):
            OPS.kv_topk(*_read_args(st, torch.randn(2, 3)), 0.7, 0.1, 3)
        with pytest.raises(IndexError, match=match):
            _evict(st, torch.randn(2, 1, 3), torch.ones(2, dtype=torch.long))
    st = _state(c)
    st["page_table"][1, 1] = 10**6  # rows past B are not read
    assert OPS.kv_relevance(*_read_args(st, torch.randn(1, 3)), 0.7, 0.1).shape == (1, 8)


def _bad_values():
    c = _cache()
    top = int(c.free_top)
    traj, lengths = torch.randn(2, 3, 3), torch.full((2,), 3)
    yield "free_top > P", _state(c, free_top=torch.tensor(9)), lengths, IndexError, r"free_top must be in \[0, 8\], got 9"
    yield "free_top < 0", _state(c, free_top=torch.tensor(-1)), lengths, IndexError, "free_top must be in"
    fp = c.free_pages.clone()
    fp[top - 1] = 8
    yield "free page >= P", _state(c, free_pages=fp), lengths, IndexError, \
        rf"free_pages\[:free_top\] must hold pages in \[0, 8\), got 8 at {top - 1}"
    fp = c.free_pages.clone()
    fp[0] = int(c.page_table[0, 0])
    yield "page held twice", _state(c, free_pages=fp), lengths, ValueError, \
        rf"page {int(c.page_table[0, 0])} is held twice"
    pt = c.page_table.clone()
    pt[1, 1] = pt[0, 0]
    yield "page in two rows", _state(c, page_table=pt), lengths, ValueError, "is held twice"
    yield "live_count > L", _state(c, live_count=torch.tensor([0, 9])), lengths, ValueError, \
        r"live_count must be in \[0, 8\], got 9 for row 1"
    yield "live_count < 0", _state(c, live_count=torch.tensor([-(2**63), 0])), lengths, ValueError, "live_count"
    yield "capacity < 0", _state(c, capacity=torch.tensor([8, -1])), lengths, ValueError, \
        "capacity must be >= 0, got -1 for row 1"
    yield "lengths > n", _state(c), torch.tensor([3, 4]), ValueError, r"lengths must be in \[0, 3\], got 4 for row 1"
    yield "lengths < 0", _state(c), torch.tensor([-1, 0]), ValueError, "lengths must be in"


@pytest.mark.parametrize("case", list(_bad_values()), ids=lambda case: case[0])
def test_evict_append_value_errors_leave_the_state_alone(case):
    _, st, lengths, exc, match = case
    before = {k: v.clone() for k, v in st.items()}
    with pytest.raises(exc, match=match):
        _evict(st, torch.randn(2, 3, 3), lengths)
    assert all(torch.equal(before[k], st[k]) for k in st)
    # the reference functions (the CUDA path: no host check) flag the same state and change nothing
    got = _evict(st, torch.randn(2, 3, 3), lengths, fn=R.kv_evict_append_)
    assert not bool(got[2]) and bool((got[0] == -1).all()) and bool((got[1] == -1).all())
    assert all(torch.equal(before[k], st[k]) for k in st)


def test_reference_flags_corrupt_page_tables_without_raising():
    st = _state(_cache())
    st["page_table"][1, 0] = 99
    q = torch.randn(2, 3)
    rel = R.kv_relevance(*_read_args(st, q), 0.7, 0.1)
    assert bool(rel[1].isnan().all()) and not bool(rel[0].isnan().any())
    slots, scores = R.kv_topk(*_read_args(st, q), 0.7, 0.1, 3)
    assert bool((slots[1] == -1).all()) and bool(scores[1].isnan().all()) and bool((slots[0] >= 0).all())


def test_kv_write_slot_outside_the_pool():
    k_pool, v_pool = torch.zeros(2, 4, 1, 3), torch.zeros(2, 4, 1, 3)
    with pytest.raises(ValueError, match="written slot 8 is outside the pool of 8 slots"):
        OPS.kv_write_(k_pool, v_pool, torch.tensor([[1, 8]]), torch.ones(1, 1, 2, 3), torch.ones(1, 1, 2, 3))
    # the reference (CUDA semantics) drops such a token and writes the others
    R.kv_write_(k_pool, v_pool, torch.tensor([[1, 8, -5]]), torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3))
    assert k_pool.view(8, 3).sum(1).tolist() == [0, 3, 0, 0, 0, 0, 0, 0]


def test_integer_pools_are_refused():
    with pytest.raises(TypeError, match="dtype must be float32, float64, float16 or bfloat16, got torch.int64"):
        PagedTrajectoryKVCache(1, 8, 4, 1, 4, 3, 2, 8, dtype=torch.long)


# ---------------------------------------------------------------- NaN / Inf trajectories (item 6)
def _stream(trajs, capacity=4, n=1):
    """One row, one token per step with the given trajectories; returns the cache."""
    c = PagedTrajectoryKVCache(1, 4, 2, 1, 2, 2, 1, capacity)
    for t in trajs:
        k = torch.zeros(1, 1, n, 2)
        c.append(0, k, k, torch.tensor([t]))
        c.step()
    return c


E1, NAN, INF = [1.0, 0.0], [math.nan, 0.0], [math.inf, 1.0]


def _both(fn_op, fn_ref, *args):
    got, want = fn_op(*args), fn_ref(*args)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
    return got


def test_nan_query_ranks_by_age():
    c = _stream([[-1.0, 0.0], E1, E1, [0.0, 1.0]])
    st = _state(c)
    q = torch.tensor([NAN])
    rel = _both(OPS.kv_relevance, R.kv_relevance, *_read_args(st, q), 0.7, 0.1)
    assert bool(rel[0, :4].isnan().all()) and bool((rel[0, 4:] == -math.inf).all())
    slots, scores = _both(OPS.kv_topk, R.kv_topk, *_read_args(st, q), 0.7, 0.1, 6)
    assert slots[0].tolist() == [0, 1, 2, 3, -1, -1]  # every live slot, oldest first, then padding
    assert bool(scores[0, :4].isnan().all()) and bool((scores[0, 4:] == -math.inf).all())
    # eviction with a NaN trajectory: the oldest entries go, on every backend
    sa, sb = _state(c), _state(c)
    traj, lengths = torch.tensor([[NAN, NAN]]), torch.tensor([2])
    ev = _evict(sa, traj, lengths)
    ev_ref = _evict(sb, traj, lengths, fn=R.kv_evict_append_)
    assert ev[0][0].tolist() == ev_ref[0][0].tolist() == [0, 1]
    for name in STATE:
        torch.testing.assert_close(sa[name], sb[name], equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [NAN, INF])
def test_stored_non_finite_entry_ranks_last_and_is_evicted_first(bad):
    c = _stream([E1, bad, E1, E1])
    st = _state(c)
    q = torch.tensor([E1])
    slots, scores = _both(OPS.kv_topk, R.kv_topk, *_read_args(st, q), 0.7, 0.1, 5)
    assert slots[0].tolist() == [3, 2, 0, 1, -1]  # the NaN entry after every finite one, never as -1
    assert math.isnan(float(scores[0, 3]))
    sa, sb = _state(c), _state(c)
    traj, lengths = torch.tensor([[E1]]), torch.tensor([1])
    ev = _evict(sa, traj, lengths)
    _evict(sb, traj, lengths, fn=R.kv_evict_append_)
    assert ev[0][0].tolist() == [1]
    for name in STATE:
        torch.testing.assert_close(sa[name], sb[name], equal_nan=True, rtol=0, atol=0)


def test_issue_example_nan_after_three_entries():
    # issue 20, item 6: trajectories -e1, e1, e1 then NaN, two tokens per step, capacity 4
    c = _stream([[-1.0, 0.0], E1, E1, NAN], capacity=4, n=2)
    live = c.live_slots()[0].nonzero().squeeze(1).tolist()
    ts = c.ts_pool.reshape(-1)[R.kv_logical_to_physical(c.page_table[:1], c.page_size)[0][live]].tolist()
    # each step evicts the two oldest entries (the NaN step by age alone): the last two steps remain
    assert sorted(ts) == [2, 2, 3, 3]


@pytest.mark.skipif(not INTERPRETER, reason="the Triton kernel itself runs only under TRITON_INTERPRET=1 on CPU")
def test_triton_write_kernel_drops_slots_outside_the_pool():
    from trajops.triton_kernels import kv_cache as kernels

    k_pool, v_pool = torch.zeros(2, 4, 1, 3), torch.zeros(2, 4, 1, 3)
    kernels.kv_write(k_pool, v_pool, torch.tensor([[1, 8, -5, 100]]), torch.ones(1, 1, 4, 3), torch.ones(1, 1, 4, 3))
    assert k_pool.view(8, 3).sum(1).tolist() == [0, 3, 0, 0, 0, 0, 0, 0]


_SPECIALS = [E1, [0.0, 1.0], [-1.0, 0.5], [0.0, 0.0], [3e-9, -4e-9], NAN, INF, [-math.inf, math.inf]]


@pytest.mark.skipif(CPU_BACKEND == "reference", reason="differential test: the backend under test is the reference")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.lists(st.sampled_from(range(len(_SPECIALS))), min_size=2, max_size=2),
                                st.integers(0, 3), st.integers(0, 2)), min_size=1, max_size=6),
       query=st.sampled_from(range(len(_SPECIALS))), capacity=st.integers(1, 5))
def test_non_finite_streams_match_the_reference(steps, query, capacity):
    """Random streams of finite, zero, tiny, NaN and Inf trajectories: the registered kernels and the
    reference make the same decisions (state, evicted, written) and the same relevance / top-k."""
    c = PagedTrajectoryKVCache(1, 8, 2, 1, 2, 2, 2, capacity)
    sa, sb = _state(c), _state(c)
    for rows, n, m in steps:
        traj = torch.tensor([[_SPECIALS[r]] * n for r in rows]).view(2, n, 2)
        lengths = torch.tensor([min(m, n), n])
        got = _evict(sa, traj, lengths)
        want = _evict(sb, traj, lengths, fn=R.kv_evict_append_)
        for a, b in zip(list(got) + [sa[k] for k in STATE], list(want) + [sb[k] for k in STATE]):
            torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
        sa["now"] += 1
        sb["now"] += 1
    q = torch.tensor([_SPECIALS[query], _SPECIALS[(query + 1) % len(_SPECIALS)]])
    _both(OPS.kv_relevance, R.kv_relevance, *_read_args(sa, q), 0.7, 0.1)
    _both(OPS.kv_topk, R.kv_topk, *_read_args(sa, q), 0.7, 0.1, 5)
