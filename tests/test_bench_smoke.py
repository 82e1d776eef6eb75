"""Smoke test of the benchmark harness: `bench/run.py --quick` runs end to end and its reports list
every provider. Nothing here asserts anything about speed."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")


def test_quick_run_writes_reports(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--quick", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kind = f"cpu-{os.cpu_count()}core"
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"{kind}.{ext}").stat().st_size > 0
    doc = json.loads((tmp_path / f"{kind}.json").read_text())
    md = (tmp_path / f"{kind}.md").read_text()
    for key in ("torch", "triton", "device", "date", "host_kind"):
        assert key in doc
    assert doc["host_kind"] == kind
    entries = [e for e in doc["results"] if e["op"] == "trajectory_flow"]
    assert {(e["dtype"], e["mode"]) for e in entries} == {(d, m) for d in ("fp32", "bf16") for m in ("fwd", "fwd+bwd")}
    for e in doc["results"]:
        for name, r in e["providers"].items():
            assert name in md and f"**{name}**" in md
            assert "error" not in r, (name, r["error"])
            if "skipped" not in r:  # a measured provider has a finite, positive median and its samples
                assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0 and r["samples_ms"]
    for e in entries:  # --quick leaves out torch.compile; all other providers are there
        assert {"naive", "eager", "trajops", "roofline"} <= set(e["providers"])
        assert ("skipped" in e["providers"]["naive"]) == (e["mode"] == "fwd+bwd")
    assert "trajectory_flow" in proc.stdout and "| op |" in proc.stdout  # the table is printed


def test_naive_baseline_matches_reference():
    """The seed-style loop the speedups are measured against computes the same op."""
    sys.path.insert(0, BENCH)
    try:
        spec = importlib.util.spec_from_file_location("bench_trajectory_flow", os.path.join(BENCH, "bench_trajectory_flow.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(BENCH)
    ref = mod.ref
    x = torch.randn(2, 12, 5, dtype=torch.float64)
    x[:, 4] = x[:, 3]  # a zero step exercises the eps branch
    x[1, 6:] = x[1, 5]  # ... and positions where no step counts
    for window in (1, 3, 8):
        want = ref.trajectory_flow(x, window, 1e-6)
        for b in range(2):
            got = mod.naive_flow(x, window, 1e-6, b, range(12))
            torch.testing.assert_close(got, want[b])
