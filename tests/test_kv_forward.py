"""trajops.kv_forward.ForwardKVCache without transformers (the hf tests cover it through generate())."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from trajops.kv_forward import ForwardKVCache

H, D = 2, 4


def forward(cache, n, B=1):
    """One forward of n tokens through both layers; keys' channel 0 = 1000 * layer + position. Returns layer 1's."""
    start = cache.seen
    for layer in range(2):
        k = torch.zeros(B, H, n, D)
        k[..., 0] = 1000.0 * layer + start + torch.arange(n, dtype=torch.float32)
        rk, rv = cache.update(k, -k, layer)
        assert torch.equal(rk[:, :, -n:], k) and torch.equal(rv, -rk)
    return (rk[:, 0, :, 0] - 1000.0).long()


def test_update_returns_old_in_position_order_then_new():
    cache = ForwardKVCache(2, 3, D, page_size=2, alpha=0.0, max_batch_size=2)  # recency: a sliding window
    assert forward(cache, 2).tolist() == [[0, 1]]
    assert (cache.seen, cache.live) == (2, 2)
    assert forward(cache, 2).tolist() == [[0, 1, 2, 3]]  # this forward still sees everything
    assert cache.kept_positions().tolist() == [[1, 2, 3]] and (cache.seen, cache.live) == (4, 3)
    assert forward(cache, 1).tolist() == [[1, 2, 3, 4]]
    assert cache.kept_positions().tolist() == [[2, 3, 4]]
    cache.repeat_rows(2)
    assert forward(cache, 1, B=2).tolist() == [[2, 3, 4, 5]] * 2
    assert cache.stats()["live"].tolist() == [3, 3] and cache.kv_bytes() == 2 * 2 * 2 * 2 * 2 * H * D * 4
    cache.reset()
    assert cache.seen == 0 and cache.kv_bytes() == 0 and not cache.is_initialized


def test_bad_arguments_name_the_class():
    with pytest.raises(ValueError, match="ForwardKVCache: num_layers"):
        ForwardKVCache(0, 4, D)
    with pytest.raises(ValueError, match="ForwardKVCache: traj_dim"):
        ForwardKVCache(2, 4, 0)
    cache = ForwardKVCache(2, 4, D)
    with pytest.raises(RuntimeError, match="expected layer 0"):
        cache.update(torch.zeros(1, H, 1, D), torch.zeros(1, H, 1, D), 1)


def test_import_does_not_import_transformers():
    code = "import sys, trajops.kv_forward; assert 'transformers' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_later_layers_launch_directly_where_triton_runs(monkeypatch):
    """stage + attend: layer 0 of a forward goes through the paged op (its checks); the later layers, whose calls
    match layer 0's in every shape, device and scale, call the Triton launcher directly where the op runs Triton
    (the interpreter here), and nowhere else. Outputs equal the all-through-the-op run bit for bit."""
    import trajops
    import trajops.kv_attention as KA

    triton_cpu = trajops.backends()["cpu"] == "triton-interpreter"
    assert (KA._direct_launcher(torch.device("cpu")) is not None) == triton_cpu
    op_calls = []
    real_op = torch.ops.trajops.paged_temperature_attention

    def spy(*args, **kwargs):
        op_calls.append(1)
        return real_op(*args, **kwargs)
    monkeypatch.setitem(torch.ops.trajops.__dict__, "paged_temperature_attention", spy)

    def run(allow_direct):
        if not allow_direct:
            monkeypatch.setattr(KA, "_direct_launcher", lambda device: None)
        gen = torch.Generator().manual_seed(3)
        c = ForwardKVCache(3, 6, 4, max_batch_size=2)
        outs = []
        with torch.no_grad():
            for n in (4, 1, 1, 2, 1):  # capacity 6: the last forwards evict
                for layer in range(3):
                    k, v = torch.randn(2, 2, n, 4, generator=gen), torch.randn(2, 2, n, 4, generator=gen)
                    c.stage(k, v, layer)
                    outs.append(c.attend(torch.randn(2, 4, n, 4, generator=gen), layer, scale=0.5))
        return outs

    fast = run(True)
    fast_calls = len(op_calls)
    slow = run(False)
    # 4 forwards with old entries: on Triton only their layer 0 goes through the op, elsewhere all 3 layers
    assert fast_calls == (4 if triton_cpu else 12)
    assert len(op_calls) - fast_calls == 12
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_store_writes_directly_where_triton_runs():
    """PagedTrajectoryKVCache writes K/V with the Triton launcher directly where kv_write_ runs Triton (its append
    has checked what the op would), the op elsewhere; the pools end equal to an op-only store's bit for bit."""
    import trajops
    from trajops.kv_cache import PagedTrajectoryKVCache

    def run(direct):
        gen = torch.Generator().manual_seed(7)
        c = PagedTrajectoryKVCache(2, 6, 4, 2, 8, 4, 2, 9)
        assert (c._direct_write is not None) == (trajops.backends()["cpu"] == "triton-interpreter")
        if not direct:
            c._direct_write = None
        for n in (5, 1, 3, 1, 1, 4):
            traj = torch.randn(2, n, 4, generator=gen)
            for layer in range(2):
                k = torch.randn(2, 2, n, 8, generator=gen)
                c.append(layer, k, k.transpose(2, 3).contiguous().transpose(2, 3) * 2, traj)  # v: other strides
            c.step()
        return c

    a, b = run(True), run(False)
    assert torch.equal(a.k_pool, b.k_pool) and torch.equal(a.v_pool, b.v_pool)
    assert torch.equal(a.live_pool, b.live_pool) and torch.equal(a.pos_pool, b.pos_pool)
