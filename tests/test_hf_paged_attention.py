"""attn_implementation="trajops_paged": attention read from a TrajectoryEvictionCache's page pools (no gather).

Oracles: transformers' default cache + SDPA (nothing evicted), and the gather path of the same cache (its update
returns the kept entries, which SDPA attends): same kept set, so the same tokens and (to fp32 rounding) logits.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from conftest import left_padded_prompt, load_smollm2  # noqa: E402

import trajops.kv_attention  # noqa: E402
from trajops import PagedTrajectoryKVCache  # noqa: E402
from trajops.hf import PAGED_ATTENTION, TrajectoryEvictionCache  # noqa: E402
from trajops.kv_forward import ForwardKVCache  # noqa: E402

PROMPT = [7, 4]  # real tokens per row; row 1 is left padded to 7


def tiny(attn: str = PAGED_ATTENTION):
    # initializer_range 0.2 spreads the logits: greedy/beam choices are not decided by rounding
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                      attn_implementation=attn, pad_token_id=0, initializer_range=0.2)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models():
    paged, sdpa = tiny(), tiny("sdpa")
    assert torch.equal(paged.lm_head.weight, sdpa.lm_head.weight)
    return paged, sdpa


def padded_prompt():
    return left_padded_prompt(PROMPT)


class Spy:
    """Counts the paged attention calls and the gathers (store.read_slots) while active."""

    def __init__(self, monkeypatch):
        self.attend = self.gather = 0
        orig_attend, orig_read = trajops.kv_attention.attend_old_and_new, PagedTrajectoryKVCache.read_slots

        def attend(*a, **k):
            self.attend += 1
            return orig_attend(*a, **k)

        def read_slots(store, *a, **k):
            self.gather += 1
            return orig_read(store, *a, **k)

        monkeypatch.setattr(trajops.kv_attention, "attend_old_and_new", attend)
        monkeypatch.setattr(PagedTrajectoryKVCache, "read_slots", read_slots)


def generate(model, ids, mask, new, cache=None, seed=None, **kw):
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, past_key_values=cache,
                         return_dict_in_generate=True, output_logits=True, **kw)
    return out.sequences, torch.stack(out.logits)


def evicting(model, capacity, mask, paged=None, **kw):
    cache = TrajectoryEvictionCache(model.config, capacity, page_size=4, paged_attention=paged, **kw)
    return cache if mask is None else cache.mark_padding(mask)


# ---------------------------------------------------------------------------------------------- generate
def test_generate_equals_default_cache_at_full_capacity_without_gathering(models, monkeypatch):
    paged, sdpa = models
    ids, mask = padded_prompt()
    new = 20
    ref, ref_logits = generate(sdpa, ids, mask, new, DynamicCache(config=sdpa.config), do_sample=False)
    spy = Spy(monkeypatch)
    cache = evicting(paged, ids.shape[1] + new, mask)
    out, logits = generate(paged, ids, mask, new, cache, do_sample=False)
    assert cache.uses_paged_attention
    assert spy.attend == new * 2 and spy.gather == 0  # every layer of every forward, no dense copy
    assert torch.equal(out, ref)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert int(cache.stats()["evicted_total"].sum()) == 0


@pytest.mark.parametrize("mode", ["greedy", "sample", "beams"])
def test_with_eviction_equals_the_gather_path(models, monkeypatch, mode):
    paged, _ = models
    ids, mask = padded_prompt()
    new, cap = 24, 10  # 10 kept of 31 (row 1 keeps its 3 padding entries pinned)
    kw = {"greedy": dict(do_sample=False), "sample": dict(do_sample=True, top_k=0, top_p=1.0),
          "beams": dict(do_sample=False, num_beams=2, num_return_sequences=2)}[mode]
    gather_cache = evicting(paged, cap, mask, paged=False)
    ref, ref_logits = generate(paged, ids, mask, new, gather_cache, seed=5, **kw)
    spy = Spy(monkeypatch)
    cache = evicting(paged, cap, mask)
    out, logits = generate(paged, ids, mask, new, cache, seed=5, **kw)
    assert spy.gather == 0 and spy.attend > 0
    assert torch.equal(out, ref)
    # the logits of every forward: the paged attention equals SDPA on the gathered kept entries
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(cache.kept_positions(), gather_cache.kept_positions())
    assert int(cache.stats()["evicted_total"].sum()) > 0


def test_beams_at_full_capacity_equal_the_default_cache(models):
    paged, sdpa = models
    ids, mask = padded_prompt()
    ref, _ = generate(sdpa, ids, mask, 10, do_sample=False, num_beams=2)
    out, _ = generate(paged, ids, mask, 10, evicting(paged, 17, mask, max_batch_size=4), do_sample=False, num_beams=2)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("cap", [32, 6])
def test_chunked_prefill_is_causal(models, cap):
    """Forwards of n > 1 tokens after a non-empty cache: causal among the new tokens, all old entries visible."""
    paged, sdpa = models
    ids = torch.randint(1, 128, (2, 13), generator=torch.Generator().manual_seed(3))
    caches = {"paged": evicting(paged, cap, None), "gather": evicting(paged, cap, None, paged=False)}
    got = {}
    with torch.no_grad():
        for name, cache in caches.items():
            got[name] = torch.cat([paged(ids[:, a:b], past_key_values=cache).logits
                                   for a, b in ((0, 5), (5, 9), (9, 12), (12, 13))], dim=1)
        full = sdpa(ids).logits
    torch.testing.assert_close(got["paged"], got["gather"], atol=1e-4, rtol=1e-4)
    if cap >= ids.shape[1]:  # nothing evicted: the chunks together are one causal forward
        torch.testing.assert_close(got["paged"], full, atol=1e-4, rtol=1e-4)
    else:
        assert not torch.allclose(got["paged"][:, -1], full[:, -1], atol=1e-3)  # the eviction did matter


def test_fallback_to_sdpa_without_an_eviction_cache(models):
    paged, sdpa = models
    ids, mask = padded_prompt()
    ref, _ = generate(sdpa, ids, mask, 8, do_sample=False)
    out, _ = generate(paged, ids, mask, 8, DynamicCache(config=paged.config), do_sample=False)
    assert torch.equal(out, ref)
    with torch.no_grad():
        torch.testing.assert_close(paged(ids, attention_mask=mask, use_cache=False).logits[mask.bool()],
                                   sdpa(ids, attention_mask=mask, use_cache=False).logits[mask.bool()])


def test_the_cache_follows_the_models_attention_implementation():
    model = tiny("sdpa")
    cache = TrajectoryEvictionCache(model.config, 8)
    assert not cache.uses_paged_attention
    model.config._attn_implementation = PAGED_ATTENTION
    assert cache.uses_paged_attention
    assert not TrajectoryEvictionCache(model.config, 8, paged_attention=False).uses_paged_attention
    with pytest.raises(TypeError, match="paged_attention"):
        TrajectoryEvictionCache(model.config, 8, paged_attention="yes")


# ---------------------------------------------------------------------------------------------- ForwardKVCache
def _kv(B, Hkv, n, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hkv, n, D, generator=g, dtype=dtype), torch.randn(B, Hkv, n, D, generator=g, dtype=dtype),
            torch.randn(B, 2 * Hkv, n, D, generator=g, dtype=dtype))


def _sdpa_on_gathered(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)


@pytest.mark.parametrize("with_mask", [False, True])
def test_attend_equals_sdpa_on_what_update_gathers(with_mask):
    """Forwards of 3, 4, 1, 5, 1 tokens into capacity 6 (page 2), 3 layers: evictions inside forwards, GQA."""
    B, Hkv, D, L, cap = 2, 2, 8, 3, 6
    a, b = ForwardKVCache(L, cap, D, page_size=2), ForwardKVCache(L, cap, D, page_size=2)
    seed = 0
    for n in (3, 4, 1, 5, 1):
        live = a.live
        causal = torch.ones(n, live + n, dtype=torch.bool).tril(live)
        mask = causal.expand(B, 1, n, live + n).clone()
        if with_mask:
            mask[0, :, :, : min(live, 2)] = False  # row 0 hides its 2 oldest entries (as padding would be)
        for layer in range(L):
            k, v, q = _kv(B, Hkv, n, D, seed)
            seed += 1
            kk, vv = b.update(k, v, layer)
            ref = _sdpa_on_gathered(q, kk, vv, mask)
            a.stage(k, v, layer)
            got = a.attend(q, layer, attn_mask=mask if with_mask else None)
            torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    assert torch.equal(a.kept_positions(), b.kept_positions()) and a.seen == b.seen == 14


def test_attend_of_rows_without_any_key_is_zero_not_nan():
    c = ForwardKVCache(1, 4, 4)
    k, v, q = _kv(1, 1, 2, 4, 0, torch.float32)
    c.stage(k, v, 0)
    out = c.attend(q, 0, attn_mask=torch.zeros(1, 1, 2, 2, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))


def test_attend_refuses_a_mask_that_differs_between_queries_over_old_entries():
    """The paged op masks old entries per key: a per-query (or per-head) pattern there must not be read from one row."""
    c = ForwardKVCache(1, 8, 4)
    k, v, q = _kv(1, 1, 3, 4, 0, torch.float32)
    c.stage(k, v, 0)
    c.attend(q, 0)  # 3 old entries now
    k, v, q = _kv(1, 1, 2, 4, 1, torch.float32)
    mask = torch.ones(1, 1, 2, 5, dtype=torch.bool).tril(3)
    mask[0, 0, 0, 1] = False  # only the first query hides old entry 1
    c.stage(k, v, 0)
    with pytest.raises(NotImplementedError, match="differs between queries or heads"):
        c.attend(q, 0, attn_mask=mask)
    mask[0, 0, 1, 1] = False  # the same key hidden for every query: a key-padding pattern, accepted
    out = c.attend(q, 0, attn_mask=mask)
    assert out.shape[2:] == (2, 4) and torch.isfinite(out).all()


def test_protocol_errors():
    c = ForwardKVCache(2, 4, 4)
    k, v, q = _kv(1, 1, 2, 4, 0, torch.float32)
    with pytest.raises(RuntimeError, match="was not staged"):
        c.attend(q, 0)
    with pytest.raises(RuntimeError, match="inference only"):
        c.stage(k.requires_grad_(), v, 0)
    k = k.detach()
    c.stage(k, v, 0)
    with pytest.raises(RuntimeError, match="cannot select rows"):
        c.select_rows(torch.tensor([0]))
    with pytest.raises(ValueError, match="query must be"):
        c.attend(q[:, :, :1], 0)
    with pytest.raises(ValueError, match="attn_mask must be bool"):
        c.attend(q, 0, attn_mask=torch.ones(1, 1, 2, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="staged but never attended"):
        c.stage(k, v, 1)
    c.attend(q, 0)
    with pytest.raises(RuntimeError, match="update\\(\\) or stage\\(\\)"):
        c.update(k, v, 1)


def test_attention_function_errors(models):
    paged, _ = models
    from trajops.hf_attention import paged_attention_forward, tag_keys
    cache = TrajectoryEvictionCache(paged.config, 8)
    k, v, q = _kv(1, 2, 2, 16, 0, torch.float32)
    cache.update(k, v, 0)  # stages: the config says trajops_paged
    attn = paged.model.layers[0].self_attn
    with pytest.raises(TypeError, match="must be bool"):
        paged_attention_forward(attn, q, tag_keys(cache, k), v, torch.zeros(1, 1, 2, 2), scaling=0.25)
    with pytest.raises(NotImplementedError, match="softcap"):
        paged_attention_forward(attn, q, tag_keys(cache, k), v, None, softcap=30.0)


# ---------------------------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_real_smollm2_tokens_equal_the_default_cache():
    model = load_smollm2()
    ids = torch.randint(100, 10000, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    new = 6  # a short run: this test loads the real model in the C++ CI pass
    ref, _ = generate(model, ids, mask, new, do_sample=False)
    model.set_attn_implementation(PAGED_ATTENTION)
    cache = TrajectoryEvictionCache(model.config, ids.shape[1] + new, max_batch_size=2).mark_padding(mask)
    assert cache.uses_paged_attention
    out, _ = generate(model, ids, mask, new, cache, do_sample=False)
    assert torch.equal(out, ref)
