"""The trajops::kv_* ops against trajops.reference.kv_cache, plus opcheck and torch.compile.

The class-level semantics (seed equivalence, invariants, bad inputs) are in test_kv_cache.py; here the
registered kernels (C++ on CPU when the extension is built) must reproduce the reference exactly on
random cache states: same evictions, slots, page tables, free stacks, and the same fp32 scores.
"""
from __future__ import annotations

import random

import pytest
import torch

from trajops import reference as R
from trajops.kv_cache import PagedTrajectoryKVCache

STATE = ("traj_pool", "ts_pool", "live_pool", "pinned_pool", "page_table", "live_count", "free_pages", "free_top",
         "evicted_total", "pos_pool", "next_position")


def _states(c):
    return [getattr(c, name).clone() for name in STATE]


def _evict_args(st, c, traj, lengths, pin, positions=True):
    """The op's arguments on the state st (STATE order); positions: the optional trailing pos_pool, next_position."""
    return (*st[:6], c.capacity, *st[6:9], c.now, traj, lengths, pin, c.alpha, c.decay, *(st[9:] if positions else ()))


def _bank(gen, Dt, near_ties):
    base = [torch.randn(Dt, generator=gen) for _ in range(4)]
    if near_ties:  # scores closer than the C++ float shortlist's error bound: only the exact scores rank them
        base = base[:2] + [base[0] + 1e-6 * torch.randn(Dt, generator=gen) for _ in range(3)]
    return base + [torch.zeros(Dt)]


_SLOW = pytest.mark.slow  # ~1 min each under the Triton interpreter; they run in the C++ pass


@pytest.mark.parametrize("page_size,capacity,alpha,decay,near_ties", [
    (1, 5, 0.7, 0.1, False), pytest.param(4, 13, 0.7, 0.1, False, marks=_SLOW),
    pytest.param(16, 40, 0.7, 0.1, False, marks=_SLOW), (4, 13, 0.7, 0.1, True),
    pytest.param(8, 70, 1.0, 0.1, True, marks=_SLOW), pytest.param(4, 13, 0.0, 0.1, False, marks=_SLOW),
    pytest.param(16, 40, 0.5, 0.0, True, marks=_SLOW),
])
def test_ops_match_reference_on_random_streams(page_size, capacity, alpha, decay, near_ties):
    rng = random.Random(page_size)
    gen = torch.Generator().manual_seed(capacity)
    B, Dt = 3, 6
    pages = B * (-(-capacity // page_size)) + 2
    c = PagedTrajectoryKVCache(1, pages, page_size, 1, 2, Dt, B, capacity, alpha=alpha, decay=decay)
    bank = _bank(gen, Dt, near_ties)
    for step in range(120):
        n = rng.choice([1, 2, 5, capacity + 3])
        lengths = torch.tensor([rng.randint(0, n) for _ in range(B)])
        traj = torch.stack([torch.stack([rng.choice(bank) for _ in range(n)]) for _ in range(B)])
        pin = torch.rand(B, n, generator=gen) < 0.05
        s0 = _states(c)
        sa, sb = [t.clone() for t in s0], [t.clone() for t in s0]
        got = torch.ops.trajops.kv_evict_append_(*_evict_args(sa, c, traj, lengths, pin))
        want = R.kv_evict_append_(*_evict_args(sb, c, traj, lengths, pin))
        for name, a, b in zip(("evicted", "written", "ok"), got, want):
            assert torch.equal(a, b), (step, name)
        for name, a, b in zip(STATE, sa, sb):
            assert torch.equal(a, b), (step, name)
        k = torch.randn(B, 1, n, 2, generator=gen)
        c.append(0, k, k, traj, lengths=lengths, pin=pin)
        c.step()
        q = torch.stack([rng.choice(bank) for _ in range(B)])
        pool = (c.traj_pool, c.ts_pool, c.live_pool, c.page_table, q, c.now, c.alpha, c.decay)
        assert torch.equal(torch.ops.trajops.kv_relevance(*pool), R.kv_relevance(*pool))
        for k_top in (0, 1, 7, capacity + 5):
            a, b = torch.ops.trajops.kv_topk(*pool, k_top), R.kv_topk(*pool, k_top)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (step, k_top)


def _small_cache():
    gen = torch.Generator().manual_seed(0)
    c = PagedTrajectoryKVCache(2, 8, 4, 2, 8, 5, 2, 6)
    for _ in range(4):
        k = torch.randn(2, 2, 3, 8, generator=gen)
        c.append(0, k, k, torch.randn(2, 5, generator=gen))
        c.append(1, k, k, torch.randn(2, 5, generator=gen))
        c.step()
    return c


def test_opcheck():
    c = _small_cache()
    q = torch.randn(2, 5)
    pool = (c.traj_pool, c.ts_pool, c.live_pool, c.page_table, q, c.now, 0.7, 0.1)
    torch.library.opcheck(torch.ops.trajops.kv_relevance.default, pool)
    torch.library.opcheck(torch.ops.trajops.kv_topk.default, (*pool, 5))
    for positions in (True, False):
        args = _evict_args(_states(c), c, torch.randn(2, 3, 5), torch.tensor([3, 1]), None, positions)
        torch.library.opcheck(torch.ops.trajops.kv_evict_append_.default, args)
    written = torch.tensor([[3, -1, 9], [-1, -1, 0]])
    kv = torch.randn(2, 2, 3, 8)
    torch.library.opcheck(torch.ops.trajops.kv_write_.default, (c.k_pool[0].clone(), c.v_pool[0].clone(), written,
                                                                kv, -kv))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_kv_write_matches_reference(dtype):
    gen = torch.Generator().manual_seed(1)
    P, S, H, D, B, n = 5, 4, 3, 7, 2, 4
    k_pool = torch.randn(P, S, H, D, generator=gen).to(dtype)
    v_pool = torch.randn(P, S, H, D, generator=gen).to(dtype)
    written = torch.tensor([[0, -1, 19, 7], [-1, 4, -1, 12]])
    k = torch.randn(B, n, H, D, generator=gen).transpose(1, 2)  # non-contiguous, fp32 into the pool's dtype
    v = torch.randn(B, H, D, n, generator=gen).transpose(2, 3)
    got = [k_pool.clone(), v_pool.clone()]
    want = [k_pool.clone(), v_pool.clone()]
    torch.ops.trajops.kv_write_(*got, written, k, v)
    R.kv_write_(*want, written, k, v)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    flat_k = got[0].view(-1, H, D)
    for b_, t_ in ((0, 0), (0, 2), (0, 3), (1, 1), (1, 3)):
        assert torch.equal(flat_k[written[b_, t_]], k[b_, :, t_].to(dtype))
    untouched = torch.ones(P * S, dtype=torch.bool)
    untouched[written[written >= 0]] = False
    assert torch.equal(flat_k[untouched], k_pool.view(-1, H, D)[untouched])


def test_kv_write_all_skipped_and_bad_inputs():
    k_pool, v_pool = torch.randn(2, 4, 1, 3), torch.randn(2, 4, 1, 3)
    before = k_pool.clone()
    torch.ops.trajops.kv_write_(k_pool, v_pool, torch.full((1, 2), -1), torch.randn(1, 1, 2, 3), torch.randn(1, 1, 2, 3))
    assert torch.equal(k_pool, before)
    with pytest.raises(ValueError, match="k and v must have shape"):
        torch.ops.trajops.kv_write_(k_pool, v_pool, torch.zeros(1, 2, dtype=torch.long), torch.randn(1, 2, 2, 3),
                                    torch.randn(1, 2, 2, 3))
    with pytest.raises(ValueError, match="written must be int64"):
        torch.ops.trajops.kv_write_(k_pool, v_pool, torch.zeros(1, 2), torch.randn(1, 1, 2, 3), torch.randn(1, 1, 2, 3))


def test_compile_fullgraph():
    c = _small_cache()
    q = torch.randn(2, 5)
    pool = (c.traj_pool, c.ts_pool, c.live_pool, c.page_table)
    topk = torch.compile(lambda q: torch.ops.trajops.kv_topk(*pool, q, c.now, 0.7, 0.1, 5), fullgraph=True)
    for a, b in zip(topk(q), torch.ops.trajops.kv_topk(*pool, q, c.now, 0.7, 0.1, 5)):
        assert torch.equal(a, b)
    traj, lengths = torch.randn(2, 3, 5), torch.tensor([3, 2])
    sa, sb = _states(c), _states(c)
    got = torch.compile(torch.ops.trajops.kv_evict_append_, fullgraph=True)(*_evict_args(sa, c, traj, lengths, None))
    want = torch.ops.trajops.kv_evict_append_(*_evict_args(sb, c, traj, lengths, None))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(sa, sb))  # the mutations happened under compile too


def test_kv_write_compile_fullgraph():
    written = torch.tensor([[5, -1, 2], [-1, 7, 0]])
    k, v = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4)
    got = [torch.zeros(4, 2, 3, 4), torch.zeros(4, 2, 3, 4)]
    want = [torch.zeros(4, 2, 3, 4), torch.zeros(4, 2, 3, 4)]
    torch.compile(torch.ops.trajops.kv_write_, fullgraph=True)(*got, written, k, v)
    torch.ops.trajops.kv_write_(*want, written, k, v)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[0].abs().sum() > 0  # the mutation happened under compile
