"""Triton kernels of packed (varlen) temperature attention (triton_kernels/temperature_attention_varlen.py)
against per-document runs: the dense Triton launchers and the reference, under TRITON_INTERPRET=1.

Each document of a packing must give exactly what the dense op gives on that document alone
(bottom-right causal per document, rows without keys out 0 / lse -inf, the NaN/Inf rule per
document), forward and every gradient (dtau per query row included); invalid offsets make every
output NaN. Tiny shapes: the interpreter runs every program in Python.
"""
from __future__ import annotations

import math

import pytest
import torch

import trajops
from conftest import assert_close

pytestmark = pytest.mark.skipif(
    trajops.backends()["cpu"] != "triton-interpreter",
    reason="tests the Triton varlen kernels themselves: run with TRAJOPS_BACKEND=triton TRITON_INTERPRET=1",
)

SCALE = 0.37


def _kernels():
    from trajops.triton_kernels import temperature_attention as dense
    from trajops.triton_kernels import temperature_attention_varlen as varlen

    return dense, varlen


def _cu(lengths, dtype=torch.int32):
    return torch.tensor([0] + list(torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()), dtype=dtype)


def _packed(lens_q, lens_k, Hq, Hkv, D, Dv, dtype, seed=0):
    """Packed q, k, v with non-unit strides (slices of wider buffers) and tau (total_q, Hq) positive."""
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, Hq, D + 3, dtype=dtype, generator=g)[..., 1:D + 1]
    k = torch.randn(tk, Hkv + 1, D, dtype=dtype, generator=g)[:, :Hkv]
    v = torch.randn(Hkv, tk, Dv, dtype=dtype, generator=g).transpose(0, 1)
    tau = (torch.rand(tq, Hq, dtype=dtype, generator=g) + 0.5)
    return q, k, v, tau


def _doc(x, a, b):
    """Rows a..b of a packed (total, H, D) tensor as a dense (1, H, b - a, D) one."""
    return x[a:b].transpose(0, 1).unsqueeze(0)


def _reference_per_document(q, k, v, tau, cq, ck, causal, go, gl):
    """(out, lse, dq, dk, dv, dtau) of the reference op run on each document alone, packed back."""
    from trajops.ops.temperature_attention import _reference_backward, _reference_forward

    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.zeros(q.shape[:2], dtype=cdt)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dtau = torch.zeros(q.shape[:2], dtype=cdt)
    for j in range(cq.shape[0] - 1):
        a, b, c, d = int(cq[j]), int(cq[j + 1]), int(ck[j]), int(ck[j + 1])
        if a == b:
            continue
        qq, kk, vv, tt = _doc(q, a, b), _doc(k, c, d), _doc(v, c, d), tau[a:b].t()[None].to(cdt)
        o, l = _reference_forward(qq, kk, vv, tt, None, causal, SCALE)
        gq, gk, gv, gt = _reference_backward(_doc(go, a, b), gl[a:b].t()[None], qq, kk, vv, tt, None, causal, SCALE,
                                             o, l)
        out[a:b], lse[a:b] = o[0].transpose(0, 1), l[0].t()
        dq[a:b], dtau[a:b] = gq[0].transpose(0, 1), gt[0].t()
        if d > c:
            dk[c:d], dv[c:d] = gk[0].transpose(0, 1), gv[0].transpose(0, 1)
    return out, lse, dq, dk, dv, dtau


def _run_varlen(q, k, v, tau, cq, ck, causal, go, gl, max_q=None, max_k=None):
    _, varlen = _kernels()
    mq = max_q if max_q is not None else max(int((cq[1:] - cq[:-1]).max()), 0)
    mk = max_k if max_k is not None else max(int((ck[1:] - ck[:-1]).max()), 0)
    out, lse = varlen.attention_varlen_fwd(q, k, v, tau, SCALE, cq, ck, mq, mk, causal)
    grads = varlen.attention_varlen_bwd(go, gl, q, k, v, tau, SCALE, cq, ck, mq, mk, causal, out, lse)
    return (out, lse, *grads)


NAMES = ("out", "lse", "dq", "dk", "dv", "dtau")

# documents of length 0, 1, 2 and 7, Tq != Tk inside a document, a document with keys but no
# queries (its dk, dv must be 0) and one with queries but no keys (out 0, lse -inf)
LENS_Q = [2, 0, 7, 1, 3, 2]
LENS_K = [2, 3, 5, 0, 7, 1]


@pytest.mark.parametrize("dtype,causal,Hq,Hkv,D,Dv", [
    (torch.float64, False, 4, 2, 8, 5),
    (torch.float64, True, 4, 2, 8, 5),
    (torch.float32, True, 2, 1, 16, 16),
])
def test_varlen_matches_the_reference_per_document(dtype, causal, Hq, Hkv, D, Dv):
    q, k, v, tau = _packed(LENS_Q, LENS_K, Hq, Hkv, D, Dv, dtype)
    if dtype == torch.float32:  # a per-head tau broadcast over the tokens (stride 0), as the op passes it
        tau = (torch.rand(1, Hq, dtype=dtype) + 0.5).expand(q.shape[0], Hq)
    cq, ck = _cu(LENS_Q), _cu(LENS_K, torch.int64)
    g = torch.Generator().manual_seed(1)
    go = torch.randn(q.shape[0], Hq, Dv, dtype=dtype, generator=g)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    gl = torch.randn(q.shape[0], Hq, dtype=cdt, generator=g)
    got = _run_varlen(q, k, v, tau, cq, ck, causal, go, gl)
    want = _reference_per_document(q, k, v, tau, cq, ck, causal, go, gl)
    assert got[0].shape == (q.shape[0], Hq, Dv) and got[0].dtype == dtype
    assert got[1].shape == (q.shape[0], Hq) and got[1].dtype == cdt and got[5].shape == (q.shape[0], Hq)
    for name, a, b in zip(NAMES, got, want):
        assert not torch.isnan(a).any(), name
        assert_close(a, b, dtype)
    # the document with queries but no keys (index 3): out 0, lse -inf, zero gradients
    r = int(_cu(LENS_Q)[3])
    assert torch.equal(got[0][r], torch.zeros_like(got[0][r])) and torch.isneginf(got[1][r]).all()
    assert torch.equal(got[2][r], torch.zeros_like(got[2][r])) and torch.equal(got[5][r], torch.zeros_like(got[5][r]))
    # keys of the document without queries (index 1): zero dk, dv
    c, d = int(ck[1]), int(ck[2])
    assert torch.equal(got[3][c:d], torch.zeros_like(got[3][c:d])) and torch.equal(got[4][c:d],
                                                                                   torch.zeros_like(got[4][c:d]))


def test_varlen_matches_the_dense_launchers_per_document():
    """The same kernels with VARLEN: equal to the dense launchers on each document (fp64, tiny)."""
    dense, _ = _kernels()
    lens_q, lens_k = [7, 1, 2], [5, 2, 7]
    q, k, v, tau = _packed(lens_q, lens_k, 2, 2, 8, 8, torch.float64, seed=3)
    cq, ck = _cu(lens_q), _cu(lens_k)
    go = torch.randn(q.shape[0], 2, 8, dtype=torch.float64)
    got = _run_varlen(q, k, v, tau, cq, ck, True, go, None)
    for j in range(3):
        a, b, c, d = int(cq[j]), int(cq[j + 1]), int(ck[j]), int(ck[j + 1])
        qq, kk, vv, tt = _doc(q, a, b), _doc(k, c, d), _doc(v, c, d), tau[a:b].t()[None]
        o, l = dense.attention_fwd(qq, kk, vv, tt, SCALE, None, True)
        gq, gk, gv, gt = dense.attention_bwd(_doc(go, a, b), None, qq, kk, vv, tt, SCALE, None, True, o, l)
        for name, x, y in (("out", got[0][a:b], o[0].transpose(0, 1)), ("lse", got[1][a:b], l[0].t()),
                           ("dq", got[2][a:b], gq[0].transpose(0, 1)), ("dk", got[3][c:d], gk[0].transpose(0, 1)),
                           ("dv", got[4][c:d], gv[0].transpose(0, 1)), ("dtau", got[5][a:b], gt[0].t())):
            torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12, msg=f"{name} of document {j}")


def test_varlen_nan_in_one_document_stays_there():
    """A NaN in one document's k (attended), another's q and a third's grad_out: the NaN/Inf rule per
    document (the reference's NaN positions exactly), every other document untouched."""
    lens_q, lens_k = [3, 7, 2, 1], [3, 5, 2, 2]
    dtype = torch.float64
    q, k, v, tau = _packed(lens_q, lens_k, 2, 1, 8, 4, dtype, seed=5)
    cq, ck = _cu(lens_q), _cu(lens_k)
    q, k = q.clone(), k.clone()
    k[int(ck[1]) + 3, 0, 2] = math.nan  # document 1, key 3: rows 1.. of that document attend it (causal)
    q[int(cq[2]) + 1, 1, 0] = math.inf  # document 2, row 1, head 1
    go = torch.randn(q.shape[0], 2, 4, dtype=dtype)
    go[int(cq[3]), 0, 1] = math.nan  # document 3's only row
    got = _run_varlen(q, k, v, tau, cq, ck, True, go, None)
    want = _reference_per_document(q, k, v, tau, cq, ck, True, go, torch.zeros(q.shape[:2], dtype=dtype))
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        assert_close(a, b, dtype)
    # document 0 is wholly finite
    n0q, n0k = int(cq[1]), int(ck[1])
    for name, t, n in zip(NAMES, got, (n0q, n0q, n0q, n0k, n0k, n0q)):
        assert torch.isfinite(t[:n]).all(), name


@pytest.mark.parametrize("case", ["end_short", "decreasing", "max_q_too_small", "start_nonzero"])
def test_varlen_invalid_offsets_make_every_output_nan(case):
    lens = [3, 2]
    dtype = torch.float32
    q, k, v, tau = _packed(lens, lens, 2, 1, 8, 8, dtype, seed=7)
    cq, ck = _cu(lens), _cu(lens)
    max_q = 3
    if case == "end_short":
        cq = torch.tensor([0, 3, 4], dtype=torch.int32)
    elif case == "decreasing":
        ck = torch.tensor([0, 6, 5], dtype=torch.int64)  # ends at total_k = 5, but decreases
    elif case == "max_q_too_small":
        max_q = 2  # document 0 has 3 queries: its last row would be left unwritten
    else:
        cq = torch.tensor([1, 3, 5], dtype=torch.int32)
    go = torch.randn(q.shape[0], 2, 8, dtype=dtype)
    got = _run_varlen(q, k, v, tau, cq, ck, False, go, None, max_q=max_q, max_k=8)
    for name, t in zip(NAMES, got):
        assert torch.isnan(t).all(), name


def test_varlen_offsets_of_different_lengths_raise():
    _, varlen = _kernels()
    q, k, v, tau = _packed([2], [2], 1, 1, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="cu_q and cu_k"):
        varlen.attention_varlen_fwd(q, k, v, tau, SCALE, _cu([2]), _cu([1, 1]), 2, 1, False)
