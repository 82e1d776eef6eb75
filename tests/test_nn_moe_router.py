"""trajops.nn.TrajectoryGuidedMoERouter against the seed's class (001, section 1).

`SeedRouter` below restates the seed's semantics in a loop, with the seed's parameter names so the
same weights load into both. Runs under every backend (the module calls trajops.trajectory_flow).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import INTERPRETER, assert_close
from trajops.nn import TrajectoryGuidedMoERouter


class SeedRouter(nn.Module):
    """The seed's router, one position per call.

    For position p: the steps x[i+1] - x[i], i in [p - ws, p - 1], ws = min(8, p), with norm > 1e-6
    count, each with weight (i - (p - ws) + 1) / ws * tanh(norm); the context is the projector of the
    weight-normalized sum of their unit directions, or zeros (no projector) when none counts. The
    seed gathers its weights with torch.tensor(list), which cuts them out of the autograd graph:
    ``detach_weights=True`` (default) keeps that; False keeps them in the graph.
    """

    def __init__(self, embedding_dim, num_experts, trajectory_influence=0.3, detach_weights=True):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.trajectory_influence = trajectory_influence
        self.detach_weights = detach_weights
        self.router = nn.Linear(embedding_dim, num_experts)
        self.trajectory_projector = nn.Linear(embedding_dim, embedding_dim)

    def compute_trajectory_context(self, x, position):
        zeros = torch.zeros(self.embedding_dim)
        if position == 0:
            return zeros
        ws = min(8, position)
        start = max(0, position - ws)
        dirs, weights = [], []
        for i in range(start, position):
            if i + 1 < len(x):
                step = x[i + 1] - x[i]
                norm = torch.norm(step)
                if norm > 1e-6:
                    dirs.append(step / norm)
                    weights.append((i - start + 1) / ws * torch.tanh(norm))
        if not dirs:
            return zeros
        if self.detach_weights:
            w = torch.tensor([float(v.detach()) for v in weights], dtype=x.dtype)
        else:
            w = torch.stack(weights)
        w = w / w.sum()
        return self.trajectory_projector((torch.stack(dirs) * w.unsqueeze(-1)).sum(0))

    def forward(self, x, position):
        enhanced = x[position] + self.trajectory_influence * self.compute_trajectory_context(x, position)
        return torch.softmax(self.router(enhanced), dim=-1)


def seed_all(seed, x):
    """(B, T, E) -> (B, T, num_experts) with the seed's per-position call."""
    return torch.stack([torch.stack([seed(xb, p) for p in range(xb.shape[0])]) for xb in x])


def make(E, n_exp, dtype, influence=0.3, seed=0, detach_weights=True):
    torch.manual_seed(seed)
    ref = SeedRouter(E, n_exp, influence, detach_weights=detach_weights).to(dtype)
    with torch.no_grad():  # a bias well away from 0, so forgetting to drop it shows
        ref.trajectory_projector.bias.uniform_(0.5, 1.5)
    mod = TrajectoryGuidedMoERouter(E, n_exp, influence).to(dtype)
    mod.load_state_dict(ref.state_dict(), strict=True)
    return mod, ref


def embeddings(B, T, E, dtype, seed=0, special=True):
    """Random walk with steps of norm ~1, plus (when special) repeated tokens and tiny steps so that some
    windows after position 0 have no counting step and others mix counting and non-counting steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, E, generator=g, dtype=torch.float64).cumsum(1) / E**0.5
    if special and T >= 4:
        x[0, 2] = x[0, 1]  # a zero step
        x[-1, 1:] = x[-1, 0]  # the last row repeats one token: no window ever counts a step
        x[-1, 1:] += 1e-8 * torch.randn(T - 1, E, generator=g, dtype=torch.float64)  # ... tiny steps only
        if T >= 12:
            x[0, 9:] = x[0, 8]  # row 0: positions from 9 on look back over (partly) zero steps
            x[0, 11] = x[0, 10] + 0.5  # ... and one real step again
    return x.to(dtype)


SHAPES = [(1, 1, 5), (2, 2, 5), (2, 3, 12), (3, 17, 5)] if not INTERPRETER else [(1, 1, 5), (2, 3, 12), (2, 12, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,T,E", SHAPES)
def test_batched_equals_seed_loop(B, T, E, dtype):
    mod, ref = make(E, 3, dtype)
    x = embeddings(B, T, E, dtype)
    with torch.no_grad():
        want = seed_all(ref, x)
        got = mod(x)
        assert got.shape == (B, T, 3) and got.dtype == dtype
        assert_close(got, want)
        # (T, E) without a position is one sequence
        assert_close(mod(x[0]), want[0])
        # the seed's call, position by position
        for b in range(B):
            for p in range(T):
                s = mod(x[b], p)
                assert s.shape == (3,)
                assert_close(s, want[b, p])
                assert_close(mod.compute_trajectory_context(x[b], p), ref.compute_trajectory_context(x[b], p))


def test_positions_without_counting_steps_drop_the_projector():
    E = 5
    mod, ref = make(E, 4, torch.float64)
    x = embeddings(2, 12, E, torch.float64)
    ctx = torch.stack([mod.compute_trajectory_context(x[1], p) for p in range(12)])
    assert torch.equal(ctx, torch.zeros_like(ctx))  # tiny steps only: never a context, not even the bias
    assert torch.equal(mod.compute_trajectory_context(x[0], 0), torch.zeros(E, dtype=torch.float64))
    # row 0, position 10: its window holds counting steps (before 8) and zero ones
    assert mod.compute_trajectory_context(x[0], 10).abs().sum() > 0
    with torch.no_grad():
        no_ctx = torch.softmax(mod.router(x[1]), -1)
    assert_close(mod(x)[1], no_ctx)


@pytest.mark.parametrize("j", [0, 3])
def test_window_holding_a_single_counting_step(j):
    """Only step j counts: positions j+1 .. j+8 have it in their window (j+8 as its oldest step), later
    ones do not. Catches an off-by-one in either the flow's window or the projector's condition."""
    E, T = 5, 14
    mod, ref = make(E, 3, torch.float64)
    x = torch.zeros(1, T, E, dtype=torch.float64)
    x[0, j + 1:] = torch.randn(E, dtype=torch.float64)
    with torch.no_grad():
        assert_close(mod(x), seed_all(ref, x))
        ctx = torch.stack([mod.compute_trajectory_context(x[0], p) for p in range(T)])
    has = ctx.abs().sum(-1) > 0
    assert has.tolist() == [j + 1 <= p <= j + 8 for p in range(T)]


@pytest.mark.parametrize("influence", [0.0, 0.3, 2.5])
def test_trajectory_influence(influence):
    mod, ref = make(5, 3, torch.float64, influence=influence)
    x = embeddings(2, 10, 5, torch.float64, seed=3)
    with torch.no_grad():
        assert_close(mod(x), seed_all(ref, x))
    assert mod.trajectory_influence == influence and "trajectory_influence" not in mod.state_dict()


def _grads(module, x, out, g):
    params = dict(module.named_parameters())
    inputs = [x, *params.values()]
    grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
    # The seed never touches the projector when no position has a context (T = 1): a zero gradient.
    grads = [torch.zeros_like(t) if d is None else d for t, d in zip(inputs, grads)]
    return grads[0], dict(zip(params, grads[1:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,T,E", SHAPES)
def test_gradients(B, T, E, dtype):
    """Parameter gradients equal the seed's; the input gradient equals the seed's loop with its
    weights left in the graph (the seed itself detaches them, see the next test)."""
    mod, ref = make(E, 3, dtype)
    ref_graph = SeedRouter(E, 3, detach_weights=False).to(dtype)
    ref_graph.load_state_dict(ref.state_dict())
    x = embeddings(B, T, E, dtype).requires_grad_()
    g = torch.randn(B, T, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    dx, dparams = _grads(mod, x, mod(x), g)
    dx_seed, dparams_seed = _grads(ref, x, seed_all(ref, x), g)
    dx_graph, _ = _grads(ref_graph, x, seed_all(ref_graph, x), g)
    for name in dparams_seed:
        assert_close(dparams[name], dparams_seed[name])
    assert_close(dx, dx_graph)
    # the seed's call path gives the same gradients
    dx_p, dparams_p = _grads(mod, x, torch.stack([torch.stack([mod(x[b], p) for p in range(T)]) for b in range(B)]), g)
    assert_close(dx_p, dx_graph)
    for name in dparams_seed:
        assert_close(dparams_p[name], dparams_seed[name])


def test_seed_input_gradient_detaches_the_weights():
    """Documents the one difference: the seed's torch.tensor(weights) drops d(weights)/dx."""
    mod, ref = make(5, 3, torch.float64)
    x = embeddings(1, 12, 5, torch.float64, special=False).requires_grad_()
    g = torch.randn(1, 12, 3, dtype=torch.float64)
    dx, _ = _grads(mod, x, mod(x), g)
    dx_seed, _ = _grads(ref, x, seed_all(ref, x), g)
    assert (dx - dx_seed).abs().max() > 1e-6
    # the difference is only through the context: with influence 0 both are the plain router's
    mod.trajectory_influence = ref.trajectory_influence = 0.0
    dx0, _ = _grads(mod, x, mod(x), g)
    dx0_seed, _ = _grads(ref, x, seed_all(ref, x), g)
    assert_close(dx0, dx0_seed)


def test_gradcheck():
    mod, _ = make(3, 2, torch.float64)
    x = embeddings(2, 5, 3, torch.float64, special=False)
    # (no zero step here: gradcheck's 1e-6 perturbation of one would cross the 1e-6 threshold)
    # The parameters' gradients are plain PyTorch around the op: the slow interpreter checks x only.
    names = [] if INTERPRETER else [n for n, _ in mod.named_parameters()]
    own = dict(mod.named_parameters())
    params = [own[n].detach().clone().requires_grad_() for n in names]

    def batched(x, *ps):
        return torch.func.functional_call(mod, dict(zip(names, ps)), (x,))

    def seed_call(x, *ps):
        return torch.func.functional_call(mod, dict(zip(names, ps)), (x, 4))

    opts = dict(atol=1e-7, fast_mode=INTERPRETER)
    assert torch.autograd.gradcheck(batched, (x.requires_grad_(), *params), **opts)
    assert torch.autograd.gradcheck(seed_call, (x[0].detach().requires_grad_(), *params), **opts)


def test_seed_state_dict_loads_strict_and_keys_match():
    ref = SeedRouter(12, 4)
    mod = TrajectoryGuidedMoERouter(12, 4)
    assert list(mod.state_dict()) == list(ref.state_dict()) == [
        "router.weight", "router.bias", "trajectory_projector.weight", "trajectory_projector.bias"]
    mod.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(mod.state_dict(), strict=True)


def test_non_contiguous_input():
    mod, ref = make(5, 3, torch.float64)
    base = embeddings(3, 9, 10, torch.float64)
    x = base[..., ::2].transpose(0, 1).contiguous().transpose(0, 1)  # strided in both E and B
    assert not x.is_contiguous()
    with torch.no_grad():
        assert_close(mod(x), seed_all(ref, x.contiguous()))


def _compile_check(backend):
    mod, ref = make(12, 4, torch.float32)
    x = embeddings(2, 11, 12, torch.float32).requires_grad_()
    compiled = torch.compile(mod, fullgraph=True, backend=backend)
    g = torch.randn(2, 11, 4)
    want = mod(x)
    dx, dp = _grads(mod, x, want, g)
    got = compiled(x)
    assert_close(got, want)
    cdx, cdp = _grads(mod, x, got, g)
    assert_close(cdx, dx)
    for n in dp:
        assert_close(cdp[n], dp[n])


def test_compile_fullgraph_aot_eager():
    torch._dynamo.reset()
    _compile_check("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    _compile_check("inductor")


def test_bad_inputs():
    mod = TrajectoryGuidedMoERouter(5, 3)
    x = torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match=r"token_embeddings must have shape \(B, T, E\) or \(T, E\).*\[4, 5, 2, 1\]"):
        mod(torch.randn(4, 5, 2, 1))
    with pytest.raises(ValueError, match=r"E = embedding_dim = 5, got shape \[2, 4, 6\]"):
        mod(torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match=r"shape \(T, E\)"):
        mod(x, 1)  # the seed's call takes one sequence
    with pytest.raises(ValueError, match=r"shape \(T, E\)"):
        mod(torch.randn(5), 0)
    for p in (4, 7, -1):
        with pytest.raises(ValueError, match=r"position must be in \[0, T\) = \[0, 4\), got " + str(p)):
            mod(x[0], p)
        with pytest.raises(ValueError, match="position must be in"):
            mod.compute_trajectory_context(x[0], p)
    with pytest.raises(TypeError, match="position must be an int"):
        mod(x[0], 1.0)
    with pytest.raises(TypeError, match="position must be an int"):
        mod(x[0], True)
    with pytest.raises(TypeError, match="must be floating point"):
        mod(torch.ones(2, 4, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be a tensor"):
        mod([[0.0] * 5])
    for args in ((0, 3), (5, 0), (5.0, 3), (True, 3)):
        with pytest.raises(ValueError, match="must be an int >= 1"):
            TrajectoryGuidedMoERouter(*args)


def test_tensor_position_and_repr():
    mod, ref = make(5, 3, torch.float64)
    x = embeddings(1, 6, 5, torch.float64)[0]
    with torch.no_grad():
        assert_close(mod(x, torch.tensor(3)), ref(x, 3))
    assert "num_experts=3" in repr(mod) and "trajectory_influence=0.3" in repr(mod)
