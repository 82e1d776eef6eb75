"""End-to-end ``model.generate()`` with ``trajops.hf.TrajectoryEvictionCache`` vs transformers' default
dense cache (DynamicCache): time (-> tokens/s) and peak memory. Two kinds of case:

**Short generation** (time per whole call). A random-weight LlamaForCausalLM built from a config (no
download), fixed seed, eval; batch 2 of random prompts (row 1 left-padded by a quarter of the prompt),
greedy decoding of a fixed number of new tokens (min_new_tokens = max_new_tokens, so every provider
produces the same count). The eviction cache holds 25 % of the total length. tokens/s = B * new tokens /
median time; the case label carries the token count.
CPU: hidden 256, 4 layers, 8 heads / 2 KV heads, prompt 128 + 384 new (capacity 128), fp32.
CUDA: hidden 1024, 8 layers, 16 heads / 4 KV heads, prompt 256 + 768 new (capacity 256), bf16.
(The padded prompt must fit the capacity: the cache pins the padding, see trajops.hf.)

**Context sweep** "context 1k / 4k / 8k" (decode time per token, the prefill taken out). Batch 1, an
unpadded prompt of N = 1024 / 4096 / 8192 random tokens, then D greedy tokens (D = 64 on CPU and on
CUDA); eviction capacity N // 4. Each sample times generate(max_new_tokens=1 + D) and, right after it,
generate(max_new_tokens=1) (the prefill and the first token), and reports their difference / D: the time
per decoded token at that context (harness ``Provider.subtract`` / ``per``). The ratio column is thus
decode time per token evicting/dense; decode tokens/s = 1000 / (ms per token). The results also keep the
two calls' medians (``total_median_ms``, ``subtracted_median_ms`` = the prefill). Peak memory is the
harness's for generate(1 + D): at long contexts it is the prefill's activations, so the K/V bytes at the
end of the call are recorded apart in the case info (dense: the DynamicCache at N + D tokens, computed;
eviction: the page pools, ``cache.kv_bytes()``). ``python bench/bench_hf_generate.py <result.json>``
prints these per provider (see :func:`summary`).
CPU model: the short case's (4 layers, h=256), positions up to 8192 + D. A SmolLM2-sized model (30
layers) was measured first: ~13 s for one 1k-token prefill on 2 shared cores, so the sweep's 8k calls
(~14 per provider, each > 100 s) would take over an hour, not the ~2 minutes allowed. Measure on an idle
machine: under load (2 torch threads, other processes busy) the dense SDPA decode step slowed ~5x (1k
context: 25-50 ms/token, 3-6 ms with 1 thread) while the paged path barely moved, so a loaded run
flatters the eviction cache.
CUDA model: SmolLM2-135M's architecture (30 layers, hidden 576, 9 query heads over 3 KV heads, head dim
64, intermediate 1536, vocab 49152, rope theta 1e5, tied embeddings), random weights, bf16: speed does not
depend on the weights, and the GGUF file cannot travel to a GPU box.
--quick: the short case at prompt 16 + 48, one sweep case at N = 64, D = 16.

Providers (roles in harness.py): eager = the default dense DynamicCache (past_key_values=None);
target = the eviction cache with SDPA (its update gathers the kept entries for every layer);
trajops_paged (other) = the same cache with attn_implementation="trajops_paged" (the attention reads the page
pools, no gather; trajops/hf_attention.py), the same weights. Peak memory is the harness's: bytes above the level
at the start of the call, so the caches' growth (dense) or pools (eviction) and activations, not the weights.
"""
from __future__ import annotations

import json
import sys

import torch

from harness import Case, Context, Provider, fmt_ms

OP = "hf_generate"

# SmolLM2-135M(-Instruct)'s architecture (its config.json), for the CUDA sweep.
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               head_dim=64, intermediate_size=1536, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
               hidden_act="silu")
CONTEXTS = (1024, 4096, 8192)
SPECIAL = dict(pad_token_id=0, eos_token_id=None, bos_token_id=None)  # no EOS: every call decodes all its tokens


def _model(cfg_kw, dtype, device, attn="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same weights for every attention implementation
    cfg = LlamaConfig(**cfg_kw, attn_implementation=attn)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval(), cfg


def _pair(cfg_kw, dtype, device):
    """{"sdpa": (model, cfg), "trajops_paged": (model, cfg)}: one set of weights, two attention implementations."""
    return {attn: _model(cfg_kw, dtype, device, attn) for attn in ("sdpa", "trajops_paged")}  # paged: via trajops.hf


def _generate(model, ids, mask, new, cache):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False)


def _short_case(models, cfg_kw, dtype, dev, prompt, new):
    """Today's case: batch 2 with left padding, time per whole generate call."""
    from trajops.hf import TrajectoryEvictionCache

    (model, cfg), (paged_model, paged_cfg) = models["sdpa"], models["trajops_paged"]
    B = 2
    capacity = (prompt + new) // 4
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg.vocab_size, (B, prompt), generator=gen)
    mask = torch.ones(B, prompt, dtype=torch.long)
    pad = prompt // 4
    ids[1, :pad] = 0
    mask[1, :pad] = 0
    ids, mask = ids.to(dev), mask.to(dev)

    def dense(*_):
        return _generate(model, ids, mask, new, None)

    def evicting(*_):
        cache = TrajectoryEvictionCache(cfg, capacity, max_batch_size=B, device=dev, dtype=dtype).mark_padding(mask)
        return _generate(model, ids, mask, new, cache)

    def paged(*_):
        cache = TrajectoryEvictionCache(paged_cfg, capacity, max_batch_size=B, device=dev,
                                        dtype=dtype).mark_padding(mask)
        return _generate(paged_model, ids, mask, new, cache)

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
    return case, provs


def _ctx_name(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _context_case(models, cfg_kw, dtype, dev, n, d):
    """Batch 1, unpadded prompt of n tokens, d decoded tokens; the providers report decode time per token."""
    from trajops.hf import TrajectoryEvictionCache

    (model, cfg), (paged_model, paged_cfg) = models["sdpa"], models["trajops_paged"]
    capacity = n // 4
    ids = torch.randint(1, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(1)).to(dev)
    mask = torch.ones_like(ids)
    heads_kv = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elt = torch.empty((), dtype=dtype).element_size()
    info = {"B": 1, "prompt": n, "decoded": d, "capacity": capacity, "config": cfg_kw,
            "metric": "decode ms per token = (generate(1 + D) - generate(1)) / D, paired in each sample",
            # what the caches hold at the end of generate(1 + D): K and V of every layer
            "kv_bytes": {"eager": 2 * cfg.num_hidden_layers * heads_kv * head_dim * (n + d) * elt}}

    def call(m, c, kind):
        def fn(new):
            cache = None if kind == "eager" else TrajectoryEvictionCache(c, capacity, max_batch_size=1, device=dev,
                                                                          dtype=dtype)
            out = _generate(m, ids, mask, new, cache)
            if cache is not None:  # the pools' size is fixed at the first update: recording it costs nothing
                info["kv_bytes"][kind] = cache.kv_bytes()
            return out
        return fn

    def prov(name, label, role, fn, note):
        return Provider(name, label, lambda *_: fn(1 + d), role=role, backward=False,
                        subtract=lambda *_: fn(1), per=d,
                        note=note + f"; decode ms/token = (generate(max_new_tokens={1 + d}) - "
                                    f"generate(max_new_tokens=1)) / {d}")

    case = Case(OP, f"context {_ctx_name(n)}: LlamaForCausalLM {cfg.num_hidden_layers}L h={cfg.hidden_size} B=1 "
                    f"prompt={n} + {d} decoded, capacity={capacity}; ms per decoded token", dtype, lambda: (),
                modes=("fwd",), info=info)
    provs = [
        prov("eager", "default dense cache (DynamicCache)", "eager", call(model, cfg, "eager"),
             "model.generate(ids, greedy): transformers' default cache, SDPA"),
        prov("trajops", f"TrajectoryEvictionCache @ 25% (capacity {capacity})", "target",
             call(model, cfg, "trajops"), "TrajectoryEvictionCache(cfg, n // 4) built inside the call, SDPA on the "
                                          "gathered kept entries"),
        prov("trajops_paged", "TrajectoryEvictionCache @ 25% + attn 'trajops_paged'", "other",
             call(paged_model, paged_cfg, "trajops_paged"), "the same cache, attn_implementation='trajops_paged' "
                                                             "(reads the page pools, no gather)"),
    ]
    return case, provs


def benchmarks(ctx: Context):
    try:
        import transformers  # noqa: F401
        import trajops.hf  # noqa: F401  (registers the "trajops_paged" attention)
    except ImportError as err:
        print(f"    [{OP}] skipped: {err} (pip install 'trajops[hf]')", flush=True)
        return []
    dev = ctx.device
    if dev.type == "cuda":
        short_kw = dict(vocab_size=4096, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                        num_key_value_heads=4, intermediate_size=2816, max_position_embeddings=4096)
        prompt, new, dtype, d = 256, 768, torch.bfloat16, 64  # 64 tokens: the sweep must fit make gpu
        sweep_kw = dict(SMOLLM2)
    else:
        short_kw = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=2, intermediate_size=512, max_position_embeddings=2048)
        prompt, new, dtype, d = 128, 384, torch.float32, 64
        sweep_kw = None  # the short case's model, with room for the longest context
    contexts = CONTEXTS
    if ctx.quick:
        # D = 16, not 4: the difference of two calls must stay positive on a loaded machine
        prompt, new, contexts, d = 16, 48, (64,), 16
    short_kw.update(SPECIAL)
    if sweep_kw is None:
        short_kw["max_position_embeddings"] = max(short_kw["max_position_embeddings"], max(contexts) + d)
        sweep_kw = short_kw
    else:
        sweep_kw.update(SPECIAL, max_position_embeddings=max(contexts) + d)
    short_models = _pair(short_kw, dtype, dev)
    sweep_models = short_models if sweep_kw is short_kw else _pair(sweep_kw, dtype, dev)
    items = [_short_case(short_models, short_kw, dtype, dev, prompt, new)]
    items += [_context_case(sweep_models, sweep_kw, dtype, dev, n, d) for n in contexts]
    return items


def summary(doc: dict) -> str:
    """Markdown table of the context sweep in a result document: decode ms/token (IQR), decode tokens/s,
    the prefill (generate(1)) ms, ratio to the dense cache, peak MiB of generate(1 + D), K/V MiB at the end."""
    lines = [f"{doc['host_kind']} ({doc['device']}), torch {doc['torch']}, {doc['date']}", "",
             "| case | cache | decode ms/token (IQR) | decode tok/s | vs dense | prefill ms | peak MiB | K/V MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for e in doc["results"]:
        if e["op"] != OP or "decoded" not in e["info"]:
            continue
        dense = e["providers"].get("eager", {}).get("median_ms")
        for name, r in e["providers"].items():
            if "median_ms" not in r:
                lines.append(f"| {e['case'].split(':')[0]} | {name} | {r.get('error', r.get('skipped'))} |" + " |" * 5)
                continue
            ms, kv = r["median_ms"], e["info"]["kv_bytes"].get(name)
            peak = "n/a" if r.get("peak_mem_bytes") is None else fmt_ms(r["peak_mem_bytes"] / 2**20)
            lines.append(f"| {e['case'].split(':')[0]} | {name} | {fmt_ms(ms)} ({fmt_ms(r['q75_ms'] - r['q25_ms'])}) "
                         f"| {fmt_ms(1e3 / ms) if ms > 0 else 'n/a'} | {fmt_ms(ms / dense) if dense else 'n/a'} "
                         f"| {fmt_ms(r['subtracted_median_ms'])} | {peak} "
                         f"| {'n/a' if kv is None else fmt_ms(kv / 2**20)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/bench_hf_generate.py <bench result .json>  (prints the context sweep)")
    with open(sys.argv[1]) as f:
        print(summary(json.load(f)))
