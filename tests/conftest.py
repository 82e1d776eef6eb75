"""Shared test set-up: which backend this run exercises, tolerances, and a guard that the C++
extension really is what the default run tests (TRAJOPS_REQUIRE_EXT=1, set by `make test`)."""
from __future__ import annotations

import os

import pytest
import torch

import trajops

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
