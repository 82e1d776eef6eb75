"""trajops.nn.TrajectoryAwareKVCache against a literal replay of the seed class (001, section 2)."""
from __future__ import annotations

import math
import random

import pytest
import torch

from trajops.nn import TrajectoryAwareKVCache


class SeedReplay:
    """The seed's semantics, written from its text: one list in insertion order, relevance
    0.7 cos + 0.3 exp(-0.1 age), the first minimum evicted before each token once full."""

    def __init__(self, cap):
        self.cap, self.keys, self.values, self.trajs, self.ts, self.now = cap, [], [], [], [], 0

    def relevance(self, t):
        out = []
        for e, ts in zip(self.trajs, self.ts):
            cos = float(torch.dot(t, e) / (max(float(t.norm()), 1e-8) * max(float(e.norm()), 1e-8)))
            out.append(0.7 * cos + 0.3 * math.exp(-0.1 * (self.now - ts)))
        return out

    def update(self, keys, values, t):
        for key, value in zip(keys, values):
            if len(self.keys) >= self.cap:
                r = self.relevance(t)
                i = min(range(len(r)), key=lambda j: (r[j], j))
                for lst in (self.keys, self.values, self.trajs, self.ts):
                    del lst[i]
            self.keys.append(key)
            self.values.append(value)
            self.trajs.append(t.clone())
            self.ts.append(self.now)
        self.now += 1


@pytest.mark.parametrize("cap", [1, 7, 33])
def test_matches_seed_replay(cap):
    E = 4
    rng = random.Random(cap)
    gen = torch.Generator().manual_seed(cap)
    # a small bank (plus the zero vector) so that exact ties happen and the tie rule decides
    # and tiny trajectories (0 < |t| < eps = 1e-8: cos(t, t) < 1, so the seed may evict a token of
    # the same call)
    bank = [torch.randn(E, generator=gen) for _ in range(5)] + [torch.zeros(E)]
    bank += [3e-9 * torch.randn(E, generator=gen) for _ in range(2)]
    ours, seed = TrajectoryAwareKVCache(cap, E), SeedReplay(cap)
    counter = 0
    for step in range(300):
        B, S = rng.choice([(1, 1), (2, 3), (1, cap + 1), (0, 2)])
        t = rng.choice(bank)
        ids = torch.arange(counter, counter + B * S, dtype=torch.float32)
        counter += B * S
        keys = ids.view(B, S, 1).expand(B, S, E).contiguous()
        ours.update_cache(keys, keys + 0.5, t)
        seed.update([int(x) for x in ids], [int(x) for x in ids], t.double())
        assert ours.current_time == seed.now
        q = rng.choice(bank)
        r = seed.relevance(q.double())
        top_k = rng.choice([None, 0, 1, 3, 10 * cap])
        got_k, got_v = ours.get_relevant_cache(q, top_k=top_k)
        order = sorted(range(len(r)), key=lambda j: (-r[j], j))  # ties -> older entry
        want = [seed.keys[j] for j in order][: len(r) if top_k is None else min(top_k, len(r))]
        assert [int(x) for x in got_k[:, 0]] == want, step
        assert torch.equal(got_v, got_k + 0.5)
        rel = ours.compute_cache_relevance(q)
        torch.testing.assert_close(rel.double(), torch.tensor(r, dtype=torch.float64), atol=1e-6, rtol=0)


def test_empty_and_bad_inputs():
    c = TrajectoryAwareKVCache(4, 3)
    k, v = c.get_relevant_cache(torch.ones(3))
    assert k.shape == (0, 3) and v.shape == (0, 3)
    assert c.compute_cache_relevance(torch.ones(3)).numel() == 0
    with pytest.raises(ValueError, match="max_cache_size"):
        TrajectoryAwareKVCache(0, 3)
    with pytest.raises(ValueError, match="new_keys and new_values"):
        c.update_cache(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="current_trajectory"):
        c.update_cache(torch.ones(1, 2, 3), torch.ones(1, 2, 3), torch.ones(4))


def test_tiny_trajectory_evicts_as_the_seed():
    # issue 20, item 5: the seed evicts its own first new token here (0.7 * 0.02 + 0.3 < 0.7 * 0.1 + 0.3 * 0.905)
    ours, seed = TrajectoryAwareKVCache(2, 2), SeedReplay(2)
    old, new = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]]), torch.tensor([[[3.0, 3.0], [4.0, 4.0]]])
    for keys, t in ((old, torch.tensor([1.0, 0.0])), (new, torch.tensor([1e-9, 1e-9]))):
        ours.update_cache(keys, keys, t)
        seed.update([int(x) for x in keys[0, :, 0]], [0, 0], t.double())
    got, _ = ours.get_relevant_cache(torch.tensor([1.0, 0.0]))
    assert sorted(int(x) for x in got[:, 0]) == sorted(seed.keys) == [2, 4]
