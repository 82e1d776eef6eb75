"""Smoke test of the benchmark harness: `bench/run.py --quick` runs end to end and its reports list
every provider. Nothing here asserts anything about speed."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
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
    _check_hf_generate(doc)


def _check_hf_generate(doc):
    """The generate() bench (when transformers is there): its context-sweep case reports decode time per token."""
    entries = [e for e in doc["results"] if e["op"] == "hf_generate"]
    if not entries:  # the bench file skips itself without transformers
        assert importlib.util.find_spec("transformers") is None
        return
    sweep = [e for e in entries if "decoded" in e["info"]]
    assert len(sweep) == 1 and sweep[0]["case"].startswith("context 64:")  # --quick: one tiny context
    e = sweep[0]
    d = e["info"]["decoded"]
    assert set(e["providers"]) == {"eager", "trajops", "trajops_paged"}
    for name, r in e["providers"].items():
        assert r["per"] == d and r["total_median_ms"] > 0 and r["subtracted_median_ms"] > 0
        # the derived time may come out <= 0 on a loaded machine (it is a difference): only finite is asserted
        assert math.isfinite(r["median_ms"]) and len(r["samples_ms"]) == r["reps"]
        assert r["peak_mem_bytes"] is not None and e["info"]["kv_bytes"][name] > 0
    kv = e["info"]["kv_bytes"]  # the eviction pools hold a quarter of the prompt, the dense cache all of it
    assert kv["trajops"] == kv["trajops_paged"] < kv["eager"]


def test_harness_derived_time(monkeypatch):
    """Provider(subtract=, per=): each sample is (call - the subtracted call right after it) / per, paired."""
    sys.path.insert(0, BENCH)
    try:
        import harness
    finally:
        sys.path.remove(BENCH)
    monkeypatch.setattr(harness, "_timed", lambda device, run, inner: run())  # a "call" returns its own time
    counts = {"fn": 0, "sub": 0}

    def clock(kind, base):  # the k-th call of each kind lasts base + 7k s: only paired k's give a constant
        counts[kind] += 1
        return base + 7.0 * counts[kind]

    provs = [harness.Provider("plain", "plain", lambda: 5.0, role="eager"),
             harness.Provider("derived", "derived", lambda: clock("fn", 100.0), role="target", backward=False,
                              subtract=lambda: clock("sub", 1.0), per=3)]
    case = harness.Case("op", "label", torch.float32, lambda: (), modes=("fwd",))
    st = harness.Settings(repeats=4, min_reps=4, budget_s=1.0)
    res = harness._time_group(case, "fwd", provs, torch.device("cpu"), st, lambda msg: None)
    r = res["derived"]
    assert r["samples_ms"] == [33000.0] * 4 and r["median_ms"] == 33000.0 and r["per"] == 3
    assert r["total_median_ms"] > r["subtracted_median_ms"] > 0
    assert res["plain"]["median_ms"] == 5000.0 and "per" not in res["plain"]
    assert counts["sub"] == 1 + 1 + 4  # warm-up, sizing, samples (peak memory times the call alone)
    for bad in (dict(subtract=lambda: 0.0), dict(per=0)):  # subtract needs backward=False; per > 0
        with pytest.raises(ValueError, match="Provider p"):
            harness.Provider("p", "p", lambda: 0.0, **bad)


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


def test_decode_host_probe_runs(tmp_path):
    """bench/decode_host.py (the host time of a decode step, for GPU sessions) runs end to end on tiny shapes and
    writes its table with one row per measured piece (its numbers are not checked: tests never assert on time)."""
    spec = importlib.util.spec_from_file_location("decode_host", os.path.join(BENCH, "decode_host.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.main(["--device", "cpu", "--layers", "2", "--keys", "32", "--calls", "3", "--out", str(tmp_path)])
    assert (tmp_path / "decode-host-cpu.md").read_text() == text
    assert text.count("\n| ") == 6  # the header row and five measured rows
