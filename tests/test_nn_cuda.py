"""trajops.nn modules on a CUDA device against the same module on the CPU.

MultiScaleTrajectoryAttention (trajops.temperature_attention inside) and TrajectoryGuidedMoERouter
(trajops.trajectory_flow inside) are built on the CPU with a fixed seed and deep-copied to the
device; the same inputs run forward and backward (<output, a fixed random gradient>) on both, and
the outputs and every input and parameter gradient must agree: tightly in fp64, loosely in fp32
(no autocast anywhere). Odd sizes on purpose (T = 37, embedding_dim = 48, head_dim = 12, ...).
The CPU side's own correctness (against the seed's classes) is tests/test_nn_*.py.

It needs a CUDA device; without one every test is skipped. TRAJOPS_TEST_DEVICE=cpu runs the same
tests with the CPU as the "device" (a dry run of the tests themselves).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from trajops.nn import MultiScaleTrajectoryAttention, TrajectoryGuidedMoERouter

DEV = os.environ.get("TRAJOPS_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

# Max error relative to max(1, |CPU value|). fp64: both sides are exact up to summation order.
# fp32: the two backends round differently (tiles, accumulation order), through a few layers.
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    """fp32 matmuls in full fp32 on the device (no TF32) for the duration of a test."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)


def _close(name, actual, expected, tol):
    a, e = actual.detach().to("cpu", torch.float64), expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, (name, a.shape, e.shape)
    assert not bool(a.isnan().any()) and not bool(e.isnan().any()), name
    scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    err = float((a - e).abs().max()) / scale if e.numel() else 0.0
    assert err <= tol, (name, err, tol)
    return err


def _forward_backward(module, inputs, grad, call):
    """Output and the gradients of <call(module, *inputs), grad> w.r.t. the inputs and every parameter."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = call(module, *inputs)
    params = dict(module.named_parameters())
    wrt = [*inputs, *params.values()]
    grads = torch.autograd.grad(out, wrt, grad, allow_unused=True)
    grads = [torch.zeros_like(t) if d is None else d for t, d in zip(wrt, grads)]
    named = {f"d_input{i}": d for i, d in enumerate(grads[: len(inputs)])}
    named.update({f"d_{n}": d for n, d in zip(params, grads[len(inputs):])})
    return out, named


def _compare(module_cpu, inputs_cpu, call, dtype, seed=7):
    """Runs module_cpu on inputs_cpu and its deep copy on DEV on copies of them; asserts agreement."""
    module_dev = copy.deepcopy(module_cpu).to(DEV)
    for name, p in module_dev.named_parameters():
        assert p.device.type == torch.device(DEV).type, name
    with torch.no_grad():
        probe = call(module_cpu, *inputs_cpu)
    grad = torch.randn(probe.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    out_c, grads_c = _forward_backward(module_cpu, inputs_cpu, grad, call)
    out_d, grads_d = _forward_backward(module_dev, [t.to(DEV) for t in inputs_cpu], grad.to(DEV), call)
    assert out_d.device.type == torch.device(DEV).type and out_d.dtype == out_c.dtype == dtype
    errors = {"out": _close("out", out_d, out_c, TOL[dtype])}
    assert set(grads_d) == set(grads_c)
    for name in grads_c:
        errors[name] = _close(name, grads_d[name], grads_c[name], TOL[dtype])
    assert float(grads_c["d_input0"].abs().max()) > 0  # the gradients do reach the inputs
    worst = max((n for n in errors if n.startswith("d_") and not n.startswith("d_input")), key=errors.get)
    shown = ", ".join(f"{n} {e:.1e}" for n, e in errors.items() if "input" in n or n == "out")
    print(f"max error / max(1, |cpu|): {shown}, worst parameter {worst} {errors[worst]:.1e}")


# ---------------------------------------------------------------- MultiScaleTrajectoryAttention
def _attention_mask(kind, B, H, Tq, Tk):
    """The seed's mask forms (0 / False = masked), made on the CPU."""
    g = torch.Generator().manual_seed(11)
    if kind is None:
        return None
    if kind == "pad":  # (B, 1, 1, Tk) float key padding; the last sequence right-padded
        m = torch.ones(B, 1, 1, Tk, dtype=torch.float64)
        m[-1, ..., Tk - Tk // 3:] = 0
        return m
    if kind == "pad-empty":  # ... and sequence 0 with every key padded (its rows average all values)
        m = _attention_mask("pad", B, H, Tq, Tk)
        m[0] = 0
        return m
    if kind == "rand4d":  # (B, H, Tq, Tk) bool, with one fully masked row
        m = torch.rand(B, H, Tq, Tk, generator=g) > 0.4
        m[0, 1, 5] = False
        return m
    if kind == "tril2d":  # (Tq, Tk) int: the seed's way to say causal
        return torch.ones(Tq, Tk, dtype=torch.int64).tril(Tk - Tq)
    raise ValueError(kind)


ATTENTION_CASES = [  # dtype, B, Tq, Tk, E, H, mask kind, causal
    pytest.param(torch.float64, 2, 37, 37, 48, 4, None, False, id="fp64-T37-E48-H4"),
    pytest.param(torch.float64, 2, 37, 37, 48, 4, "pad", False, id="fp64-T37-E48-H4-pad"),
    pytest.param(torch.float64, 2, 37, 37, 48, 4, None, True, id="fp64-T37-E48-H4-causal"),
    pytest.param(torch.float64, 2, 37, 37, 48, 4, "pad-empty", True, id="fp64-T37-E48-H4-pad-empty-causal"),
    pytest.param(torch.float64, 3, 37, 29, 48, 4, "rand4d", False, id="fp64-T37x29-E48-H4-rand4d"),
    pytest.param(torch.float64, 1, 19, 53, 20, 2, None, True, id="fp64-T19x53-E20-H2-causal"),
    pytest.param(torch.float64, 2, 37, 37, 48, 4, "tril2d", False, id="fp64-T37-E48-H4-tril2d"),
    pytest.param(torch.float32, 2, 37, 37, 48, 4, "pad", False, id="fp32-T37-E48-H4-pad"),
    pytest.param(torch.float32, 2, 37, 37, 48, 4, None, True, id="fp32-T37-E48-H4-causal"),
    pytest.param(torch.float32, 2, 37, 41, 48, 4, "rand4d", True, id="fp32-T37x41-E48-H4-rand4d-causal"),
]


@pytest.mark.parametrize("dtype,B,Tq,Tk,E,H,mask_kind,causal", ATTENTION_CASES)
def test_multiscale_attention_device_equals_cpu(dtype, B, Tq, Tk, E, H, mask_kind, causal):
    torch.manual_seed(0)
    module = MultiScaleTrajectoryAttention(E, H).to(dtype)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Tq, E, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Tk, E, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Tk, E, generator=g, dtype=torch.float64).to(dtype)
    mask = _attention_mask(mask_kind, B, H, Tq, Tk)

    def call(mod, q, k, v):
        m = None if mask is None else mask.to(q.device)
        return mod(q, k, v, m, causal=causal)

    _compare(module, [q, k, v], call, dtype)


def test_multiscale_attention_self_attention_one_tensor():
    """queries = keys = values: the three gradient paths meet in one input."""
    torch.manual_seed(2)
    module = MultiScaleTrajectoryAttention(48, 4).double()
    x = torch.randn(2, 37, 48, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _compare(module, [x], lambda mod, x: mod(x, x, x, causal=True), torch.float64)


# ---------------------------------------------------------------- TrajectoryGuidedMoERouter
def _embeddings(B, T, E, dtype, seed=0):
    """A random walk with some zero and tiny (< 1e-6) steps, so that some windows have no counting step."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, E, generator=g, dtype=torch.float64).cumsum(1) / E**0.5
    x[0, 2] = x[0, 1]  # a zero step
    if T > 26:
        x[0, 20:26] = x[0, 19]  # a run of repeated tokens: windows with only zero steps, then mixed
    x[-1, 1:] = x[-1, 0] + 1e-8 * torch.randn(T - 1, E, generator=g, dtype=torch.float64)  # tiny steps only
    return x.to(dtype)


ROUTER_CASES = [  # dtype, B, T, E, num_experts, influence
    pytest.param(torch.float64, 3, 37, 48, 5, 0.3, id="fp64-B3-T37-E48-X5"),
    pytest.param(torch.float64, 2, 9, 33, 8, 2.5, id="fp64-B2-T9-E33-X8-influence2.5"),
    pytest.param(torch.float32, 3, 37, 48, 5, 0.3, id="fp32-B3-T37-E48-X5"),
]


def _router(E, n, influence, dtype):
    torch.manual_seed(0)
    module = TrajectoryGuidedMoERouter(E, n, influence).to(dtype)
    with torch.no_grad():
        module.trajectory_projector.bias.uniform_(0.5, 1.5)  # a bias away from 0
    return module


@pytest.mark.parametrize("dtype,B,T,E,n,influence", ROUTER_CASES)
def test_moe_router_batched_device_equals_cpu(dtype, B, T, E, n, influence):
    module = _router(E, n, influence, dtype)
    x = _embeddings(B, T, E, dtype)
    _compare(module, [x], lambda mod, x: mod(x), dtype)
    _compare(module, [x[0]], lambda mod, x: mod(x), dtype)  # (T, E): one sequence


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_moe_router_seed_call_device_equals_cpu(dtype):
    """The seed's call, forward(token_embeddings (T, E), position), at a few positions."""
    module = _router(48, 5, 0.3, dtype)
    x = _embeddings(1, 37, 48, dtype)[0]
    for p in (0, 1, 7, 8, 22, 36):
        _compare(module, [x], lambda mod, x: mod(x, p), dtype)
