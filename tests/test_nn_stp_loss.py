"""trajops.nn.STPLoss: the policy around trajops.stp_loss (weight, layer choice, delayed start, step
counter). Runs under every backend like the op tests (the module only calls the public function)."""
from __future__ import annotations

import pytest
import torch

import trajops
from trajops.nn import STPLoss


def states(n=3, B=3, T=12, D=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(n))


def test_weight_scales_stp_loss_with_the_same_generator():
    hs = states()
    m = STPLoss(weight=0.5, n_spans=3)
    got = m(hs, generator=torch.Generator().manual_seed(4))
    want = 0.5 * trajops.stp_loss([hs[-1]], 3, generator=torch.Generator().manual_seed(4))
    assert got.shape == () and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=1e-6)
    assert float(got) > 0
    # another generator seed samples other triples
    assert float(m(hs, generator=torch.Generator().manual_seed(5))) != float(got)


def test_default_weight_and_explicit_triples_and_lengths():
    hs = states(dtype=torch.float64)
    lengths = torch.tensor([12, 2, 7])
    triples = trajops.sample_stp_triples(3, 12, 6, lengths=lengths, generator=torch.Generator().manual_seed(1))
    m = STPLoss()
    assert m.weight == 0.02 and m.n_spans == 4 and m.layers == (-1,) and m.start_step == 0
    got = m(hs, triples=triples, lengths=lengths)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, 0.02 * trajops.stp_loss(hs[-1], triples=triples, lengths=lengths))
    # lengths matter (rows 1 and 2 are cut): the loss differs from the unmasked one
    full = trajops.sample_stp_triples(3, 12, 6, generator=torch.Generator().manual_seed(1))
    assert float(m(hs, triples=full)) != float(got)


def test_gradient_is_weight_times_gradient():
    hs = [h.requires_grad_() for h in states(dtype=torch.float64)]
    triples = trajops.sample_stp_triples(3, 12, 5, generator=torch.Generator().manual_seed(2))
    STPLoss(weight=3.0, layers=(0, 2))(hs, triples=triples).backward()
    ref = [h.detach().clone().requires_grad_() for h in hs]
    trajops.stp_loss([ref[0], ref[2]], triples=triples).backward()
    torch.testing.assert_close(hs[0].grad, 3.0 * ref[0].grad)
    torch.testing.assert_close(hs[2].grad, 3.0 * ref[2].grad)
    assert hs[1].grad is None


def test_layer_selection():
    hs = states(n=3)
    triples = trajops.sample_stp_triples(3, 12, 5, generator=torch.Generator().manual_seed(3))

    def ref(*idx):
        return 0.1 * trajops.stp_loss([hs[i] for i in idx], triples=triples)

    for layers, idx in [((0, 2), (0, 2)), ((-1,), (2,)), ((-3,), (0,)), ((1, -1), (1, 2)), ((-2, 0, 2), (1, 0, 2))]:
        got = STPLoss(weight=0.1, layers=layers)(hs, triples=triples)
        torch.testing.assert_close(got, ref(*idx))
    # the selection matters: different layers give different losses
    a = STPLoss(weight=0.1, layers=(0, 2))(hs, triples=triples)
    b = STPLoss(weight=0.1, layers=(1, 2))(hs, triples=triples)
    assert float(a) != float(b)
    # a list works like a tuple, a single tensor is one layer
    torch.testing.assert_close(STPLoss(weight=0.1, layers=[0, 2])(list(hs), triples=triples), a)
    torch.testing.assert_close(STPLoss(weight=0.1)(hs[1], triples=triples), ref(1))
    torch.testing.assert_close(STPLoss(weight=0.1, layers=(0,))(hs[1], triples=triples), ref(1))


@pytest.mark.parametrize("layers,n", [((3,), 3), ((-4,), 3), ((0, 5), 3), ((1,), 1), ((-2,), 1)])
def test_layer_index_out_of_range(layers, n):
    hs = states(n=n)
    with pytest.raises(IndexError, match="out of range"):
        STPLoss(layers=layers)(hs if n > 1 else hs[0])


def test_constructor_errors():
    for kwargs in ({"n_spans": 0}, {"n_spans": -2}, {"n_spans": 1.5}, {"n_spans": True}):
        with pytest.raises(ValueError, match="n_spans must be an int >= 1"):
            STPLoss(**kwargs)
    for layers in ((), [], (1.0,), (True,), ("0",)):
        with pytest.raises(ValueError, match="layers must be a non-empty sequence of ints"):
            STPLoss(layers=layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_start_step_zero_with_graph_then_positive(dtype):
    m = STPLoss(weight=1.0, start_step=2, layers=(0, 1))
    m.train()
    for step in range(2):
        hs = [h.requires_grad_() for h in states(n=2, dtype=dtype, seed=step)]
        out = m(hs)
        assert m.step == step + 1
        assert out.shape == () and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert float(out.detach()) == 0.0 and out.grad_fn is not None
        out.backward()
        for h in hs:
            assert h.grad is not None and torch.equal(h.grad, torch.zeros_like(h))
    hs = [h.requires_grad_() for h in states(n=2, dtype=dtype, seed=9)]
    out = m(hs)
    assert m.step == 3 and float(out.detach()) > 0
    out.backward()
    assert all(h.grad.abs().sum() > 0 for h in hs)


def test_before_start_is_exactly_zero_even_with_nan():
    hs = states(n=1)[0].clone()
    hs[0, 3] = float("nan")
    hs[1, 0] = float("inf")
    leaf = hs.requires_grad_()
    out = STPLoss(start_step=5)(leaf)
    assert float(out.detach()) == 0.0
    out.backward()
    assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_step_counter_only_counts_training_calls_and_step_overrides():
    hs = states()
    m = STPLoss(start_step=3)
    assert m.training and m.step == 0
    m.eval()
    for _ in range(5):
        assert float(m(hs)) == 0.0  # eval calls do not advance the counter
    assert m.step == 0
    assert float(m(hs, step=3)) > 0 and float(m(hs, step=2)) == 0.0
    m.train()
    assert float(m(hs, step=7)) > 0 and float(m(hs, step=0)) == 0.0
    assert m.step == 0  # an explicit step does not advance the counter
    for i in range(3):
        assert float(m(hs)) == 0.0 and m.step == i + 1
    assert float(m(hs)) > 0 and m.step == 4
    m.eval()
    assert float(m(hs)) > 0 and m.step == 4


def test_state_dict_round_trip_keeps_the_counter():
    m = STPLoss(weight=0.3, start_step=10)
    for _ in range(7):
        m(states(n=1)[0])
    assert m.step == 7
    sd = m.state_dict()
    assert len(sd) == 1
    m2 = STPLoss(weight=0.3, start_step=10)
    assert m2.step == 0
    m2.load_state_dict(sd)
    assert m2.step == 7
    hs = states()
    for _ in range(3):
        assert float(m2(hs)) == 0.0
    assert float(m2(hs)) > 0 and m2.step == 11
    # the saved counter is a snapshot, not a live reference
    assert m.step == 7
    m3 = STPLoss()
    m3.load_state_dict(m2.state_dict())
    assert m3.step == 11


def test_repr():
    assert repr(STPLoss()) == "STPLoss(weight=0.02, n_spans=4, layers=(-1,), start_step=0)"
    assert repr(STPLoss(weight=1, n_spans=2, layers=[4, 8, -1], start_step=100)) == (
        "STPLoss(weight=1.0, n_spans=2, layers=(4, 8, -1), start_step=100)"
    )


def test_module_has_no_parameters():
    m = STPLoss()
    assert list(m.parameters()) == [] and list(m.buffers()) == []
    assert isinstance(m, torch.nn.Module)
