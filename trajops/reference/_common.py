"""Helpers shared by the references."""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every trajops kernel: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_by_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                 lse_b: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """Softmax attention over the union of two disjoint key sets from each set's (out, lse).

    out_a, out_b: (..., n, Dv); lse_a, lse_b: (..., n), -inf for a query without keys in that set, NaN for a
    NaN row (it stays NaN). Returns (out, lse) in the compute dtype (fp32, fp64 for fp64 lse): out 0 and lse
    -inf where neither set has a key. ``out = (e^{lse_a} out_a + e^{lse_b} out_b) / (e^{lse_a} + e^{lse_b})``,
    formed against the larger lse.
    """
    cd = compute_dtype(lse_a.dtype)
    lse_a, lse_b = lse_a.to(cd), lse_b.to(cd)
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(m == float("-inf"), 0.0, m)  # no key anywhere: both weights exp(-inf) = 0
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    den = wa + wb
    num = wa.unsqueeze(-1) * out_a.to(cd) + wb.unsqueeze(-1) * out_b.to(cd)
    return num / torch.where(den > 0, den, 1.0).unsqueeze(-1), m + torch.log(den)
