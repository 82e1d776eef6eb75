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
