"""adaptive_positional_encoding forward outputs of 4 MiB and more (the C++ kernel's streaming-store path).

The C++ forward writes outputs of at least 4 MiB with streaming stores through a staging buffer
(csrc/cpu/adaptive_positional_encoding.cpp, lerp_row_streamed); smaller ones directly. These tests
check that path against the reference, bit for bit against the direct path, and independent of the
thread count, on rows that do not start on a 64-byte boundary and are longer than the staging
buffer. They run in the C++ pass (`pytest tests`); on the other backends they check the same
contract at the same sizes.
"""
from __future__ import annotations

import pytest
import torch

from trajops import reference

from conftest import assert_close

op = torch.ops.trajops.adaptive_positional_encoding

STREAM_MIN_BYTES = 4 << 20  # kStreamMinBytes in the C++ kernel


def _inputs(B: int, T: int, L: int, E: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    d = (torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3).to(dtype)
    table = torch.randn(L, E, generator=gen, dtype=torch.float64).to(dtype)
    return d, table


# (B, T, E, dtype): rows of E elements longer than the 4 KiB staging buffer (1024 fp32, 512 fp64,
# 2048 half elements) and row sizes that are not multiples of 64 bytes, so rows start unaligned.
CASES = [
    (2, 700, 1500, torch.float32),   # 8.0 MiB, 6000-byte rows
    (3, 400, 1030, torch.float32),   # 4.7 MiB, 4120-byte rows, one 6-element chunk after 1024
    (1, 1000, 610, torch.float64),   # 4.7 MiB, 4880-byte rows
    (1, 1100, 2050, torch.bfloat16), # 4.3 MiB, 4100-byte rows
]


@pytest.mark.parametrize("B,T,E,dtype", CASES)
def test_large_output_matches_reference_and_direct_path(B, T, E, dtype):
    L = T + 40  # positions stay inside the table: every row is an interpolation
    d, table = _inputs(B, T, L, E, dtype, seed=E)
    out = op(d, table)
    assert out.numel() * out.element_size() >= STREAM_MIN_BYTES
    assert out.shape == (B, T, E) and out.dtype == dtype and out.is_contiguous()
    expected = reference.adaptive_positional_encoding(d, table)
    if dtype in (torch.float32, torch.float64):
        assert_close(out, expected)
    else:  # the kernel interpolates in fp32 and rounds once, like the reference
        torch.testing.assert_close(out.float(), expected.float(), atol=1e-2, rtol=1e-2)
    # The first positions alone make an output under the threshold (stored directly); the scan is
    # causal, so they must be the same values bit for bit.
    t_small = max(1, STREAM_MIN_BYTES // (4 * B * E * out.element_size()))
    small = op(d[:, :t_small].contiguous(), table)
    assert small.numel() * small.element_size() < STREAM_MIN_BYTES
    assert torch.equal(out[:, :t_small], small)


def test_large_output_independent_of_thread_count():
    d, table = _inputs(3, 1001, 1041, 700, torch.float32, seed=3)  # 8.0 MiB, 2800-byte rows
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(d, table)
        torch.set_num_threads(max(2, threads))
        many = op(d, table)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert_close(many, reference.adaptive_positional_encoding(d, table))
