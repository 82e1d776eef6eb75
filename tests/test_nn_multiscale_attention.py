"""trajops.nn.MultiScaleTrajectoryAttention against the seed's class (001, section 5).

`SeedAttention` below restates the seed's semantics (materialized scores, a loop for the query
trajectories), with the seed's parameter and buffer names so the same weights load into both. Runs
under every backend (the module calls trajops.temperature_attention).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import INTERPRETER, assert_close
from trajops.nn import MultiScaleTrajectoryAttention


class SeedAttention(nn.Module):
    """The seed's attention: per-head scores Q K^T divided by a per-query, per-head scale predicted
    from the query's difference to the previous query (0 at t = 0); entries where the mask == 0 are
    set to -1e9 before the softmax; no 1/sqrt(head_dim). Keys and values may be longer or shorter
    than the queries here (the seed reshapes them with the queries' length, so it needs Tk = Tq)."""

    def __init__(self, embedding_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embedding_dim // num_heads
        self.q_proj = nn.Linear(embedding_dim, embedding_dim)
        self.k_proj = nn.Linear(embedding_dim, embedding_dim)
        self.v_proj = nn.Linear(embedding_dim, embedding_dim)
        self.out_proj = nn.Linear(embedding_dim, embedding_dim)
        self.scale_predictor = nn.Sequential(
            nn.Linear(embedding_dim, embedding_dim // 4), nn.ReLU(),
            nn.Linear(embedding_dim // 4, num_heads), nn.Softplus(),
        )
        self.register_buffer("default_scale", torch.sqrt(torch.tensor(self.head_dim).float()))

    def compute_query_trajectory(self, queries):
        out = torch.zeros_like(queries)
        for b in range(queries.shape[0]):
            for t in range(1, queries.shape[1]):
                out[b, t] = queries[b, t] - queries[b, t - 1]
        return out

    def _heads(self, t):
        B, T, E = t.shape
        return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, queries, keys, values, attention_mask=None):
        B, T, E = queries.shape
        Q, K, V = self._heads(self.q_proj(queries)), self._heads(self.k_proj(keys)), self._heads(self.v_proj(values))
        scales = self.scale_predictor(self.compute_query_trajectory(queries)).transpose(1, 2).unsqueeze(-1)
        scores = (Q @ K.transpose(-2, -1)) / scales
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask == 0, -1e9)
        out = torch.softmax(scores, dim=-1) @ V
        return self.out_proj(out.transpose(1, 2).contiguous().view(B, T, E))


def make(E, H, dtype, seed=0):
    torch.manual_seed(seed)
    ref = SeedAttention(E, H).to(dtype)
    mod = MultiScaleTrajectoryAttention(E, H).to(dtype)
    mod.load_state_dict(ref.state_dict(), strict=True)
    return mod, ref


def qkv(B, Tq, E, dtype, Tk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    Tk = Tq if Tk is None else Tk
    q = torch.randn(B, Tq, E, generator=g, dtype=torch.float64)
    k = torch.randn(B, Tk, E, generator=g, dtype=torch.float64)
    v = torch.randn(B, Tk, E, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q, k, v))


def run_grads(module, inputs, mask, g, **kw):
    """Output and the gradients of <out, g> with respect to the inputs and every parameter (by name)."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = module(*inputs, mask, **kw)
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(out, [*inputs, *params.values()], g, allow_unused=True)
    grads = [torch.zeros_like(t) if d is None else d for t, d in zip([*inputs, *params.values()], grads)]
    names = [n.removeprefix("_orig_mod.") for n in params]  # a compiled module's names
    return out, grads[:3], dict(zip(names, grads[3:]))


def check_equal(mod, ref, inputs, mask=None, seed_mask="same", **kw):
    """Module == seed in output and in every gradient; `seed_mask` is what the seed receives."""
    seed_mask = mask if isinstance(seed_mask, str) else seed_mask
    out_shape = inputs[0].shape
    g = torch.randn(out_shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(inputs[0].dtype)
    out, dx, dp = run_grads(mod, inputs, mask, g, **kw)
    want, dx_ref, dp_ref = run_grads(ref, inputs, seed_mask, g)
    assert out.shape == want.shape and out.dtype == want.dtype
    assert_close(out, want)
    for a, b in zip(dx, dx_ref):
        assert_close(a, b)
    assert set(dp) == set(dp_ref)
    for name in dp_ref:
        assert_close(dp[name], dp_ref[name])


SHAPES = [(1, 1, 5, 1), (2, 2, 12, 3), (2, 3, 5, 1), (2, 17, 12, 3)]
if INTERPRETER:
    SHAPES = [(1, 1, 5, 1), (2, 3, 12, 3), (1, 17, 6, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,T,E,H", SHAPES)
def test_equals_seed_no_mask(B, T, E, H, dtype):
    mod, ref = make(E, H, dtype)
    check_equal(mod, ref, qkv(B, T, E, dtype))


def _masks(B, H, T, seed=0):
    """Every mask form the seed accepts, each with partly masked rows (and none fully masked)."""
    g = torch.Generator().manual_seed(seed)
    tril = torch.ones(T, T).tril()
    rand4 = torch.rand(B, H, T, T, generator=g) > 0.4
    rand4[..., 0] = True  # keep key 0 so that no row is empty
    pad = torch.ones(B, 1, 1, T)
    pad[0, ..., T // 2 + 1:] = 0
    return {
        "bool-2d": tril.bool(),
        "float-2d": tril,
        "int-3d": tril.to(torch.int64)[None],
        "bool-4d": rand4,
        "float-key-padding": pad,
        "int-4d-heads": rand4[:1].to(torch.int32),
        "float-1d": pad[0, 0, 0],
        # any nonzero entry attends, negative ones included
        "nonbinary-float": tril * torch.where(torch.rand(T, T, generator=g) > 0.5, -2.5, 0.25),
    }


MASK_NAMES = list(_masks(1, 1, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", MASK_NAMES)
def test_equals_seed_every_mask_form(name, dtype):
    B, T, E, H = (2, 5, 12, 3) if INTERPRETER else (2, 9, 12, 3)
    mod, ref = make(E, H, dtype)
    mask = _masks(B, H, T)[name]
    check_equal(mod, ref, qkv(B, T, E, dtype), mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fully_masked_rows_average_all_values_like_the_seed(dtype):
    """The seed's -1e9 fill makes every score of an empty row equal: the row is the mean of V, and
    Q, K and the scales get no gradient from it. The op alone would give 0; the module matches the seed."""
    B, T, E, H = 2, 6, 12, 3
    mod, ref = make(E, H, dtype)
    mask = torch.rand(B, H, T, T, generator=torch.Generator().manual_seed(3)) > 0.5
    mask[..., 0] = True
    mask[0, 1, 2] = False  # one head of one row
    mask[1, :, 4] = False  # every head of a row
    mask[1, 2] = False  # every row of a head
    check_equal(mod, ref, qkv(B, T, E, dtype), mask)
    check_equal(mod, ref, qkv(B, T, E, dtype), torch.zeros(T, T))  # nothing attends at all
    # a key-padding mask that removes every key of sequence 1
    pad = torch.ones(B, 1, 1, T)
    pad[1] = 0
    check_equal(mod, ref, qkv(B, T, E, dtype), pad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_causal_is_the_seed_with_a_lower_triangle(dtype):
    B, T, E, H = 2, 7, 12, 3
    mod, ref = make(E, H, dtype)
    tril = torch.ones(T, T).tril().bool()
    check_equal(mod, ref, qkv(B, T, E, dtype), None, seed_mask=tril, causal=True)
    user = torch.rand(B, 1, T, T, generator=torch.Generator().manual_seed(5)) > 0.3
    user[1, 0, 3, :4] = False  # with causal, row 3 of sequence 1 is empty
    check_equal(mod, ref, qkv(B, T, E, dtype), user, seed_mask=user & tril, causal=True)


@pytest.mark.parametrize("Tk", [1, 4, 9])
def test_keys_of_another_length(Tk):
    B, Tq, E, H = 2, 5, 12, 3
    mod, ref = make(E, H, torch.float64)
    check_equal(mod, ref, qkv(B, Tq, E, torch.float64, Tk=Tk))
    mask = torch.rand(B, H, Tq, Tk, generator=torch.Generator().manual_seed(1)) > 0.5
    check_equal(mod, ref, qkv(B, Tq, E, torch.float64, Tk=Tk), mask)


def test_self_attention_with_one_tensor_and_non_contiguous_inputs():
    mod, ref = make(12, 3, torch.float64)
    x = torch.randn(5, 2, 24, dtype=torch.float64)[..., ::2].transpose(0, 1)  # (2, 5, 12), strided
    assert not x.is_contiguous()
    with torch.no_grad():
        assert_close(mod(x, x, x), ref(x.contiguous(), x.contiguous(), x.contiguous()))


def test_gradcheck():
    B, T, E, H = 2, 4, 8, 2
    mod, _ = make(E, H, torch.float64)
    mask = torch.ones(B, 1, T, T, dtype=torch.bool)
    mask[1, 0, 2] = False  # an empty row (the mean-of-values path)
    mask[0, 0, 1, 0] = False
    # The parameters' gradients are plain PyTorch around the op: the slow interpreter checks the inputs only.
    names = [] if INTERPRETER else [n for n, _ in mod.named_parameters()]
    own = dict(mod.named_parameters())
    params = [own[n].detach().clone().requires_grad_() for n in names]

    def f(q, k, v, *ps):
        return torch.func.functional_call(mod, dict(zip(names, ps)), (q, k, v, mask), {"causal": True})

    inputs = [t.requires_grad_() for t in qkv(B, T, E, torch.float64)]
    assert torch.autograd.gradcheck(f, (*inputs, *params), atol=1e-7, fast_mode=INTERPRETER)


def test_seed_state_dict_loads_strict_and_keys_match():
    ref, mod = SeedAttention(12, 3), MultiScaleTrajectoryAttention(12, 3)
    assert list(mod.state_dict()) == list(ref.state_dict())
    assert "default_scale" in mod.state_dict() and mod.default_scale.dtype == torch.float32
    torch.testing.assert_close(mod.default_scale, ref.default_scale, atol=0, rtol=0)
    mod.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(mod.state_dict(), strict=True)
    # E < 4: the seed's predictor has a 0-wide hidden layer; it still loads and runs
    ref3, mod3 = SeedAttention(3, 1), MultiScaleTrajectoryAttention(3, 1)
    mod3.load_state_dict(ref3.state_dict(), strict=True)
    check_equal(mod3, ref3, qkv(2, 4, 3, torch.float32))


def _compile_check(backend):
    mod, _ = make(12, 3, torch.float32)
    mask = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(2)) > 0.3
    mask[0, 0, 4] = False
    inputs = qkv(2, 6, 12, torch.float32)
    compiled = torch.compile(mod, fullgraph=True, backend=backend)
    g = torch.randn(2, 6, 12)
    for m, causal in ((None, False), (mask, True)):
        want, dx, dp = run_grads(mod, inputs, m, g, causal=causal)
        got, cdx, cdp = run_grads(compiled, inputs, m, g, causal=causal)
        assert_close(got, want)
        for a, b in zip(cdx, dx):
            assert_close(a, b)
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
    mod = MultiScaleTrajectoryAttention(12, 3)
    q = torch.randn(2, 4, 12)
    with pytest.raises(ValueError, match=r"queries must have shape \(B, T, 12\).*got \[4, 12\]"):
        mod(q[0], q[0], q[0])
    with pytest.raises(ValueError, match=r"keys must have shape \(B, T, 12\).*got \[2, 4, 10\]"):
        mod(q, torch.randn(2, 4, 10), q)
    with pytest.raises(ValueError, match="must share B"):
        mod(q, torch.randn(3, 4, 12), torch.randn(3, 4, 12))
    with pytest.raises(ValueError, match="must share B"):
        mod(q, q, torch.randn(2, 5, 12))
    for shape in ((4, 5), (4, 4, 4), (2, 3, 4, 4, 1), (1, 1, 2, 3, 4, 4), (2, 2, 4, 4), (5,)):
        with pytest.raises(ValueError, match=r"attention_mask must have rank <= 4 and broadcast to the scores "
                                             r"\(B, H, Tq, Tk\) = \(2, 3, 4, 4\)"):
            mod(q, q, q, torch.ones(shape))
    with pytest.raises(TypeError, match="attention_mask must be a tensor"):
        mod(q, q, q, [[1, 0], [1, 1]])
    with pytest.raises(TypeError, match="queries must be a tensor"):
        mod(q.tolist(), q, q)
    for args in ((0, 1), (12, 0), (12, 5), (12.0, 3), (True, 1)):
        with pytest.raises(ValueError, match="MultiScaleTrajectoryAttention: "):
            MultiScaleTrajectoryAttention(*args)


def test_compute_query_trajectory_and_repr():
    mod, ref = make(12, 3, torch.float64)
    q = torch.randn(2, 5, 12, dtype=torch.float64)
    assert torch.equal(mod.compute_query_trajectory(q), ref.compute_query_trajectory(q))
    assert "embedding_dim=12, num_heads=3" in repr(mod)
