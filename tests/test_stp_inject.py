"""trajops.stp_inject / nn.STPInject: identity forward, backward adds weight * scale * grad stp_loss.

Built on the stp_loss op, so it runs on every backend like the op tests. Each gradient is compared
with plain autograd of ``(h * g).sum() + weight * scale * stp_loss(h)`` on the same triples.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import trajops
from conftest import DTYPES, TOL, assert_close
from trajops.nn import STPInject

B, T, D = 3, 9, 5


def data(dtype=torch.float64, seed=0, n_spans=4, lengths=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype)
    triples = trajops.sample_stp_triples(B, T, n_spans, lengths=lengths, generator=g)
    return h, grad, triples


def expected_grad(h, grad, coef, triples, lengths=None):
    """Autograd of the loss the seam stands for (in fp64 for low-precision inputs)."""
    ref = h.detach().double().requires_grad_()
    ((ref * grad.double()).sum() + coef * trajops.stp_loss(ref, triples=triples, lengths=lengths)).backward()
    return ref.grad


def injected_grad(h, grad, weight, triples, **kw):
    leaf = h.detach().clone().requires_grad_()
    (trajops.stp_inject(leaf, weight, triples=triples, **kw) * grad).sum().backward()
    return leaf.grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_is_the_identity_and_an_alias(dtype):
    h, _, triples = data(dtype)
    leaf = h.clone().requires_grad_()
    out, loss = trajops.stp_inject(leaf, 0.5, triples=triples, return_loss=True)
    assert out.dtype == dtype and out.shape == h.shape and torch.equal(out, h)
    assert out._base is leaf and out.data_ptr() == leaf.data_ptr()  # a view: no copy
    # the logged value is the unweighted loss, detached
    assert not loss.requires_grad and loss.shape == ()
    assert_close(loss, trajops.stp_loss(h, triples=triples), dtype)
    # without grad, no graph at all
    assert not trajops.stp_inject(h, 0.5, triples=triples).requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_is_incoming_plus_weight_scale_stp_gradient(dtype):
    lengths = torch.tensor([9, 2, 6])
    h, grad, triples = data(dtype, seed=1, lengths=lengths)
    # a coefficient large enough that the STP part survives bf16 rounding of the sum
    got = injected_grad(h, grad, 8.0, triples, scale=0.5, lengths=lengths)
    assert got.dtype == dtype
    want = expected_grad(h, grad, 8.0 * 0.5, triples, lengths)
    assert_close(got, want.to(dtype) if dtype in (torch.float32, torch.float64) else want, dtype)
    # the STP part is really there (and is 0 in the rows of length 2, which no triple reads)
    stp_part = got.double() - grad.double()
    assert stp_part.abs().max() > 10 * TOL[dtype]
    assert torch.equal(stp_part[1], torch.zeros_like(stp_part[1]))


def test_fp64_injected_gradient_against_finite_differences():
    """The gradient through the seam == central differences of (h * g).sum() + w * s * stp_loss(h).

    (torch.autograd.gradcheck cannot be used as is: it also checks that a backward scales with the
    incoming gradient, and the injected term by design does not: it is the gradient of another loss.)
    """
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)  # small: 2 loss calls per element
    grad = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    triples = trajops.sample_stp_triples(2, 5, 3, generator=g)
    w, s = 0.7, 0.5

    def objective(x):
        # The reference defines the semantics (and is cheap under every backend); T = 5 >= 3, so
        # every row is active and the loss is the plain mean over (layer, span, row).
        return float((x * grad).sum() + w * s * trajops.reference.stp_loss([x], triples, None)[0].mean())

    eps = 1e-6
    numeric = torch.empty_like(h)
    flat, out = h.clone().view(-1), numeric.view(-1)
    for i in range(flat.numel()):
        x0 = float(flat[i])
        flat[i] = x0 + eps
        up = objective(flat.view_as(h))
        flat[i] = x0 - eps
        down = objective(flat.view_as(h))
        flat[i] = x0
        out[i] = (up - down) / (2 * eps)
    got = injected_grad(h, grad, w, triples, scale=s)
    torch.testing.assert_close(got, numeric, atol=1e-7, rtol=1e-6)
    # and autograd of the same objective, exactly up to rounding
    torch.testing.assert_close(got, expected_grad(h, grad, w * s, triples), atol=1e-12, rtol=0)
    assert (got - grad).abs().max() > 1e-2  # the STP part is not negligible here


def test_weight_zero_leaves_the_gradient_untouched_even_with_nan():
    h, grad, triples = data(seed=3)
    h[0, 2] = math.nan
    leaf = h.clone().requires_grad_()
    out, loss = trajops.stp_inject(leaf, 0.0, triples=triples, return_loss=True)
    assert out is leaf and loss is None  # nothing computed
    (out * grad).sum().backward()
    assert torch.equal(leaf.grad, grad)
    # scale 0 too
    assert torch.equal(injected_grad(h, grad, 0.5, triples, scale=0.0), grad)


@pytest.mark.parametrize("lengths", [[2, 1, 0], [2, 2, 2]])
def test_no_active_row_gives_exactly_the_incoming_gradient(lengths):
    lengths = torch.tensor(lengths)
    h, grad, triples = data(seed=4, lengths=lengths)
    leaf = h.clone().requires_grad_()
    out, loss = trajops.stp_inject(leaf, 1.0, lengths=lengths, return_loss=True)
    assert float(loss) == 0.0
    (out * grad).sum().backward()
    assert torch.equal(leaf.grad, grad)
    # T < 3: no row can be active
    short = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    g2 = torch.randn_like(short)
    (trajops.stp_inject(short, 1.0) * g2).sum().backward()
    assert torch.equal(short.grad, g2)


def test_checkpoint_recomputes_the_same_triples_with_the_default_generator():
    lin = torch.nn.Linear(D, D).double()
    x = torch.randn(B, T, D, dtype=torch.float64)

    def f(inp):
        return trajops.stp_inject(torch.tanh(lin(inp)), 0.5, n_spans=3).pow(2).sum()

    def grads(use_checkpoint: bool, seed: int):
        lin.zero_grad()
        torch.manual_seed(seed)
        (checkpoint(f, x, use_reentrant=False) if use_checkpoint else f(x)).backward()
        return [p.grad.clone() for p in lin.parameters()]

    plain, ckpt = grads(False, 7), grads(True, 7)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)
    # the sampled triples matter: another seed gives other gradients
    assert max(float((a - b).abs().max()) for a, b in zip(plain, grads(False, 8))) > 1e-6


def test_checkpoint_with_own_generator_needs_triples_sampled_outside():
    lin = torch.nn.Linear(D, D).double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    gen = torch.Generator()

    def f(inp, triples=None):
        return trajops.stp_inject(torch.tanh(lin(inp)), 0.5, n_spans=3, triples=triples, generator=gen).pow(2).sum()

    def grads(fn, *args):
        lin.zero_grad()
        gen.manual_seed(3)
        fn(*args).backward()
        return [p.grad.clone() for p in lin.parameters()]

    plain = grads(f, x)
    # the documented way: sample with the generator outside the checkpointed region
    gen.manual_seed(3)
    triples = trajops.sample_stp_triples(B, T, 3, generator=gen)
    outside = grads(lambda inp: checkpoint(f, inp, triples, use_reentrant=False), x)
    for a, b in zip(plain, outside):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)
    # sampling inside: the recomputation draws other triples (why the docstring says so)
    inside = grads(lambda inp: checkpoint(f, inp, use_reentrant=False), x)
    assert max(float((a - b).abs().max()) for a, b in zip(plain, inside)) > 1e-6


@pytest.mark.slow  # compiles twice; the C++ pass runs it (the seam adds no backend-specific code)
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    lengths = torch.tensor([9, 4, 7])
    h, grad, triples = data(seed=5, lengths=lengths)

    def f(x):
        y = trajops.stp_inject(x.sin(), 0.3, triples=triples, lengths=lengths, scale=0.5)
        return (y * grad).sum()

    compiled = torch.compile(f, fullgraph=True)
    xa, xb = h.clone().requires_grad_(), h.clone().requires_grad_()
    torch.testing.assert_close(compiled(xb), f(xa))
    f(xa).backward()
    compiled(xb).backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    # sampling inside the graph traces too (fullgraph: no break); its random stream is its own
    sampled = torch.compile(lambda x: (trajops.stp_inject(x, 1.0, n_spans=2) * grad).sum(), fullgraph=True)
    xc = h.clone().requires_grad_()
    sampled(xc).backward()
    assert torch.isfinite(xc.grad).all() and (xc.grad - grad).abs().max() > 1e-6


def test_module_matches_the_function_and_keeps_the_last_loss():
    h, grad, triples = data(seed=6)
    m = STPInject(weight=0.4, n_spans=2, scale=0.5, start_step=10)
    assert m.last_loss is None and list(m.parameters()) == []
    leaf = h.clone().requires_grad_()
    out = m(leaf, triples=triples)  # step=None: on
    assert torch.equal(out, h)
    torch.testing.assert_close(m.last_loss, trajops.stp_loss(h, triples=triples))
    assert not m.last_loss.requires_grad
    (out * grad).sum().backward()
    torch.testing.assert_close(leaf.grad, expected_grad(h, grad, 0.2, triples), atol=1e-12, rtol=0)
    # before start_step: a plain identity, nothing logged
    leaf2 = h.clone().requires_grad_()
    out2 = m(leaf2, step=9, triples=triples)
    assert out2 is leaf2 and m.last_loss is None
    assert float(m(h, step=10, triples=triples).sum()) == float(h.sum()) and m.last_loss is not None
    assert repr(m) == "STPInject(weight=0.4, n_spans=2, scale=0.5, start_step=10)"


@pytest.mark.slow
def test_module_under_compile_sets_last_loss():
    torch._dynamo.reset()
    h, grad, triples = data(seed=7)
    m = STPInject(weight=0.2)
    compiled = torch.compile(lambda x: (m(x, triples=triples) * grad).sum(), fullgraph=True)
    leaf = h.clone().requires_grad_()
    compiled(leaf).backward()
    torch.testing.assert_close(m.last_loss, trajops.stp_loss(h, triples=triples))
    torch.testing.assert_close(leaf.grad, expected_grad(h, grad, 0.2, triples), atol=1e-12, rtol=0)


def test_in_place_on_the_output_raises_and_clone_works():
    h, _, triples = data()
    leaf = h.clone().requires_grad_()
    out = trajops.stp_inject(leaf * 1, 1.0, triples=triples)
    with pytest.raises(RuntimeError, match="custom Function"):
        out.add_(1)
    trajops.stp_inject(leaf * 1, 1.0, triples=triples).clone().add_(1).sum().backward()
    assert leaf.grad is not None


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"weight": -0.1}, ValueError, "weight must be a finite number >= 0"),
        ({"weight": math.nan}, ValueError, "weight must be a finite number >= 0"),
        ({"weight": math.inf}, ValueError, "weight must be a finite number >= 0"),
        ({"weight": True}, TypeError, "weight must be a real number"),
        ({"weight": "0.1"}, TypeError, "weight must be a real number"),
        ({"scale": -1.0}, ValueError, "scale must be a finite number >= 0"),
        ({"scale": math.nan}, ValueError, "scale must be a finite number >= 0"),
        ({"n_spans": 0}, ValueError, "n_spans must be an int >= 1"),
        ({"n_spans": 1.5}, ValueError, "n_spans must be an int >= 1"),
        ({"n_spans": True}, ValueError, "n_spans must be an int >= 1"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = {"weight": 0.1, **kwargs}
    with pytest.raises(exc, match=match):
        trajops.stp_inject(torch.randn(2, 5, 3), args.pop("weight"), **args)


def test_bad_hidden_and_triples():
    with pytest.raises(ValueError, match=r"hidden must have shape \(B, T, D\)"):
        trajops.stp_inject(torch.randn(5, 3), 0.1)
    with pytest.raises(TypeError, match="hidden must be a"):
        trajops.stp_inject([torch.randn(2, 5, 3)], 0.1)
    bad = torch.tensor([[[2, 1, 3], [0, 1, 2]]])  # s > r in row 0
    with pytest.raises(ValueError, match="triples"):
        trajops.stp_inject(torch.randn(2, 5, 3), 0.1, triples=bad)
    for kwargs, match in [({"weight": -1}, "weight"), ({"scale": math.inf}, "scale"), ({"n_spans": 0}, "n_spans"),
                          ({"start_step": -1}, "start_step")]:
        with pytest.raises((ValueError, TypeError), match=match):
            STPInject(**kwargs)
