"""Benchmarks of ``trajops.paged_temperature_attention(q, cache, layer, tau)``: one decode step of
attention (n = 1 query per row) over a paged KV cache holding N live tokens, N = 1k, 8k, 32k.

Shape: B=1, Hq=32 query heads over Hkv=8 KV heads (GQA), D=128, page_size 16, tau (B, Hq, 1)
fp32; fp32 on CPU, bf16 on CUDA. The cache is filled to N through ``append`` (a full cache at
capacity, as in steady-state decoding) outside the timed region; forward only (inference op).

Providers (roles in harness.py):
  eager     gather + attention: the live slots gathered into a dense (B, Hkv, N, D) copy through
            the page table (trajops.reference.paged_gather), then trajops.temperature_attention with
            the live mask -- what the op saves;
  compiled  torch.compile of that gather + an SDPA composite (q / tau, bool mask, enable_gqa);
  dense_cat the default dense cache's decode step (transformers' DynamicCache): torch.cat of the
            cached (B, Hkv, N-1, D) K and V with the new token's, then SDPA on (q / tau);
  dense     the same attention on an already dense (B, Hkv, N, D) K/V (a static cache, no cat):
            the floor any dense cache can reach;
  target    trajops.paged_temperature_attention (reads K/V straight from the pools);
  roofline  one read of the live K and V bytes (k_pool.sum() + v_pool.sum() over the used pages).
On CUDA also, as "other": trajops and the dense SDPA step each captured in a CUDA graph and replayed
(on static copies of the same q and tau): decode at these sizes is bound by kernel launches and
Python, which a graphed decode loop removes; these two rows show the kernels' own time.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import trajops
from harness import Case, Context, Provider
from trajops import reference as R

OP = "paged_temperature_attention"


def gather_attention(q, tau, k_pool, v_pool, page_table, live_pool):
    """Dense gather of the live slots, then the fused attention op over them with a key mask."""
    k, v, ok = R.paged_gather(k_pool, v_pool, page_table, live_pool, q.shape[0])
    return trajops.temperature_attention(q, k, v, tau, attn_mask=ok[:, None, None, :])


def gather_sdpa(q, tau, k_pool, v_pool, page_table, live_pool):
    """The same in plain PyTorch (for torch.compile): gather, fold 1/tau into q, masked SDPA."""
    k, v, ok = R.paged_gather(k_pool, v_pool, page_table, live_pool, q.shape[0])
    qs = (q / tau[..., None]).to(q.dtype)
    return F.scaled_dot_product_attention(qs, k, v, attn_mask=ok[:, None, None, :], enable_gqa=True)


def dense_step(q, tau, k, v):
    return F.scaled_dot_product_attention((q / tau[..., None]).to(q.dtype), k, v, enable_gqa=True)


def _graphed(fn, q, tau):
    """fn(q, tau) captured in a CUDA graph on static copies of q and tau; returns a replay function."""
    sq, st = q.clone(), tau.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            fn(sq, st)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = fn(sq, st)

    def replay(*_):
        graph.replay()
        return out
    return replay


def _backend(device) -> str:
    key = "CUDA" if device.type == "cuda" else "CPU"
    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"trajops::{OP}", key)
    except Exception:  # noqa: BLE001 -- private API moved: trust the package's own word
        has = True
    return trajops.backends()[device.type] if has else "reference"


def _filled_cache(N, B, Hkv, D, S, dtype, device, gen):
    Dt = 16
    cache = trajops.PagedTrajectoryKVCache(1, B * -(-N // S), S, Hkv, D, Dt, B, N, dtype=dtype, device=device)
    chunk = min(N, 4096)
    for start in range(0, N, chunk):
        n = min(chunk, N - start)
        k = torch.randn(B, Hkv, n, D, generator=gen).to(device=device, dtype=dtype)
        v = torch.randn(B, Hkv, n, D, generator=gen).to(device=device, dtype=dtype)
        cache.append(0, k, v, torch.randn(B, n, Dt, generator=gen).to(device))
        cache.step()
    assert bool((cache.live_count[:B] == N).all()), cache.stats()
    return cache


def benchmarks(ctx: Context):
    dev = ctx.device
    B, Hq, Hkv, D, S = 1, 32, 8, 128, 16
    Ns = (256, 1024) if ctx.quick else (1024, 8192, 32768)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    esize = torch.finfo(dtype).bits // 8
    backend = _backend(dev)
    gen = torch.Generator().manual_seed(0)
    compiled = torch.compile(gather_sdpa, dynamic=False) if ctx.compile else None
    items = []
    for N in Ns:
        cache = _filled_cache(N, B, Hkv, D, S, dtype, dev, gen)
        pools = (cache.k_pool[0], cache.v_pool[0], cache.page_table, cache.live_pool)
        k_dense, v_dense, ok = R.paged_gather(*pools, B)
        assert bool(ok.all())
        k_prev, v_prev = k_dense[:, :, :-1].contiguous(), v_dense[:, :, :-1].contiguous()
        k_new, v_new = k_dense[:, :, -1:].contiguous(), v_dense[:, :, -1:].contiguous()
        used = cache.num_pages  # every page is in use: the cache is full
        k_used, v_used = cache.k_pool[0][:used], cache.v_pool[0][:used]

        def make(N=N):
            g = torch.Generator(device=dev).manual_seed(N)
            q = torch.randn(B, Hq, 1, D, generator=g, device=dev).to(dtype)
            tau = 0.5 + torch.rand(B, Hq, 1, generator=g, device=dev)
            return q, tau

        q, tau = make()
        with torch.no_grad():
            want = gather_attention(q, tau, *pools).float()
            got = trajops.paged_temperature_attention(q, cache, 0, tau).float()
        err = float((got - want).abs().max())
        check = f"max |trajops - gather+attention| at set-up, N={N}: {err:.2g}"
        if not err <= (2e-2 if dtype == torch.bfloat16 else 1e-4):
            print(f"    [{OP}] {check}", flush=True)
        nbytes = 2 * B * N * Hkv * D * esize + B * Hq * D * esize * 2
        case = Case(OP, f"decode n=1 B={B} N={N} Hq={Hq} Hkv={Hkv} D={D} page={S}", dtype, make,
                    modes=("fwd",), bytes={"fwd": nbytes},
                    info={"B": B, "N": N, "Hq": Hq, "Hkv": Hkv, "D": D, "page_size": S, "check": check})
        provs = [
            Provider("eager", "gather + temperature_attention",
                     lambda q, tau, pools=pools: gather_attention(q, tau, *pools), role="eager",
                     note="reference.paged_gather of every live slot into a dense (B, Hkv, N, D) K and V, then "
                          "trajops.temperature_attention(q, k, v, tau, attn_mask=live)"),
        ]
        if compiled is not None:
            provs.append(Provider("compiled", "torch.compile(gather + SDPA)",
                                  lambda q, tau, pools=pools: compiled(q, tau, *pools), role="compiled", warmup=2,
                                  note="torch.compile(dynamic=False) of paged_gather + SDPA(q / tau, mask, GQA)"))
        provs += [
            Provider("dense_cat", "dense cache: cat + SDPA",
                     lambda q, tau, kp=k_prev, vp=v_prev, kn=k_new, vn=v_new: dense_step(
                         q, tau, torch.cat([kp, kn], 2), torch.cat([vp, vn], 2)), role="other",
                     note="transformers' default DynamicCache decode step: torch.cat of the cached K/V with the new "
                          "token's, then SDPA(q / tau, k, v, enable_gqa=True)"),
            Provider("dense", "dense K/V + SDPA (no cat)",
                     lambda q, tau, k=k_dense, v=v_dense: dense_step(q, tau, k, v), role="other",
                     note="SDPA(q / tau) over an already dense K/V (a static cache): no gather, no copy"),
            Provider("trajops", f"trajops ({backend})",
                     lambda q, tau, c=cache: trajops.paged_temperature_attention(q, c, 0, tau), role="target",
                     note="trajops.paged_temperature_attention(q, cache, 0, tau): K/V read through the page table. "
                          + check),
            Provider("roofline", "roofline (read K and V once)",
                     lambda *_, k=k_used, v=v_used: k.sum() + v.sum(), role="roofline",
                     note="k_pool.sum() + v_pool.sum() over the used pages: one read of the cached K and V"),
        ]
        if dev.type == "cuda":
            provs += [
                Provider("trajops_graph", "trajops, CUDA graph replay",
                         _graphed(lambda q, tau, c=cache: trajops.paged_temperature_attention(q, c, 0, tau), q, tau),
                         role="other", note="the trajops call captured once in a CUDA graph, replayed"),
                Provider("dense_graph", "dense K/V + SDPA, CUDA graph replay",
                         _graphed(lambda q, tau, k=k_dense, v=v_dense: dense_step(q, tau, k, v), q, tau),
                         role="other", note="the dense SDPA step captured once in a CUDA graph, replayed"),
            ]
        items.append((case, provs))
    return items
