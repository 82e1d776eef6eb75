"""Benchmarks of TrajectoryAdaptivePositionalEncoding (module) and its op adaptive_positional_encoding.

Module case: forward(x), x (B, T, E) -> (B, T, E), backward to x and the predictor's weights.
Op case: adaptive_positional_encoding(displacement (B, T), pe_table (L, E)) alone.
Providers (roles in harness.py): the seed-style loop (per-step predictor calls and a per-position
.item() lookup) timed on one sequence's first positions and extrapolated; the vectorized module
on the eager reference; torch.compile of it; trajops; and a memory roofline.
"""
from __future__ import annotations

import torch

import trajops
from harness import Case, Context, Provider
from trajops import reference as ref
from trajops.nn import TrajectoryAdaptivePositionalEncoding

OP = "adaptive_positional_encoding"


def seed_style(mod: TrajectoryAdaptivePositionalEncoding, x: torch.Tensor) -> torch.Tensor:
    """The seed's forward for (B', T', E): a predictor call per step, an fp32 running sum and a
    per-position .item() lookup."""
    out = []
    for b in range(x.shape[0]):
        seq = x[b]
        T = seq.shape[0]
        disp = torch.zeros(T, device=x.device)
        for i in range(1, T):
            disp[i] = disp[i - 1] + mod.trajectory_predictor(seq[i] - seq[i - 1]).squeeze(-1) * mod.trajectory_strength
        adapted = torch.clamp(torch.arange(T, device=x.device).float() + disp, 0, mod.max_len - 1)
        rows = []
        for p in adapted:
            lo = int(torch.floor(p).item())
            hi = min(lo + 1, mod.max_len - 1)
            a = p - lo
            rows.append((1 - a) * mod.pe_table[lo] + a * mod.pe_table[hi])
        out.append(torch.stack(rows))
    return torch.stack(out)


def vectorized(mod: TrajectoryAdaptivePositionalEncoding, x: torch.Tensor) -> torch.Tensor:
    """The module's math with the pure-PyTorch reference lookup (what torch.compile gets)."""
    delta = mod.compute_trajectory_displacements(x).to(mod.pe_table.dtype)
    return ref.adaptive_positional_encoding(delta, mod.pe_table)


def _module_inputs(B, T, E, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, E, generator=gen)
    return lambda: (x.to(device),)


def _op_inputs(B, T, device):
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(B, T, generator=gen) * 0.2
    return lambda: (d.to(device),)


def benchmarks(ctx: Context):
    dev = ctx.device
    if ctx.quick:
        B, T, E, L, n_seed = 2, 32, 16, 64, 8
    else:
        B, T, E, L, n_seed = 8, 2048, 256, 8192, 128
    items = []

    # ---- module forward + backward
    torch.manual_seed(0)
    mod = TrajectoryAdaptivePositionalEncoding(E, L).to(dev)
    compiled = torch.compile(lambda x: vectorized(mod, x), dynamic=False) if ctx.compile else None
    nbytes = B * T * E * 4
    case = Case(OP, f"module B={B} T={T} E={E} L={L}", torch.float32, _module_inputs(B, T, E, dev),
                info={"B": B, "T": T, "E": E, "max_len": L},
                # ideal: fwd reads x, writes out; bwd reads grad_out and x, writes grad_x
                bytes={"fwd": 2 * nbytes, "fwd+bwd": 5 * nbytes})
    scale = B * T / n_seed

    def seed_fwd_bwd(inputs, grad):
        xs = inputs[0][:1, :n_seed].detach().requires_grad_()
        with torch.enable_grad():
            seed_style(mod, xs).backward(grad[:1, :n_seed])

    provs = [
        Provider("naive", "seed-style loop", lambda x: seed_style(mod, x[:1, :n_seed]), role="naive",
                 fwd_bwd=seed_fwd_bwd, extrapolate=scale,
                 note=f"timed on positions 0..{n_seed - 1} of one sequence (cost is linear in positions), "
                      f"extrapolated x{scale:g} to all B*T positions"),
        Provider("eager", "vectorized module, eager reference", lambda x: vectorized(mod, x), role="eager"),
    ]
    if compiled is not None:
        provs.append(Provider("compile", "torch.compile(vectorized reference)", compiled, role="compiled", warmup=2,
                              note="dynamic=False; compile time excluded (spent in the warm-up calls)"))
    provs += [
        Provider("trajops", f"trajops module ({trajops.backends()[dev.type]})", mod, role="target"),
        Provider("roofline", "roofline (clone)", lambda x: x.clone(), role="roofline",
                 fwd_bwd=lambda inp, g: (inp[0].clone(), torch.add(inp[0], g)),
                 note="fwd: x.clone(); fwd+bwd: x.clone() then x + grad_out (the bytes of the ideal fused "
                      "kernels, 5x the size of x; the predictor's matmuls are not counted)"),
    ]
    items.append((case, provs))

    # ---- the op alone (displacement -> encodings)
    # The table is a constant (the module's buffer): no table gradient.
    table = ref.sinusoidal_table(L, E).to(dev)
    op_compiled = torch.compile(ref.adaptive_positional_encoding, dynamic=False) if ctx.compile else None
    case = Case(OP, f"op B={B} T={T} E={E} L={L}", torch.float32, _op_inputs(B, T, dev),
                info={"B": B, "T": T, "E": E, "max_len": L},
                # ideal: fwd writes out; bwd reads grad_out (the table rows are cache hits)
                bytes={"fwd": nbytes, "fwd+bwd": 2 * nbytes})
    out_like = torch.empty(B, T, E, device=dev)
    provs = [Provider("eager", "eager reference", lambda d: ref.adaptive_positional_encoding(d, table), role="eager")]
    if op_compiled is not None:
        provs.append(Provider("compile", "torch.compile(reference)", lambda d: op_compiled(d, table), role="compiled",
                              warmup=2, note="dynamic=False; compile time excluded"))
    provs += [
        Provider("trajops", f"trajops ({trajops.backends()[dev.type]})",
                 lambda d: trajops.adaptive_positional_encoding(d, table), role="target"),
        Provider("roofline", "roofline (clone)", lambda d: out_like.clone(), role="roofline",
                 fwd_bwd=lambda inp, g: (out_like.clone(), g.sum(-1)),
                 note="fwd: clone of an output-sized tensor; fwd+bwd: that plus a read of grad_out"),
    ]
    items.append((case, provs))
    return items
