"""The fused Triton kv_topk / kv_relevance (triton_kernels/kv_topk.py) against the reference, bit for bit.

Runs only where the CPU backend is the Triton interpreter (TRAJOPS_BACKEND=triton TRITON_INTERPRET=1):
the other backends do not run these kernels. States are built by hand to hit what the 128-bit ranking
key must reproduce: exact score ties (alpha = 1 with repeated trajectories; alpha = 0, decay = 0),
timestamp ties and timestamps across the whole int64 range, NaN/inf trajectories and queries, dead
slots, k = 1, k > live, k > L, k at the fused bound and above it (the unfused fallback), corrupt
page-table entries (the CUDA semantics: called through the launcher, since the CPU op raises), and
rows split over several programs (the per-chunk top K + merge launch, the bitonic network).
"""
from __future__ import annotations

import pytest
import torch

import trajops
from trajops import reference as R

pytestmark = pytest.mark.skipif(trajops.backends()["cpu"] != "triton-interpreter",
                                reason="tests the Triton kernels: run with TRAJOPS_BACKEND=triton TRITON_INTERPRET=1")

OPS = torch.ops.trajops


def _kernels():
    from trajops.triton_kernels import kv_topk

    return kv_topk


def _state(seed: int, P: int, S: int, Dt: int, B: int, MP: int, *, n_bank: int = 3, live_p: float = 0.7,
           ts_lo: int = 0, ts_hi: int = 4, holes: bool = True):
    """(traj_pool, ts_pool, live_pool, page_table): trajectories drawn from a small bank (exact score
    ties), timestamps in [ts_lo, ts_hi) (ties), random liveness, rows owning distinct random pages."""
    gen = torch.Generator().manual_seed(seed)
    bank = R.kv_unit(torch.randn(n_bank, Dt, generator=gen))
    traj = bank[torch.randint(0, n_bank, (P, S), generator=gen)]
    ts = torch.randint(ts_lo, ts_hi, (P, S), generator=gen)
    live = torch.rand(P, S, generator=gen) < live_p
    perm = torch.randperm(P, generator=gen)[: B * MP].view(B, MP)
    if holes:
        perm = torch.where(torch.rand(B, MP, generator=gen) < 0.25, -1, perm)
    return traj, ts, live, perm


def _same(got, want, what):
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _check(state, query, now, alpha, decay, ks, op=True):
    args = (*state, query, torch.tensor(now), alpha, decay)
    if op:
        _same(OPS.kv_relevance(*args), R.kv_relevance(*args), "relevance")
    for k in ks:
        got = OPS.kv_topk(*args, k) if op else _kernels().kv_topk(*args, k)
        want = R.kv_topk(*args, k)
        assert torch.equal(got[0], want[0]), (k, got[0], want[0])
        _same(got[1], want[1], f"scores k={k}")


@pytest.mark.parametrize("alpha,decay", [(1.0, 0.1), (0.0, 0.0), (0.7, 0.1)])
def test_score_and_timestamp_ties_small_rows(alpha, decay):
    # alpha 1: equal trajectories tie exactly, ts decides, then the slot; alpha 0, decay 0: every live
    # slot scores 1.0, the order is ts then slot alone
    state = _state(1, P=10, S=4, Dt=3, B=2, MP=4)
    q = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    _check(state, q, 5, alpha, decay, ks=(1, 3, 9, 16, 21))


def test_timestamps_over_the_whole_int64_range():
    # exact score ties (decay 0: recency 1 whatever the age); the ts order alone ranks, across signs
    # and the high 32 bits of the key's timestamp field
    traj, ts, live, pt = _state(3, P=8, S=4, Dt=2, B=2, MP=4, n_bank=1, live_p=0.9)
    big = torch.tensor([-2**63, -2**62, -2**32 - 1, -2**32, -1, 0, 2**31, 2**32, 2**32 + 1, 2**62, 2**63 - 1])
    ts = big[torch.randint(0, big.numel(), ts.shape, generator=torch.Generator().manual_seed(4))]
    _check((traj, ts, live, pt), torch.ones(2, 2), 7, 0.5, 0.0, ks=(1, 5, 16))


def test_non_finite_trajectories_and_queries():
    traj, ts, live, pt = _state(5, P=10, S=4, Dt=3, B=3, MP=3, live_p=0.9)
    traj = traj.clone()
    traj[0, 1, 0] = float("nan")
    traj[1, 2, 2] = float("inf")
    traj[pt[0, 0].clamp_min(0), 3] = float("nan")
    q = torch.randn(3, 3, generator=torch.Generator().manual_seed(6))
    q[1, 0] = float("nan")  # a NaN query: the whole row scores NaN and ranks by age, then slot
    q[2] = 0.0  # a zero query: cos 0
    _check((traj, ts, live, pt), q, 4, 0.7, 0.1, ks=(1, 4, 12, 13))


def test_dead_rows_and_empty_tables():
    traj, ts, live, pt = _state(7, P=6, S=4, Dt=2, B=3, MP=2)
    live = live.clone()
    live[pt[0].clamp_min(0)] = False  # row 0: pages but nothing live
    pt = pt.clone()
    pt[1] = -1  # row 1: no page at all
    _check((traj, ts, live, pt), torch.randn(3, 2), 3, 0.7, 0.1, ks=(1, 2, 8, 11))


def test_corrupt_page_table_entries_flag_the_row():
    # CUDA semantics (the CPU op raises before): entries outside [-1, P) read as absent, the row's
    # slots are -1 and its scores NaN; other rows are unaffected
    traj, ts, live, pt = _state(8, P=10, S=2, Dt=2, B=3, MP=3, live_p=1.0)
    pt = pt.clone()
    pt[0, 1] = 10
    pt[2, 0] = -2
    args = (traj, ts, live, pt, torch.randn(3, 2), torch.tensor(3), 0.7, 0.1)
    _same(_kernels().kv_relevance(*args), R.kv_relevance(*args), "relevance")
    _check((traj, ts, live, pt), args[4], 3, 0.7, 0.1, ks=(1, 4, 7), op=False)
    slots, scores = _kernels().kv_topk(*args, 4)
    assert (slots[0] == -1).all() and scores[0].isnan().all() and (slots[1] >= 0).any()


def test_k_at_the_fused_bound_and_above(monkeypatch):
    K = _kernels()
    traj, ts, live, pt = _state(9, P=40, S=4, Dt=2, B=1, MP=36, live_p=0.95, holes=False)
    args = (traj, ts, live, pt, torch.randn(1, 2), torch.tensor(4), 0.7, 0.1)
    assert K.kv_topk(*args, K.K_MAX + 1) is None  # the op falls back to the unfused path
    calls = []
    monkeypatch.setattr(K, "kv_topk", lambda *a: calls.append(a[-1]) or None)  # fallback, checked below
    got = OPS.kv_topk(*args, 5)
    want = R.kv_topk(*args, 5)
    assert calls == [5] and torch.equal(got[0], want[0])
    monkeypatch.undo()
    _check((traj, ts, live, pt), args[4], 4, 0.7, 0.1, ks=(K.K_MAX, K.K_MAX + 1))


def test_rows_split_over_programs_merge_exactly(monkeypatch):
    # 8-slot blocks, several chunks per row: per-chunk bitonic top K, then the merge launch
    K = _kernels()
    monkeypatch.setattr(K, "BLOCK", 8)
    monkeypatch.setattr(K, "SPLIT_ROWS_IN_INTERPRETER", True)
    state = _state(10, P=24, S=4, Dt=3, B=2, MP=10, n_bank=2, ts_hi=3)
    q = torch.randn(2, 3, generator=torch.Generator().manual_seed(11))
    _check(state, q, 3, 1.0, 0.1, ks=(1, 2, 8, 13))
    _check(state, q, 3, 0.0, 0.0, ks=(5,))


def test_one_program_bitonic_rows():
    # rows longer than the counting path's 32 slots, one program: the bitonic network in a single block
    state = _state(12, P=24, S=8, Dt=2, B=2, MP=6, n_bank=2)
    _check(state, torch.randn(2, 2, generator=torch.Generator().manual_seed(13)), 3, 0.7, 0.1, ks=(1, 6))
