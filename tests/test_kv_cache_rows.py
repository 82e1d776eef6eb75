"""PagedTrajectoryKVCache's integration API: positions, live_entries, read_slots, last_append_slots, select_rows."""
from __future__ import annotations

import random

import pytest
import torch

from trajops import PagedTrajectoryKVCache

H, D, DT = 2, 4, 3


def make(max_batch=3, capacity=5, page_size=2, num_pages=None, layers=2, alpha=0.7):
    mp = -(-capacity // page_size)
    return PagedTrajectoryKVCache(layers, num_pages or max_batch * mp, page_size, H, D, DT, max_batch, capacity,
                                  alpha=alpha)


def kv_of(pos, layer):
    """(B, H, n, D) keys whose every element is 100 * layer + the token's position (values: the negation)."""
    k = (100.0 * layer + pos.double())[:, None, :, None].expand(-1, H, -1, D).float().contiguous()
    return k, -k


def step(cache, n, traj, lengths=None, pin=None):
    """One step through every layer; keys encode positions (next_position + i). Returns layer 0's evicted slots."""
    B = traj.shape[0]
    pos = cache.next_position[:B, None] + torch.arange(n)
    evicted = None
    for layer in range(cache.num_layers):
        k, v = kv_of(pos, layer)
        out = cache.append(layer, k, v, traj, lengths=lengths if layer == 0 else None, pin=pin if layer == 0 else None)
        evicted = out if layer == 0 else evicted
    cache.step()
    return evicted


def test_positions_follow_each_rows_valid_tokens_and_live_entries_sorts_them():
    cache = make(max_batch=2, capacity=5, alpha=0.0)  # recency only: the oldest entries go; max_slots 6
    step(cache, 3, torch.ones(2, 3, DT))
    step(cache, 3, torch.ones(2, 3, DT), lengths=torch.tensor([3, 1]))
    assert cache.next_position.tolist() == [6, 4]
    slots, pos = cache.live_entries(2)  # count from the device: 5; beyond a row's live entries: -1
    assert pos.tolist() == [[1, 2, 3, 4, 5], [0, 1, 2, 3, -1]] and int(slots[1, 4]) == -1
    step(cache, 2, torch.ones(2, 2, DT), lengths=torch.tensor([0, 2]))
    slots, pos = cache.live_entries(2, 6)
    assert pos.tolist() == [[1, 2, 3, 4, 5, -1], [1, 2, 3, 4, 5, -1]]
    assert bool((slots[:, 5:] == -1).all()) and bool((slots[:, :5] >= 0).all())
    # the slots are physical: the pools hold each entry's position there (keys encode it)
    k, v = cache.read_slots(1, slots[:, :5])
    assert torch.equal(k[:, 0, :, 0], 100.0 + pos[:, :5].float()) and torch.equal(v, -k)
    assert cache.live_entries(1, 0)[0].shape == (1, 0)


def test_read_slots_sees_the_old_entries_until_their_layer_is_written():
    cache = make(max_batch=1, capacity=3, page_size=1, alpha=0.0)
    step(cache, 3, torch.ones(1, 3, DT))
    old, old_pos = cache.live_entries(1, 3)
    pos = torch.tensor([[3]])
    cache.append(0, *kv_of(pos, 0), torch.ones(1, 1, DT))  # evicts position 0, reuses its slot
    new_slot = cache.last_append_slots()
    assert new_slot.shape == (1, 1) and int(new_slot) == int(old[0, 0])
    k1, _ = cache.read_slots(1, old)  # layer 1 not written yet: still the old entries, the evicted one included
    assert k1[0, 0, :, 0].tolist() == [100.0, 101.0, 102.0]
    k0, _ = cache.read_slots(0, old)
    assert k0[0, 0, :, 0].tolist() == [3.0, 1.0, 2.0]  # layer 0 already holds the new token in that slot
    cache.append(1, *kv_of(pos, 1), torch.ones(1, 1, DT))
    cache.step()
    slots, pos_after = cache.live_entries(1)
    assert pos_after.tolist() == [[1, 2, 3]]
    assert cache.read_slots(1, slots)[0][0, 0, :, 0].tolist() == [101.0, 102.0, 103.0]
    zk, zv = cache.read_slots(0, torch.tensor([[-1, int(slots[0, 0])]]))
    assert bool((zk[0, :, 0] == 0).all()) and bool((zv[0, :, 0] == 0).all()) and bool((zk[0, :, 1] != 0).all())


def test_last_append_slots_marks_tokens_that_got_no_slot():
    cache = make(max_batch=2, capacity=2, page_size=2)
    with pytest.raises(RuntimeError, match="no append"):
        cache.last_append_slots()
    step(cache, 3, torch.ones(2, 3, DT), lengths=torch.tensor([3, 1]))
    written = cache.last_append_slots()
    # row 0: only the last capacity=2 tokens are written; row 1: one valid token
    assert (written[0] >= 0).tolist() == [False, True, True] and (written[1] >= 0).tolist() == [True, False, False]
    assert cache.live_entries(2)[1].tolist() == [[1, 2], [0, -1]]
    cache.select_rows(torch.tensor([1, 0]))
    with pytest.raises(RuntimeError, match="selected"):
        cache.last_append_slots()


def _stream(B, steps, seed):
    """Random steps: (n, traj (B, n, DT) from a small bank incl. zeros, lengths (B,), pin (B, n))."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    bank = [torch.randn(DT, generator=g) for _ in range(3)] + [torch.zeros(DT)]
    out = []
    for _ in range(steps):
        n = rng.choice([1, 1, 2, 7])
        traj = torch.stack([torch.stack([rng.choice(bank) for _ in range(n)]) for _ in range(B)])
        lengths = torch.tensor([rng.randint(0, n) for _ in range(B)])
        out.append((n, traj, lengths, torch.rand(B, n, generator=g) < 0.1))
    return out


def _feed(cache, stream, rows=None):
    ev = []
    for n, traj, lengths, pin in stream:
        r = slice(None) if rows is None else rows
        ev.append(step(cache, n, traj[r], lengths[r], pin[r]))
    return ev


def _same_state(a, b, B):
    sa, pa = a.live_entries(B, a.max_slots)
    sb, pb = b.live_entries(B, b.max_slots)
    assert torch.equal(pa, pb)
    for layer in range(a.num_layers):
        for x, y in zip(a.read_slots(layer, sa), b.read_slots(layer, sb)):
            assert torch.equal(x, y)
    q = torch.randn(B, DT, generator=torch.Generator().manual_seed(B))
    assert torch.equal(a.relevance(q), b.relevance(q))  # logical layout, trajectories and timestamps
    assert torch.equal(a.live_slots()[:B], b.live_slots()[:B])
    for key in ("live", "evicted_total", "capacity"):
        assert torch.equal(a.stats()[key][:B], b.stats()[key][:B]), key
    assert int(a.stats()["pages_in_use"]) == int(b.stats()["pages_in_use"])
    assert torch.equal(a.next_position[:B], b.next_position[:B]) and torch.equal(a.now, b.now)


@pytest.mark.parametrize("rows", [[2, 0, 2], [1], [0, 0, 1, 1, 2, 2], [2, 1, 0]])
def test_select_rows_equals_rebuilding_the_selected_rows_from_scratch(rows):
    before, after = _stream(3, 6, seed=len(rows)), _stream(len(rows), 5, seed=7)
    idx = torch.tensor(rows)
    cache = make(max_batch=6)
    _feed(cache, before)
    cache.select_rows(idx)
    ref = make(max_batch=6)
    _feed(ref, before, rows=idx)
    _same_state(cache, ref, len(rows))
    assert int(cache.stats()["live"][len(rows):].abs().sum()) == 0 and bool((cache.page_table[len(rows):] < 0).all())
    for x, y in zip(_feed(cache, after), _feed(ref, after)):  # and both go on alike
        assert torch.equal(x, y)
    _same_state(cache, ref, len(rows))


def test_select_rows_checks_and_an_overcommitted_pool():
    cache = make(max_batch=4, capacity=4, page_size=2, num_pages=5)  # 4 rows would need 8 pages
    step(cache, 4, torch.ones(2, 4, DT))  # 2 rows, 4 pages
    before = {k: v.clone() for k, v in vars(cache).items() if isinstance(v, torch.Tensor)}
    with pytest.raises(RuntimeError, match="more than the pool"):
        cache.select_rows(torch.tensor([0, 1, 1]))
    for bad in ("bad", torch.tensor([0.0]), torch.tensor([True]), torch.zeros(1, 1, dtype=torch.long)):
        with pytest.raises(ValueError, match="1-D integer"):
            cache.select_rows(bad)
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        cache.select_rows(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="rows"):
        cache.select_rows(torch.zeros(5, dtype=torch.long))
    for name, t in before.items():  # refused calls change nothing
        assert torch.equal(t, getattr(cache, name)), name
    cache.append(0, *kv_of(torch.zeros(2, 1), 0), torch.ones(2, DT))
    with pytest.raises(RuntimeError, match="middle of a step"):
        cache.select_rows(torch.tensor([0]))
    cache.append(1, *kv_of(torch.zeros(2, 1), 1), torch.ones(2, DT))
    cache.step()
    cache.select_rows(torch.tensor([1, 0], dtype=torch.int32))
    assert cache.live_entries(2)[1].tolist() == [[1, 2, 3, 4], [1, 2, 3, 4]]


def test_live_entries_and_read_slots_bad_input():
    cache = make()
    with pytest.raises(ValueError, match="count"):
        cache.live_entries(1, cache.max_slots + 1)
    with pytest.raises(ValueError, match="rows"):
        cache.live_entries(4)
    with pytest.raises(ValueError, match="slots must be int64"):
        cache.read_slots(0, torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"-1 or in \[0,"):
        cache.read_slots(0, torch.tensor([[cache.num_pages * cache.page_size]]))
    with pytest.raises(IndexError, match="layer"):
        cache.read_slots(2, torch.zeros(1, 1, dtype=torch.long))
