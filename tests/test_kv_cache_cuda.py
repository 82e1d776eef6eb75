"""The paged KV cache on CUDA (Triton scoring and K/V writes, device-side bookkeeping).

Skipped without a GPU. Checks: the CUDA ops reproduce the CPU reference on a random stream (same
evictions, slots, page tables and fp32 scores), a CUDA-graph capture of one decode step
(kv_evict_append_ + kv_write_ + clock) replays exactly like eager, and no op syncs with the host.
"""
from __future__ import annotations

import random

import pytest
import torch

from trajops import reference as R
from trajops.kv_cache import PagedTrajectoryKVCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STATE = ("traj_pool", "ts_pool", "live_pool", "pinned_pool", "page_table", "live_count", "free_pages", "free_top",
         "evicted_total", "pos_pool", "next_position")


def _evict_args(c, traj, lengths, pin):
    st = [getattr(c, name) for name in STATE]
    return (*st[:6], c.capacity, *st[6:9], c.now, traj, lengths, pin, c.alpha, c.decay, *st[9:])


def _cpu_state(c):
    return {name: getattr(c, name).cpu() for name in STATE + ("k_pool", "v_pool", "now")}


def test_cuda_cache_matches_cpu_reference_on_a_random_stream():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    B, Dt, S, cap = 3, 16, 4, 21
    pages = B * (-(-cap // S)) + 2
    kw = dict(alpha=0.7, decay=0.1)
    gpu = PagedTrajectoryKVCache(2, pages, S, 2, 8, Dt, B, cap, device="cuda", **kw)
    cpu = PagedTrajectoryKVCache(2, pages, S, 2, 8, Dt, B, cap, **kw)
    bank = [torch.randn(Dt, generator=gen) for _ in range(5)] + [torch.zeros(Dt)]
    for step in range(150):
        n = rng.choice([1, 1, 3, cap + 2])
        lengths = torch.tensor([rng.randint(0, n) for _ in range(B)])
        traj = torch.stack([torch.stack([rng.choice(bank) for _ in range(n)]) for _ in range(B)])
        pin = torch.rand(B, n, generator=gen) < 0.05
        want = R.kv_evict_append_(*_evict_args(cpu, traj, lengths, pin))
        got = torch.ops.trajops.kv_evict_append_(*_evict_args(gpu, traj.cuda(), lengths.cuda(), pin.cuda()))
        for name, a, b in zip(("evicted", "written", "ok"), got, want):
            assert torch.equal(a.cpu(), b), (step, name)
        for layer in range(2):
            k = torch.randn(B, 2, n, 8, generator=gen)
            R.kv_write_(cpu.k_pool[layer], cpu.v_pool[layer], want[1], k, -k)
            torch.ops.trajops.kv_write_(gpu.k_pool[layer], gpu.v_pool[layer], got[1], k.cuda(), -k.cuda())
        cpu.step()
        gpu.step()
        for name, value in _cpu_state(gpu).items():
            assert torch.equal(value, getattr(cpu, name)), (step, name)
        q = torch.stack([rng.choice(bank) for _ in range(B)])
        pool = lambda c: (c.traj_pool, c.ts_pool, c.live_pool, c.page_table)  # noqa: E731
        assert torch.equal(torch.ops.trajops.kv_relevance(*pool(gpu), q.cuda(), gpu.now, 0.7, 0.1).cpu(),
                           R.kv_relevance(*pool(cpu), q, cpu.now, 0.7, 0.1))
        for k_top in (1, 8, cap + 3):
            a = torch.ops.trajops.kv_topk(*pool(gpu), q.cuda(), gpu.now, 0.7, 0.1, k_top)
            b = R.kv_topk(*pool(cpu), q, cpu.now, 0.7, 0.1, k_top)
            assert torch.equal(a[0].cpu(), b[0]) and torch.equal(a[1].cpu(), b[1]), (step, k_top)


def _decode_step(c, k, v, traj):
    c.append(0, k, v, traj)
    c.step()


def test_cuda_graph_capture_and_replay_of_a_decode_step_matches_eager():
    gen = torch.Generator().manual_seed(1)
    B, H, D, Dt, S, cap = 2, 2, 16, 8, 4, 10
    make = lambda: PagedTrajectoryKVCache(1, B * 3, S, H, D, Dt, B, cap, device="cuda")  # noqa: E731
    eager, graphed = make(), make()
    prefill = [torch.randn(B, H, 7, D, generator=gen).cuda(), torch.randn(B, 7, Dt, generator=gen).cuda()]
    for c in (eager, graphed):
        c.append(0, prefill[0], prefill[0], prefill[1])
        c.step()
    # static inputs of the captured step
    k_in = torch.zeros(B, H, 1, D, device="cuda")
    t_in = torch.zeros(B, Dt, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles the kernels) on a side stream, as capture requires
        scratch = make()
        for _ in range(2):
            _decode_step(scratch, k_in, k_in, t_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _decode_step(graphed, k_in, k_in, t_in)
    # capture recorded the work without running it: reset the graphed cache to the eager one
    for name in STATE + ("k_pool", "v_pool", "now"):
        getattr(graphed, name).copy_(getattr(eager, name))
    for _ in range(12):  # past capacity: every step evicts
        k = torch.randn(B, H, 1, D, generator=gen).cuda()
        t = torch.randn(B, Dt, generator=gen).cuda()
        _decode_step(eager, k, k, t)
        k_in.copy_(k)
        t_in.copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        for name in STATE + ("k_pool", "v_pool", "now"):
            assert torch.equal(getattr(graphed, name), getattr(eager, name)), name


def test_cuda_ops_do_not_sync():
    c = PagedTrajectoryKVCache(1, 8, 4, 1, 8, 8, 2, 9, device="cuda")
    k = torch.randn(2, 1, 3, 8, device="cuda")
    t = torch.randn(2, 8, device="cuda")
    c.append(0, k, k, t)  # compile the kernels before watching for syncs
    c.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            c.append(0, k, k, t)
            c.step()
        c.topk(t, 4)
        c.relevance(t)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_fused_topk_and_relevance_match_the_cpu_reference_on_long_rows():
    # rows of 4096 slots split over many programs (per-chunk top K, then the merge launch), exact score
    # ties (a bank of 4 trajectories; alpha 1 / decay 0), timestamp ties, NaN entries and a NaN query
    gen = torch.Generator().manual_seed(3)
    P, S, Dt, B, MP = 1200, 16, 8, 3, 256
    bank = R.kv_unit(torch.randn(4, Dt, generator=gen))
    traj = bank[torch.randint(0, 4, (P, S), generator=gen)]
    traj[5, 3, 0] = float("nan")
    ts = torch.randint(-3, 3, (P, S), generator=gen)
    live = torch.rand(P, S, generator=gen) < 0.8
    pt = torch.randperm(P, generator=gen)[: B * MP].view(B, MP)
    pt[1, ::7] = -1
    q = torch.randn(B, Dt, generator=gen)
    q[2, 1] = float("nan")
    same = lambda a, b: torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0, equal_nan=True)  # noqa: E731
    for alpha, decay in ((0.7, 0.1), (1.0, 0.1), (0.0, 0.0)):
        cpu = (traj, ts, live, pt, q, torch.tensor(4), alpha, decay)
        gpu = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in cpu)
        same(torch.ops.trajops.kv_relevance(*gpu), R.kv_relevance(*cpu))
        for k in (1, 64, 128, 129):  # 129: above the fused bound, the unfused path
            got, want = torch.ops.trajops.kv_topk(*gpu, k), R.kv_topk(*cpu, k)
            assert torch.equal(got[0].cpu(), want[0]), (alpha, k)
            same(got[1], want[1])
