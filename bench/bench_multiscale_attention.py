"""Benchmarks of ``trajops.nn.MultiScaleTrajectoryAttention`` as self-attention, x (B, T, E) -> (B, T, E).

Cases: causal (the seed given a lower-triangular 0/1 mask; the module with causal=True) and no mask.
Providers (roles in harness.py), all with the same weights:
  naive     the seed's forward: a Python loop over (batch, position) for the query trajectories, the
            materialized (T, T) scores divided by the predicted scales, masked_fill(-1e9), softmax;
  eager     the same math vectorized in pure PyTorch (a shifted difference for the trajectories);
  compiled  torch.compile of that vectorized reference;
  target    the module (trajops.temperature_attention: C++ on CPU, Triton on CUDA; scores never
            materialized).
No roofline: the four (E x E) projections and the attention share the time; see
bench_temperature_attention.py for the attention kernel alone against a FLOP roofline.
"""
from __future__ import annotations

import torch

import trajops
from harness import Case, Context, Provider
from trajops.nn import MultiScaleTrajectoryAttention

OP = "multiscale_attention"


def _heads(module, t):
    B, T, _ = t.shape
    return t.view(B, T, module.num_heads, module.head_dim).transpose(1, 2)


def _attend(module, x, trajectory, mask):
    """Projections, predicted scales, materialized scores / scales, the seed's -1e9 fill, softmax, out_proj."""
    B, T, E = x.shape
    q, k, v = _heads(module, module.q_proj(x)), _heads(module, module.k_proj(x)), _heads(module, module.v_proj(x))
    scales = module.scale_predictor(trajectory).transpose(1, 2).unsqueeze(-1)  # (B, H, T, 1)
    scores = (q @ k.transpose(-2, -1)) / scales
    if mask is not None:
        scores = scores.masked_fill(mask == 0, -1e9)
    out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).contiguous().view(B, T, E)
    return module.out_proj(out)


def naive_attention(module, x, mask):
    """The seed's forward: query trajectories filled in one (batch, position) at a time."""
    trajectory = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(1, x.shape[1]):
            trajectory[b, t] = x[b, t] - x[b, t - 1]
    return _attend(module, x, trajectory, mask)


def vectorized_attention(module, x, mask):
    """The seed's math with the trajectory loop replaced by one shifted difference."""
    trajectory = torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], dim=1)
    return _attend(module, x, trajectory, mask)


def _inputs(B, T, E, dtype, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, E, generator=gen)
    return lambda: (x.to(device=device, dtype=dtype),)


def benchmarks(ctx: Context):
    dev = ctx.device
    if ctx.quick:
        B, T, E, H = 2, 32, 32, 2
    elif dev.type == "cuda":
        B, T, E, H = 4, 2048, 1024, 16
    else:
        B, T, E, H = 4, 512, 256, 8
    dtype = torch.float32
    torch.manual_seed(0)
    module = MultiScaleTrajectoryAttention(E, H).to(dev)
    tril = torch.ones(T, T, device=dev).tril()  # the seed's causal mask, built outside the timed region
    compiled = torch.compile(vectorized_attention, dynamic=False) if ctx.compile else None
    backend = trajops.backends()[dev.type]
    items = []
    for kind, causal in (("causal", True), ("no mask", False)):
        mask = tril if causal else None
        case = Case(OP, f"B={B} T={T} E={E} H={H} {kind}", dtype, _inputs(B, T, E, dtype, dev),
                    info={"B": B, "T": T, "E": E, "H": H, "causal": causal, "self_attention": True})
        provs = [
            Provider("naive", "seed's forward (trajectory loop, materialized scores)",
                     lambda x, m=mask: naive_attention(module, x, m), role="naive",
                     note=f"a Python loop of B*(T-1) = {B * (T - 1)} row copies for the query trajectories"
                          + ("; the causal mask is a (T, T) 0/1 float tensor" if causal else "")),
            Provider("eager", "eager vectorized reference", lambda x, m=mask: vectorized_attention(module, x, m),
                     role="eager"),
        ]
        if compiled is not None:
            provs.append(Provider("compile", "torch.compile(vectorized reference)",
                                  lambda x, m=mask: compiled(module, x, m), role="compiled", warmup=2,
                                  note="dynamic=False; compile time excluded (spent in the warm-up calls)"))
        provs.append(Provider("trajops", f"trajops.nn.MultiScaleTrajectoryAttention ({backend})",
                              lambda x, c=causal: module(x, x, x, causal=c), role="target"))
        items.append((case, provs))
    return items
