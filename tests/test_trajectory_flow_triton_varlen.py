"""Triton trajectory_flow launchers on packed documents (cu_seqlens) == one launcher call per document.

Launcher level (trajops/triton_kernels/trajectory_flow.py), in the Triton interpreter on CPU tensors:
forward, its saved stats, backward with and without them, documents of length 0, 1, 2 and longer,
an infinite row at a boundary (must not reach the neighbour document), and corrupt offsets (every
output NaN, no read outside the tensors). The op-level packed tests live with the op.

Outside an interpreter run this file reruns itself in a subprocess with TRITON_INTERPRET=1 (the
interpreter must be chosen before Triton kernels are defined), so the C++ pass checks it too.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
EPS = 1e-6


def _kernels():
    from trajops.triton_kernels import trajectory_flow as k

    return k


def _packed(lengths, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    x = torch.randn(1, total, D, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(1, total, D, generator=g, dtype=torch.float64).to(dtype)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return x, grad, cu


def _same(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    assert torch.equal(a.isnan(), b.isnan()), "NaN positions differ"
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol, equal_nan=True)


def check_matches_per_document(lengths, D, window, seed, dtype=torch.float64, inf_row=None):
    k = _kernels()
    x, g, cu = _packed(lengths, D, seed, dtype)
    if inf_row is not None:
        x[0, inf_row, 0] = float("inf")
    out, stats = k.trajectory_flow_fwd_stats(x, window, EPS, cu)
    dx = k.trajectory_flow_bwd(g, x, window, EPS, cu, stats=stats)
    dx_nostats = k.trajectory_flow_bwd(g, x, window, EPS, cu)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    _same(dx_nostats, dx, 0.0)
    offs = cu.tolist()
    for s, e in zip(offs[:-1], offs[1:]):
        xs, gs = x[:, s:e].contiguous(), g[:, s:e].contiguous()
        o1, st1 = k.trajectory_flow_fwd_stats(xs, window, EPS)
        _same(out[:, s:e], o1, tol)
        _same(dx[:, s:e], k.trajectory_flow_bwd(gs, xs, window, EPS), tol)
        if e - s >= 2:  # the step norms of the document, and 1/S of each position
            _same(stats[0, :, s:e - 1], st1[0, :, :-1], tol)
            _same(stats[1, :, s:e], st1[1], tol)


def check_corrupt_offsets_give_nan():
    k = _kernels()
    x, g, _ = _packed([4, 5], 3, seed=5)
    # last entry != total, decreasing, first != 0, offsets past the tensor or negative
    for bad in ([0, 4, 8], [0, 6, 4, 9], [1, 9], [0, 2**31 - 1, -7, 9]):
        cu = torch.tensor(bad, dtype=torch.int32)
        out, stats = k.trajectory_flow_fwd_stats(x, 3, EPS, cu)
        assert out.isnan().all() and stats.isnan().all(), bad
        assert k.trajectory_flow_bwd(g, x, 3, EPS, cu).isnan().all(), bad
    tiny = x[:, :1].contiguous()  # no step at all: still NaN for corrupt offsets, zeros for valid ones
    assert k.trajectory_flow_fwd(tiny, 3, EPS, torch.tensor([0, 2], dtype=torch.int32)).isnan().all()
    assert torch.equal(k.trajectory_flow_fwd(tiny, 3, EPS, torch.tensor([0, 1], dtype=torch.int32)),
                       torch.zeros_like(tiny))


def check_bad_shapes_raise():
    k = _kernels()
    x, g, cu = _packed([3, 4], 2, seed=1)
    with pytest.raises(ValueError, match="packed x must have shape"):
        k.trajectory_flow_fwd(x.expand(2, -1, -1).contiguous(), 3, EPS, cu)
    with pytest.raises(TypeError, match="cu_seqlens must be torch.int32 or torch.int64"):
        k.trajectory_flow_fwd(x, 3, EPS, cu.float())
    with pytest.raises(ValueError, match="stats must be"):
        k.trajectory_flow_bwd(g, x, 3, EPS, cu, stats=torch.zeros(2, 1, 6, dtype=torch.float64))


CASES = [
    # (lengths, D, window, seed): empty, 1- and 2-token documents, windows below and above lengths
    ([5, 0, 1, 2, 9, 3], 3, 3, 0),
    ([1, 1, 2, 2], 4, 8, 1),
    ([3, 11], 1, 2**40, 3),
]


def check_multi_tile_matches_reference():
    # Programs of 4 rows: halos of K > rows per program, several halo chunks, the first tile's skips.
    from trajops import reference

    k = _kernels()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 14, 3, generator=g, dtype=torch.float64)
    x[0, 5:8] = x[0, 4]  # zero steps (not counted)
    gr = torch.randn(x.shape, generator=g, dtype=torch.float64)
    for window in (2, 9):
        _same(k.trajectory_flow_fwd(x, window, EPS), reference.trajectory_flow(x, window, EPS), 1e-12)
        _same(k.trajectory_flow_bwd(gr, x, window, EPS), reference.trajectory_flow_backward(gr, x, window, EPS), 1e-12)


def run_all() -> None:
    k = _kernels()
    k.INTERPRET_BLOCK_T = 4  # several programs per sequence: the halo paths run on tiny shapes
    check_multi_tile_matches_reference()
    k.INTERPRET_BLOCK_T = 8  # programs straddle document boundaries
    for lengths, D, window, seed in CASES:
        check_matches_per_document(lengths, D, window, seed)
    check_matches_per_document([7, 9], 6, 3, 4, dtype=torch.float32)
    check_matches_per_document([6, 8, 5], 3, 4, 6, inf_row=6)  # first row of document 2 is infinite
    check_corrupt_offsets_give_nan()
    check_bad_shapes_raise()


@pytest.mark.skipif(sys.platform != "linux" and not INTERPRETER, reason="runs the Triton interpreter")
def test_packed_launchers_match_per_document_launches():
    if INTERPRETER:
        run_all()
        return
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all packed checks passed" in proc.stdout


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    run_all()
    print("all packed checks passed")
