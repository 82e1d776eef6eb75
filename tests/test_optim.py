"""trajops.optim.TrajectoryGuidedOptimizer == the seed's optimizer, step by step.

The oracle below restates the seed class (seed 001, "Trajectory-Enhanced Optimization") in our
words: a per-parameter Python loop; loss history of the last `trajectory_window` losses;
stability = exp(-unbiased var of the last 10 losses) in torch's default dtype (1.0 with fewer than
10); momentum 0.9 * stability; lr_group * (0.5 + 0.5 * stability); buf = buf * m + g (buf starts
at zeros); p -= lr * buf; params without grad skipped. Both run the same CPU kernels in the same
order, so parameters must agree *exactly* (rtol = atol = 0), which also catches a momentum or lr
that is off by a stability factor close to 1.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import trajops
from trajops.optim import TrajectoryGuidedOptimizer
from trajops.optim import trajectory_guided as tg


class SeedOptimizer(torch.optim.Optimizer):
    """Oracle: the seed optimizer's semantics, one parameter at a time."""

    def __init__(self, params, lr=1e-3, trajectory_window=50):
        super().__init__(params, dict(lr=lr, trajectory_window=trajectory_window))
        self.loss_history = []
        self.gradient_magnitude_history = []

    def compute_trajectory_stability(self, loss_history):
        if len(loss_history) < 10:
            return 1.0
        window = torch.tensor(loss_history[-10:])
        return torch.exp(-torch.var(window)).item()

    @torch.no_grad()
    def step(self, closure=None, current_loss=None):  # the seed never calls the closure
        if current_loss is not None:
            self.loss_history.append(current_loss)
            if len(self.loss_history) > self.defaults["trajectory_window"]:
                self.loss_history.pop(0)
        s = self.compute_trajectory_stability(self.loss_history)
        for group in self.param_groups:
            lr = group["lr"] * (0.5 + 0.5 * s)
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if len(st) == 0:
                    st["momentum_buffer"] = torch.zeros_like(p)
                st["momentum_buffer"].mul_(0.9 * s).add_(p.grad)
                p.add_(st["momentum_buffer"], alpha=-lr)


def assert_exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def assert_same_params(a_params, b_params):
    for pa, pb in zip(a_params, b_params, strict=True):
        assert_exact(pa, pb)


def losses(n, seed=0):
    """Losses with a visible trend and noise, so the stability moves well away from 1 (and back)."""
    g = torch.Generator().manual_seed(seed)
    return [float(3.0 * torch.rand((), generator=g)) + 2.0 / (1 + i) for i in range(n)]


def make_mlp(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3)).to(dtype)


def mlp_loss(model, step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(32, 7, generator=g).to(dtype)
    y = torch.randn(32, 3, generator=g).to(dtype)
    return ((model(x) - y) ** 2).mean()


# ----------------------------------------------------------------------------------------------
# equality with the seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_mode", ["none", "model", "noisy"])
@pytest.mark.parametrize("window", [12, 50])
def test_mlp_matches_seed(dtype, loss_mode, window):
    """A real training loop; > window steps, so the fill-up (<10 losses), the partly filled and
    the full (sliding) window all run."""
    ours_model, seed_model = make_mlp(dtype), make_mlp(dtype)
    ours = TrajectoryGuidedOptimizer(ours_model.parameters(), lr=0.05, trajectory_window=window)
    seed = SeedOptimizer(seed_model.parameters(), lr=0.05, trajectory_window=window)
    noisy = losses(window + 15)
    for step in range(window + 15):
        cur = {}
        for model, opt in ((ours_model, ours), (seed_model, seed)):
            opt.zero_grad()
            loss = mlp_loss(model, step, dtype)
            loss.backward()
            if loss_mode == "model":
                cur[id(opt)] = float(loss.detach())
            elif loss_mode == "noisy":
                cur[id(opt)] = noisy[step]
        assert cur.get(id(ours)) == cur.get(id(seed))
        ours.step(current_loss=cur.get(id(ours)))
        seed.step(current_loss=cur.get(id(seed)))
        assert_same_params(ours_model.parameters(), seed_model.parameters())
        assert ours.loss_history == seed.loss_history
    assert len(ours.loss_history) == (0 if loss_mode == "none" else window)
    for p, q in zip(ours_model.parameters(), seed_model.parameters()):
        assert_exact(ours.state[p]["momentum_buffer"], seed.state[q]["momentum_buffer"])


def odd_tensors(dtype):
    """Leaves of odd shapes: 0-d, one element, a non-contiguous (transposed) leaf, a long vector."""
    g = torch.Generator().manual_seed(3)
    shapes = [(), (1,), (3,), (2, 3, 5), (129,), (7, 1), (1, 1, 1)]
    out = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    out.append(torch.randn(6, 4, generator=g).to(dtype).t())  # non-contiguous leaf (4, 6)
    return [t.requires_grad_() for t in out]


def odd_grad(p, step, k):
    """A grad for p that is non-contiguous for most shapes (a strided slice or a transpose)."""
    g = torch.Generator().manual_seed(1000 * step + k)
    if p.dim() == 2 and k % 2:
        return torch.randn(p.shape[1], p.shape[0], generator=g).to(p.dtype).t()
    return torch.randn((2 * max(p.numel(), 1),), generator=g).to(p.dtype)[::2][: p.numel()].reshape(p.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_loss", [False, True])
def test_odd_tensors_match_seed(dtype, with_loss):
    """Odd shapes, non-contiguous grads and leaves, and grads that are None on some steps."""
    ours_p, seed_p = odd_tensors(dtype), odd_tensors(dtype)
    window = 11
    ours = TrajectoryGuidedOptimizer(ours_p, lr=0.1, trajectory_window=window)
    seed = SeedOptimizer(seed_p, lr=0.1, trajectory_window=window)
    ls = losses(30, seed=1)
    n_strided = 0
    for step in range(30):
        for k, (a, b) in enumerate(zip(ours_p, seed_p)):
            if (step + k) % 4 == 0 or (k == 0 and step < 5):  # None on some steps, late start for #0
                a.grad = b.grad = None
            else:
                a.grad, b.grad = odd_grad(a, step, k), odd_grad(b, step, k)
                n_strided += not a.grad.is_contiguous()
        ours.step(current_loss=ls[step] if with_loss else None)
        seed.step(current_loss=ls[step] if with_loss else None)
        assert_same_params(ours_p, seed_p)
        # state is created exactly for the params that have seen a grad
        assert [p in ours.state for p in ours_p] == [p in seed.state for p in seed_p]
    assert n_strided > 50  # the strided-grad path really ran
    assert not ours_p[-1].is_contiguous() and ours_p[-1].stride() == seed_p[-1].stride()


def test_param_groups_mixed_dtypes_and_lrs():
    """Several groups with their own lr; one group mixes fp32 and fp64 (two foreach buckets)."""
    def params():
        g = torch.Generator().manual_seed(5)
        return [torch.randn(4, 3, generator=g).requires_grad_(), torch.randn(5, generator=g).double().requires_grad_(),
                torch.randn(2, 2, generator=g).requires_grad_(), torch.randn((), generator=g).double().requires_grad_()]

    a, b = params(), params()
    ours = TrajectoryGuidedOptimizer([{"params": a[:2]}, {"params": a[2:], "lr": 0.3}], lr=0.02, trajectory_window=15)
    seed = SeedOptimizer([{"params": b[:2]}, {"params": b[2:], "lr": 0.3}], lr=0.02, trajectory_window=15)
    assert ours.param_groups[1]["lr"] == 0.3 and ours.param_groups[0]["lr"] == 0.02
    ls = losses(25, seed=2)
    for step in range(25):
        for k, (p, q) in enumerate(zip(a, b)):
            g = torch.Generator().manual_seed(step * 10 + k)
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            q.grad = p.grad.clone()
        ours.step(current_loss=ls[step])
        seed.step(current_loss=ls[step])
        assert_same_params(a, b)


def test_sparse_grads_match_seed():
    ea, eb = nn.Embedding(10, 4, sparse=True), nn.Embedding(10, 4, sparse=True)
    eb.load_state_dict(ea.state_dict())
    ours, seed = TrajectoryGuidedOptimizer(ea.parameters(), lr=0.1), SeedOptimizer(eb.parameters(), lr=0.1)
    for step in range(12):
        idx = torch.tensor([step % 10, (3 * step) % 10, 1])
        for m, opt in ((ea, ours), (eb, seed)):
            opt.zero_grad()
            m(idx).pow(2).sum().backward()
        ours.step(current_loss=float(step % 3))
        seed.step(current_loss=float(step % 3))
        assert_exact(ea.weight, eb.weight)


def test_closure_is_evaluated_and_returned():
    """step(closure) runs the closure (with grad enabled) before the update and returns its loss;
    the seed ignores the closure, so its oracle gets the closure run by hand before step()."""
    ours_model, seed_model = make_mlp(torch.float64), make_mlp(torch.float64)
    ours = TrajectoryGuidedOptimizer(ours_model.parameters(), lr=0.05, trajectory_window=12)
    seed = SeedOptimizer(seed_model.parameters(), lr=0.05, trajectory_window=12)
    for step in range(20):
        def closure(model=ours_model, opt=ours, step=step):
            opt.zero_grad()
            loss = mlp_loss(model, step, torch.float64)
            loss.backward()
            return loss

        seed.zero_grad()
        seed_loss = mlp_loss(seed_model, step, torch.float64)
        seed_loss.backward()
        loss = ours.step(closure, current_loss=float(seed_loss.detach()) if step % 2 else None)
        seed.step(current_loss=float(seed_loss.detach()) if step % 2 else None)
        assert_exact(loss.detach(), seed_loss.detach())
        assert_same_params(ours_model.parameters(), seed_model.parameters())
    assert ours.step() is None
    assert len(ours.loss_history) == 10  # only current_loss is recorded, never the closure's loss


def test_all_grads_none_is_a_no_op():
    p = torch.randn(3, requires_grad=True)
    opt = TrajectoryGuidedOptimizer([p])
    before = p.detach().clone()
    for i in range(15):
        opt.step(current_loss=float(i))
    assert_exact(p.detach(), before)
    assert len(opt.state) == 0 and len(opt.loss_history) == 15


def test_history_window_and_stability():
    opt = TrajectoryGuidedOptimizer([torch.zeros(1, requires_grad=True)], trajectory_window=13)
    seed = SeedOptimizer([torch.zeros(1, requires_grad=True)], trajectory_window=13)
    for i, loss in enumerate(losses(40, seed=4)):
        opt.step(current_loss=loss)
        seed.step(current_loss=loss)
        assert opt.loss_history == seed.loss_history
        s = opt.compute_trajectory_stability(opt.loss_history)
        assert s == seed.compute_trajectory_stability(seed.loss_history)
        assert (s == 1.0) == (i < 9)
    assert len(opt.loss_history) == 13
    # a window below 10 never fills the stability span: plain momentum 0.9, lr unchanged
    small = TrajectoryGuidedOptimizer([torch.zeros(1, requires_grad=True)], trajectory_window=9)
    for loss in losses(20):
        small.step(current_loss=loss)
    assert small.compute_trajectory_stability(small.loss_history) == 1.0


def test_public_surface():
    p = torch.zeros(2, requires_grad=True)
    opt = trajops.optim.TrajectoryGuidedOptimizer([p])
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.defaults == {"lr": 1e-3, "trajectory_window": 50}
    assert set(opt.param_groups[0]) == {"params", "lr", "trajectory_window"}
    assert opt.loss_history == [] and opt.gradient_magnitude_history == []
    assert "optim" in trajops.__all__


# ----------------------------------------------------------------------------------------------
# checkpoints


def _train(models_opts, steps, start, ls):
    for step in range(start, start + steps):
        for model, opt in models_opts:
            opt.zero_grad()
            mlp_loss(model, step, torch.float32).backward()
            opt.step(current_loss=ls[step])


def test_state_dict_round_trip_continues_identically():
    ls = losses(60, seed=5)
    model = make_mlp(torch.float32)
    opt = TrajectoryGuidedOptimizer(model.parameters(), lr=0.05, trajectory_window=20)
    _train([(model, opt)], 25, 0, ls)

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["opt"]["loss_history"] == opt.loss_history
    assert all(set(s) == {"momentum_buffer"} for s in ckpt["opt"]["state"].values())

    model2 = make_mlp(torch.float32, seed=9)
    model2.load_state_dict(ckpt["model"])
    opt2 = TrajectoryGuidedOptimizer(model2.parameters(), lr=0.05, trajectory_window=20)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.loss_history == opt.loss_history
    _train([(model, opt), (model2, opt2)], 30, 25, ls)
    assert_same_params(model.parameters(), model2.parameters())

    # deepcopy / pickle keep the history too
    opt3 = copy.deepcopy(opt)
    assert opt3.loss_history == opt.loss_history


def test_seed_checkpoint_loads_both_ways():
    """A seed optimizer's state dict (no loss_history: the seed loses it) loads into ours, and then
    both continue identically; ours loads into the seed (the extra key is ignored)."""
    ls = losses(50, seed=6)
    seed_model = make_mlp(torch.float32)
    seed = SeedOptimizer(seed_model.parameters(), lr=0.05, trajectory_window=20)
    _train([(seed_model, seed)], 20, 0, ls)
    sd = copy.deepcopy(seed.state_dict())
    assert "loss_history" not in sd

    m_ours, m_seed = make_mlp(torch.float32), make_mlp(torch.float32)
    m_ours.load_state_dict(seed_model.state_dict())
    m_seed.load_state_dict(seed_model.state_dict())
    ours = TrajectoryGuidedOptimizer(m_ours.parameters(), lr=0.05, trajectory_window=20)
    seed2 = SeedOptimizer(m_seed.parameters(), lr=0.05, trajectory_window=20)
    # separate copies: load_state_dict keeps (does not copy) tensors whose dtype/device already fit
    ours.load_state_dict(copy.deepcopy(sd))
    seed2.load_state_dict(copy.deepcopy(sd))
    _train([(m_ours, ours), (m_seed, seed2)], 25, 20, ls)
    assert_same_params(m_ours.parameters(), m_seed.parameters())

    seed3 = SeedOptimizer(make_mlp(torch.float32).parameters(), lr=0.05, trajectory_window=20)
    seed3.load_state_dict(ours.state_dict())
    for a, b in zip(seed3.state.values(), ours.state.values()):
        assert_exact(a["momentum_buffer"], b["momentum_buffer"])


# ----------------------------------------------------------------------------------------------
# no host sync on the tensor side


# Ops that read tensor data on the host, or whose output shape depends on the data (a device sync).
HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
              "aten::masked_select", "aten::unique", "aten::_unique2", "aten::allclose", "aten::tolist"}


def test_step_makes_no_host_sync():
    """Profile every step: the only host reads allowed are those of the stability helper, which
    works on a CPU tensor built from the Python float losses (torch.var and the final .item() read
    it). A `.item()`, `bool(tensor)`, `.nonzero()` ... on the parameter side shows up as an extra
    event and fails."""
    def host_reads(fn):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        names = [e.name for e in prof.events()]
        return sorted(n for n in names if n in HOST_READS), names

    model = make_mlp(torch.bfloat16)  # bf16 also runs the 0-d-tensor momentum path
    opt = TrajectoryGuidedOptimizer(model.parameters(), lr=0.05, trajectory_window=12)
    ls = losses(20)
    for step in range(20):
        opt.zero_grad()
        mlp_loss(model, step, torch.bfloat16).backward()
        reads, names = host_reads(lambda: opt.step(current_loss=ls[step]))
        helper_reads, _ = host_reads(lambda: tg.trajectory_stability(list(opt.loss_history)))
        assert reads == helper_reads, (reads, helper_reads)
        assert (len(reads) > 0) == (step >= 9)
        # and the multi-tensor path really ran (3 foreach launches for the single bf16 bucket)
        assert sum(n.startswith("aten::_foreach_") for n in names) == 3, names

    # With no stability read, the step touches no host-read op at all (stability mocked to a constant).
    orig = tg.trajectory_stability
    try:
        tg.trajectory_stability = lambda history: 0.75
        assert host_reads(lambda: opt.step(current_loss=1.0))[0] == []
    finally:
        tg.trajectory_stability = orig


def test_step_raises_on_tensor_reads(monkeypatch):
    """The same guarantee from the Python side: with every host-read method of Tensor patched to
    raise (except inside the stability helper, which reads its own CPU history tensor), a full
    run of steps still goes through."""
    allowed = [False]

    def forbid(name):
        orig = getattr(torch.Tensor, name)

        def guard(self, *a, **k):
            if not allowed[0]:
                raise AssertionError(f"host read Tensor.{name} during step()")
            return orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, guard)

    model = make_mlp(torch.float64)
    opt = TrajectoryGuidedOptimizer(model.parameters(), lr=0.05, trajectory_window=12)
    grads = []
    for step in range(15):
        opt.zero_grad()
        mlp_loss(model, step, torch.float64).backward()
        grads.append([p.grad.clone() for p in model.parameters()])

    orig_stability = tg.trajectory_stability

    def stability(history):
        allowed[0] = True
        try:
            return orig_stability(history)
        finally:
            allowed[0] = False

    monkeypatch.setattr(tg, "trajectory_stability", stability)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "nonzero"):
        forbid(name)
    for step, gs in enumerate(grads):
        for p, g in zip(model.parameters(), gs):
            p.grad = g
        opt.step(current_loss=float(step % 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_no_sync():
    p = [torch.randn(s, device="cuda", requires_grad=True) for s in ((3, 4), (5,), ())]
    opt = TrajectoryGuidedOptimizer(p, lr=0.1, trajectory_window=12)
    for step in range(15):
        for t in p:
            t.grad = torch.randn_like(t)
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step(current_loss=float(step % 3))
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"lr": -1.0}, ValueError, "lr"),
    ({"lr": float("nan")}, ValueError, "lr"),
    ({"lr": float("inf")}, ValueError, "lr"),
    ({"lr": "0.1"}, TypeError, "lr"),
    ({"lr": True}, TypeError, "lr"),
    ({"lr": torch.tensor(0.1)}, TypeError, "lr"),
    ({"trajectory_window": 0}, ValueError, "trajectory_window"),
    ({"trajectory_window": -5}, ValueError, "trajectory_window"),
    ({"trajectory_window": 2.5}, TypeError, "trajectory_window"),
    ({"trajectory_window": True}, TypeError, "trajectory_window"),
])
def test_bad_constructor_args(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TrajectoryGuidedOptimizer([torch.zeros(2, requires_grad=True)], **kwargs)


def test_bad_group_lr_and_loss():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        TrajectoryGuidedOptimizer([{"params": [p], "lr": -0.1}])
    opt = TrajectoryGuidedOptimizer([p])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": -2.0})
    with pytest.raises(TypeError, match="current_loss"):
        opt.step(current_loss="1.0")
    with pytest.raises(TypeError, match="current_loss"):
        opt.step(current_loss=[1.0])
    with pytest.raises(ValueError, match="current_loss"):
        opt.step(current_loss=torch.ones(3))
    assert opt.loss_history == []
    opt.step(current_loss=torch.tensor(2.5))  # a scalar tensor is read (the caller's sync) and recorded
    opt.step(current_loss=3)
    assert opt.loss_history == [2.5, 3.0]
