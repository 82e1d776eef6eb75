"""The crash suite's case registry and worker process (tests/test_hostile_inputs.py drives it).

Every case calls a raw op (``torch.ops.trajops.*``) or a public function/module with corrupt or
extreme arguments and declares what must happen:

* ``raises(*names)``: an exception of an accepted type whose message names the offending argument
  (one of ``names``, matched as a whole word);
* ``RESULT``: a normal return whose documented result the case checks itself (``check``/``same``
  raise ``WrongResult`` when it differs);
* ``either(*names)``: where the issue leaves the result open, an exception (naming the argument when
  ``names`` are given) or a return that passes the case's own shape checks.

Run as ``python tests/hostile_cases.py <case ids...>`` (with the parent's environment, so the
TRAJOPS_BACKEND of the pytest run is the one exercised), the worker imports once, runs the cases in
forked children (see :func:`run_batch`: a case that kills its process or hangs is recorded as a
signal or a timeout) and prints ``START <id>`` and ``DONE <id> <outcome json>`` for each, flushed.
"""
from __future__ import annotations

import gc
import json
import os
import re
import select
import signal
import sys
import tempfile
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

ARG_ERRORS = ("ValueError", "TypeError", "IndexError")  # what a bad argument raises (torch._check_* too)
ANY_ERROR = ARG_ERRORS + ("RuntimeError",)
CASE_MODULES = ("hostile_cases_issue", "hostile_cases_kv", "hostile_cases_kv_evict", "hostile_cases_paged",
                "hostile_cases_attn", "hostile_cases_attn_varlen", "hostile_cases_flow", "hostile_cases_stp",
                "hostile_cases_ape", "hostile_cases_stp_inject")


class WrongResult(Exception):
    """A case's documented-result check failed (kept apart from errors raised by the code under test)."""


@dataclass(frozen=True)
class Expect:
    kind: str  # "raise", "result" or "either"
    types: Tuple[str, ...] = ()  # accepted exception classes, by name (matched against the MRO)
    names: Tuple[str, ...] = ()  # the message must name one of these (whole word)
    also: Tuple[str, ...] = ()  # ... and contain every one of these substrings

    def describe(self) -> str:
        if self.kind == "result":
            return "the documented result"
        err = f"{'/'.join(self.types)}" + (f" naming {' or '.join(self.names)}" if self.names else "")
        err += "".join(f" containing {a!r}" for a in self.also)
        return err if self.kind == "raise" else f"{err}, or a result of the right shape"


def raises(*names: str, types: Sequence[str] = ARG_ERRORS, also: Sequence[str] = ()) -> Expect:
    return Expect("raise", tuple(types), tuple(names), tuple(also))


def either(*names: str, types: Sequence[str] = ANY_ERROR) -> Expect:
    return Expect("either", tuple(types), tuple(names))


RESULT = Expect("result")


@dataclass(frozen=True)
class Case:
    id: str
    fn: Callable[[], None]
    expect: Expect
    targets: Tuple[str, ...]  # the raw ops / public names it exercises (for the coverage test)


CASES: Dict[str, Case] = {}


def register(cid: str, fn: Callable[[], None], expect: Expect, *targets: str) -> None:
    if cid in CASES:
        raise KeyError(f"duplicate hostile case id {cid!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.\-=+]+", cid):
        raise ValueError(f"hostile case id {cid!r} has characters that do not survive a command line")
    CASES[cid] = Case(cid, fn, expect, tuple(targets))


def case(cid: str, expect: Expect, *targets: str):
    def deco(fn):
        register(cid, fn, expect, *targets)
        return fn

    return deco


def load_cases() -> Dict[str, Case]:
    for name in CASE_MODULES:
        __import__(name)
    return CASES


# The harness's own cases (ids starting with "_": not collected as tests): a crash, a normal case, and
# a "victim" that dies only in a process where "poison" ran before it (like a heap corrupted earlier).
_POISONED = []
register("_harness.segv", lambda: os.kill(os.getpid(), signal.SIGSEGV), RESULT)
register("_harness.after", lambda: None, RESULT)
register("_harness.poison", lambda: _POISONED.append(True), RESULT)
register("_harness.victim", lambda: _POISONED and os.kill(os.getpid(), signal.SIGSEGV), RESULT)


# ---------------------------------------------------------------- checks used inside cases
def check(cond: bool, msg: str) -> None:
    if not cond:
        raise WrongResult(msg)


def check_shape(t: torch.Tensor, shape, what: str) -> None:
    check(tuple(t.shape) == tuple(shape), f"{what}: expected shape {list(shape)}, got {list(t.shape)}")


def same(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = 0.0) -> None:
    """Equal values (NaN where expected has NaN, equal infinities), within tol (relative and absolute).

    Hand-written instead of torch.testing.assert_close, whose first call imports ~1.5 s of modules:
    each case runs in a fresh fork, so that would be paid by every case."""
    check_shape(actual, expected.shape, what)
    if not (actual.is_floating_point() or expected.is_floating_point()):
        bad = actual.cpu() != expected.cpu()
    else:
        a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
        both_nan = a.isnan() & e.isnan()
        close = (a == e) | ((a - e).abs() <= tol + tol * e.abs())
        bad = ~(both_nan | close)
    if bool(bad.any()):
        idx = [int(i) for i in bad.nonzero()[0]] if bad.dim() else []
        raise WrongResult(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (tol {tol}); first at "
                          f"{idx}: got {actual[tuple(idx)].item()}, expected {expected[tuple(idx)].item()}")


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """t's values in a non-contiguous layout: every other element of a buffer twice as large."""
    return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]


def rows_nan(t: torch.Tensor, dims: int) -> torch.Tensor:
    """Bool per row (the tensor without its last ``dims`` dims): every element of the row is NaN."""
    return t.isnan().flatten(t.dim() - dims).all(-1) if dims else t.isnan()


# ---------------------------------------------------------------- judging (in the parent)
def _names_in(msg: str, names: Sequence[str]) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg) for n in names)


def judge(c: Case, outcome: dict) -> Optional[str]:
    """None when the recorded outcome meets the case's expectation, else what went wrong."""
    kind, e = outcome["kind"], c.expect
    if kind in ("signal", "timeout", "exit", "missing", "worker_error"):
        return f"{kind}: {outcome.get('detail', '')}"
    if kind == "wrong_result":
        return f"wrong result: {outcome['msg']}"
    if kind == "returned":
        return f"no exception (expected {e.describe()})" if e.kind == "raise" else None
    # raised
    got = f"{outcome['type']}: {outcome['msg']}"
    if e.kind == "result":
        return f"expected the documented result, got {got}"
    if not set(outcome["mro"]) & set(e.types):
        return f"wrong exception type (expected {e.describe()}), got {got}"
    if e.names and not _names_in(outcome["msg"], e.names):
        return f"message does not name {' or '.join(e.names)}: {got}"
    missing = [a for a in e.also if a not in outcome["msg"]]
    if missing:
        return f"message lacks {missing}: {got}"
    return None


# ---------------------------------------------------------------- the worker
def run_case(c: Case) -> dict:
    torch.manual_seed(0)
    try:
        c.fn()
    except WrongResult as exc:
        return {"kind": "wrong_result", "msg": str(exc)[:3000]}
    except Exception as exc:  # the code under test may raise anything: record it, judge it in the parent
        msg = str(exc)
        if not msg.strip():
            msg = traceback.format_exc(limit=-2)
        return {"kind": "raised", "type": type(exc).__name__, "mro": [k.__name__ for k in type(exc).__mro__],
                "msg": msg[:3000]}
    return {"kind": "returned"}


def _limit_memory() -> None:
    # A safety net for a shared machine: a corrupt size that slips through must fail to allocate (an
    # exception) instead of paging the machine to death. The worker itself needs about 1 GiB of address
    # space; a CUDA context reserves far more, so there is no limit where a GPU is visible (or with
    # HOSTILE_MEMORY_GIB=0).
    try:
        import resource

        gib = float(os.environ.get("HOSTILE_MEMORY_GIB", "8"))
        if gib <= 0 or torch.cuda.is_available():
            return
        limit = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (ImportError, ValueError, OSError):
        pass


def _tail(path: str, n: int = 1200) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def run_forked(cases: Sequence[Case], timeout: float, err_path: str) -> List[dict]:
    """Runs the cases one after another in a forked child; returns their outcomes, the last one being
    how the child died if it did (a signal, a timeout, an exit) — the cases after it are not run."""
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: run, report on the pipe, leave without running any destructor
        os.close(rfd)
        err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(err, 1)  # stray prints of the code under test stay off the protocol
        os.dup2(err, 2)
        for c in cases:
            os.write(wfd, (json.dumps(run_case(c)) + "\n").encode())
        os._exit(0)
    os.close(wfd)
    outcomes: List[dict] = []
    buf, timed_out = b"", False
    while True:
        ready, _, _ = select.select([rfd], [], [], timeout)
        if not ready:
            timed_out = True
            os.kill(pid, signal.SIGKILL)  # our own child, by its pid
            break
        chunk = os.read(rfd, 1 << 16)
        if not chunk:
            break
        *lines, buf = (buf + chunk).split(b"\n")
        outcomes += [json.loads(line) for line in lines]
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    if len(outcomes) < len(cases):
        if timed_out:
            outcomes.append({"kind": "timeout", "detail": f"no progress for {timeout:.0f} s"})
        elif os.WIFSIGNALED(status):
            num = os.WTERMSIG(status)
            outcomes.append({"kind": "signal", "signal": num,
                             "detail": f"{signal.Signals(num).name}; stderr: {_tail(err_path)}"})
        else:
            outcomes.append({"kind": "exit", "detail": f"status {status}; stderr: {_tail(err_path)}"})
    return outcomes


def run_batch(cases: Sequence[Case], timeout: float, err_path: str) -> List[dict]:
    """The cases' outcomes, each as if run alone in a fresh process.

    They first run together in one child (a fork costs ~20 ms: one per case would be most of the
    suite's time). If that child dies, every case of the batch runs again, each in its own child: a
    case that corrupts memory without crashing must not make a later case crash (or hide its own
    crash), so a signal is only ever charged to a case that dies alone.
    """
    outcomes = run_forked(cases, timeout, err_path)
    if len(outcomes) == len(cases) and outcomes[-1]["kind"] not in ("signal", "timeout", "exit"):
        return outcomes
    return [run_forked([c], timeout, err_path)[0] for c in cases]


def warm_up() -> None:
    """Valid calls of every op, once, before the first fork: the lazy imports and first-call set-up
    they trigger (sympy through torch._check_value, the Triton interpreter's kernel parsing...) are
    then paid once instead of in every child. One intra-op thread (inherited by the children): a fork
    after an OpenMP parallel region is not safe, and the cases are tiny anyway."""
    import trajops
    from trajops.ops import adaptive_positional_encoding as ape, temperature_attention as ta, \
        trajectory_flow as tf

    torch.set_num_threads(1)
    x = torch.randn(2, 4, 3, requires_grad=True)
    trajops.trajectory_flow(x, 2).sum().backward()
    tf._reference_forward(x.detach(), 2, 1e-6)
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    out, lse = trajops.temperature_attention(q, q, q, 1.0, return_lse=True, causal=True)
    (out.sum() + lse.sum()).backward()
    ta._reference_forward(q.detach(), q.detach(), q.detach(), torch.tensor(1.0), None, False, None)
    h = torch.randn(2, 5, 3, requires_grad=True)
    (trajops.stp_loss(h, 2) + trajops.stp_loss_dense(h)).backward()
    d = torch.rand(2, 4, requires_grad=True)
    trajops.adaptive_positional_encoding(d, torch.randn(8, 3)).sum().backward()
    ape._reference_forward(d.detach(), torch.randn(8, 3))
    c = trajops.PagedTrajectoryKVCache(1, 4, 2, 1, 4, 3, 1, 4)
    kv = torch.randn(1, 1, 3, 4)
    c.append(0, kv, kv, torch.randn(1, 3))
    c.topk(torch.randn(1, 3), 2)
    c.relevance(torch.randn(1, 3))
    with torch.no_grad():
        trajops.paged_temperature_attention(torch.randn(1, 1, 1, 4), c, 0, 1.0)
    same(torch.zeros(2), torch.zeros(2), "warm-up")


def main(ids: Sequence[str]) -> None:
    _limit_memory()
    load_cases()
    try:
        warm_up()
    except Exception:  # only a speed-up: the cases report whatever is broken
        traceback.print_exc()
    gc.freeze()  # the children's garbage collector then leaves the parent's objects (and pages) alone
    timeout = float(os.environ.get("HOSTILE_CASE_TIMEOUT", "60"))
    err_path = os.path.join(tempfile.mkdtemp(prefix="hostile_"), "stderr")
    out = sys.stdout
    batch = int(os.environ.get("HOSTILE_BATCH", "8"))
    for i in range(0, len(ids), batch):
        chunk = list(ids[i:i + batch])
        for cid, outcome in zip(chunk, run_batch([CASES[cid] for cid in chunk], timeout, err_path)):
            out.write(f"START {cid}\nDONE {cid} {json.dumps(outcome)}\n")
        out.flush()
    try:
        os.unlink(err_path)
        os.rmdir(os.path.dirname(err_path))
    except OSError:
        pass


if __name__ == "__main__":
    # Run through the importable module (not __main__) so the case modules share its registry.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import hostile_cases

    hostile_cases.main(sys.argv[1:])
