"""Benchmarks of ``trajops.trajectory_flow(x, window, eps)``, x of shape (B, T, D).

Providers (roles in harness.py): a seed-style Python loop timed on a slice of positions and
extrapolated; the eager reference; torch.compile(reference); trajops; and a memory roofline.
"""
from __future__ import annotations

import torch

import trajops
from harness import Case, Context, Provider
from trajops import reference as ref

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
