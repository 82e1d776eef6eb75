"""Benchmarks of ``trajops.temperature_attention(q, k, v, tau, causal, scale)``:
``softmax(scale * q k^T / tau) v`` with a per-query temperature tau of shape (B, H, Tq).

Cases: prefill, Tq = Tk = T, causal (fwd and fwd+bwd, tau requiring grad like q, k, v); on CUDA
also non-causal; and a decode step, Tq = 1 against Tk keys (fwd only, no mask for any provider:
trajops' bottom-right causal with Tq = 1 sees every key anyway, SDPA's top-left is_causal would not).

Providers (roles in harness.py):
  naive     the seed's materialized attention (MultiScaleTrajectoryAttention.forward without its
            projections): scores = q @ k^T * scale / tau, masked_fill(-inf), softmax, @ v; on CPU
            timed on one batch element and extrapolated;
  eager     the SDPA composite a user would write, sdpa(q / tau, k, v): the issue's bar is
            trajops <= 1.05x this, i.e. the table's trajops/eager column;
  compiled  torch.compile of the naive function;
  flex      FlexAttention with score_mod = score / tau[b, h, q_idx] and a causal block mask
            (role other: raw-times table only); left out where it fails at set-up;
  target    trajops;
  roofline  a matmul with the FLOPs of an ideal flash kernel (these shapes are compute-bound);
            for decode, which is memory-bound, k.clone() (the bytes of reading k and v).

Packed case (issue 17): N causal documents of random lengths, the same tokens packed
(cu_seqlens, trajops' varlen path: the target) and padded to the longest document (trajops' dense op
with a (B, Tk) key-padding mask, role eager, so that trajops/eager is packed / padded), plus SDPA
run on each document alone (role other). Every provider returns the (total, H, D) rows of the real
tokens (the padded one gathers them back: the unpadding a padded pipeline pays).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import trajops
from harness import Case, Context, Provider
from trajops.varlen import cu_seqlens_from_lengths

OP = "temperature_attention"


def naive_attention(q, k, v, tau, scale, disallowed=None):
    """Seed-style: materialized (Tq, Tk) scores divided by the per-query temperature.

    `disallowed` is a bool (Tq, Tk) mask of the keys a query may not see (built once, outside the
    timed region, as the seed receives its attention_mask). With bf16 q and fp32 tau the scores are
    fp32 by type promotion; the probabilities go back to v's dtype for the second matmul.
    """
    scores = q @ k.transpose(-2, -1) * scale / tau[..., None]
    if disallowed is not None:
        scores = scores.masked_fill(disallowed, -math.inf)
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def sdpa_composite(q, k, v, tau, scale, causal):
    """What a user would write with SDPA: fold 1/tau into q (cast back to q's dtype: SDPA wants one dtype)."""
    return F.scaled_dot_product_attention((q / tau[..., None]).to(q.dtype), k, v, is_causal=causal, scale=scale)


def flex_temperature(q, k, v, tau, block_mask, scale):
    """FlexAttention with the temperature as a score_mod (meant to run under torch.compile)."""
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        return score / tau[b, h, q_idx]

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _inputs(B, H, Tq, Tk, D, dtype, device):
    """q, k, v ~ N(0, 1) in `dtype`; tau = 0.5 + U(0, 1) in fp32, shape (B, H, Tq); seeded."""
    def make():
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, t, D, generator=gen, device=device, dtype=dtype) for t in (Tq, Tk, Tk))
        tau = 0.5 + torch.rand(B, H, Tq, generator=gen, device=device, dtype=torch.float32)
        return q, k, v, tau
    return make


def _flops(B, H, Tq, Tk, D, causal):
    """Ideal flash-attention FLOPs: fwd = QK^T and PV = 4*B*H*Tq*Tk*D, halved when causal (Tq = Tk);
    the backward (recompute QK^T, dV, dP, dQ, dK) is 2.5x the forward, so fwd+bwd = 3.5x fwd."""
    fwd = 4 * B * H * Tq * Tk * D / (2 if causal else 1)
    return {"fwd": fwd, "fwd+bwd": 3.5 * fwd}


def _matmul_shape(flops):
    """(m, n) with 2*m*n*n ~= flops: n is the cube root rounded to a multiple of 128 (odd sizes run
    ~15% below the BLAS's peak and would flatter the kernel), m absorbs the rounding."""
    n = max(128, 128 * round((flops / 2) ** (1 / 3) / 128))
    return max(1, round(flops / (2 * n * n))), n


def _flop_roofline(flops, dtype, device) -> Provider:
    mats = {}
    for mode, f in flops.items():
        m, n = _matmul_shape(f)
        gen = torch.Generator(device=device).manual_seed(2)
        mats[mode] = (torch.randn(m, n, generator=gen, device=device, dtype=dtype),
                      torch.randn(n, n, generator=gen, device=device, dtype=dtype), m, n)
    a, b, m, n = mats["fwd"]
    a2, b2, m2, n2 = mats["fwd+bwd"]
    return Provider(
        "roofline", f"roofline ({dtype_label(dtype)} matmul, same FLOPs)", lambda *inp: a @ b, role="roofline",
        fwd_bwd=lambda inp, g: a2 @ b2,
        note=(f"torch.mm of ({m}x{n}) @ ({n}x{n}) for fwd ({flops['fwd'] / 1e9:.3g} GFLOP = 4*B*H*Tq*Tk*D, halved "
              f"when causal: QK^T and PV) and ({m2}x{n2}) @ ({n2}x{n2}) for fwd+bwd ({flops['fwd+bwd'] / 1e9:.3g} "
              "GFLOP = 3.5x fwd: the backward recomputes QK^T and does dV, dP, dQ, dK, 2.5x fwd). Attention at "
              "these sizes is compute-bound, so `% roofline` is the kernel's fraction of dense-matmul throughput, "
              "not of bandwidth; the GB/s column is n/a. Square up to n rounded to a multiple of 128."))


def dtype_label(dtype):
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _probe_flex(fn, make_inputs, block_mask, scale, causal, modes, device, tol):
    """Run the compiled FlexAttention provider once per mode at the case's shape, in the state
    the harness will call it in (grad mode on; inputs requiring grad in fwd+bwd only), so that it
    is compiled here, outside the timed region, with no extra graph: dynamo compiles at most 8
    graphs of one function (recompile_limit), then runs flex_attention eagerly (unfused).
    Returns (usable, backward_ok, note)."""
    q, k, v, tau = make_inputs()
    try:
        out = fn(q, k, v, tau, block_mask, scale)
        with torch.no_grad():
            want = sdpa_composite(q, k, v, tau, scale, causal)
        err = (out.float() - want.float()).abs().max().item()
    except Exception as e:  # noqa: BLE001 -- any failure leaves the provider out, with the reason
        msg = _first_line(e)
        print(f"    [{OP}] FlexAttention left out on {device.type}: {msg}", flush=True)
        torch._dynamo.reset()  # see below
        return False, False, msg
    if not math.isfinite(err) or err > tol:
        msg = f"output differs from the SDPA composite by {err:.3g} (> {tol:g})"
        print(f"    [{OP}] FlexAttention left out on {device.type}: {msg}", flush=True)
        return False, False, msg
    note = f"max |flex - sdpa composite| = {err:.2g} at set-up"
    if "fwd+bwd" not in modes:
        return True, False, note
    try:
        q, k, v, tau = (t.detach().requires_grad_(True) for t in (q, k, v, tau))
        fn(q, k, v, tau, block_mask, scale).float().sum().backward()
        assert tau.grad is not None and bool(torch.isfinite(tau.grad).all()), "tau.grad missing or not finite"
        return True, True, note + "; fwd+bwd with the captured tau requiring grad works"
    except Exception as e:  # noqa: BLE001
        msg = _first_line(e)
        print(f"    [{OP}] FlexAttention backward unavailable on {device.type}: {msg}", flush=True)
        # A compile that raised leaves dynamo running flex_attention *eagerly* afterwards (the
        # unfused math path: ~10x slower on CPU, materialized scores), also for the forward.
        # Nothing has been timed yet (run.py collects every case first), so start afresh.
        torch._dynamo.reset()
        return True, False, note + f"; forward only, its backward fails: {msg}"


def benchmarks(ctx: Context):
    """List of (Case, [Provider]) for this op on ctx.device."""
    dev = ctx.device
    cuda = dev.type == "cuda"
    if ctx.quick:
        B, H, T, D, Tk_dec = 2, 2, 64, 32, 128
    elif cuda:
        B, H, T, D, Tk_dec = 4, 16, 4096, 128, 4096
    else:
        B, H, T, D, Tk_dec = 4, 8, 1024, 64, 4096
    dtype = torch.bfloat16 if cuda else torch.float32
    esize = torch.finfo(dtype).bits // 8
    scale = 1.0 / math.sqrt(D)
    backend = trajops.backends()[dev.type]
    tau_note = "tau fp32 of shape (B, H, Tq) (per-query), 0.5 + U(0, 1); requires grad in fwd+bwd like q, k, v" + (
        "; q, k, v bf16" if cuda else "")
    # On CPU the naive provider dominates the run time: time batch element 0 of B only.
    n_naive = B if cuda else 1

    flex_compiled = create_block_mask = None
    if ctx.compile:  # FlexAttention only makes sense compiled (eager, it is the unfused math path)
        try:
            from torch.nn.attention.flex_attention import create_block_mask
            flex_compiled = torch.compile(flex_temperature, dynamic=False)
        except Exception as e:  # noqa: BLE001
            print(f"    [{OP}] FlexAttention left out: {_first_line(e)}", flush=True)
    naive_compiled = torch.compile(naive_attention, dynamic=False) if ctx.compile else None

    # (label suffix, Tq, Tk, causal, modes)
    shapes = [("causal", T, T, True, ("fwd", "fwd+bwd"))]
    if cuda:
        shapes.append(("non-causal", T, T, False, ("fwd", "fwd+bwd")))
    shapes.append(("decode", 1, Tk_dec, False, ("fwd",)))

    items = []
    for kind, Tq, Tk, causal, modes in shapes:
        decode = kind == "decode"
        make = _inputs(B, H, Tq, Tk, D, dtype, dev)
        flops = _flops(B, H, Tq, Tk, D, causal)
        label = (f"B={B} H={H} Tq=1 Tk={Tk} D={D} decode (no mask)" if decode else f"B={B} H={H} T={T} D={D} {kind}")
        kv_bytes = 2 * B * H * Tk * D * esize
        case = Case(OP, label, dtype, make,
                    info={"B": B, "H": H, "Tq": Tq, "Tk": Tk, "D": D, "causal": causal, "scale": scale,
                          "tau_shape": [B, H, Tq], "tau_dtype": "fp32",
                          "flops": {m: flops[m] for m in modes},
                          **({"mask": "none for every provider: trajops' bottom-right causal with Tq=1 sees every "
                                      "key anyway, SDPA's is_causal (top-left) would see key 0 only"}
                             if decode else {})},
                    modes=modes,
                    # decode is memory-bound: reading k and v dominates (q, tau, out are B*H rows)
                    bytes={"fwd": kv_bytes + 2 * B * H * D * esize + 4 * B * H} if decode else {})
        disallowed = (torch.ones(Tq, Tk, dtype=torch.bool, device=dev).triu(1 + Tk - Tq) if causal else None)
        block_mask = None
        if causal and flex_compiled is not None:
            block_mask = create_block_mask(_causal, None, None, Tq, Tk, device=dev)

        if n_naive < B:
            def naive_fn(q, k, v, tau, m=disallowed, n=n_naive):
                # a slice of the batch; the expand is a view whose backward sums the B grad slices
                # (B*H*Tq*D adds), so fwd+bwd can take the full-size output gradient
                return naive_attention(q[:n], k[:n], v[:n], tau[:n], scale, m).expand(q.shape[0], -1, -1, -1)
            naive_note = (f"timed on batch element 0 of {B} (its output expanded to the full batch, a view), "
                          f"extrapolated x{B // n_naive}. ")
        else:
            def naive_fn(q, k, v, tau, m=disallowed):
                return naive_attention(q, k, v, tau, scale, m)
            naive_note = ""
        provs = [
            Provider("naive", "seed-style materialized attention", naive_fn, role="naive",
                     extrapolate=B / n_naive,
                     note=naive_note + "q @ k^T * scale / tau[..., None], masked_fill(-inf) when causal (mask built "
                          "once), softmax, @ v: the (Tq, Tk) scores are materialized (fp32)"),
            Provider("sdpa", "SDPA composite: sdpa(q / tau, k, v)",
                     lambda q, k, v, tau, c=causal: sdpa_composite(q, k, v, tau, scale, c), role="eager",
                     note="F.scaled_dot_product_attention((q / tau[..., None]).to(q.dtype), k, v, is_causal, scale): "
                          "the composite a user would write (ATen's flash kernel on CPU; on CUDA SDPA picks its "
                          "backend: cuDNN's flash kernels on an H100 with torch 2.11). trajops/eager in the ratio table is trajops / this; the "
                          "issue's bar is <= 1.05"),
        ]
        if naive_compiled is not None:
            provs.append(Provider("compile", "torch.compile(naive)",
                                  lambda q, k, v, tau, m=disallowed: naive_compiled(q, k, v, tau, scale, m),
                                  role="compiled", warmup=2,
                                  note="dynamic=False; compile time excluded (spent in the warm-up calls)"))
        if flex_compiled is not None:
            tol = 5e-2 if dtype == torch.bfloat16 else 1e-3
            ok, bwd_ok, probe_note = _probe_flex(flex_compiled, make, block_mask, scale, causal, modes, dev, tol)
            if ok:
                provs.append(Provider(
                    "flex", "FlexAttention (tau score_mod)",
                    lambda q, k, v, tau, bm=block_mask: flex_compiled(q, k, v, tau, bm, scale),
                    role="other", warmup=2, backward=bwd_ok,
                    note="torch.compile(flex_attention) with score_mod = score / tau[b, h, q_idx]"
                         + (", causal block mask built once with create_block_mask" if causal else "")
                         + "; dynamic=False, compile time excluded; " + probe_note))
            else:
                print(f"    [{OP}] {label}: no FlexAttention provider ({probe_note})", flush=True)
        provs.append(Provider("trajops", f"trajops ({backend})",
                              lambda q, k, v, tau, c=causal: trajops.temperature_attention(q, k, v, tau, causal=c,
                                                                                           scale=scale),
                              role="target", note=tau_note))
        if decode:
            provs.append(Provider("roofline_mem", "roofline (clone of k)", lambda q, k, v, tau: k.clone(),
                                  role="roofline",
                                  note="decode is memory-bound (4*B*H*Tk*D FLOPs on 2*B*H*Tk*D elements): k.clone() "
                                       "reads and writes the bytes of k, i.e. an ideal kernel's read of k and v"))
        else:
            provs.append(_flop_roofline({m: flops[m] for m in ("fwd", "fwd+bwd")}, dtype, dev))
        items.append((case, provs))
    items.append(packed_case(ctx))
    return items


def packed_case(ctx: Context):
    """(Case, [Provider]): packed documents vs the same tokens padded (see the module docstring)."""
    dev = ctx.device
    cuda = dev.type == "cuda"
    H, D = (2, 16) if ctx.quick else (16, 128) if cuda else (8, 64)
    n_docs, lo, hi = (3, 4, 32) if ctx.quick else (16, 128, 4096) if cuda else (8, 64, 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator().manual_seed(17)
    lengths = torch.randint(lo, hi + 1, (n_docs,), generator=gen)
    lengths[0] = hi  # the longest document sets the padded length
    total, T = int(lengths.sum()), hi
    cu = cu_seqlens_from_lengths(lengths).to(dev)
    # valid[b, t]: token t of padded row b is real; packed token i sits at (b, t) = rows[i], cols[i]
    valid = (torch.arange(T)[None, :] < lengths[:, None]).to(dev)
    scale = 1.0 / math.sqrt(D)

    def make():
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(total, H, D, generator=g, device=dev).to(dtype) for _ in range(3))
        tau = 0.5 + torch.rand(total, H, generator=g, device=dev)
        return q, k, v, tau

    def pad(x):  # (total, H, ...) -> (B, H, T, ...), zeros in the padding
        out = x.new_zeros((n_docs, T) + tuple(x.shape[1:]))
        out[valid] = x
        return out.transpose(1, 2)

    def packed(q, k, v, tau):
        return trajops.temperature_attention(q, k, v, tau, causal=True, scale=scale, cu_seqlens_q=cu,
                                             cu_seqlens_k=cu, max_seqlen_q=hi, max_seqlen_k=hi)

    def padded(q, k, v, tau):
        tau_p = pad(tau.unsqueeze(-1)).squeeze(-1) + (~valid)[:, None, :].to(tau.dtype)  # tau 1 on padding
        out = trajops.temperature_attention(pad(q), pad(k), pad(v), tau_p, causal=True, attn_mask=valid,
                                            scale=scale)
        return out.transpose(1, 2)[valid]

    bounds = cu.tolist()

    def per_doc_sdpa(q, k, v, tau):
        outs = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            qd = (q[s:e] / tau[s:e, :, None]).to(q.dtype).transpose(0, 1)
            outs.append(F.scaled_dot_product_attention(qd, k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                                       is_causal=True, scale=scale).transpose(0, 1))
        return torch.cat(outs)

    pairs = sum(int(n) * (int(n) + 1) // 2 for n in lengths)
    modes = ("fwd", "fwd+bwd")
    case = Case(OP, f"packed N={n_docs} H={H} D={D} total={total} (padded T={T}) causal", dtype, make,
                info={"N": n_docs, "H": H, "D": D, "lengths": lengths.tolist(), "total": total, "padded_T": T,
                      "causal": True, "scale": scale, "tau_shape": [total, H],
                      "flops": {"fwd": 4 * H * D * pairs, "fwd+bwd": 14 * H * D * pairs}},
                modes=modes)
    backend = trajops.backends()[dev.type]
    provs = [
        Provider("padded", "trajops padded + key-padding mask", padded, role="eager",
                 note=f"the same tokens padded to (B={n_docs}, T={T}) (copies timed), dense trajops with a (B, Tk) "
                      "key-padding mask and causal, real rows gathered back: trajops/eager is packed / padded"),
        Provider("sdpa_docs", "SDPA per document", per_doc_sdpa, role="other",
                 note="a Python loop of sdpa(q_j / tau_j, k_j, v_j, is_causal) over the documents, torch.cat"),
        Provider("trajops", f"trajops packed ({backend})", packed, role="target",
                 note="cu_seqlens_q = cu_seqlens_k, max_seqlen given (no sync), tau (total, H) fp32"),
    ]
    if cuda and not ctx.quick:
        provs += _packed_gpu_peers(lengths, valid, pad, scale, dev)
    return case, provs


def _packed_gpu_peers(lengths, valid, pad, scale, dev):
    """GPU peers of the packed case: SDPA on the padded batch (q / tau folded in, a causal + key-padding
    bool mask: the mask keeps it off the flash kernel, which is what padding costs a SDPA user) and
    FlexAttention on the packed tokens with a document mask (tau as a score_mod)."""
    T = valid.shape[1]
    causal_pad = torch.ones(T, T, dtype=torch.bool, device=dev).tril() & valid[:, None, None, :]

    def padded_sdpa(q, k, v, tau):
        qp = (pad(q) / pad(tau.unsqueeze(-1)).clamp_min(1e-3)).to(q.dtype)
        out = F.scaled_dot_product_attention(qp, pad(k), pad(v), attn_mask=causal_pad, scale=scale)
        return out.transpose(1, 2)[valid]

    provs = [Provider("sdpa_padded", "SDPA padded (causal + key-padding mask)", padded_sdpa, role="other",
                      note="sdpa(q / tau, k, v) on the (B, H, T, D) padded batch with a bool mask; real rows "
                           "gathered back")]
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(torch.arange(len(lengths), device=dev), lengths.to(dev))
        total = int(doc.shape[0])

        def doc_causal(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        block_mask = create_block_mask(doc_causal, None, None, total, total, device=dev)

        def flex_docs(q, k, v, tau):
            def score_mod(score, b, h, q_idx, kv_idx):
                return score / tau[q_idx, h]

            out = flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                 score_mod=score_mod, block_mask=block_mask, scale=scale)
            return out[0].transpose(0, 1)

        flex_c = torch.compile(flex_docs, dynamic=False)
        provs.append(Provider("flex_docs", "FlexAttention (document mask, tau score_mod)", flex_c, role="other",
                              note="torch.compile(flex_attention) on the packed (1, H, total, D) tokens, mask_mod "
                                   "doc[q] == doc[kv] and q >= kv, score_mod score / tau[q, h]"))
    except Exception as e:  # noqa: BLE001 -- a missing FlexAttention leaves the provider out, with the reason
        print(f"    [{OP}] packed FlexAttention left out: {_first_line(e)}", flush=True)
    return provs
