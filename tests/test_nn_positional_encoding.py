"""trajops.nn.TrajectoryAdaptivePositionalEncoding == the seed class (outputs, gradients, checkpoints)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trajops.nn import TrajectoryAdaptivePositionalEncoding

from conftest import INTERPRETER


class SeedOracle(nn.Module):
    """The seed's TrajectoryAdaptivePositionalEncoding restated: per-step predictor calls, an fp32
    running displacement, and a per-position .item() lookup with linear interpolation."""

    def __init__(self, embedding_dim, max_len=8192, trajectory_strength=0.2):
        super().__init__()
        self.embedding_dim, self.max_len, self.trajectory_strength = embedding_dim, max_len, trajectory_strength
        table = torch.zeros(max_len, embedding_dim)
        pos = torch.arange(0, max_len).unsqueeze(1).float()
        freq = torch.exp(torch.arange(0, embedding_dim, 2).float() * -(math.log(10000.0) / embedding_dim))
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)
        self.register_buffer("pe_table", table)
        self.trajectory_predictor = nn.Sequential(
            nn.Linear(embedding_dim, embedding_dim // 2), nn.ReLU(), nn.Linear(embedding_dim // 2, 1), nn.Tanh())

    def displacements(self, seq):
        T = seq.shape[0]
        out = torch.zeros(T, device=seq.device)  # fp32, as the seed
        for i in range(1, T):
            step = self.trajectory_predictor(seq[i] - seq[i - 1]).squeeze(-1) * self.trajectory_strength
            out[i] = out[i - 1] + step
        return out

    def forward(self, x, positions=None):
        batched = x.dim() == 3
        xb = x if batched else x.unsqueeze(0)
        T = xb.shape[1]
        if positions is None:
            positions = torch.arange(T, device=x.device)
        result = []
        for b in range(xb.shape[0]):
            adapted = torch.clamp(positions.float() + self.displacements(xb[b]), 0, self.max_len - 1)
            rows = []
            for p in adapted:
                lo = int(torch.floor(p).item())
                hi = min(lo + 1, self.max_len - 1)
                a = p - lo
                rows.append((1 - a) * self.pe_table[lo] + a * self.pe_table[hi])
            result.append(torch.stack(rows))
        out = torch.stack(result)
        return out if batched else out.squeeze(0)


def pair(E, max_len=64, strength=0.2, seed=0):
    torch.manual_seed(seed)
    seed_mod = SeedOracle(E, max_len, strength)
    # Larger weights so the tanh is not near 0 and displacements accumulate visibly.
    with torch.no_grad():
        for p in seed_mod.trajectory_predictor.parameters():
            p.mul_(3.0)
    ours = TrajectoryAdaptivePositionalEncoding(E, max_len, strength)
    ours.load_state_dict(seed_mod.state_dict(), strict=True)
    return seed_mod, ours


def inputs(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_state_dict_keys_and_table_match_the_seed():
    seed_mod, ours = pair(16, 100)
    assert list(ours.state_dict().keys()) == list(seed_mod.state_dict().keys())
    fresh = TrajectoryAdaptivePositionalEncoding(16, 100)
    assert torch.equal(fresh.pe_table, seed_mod.pe_table)  # same table bits, not just loaded ones
    seed_mod.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("shape", [(2, 9, 8), (11, 8), (1, 1, 8), (3, 2, 8)])
@pytest.mark.parametrize("strength", [0.2, 5.0])  # 5.0 drives positions past both ends of the table
def test_outputs_and_gradients_equal_seed(shape, strength):
    seed_mod, ours = pair(8, max_len=16, strength=strength)
    x = inputs(shape)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, got = seed_mod(xa), ours(xb)
    assert got.shape == expected.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    g = inputs(x.shape, seed=2)
    got.backward(g)
    if not expected.requires_grad:  # T = 1: the seed's output has no graph at all; ours has zero gradients
        assert torch.equal(xb.grad, torch.zeros_like(x))
        return
    expected.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-4, rtol=1e-4)
    for (name, p_ours), p_seed in zip(ours.named_parameters(), seed_mod.parameters()):
        torch.testing.assert_close(p_ours.grad, p_seed.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_custom_positions_equal_seed():
    seed_mod, ours = pair(6, max_len=40)
    x = inputs((2, 10, 6))
    for positions in (torch.arange(10) * 3, torch.arange(10).flip(0), torch.rand(10) * 30):
        torch.testing.assert_close(ours(x, positions), seed_mod(x, positions), atol=2e-5, rtol=1e-5)
    # per-sequence positions (beyond the seed, which takes one (T,) row): each row as its own call
    pos2 = torch.rand(2, 10) * 30
    out = ours(x, pos2)
    for b in range(2):
        torch.testing.assert_close(out[b], ours(x[b], pos2[b]), atol=1e-6, rtol=1e-6)


def test_gradient_to_float_positions_equals_seed():
    seed_mod, ours = pair(6, max_len=40)
    x = inputs((2, 7, 6))
    pa = (torch.rand(7) * 20).requires_grad_()
    pb = pa.detach().clone().requires_grad_()
    g = inputs((2, 7, 6), seed=3)
    seed_mod(x, pa).backward(g)
    ours(x, pb).backward(g)
    torch.testing.assert_close(pb.grad, pa.grad, atol=1e-4, rtol=1e-4)


def test_fp64_module():
    seed_mod, ours = pair(8, max_len=32)
    ours.double()
    x = inputs((2, 12, 8)).double().requires_grad_()
    out = ours(x)
    assert out.dtype == torch.float64
    # The seed keeps its running displacement in fp32 even here: compare at fp32 precision.
    torch.testing.assert_close(out, seed_mod.double()(x), atol=1e-5, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda t: ours(t), (x[:1, :6].detach().requires_grad_(),))


@pytest.mark.skipif(INTERPRETER, reason="half-type matmuls: the interpreter run covers fp32/fp64")
def test_bf16_module_runs_and_is_close():
    seed_mod, ours = pair(8, max_len=32)
    x = inputs((2, 12, 8))
    ref = ours(x)
    out = ours.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_odd_embedding_dim_works():
    mod = TrajectoryAdaptivePositionalEncoding(5, 20)
    out = mod(inputs((2, 6, 5)))
    assert out.shape == (2, 6, 5) and torch.isfinite(out).all()


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    _, ours = pair(8, max_len=32)
    x = inputs((2, 13, 8))
    compiled = torch.compile(ours, fullgraph=True)
    torch.testing.assert_close(compiled(x), ours(x))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(xa).pow(2).sum().backward()
    compiled(xb).pow(2).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)


@pytest.mark.parametrize(
    "make,positions,exc,match",
    [
        (lambda: torch.randn(2, 3, 7), None, ValueError, r"token_embeddings must have shape \(B, T, 8\)"),
        (lambda: torch.randn(8), None, ValueError, r"token_embeddings must have shape"),
        (lambda: torch.randn(1, 2, 3, 8), None, ValueError, r"token_embeddings must have shape"),
        (lambda: torch.randn(2, 5, 8), torch.arange(4), ValueError, r"positions must have shape \(T,\) = \(5,\)"),
        (lambda: torch.randn(2, 5, 8), torch.zeros(3, 5), ValueError, r"positions must have shape"),
        (lambda: torch.randn(2, 5, 8).numpy(), None, TypeError, "token_embeddings must be a Tensor"),
    ],
)
def test_bad_inputs(make, positions, exc, match):
    mod = TrajectoryAdaptivePositionalEncoding(8, 16)
    with pytest.raises(exc, match=match):
        mod(make(), positions)


def test_bad_constructor_arguments():
    for kwargs in ({"embedding_dim": 0}, {"embedding_dim": 4, "max_len": 0}, {"embedding_dim": 2.5}):
        with pytest.raises(ValueError):
            TrajectoryAdaptivePositionalEncoding(**kwargs)
