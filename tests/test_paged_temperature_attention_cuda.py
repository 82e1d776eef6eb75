"""trajops.paged_temperature_attention on CUDA (Triton) against the fp64 reference on the CPU.

Skipped without a GPU. Covers what the CPU test file cannot: the real Triton kernels at decode sizes
(many pages, long rows split across programs), half types, and a CUDA-graph capture of a decode step
(append + paged attention) replaying exactly like eager.
"""
from __future__ import annotations

import math

import pytest
import torch

import trajops
from trajops import reference as R
from trajops.kv_cache import PagedTrajectoryKVCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _stream(B, Hkv, D, S, cap, chunks, dtype, gen, device="cuda"):
    c = PagedTrajectoryKVCache(2, B * -(-cap // S), S, Hkv, D, 8, B, cap, dtype=dtype, device=device)
    for n in chunks:
        lengths = torch.randint(0, n + 1, (B,), generator=gen)
        lengths[0] = n
        traj = torch.randn(B, n, 8, generator=gen)
        for layer in range(2):
            k = torch.randn(B, Hkv, n, D, generator=gen).to(dtype)
            c.append(layer, k.to(device), (-k).to(device), traj.to(device), lengths=lengths.to(device))
        c.step()
    return c


def _oracle(q, c, layer, tau, scale, slots=None):
    out, lse = R.paged_temperature_attention(
        q.double().cpu(), c.k_pool[layer].double().cpu(), c.v_pool[layer].double().cpu(), c.page_table.cpu(),
        c.live_pool.cpu(), tau.double().cpu(), None if slots is None else slots.cpu(), scale)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 5])
def test_new_keys_match_reference(dtype, n):
    """k_new / v_new on CUDA (the split kernel + the merge kernel, which scores the new keys)."""
    gen = torch.Generator().manual_seed(2)
    B, Hq, Hkv, D, S = 3, 8, 2, 64, 16
    c = _stream(B, Hkv, D, S, 2000, [900, 1, 1100, 2], dtype, gen)
    q = torch.randn(B, Hq, n, D, generator=gen).to(dtype)
    k_new = torch.randn(B, Hkv, n, D, generator=gen).to(dtype)
    v_new = torch.randn(B, Hkv, n, D, generator=gen).to(dtype)
    tau = torch.rand(B, Hq, n, generator=gen) + 0.5
    tau[2, 1, 0] = -1.0  # a bad tau row
    for layer in (0, 1):
        out, lse = trajops.paged_temperature_attention(q.cuda(), c, layer, tau.cuda(), k_new=k_new.cuda(),
                                                       v_new=v_new.cuda(), return_lse=True)
        e_out, e_lse = R.paged_temperature_attention(
            q.double(), c.k_pool[layer].double().cpu(), c.v_pool[layer].double().cpu(), c.page_table.cpu(),
            c.live_pool.cpu(), tau.double(), None, 1 / math.sqrt(D), k_new.double(), v_new.double())
        _close(out, e_out, TOL[dtype])
        _close(lse, e_lse, TOL[dtype])


def _close(a, e, tol):
    scale = max(1.0, float(e.abs().nan_to_num(0, 0, 0).max())) if e.numel() else 1.0
    torch.testing.assert_close(a.double().cpu(), e, atol=tol * scale, rtol=tol, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [1, 4])
def test_matches_reference(dtype, n):
    gen = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, S = 3, 8, 2, 64, 16
    c = _stream(B, Hkv, D, S, 3000, [1000, 1, 1700, 5, 900, 3], dtype, gen)  # evictions: holes, partial pages
    q = torch.randn(B, Hq, n, D, generator=gen).to(dtype).cuda()
    tau = (torch.rand(B, Hq, n, generator=gen) + 0.5).cuda()
    tau[1, 2, 0] = 0.0  # a bad tau row
    for layer in (0, 1):
        out, lse = trajops.paged_temperature_attention(q, c, layer, tau, return_lse=True)
        e_out, e_lse = _oracle(q, c, layer, tau, 1 / math.sqrt(D))
        _close(out, e_out, TOL[dtype])
        _close(lse, e_lse, TOL[dtype])
        assert torch.isnan(out[1, 2, 0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slots_and_long_rows(dtype):
    gen = torch.Generator().manual_seed(1)
    B, Hq, Hkv, D, S = 2, 32, 8, 128, 16
    c = _stream(B, Hkv, D, S, 32768, [8192] * 4 + [1] * 3, dtype, gen)
    q = torch.randn(B, Hq, 1, D, generator=gen).to(dtype).cuda()
    tau = torch.tensor(0.7, device="cuda")
    for slots in (None, c.topk(torch.randn(B, 8, generator=gen).cuda(), 2048)[0],
                  torch.randint(-3, c.max_slots + 3, (B, 300), generator=gen).cuda()):
        out, lse = trajops.paged_temperature_attention(q, c, 1, tau, slots=slots, return_lse=True)
        e_out, e_lse = _oracle(q, c, 1, tau, 1 / math.sqrt(D), slots)
        _close(out, e_out, TOL[dtype])
        _close(lse, e_lse, TOL[dtype])


def test_empty_rows_and_rows_beyond_b():
    gen = torch.Generator().manual_seed(2)
    c = _stream(3, 2, 32, 8, 100, [50, 3], torch.float32, gen)
    q = torch.randn(2, 4, 1, 32, generator=gen).cuda()
    out, lse = trajops.paged_temperature_attention(q, c, 0, 1.0, return_lse=True,
                                                   slots=torch.full((2, 5), -1, device="cuda"))
    assert (out == 0).all() and (lse == -math.inf).all()
    out, lse = trajops.paged_temperature_attention(q, c, 0, 1.0, return_lse=True)
    e_out, e_lse = _oracle(q, c, 0, torch.tensor(1.0), 1 / math.sqrt(32))
    _close(out, e_out, TOL[torch.float32])
    _close(lse, e_lse, TOL[torch.float32])


def test_cuda_graph_decode_step_replays_like_eager():
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, D, S, cap = 2, 8, 2, 64, 16, 200
    make = lambda: _stream(B, Hkv, D, S, cap, [150], torch.bfloat16, torch.Generator().manual_seed(9))  # noqa: E731
    eager, graphed, scratch = make(), make(), make()
    k_in = torch.zeros(B, Hkv, 1, D, device="cuda", dtype=torch.bfloat16)
    t_in = torch.zeros(B, 8, device="cuda")
    q_in = torch.zeros(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
    tau = torch.full((Hq, 1), 0.8, device="cuda")

    def step(c):
        for layer in range(2):
            c.append(layer, k_in, -k_in, t_in)
        out = trajops.paged_temperature_attention(q_in, c, 1, tau)
        c.step()
        return out

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step(scratch)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = step(graphed)
    for name in ("k_pool", "v_pool", "traj_pool", "ts_pool", "live_pool", "pinned_pool", "page_table",
                 "live_count", "free_pages", "free_top", "evicted_total", "now"):
        getattr(graphed, name).copy_(getattr(eager, name))
    for i in range(80):  # past capacity: evictions every step
        k = torch.randn(B, Hkv, 1, D, generator=gen).to(torch.bfloat16).cuda()
        t = torch.randn(B, 8, generator=gen).cuda()
        q = torch.randn(B, Hq, 1, D, generator=gen).to(torch.bfloat16).cuda()
        k_in.copy_(k)
        t_in.copy_(t)
        q_in.copy_(q)
        want = step(eager)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_static, want), i
        assert torch.equal(graphed.live_pool, eager.live_pool)


def test_forward_cache_with_a_padding_mask_fuses_the_new_keys(monkeypatch):
    """On CUDA a mask over the new keys is read once per forward (one sync), so a decode step with left padding
    takes the one-call path (k_new / v_new); its attention equals the merge path's (new keys apart + lse merge).
    While a CUDA graph is captured the mask is not read (causal_new_keys says False)."""
    import trajops.kv_attention as KA
    from trajops.kv_forward import ForwardKVCache

    def run(fused):
        monkeypatch.setattr(KA, "_MAX_FUSED_NEW", 16 if fused else 0)
        gen = torch.Generator().manual_seed(4)
        c = ForwardKVCache(2, 12, 8, max_batch_size=2, device="cuda")
        outs = []
        with torch.no_grad():
            for n in (5, 1, 1, 2, 1):
                live = c.live
                mask = torch.ones(2, 1, n, live + n, dtype=torch.bool).tril(live)
                mask[1, :, :, :min(2, live)] = False  # row 1: two padded old keys
                for layer in range(2):
                    k, v = torch.randn(2, 2, n, 8, generator=gen), torch.randn(2, 2, n, 8, generator=gen)
                    q = torch.randn(2, 4, n, 8, generator=gen)
                    c.stage(k.cuda(), v.cuda(), layer)
                    outs.append(c.attend(q.cuda(), layer, scale=0.3, attn_mask=mask.cuda()))
        return outs

    for a, b in zip(run(True), run(False)):
        _close(a, b.cpu().double(), 2e-5)
    monkeypatch.setattr(KA, "_MAX_FUSED_NEW", 16)
    mask = torch.ones(2, 1, 1, 1, dtype=torch.bool, device="cuda")
    assert KA.causal_new_keys(mask, 1, mask.device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        seen = KA.causal_new_keys(mask, 1, mask.device)
        mask.logical_and(mask)  # (a graph with one kernel)
    assert seen is False


def test_forward_cache_reuses_the_padding_map_on_cuda():
    """A left-padded decode stream (pinned padding, evictions past the capacity) reuses the map of hidden slots
    between steps on CUDA as on CPU (one host read per forward instead of ~20 launches), with the CPU's results."""
    from trajops.kv_forward import ForwardKVCache

    def run(device):
        gen = torch.Generator().manual_seed(5)
        c = ForwardKVCache(2, 9, 8, max_batch_size=2, device=device)
        pad = torch.ones(2, 6, dtype=torch.long)
        pad[1, :2] = 0
        c.mark_padding(pad)
        outs, reused = [], []
        with torch.no_grad():
            for n in (6, 1, 1, 1, 1, 1, 1, 1):  # capacity 9: steps 4.. evict
                live = c.live
                mask = torch.ones(2, 1, n, live + n, dtype=torch.bool).tril(live)
                mask[1, :, :, :2] = False  # row 1's padding, the first two keys in position order
                for layer in range(2):
                    k, v = torch.randn(2, 2, n, 8, generator=gen), torch.randn(2, 2, n, 8, generator=gen)
                    q = torch.randn(2, 4, n, 8, generator=gen)
                    c.stage(k.to(device), v.to(device), layer)
                    outs.append(c.attend(q.to(device), layer, scale=0.3, attn_mask=mask.to(device)).cpu())
                reused.append(c._hidden_pins is not None)
        return outs, reused

    (want, want_reused), (got, got_reused) = run("cpu"), run("cuda")
    assert got_reused == want_reused and all(got_reused[1:]), (got_reused, want_reused)
    for a, b in zip(got, want):
        _close(a, b.double(), 2e-5)
