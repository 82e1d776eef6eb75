"""The fused decode-step eviction (triton_kernels/kv_evict.py) against the reference, bit for bit.

Runs only where the CPU backend is the Triton interpreter (TRAJOPS_BACKEND=triton TRITON_INTERPRET=1). The
launcher is called directly: on CPU tensors the op checks state values first and raises, so the kernel's own
checks (the CUDA semantics: ok False, nothing written) are reached only this way. Cases: a stream of decode
steps with pins, rows without a token, NaN trajectories and evictions (the ranking's ties among them), an
exhausted page pool, corrupt page-table / stack / count entries, a page held twice, capacity below the live
count (several evictions for one token), and the shapes the kernel declines (n > 1, rows over MAX_SLOTS).
"""
from __future__ import annotations

import pytest
import torch

import trajops
from trajops import reference as R
from trajops.kv_cache import PagedTrajectoryKVCache

pytestmark = pytest.mark.skipif(trajops.backends()["cpu"] != "triton-interpreter",
                                reason="tests the Triton kernels: run with TRAJOPS_BACKEND=triton TRITON_INTERPRET=1")

NAMES = "traj ts live pinned page_table live_count capacity free_pages free_top evicted_total now".split()


def _kernel():
    from trajops.triton_kernels import kv_evict

    return kv_evict


def _state(c: PagedTrajectoryKVCache) -> list:
    return [t.clone() for t in (c.traj_pool, c.ts_pool, c.live_pool, c.pinned_pool, c.page_table, c.live_count,
                                c.capacity, c.free_pages, c.free_top, c.evicted_total, c.now)]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.is_floating_point:  # NaN trajectories are stored as NaN by both
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    return torch.equal(a, b)


def _compare(state: list, traj, lengths, pin, alpha=0.7, decay=0.1, what="", positions=()):
    """Runs the reference and the fused kernel on copies of ``state``; asserts equal outputs and state.
    positions: () or (pos_pool, next_position), the op's optional trailing pair (compared too)."""
    ref, ref_pos = [t.clone() for t in state], [t.clone() for t in positions]
    fused, fused_pos = [t.clone() for t in state], [t.clone() for t in positions]
    want = R.kv_evict_append_(*ref, traj, lengths, pin, alpha, decay, *ref_pos)
    got = _kernel().kv_evict_append_decode(*fused, traj, lengths, pin, alpha, decay, *fused_pos)
    assert got is not None, f"{what}: the fused path declined"
    for name, a, b in zip(("evicted", "written", "ok"), want, got):
        assert torch.equal(a, b), f"{what}: {name} {a.tolist()} != {b.tolist()}"
    for name, a, b in zip(NAMES + ["pos_pool", "next_position"], ref + ref_pos, fused + fused_pos):
        assert _same(a, b), f"{what}: state {name} differs"
    return want


def _cache(B=3, S=4, cap=10, pages=None, Dt=5):
    return PagedTrajectoryKVCache(1, pages or B * -(-cap // S), S, 1, 2, Dt, B, cap)


def test_decode_stream_with_pins_empty_rows_and_nan():
    c = _cache()
    gen = torch.Generator().manual_seed(0)
    for step in range(30):
        n = 1 if step > 1 else 6
        lengths = torch.randint(0, n + 1, (3,), generator=gen)
        lengths[0] = n
        traj = torch.randn(3, n, 5, generator=gen)
        if step % 5 == 2:
            traj[1, 0, 3] = float("nan")
        if step % 6 == 4:
            traj[2] = traj[0]  # equal trajectories: score ties, broken by age then slot
        pin = (torch.rand(3, n, generator=gen) < 0.2) if step % 3 == 0 else None
        if n == 1:  # with the positions on odd steps (as the store calls it), without on even ones
            pos = (c.pos_pool, c.next_position) if step % 2 else ()
            _compare(_state(c), traj, lengths, pin, what=f"step {step}", positions=pos)
        c.append(0, torch.zeros(3, 1, n, 2), torch.zeros(3, 1, n, 2), traj, lengths=lengths, pin=pin)
        c.step()


def test_exhausted_pool_writes_nothing():
    c = _cache(B=2, S=2, cap=6, pages=4)  # overcommitted: 2 rows x 3 pages > 4
    traj = torch.randn(2, 4, 5)
    c.append(0, torch.zeros(2, 1, 4, 2), torch.zeros(2, 1, 4, 2), traj)  # 2 pages each: the pool is empty
    c.step()
    out = _compare(_state(c), torch.randn(2, 1, 5), torch.ones(2, dtype=torch.long), None, what="exhausted")
    assert not bool(out[2]), "the pool should be exhausted"


@pytest.mark.parametrize("corrupt", ["page_table_out_of_range", "page_held_twice", "free_top_over", "stack_entry",
                                     "live_count_negative", "length_2", "capacity_negative"])
def test_corrupt_state_is_flagged_and_left_unchanged(corrupt):
    c = _cache()
    traj = torch.randn(3, 3, 5)
    c.append(0, torch.zeros(3, 1, 3, 2), torch.zeros(3, 1, 3, 2), traj)
    c.step()
    st = _state(c)
    lengths = torch.ones(3, dtype=torch.long)
    pt, cnt, cap, free, top = st[4], st[5], st[6], st[7], st[8]
    if corrupt == "page_table_out_of_range":
        pt[1, 2] = 10**6
    elif corrupt == "page_held_twice":
        pt[2, 1] = pt[0, 0]
    elif corrupt == "free_top_over":
        top.fill_(free.numel() + 1)
    elif corrupt == "stack_entry":
        free[0] = -3
    elif corrupt == "live_count_negative":
        cnt[1] = -1
    elif corrupt == "length_2":
        lengths[2] = 2
    elif corrupt == "capacity_negative":
        cap[0] = -1
    out = _compare(st, torch.randn(3, 1, 5), lengths, None, what=corrupt)
    assert not bool(out[2]), f"{corrupt}: ok should be False"


def test_capacity_below_live_count_evicts_several():
    c = _cache()
    gen = torch.Generator().manual_seed(3)
    c.append(0, torch.zeros(3, 1, 9, 2), torch.zeros(3, 1, 9, 2), torch.randn(3, 9, 5, generator=gen))
    c.step()
    st = _state(c)
    st[6][:] = torch.tensor([4, 9, 0])  # row 0: 9 live, capacity 4 -> 6 evicted for 1 kept; row 2 keeps nothing
    out = _compare(st, torch.randn(3, 1, 5, generator=gen), torch.ones(3, dtype=torch.long), None, alpha=0.0,
                   decay=0.0, what="capacity below live")  # alpha = decay = 0: every score ties
    assert bool(out[2])


def test_declined_shapes():
    k = _kernel()
    c = _cache()
    args = (c.traj_pool, c.ts_pool, c.live_pool, c.pinned_pool, c.page_table, c.live_count, c.capacity,
            c.free_pages, c.free_top, c.evicted_total, c.now)
    assert k.kv_evict_append_decode(*args, torch.randn(3, 2, 5), torch.ones(3, dtype=torch.long), None, 0.7,
                                    0.1) is None  # n = 2
    big = PagedTrajectoryKVCache(1, 2 * (k.MAX_SLOTS // 16 + 1), 16, 1, 2, 5, 1, k.MAX_SLOTS + 16)
    assert k.kv_evict_append_decode(big.traj_pool, big.ts_pool, big.live_pool, big.pinned_pool, big.page_table,
                                    big.live_count, big.capacity, big.free_pages, big.free_top, big.evicted_total,
                                    big.now, torch.randn(1, 1, 5), torch.ones(1, dtype=torch.long), None, 0.7,
                                    0.1) is None  # rows over MAX_SLOTS
