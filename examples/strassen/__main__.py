"""``python -m examples.strassen [--seeds 20]``: the seed's two-phase protocol, swept, verified, reported.

Rows: a batch-size sweep (weight decay 1e-4, no noise), a weight-noise sweep at batch 32 (noise added
to the weights at the end of phase 1) and a weight-decay sweep at batch 32. Writes
<out>/strassen.{json,md,png}.
"""
from __future__ import annotations

import argparse
import time
from typing import List, Optional

import torch

from . import report
from .train import Config, noisy_rule_basin, run_protocol
from .verify import naive_rule, strassen_rule, verify

DEFAULT_OUT = "examples/strassen/results"


def _known_rules() -> dict:
    """The framework on rules whose answer we know: Strassen passes, the rest must fail."""
    U, V, W = strassen_rule()
    off = U.clone()
    off[0, 0] += 1e-3
    flip = W.clone()
    flip[0, 0] = -flip[0, 0]
    cases = {"strassen": (U, V, W), "strassen, one coefficient +1e-3": (off, V, W),
             "strassen, one sign flipped": (U, V, flip), "naive (8 products)": naive_rule()}
    return {name: verify(*rule).as_dict() for name, rule in cases.items()}


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m examples.strassen", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=20, help="seeds per configuration (default 20)")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128, 512])
    p.add_argument("--noise", type=float, nargs="*", default=[0.001, 0.005, 0.01, 0.05],
                   help="weight-noise sigmas, added at the end of phase 1 (batch 32)")
    p.add_argument("--weight-decays", type=float, nargs="*", default=[1e-2, 1e-1],
                   help="extra weight decays at batch 32 (1e-4 is the batch sweep's)")
    p.add_argument("--steps", type=int, default=Config.steps1, help="phase-1 steps")
    p.add_argument("--steps2", type=int, default=Config.steps2, help="phase-2 (masked fine-tune) steps")
    p.add_argument("--lr", type=float, default=Config.lr)
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny tensors: 1 is fastest)")
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args(argv)
    if a.seeds < 1 or a.steps < 1 or a.steps2 < 1 or any(b < 1 for b in a.batches):
        p.error("--seeds, --steps, --steps2 and --batches must be >= 1")
    if any(s < 0 for s in a.noise) or any(w < 0 for w in a.weight_decays):
        p.error("--noise and --weight-decays must be >= 0")
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    base = Config(steps1=a.steps, steps2=a.steps2, lr=a.lr)
    plan = [(f"batch {b}", Config(**{**base.__dict__, "batch": b})) for b in a.batches]
    plan += [(f"noise {s:g}", Config(**{**base.__dict__, "noise": s})) for s in a.noise]
    plan += [(f"wd {w:g}", Config(**{**base.__dict__, "weight_decay": w})) for w in a.weight_decays]
    seeds = list(range(a.seeds))
    runs = []
    for name, cfg in plan:
        t = time.perf_counter()
        res = run_protocol(seeds, cfg)
        row = {"name": name, "batch": cfg.batch, "weight_decay": cfg.weight_decay, "noise": cfg.noise,
               "seconds": time.perf_counter() - t, "result": res}
        row["summary"] = report.summarize(res)
        runs.append(row)
        s = row["summary"]
        print(f"{name:>12}: fit {s['fit_rate']:4.0%}  rank-7 {s['rank7_rate']:4.0%}  success {s['success_rate']:4.0%}"
              f"  median delta {s['median_delta']:.3f}  ({row['seconds']:.1f} s)", flush=True)
    doc = {"n_seeds": a.seeds, "threads": a.threads, "torch": torch.__version__,
           "config": {**{k: v for k, v in base.__dict__.items() if k != "dtype"}, "dtype": str(base.dtype)},
           "runs": runs, "known": _known_rules(),
           "basin": noisy_rule_basin(strassen_rule(), [0.001, 0.01, 0.05, 0.1, 0.2, 0.3])}
    doc["wall_s"] = time.perf_counter() - t0
    paths = report.write(doc, a.out)
    print(f"wall {doc['wall_s']:.0f} s; wrote " + ", ".join(paths.values()))
    return doc


if __name__ == "__main__":
    main()
