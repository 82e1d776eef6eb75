"""trajectory_flow on packed sequences (cu_seqlens): equal to running every document alone.

Runs on whatever this process dispatches to (C++, reference, Triton interpreter; see conftest).
Tests that need the Triton kernels to take cu_seqlens skip on the Triton backend until its
launchers have that argument (they turn on by themselves once they do).
"""
from __future__ import annotations

import inspect
import math
import random

import pytest
import torch

import trajops
from trajops import reference
from trajops.ops import trajectory_flow as flow_ops
from trajops.varlen import positions_in_document

from conftest import INTERPRETER, assert_close

op = torch.ops.trajops.trajectory_flow
op_backward = torch.ops.trajops.trajectory_flow_backward


def _triton_lacks_varlen() -> bool:
    if not INTERPRETER:
        return False
    from trajops.triton_kernels import trajectory_flow as kernels

    return not all(
        "cu_seqlens" in inspect.signature(f).parameters for f in (kernels.trajectory_flow_fwd, kernels.trajectory_flow_bwd)
    )


LACKS_VARLEN = _triton_lacks_varlen()
needs_varlen = pytest.mark.skipif(LACKS_VARLEN, reason="Triton varlen flow lands with the flowroof branch")

# Lengths 0, 1 and 2 in every packing (a document with 0 or 1 step, an empty one between others).
MAX_LEN = 6 if INTERPRETER else 17


def packing(seed: int, n_docs: int = 7):
    rng = random.Random(seed)
    lengths = [0, 1, 2] + [rng.randint(0, MAX_LEN) for _ in range(n_docs - 3)]
    rng.shuffle(lengths)
    return lengths, trajops.cu_seqlens_from_lengths(torch.tensor(lengths), dtype=rng.choice([torch.int32, torch.int64]))


def make_packed(total: int, D: int, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(total, D, generator=g, dtype=torch.float64)
    if total > 4:
        x[3] = x[2]  # a zero step (skipped) somewhere in the pack
    return x.to(dtype)


def per_document(fn, x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    offs = cu.tolist()
    parts = [fn(x[a:b]) for a, b in zip(offs[:-1], offs[1:])]
    return torch.cat(parts) if parts else x.new_empty(x.shape)


# ---------------------------------------------------------------- equality with per-document runs
# Every (dtype, window, seed) on C++ and the reference; a diagonal of them in the interpreter, where
# each launch costs ~0.2 s and the per-document runs are the reference's (its plain path).
_CASES = [(d, w, s) for d in (torch.float32, torch.float64) for w in (1, 3, 1000) for s in (0, 1)]
if INTERPRETER:
    _CASES = [(torch.float32, 1, 0), (torch.float64, 3, 1), (torch.float32, 1000, 2)]


@needs_varlen
@pytest.mark.parametrize("dtype,window,seed", _CASES)
def test_forward_and_gradient_equal_per_document_runs(dtype, window, seed):
    lengths, cu = packing(seed)
    total, D = sum(lengths), 3 if INTERPRETER else 5
    x = make_packed(total, D, dtype, seed).requires_grad_()
    g = torch.randn(total, D, generator=torch.Generator().manual_seed(seed + 100), dtype=dtype)

    out = trajops.trajectory_flow(x, window, cu_seqlens=cu)
    (dx,) = torch.autograd.grad(out, x, g)
    alone = reference.trajectory_flow if INTERPRETER else trajops.trajectory_flow
    want = per_document(lambda t: alone(t, window), x, cu)
    (want_dx,) = torch.autograd.grad(want, x, g)
    out, want = out.detach(), want.detach()
    assert_close(out, want)
    assert_close(dx, want_dx)
    # and against the reference's own packed path (the semantics)
    assert_close(out, reference.trajectory_flow(x.detach(), window, cu_seqlens=cu))
    assert_close(dx, reference.trajectory_flow_backward(g, x.detach(), window, cu_seqlens=cu))


def test_reference_packed_equals_reference_per_document():
    """The reference's packed path (positions_in_document) vs its plain path on each document."""
    lengths, cu = packing(3, n_docs=9)
    x = make_packed(sum(lengths), 4, torch.float64, 3).requires_grad_()
    out = reference.trajectory_flow(x, 4, cu_seqlens=cu)
    want = per_document(lambda t: reference.trajectory_flow(t, 4), x, cu)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    g = torch.randn_like(out)
    (autograd_dx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(reference.trajectory_flow_backward(g, x.detach(), 4, cu_seqlens=cu), autograd_dx,
                               atol=1e-12, rtol=1e-10)


def test_boundary_step_is_in_no_window():
    """A huge (or infinite) jump between two documents changes nothing in either (forward, backward)."""
    cu = torch.tensor([0, 4, 9])
    x = make_packed(9, 3, torch.float64, 5)
    g = torch.randn_like(x)
    jumped = x.clone()
    jumped[4:] += 1e6
    infinite = x.clone()
    infinite[4, 0] = math.inf  # first row of document 1: its own steps get Inf, the boundary step too
    base = reference.trajectory_flow(x, 8, cu_seqlens=cu)
    assert torch.equal(reference.trajectory_flow(jumped, 8, cu_seqlens=cu)[:4], base[:4])
    assert torch.equal(reference.trajectory_flow_backward(g, jumped, 8, cu_seqlens=cu)[:4],
                       reference.trajectory_flow_backward(g, x, 8, cu_seqlens=cu)[:4])
    # Document 0 never sees document 1's Inf, in the forward or through the gradient.
    assert torch.equal(reference.trajectory_flow(infinite, 8, cu_seqlens=cu)[:4], base[:4])
    g_nan = g.clone()
    g_nan[6] = math.nan
    dx = reference.trajectory_flow_backward(g_nan, infinite, 8, cu_seqlens=cu)
    assert torch.equal(dx[:4], reference.trajectory_flow_backward(g, x, 8, cu_seqlens=cu)[:4])


@needs_varlen
def test_two_dim_and_three_dim_packed_agree_and_noncontiguous():
    lengths, cu = packing(4)
    total = sum(lengths)
    x = make_packed(total, 4, torch.float32, 4)
    out2 = trajops.trajectory_flow(x, 3, cu_seqlens=cu)
    out3 = op(x.unsqueeze(0), 3, 1e-6, cu)
    assert out3.shape == (1, total, 4)
    assert_close(out3[0], out2)
    nc = torch.randn(4, total, dtype=torch.float32).t()  # (total, D), not contiguous
    assert not nc.is_contiguous()
    assert_close(trajops.trajectory_flow(nc, 3, cu_seqlens=cu), trajops.trajectory_flow(nc.contiguous(), 3, cu_seqlens=cu))
    strided = torch.randn(1, total, 8)[:, :, ::2]
    g = torch.randn(1, total, 4)
    assert_close(op_backward(g, strided, 3, 1e-6, cu), op_backward(g, strided.contiguous(), 3, 1e-6, cu))


@needs_varlen
def test_empty_pack_and_no_documents():
    x = torch.zeros(0, 3)
    assert trajops.trajectory_flow(x, cu_seqlens=torch.tensor([0])).shape == (0, 3)
    assert trajops.trajectory_flow(x, cu_seqlens=torch.tensor([0, 0, 0])).shape == (0, 3)
    # a single document is the plain op
    y = make_packed(7, 3, torch.float32, 9)
    assert_close(trajops.trajectory_flow(y, 2, cu_seqlens=torch.tensor([0, 7])), trajops.trajectory_flow(y, 2))


# ---------------------------------------------------------------- autograd, opcheck, compile
@needs_varlen
def test_gradcheck_fp64():
    cu = torch.tensor([0, 2, 2, 3, 7], dtype=torch.int32)
    x = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: trajops.trajectory_flow(t, 2, cu_seqlens=cu), (x,), fast_mode=INTERPRETER)


@needs_varlen
def test_opcheck():
    cu = torch.tensor([0, 1, 4, 4, 6])
    x = torch.randn(6, 3)
    torch.library.opcheck(op.default, (x.clone().unsqueeze(0).requires_grad_(), 2, 1e-6, cu))
    torch.library.opcheck(op_backward.default, (torch.randn_like(x), x, 2, 1e-6, cu))


@needs_varlen
def test_compile_fullgraph_matches_eager():
    cu = torch.tensor([0, 3, 4, 9])
    x = torch.randn(9, 4, requires_grad=True)

    def f(t, c):
        return trajops.trajectory_flow(t, 3, cu_seqlens=c).pow(2).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, cu), f(x, cu))
    (g1,) = torch.autograd.grad(compiled(x, cu).sum(), x)
    (g2,) = torch.autograd.grad(f(x, cu).sum(), x)
    torch.testing.assert_close(g1, g2)


def test_offsets_get_no_gradient():
    cu = torch.tensor([0, 2, 5])
    x = torch.randn(5, 2, requires_grad=True)
    if LACKS_VARLEN:
        pytest.skip("Triton varlen flow lands with the flowroof branch")
    out = trajops.trajectory_flow(x, cu_seqlens=cu)
    assert out.requires_grad and not cu.requires_grad
    out.sum().backward()
    assert x.grad is not None and cu.grad is None


@pytest.mark.skipif(not LACKS_VARLEN, reason="the Triton launchers take cu_seqlens")
def test_triton_without_varlen_launcher_says_so():
    with pytest.raises(NotImplementedError, match="cu_seqlens"):
        trajops.trajectory_flow(torch.randn(5, 2), cu_seqlens=torch.tensor([0, 2, 5]))


# ---------------------------------------------------------------- bad cu_seqlens (every backend, same text)
TF = "trajectory_flow: "
BAD = [
    ("decreasing", torch.tensor([0, 3, 2, 6]), ValueError, "cu_seqlens must be non-decreasing, got 3 then 2 at index 2"),
    ("last_not_total", torch.tensor([0, 3, 5]), ValueError, "cu_seqlens must end at the number of packed tokens 6, got 5"),
    ("last_past_total", torch.tensor([0, 3, 7]), ValueError, "cu_seqlens must end at the number of packed tokens 6, got 7"),
    ("first_not_zero", torch.tensor([1, 3, 6]), ValueError, "cu_seqlens must start at 0, got 1"),
    ("float", torch.tensor([0.0, 6.0]), TypeError, "cu_seqlens must be torch.int32 or torch.int64, got torch.float32"),
    ("int16", torch.tensor([0, 6], dtype=torch.int16), TypeError,
     "cu_seqlens must be torch.int32 or torch.int64, got torch.int16"),
    ("two_dim", torch.tensor([[0, 6]]), ValueError,
     "cu_seqlens must have shape (N + 1,) for N packed documents, got shape [1, 2]"),
    ("empty", torch.zeros(0, dtype=torch.int64), ValueError,
     "cu_seqlens must have shape (N + 1,) for N packed documents, got shape [0]"),
]


@pytest.mark.parametrize("name,cu,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_cu_seqlens(name, cu, exc, msg):
    x = torch.randn(6, 3)
    for call in (
        lambda: trajops.trajectory_flow(x, cu_seqlens=cu),
        lambda: op(x.unsqueeze(0), 8, 1e-6, cu),
    ):
        with pytest.raises(exc) as err:
            call()
        assert str(err.value).splitlines()[0] == TF + msg
    with pytest.raises(exc) as err:
        op_backward(torch.ones_like(x), x, 8, 1e-6, cu)
    assert str(err.value).splitlines()[0] == "trajectory_flow_backward: " + msg


@pytest.mark.parametrize("name,cu,exc,msg", [b for b in BAD if b[2] is TypeError or "shape" in b[3]],
                         ids=[b[0] for b in BAD if b[2] is TypeError or "shape" in b[3]])
def test_bad_cu_seqlens_metadata_in_fake_impl(name, cu, exc, msg):
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(6, 3))
        with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                           .replace("]", r"\]").replace("+", r"\+")):
            op(x, 8, 1e-6, mode.from_tensor(cu))


def test_batched_x_with_cu_seqlens_is_rejected():
    msg = TF + "x must have shape (total, D) or (1, total, D) when cu_seqlens is given, got shape [2, 3, 4]"
    x, cu = torch.randn(2, 3, 4), torch.tensor([0, 3])
    for call in (lambda: trajops.trajectory_flow(x, cu_seqlens=cu), lambda: op(x, 8, 1e-6, cu)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value).splitlines()[0] == msg
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        with pytest.raises(ValueError, match="when cu_seqlens is given"):
            op(mode.from_tensor(x), 8, 1e-6, mode.from_tensor(cu))


def test_cu_seqlens_on_another_device_is_rejected():
    with pytest.raises(ValueError, match="cu_seqlens must be on the device of the packed tensors"):
        trajops.trajectory_flow(torch.randn(6, 3), cu_seqlens=torch.tensor([0, 6], device="meta"))


def test_offsets_made_safe_off_the_cpu():
    """The reference off the CPU does not read offsets on the host: bad ones are made indexable."""
    for bad in ([3, 9, 2, -4, 5], [0], [-1, 20], [5, 0, 6]):
        safe = flow_ops._safe_offsets(torch.tensor(bad), 6)
        assert int(safe[0]) == 0 and int(safe[-1]) == 6 and bool((safe[1:] >= safe[:-1]).all()), (bad, safe)
        assert positions_in_document(safe, 6).shape == (6,)


# ---------------------------------------------------------------- the router
@needs_varlen
def test_router_packed_equals_per_document():
    torch.manual_seed(0)
    router = trajops.nn.TrajectoryGuidedMoERouter(6, 4).double()
    ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0, 1]])
    x = torch.randn(1, ids.shape[1], 6, dtype=torch.float64)
    x[0, 6] = x[0, 5]  # a zero step inside the long document
    cu = trajops.cu_seqlens_from_position_ids(ids)
    want = per_document(router, x[0], cu)
    assert_close(router(x, position_ids=ids)[0], want)
    assert_close(router(x[0], cu_seqlens=cu), want)
    # (B, T, E) with (B, T) ids: rows read one after the other
    xb = torch.randn(2, 5, 6, dtype=torch.float64)
    idb = torch.tensor([[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
    got = router(xb, position_ids=idb)
    assert_close(got[0, :2], router(xb[0, :2]))
    assert_close(got[0, 2:], router(xb[0, 2:]))
    assert_close(got[1], router(xb[1]))


@needs_varlen
def test_router_packed_compiles_fullgraph():
    router = trajops.nn.TrajectoryGuidedMoERouter(4, 3)
    x, cu = torch.randn(9, 4), torch.tensor([0, 3, 4, 9])
    compiled = torch.compile(lambda t, c: router(t, cu_seqlens=c), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, cu), router(x, cu_seqlens=cu))


def test_router_bad_packed_arguments():
    router = trajops.nn.TrajectoryGuidedMoERouter(4, 2)
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="not both"):
        router(x, cu_seqlens=torch.tensor([0, 5]), position_ids=torch.arange(5))
    with pytest.raises(ValueError, match="position_ids must have one id per token"):
        router(x, position_ids=torch.arange(4))
    with pytest.raises(ValueError, match="cannot be combined"):
        router(x, 2, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        router(torch.randn(2, 5, 4), cu_seqlens=torch.tensor([0, 5]))


# ---------------------------------------------------------------- offset helpers
def test_cu_seqlens_from_position_ids_transformers_packing():
    # DataCollatorWithFlattening: examples of lengths 3, 1, 4 in one row, ids restarting at 0
    ids = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3]])
    cu = trajops.cu_seqlens_from_position_ids(ids)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 8]
    assert trajops.cu_seqlens_from_position_ids(ids[0], dtype=torch.int64).dtype == torch.int64
    # 2-D ids: a row start also starts a document (row 1 continues no document of row 0)
    ids2 = torch.tensor([[0, 1, 0, 1], [2, 3, 0, 1]])
    assert trajops.cu_seqlens_from_position_ids(ids2).tolist() == [0, 2, 4, 6, 8]
    assert trajops.cu_seqlens_from_position_ids(torch.zeros(0, dtype=torch.long)).tolist() == [0]
    with pytest.raises(TypeError, match="position_ids"):
        trajops.cu_seqlens_from_position_ids(ids.float())
    with pytest.raises(ValueError, match="position_ids"):
        trajops.cu_seqlens_from_position_ids(ids.reshape(1, 1, 8))


def test_cu_seqlens_from_lengths():
    cu = trajops.cu_seqlens_from_lengths(torch.tensor([3, 0, 1, 4]))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 4, 8]
    assert trajops.cu_seqlens_from_lengths(torch.tensor([2**40, 3]), torch.int64).tolist() == [0, 2**40, 2**40 + 3]
    assert trajops.cu_seqlens_from_lengths(torch.zeros(0, dtype=torch.long)).tolist() == [0]
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        trajops.cu_seqlens_from_lengths(torch.tensor([2, -1]))
    with pytest.raises(ValueError, match="does not fit"):  # int32 would wrap around silently
        trajops.cu_seqlens_from_lengths(torch.tensor([2**31 - 1, 1]))
    with pytest.raises(TypeError, match="lengths"):
        trajops.cu_seqlens_from_lengths(torch.tensor([1.0]))
    with pytest.raises(TypeError, match="lengths must be a tensor"):
        trajops.cu_seqlens_from_lengths([1, 2])
    with pytest.raises(ValueError, match="lengths must be 1-D"):
        trajops.cu_seqlens_from_lengths(torch.tensor([[1, 2]]))
