"""Markdown table, JSON and PNG plot of a ``python -m examples.strassen`` run."""
from __future__ import annotations

import json
import math
import os
from statistics import mean, median
from typing import Dict, List, Optional

# The seed's zero-shot table (fp32 max error of its crystallized rule), for comparison.
SEED_ZERO_SHOT = {2: 2.38e-7, 4: 1.91e-6, 8: 6.20e-6, 16: 2.15e-5, 32: 8.13e-5, 64: 2.94e-4}


def _mean_where(values: List[float], flags: List[bool], want: bool) -> Optional[float]:
    xs = [v for v, f in zip(values, flags) if f == want and not math.isnan(v)]
    return mean(xs) if xs else None


def _fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def summarize(run: Dict[str, object]) -> Dict[str, object]:
    """Summary numbers of one configuration's run (see :func:`train.run_protocol`)."""
    ok, r7 = run["passed"], run["rank7"]
    return {
        "fit_rate": run["fit_rate"], "rank7_rate": run["rank7_rate"],
        "signature_rate": run["signature_rate"], "success_rate": run["success_rate"],
        "median_delta": median(run["delta"]), "min_delta": min(run["delta"]),
        "straight1_success": _mean_where(run["straight1"], ok, True),
        "straight1_failed": _mean_where(run["straight1"], ok, False),
        "straight1_rank7": _mean_where(run["straight1"], r7, True),
        "straight1_not_rank7": _mean_where(run["straight1"], r7, False),
        "straight2_rank7": _mean_where(run["straight2"], r7, True),
        "straight2_not_rank7": _mean_where(run["straight2"], r7, False),
    }


def markdown(doc: Dict[str, object]) -> str:
    """The report: the sweep table, the known rules, the rounding basin and the zero-shot table."""
    c = doc["config"]
    lines = [f"# Strassen crystallization — {doc['n_seeds']} seeds per row",
             "",
             f"Phase 1: {c['steps1']} AdamW steps (lr {c['lr']:g}, cosine), 8 products, fresh N(0,1) 2x2 pairs "
             f"every step, {c['dtype']}; phase 2: keep 7 products, {c['steps2']} masked steps, round, verify. "
             f"Wall time {doc['wall_s']:.0f} s on {doc['threads']} thread(s), torch {doc['torch']}.",
             "",
             "fit = phase-1 loss < 1e-6; rank-7 = phase-2 loss < 1e-8 (a real-valued 7-product rule); "
             "Strassen sig. = rank-7 and each factor's 7 coefficient vectors, read as 2x2 matrices, have "
             "Strassen's ranks (one rank-2, six rank-1: invariant under a change of basis); "
             "success = verify passed (7 products, all in {-1,0,1}, error < 1e-5, zero-shot to 64x64). "
             "delta = max |x - round(x)| before rounding (after the per-product scale gauge). "
             "curv = mean `trajops.stp_loss_dense` of the weight trajectory (0 straight, 1 = 90° turns).",
             "",
             "| run | batch | weight decay | noise σ | fit | rank-7 | Strassen sig. | success | median δ | min δ "
             "| curv ph.1 rank-7 / not | curv ph.2 rank-7 / not | curv ph.1 success / failed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in doc["runs"]:
        s = row["summary"]
        lines.append(
            f"| {row['name']} | {row['batch']} | {row['weight_decay']:g} | {row['noise']:g} | {s['fit_rate']:.0%} "
            f"| {s['rank7_rate']:.0%} | {s['signature_rate']:.0%} | **{s['success_rate']:.0%}** | {s['median_delta']:.3f} | {s['min_delta']:.3f} "
            f"| {_fmt(s['straight1_rank7'])} / {_fmt(s['straight1_not_rank7'])} "
            f"| {_fmt(s['straight2_rank7'])} / {_fmt(s['straight2_not_rank7'])} "
            f"| {_fmt(s['straight1_success'])} / {_fmt(s['straight1_failed'])} |")
    lines += ["", "## The verification framework on known rules", "",
              "| rule | passed | why not |", "|---|---|---|"]
    for name, v in doc["known"].items():
        lines.append(f"| {name} | {v['passed']} | {'; '.join(v['reasons']) or '–'} |")
    lines += ["", "## Rounding basin: exact Strassen + N(0, σ²) on every coefficient, then discretize + verify",
              "", "| σ | " + " | ".join(doc["basin"]) + " |", "|---|" + "---|" * len(doc["basin"]),
              "| passes | " + " | ".join(f"{r:.0%}" for r in doc["basin"].values()) + " |",
              "", "## Zero-shot: recursive application, max |error| vs fp64 A @ B (N(0,1) entries)", "",
              "| n | seed's table (fp32) | Strassen fp32 | Strassen fp64 |", "|---|---|---|---|"]
    zs = doc["known"]["strassen"]["zero_shot"]
    for n, e in zs.items():
        lines.append(f"| {n} | {SEED_ZERO_SHOT.get(int(n), float('nan')):.2e} | {e['fp32']:.2e} | {e['fp64']:.2e} |")
    found = [(row["name"], s, r) for row in doc["runs"] for s, r in row["result"]["rules"].items()]
    lines += ["", f"Crystallized rules found by training: {len(found)}."]
    for name, s, r in found[:5]:
        e64 = r["zero_shot"]["64"]
        lines.append(f"- run `{name}`, seed index {s}: zero-shot 64x64 fp32 {e64['fp32']:.2e}, fp64 {e64['fp64']:.2e}")
    return "\n".join(lines) + "\n"


def plot(doc: Dict[str, object], path: str) -> bool:
    """Rates vs batch size, and the zero-shot error vs n. Returns False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sweep = [r for r in doc["runs"] if r["name"].startswith("batch")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    bs = [r["batch"] for r in sweep]
    for key, label, mk in (("fit_rate", "fit (phase 1)", "o"), ("rank7_rate", "rank-7 reached (phase 2)", "s"),
                           ("success_rate", "crystallized (verify passed)", "^")):
        ax1.plot(bs, [100 * r["summary"][key] for r in sweep], marker=mk, label=label)
    ax1.axvspan(24, 128, color="grey", alpha=0.15, label="seed's 'critical' [24, 128] (claims 68%)")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("batch size")
    ax1.set_ylabel(f"% of {doc['n_seeds']} seeds")
    ax1.set_ylim(-5, 105)
    ax1.legend(fontsize=7)
    ax1.set_title("two-phase protocol vs batch size", fontsize=9)
    zs = doc["known"]["strassen"]["zero_shot"]
    ns = [int(n) for n in zs]
    ax2.plot(ns, [zs[str(n)]["fp32"] for n in ns], marker="o", label="Strassen, fp32")
    ax2.plot(ns, [zs[str(n)]["fp64"] for n in ns], marker="o", label="Strassen, fp64")
    ax2.plot(ns, [SEED_ZERO_SHOT[n] for n in ns], ls="--", marker="x", label="seed's table (fp32)")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("n (n x n matrices)")
    ax2.set_ylabel("max |error|")
    ax2.legend(fontsize=7)
    ax2.set_title("zero-shot recursive application", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(doc: Dict[str, object], out_dir: str) -> Dict[str, str]:
    """Write strassen.json / strassen.md / strassen.png under ``out_dir``; returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"strassen.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(doc, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(doc))
    if not plot(doc, paths["png"]):
        del paths["png"]
    return paths
