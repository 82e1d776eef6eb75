"""Host time of one decode step on the paged path, per op and per layer (the GPU decode is launch-bound).

    python bench/decode_host.py [--device cuda|cpu] [--layers 30] [--keys 256] [--out DIR]

What it measures. Each op of a decode step is called ``--calls`` times back to back without a sync; the
wall time of that loop divided by the calls is the **host time per call** (Python checks, launcher,
dispatch, allocation). On a GPU the kernels run asynchronously behind it, so when the loop time exceeds the
GPU time the step is host-bound and this number is what a token costs. The loop is then synced and the
time to drain the queue is reported apart (``drain``). Shapes: SmolLM2-135M's attention (9 query heads over
3 KV heads, head dim 64), batch 1, one new token, ``--keys`` cached keys, bf16 on CUDA (fp32 on CPU).

Rows:
* ``paged_temperature_attention`` (the pools + the token's own key, one call per layer);
* ``kv_write_`` (the token's K/V into the pools, one call per layer);
* ``kv_evict_append_`` (the fused eviction, once per step, with the positions);
* ``ForwardKVCache stage+attend`` per layer (the whole paged protocol of trajops.hf, over ``--layers`` layers,
  the eviction included: the step's time / layers);
* ``dense cat + SDPA`` per layer (what transformers' DynamicCache + SDPA do: two cats and one SDPA call).

Writes ``<out>/decode-host-<device>.md`` (default ``bench/results``). Tests never assert on these numbers.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from trajops.kv_cache import PagedTrajectoryKVCache  # noqa: E402
from trajops.kv_forward import ForwardKVCache  # noqa: E402


def _host(fn, calls: int, sync) -> tuple:
    """(host us per call, drain us per call): loop without syncing, then sync."""
    for _ in range(20):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t1) / calls * 1e6


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--keys", type=int, default=256)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    B, Hq, Hkv, D, N, L = 1, 9, 3, 64, args.keys, args.layers
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device=dev, dtype=dtype)  # noqa: E731
    rows = []

    # the ops alone, on a store holding N keys per row
    store = PagedTrajectoryKVCache(1, B * -(-N // 16), 16, Hkv, D, D, B, N, dtype=dtype, device=dev)
    k = rnd(B, Hkv, N, D)
    store.append(0, k, k, rnd(B, N, D).float())
    store.step()
    kp, vp = store.layer_pools(0)
    q, kn = rnd(B, Hq, 1, D), rnd(B, Hkv, 1, D)
    tau = torch.ones((), device=dev)
    table, live = store.page_table.clone(), store.live_pool.clone()
    ops = torch.ops.trajops
    rows.append(("paged_temperature_attention (+ the token's key)", *_host(
        lambda: ops.paged_temperature_attention(q, kp, vp, table, live, tau, None, D ** -0.5, kn, kn), args.calls, sync)))
    written = torch.zeros(B, 1, dtype=torch.long, device=dev)
    rows.append(("kv_write_", *_host(lambda: ops.kv_write_(kp, vp, written, kn, kn), args.calls, sync)))

    traj = rnd(B, 1, D).float()

    def evict():
        store.append(0, kn, kn, traj)
        store.step()
    rows.append(("kv_evict_append_ + positions (store.append layer 0, step)", *_host(evict, args.calls, sync)))

    # the paged protocol of one decode step over L layers (the eviction once), per layer
    cache = ForwardKVCache(L, N, D, max_batch_size=B, device=dev, dtype=dtype)
    with torch.no_grad():
        for layer in range(L):
            pk = rnd(B, Hkv, N, D)
            cache.stage(pk, pk, layer)
            cache.attend(rnd(B, Hq, N, D), layer, scale=D ** -0.5)
        ks = [rnd(B, Hkv, 1, D) for _ in range(L)]

        def step():
            for layer in range(L):
                cache.stage(ks[layer], ks[layer], layer)
                cache.attend(q, layer, scale=D ** -0.5)
        host, drain = _host(step, max(10, args.calls // L), sync)
        rows.append((f"ForwardKVCache stage + attend, per layer ({L} layers, eviction included)", host / L, drain / L))

        dk = rnd(B, Hkv, N, D)

        def dense():
            for layer in range(L):
                kk, vv = torch.cat([dk, ks[layer]], dim=-2), torch.cat([dk, ks[layer]], dim=-2)
                F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)
        host, drain = _host(dense, max(10, args.calls // L), sync)
        rows.append((f"dense: 2 cats + SDPA over {N + 1} keys, per layer", host / L, drain / L))

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    lines = [f"# Host time of a decode step ({name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')})", "",
             f"B={B}, Hq={Hq}/Hkv={Hkv}, D={D}, {N} cached keys, {dtype}; `python bench/decode_host.py` "
             "(see its docstring). host = loop time / calls without a sync; drain = the wait for the queue after.",
             "", "| what | host us per call | drain us per call |", "|---|---|---|"]
    lines += [f"| {what} | {h:.1f} | {d:.1f} |" for what, h, d in rows]
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"decode-host-{name.lower().replace(' ', '-')}.md")
    with open(path, "w") as fh:
        fh.write(text)
    print(text + f"wrote {path}")
    return text


if __name__ == "__main__":
    main()
