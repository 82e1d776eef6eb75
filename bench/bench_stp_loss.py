"""Benchmarks of the STP loss: ``trajops.stp_loss`` (sampled triples) and ``trajops.stp_loss_dense``.

Forward+backward only (the loss is a training objective). Every provider of a case sees the same
triples (sampled once, outside the timed region; sampling costs microseconds).

Providers (roles in harness.py):
  naive     the seed's eager PyTorch: a Python loop over spans, each gathering its three rows
            per sequence, subtracting and calling F.cosine_similarity (every gather's backward
            zero-fills and accumulates a full-size gradient); mean over spans, then over layers;
  eager     the vectorized reference math: one gather of all triples, one cosine (loss only);
  compiled  torch.compile of that eager function;
  target    trajops;
  roofline  one read of h plus one write of its gradient (h.clone() per layer).

Packed vs padded (issue 17): the same documents (lengths drawn in [1, T]) as one packed row
(1, total, D) with cu_seqlens, and as the padded batch (N, T, D) with lengths; the sampled and the
dense loss, fwd+bwd, time and peak memory. Both tensors are inputs of the case; each provider uses
one of them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import trajops
from trajops import varlen
from harness import Case, Context, Provider

OP = "stp_loss"
EPS = 1e-8


def naive_stp(hidden, triples):
    """Seed-style loop: per layer, per span, gather h[b, s], h[b, r], h[b, t] and take 1 - cos."""
    rows = torch.arange(hidden[0].shape[0], device=hidden[0].device)
    per_layer = []
    for h in hidden:
        spans = []
        for tri in triples:  # (B, 3)
            hs, hr, ht = h[rows, tri[:, 0]], h[rows, tri[:, 1]], h[rows, tri[:, 2]]
            spans.append((1 - F.cosine_similarity(ht - hr, hr - hs, dim=-1, eps=EPS)).mean())
        per_layer.append(torch.stack(spans).mean())
    return torch.stack(per_layer).mean()


def eager_stp(hidden, triples):
    """Vectorized: one gather of every triple of every layer, one cosine."""
    rows = torch.arange(hidden[0].shape[0], device=hidden[0].device)[None, :, None]
    losses = []
    for h in hidden:
        g = h[rows, triples]  # (S, B, 3, D)
        a, b = g[:, :, 1] - g[:, :, 0], g[:, :, 2] - g[:, :, 1]
        losses.append(1 - F.cosine_similarity(b, a, dim=-1, eps=EPS))
    return torch.stack(losses).mean()


def eager_dense(hidden):
    losses = []
    for h in hidden:
        d = h[:, 1:] - h[:, :-1]
        losses.append(1 - F.cosine_similarity(d[:, 1:], d[:, :-1], dim=-1, eps=EPS))
    return torch.stack(losses).mean()


_MMAP_NOTE = ("on CPU the C++ backward maps its gradient buffers straight from the OS (lazily zeroed pages), "
              "outside the c10 allocator: the peak-memory column misses them (add one gradient, L*B*T*D*esize)")


def _inputs(L, B, T, D, dtype, device):
    """L random walks (steps of norm ~1), seeded."""
    gen = torch.Generator().manual_seed(0)
    walks = [(torch.randn(B, T, D, generator=gen) / D**0.5).cumsum(1) for _ in range(L)]
    return lambda: tuple(w.to(device=device, dtype=dtype) for w in walks)


def _roofline(nbytes_note: str) -> Provider:
    return Provider("roofline", "roofline (clone)", lambda *hs: hs[0].clone(), role="roofline",
                    fwd_bwd=lambda inp, g: [h.clone() for h in inp],
                    note=f"h.clone() per layer: one read of h and one write of its gradient. {nbytes_note}")


def _packed_inputs(doc_lengths, T, D, dtype, device):
    """(packed (1, total, D), padded (N, T, D)) holding the same random-walk documents."""
    gen = torch.Generator().manual_seed(2)
    docs = [(torch.randn(n, D, generator=gen) / D**0.5).cumsum(0) for n in doc_lengths]
    packed = torch.cat(docs).unsqueeze(0)
    padded = torch.zeros(len(docs), T, D)
    for j, d in enumerate(docs):
        padded[j, : d.shape[0]] = d
    return lambda: (packed.to(device=device, dtype=dtype), padded.to(device=device, dtype=dtype))


def packed_benchmarks(ctx: Context):
    """Packed (cu_seqlens) against padded (lengths) batches of the same documents."""
    dev = ctx.device
    if ctx.quick:
        N, T, D = 4, 64, 32
    elif dev.type == "cuda":
        N, T, D = 16, 4096, 4096
    else:
        N, T, D = 16, 2048, 1024
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    esize = torch.finfo(dtype).bits // 8
    backend = trajops.backends()[dev.type]
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, T + 1, (N,), generator=gen)
    cu = varlen.cu_seqlens_from_lengths(lengths).to(dev)
    total, S = int(lengths.sum()), 4
    triples = trajops.sample_stp_triples(N, total, S, cu_seqlens=cu.cpu(), generator=gen).to(dev)
    lens = lengths.to(dev)
    info = {"N": N, "T": T, "D": D, "total": total, "fill": round(total / (N * T), 3)}
    items = []
    for dense in (False, True):
        what = "dense" if dense else f"spans={S}"
        case = Case(OP, f"packed vs padded {what} N={N} T={T} D={D} total={total}", dtype,
                    _packed_inputs(lengths.tolist(), T, D, dtype, dev), info={**info, "dense": dense},
                    modes=("fwd+bwd",), bytes={"fwd+bwd": 2 * total * D * esize})
        if dense:
            packed = lambda hp, hq: trajops.stp_loss_dense(hp, cu_seqlens=cu)
            padded = lambda hp, hq: trajops.stp_loss_dense(hq, lengths=lens)
        else:
            packed = lambda hp, hq: trajops.stp_loss(hp, triples=triples, cu_seqlens=cu)
            padded = lambda hp, hq: trajops.stp_loss(hq, triples=triples, lengths=lens)
        note = f"{info['fill']:.0%} of the padded batch is tokens. " + (_MMAP_NOTE if dev.type == "cpu" else "")
        items.append((case, [
            Provider("padded", f"trajops ({backend}) padded + lengths", padded, role="other", note=note),
            Provider("trajops", f"trajops ({backend}) packed + cu_seqlens", packed, role="target", note=note),
        ]))
    return items


def benchmarks(ctx: Context):
    dev = ctx.device
    if ctx.quick:
        B, T, D = 2, 64, 32
    elif dev.type == "cuda":
        B, T, D = 8, 4096, 4096
    else:
        B, T, D = 8, 2048, 1024
    dtypes = (torch.bfloat16,) if dev.type == "cuda" else (torch.float32,)
    backend = trajops.backends()[dev.type]
    gen = torch.Generator().manual_seed(1)
    items = []
    for dtype in dtypes:
        esize = torch.finfo(dtype).bits // 8
        for L, S in ((1, 4), (3, 4), (1, 256)):
            triples = trajops.sample_stp_triples(B, T, S, generator=gen).to(dev)
            compiled = torch.compile(eager_stp, dynamic=False) if ctx.compile else None
            case = Case(OP, f"L={L} spans={S} B={B} T={T} D={D}", dtype, _inputs(L, B, T, D, dtype, dev),
                        info={"L": L, "n_spans": S, "B": B, "T": T, "D": D}, modes=("fwd+bwd",),
                        bytes={"fwd+bwd": 2 * L * B * T * D * esize})
            # The naive loop costs ~3 full-size zero-fills and adds per span: time a slice of the spans.
            n_naive = min(S, 16)
            provs = [
                Provider("naive", "seed-style loop over spans",
                         lambda *hs, tr=triples[:n_naive]: naive_stp(hs, tr), role="naive",
                         extrapolate=S / n_naive,
                         note=(f"timed on {n_naive} of the {S} spans, extrapolated x{S / n_naive:g}"
                               if n_naive < S else "")),
                Provider("eager", "eager vectorized", lambda *hs, tr=triples: eager_stp(hs, tr), role="eager"),
            ]
            if compiled is not None:
                provs.append(Provider("compile", "torch.compile(eager)", lambda *hs, tr=triples, f=compiled: f(hs, tr),
                                      role="compiled", warmup=2, note="dynamic=False; compile time excluded"))
            provs += [
                Provider("trajops", f"trajops ({backend})", lambda *hs, tr=triples: trajops.stp_loss(list(hs), triples=tr),
                         role="target", note=_MMAP_NOTE if dev.type == "cpu" else ""),
                _roofline("For sampled triples the ideal forward reads only the touched rows, so this "
                          "floor is the gradient's zero-fill plus a read of h that the kernel does not need."),
            ]
            items.append((case, provs))
        # dense: every consecutive triple
        L = 1
        compiled = torch.compile(eager_dense, dynamic=False) if ctx.compile else None
        case = Case(OP, f"dense L={L} B={B} T={T} D={D}", dtype, _inputs(L, B, T, D, dtype, dev),
                    info={"L": L, "B": B, "T": T, "D": D, "dense": True}, modes=("fwd+bwd",),
                    bytes={"fwd+bwd": 2 * L * B * T * D * esize})
        provs = [Provider("eager", "eager vectorized", lambda *hs: eager_dense(hs), role="eager")]
        if compiled is not None:
            provs.append(Provider("compile", "torch.compile(eager)", lambda *hs, f=compiled: f(hs), role="compiled",
                                  warmup=2, note="dynamic=False; compile time excluded"))
        provs += [
            Provider("trajops", f"trajops ({backend})", lambda *hs: trajops.stp_loss_dense(list(hs)), role="target",
                     note=_MMAP_NOTE if dev.type == "cpu" else ""),
            _roofline("The fused pair reads h twice (forward, backward) and writes the gradient once."),
        ]
        items.append((case, provs))
    return items + packed_benchmarks(ctx)
