"""Benchmarks of ``trajops.trajectory_flow(x, window, eps)``, x of shape (B, T, D).

Providers (roles in harness.py): a seed-style Python loop timed on a slice of positions and
extrapolated; the eager reference; torch.compile(reference); trajops; and a memory roofline.

``python bench/bench_trajectory_flow.py --packed`` (not part of ``make bench``): packed documents
(total, D) with ``cu_seqlens`` against the same tokens padded to a (N, max_len, D) batch: time and
peak memory, forward and forward+backward, printed (nothing written).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # harness, when run as a script

import trajops  # noqa: E402
from harness import Case, Context, Provider, _sample, peak_memory  # noqa: E402
from trajops import reference as ref  # noqa: E402

OP = "trajectory_flow"
EPS = 1e-6


def naive_flow(x, window, eps, seq, positions):
    """Seed-style loop: out[p] for the given positions of sequence `seq` of x (B, T, D)."""
    xs = x[seq]
    rows = []
    for p in positions:
        ws = min(window, p)
        vecs, weights = [], []
        for i in range(p - ws, p):
            d = xs[i + 1] - xs[i]
            n = torch.linalg.vector_norm(d)
            if n > eps:
                vecs.append(d / n)
                weights.append((i - (p - ws) + 1) / ws * torch.tanh(n))
        if vecs:
            w = torch.stack(weights)
            rows.append((w[:, None] * torch.stack(vecs)).sum(0) / w.sum())
        else:
            rows.append(torch.zeros_like(xs[p]))
    return torch.stack(rows)


def _inputs(B, T, D, dtype, device):
    """A random walk whose steps have norm ~1, so tanh(n) is not saturated; seeded."""
    gen = torch.Generator().manual_seed(0)
    steps = torch.randn(B, T, D, generator=gen) / D**0.5
    return lambda: (steps.to(device).cumsum(1).to(dtype),)


def benchmarks(ctx: Context):
    """List of (Case, [Provider]) for this op on ctx.device."""
    dev = ctx.device
    if ctx.quick:
        B, T, D, slice_len = 2, 64, 32, 16
    elif dev.type == "cuda":
        B, T, D, slice_len = 8, 4096, 4096, 64
    else:
        B, T, D, slice_len = 8, 2048, 1024, 128
    window = 8
    compiled = torch.compile(ref.trajectory_flow, dynamic=False) if ctx.compile else None
    backend = trajops.backends()[dev.type]
    target = Provider("trajops", f"trajops ({backend})", lambda x: trajops.trajectory_flow(x, window, EPS),
                      role="target")
    seq, p0 = B // 2, T // 2 - slice_len // 2
    items = []
    for dtype in (torch.float32, torch.bfloat16):
        nbytes = B * T * D * torch.finfo(dtype).bits // 8
        case = Case(OP, f"B={B} T={T} D={D} w={window}", dtype, _inputs(B, T, D, dtype, dev),
                    info={"B": B, "T": T, "D": D, "window": window, "eps": EPS},
                    # ideal: fwd reads x, writes out; bwd reads x and grad_out, writes grad_x
                    bytes={"fwd": 2 * nbytes, "fwd+bwd": 5 * nbytes})
        provs = [
            Provider("naive", "seed-style Python loop", backward=False, role="naive",
                     fn=lambda x: naive_flow(x, window, EPS, seq, range(p0, p0 + slice_len)),
                     extrapolate=B * T / slice_len,
                     note=f"timed on positions {p0}..{p0 + slice_len - 1} of sequence {seq} (full windows), "
                          f"extrapolated x{B * T // slice_len} to all B*T positions; forward only"),
            Provider("eager", "eager reference", lambda x: ref.trajectory_flow(x, window, EPS), role="eager"),
        ]
        if compiled is not None:
            provs.append(Provider("compile", "torch.compile(reference)", lambda x: compiled(x, window, EPS),
                                  role="compiled", warmup=2,
                                  note="dynamic=False; compile time excluded (spent in the warm-up calls)"))
        provs += [
            target,
            Provider("roofline", "roofline (clone)", lambda x: x.clone(), role="roofline",
                     fwd_bwd=lambda inp, g: (inp[0].clone(), torch.add(inp[0], g)),
                     note="fwd: x.clone() (reads x, writes out). fwd+bwd: x.clone() then x + grad_out: the bytes "
                          "of an ideal fused forward kernel plus a fused backward that recomputes from x "
                          "(reads x and grad_out, writes grad_x) = 5x the size of x"),
        ]
        items.append((case, provs))
    return items


# ---------------------------------------------------------------- packed vs padded (cu_seqlens)
def packed_vs_padded(n_docs: int = 16, max_len: int = 2048, D: int = 1024, window: int = 8, reps: int = 7,
                     dtype: torch.dtype = torch.float32, seed: int = 0) -> list:
    """Time and peak memory of one batch of documents, packed with cu_seqlens vs padded (CPU).

    Document lengths are uniform in [16, max_len] (the longest set to max_len): the padded batch
    (n_docs, max_len, D) holds about twice the packed (total, D) tokens, padding rows being zeros
    (they cost the same as real tokens: the op does not know they are padding).
    Returns one dict per (layout, mode): median/min ms over ``reps`` samples, peak MiB above inputs.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, max_len + 1, (n_docs,), generator=gen)
    lengths[0] = max_len
    cu = trajops.cu_seqlens_from_lengths(lengths)
    total = int(lengths.sum())
    steps = torch.randn(total, D, generator=gen) / D**0.5
    packed = torch.cat([steps[a:b].cumsum(0) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]).to(dtype)
    padded = torch.zeros(n_docs, max_len, D, dtype=dtype)
    for j, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        padded[j, : b - a] = packed[a:b]
    dev = torch.device("cpu")
    rows = []
    for layout, x, call in (
        ("packed", packed, lambda t: trajops.trajectory_flow(t, window, cu_seqlens=cu)),
        ("padded", padded, lambda t: trajops.trajectory_flow(t, window)),
    ):
        for mode in ("fwd", "fwd+bwd"):
            xi = x.detach().clone().requires_grad_(mode == "fwd+bwd")
            g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)

            def run(xi=xi, g=g, call=call, mode=mode):
                out = call(xi)
                if mode == "fwd+bwd":
                    out.backward(g)
                return out

            def reset(xi=xi):
                xi.grad = None

            reset(), run()  # warm-up
            samples = [_sample(dev, run, reset, 1) for _ in range(reps)]
            mem = peak_memory(dev, run, reset)
            rows.append({"layout": layout, "mode": mode, "shape": list(x.shape), "tokens": x.shape[-3:-1].numel(),
                         "median_ms": statistics.median(samples) * 1e3, "min_ms": min(samples) * 1e3,
                         "peak_mib": None if mem is None else mem / 2**20})
    return rows


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packed", action="store_true", help="run the packed-vs-padded comparison (the only mode)")
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    if not args.packed:
        ap.error("the benchmark suite runs through bench/run.py; pass --packed for packed vs padded")
    rows = packed_vs_padded(args.docs, args.max_len, args.dim, args.window, args.reps)
    print(f"trajectory_flow packed vs padded, CPU ({trajops.backends()['cpu']}, {torch.get_num_threads()} threads), "
          f"fp32, D={args.dim}, window={args.window}, {args.docs} documents, lengths U[16, {args.max_len}]")
    print("| layout | shape | tokens computed | mode | median ms | min ms | peak MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        print(f"| {r['layout']} | {r['shape']} | {r['tokens']} | {r['mode']} | {r['median_ms']:.2f} | "
              f"{r['min_ms']:.2f} | {peak} |")
    by = {(r["layout"], r["mode"]): r for r in rows}
    for mode in ("fwd", "fwd+bwd"):
        p, q = by[("packed", mode)], by[("padded", mode)]
        print(f"{mode}: padded/packed time x{q['median_ms'] / p['median_ms']:.2f}"
              + ("" if p["peak_mib"] is None or not p["peak_mib"] else f", memory x{q['peak_mib'] / p['peak_mib']:.2f}"))


if __name__ == "__main__":
    _main()
