"""Helpers of the NaN/Inf differential tests (tests/test_*_nonfinite.py): inputs with non-finite
values sprinkled in, and a comparison that demands the same NaN and Inf positions on every backend."""
from __future__ import annotations

import os

import torch
from hypothesis import strategies as st

from conftest import TOL

NONFINITE = (float("nan"), float("inf"), float("-inf"))

# Examples per differential test: small for CI; TRAJOPS_FUZZ_EXAMPLES=2000 for a deeper local search.
EXAMPLES = int(os.environ.get("TRAJOPS_FUZZ_EXAMPLES", 30))


def sprinkle(t: torch.Tensor, spots, values=NONFINITE) -> torch.Tensor:
    """A copy of t with values[k % 3] written at the flat positions spots[k] (modulo t.numel())."""
    out = t.clone()
    if out.numel() == 0:
        return out
    flat = out.view(-1)
    for k, pos in enumerate(spots):
        flat[pos % flat.numel()] = values[k % len(values)]
    return out


def spots(max_count: int = 3):
    """A strategy: where to put non-finite values (indices taken modulo the tensor size)."""
    return st.lists(st.integers(0, 10**6), min_size=0, max_size=max_count)


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                          what: str = "") -> None:
    """NaN exactly where expected has NaN, +-Inf exactly where it has them, the rest close."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a, e = actual.double(), expected.double()
    nan_a, nan_e = a.isnan(), e.isnan()
    if not torch.equal(nan_a, nan_e):
        idx = (nan_a != nan_e).nonzero()[0].tolist()
        raise AssertionError(f"{what}: NaN positions differ, first at {idx}: actual {float(a[tuple(idx)])!r}, "
                             f"expected {float(e[tuple(idx)])!r}")
    inf_a, inf_e = a.isinf(), e.isinf()
    if not torch.equal(inf_a, inf_e) or not torch.equal(a[inf_a], e[inf_e]):
        idx = ((inf_a != inf_e) | (a != e) & inf_e).nonzero()[0].tolist()
        raise AssertionError(f"{what}: Inf positions differ, first at {idx}: actual {float(a[tuple(idx)])!r}, "
                             f"expected {float(e[tuple(idx)])!r}")
    fin = torch.isfinite(e)
    tol = TOL[dtype or expected.dtype]
    scale = max(1.0, float(e[fin].abs().max())) if bool(fin.any()) else 1.0
    torch.testing.assert_close(a[fin], e[fin], atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")
