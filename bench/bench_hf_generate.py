"""End-to-end ``model.generate()`` with ``trajops.hf.TrajectoryEvictionCache`` vs transformers' default
dense cache (DynamicCache): time per call (-> tokens/s) and peak memory.

Model: a random-weight LlamaForCausalLM built from a config (no download), fixed seed, eval, SDPA
attention; batch 2 of random prompts (row 1 left-padded by a quarter of the prompt), greedy
decoding of a fixed number of new tokens (min_new_tokens = max_new_tokens, so both providers
produce the same count). The eviction cache holds 25 % of the total length.
CPU: hidden 256, 4 layers, 8 heads / 2 KV heads, prompt 128 + 384 new (capacity 128), fp32.
CUDA: hidden 1024, 8 layers, 16 heads / 4 KV heads, prompt 256 + 768 new (capacity 256), bf16.
(The padded prompt must fit the capacity: the cache pins the padding, see trajops.hf.)

Providers (roles in harness.py): eager = the default dense DynamicCache (past_key_values=None);
target = the eviction cache with SDPA (its update gathers the kept entries for every layer);
trajops_paged (other) = the same cache with attn_implementation="trajops_paged" (the attention reads the page
pools, no gather; trajops/hf_attention.py), the same weights. Peak memory is the harness's: bytes above the level
at the start of the call, so the caches' growth (dense) or pools (eviction) and activations, not the weights.
tokens/s = B * new tokens / median time; the case label carries the token count.
"""
from __future__ import annotations

import torch

from harness import Case, Context, Provider

OP = "hf_generate"


def _model(cfg_kw, dtype, device, attn="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same weights for every attention implementation
    cfg = LlamaConfig(**cfg_kw, attn_implementation=attn)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval(), cfg


def benchmarks(ctx: Context):
    try:
        import transformers  # noqa: F401
        from trajops.hf import TrajectoryEvictionCache
    except ImportError as err:
        print(f"    [{OP}] skipped: {err} (pip install 'trajops[hf]')", flush=True)
        return []
    dev = ctx.device
    if dev.type == "cuda":
        cfg_kw = dict(vocab_size=4096, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=4, intermediate_size=2816, max_position_embeddings=4096)
        prompt, new, dtype = 256, 768, torch.bfloat16
    else:
        cfg_kw = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=512, max_position_embeddings=2048)
        prompt, new, dtype = 128, 384, torch.float32
    if ctx.quick:
        prompt, new = 16, 48
    cfg_kw.update(pad_token_id=0, eos_token_id=None, bos_token_id=None)
    model, cfg = _model(cfg_kw, dtype, dev)
    paged_model, paged_cfg = _model(cfg_kw, dtype, dev, attn="trajops_paged")  # registered by trajops.hf
    B = 2
    capacity = (prompt + new) // 4
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg.vocab_size, (B, prompt), generator=gen)
    mask = torch.ones(B, prompt, dtype=torch.long)
    pad = prompt // 4
    ids[1, :pad] = 0
    mask[1, :pad] = 0
    ids, mask = ids.to(dev), mask.to(dev)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)

    def dense(*_):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, **kw)

    def evicting(*_):
        cache = TrajectoryEvictionCache(cfg, capacity, max_batch_size=B, device=dev, dtype=dtype).mark_padding(mask)
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, past_key_values=cache, **kw)

    def paged(*_):
        cache = TrajectoryEvictionCache(paged_cfg, capacity, max_batch_size=B, device=dev,
                                        dtype=dtype).mark_padding(mask)
        with torch.no_grad():
            return paged_model.generate(ids, attention_mask=mask, past_key_values=cache, **kw)

    toks = B * new
    case = Case(OP, f"LlamaForCausalLM {cfg.num_hidden_layers}L h={cfg.hidden_size} B={B} prompt={prompt} "
                    f"new={new} ({toks} tokens) capacity={capacity}", dtype, lambda: (), modes=("fwd",),
                info={"B": B, "prompt": prompt, "new_tokens": new, "capacity": capacity, "tokens": toks,
                      "config": cfg_kw})
    provs = [
        Provider("eager", "default dense cache (DynamicCache)", dense, role="eager",
                 note=f"model.generate(ids, attention_mask, greedy, {new} new tokens): transformers' default cache"),
        Provider("trajops", f"TrajectoryEvictionCache @ 25% (capacity {capacity})", evicting, role="target",
                 note="model.generate(..., past_key_values=TrajectoryEvictionCache(cfg, capacity).mark_padding(mask)); "
                      "the cache is built inside the timed call"),
        Provider("trajops_paged", "TrajectoryEvictionCache @ 25% + attn 'trajops_paged'", paged,
                 note="as trajops, on a model with attn_implementation='trajops_paged': the attention reads the "
                      "page pools (paged_temperature_attention + causal new tokens, lse merge), no gather"),
    ]
    return [(case, provs)]
