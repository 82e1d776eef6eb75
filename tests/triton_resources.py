"""Ahead-of-time resource check of every Triton kernel variant a launcher picks (no GPU needed).

    python tests/triton_resources.py [--cc 90 80] [--jobs N] [--filter SUBSTR] [--list]

Each variant calls a real host launcher on CPU tensors under ``_common.capture``: the launcher picks
its tiles for the target's shared memory exactly as it would on that GPU, and the recorded launch is
compiled for ``cuda:<cc>`` with Triton's own binder, i.e. with the specialization (divisibility-16
pointers and integers, equal-to-1 strides, constexprs) of a real launch. Prints one JSON line per
(variant, cc): shared memory, registers, stack/local bytes (spills), and whether it fits.
tests/test_triton_resources.py runs it against the installed Triton and, when the test set-up
installed it, the lowest supported Triton (3.6) in a side directory.

Inputs are shaped like real calls (Tq = Tk = 1024 unless the variant is about decode): the tiles and
the integer specialization depend on the shapes, so a toy shape would check another kernel.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.pop("TRITON_INTERPRET", None)  # compile for real targets, never the interpreter

import torch  # noqa: E402

from trajops.triton_kernels import _common  # noqa: E402
from trajops.triton_kernels import paged_temperature_attention as paged  # noqa: E402
from trajops.triton_kernels import temperature_attention as attn  # noqa: E402
from trajops.triton_kernels import temperature_attention_bwd as attn_bwd  # noqa: E402
from trajops.triton_kernels import temperature_attention_nonfinite as nonfinite  # noqa: E402
from trajops.triton_kernels import trajectory_flow as flow  # noqa: E402
from trajops.triton_kernels import temperature_attention_varlen as attn_varlen  # noqa: E402

LIMITS = {90: _common.SMEM_LIMITS[9], 80: _common.SMEM_LIMITS[8]}
SPECS = {90: _common.DeviceSpec((9, 0), LIMITS[90], 132), 80: _common.DeviceSpec((8, 0), LIMITS[80], 108)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def _attention(dtype, D, Dv, mask_kind, causal, Tq=1024, Tk=1024, Hq=4, Hkv=1, backward=True, tma=False,
               atomic=False):
    def run():
        attn.USE_TMA, attn_bwd.ATOMIC_DQ = tma, ("1" if atomic else "0")
        nonfinite.ALWAYS_HOSTILE = True  # CPU tensors: the HOSTILE launches would be skipped on clean inputs
        dt = DTYPES[dtype]
        q = torch.empty(1, Hq, Tq, D, dtype=dt)
        k = torch.empty(1, Hkv, Tk, D, dtype=dt)
        v = torch.empty(1, Hkv, Tk, Dv, dtype=dt)
        tau = torch.ones(1, Hq, Tq)
        mask = None
        if mask_kind == 1:
            mask = torch.ones(1, Tk, dtype=torch.bool)[:, None, None, :].expand(1, Hq, Tq, Tk)
        elif mask_kind == 2:
            mask = torch.ones(Tq, Tk, dtype=torch.bool)[None, None].expand(1, Hq, Tq, Tk)
        elif mask_kind == 3:  # a mask per head: decode steps keep the dense kernel (not the paged route)
            mask = torch.ones(1, Hq, Tq, Tk, dtype=torch.bool)
        out, lse = attn.attention_fwd(q, k, v, tau, D ** -0.5, mask, causal)
        if backward:
            attn.attention_bwd(torch.empty_like(out), None, q, k, v, tau, D ** -0.5, mask, causal, out, lse)
    return run


def _paged(dtype, D, G, n=1, new=False):
    def run():
        dt = DTYPES[dtype]
        P, S, Hkv, B = 64, 16, 2, 2
        q = torch.empty(B, Hkv * G, n, D, dtype=dt)
        kp = torch.empty(P, S, Hkv, D, dtype=dt)
        pt = torch.zeros(B, 32, dtype=torch.int64)
        live = torch.ones(P, S, dtype=torch.bool)
        kn = torch.empty(B, Hkv, n, D, dtype=dt) if new else None  # the merge kernel scores the new keys
        paged.paged_attention(q, kp, kp, pt, live, torch.ones(1), D ** -0.5, None, k_new=kn, v_new=kn)
    return run


def _ape(dtype, B=8, T=4096, E=1024, L=8192, positions=False, need_table=False):
    """adaptive_positional_encoding forward + backward (+ table gradient), the GPU bench's shape."""
    def run():
        from trajops.triton_kernels import adaptive_positional_encoding as ape

        dt = DTYPES[dtype]
        d = torch.empty(B, T, dtype=dt)
        table = torch.empty(L, E, dtype=dt)
        pos = torch.empty(B, T, dtype=torch.int64) if positions else None
        ape.adaptive_positional_encoding_fwd(d, table, pos)
        ape.adaptive_positional_encoding_bwd(torch.empty(B, T, E, dtype=dt), d, table, pos, need_table)
    return run


def ape_variants():
    """The APE launchers' classes: the tile depends on the element size (fp64: half the tile),
    the position mode is a constexpr, a small E gives a narrow tile; the table gradient kernel."""
    out = [(f"ape {dt} E=1024", _ape(dt)) for dt in ("fp32", "bf16", "fp64")]
    out.append(("ape fp32 E=64 positions table-grad", _ape("fp32", E=64, positions=True, need_table=True)))
    out.append(("ape bf16 B=1 T=100 E=3", _ape("bf16", B=1, T=100, E=3, L=50)))
    return out


# ---- KV relevance / top-k (triton_kernels/kv_topk.py): the bench's shape (B=8 rows of 32768 slots,
# pages of 16, Dt=64), so the launcher picks the split-row grid (per-chunk top K + merge) it would on an
# H100; K = 64 and the largest K (128) of the bitonic path, the counting path of short rows, relevance.
def _kv(k, L=32768, B=8, Dt=64, S=16):
    def run():
        from trajops.triton_kernels import kv_topk as fused

        MP = L // S
        traj = torch.empty(B * MP, S, Dt)
        ts = torch.empty(B * MP, S, dtype=torch.int64)
        live = torch.empty(B * MP, S, dtype=torch.bool)
        pt = torch.empty(B, MP, dtype=torch.int64)
        args = (traj, ts, live, pt, torch.empty(B, Dt), torch.tensor(0), 0.7, 0.1)
        if k:
            fused.kv_topk(*args, k)
        else:
            fused.kv_relevance(*args)
    return run


def _kv_evict(L, B=8, Dt=64, S=16, pin=False, pos=True):
    """The decode step's fused eviction (triton_kernels/kv_evict.py): relevance + bookkeeping program (with the
    positions, as the store launches it, unless pos=False)."""
    def run():
        from trajops.triton_kernels import kv_evict

        MP = L // S
        P = B * MP
        ints = lambda *shape: torch.zeros(*shape, dtype=torch.int64)  # noqa: E731
        out = kv_evict.kv_evict_append_decode(
            torch.empty(P, S, Dt), ints(P, S), torch.zeros(P, S, dtype=torch.bool),
            torch.zeros(P, S, dtype=torch.bool), ints(B, MP), ints(B), ints(B), ints(P), torch.tensor(P),
            ints(B), torch.tensor(0), torch.empty(B, 1, Dt), torch.ones(B, dtype=torch.int64),
            torch.zeros(B, 1, dtype=torch.bool) if pin else None, 0.7, 0.1, *((ints(P, S), ints(B)) if pos else ()))
        assert out is not None, "the fused path declined the variant"
    return run


def _kv_write(H=8, D=128, dtype=torch.bfloat16, B=8, P=64, S=16):
    """The decode step's K/V write (triton_kernels/kv_cache.py): one launch for both pools."""
    def run():
        from trajops.triton_kernels import kv_cache as kernels

        pool = torch.empty(P, S, H, D, dtype=dtype)
        kv = torch.empty(B, H, 1, D, dtype=dtype)
        kernels.kv_write(pool, pool.clone(), torch.zeros(B, 1, dtype=torch.int64), kv, kv.clone())
    return run


def _kv_variants(full: bool = False):
    out = [("kv_topk k=64 N=32768", _kv(64)), ("kv_topk k=128 N=32768", _kv(128)),
           ("kv_topk k=8 N=32 (counting)", _kv(8, L=32)), ("kv_relevance N=32768", _kv(0)),
           ("kv_evict decode L=2048", _kv_evict(2048)),
           ("kv_evict decode L=256 pin", _kv_evict(256, pin=True, pos=False)),
           ("kv_write bf16 H=8 D=128", _kv_write()), ("kv_write fp32 H=3 D=64", _kv_write(3, 64, torch.float32))]
    if full:
        out.append(("kv_topk k=1 N=32768 (full)", _kv(1)))
    return out


def _flow(dtype, D, packed, B=8, T=4096, window=8):
    """trajectory_flow forward (out + stats), backward with the saved stats and backward without
    them (the stats-only forward launch); packed: the same tokens as B documents of (1, B*T, D)."""
    def run():
        dt = DTYPES[dtype]
        x = torch.empty((1, B * T, D) if packed else (B, T, D), dtype=dt)  # never touched: lazy pages
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32) if packed else None
        _, stats = flow.trajectory_flow_fwd_stats(x, window, 1e-6, cu)
        flow.trajectory_flow_bwd(x, x, window, 1e-6, cu, stats=stats)
        flow.trajectory_flow_bwd(x, x, window, 1e-6, cu)
    return run


def flow_variants(full: bool = False):
    """trajectory_flow: the launcher's tiles depend on the element size, D (footprint, alignment),
    the window (halo block) and packing (constexpr). Core: bf16 at the issue's shape (B=8, T=4096,
    D=4096) packed or not, and fp32 at D=64; ``full`` adds fp16, fp64, D=64 half, a wide window."""
    out = [(f"flow bf16 D=4096 packed={p}", _flow("bf16", 4096, p)) for p in (False, True)]
    out.append(("flow fp32 D=64 packed=True", _flow("fp32", 64, True)))
    if full:
        for dtype in ("fp32", "bf16", "fp16", "fp64"):
            for D in (64, 4096):
                for p in (False, True):
                    out.append((f"flow {dtype} D={D} packed={p} (full)", _flow(dtype, D, p)))
        out.append(("flow bf16 D=4096 window=64 (full)", _flow("bf16", 4096, False, window=64)))
        out.append(("flow fp32 D=1000 window=3 (full)", _flow("fp32", 1000, False, window=3)))
    return out


# ---- packed (varlen) attention: the dense kernels compiled with VARLEN=True
# Documents of unequal lengths whose total is not a multiple of 16 (the integer specialization of a
# real packed launch: total_q, total_k and the longest document are then plain integers).
VARLEN_DOCS = (509, 300, 211)


def _attention_varlen(dtype, D, causal, Hq=4, Hkv=1, docs=VARLEN_DOCS):
    def run():
        attn_bwd.ATOMIC_DQ = "0"
        nonfinite.ALWAYS_HOSTILE = True
        dt = DTYPES[dtype]
        total = sum(docs)
        cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32)
        q = torch.empty(total, Hq, D, dtype=dt)
        k = torch.empty(total, Hkv, D, dtype=dt)
        v = torch.empty(total, Hkv, D, dtype=dt)
        tau = torch.ones(1, Hq).expand(total, Hq)
        out, lse = attn_varlen.attention_varlen_fwd(q, k, v, tau, D ** -0.5, cu, cu, max(docs), max(docs), causal)
        attn_varlen.attention_varlen_bwd(torch.empty_like(out), None, q, k, v, tau, D ** -0.5, cu, cu, max(docs),
                                         max(docs), causal, out, lse)
    return run


def varlen_variants(full: bool = False):
    """(label, thunk) of the varlen launchers (forward + backward, no mask: varlen takes none). The
    core set (CI, ~16 compiles for sm_90 + sm_80): bf16 D=128 causal, the usual packed training case.
    ``full``: bf16/fp16/fp32 x D 64/128/256 x causal and not (`--filter varlen --full`, ~250
    compiles for both targets: half an hour on 2 CPUs). Spills found there that the dense kernels
    lack (fp32 D=256 forward, the 16 x 16 HOSTILE dq/dk-dv at D=256 and fp32 D=128) are listed in
    triton_kernels/temperature_attention_varlen.py's docstring."""
    if not full:
        return [("varlen attn bf16 D=128 causal", _attention_varlen("bf16", 128, True))]
    return [(f"varlen attn {dtype} D={D} causal={causal} (full)", _attention_varlen(dtype, D, causal))
            for dtype in ("bf16", "fp16", "fp32") for D in (64, 128, 256) for causal in (False, True)]


def variants(full: bool = False):
    """(label, thunk) per configuration class the launchers distinguish. Tiles depend on the element
    size, the padded head sizes, the mask kind and decode vs prefill; registers also on causal.

    The core set (the CPU CI compiles it on 2 cores in a few minutes) takes, per class, the largest
    tiles: the full (B, Hq, Tq, Tk) mask (its tile is pipelined in shared memory) and the key-padding
    mask (the Hopper TMA forward and the default backward), for D = 64, 128, 256 in bf16 (fp16 has
    bf16's element size and tiles), the fp32 class at its largest head sizes, the
    opt-in atomic-dq backward, decode, Dv != D, and the paged kernels. ``full`` adds every mask kind
    x head size x dtype. fp64 attention is never launched on a GPU (the op routes it to the reference:
    Triton 3.6 cannot lower it); fp64 paged decode is."""
    out = []
    for D in (64, 128, 256):
        out.append((f"attn bf16 D={D} keypad causal", _attention("bf16", D, D, 1, True, tma=True)))
        out.append((f"attn bf16 D={D} fullmask causal", _attention("bf16", D, D, 2, True, tma=True)))
    out.append(("attn bf16 D=128 decode fullmask", _attention("bf16", 128, 128, 2, False, Tq=1, backward=False,
                                                              tma=True)))  # (the paged route: per-key mask)
    out.append(("attn bf16 D=128 decode headmask", _attention("bf16", 128, 128, 3, False, Tq=1, backward=False,
                                                              tma=True)))
    out.append(("attn fp32 D=256 decode keypad", _attention("fp32", 256, 256, 1, False, Tq=1, Hq=32, Hkv=4,
                                                            backward=False)))
    out.append(("attn bf16 D=80 Dv=40 keypad", _attention("bf16", 80, 40, 1, False, tma=True)))
    out.append(("attn bf16 D=128 keypad causal atomic-dq", _attention("bf16", 128, 128, 1, True, tma=True,
                                                                      atomic=True)))
    for D in (128, 256):
        out.append((f"attn fp32 D={D} fullmask causal", _attention("fp32", D, D, 2, True)))
    for dtype, D in (("bf16", 128), ("fp32", 256), ("fp64", 128)):
        out.append((f"paged {dtype} D={D} G=8", _paged(dtype, D, 8)))
    out.append(("paged bf16 D=256 G=8 n=4 k_new", _paged("bf16", 256, 8, n=4, new=True)))
    out.append(("paged fp32 D=256 G=4 n=16 k_new", _paged("fp32", 256, 4, n=16, new=True)))
    out += _kv_variants(full)
    out.extend(varlen_variants(full))
    if full:
        for dtype in ("bf16", "fp32"):
            for D in (64, 128, 256):
                for mk, name in ((0, "nomask"), (1, "keypad"), (2, "fullmask")):
                    for causal in (False, True):
                        out.append((f"attn {dtype} D={D} {name} causal={causal} (full)",
                                    _attention(dtype, D, D, mk, causal, tma=True)))
                out.append((f"attn {dtype} D={D} decode (full)", _attention(dtype, D, D, 2, False, Tq=1,
                                                                            backward=False, tma=True)))
    out += ape_variants()
    return out + flow_variants(full)


def _key(c: _common.Captured):
    sig = []
    for a in c.args:
        if isinstance(a, torch.Tensor):
            sig.append(str(a.dtype))
        elif isinstance(a, int):
            sig.append((a == 1, a % 16 == 0))
        else:
            sig.append(type(a).__name__)
    return (c.kernel.fn.__qualname__, tuple(sorted((k, repr(v)) for k, v in c.kwargs.items())), tuple(sig))


def collect(cc: int, filt: str = "", full: bool = False):
    """[(label, Captured)] with duplicates (same kernel, constexprs and specialization) removed."""
    seen, out = set(), []
    for label, thunk in variants(full):
        if filt and not any(f in label for f in filt.split("|")):
            continue
        with _common.capture(SPECS[cc]) as rec:
            thunk()
        for c in rec:
            k = _key(c)
            if k not in seen:
                seen.add(k)
                out.append((f"{label} :: {c.kernel.fn.__name__}", c))
    return out


def _compile_one(cc: int, filt: str, full: bool, i: int) -> dict:
    label, c = collect(cc, filt, full)[i]
    t0 = time.time()
    try:
        usage = _common.resource_usage(_common.aot_compile(c, cc))
    except Exception as e:  # noqa: BLE001 -- a compile failure is a finding, reported as such
        first = str(e).strip().splitlines()
        return {"label": label, "cc": cc, "error": f"{type(e).__name__}: {first[0] if first else ''}"}
    tiles = {k: v for k, v in c.kwargs.items() if k.startswith("BLOCK") or k.startswith("num_")}
    ok = usage["shared"] <= LIMITS[cc] and usage["stack"] == 0 and usage["local"] == 0
    return {"label": label, "cc": cc, **usage, "limit": LIMITS[cc], "ok": ok, "tiles": tiles,
            "seconds": round(time.time() - t0, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cc", type=int, nargs="+", default=[90, 80], choices=sorted(LIMITS))
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--filter", default="", help="only variants whose label contains this (A|B: either)")
    ap.add_argument("--list", action="store_true", help="list the launches, compile nothing")
    ap.add_argument("--full", action="store_true", help="every mask kind x head size x dtype (slow)")
    args = ap.parse_args(argv)
    import triton

    print(json.dumps({"triton": triton.__version__, "file": triton.__file__}), flush=True)
    jobs = [(cc, i) for cc in args.cc for i in range(len(collect(cc, args.filter, args.full)))]
    if args.list:
        for cc in args.cc:
            for label, c in collect(cc, args.filter, args.full):
                print(cc, label, {k: v for k, v in c.kwargs.items() if k.startswith(("BLOCK", "num_"))})
        return
    import multiprocessing

    # spawn, not fork: a forked child of a process that imported torch can hang
    with cf.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        futs = [ex.submit(_compile_one, cc, args.filter, args.full, i) for cc, i in jobs]
        for f in cf.as_completed(futs):
            print(json.dumps(f.result()), flush=True)


if __name__ == "__main__":
    main()
