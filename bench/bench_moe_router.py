"""Benchmarks of ``trajops.nn.TrajectoryGuidedMoERouter`` called batched, x (B, T, E) -> (B, T, experts).

Providers (roles in harness.py), all with the same weights:
  naive     the seed's call, one position at a time (its loop over the window steps, a projector and
            router call per position), timed on a slice of positions and extrapolated; fwd+bwd
            backpropagates the slice;
  eager     the vectorized module in pure PyTorch (trajops.reference.trajectory_flow for the flow);
  compiled  torch.compile of that vectorized reference;
  target    the module (trajops.trajectory_flow: C++ on CPU, Triton on CUDA).
No roofline: the projector's (E x E) matmul dominates and has no simple byte or FLOP floor here.
"""
from __future__ import annotations

import torch

import trajops
from harness import Case, Context, Provider
from trajops import reference as ref
from trajops.nn import TrajectoryGuidedMoERouter

OP = "moe_router"
WINDOW, EPS = 8, 1e-6


def naive_context(module, x, p):
    """The seed's compute_trajectory_context for position p of one sequence x (T, E)."""
    if p == 0:
        return torch.zeros_like(x[0])
    ws = min(WINDOW, p)
    dirs, weights = [], []
    for i in range(p - ws, p):
        d = x[i + 1] - x[i]
        n = torch.norm(d)
        if n > EPS:
            dirs.append(d / n)
            weights.append((i - (p - ws) + 1) / ws * torch.tanh(n))
    if not dirs:
        return torch.zeros_like(x[0])
    w = torch.stack(weights)
    return module.trajectory_projector(((w / w.sum())[:, None] * torch.stack(dirs)).sum(0))


def naive_router(module, x, seq, positions):
    """Seed-style: one routing call per position of sequence `seq` of x (B, T, E) -> (len, experts)."""
    xs = x[seq]
    rows = []
    for p in positions:
        enhanced = xs[p] + module.trajectory_influence * naive_context(module, xs, p)
        rows.append(torch.softmax(module.router(enhanced), dim=-1))
    return torch.stack(rows)


def vectorized_router(module, x):
    """The module's batched math in pure PyTorch: every position at once, no custom op."""
    flow = ref.trajectory_flow(x, WINDOW, EPS)
    n = torch.linalg.vector_norm(x[:, 1:] - x[:, :-1], dim=-1)
    counts = torch.nn.functional.pad((n > EPS).to(torch.int32).cumsum(-1), (1, 0))
    lo = (torch.arange(x.shape[1], device=x.device) - WINDOW).clamp(min=0)
    has_step = (counts - counts[:, lo]) > 0
    projected = module.trajectory_projector(flow)
    context = torch.where(has_step[..., None], projected, torch.zeros_like(projected))
    return torch.softmax(module.router(x + module.trajectory_influence * context), dim=-1)


def _inputs(B, T, E, dtype, device):
    """A random walk whose steps have norm ~1 (tanh not saturated); seeded."""
    gen = torch.Generator().manual_seed(0)
    steps = torch.randn(B, T, E, generator=gen) / E**0.5
    return lambda: (steps.cumsum(1).to(device=device, dtype=dtype),)


def benchmarks(ctx: Context):
    dev = ctx.device
    if ctx.quick:
        B, T, E, X, slice_len = 2, 32, 32, 4, 8
    elif dev.type == "cuda":
        B, T, E, X, slice_len = 8, 4096, 1024, 8, 64
    else:
        B, T, E, X, slice_len = 8, 512, 256, 8, 8
    dtype = torch.float32
    torch.manual_seed(0)
    module = TrajectoryGuidedMoERouter(E, X).to(dev)
    compiled = torch.compile(lambda x: vectorized_router(module, x), dynamic=False) if ctx.compile else None
    seq, p0 = B // 2, T // 2 - slice_len // 2
    positions = range(p0, p0 + slice_len)

    def naive_fwd_bwd(inputs, grad):
        # the harness runs fwd_bwd under no_grad (made for rooflines); this one needs autograd
        with torch.enable_grad():
            x = inputs[0]
            out = naive_router(module, x, seq, positions)
            out.backward(grad[seq, p0:p0 + slice_len])
        return out

    backend = trajops.backends()[dev.type]
    case = Case(OP, f"B={B} T={T} E={E} experts={X}", dtype, _inputs(B, T, E, dtype, dev),
                info={"B": B, "T": T, "E": E, "num_experts": X, "window": WINDOW, "eps": EPS})
    extrapolate = B * T / slice_len
    note = (f"the seed's per-position call on positions {p0}..{p0 + slice_len - 1} of sequence {seq} (full "
            f"windows), extrapolated x{B * T // slice_len} to all B*T positions")
    provs = [
        Provider("naive", "seed-style per-position loop", lambda x: naive_router(module, x, seq, positions),
                 role="naive", extrapolate=extrapolate, fwd_bwd=naive_fwd_bwd, note=note),
        Provider("eager", "eager vectorized reference", lambda x: vectorized_router(module, x), role="eager"),
    ]
    if compiled is not None:
        provs.append(Provider("compile", "torch.compile(vectorized reference)", compiled, role="compiled",
                              warmup=2, note="dynamic=False; compile time excluded (spent in the warm-up calls)"))
    provs.append(Provider("trajops", f"trajops.nn.TrajectoryGuidedMoERouter ({backend})", module, role="target"))
    return [(case, provs)]
