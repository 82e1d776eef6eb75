"""Tile sweep of the temperature-attention Triton kernels on a GPU (one prepared device call).

    python3 bench/sweep_attention.py [--out DIR] [--quick]

Shape: B=4 H=16 T=4096 D=128 bf16, tau (B, H, T) fp32 (the issue's bar). For each kernel kind it
times the op's launcher with that kind's tiles forced (``TILE_OVERRIDES``), the others at their
defaults: forward configs on causal and non-causal, dk/dv and dq configs on the causal backward.
Reference rows: SDPA on q / tau (cuDNN on Hopper) forward and forward+backward. Medians of
``triton.testing.do_bench``. Prints a table per kind and writes ``sweep_attention.json`` under
--out. A config that fails (shared memory, compile error) prints its error and is skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from trajops.triton_kernels import _common  # noqa: E402
from trajops.triton_kernels import temperature_attention as attn  # noqa: E402
from trajops.triton_kernels import temperature_attention_bwd as attn_bwd  # noqa: E402

# H200 sweeps of 2026-12-04 (bench/results/sweep_attention_nvidia-h200-{1,2}.json): forward best
# 128x128/8 warps/3 stages, through TMA descriptors 0.631 ms causal against 0.676 by pointers; dk/dv
# best 64x32/4/3 (2.81 ms backward; 3.91 at 64x64/8/3); dq 128x64/8/3; atomic dq slower (3.53 ms).
# Next: around the dk/dv winner (it spills 456 B/thread on sm_90: see tests/test_triton_resources.py).
FWD = [(128, 128, 8, 3), (128, 64, 8, 3)]
FWD_TMA = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (64, 128, 4, 3)]
DKDV = [(64, 32, 4, 3), (64, 32, 8, 3), (128, 32, 8, 3), (64, 16, 4, 3), (64, 32, 4, 4), (32, 64, 4, 3),
        (16, 128, 8, 2)]
DQ = [(128, 64, 8, 3), (128, 64, 8, 4), (64, 32, 4, 3), (128, 32, 8, 3)]
DKDV_ATOMIC = [(32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 2), (64, 64, 8, 3)]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=80, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="first two configs of each kind only")
    args = ap.parse_args()
    dev = torch.device("cuda")
    B, H, T, D = 4, 16, 4096, 128
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    tau = 0.5 + torch.rand(B, H, T, device=dev, generator=g)
    scale = 1 / math.sqrt(D)
    do = torch.randn_like(q)
    res = {"gpu": torch.cuda.get_device_name(), "shape": [B, H, T, D], "rows": []}

    def row(kind, causal, cfg, ms, err=""):
        r = {"kind": kind, "causal": causal, "cfg": cfg, "ms": ms, "error": err}
        res["rows"].append(r)
        print(f"{kind:6s} causal={int(causal)} {str(cfg):18s} " + (f"{ms:.4f} ms {err}" if ms else f"FAILED {err}"),
              flush=True)

    for causal in (True, False):
        qs = (q / tau[..., None]).to(q.dtype)
        row("sdpa", causal, "fwd", bench(lambda: F.scaled_dot_product_attention(qs, k, v, is_causal=causal, scale=scale)))
        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
        taul = tau.detach().requires_grad_()

        def sdpa_fb():
            o = F.scaled_dot_product_attention((ql / taul[..., None]).to(ql.dtype), kl, vl, is_causal=causal,
                                               scale=scale)
            o.backward(do)
        row("sdpa", causal, "fwd+bwd", bench(sdpa_fb))
        out, lse = attn.attention_fwd(q, k, v, tau, scale, None, causal)
        attn.USE_TMA = False  # "fwd default": the pointer path at its default tiles; TMA below
        row("trajops", causal, "fwd default", bench(lambda: attn.attention_fwd(q, k, v, tau, scale, None, causal)))
        row("trajops", causal, "bwd default",
            bench(lambda: attn.attention_bwd(do, None, q, k, v, tau, scale, None, causal, out, lse)))
        attn.USE_TMA = True
        _common._chosen.clear()
        o_tma, l_tma = attn.attention_fwd(q, k, v, tau, scale, None, causal)
        err = float((o_tma.float() - out.float()).abs().max()) + float((l_tma - lse).abs().max())
        row("trajops", causal, "fwd default TMA", bench(lambda: attn.attention_fwd(q, k, v, tau, scale, None, causal)),
            f"max |TMA - pointer| = {err:.3g}")
        res.setdefault("tma_err", []).append(err)
        attn.USE_TMA = False
        if causal:  # the atomic-dq backward against the two-kernel one, at the default tiles
            attn_bwd.ATOMIC_DQ = "1"
            _common._chosen.clear()
            ga = attn.attention_bwd(do, None, q, k, v, tau, scale, None, causal, out, lse)
            row("trajops", causal, "bwd default atomic-dq",
                bench(lambda: attn.attention_bwd(do, None, q, k, v, tau, scale, None, causal, out, lse)))
            attn_bwd.ATOMIC_DQ = "0"
            gd = attn.attention_bwd(do, None, q, k, v, tau, scale, None, causal, out, lse)
            rel = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))
                      for a, b in zip(ga, gd))
            res["atomic_rel_err"] = rel
            print(f"        atomic-dq vs two-kernel: max relative difference {rel:.3g}", flush=True)
        kinds = [("fwd", FWD), ("fwd_tma", FWD_TMA)] + (
            [("dkdv", DKDV), ("dkdv_atomic", DKDV_ATOMIC), ("dq", DQ)] if causal else [])
        for kind, cfgs in kinds:
            attn.USE_TMA = kind == "fwd_tma"
            attn_bwd.ATOMIC_DQ = "1" if kind == "dkdv_atomic" else "0"
            label, kind = kind, {"fwd_tma": "fwd", "dkdv_atomic": "dkdv"}.get(kind, kind)
            for cfg in cfgs[: 2 if args.quick else None]:
                bm, bn, w, s = cfg
                attn.TILE_OVERRIDES[kind] = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
                _common._chosen.clear()
                try:
                    if kind == "fwd":
                        fn = lambda: attn.attention_fwd(q, k, v, tau, scale, None, causal)  # noqa: E731
                    else:
                        fn = lambda: attn.attention_bwd(do, None, q, k, v, tau, scale, None, causal, out, lse)  # noqa: E731
                    t0 = time.time()
                    fn()
                    torch.cuda.synchronize()
                    row(label, causal, cfg, bench(fn))
                    print(f"        (compile + first call {time.time() - t0:.1f} s)", flush=True)
                except Exception as e:  # noqa: BLE001 -- a failing config is a result
                    row(label, causal, cfg, None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
                finally:
                    attn.TILE_OVERRIDES.pop(kind, None)
            attn.USE_TMA = False
            attn_bwd.ATOMIC_DQ = "0"
    with open(os.path.join(args.out, "sweep_attention.json"), "w") as f:
        json.dump(res, f, indent=1)
    # TMA forward wins if it is right and faster at the default tiles on both masks
    t = {(r["causal"], r["cfg"]): r["ms"] for r in res["rows"] if r["kind"] == "trajops"}
    wins = all(t.get((c, "fwd default TMA")) and t[(c, "fwd default TMA")] < 0.98 * t[(c, "fwd default")]
               for c in (True, False))
    ok = all(e < 0.05 for e in res.get("tma_err", [1.0]))
    a_fast = bool(t.get((True, "bwd default atomic-dq"))) and t[(True, "bwd default atomic-dq")] < 0.95 * t[
        (True, "bwd default")]
    a_ok = res.get("atomic_rel_err", 1.0) < 2e-2
    with open(os.path.join(args.out, "decision.env"), "w") as f:
        f.write(f"TRAJOPS_ATTN_TMA={int(wins and ok)}\nTRAJOPS_ATTN_ATOMIC_DQ={'auto' if a_fast and a_ok else '0'}\n")
    print(f"TMA forward: faster={wins} correct={ok} -> TRAJOPS_ATTN_TMA={int(wins and ok)}", flush=True)
    print(f"atomic dq: faster={a_fast} close={a_ok} -> TRAJOPS_ATTN_ATOMIC_DQ={'auto' if a_fast and a_ok else '0'}",
          flush=True)


if __name__ == "__main__":
    main()
