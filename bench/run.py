"""Benchmark entry point (``make bench``).

    python bench/run.py [--quick] [--ops OP ...] [--repeats N] [--out DIR] [--device cpu|cuda]

Discovers every ``bench/bench_<op>.py``, collects its ``benchmarks(ctx)``, times them with
``harness.run_all`` and writes ``<out>/<host-kind>.{json,md,png}``; the markdown table is also
printed. ``--quick`` is for the smoke test: tiny shapes, 3 samples, no torch.compile. A full CPU
run takes about 2-4 minutes on 2 cores (most of it the eager reference and compiling).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
# Bench files import `harness`, and the trajops package lives in the repo root.
for p in (REPO, BENCH):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import harness  # noqa: E402


def discover(ops=None, first=()):
    """{op: module} for bench/bench_<op>.py, optionally restricted to `ops`, in their order (else
    alphabetical with the ops in `first` moved to the front)."""
    mods = {}
    paths = sorted(glob.glob(os.path.join(BENCH, "bench_*.py")))
    order = list(ops or first or ())
    if order:  # a time-limited GPU run measures the first ones first
        rank = {op: i for i, op in enumerate(order)}
        paths.sort(key=lambda p: rank.get(os.path.basename(p)[len("bench_"):-3], len(rank)))
    for path in paths:
        op = os.path.basename(path)[len("bench_"):-3]
        if ops and op not in ops:
            continue
        spec = importlib.util.spec_from_file_location(f"bench_{op}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mods[getattr(mod, "OP", op)] = mod
    missing = set(ops or ()) - set(mods)
    if missing:
        sys.exit(f"no bench file for: {', '.join(sorted(missing))}")
    return mods


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few repeats, no torch.compile")
    ap.add_argument("--ops", nargs="+", help="only these ops (default: every bench_<op>.py)")
    ap.add_argument("--repeats", type=int,
                    help="exactly N samples per provider (default: 5..25 within ~3 s each; quick: 3)")
    ap.add_argument("--first", nargs="+", default=(), help="run these ops first (then every other one)")
    ap.add_argument("--budget-s", type=float,
                    help="seconds of sampling per provider (default 3; make gpu uses 0.3 to fit its 6 minutes)")
    ap.add_argument("--out", default=os.path.join(BENCH, "results"), help="results directory")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = harness.Context(device=device, quick=args.quick, compile=not args.quick)
    st = harness.Settings()
    if args.quick:
        st = harness.Settings(repeats=3, min_reps=3, budget_s=0.2, min_block_s=1e-3)
    if args.budget_s:
        st.budget_s = args.budget_s
    if args.repeats:
        st.repeats = st.min_reps = args.repeats

    items = [item for mod in discover(args.ops, args.first).values() for item in mod.benchmarks(ctx)]
    notes = ["--quick run: tiny shapes, not representative"] if args.quick else []
    doc = harness.run_all(items, device, st, notes, partial=lambda d: harness.write_reports(d, args.out))
    doc["args"] = vars(args)
    paths = harness.write_reports(doc, args.out)
    print()
    print(harness.render_markdown(doc))
    print("wrote " + ", ".join(paths.values()), flush=True)


if __name__ == "__main__":
    main()
