"""Quality check of trajops.hf.TrajectoryEvictionCache without a trained model: attention mass kept.

For random-weight tiny Llamas (hidden 128, 4 layers, 4 heads, 2 KV heads), a random prompt and a greedy
continuation are fixed first (dense cache). A full dense forward over that sequence (eager attention,
output_attentions) gives, for every decode query t, the full cache's attention over positions < t. Each evicting
policy then replays the same tokens (prompt in chunks, then one token per forward) at the same budget; before every
decode forward we read which positions it still holds and measure the fraction of the full cache's attention mass
(over the past positions, averaged over layers, heads and rows) that falls on them.

Policies (same class, same budget):
  trajectory            default TrajectoryEvictionCache (alpha=0.7, decay=0.1, value-step trajectories)
  trajectory+4 sinks    the same with the first 4 tokens pinned
  recency (window+4)    alpha=0 (recency only) with 4 sinks: a StreamingLLM-style sliding window
  uniform share         not a policy: kept / past, the mass any policy keeps if attention were uniform

Random weights have no learned attention structure, so this measures the mechanism, not language-model quality;
the numbers are reported as they come out.

    PYTHONPATH=$PWD python bench/quality_hf_eviction.py [--seeds 0 1 2] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List, Sequence

import torch

POLICIES = {
    "trajectory": dict(),
    "trajectory+4 sinks": dict(sinks=4),
    "recency (window+4)": dict(alpha=0.0, sinks=4),
}


def _model(seed: int, hidden: int, layers: int, init_range: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=4096,
                      attn_implementation="eager", initializer_range=init_range)
    torch.manual_seed(seed)
    return cfg, LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def _replay(model, cfg, tokens: torch.Tensor, prompt_len: int, capacity: int, chunk: int, attn: List[torch.Tensor],
            **policy) -> List[float]:
    """Feed tokens through an evicting cache; per decode query, the full attention mass on the kept positions."""
    from trajops.hf import TrajectoryEvictionCache

    B, T = tokens.shape
    cache = TrajectoryEvictionCache(cfg, capacity, max_batch_size=B, **policy)
    for s in range(0, prompt_len, chunk):
        model(tokens[:, s:min(s + chunk, prompt_len)], past_key_values=cache, use_cache=True)
    kept_mass = []
    for t in range(prompt_len, T):
        kept = cache.kept_positions()  # (B, live), all < t
        fracs = []
        for a in attn:  # (B, H, T, T)
            row = a[:, :, t, :t]  # the full cache's attention of query t over the past
            on_kept = row.gather(2, kept[:, None, :].expand(B, row.shape[1], kept.shape[1])).sum(-1)
            fracs.append(on_kept / row.sum(-1))
        kept_mass.append(float(torch.stack(fracs).mean()))
        model(tokens[:, t:t + 1], past_key_values=cache, use_cache=True)
    return kept_mass


def run_quality(seeds: Sequence[int] = (0, 1, 2), prompt_len: int = 512, decode_steps: int = 64,
                budget: float = 0.25, chunk: int = 16, batch: int = 2, hidden: int = 128, layers: int = 4,
                init_range: float = 0.02, verbose: bool = True) -> Dict[str, Dict[str, float]]:
    """Mean/std (over decode steps and seeds) of the full cache's attention mass on the kept entries, per policy."""
    torch.set_grad_enabled(False)
    total = prompt_len + decode_steps
    capacity = max(8, int(budget * total))
    per_policy: Dict[str, List[float]] = {name: [] for name in POLICIES}
    uniform: List[float] = []
    t0 = time.perf_counter()
    for seed in seeds:
        cfg, model = _model(seed, hidden, layers, init_range)
        g = torch.Generator().manual_seed(1000 + seed)
        prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g)
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=decode_steps,
                                min_new_tokens=decode_steps, do_sample=False, pad_token_id=0)
        out = model(tokens[:, :-1], output_attentions=True)  # the dense reference for every decode query
        attn = [a.float() for a in out.attentions]
        tokens = tokens[:, :-1]
        for name, kw in POLICIES.items():
            per_policy[name] += _replay(model, cfg, tokens, prompt_len, capacity, chunk, attn, **kw)
        uniform += [min(capacity, t) / t for t in range(prompt_len, tokens.shape[1])]
    result: Dict[str, Dict[str, float]] = {}
    for name, vals in list(per_policy.items()) + [("uniform share", uniform)]:
        result[name] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "n": len(vals)}
    result["_setup"] = {"seeds": len(seeds), "prompt_len": prompt_len, "decode_steps": decode_steps,
                        "capacity": capacity, "budget": budget, "chunk": chunk, "batch": batch, "hidden": hidden,
                        "layers": layers, "init_range": init_range, "seconds": time.perf_counter() - t0}
    if verbose:
        s = result["_setup"]
        print(f"attention mass of the full cache kept by each policy: capacity {capacity} of {total} tokens "
              f"({budget:.0%}), prompt {prompt_len} fed in chunks of {chunk}, {decode_steps} decode steps, "
              f"{len(seeds)} seeds x batch {batch}, Llama hidden {hidden}, {layers} layers, GQA 4/2, init std "
              f"{init_range} "
              f"({s['seconds']:.0f} s)")
        print(f"| {'policy':<20} | kept mass: mean | std over steps and seeds |")
        print(f"|{'-' * 22}|{'-' * 17}|{'-' * 26}|")
        for name, r in result.items():
            if not name.startswith("_"):
                print(f"| {name:<20} | {r['mean']:>15.4f} | {r['std']:>24.4f} |")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--init-range", type=float, default=0.02,
                   help="weight init std; HF's default 0.02 gives near-uniform attention")
    p.add_argument("--quick", action="store_true", help="one seed, prompt 128, 16 steps")
    a = p.parse_args()
    if a.quick:
        a.seeds, a.prompt, a.steps = [0], 128, 16
    run_quality(a.seeds, a.prompt, a.steps, a.budget, a.chunk, init_range=a.init_range)


if __name__ == "__main__":
    main()
