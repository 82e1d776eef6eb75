"""Generic benchmark harness shared by every ``bench/bench_<op>.py`` file.

A bench file describes *what* to measure: a list of :class:`Case` objects (one input shape/dtype
of one op) and, per case, a list of :class:`Provider` objects (implementations of the op). This
module does the *how*: warm-up, timing, peak memory, and the JSON / markdown / PNG reports.

Provider roles drive the ratio table, so every op gets the same columns:

* ``target``   -- the trajops kernel being benchmarked (numerator of most ratios);
* ``eager``    -- the pure-PyTorch reference run eagerly;
* ``compiled`` -- ``torch.compile`` of the reference (compile time excluded by the warm-up);
* ``roofline`` -- a memory-bound floor moving the same bytes as the ideal kernel(s);
* ``naive``    -- the seed-style Python loop, usually timed on a slice and extrapolated;
* ``other``    -- shown in the raw-times table only.

Timing (see :func:`_time_group`): each provider gets ``warmup`` untimed calls, then one timed call
that sizes the measurement (how many calls per sample so that a sample lasts >= ``min_block_s``
in fwd mode, and how many samples fit in ``budget_s``, clamped to [min_reps, repeats]). The
samples of all providers of one (case, mode) are then taken *interleaved* in rounds, rotating
the order, so that slow drifts of a noisy machine hit every provider alike. We report the median
and the interquartile range of the samples (for a provider with ``subtract``: of the derived
samples (call - subtracted call) / ``per``, see Provider). CPU samples use ``time.perf_counter``;
CUDA samples use CUDA events around the calls, after a synchronize. The cyclic GC is paused inside
a sample.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

MODES = ("fwd", "fwd+bwd")
ROLES = ("naive", "eager", "compiled", "target", "roofline", "other")


@dataclass
class Case:
    """One benchmark point of one op.

    make_inputs() returns a fresh tuple of input tensors (on the bench device); providers are
    called as ``fn(*inputs)``. In fwd+bwd mode the floating-point inputs get requires_grad.
    ``bytes`` maps mode -> bytes an ideal kernel (pair) must move; it feeds the GB/s column.
    """

    op: str
    label: str  # shape label, e.g. "B=8 T=2048 D=1024 w=8"
    dtype: torch.dtype
    make_inputs: Callable[[], tuple]
    info: dict = field(default_factory=dict)
    modes: Sequence[str] = MODES
    bytes: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.op} {self.label} {dtype_name(self.dtype)}"


@dataclass
class Provider:
    """One implementation of the op for one case.

    fn(*inputs) -> Tensor is the forward. In fwd+bwd mode the harness runs
    ``fn(*inputs).backward(grad)`` unless ``fwd_bwd(inputs, grad)`` is given (used by rooflines
    that are not differentiable ops). ``extrapolate`` multiplies the measured time, for providers
    that are timed on a slice of the work; ``note`` says how, and appears in every report.
    """

    name: str  # stable key in the JSON, e.g. "eager"
    label: str  # human label, e.g. "eager reference"
    fn: Callable[..., Tensor]
    role: str = "other"
    backward: bool = True
    fwd_bwd: Optional[Callable[[tuple, Tensor], object]] = None
    extrapolate: float = 1.0
    note: str = ""
    warmup: int = 1  # untimed calls before the sizing call; torch.compile wants >= 2
    # A derived time: ``subtract(*inputs)`` is timed right after fn in every sample and the sample is
    # (fn - subtract) / per, e.g. (generate(1 + D) - generate(1)) / D = time per decoded token without
    # the prefill. Pairing the two calls inside one sample lets drifts of a noisy machine cancel.
    subtract: Optional[Callable[..., object]] = None
    per: float = 1.0

    def __post_init__(self):
        assert self.role in ROLES, self.role
        if self.subtract is not None and self.backward:
            raise ValueError(f"Provider {self.name}: a derived time (subtract=...) is fwd only; pass backward=False")
        if not self.per > 0:
            raise ValueError(f"Provider {self.name}: per must be > 0, got {self.per}")


@dataclass
class Context:
    """What a bench file's ``benchmarks(ctx)`` may look at to choose cases and providers."""

    device: torch.device
    quick: bool = False  # tiny shapes for the smoke test
    compile: bool = True  # include torch.compile providers (off in --quick: compiling is slow)


@dataclass
class Settings:
    repeats: int = 25  # at most this many samples per (case, mode, provider)
    min_reps: int = 5  # at least this many, even when the budget is exceeded
    budget_s: float = 3.0  # target time spent sampling one provider
    min_block_s: float = 2e-3  # fwd samples batch calls until they last this long


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float32", "fp32").replace("bfloat16", "bf16").replace(
        "float16", "fp16").replace("float64", "fp64")


def host_kind(device: torch.device) -> str:
    """'cpu-<n>core' on CPU, a slug of the GPU name on CUDA (names the result files)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu-{os.cpu_count()}core"


# ----------------------------------------------------------------------------------------------
# running one provider


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _runner(prov: Provider, mode: str, inputs: tuple, grad: Optional[Tensor]):
    """(run, reset): run() does one call of the measured work; reset() undoes its side effects
    (clears .grad so backward never accumulates) and is never timed."""
    if mode == "fwd":
        return (lambda: prov.fn(*inputs)), (lambda: None)
    if prov.fwd_bwd is not None:
        def run():
            with torch.no_grad():  # a roofline must not pay for autograd bookkeeping
                return prov.fwd_bwd(inputs, grad)
        return run, (lambda: None)

    leaves = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]

    def run():
        out = prov.fn(*inputs)
        out.backward(grad)
        return out

    def reset():
        for t in leaves:
            t.grad = None  # freed here, untimed, rather than inside the next sample
    return run, reset


def _sample(device: torch.device, run, reset, inner: int) -> float:
    """Seconds per call, averaged over `inner` back-to-back calls, with Python's cyclic garbage
    collector paused as ``timeit`` does (a collection pass triggered by one provider's allocations
    would otherwise land in whichever sample happens to run it)."""
    reset()
    _sync(device)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _timed(device, run, inner)
    finally:
        if gc_was_enabled:
            gc.enable()


def _timed(device: torch.device, run, inner: int) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            out = run()
        end.record()
        end.synchronize()
        dt = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(inner):
            out = run()
        dt = time.perf_counter() - t0
    del out  # freed after the clock stopped (for inner == 1)
    return dt / inner


@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 while the profiler starts/stops: kineto prints status lines straight to the
    C-level stderr that would clutter the progress output. Python exceptions still propagate."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory(device: torch.device, run, reset) -> Optional[int]:
    """Peak bytes allocated *above the level at the start of one call* (inputs, and grads
    cleared by reset(), are not counted; the call's outputs and temporaries are).

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
    ``memory_allocated`` before the call (caching-allocator bytes handed to tensors).

    CPU: there is no allocator peak counter, so the call runs once under ``torch.profiler`` with
    ``profile_memory=True``; every allocation/free through the c10 CPU allocator is an event with
    a signed byte count, and we return the maximum of their running sum in time order. This sees
    every tensor (eager ops, inductor-generated code, C++ extensions using ATen), but not memory a
    kernel obtains with raw malloc/new, nor the Python heap. Returns None when unavailable.
    """
    reset()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = run()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    try:
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                out = run()
                del out
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except Exception as err:  # profiler internals moved, or built without kineto
        print(f"    (peak memory unavailable: {type(err).__name__}: {err})", flush=True)
        return None
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return int(peak)


def _make_grad(case: Case, providers: Sequence[Provider], inputs: tuple) -> Tensor:
    """A fixed random output gradient shaped like the output of the first full-size provider."""
    prov = next(p for p in providers if p.extrapolate == 1.0 and p.fwd_bwd is None)
    with torch.no_grad():
        out = prov.fn(*inputs)
    gen = torch.Generator(device=out.device).manual_seed(1234)
    return torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32).to(out.dtype)


def _stats(samples: list) -> dict:
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
    return {"median_ms": q[1] * 1e3, "q25_ms": q[0] * 1e3, "q75_ms": q[2] * 1e3, "min_ms": s[0] * 1e3}


def _time_group(case: Case, mode: str, providers: Sequence[Provider], device: torch.device,
                st: Settings, log: Callable[[str], None]) -> dict:
    """Time every provider of one (case, mode) interleaved; returns {name: result dict}."""
    inputs = case.make_inputs()
    grad = None
    if mode == "fwd+bwd":
        inputs = tuple(t.detach().requires_grad_(True) if isinstance(t, Tensor) and t.is_floating_point()
                       else t for t in inputs)
        grad = _make_grad(case, providers, inputs)
    head = f"[{case.key} {mode}]"
    plans, results = [], {}
    for prov in providers:
        if mode == "fwd+bwd" and not prov.backward:
            results[prov.name] = {"skipped": "no backward"}
            continue
        run, reset = _runner(prov, mode, inputs, grad)
        sub = None if prov.subtract is None else (lambda p=prov: p.subtract(*inputs))
        t0 = time.perf_counter()
        try:
            for _ in range(prov.warmup):
                for f in (run, sub) if sub is not None else (run,):
                    reset()
                    f()
                    _sync(device)
            est = _sample(device, run, reset, 1)
            if sub is not None:  # a sample runs both calls
                est += _sample(device, sub, reset, 1)
        except Exception as err:  # one broken provider must not lose the others' numbers
            results[prov.name] = {"error": f"{type(err).__name__}: {err}"}
            log(f"{head} {prov.label}: FAILED {results[prov.name]['error']}")
            continue
        warm_s = time.perf_counter() - t0 - est
        inner = 1 if mode != "fwd" else max(1, math.ceil(st.min_block_s / max(est, 1e-9)))
        reps = max(min(st.min_reps, st.repeats), min(st.repeats, int(st.budget_s / max(est * inner, 1e-9))))
        log(f"{head} {prov.label}: warm-up {warm_s:.2f}s, ~{est * 1e3:.3f} ms/call -> {reps} samples x {inner} calls")
        plans.append((prov, run, reset, inner, reps, [], warm_s, sub, []))
    # Interleaved rounds; a provider drops out once it has its samples.
    for r in range(max((p[4] for p in plans), default=0)):
        for prov, run, reset, inner, reps, samples, _, sub, pairs in plans[r % len(plans):] + plans[: r % len(plans)]:
            if r < reps:
                t = _sample(device, run, reset, inner)
                if sub is not None:
                    pairs.append((t, _sample(device, sub, reset, inner)))
                    t = (t - pairs[-1][1]) / prov.per
                samples.append(t)
    for prov, run, reset, inner, reps, samples, warm_s, sub, pairs in plans:
        res = _stats(samples)
        if sub is not None:  # the two medians as measured, per call (not divided by per)
            res.update(per=prov.per, total_median_ms=statistics.median(p[0] for p in pairs) * 1e3,
                       subtracted_median_ms=statistics.median(p[1] for p in pairs) * 1e3)
        mem = None if prov.extrapolate != 1.0 else peak_memory(device, run, reset)
        # samples_ms stay as measured (for an extrapolated provider: on its slice)
        res.update(samples_ms=[s * 1e3 for s in samples], reps=reps, inner=inner, warmup_s=warm_s,
                   peak_mem_bytes=mem)
        if prov.extrapolate != 1.0:
            res["measured_median_ms"] = res["median_ms"]
            for k in ("median_ms", "q25_ms", "q75_ms", "min_ms"):
                res[k] *= prov.extrapolate
        results[prov.name] = res
        iqr = res["q75_ms"] - res["q25_ms"]
        mem_s = "n/a" if mem is None else f"{mem / 2**20:.1f} MiB"
        extra = f" (extrapolated x{prov.extrapolate:g})" if prov.extrapolate != 1.0 else ""
        if sub is not None:
            extra += (f" = (call {fmt_ms(res['total_median_ms'])} - subtracted {fmt_ms(res['subtracted_median_ms'])})"
                      f" / {prov.per:g}")
        log(f"{head} {prov.label}: median {fmt_ms(res['median_ms'])} ms{extra}, IQR {fmt_ms(iqr)} ms, peak {mem_s}")
    for prov in providers:  # put skipped ones back in provider order
        results[prov.name] = results.pop(prov.name)
    return results


# ----------------------------------------------------------------------------------------------
# the whole run


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_all(items: Sequence[tuple], device: torch.device, st: Settings, notes: Sequence[str] = (),
            partial: Optional[Callable[[dict], None]] = None) -> dict:
    """Benchmark every (Case, [Provider]) in `items`; returns the JSON-able result document.
    ``partial(doc)`` is called after every case with the document so far (a run cut short by a time
    limit, as on a leased GPU, then still leaves its finished cases on disk)."""
    def log(msg):
        print(msg, flush=True)

    entries = []
    for case, providers in items:
        for mode in case.modes:
            res = _time_group(case, mode, providers, device, st, log)
            entries.append({
                "op": case.op, "case": case.label, "dtype": dtype_name(case.dtype), "mode": mode,
                "info": case.info, "bytes": case.bytes.get(mode),
                "providers": {p.name: {"label": p.label, "role": p.role, "note": p.note,
                                       "extrapolate": p.extrapolate, **res[p.name]} for p in providers},
            })
        if partial is not None:
            partial(_document(entries, device, st, list(notes) + ["partial run: cases after the last one listed "
                                                                   "were not reached"]))
    return _document(entries, device, st, notes)


def _document(entries: list, device: torch.device, st: Settings, notes: Sequence[str]) -> dict:
    try:
        import triton
        triton_v = triton.__version__
    except Exception:
        triton_v = None
    return {
        "host_kind": host_kind(device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_v,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": vars(st),
        "notes": list(notes),
        "results": entries,
    }


# ----------------------------------------------------------------------------------------------
# reports


def fmt_ms(ms: Optional[float]) -> str:
    return "n/a" if ms is None else _num(ms)


def _by_role(entry: dict, role: str) -> Optional[dict]:
    for r in entry["providers"].values():
        if r["role"] == role and "median_ms" in r:
            return r
    return None


def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _ratio(a: Optional[dict], b: Optional[dict]) -> str:
    if a is None or b is None:
        return "n/a"
    return _num(a["median_ms"] / b["median_ms"])


def _mib(r: Optional[dict]) -> str:
    if r is None or r.get("peak_mem_bytes") is None:
        return "n/a"
    return _num(r["peak_mem_bytes"] / 2**20)


def render_markdown(doc: dict) -> str:
    """Ratio table (one row per case x mode), then raw medians, then provider notes."""
    lines = [f"# Benchmarks on {doc['host_kind']} ({doc['device']})", "",
             f"torch {doc['torch']}, triton {doc['triton']}, {doc['torch_threads']} threads, {doc['date']}", ""]
    lines += [f"> **NOTE:** {n}" for n in doc["notes"]] + ([""] if doc["notes"] else [])
    lines += [
        "Ratios of median times: below 1 means trajops is faster; `naive/trajops` is a speedup.",
        "GB/s = ideal bytes moved / trajops time; `% roofline` = achieved bandwidth as a fraction of the",
        "roofline's (clone's) bandwidth for the same bytes = roofline time / trajops time.",
        "Peak memory is MiB above the inputs for one call (see harness.peak_memory); n/a for",
        "extrapolated providers, whose slice says nothing about the full call.", "",
        "| op | case | dtype | mode | trajops ms (IQR) | trajops/eager | trajops/compile | trajops/roofline "
        "| naive/trajops (extrapolated) | GB/s | % roofline | peak MiB trajops / eager / compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in doc["results"]:
        t, eg, c, rf, nv = (_by_role(e, k) for k in ("target", "eager", "compiled", "roofline", "naive"))
        t_ms = "n/a" if t is None else f"{fmt_ms(t['median_ms'])} ({fmt_ms(t['q75_ms'] - t['q25_ms'])})"
        gbs = "n/a" if t is None or not e["bytes"] else _num(e["bytes"] / t["median_ms"] / 1e6)
        pct = "n/a" if t is None or rf is None else _num(100 * rf["median_ms"] / t["median_ms"]) + "%"
        lines.append(f"| {e['op']} | {e['case']} | {e['dtype']} | {e['mode']} | {t_ms} | {_ratio(t, eg)} "
                     f"| {_ratio(t, c)} | {_ratio(t, rf)} | {_ratio(nv, t)} | {gbs} | {pct} "
                     f"| {_mib(t)} / {_mib(eg)} / {_mib(c)} |")
    names = list(dict.fromkeys(n for e in doc["results"] for n in e["providers"]))
    lines += ["", "Raw medians in ms (peak MiB):", "",
              "| op | case | dtype | mode | " + " | ".join(names) + " |",
              "|---" * (4 + len(names)) + "|"]
    for e in doc["results"]:
        cells = []
        for n in names:
            r = e["providers"].get(n)
            if r is None or "median_ms" not in r:
                cells.append("FAILED" if r and "error" in r else "—")
            else:
                cells.append(f"{fmt_ms(r['median_ms'])} ({_mib(r)})")
        lines.append(f"| {e['op']} | {e['case']} | {e['dtype']} | {e['mode']} | " + " | ".join(cells) + " |")
    lines += ["", "Providers:", ""]
    seen = {}
    for e in doc["results"]:
        for n, r in e["providers"].items():
            seen.setdefault((e["op"], n), r)
    for (op, n), r in seen.items():
        lines.append(f"- `{op}` **{n}** ({r['role']}): {r['label']}" + (f" — {r['note']}" if r["note"] else ""))
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: str) -> None:
    """Grouped bars: one group per case x mode, one bar per provider, log time axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = doc["results"]
    names = list(dict.fromkeys(n for e in entries for n in e["providers"]))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(entries) + 2), 4.5))
    for j, n in enumerate(names):
        xs, ys, err, hatch = [], [], ([], []), []
        for i, e in enumerate(entries):
            r = e["providers"].get(n)
            if r and "median_ms" in r:
                xs.append(i + (j - (len(names) - 1) / 2) * width)
                ys.append(r["median_ms"])
                err[0].append(r["median_ms"] - r["q25_ms"])  # whiskers span the IQR
                err[1].append(r["q75_ms"] - r["median_ms"])
                hatch.append(r["extrapolate"] != 1.0)
        label = n + (" (extrapolated)" if any(hatch) else "")
        bars = ax.bar(xs, ys, width, yerr=err, capsize=2, label=label)
        for b, h in zip(bars, hatch):
            if h:
                b.set_hatch("//")
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms, log)")
    ax.set_xticks(range(len(entries)))
    ax.set_xticklabels([f"{e['op']}\n{e['case']}\n{e['dtype']} {e['mode']}" for e in entries], fontsize=7)
    ax.set_title(f"{doc['host_kind']} — torch {doc['torch']}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never hides a bar
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(doc: dict, out_dir: str) -> dict:
    """Write <host-kind>.json/.md/.png under out_dir; returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, doc["host_kind"])
    paths = {"json": base + ".json", "md": base + ".md", "png": base + ".png"}
    with open(paths["json"], "w") as f:
        json.dump(doc, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(render_markdown(doc))
    plot(doc, paths["png"])
    return paths
