"""Crash suite: every raw op and public function called with corrupt or extreme arguments (issue 20).

The cases (tests/hostile_cases*.py) run in a worker subprocess, so a segfault or a hang becomes a
failing test instead of killing pytest: a session fixture starts one worker with every selected case.
The worker imports once and runs the cases in forked children; when a case dies by a signal (or
makes no progress for HOSTILE_CASE_TIMEOUT seconds) alone in a fresh process, that is its recorded
outcome, and the run goes on (see hostile_cases.run_batch). Each case is then one test asserting its
recorded outcome: never a signal; the expected exception (type, and a message that names the
offending argument) or the documented result, checked inside the worker. Off the reference backend,
test_same_error_as_reference also runs the raising cases on the reference (a second worker) and
asserts the same exception type and message text.

The worker inherits this process's environment, so TRAJOPS_BACKEND=reference and
TRAJOPS_BACKEND=triton TRITON_INTERPRET=1 runs exercise those backends. HOSTILE_OUTCOMES=<file.json>
writes every recorded outcome and its verdict; HOSTILE_CASE_TIMEOUT (s, default 60) bounds a case;
HOSTILE_BATCH (default 8) is the number of cases per forked child.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional

import pytest

import hostile_cases as hc
import trajops
from trajops._library import SCHEMAS

WORKER = Path(__file__).with_name("hostile_cases.py")
CASES = hc.load_cases()
CASE_TIMEOUT = float(os.environ.get("HOSTILE_CASE_TIMEOUT", "60"))
BATCH = int(os.environ.get("HOSTILE_BATCH", "8"))  # cases per forked child (see hostile_cases.run_batch)


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _stderr_tail(f, n: int = 1500) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - n))
    return f.read().decode("utf-8", "replace").strip()


def _run_worker(ids: List[str], env: Optional[Dict[str, str]] = None) -> Dict[str, dict]:
    """Runs `ids` in a worker process (environment `env`, default ours); returns id -> recorded outcome.

    The worker reports each case's crash itself (it runs them in forked children). Should the worker
    die or hang anyway, a case it STARTed without DONE is recorded as crashed and a new worker resumes
    after it; if it died between cases, the cases it had not reported record the worker's error.
    """
    outcomes: Dict[str, dict] = {}
    pending = list(ids)
    while pending:
        err = tempfile.TemporaryFile()
        proc = subprocess.Popen([sys.executable, str(WORKER), *pending], stdout=subprocess.PIPE, stderr=err,
                                text=True, env=dict(os.environ) if env is None else env, cwd=str(WORKER.parent.parent))
        lines: "queue.Queue[object]" = queue.Queue()

        def pump(stream=proc.stdout):
            for line in stream:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        current, timed_out = None, False
        while True:
            try:
                # the worker times its cases out itself; a batch runs at most twice
                line = lines.get(timeout=(2 * BATCH + 1) * CASE_TIMEOUT)
            except queue.Empty:
                timed_out = True
                proc.kill()  # our own child, by its handle
                break
            if line is None:
                break
            parts = str(line).rstrip("\n").split(" ", 2)
            if parts[0] == "START" and len(parts) >= 2:
                current = parts[1]
            elif parts[0] == "DONE" and len(parts) == 3:
                outcomes[parts[1]] = json.loads(parts[2])
                current = None
        rc = proc.wait()
        tail = _stderr_tail(err)
        err.close()
        if current is None:
            if rc != 0 or timed_out:
                # died outside any case (e.g. at import): every unfinished case reports it
                for cid in pending:
                    outcomes.setdefault(cid, {"kind": "worker_error", "detail": f"worker rc={rc}: {tail}"})
            break
        if timed_out:
            outcomes[current] = {"kind": "timeout", "detail": f"no progress for {CASE_TIMEOUT:.0f} s"}
        elif rc < 0:
            outcomes[current] = {"kind": "signal", "signal": -rc, "detail": f"{_signal_name(-rc)}; stderr: {tail}"}
        else:
            outcomes[current] = {"kind": "exit", "detail": f"worker exited with {rc}; stderr: {tail}"}
        pending = pending[pending.index(current) + 1:]
    for cid in ids:
        outcomes.setdefault(cid, {"kind": "missing", "detail": "the worker never reported it"})
    return outcomes


def _selected(request, test_name: str) -> List[str]:
    """The case ids of `test_name` that this session selected (-k, node ids)."""
    return [item.callspec.params["case_id"] for item in request.session.items
            if getattr(item, "callspec", None) is not None and "case_id" in item.callspec.params
            and item.originalname == test_name and item.module.__name__ == __name__]


@pytest.fixture(scope="session")
def hostile_outcomes(request) -> Dict[str, dict]:
    selected = sorted(set(_selected(request, "test_hostile_case") + _selected(request, "test_same_error_as_reference")))
    outcomes = _run_worker(selected)
    dump = os.environ.get("HOSTILE_OUTCOMES")
    if dump:  # a record of every outcome and verdict (e.g. to compare backends' error messages)
        with open(dump, "w") as f:
            json.dump({cid: dict(o, verdict=hc.judge(CASES[cid], o)) for cid, o in outcomes.items()}, f, indent=1)
    return outcomes


@pytest.fixture(scope="session")
def reference_outcomes(request) -> Dict[str, dict]:
    """The same cases on the reference backend (a second worker), for the error-identity test."""
    env = dict(os.environ, TRAJOPS_BACKEND="reference")
    env.pop("TRITON_INTERPRET", None)
    return _run_worker(_selected(request, "test_same_error_as_reference"), env)


PUBLIC_CASES = sorted(c for c in CASES if not c.startswith("_"))
RAISE_CASES = [c for c in PUBLIC_CASES if CASES[c].expect.kind == "raise"]


@pytest.mark.parametrize("case_id", PUBLIC_CASES)
def test_hostile_case(case_id: str, hostile_outcomes: Dict[str, dict]) -> None:
    failure = hc.judge(CASES[case_id], hostile_outcomes[case_id])
    assert failure is None, f"{case_id}: {failure}"


@pytest.mark.skipif(trajops.backends()["cpu"] == "reference", reason="compares this backend with the reference")
@pytest.mark.parametrize("case_id", RAISE_CASES)
def test_same_error_as_reference(case_id: str, hostile_outcomes: Dict[str, dict],
                                 reference_outcomes: Dict[str, dict]) -> None:
    """Where both raise, this backend raises the reference's exception type with its message text."""
    got, want = hostile_outcomes[case_id], reference_outcomes[case_id]
    if got["kind"] != "raised" or want["kind"] != "raised":
        pytest.skip("not raised on both backends (test_hostile_case reports it)")
    assert (got["type"], got["msg"]) == (want["type"], want["msg"]), f"{case_id}: differs from the reference"


def test_every_raw_op_and_public_name_has_cases() -> None:
    """The suite reaches every schema in trajops and every public name (ops, nn modules, optim)."""
    targeted = {t for c in CASES.values() for t in c.targets}
    wanted = {f"torch.ops.trajops.{op}" for op in SCHEMAS}
    wanted |= {f"trajops.{n}" for n in trajops.__all__ if n not in ("BACKEND", "HAS_EXTENSION", "HAS_TRITON",
                                                                     "nn", "optim", "reference")}
    wanted |= {f"trajops.nn.{n}" for n in trajops.nn.__all__} | {f"trajops.optim.{n}" for n in trajops.optim.__all__}
    assert not wanted - targeted, f"no hostile case for {sorted(wanted - targeted)}"
    assert targeted <= wanted, f"unknown targets {sorted(targeted - wanted)}"


def test_crash_detection_records_the_signal() -> None:
    """The harness itself: a case that kills its process is recorded as that signal, the run goes on."""
    outcomes = _run_worker(["_harness.after", "_harness.poison", "_harness.victim", "_harness.segv"])
    assert outcomes["_harness.segv"]["kind"] == "signal" and outcomes["_harness.segv"]["signal"] == signal.SIGSEGV
    # a case that dies only after another case ran in its process is not charged with the crash
    for cid in ("_harness.after", "_harness.poison", "_harness.victim"):
        assert outcomes[cid] == {"kind": "returned"}, (cid, outcomes[cid])
