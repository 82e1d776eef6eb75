"""The harness of bench/quality_kv_eviction.py on a tiny random Llama (no SmolLM2 here): the chunked full cache equals
a plain forward, every policy keeps exactly its budget (and the entries its rule names), the passkey prompt is
well formed. The real-model run is `make quality`."""
import importlib.util
import os

import pytest
import torch

pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("quality_kv_eviction", os.path.join(REPO, "bench", "quality_kv_eviction.py"))
q = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(q)

T, CHUNK, BUDGET = 48, 8, 20


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, max_position_embeddings=256, attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    return model, ids


def test_full_cache_chunked_equals_plain_forward(tiny):
    model, ids = tiny
    with torch.no_grad():
        plain = model(ids).logits
    cache = q.make_cache(model, "full", None, 2)
    chunked = q.run_chunked(model, ids, cache, CHUNK, keep_from=0)
    assert chunked.shape == plain.shape
    torch.testing.assert_close(chunked, plain, atol=2e-5, rtol=1e-4)
    assert cache.live == T and cache.get_seq_length() == T
    # keep_from skips the LM head of earlier chunks but returns the same logits for the kept positions
    tail = q.run_chunked(model, ids, q.make_cache(model, "full", None, 2), CHUNK, keep_from=T // 2 - 1)
    torch.testing.assert_close(tail, plain[:, T // 2 - 1:], atol=2e-5, rtol=1e-4)


def test_budget_at_least_length_never_evicts(tiny):
    model, ids = tiny
    with torch.no_grad():
        plain = model(ids).logits
    for policy in q.DENSE_POLICIES:
        out = q.run_chunked(model, ids, q.make_cache(model, policy, T, 2), CHUNK, keep_from=0)
        torch.testing.assert_close(out, plain, atol=2e-5, rtol=1e-4, msg=policy)


def _run(model, ids, policy, budget=BUDGET):
    cache = q.make_cache(model, policy, budget, ids.shape[0], seed=3)
    out = q.run_chunked(model, ids, cache, CHUNK, keep_from=T - CHUNK)
    return cache, out


@pytest.mark.parametrize("policy", q.DENSE_POLICIES)
def test_dense_policies_keep_exactly_the_budget(tiny, policy):
    model, ids = tiny
    cache, out = _run(model, ids, policy)
    assert torch.isfinite(out).all()
    assert cache.live == BUDGET and cache.get_seq_length() == T
    for li, layer in enumerate(cache.layers):
        assert layer.keys.shape[2] == BUDGET and layer.values.shape[2] == BUDGET
        pos = cache.kept_positions(li)
        assert pos.shape == (2, 2, BUDGET)
        assert (pos.diff(dim=-1) > 0).all(), "kept entries must be distinct and sorted by position"
        assert int(pos.max()) == T - 1  # the newest token always survives the eviction after its forward
    pos = cache.kept_positions(0)
    last = torch.arange(T - BUDGET, T)
    if policy == "window":
        assert (pos == last).all()
    elif policy == "sinks+window":
        assert (pos == torch.cat([torch.arange(q.SINKS), torch.arange(T - BUDGET + q.SINKS, T)])).all()
    elif policy == "h2o":
        assert (pos[..., -(BUDGET // 2):] == last[-(BUDGET // 2):]).all()  # the recent half
        assert (pos[..., : BUDGET - BUDGET // 2] < T - BUDGET // 2).all()  # heavy hitters from the older entries
    elif policy == "random":
        assert not (pos == last).all()
        for li in range(1, len(cache.layers)):  # one draw shared by every layer and head
            assert (cache.kept_positions(li) == pos).all()
        again, _ = _run(model, ids, policy)
        assert (again.kept_positions(0) == pos).all(), "a seeded random policy must be reproducible"


def test_policies_change_the_logits(tiny):
    """Eviction at a small budget must change the predictions (else the harness is not evicting)."""
    model, ids = tiny
    full = q.run_chunked(model, ids, q.make_cache(model, "full", None, 2), CHUNK, keep_from=T - CHUNK)
    for policy in q.DENSE_POLICIES + ("traj a=0.7 (seed)",):
        _, out = _run(model, ids, policy, budget=12)
        assert (out - full).abs().max() > 1e-4, policy


def test_h2o_keeps_heavy_hitters():
    """keep_indices('h2o'): the recent half by position, then the largest accumulated scores."""
    pos = torch.arange(10).expand(1, 1, 10)
    score = torch.tensor([[[5.0, 0.1, 9.0, 0.2, 0.3, 7.0, 0.0, 0.0, 0.0, 0.0]]])
    idx = q.keep_indices("h2o", pos, 6, score=score)
    assert pos.gather(-1, idx).tolist() == [[[0, 2, 5, 7, 8, 9]]]
    with pytest.raises(ValueError, match="score"):
        q.keep_indices("h2o", pos, 6)
    with pytest.raises(ValueError, match="policy"):
        q.keep_indices("lru", pos, 6)


def test_trajectory_policy_keeps_the_budget(tiny):
    model, ids = tiny
    cache, out = _run(model, ids, "traj a=0.7 (seed)")
    assert torch.isfinite(out).all()
    st = cache.stats()
    assert st["seen"] == T and st["live"].tolist() == [BUDGET, BUDGET]
    kept = cache.kept_positions()
    assert kept.shape == (2, BUDGET) and int(kept.max()) == T - 1
    assert cache.alpha == 0.7 and cache.decay == q.DECAY and cache.sinks == 0
    pinned, _ = _run(model, ids, "traj a=0.7 +4 sinks")
    kept = pinned.kept_positions()
    assert kept.shape == (2, BUDGET) and (kept[:, : q.SINKS] == torch.arange(q.SINKS)).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="policy"):
        q.DenseEvictionCache(2, "lru", 8)
    with pytest.raises(ValueError, match="budget"):
        q.DenseEvictionCache(2, "window", None)


class _CharTok:
    """A stand-in tokenizer: one id per character."""

    def __call__(self, s, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [ord(c) for c in s]})()


def test_passkey_prompt_builder():
    tok = _CharTok()
    pos = []
    for depth in (0.1, 0.5, 0.9):
        ids, k = q.passkey_prompt(tok, 1024, 48213, depth)
        text = "".join(map(chr, ids))
        assert len(ids) == 1024 and k == len(" 48213")
        assert text.startswith(q.HEADER) and text.endswith(q.QUESTION + " 48213")
        assert text.count("The pass key is 48213.") == 1
        pos.append(text.index("The pass key is 48213."))
    assert pos[0] < pos[1] < pos[2], "the needle must move deeper with depth"
    batch, k, meta = q.passkey_batch(tok, 3, 1024, seed=0)
    assert batch.shape == (3, 1024) and len({m["key"] for m in meta}) == 3
    assert all(0.1 <= m["depth"] <= 0.9 for m in meta)
    with pytest.raises(ValueError, match="context"):
        q.passkey_prompt(tok, 200, 48213, 0.5)


def _masked_reference(model, ids, kept_before, chunk):
    """One plain forward whose 4-D mask lets each chunk's queries see exactly the entries the cache held before that
    chunk plus the chunk itself (causally). Every token's K/V depends only on what its query saw, so this equals
    the chunked run with eviction, layer by layer."""
    B, T = ids.shape
    mask = torch.full((B, 1, T, T), torch.finfo(torch.float32).min)
    for j, s in enumerate(range(0, T, chunk)):
        e = min(s + chunk, T)
        for b in range(B):
            mask[b, 0, s:e, kept_before[j][b]] = 0.0
        mask[:, 0, s:e, s:e] = torch.where(torch.ones(e - s, e - s).tril().bool(), 0.0, mask[:, 0, s:e, s:e])
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("policy", ["window", "sinks+window", "random", "traj a=0.7 (seed)", "traj a=0.7 +4 sinks"])
def test_evicting_run_equals_masked_forward(tiny, policy):
    """The chunked eviction protocol (RoPE positions, masks, query offsets after eviction) is exactly attention
    restricted to the kept entries: checked against a masked plain forward for the policies with one keep-set."""
    model, ids = tiny
    cache = q.make_cache(model, policy, BUDGET, 2, seed=5)
    kept_before, outs = [], []
    with torch.no_grad():
        for s in range(0, T, CHUNK):
            if isinstance(cache, q.DenseEvictionCache):
                kept = cache.kept_positions(0)[:, 0] if cache.live else torch.empty(2, 0, dtype=torch.long)
            else:  # before the first forward it has no rows yet
                kept = cache.kept_positions() if s else torch.empty(2, 0, dtype=torch.long)
            kept_before.append(kept.clone())
            o = model(ids[:, s:s + CHUNK], past_key_values=cache, use_cache=True)
            if isinstance(cache, q.DenseEvictionCache):
                cache.after_forward(CHUNK)
            outs.append(o.logits)
    assert max(k.shape[1] for k in kept_before) == BUDGET  # evictions did happen
    torch.testing.assert_close(torch.cat(outs, dim=1), _masked_reference(model, ids, kept_before, CHUNK),
                               atol=2e-5, rtol=1e-4)
