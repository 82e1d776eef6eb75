"""Train the trajectory-guided character LM with and without the STP loss, plot, and generate.

    python -m demo.train [--data PATH] [--minutes 3] [--steps N] [--optimizer adamw|trajectory] ...

What it does, all on CPU and offline (the default text is the Python standard library's own
source, see demo/data.py):

1. builds one TrajectoryCharLM init and a copy of it;
2. trains both for the same steps on the same batches, interleaved step by step so that both get
   the same share of the wall budget (``--minutes``, for both runs together): one with
   ``CE + trajops.nn.STPLoss`` (weight 0.02 on the last block's hidden states), one with CE alone;
   a progress bar on stderr;
3. prints a table of both training-loss curves, the held-out (last 5% of the text) loss of each and
   the STP straightness of each model's last hidden states; writes ``curves.json`` and
   ``loss_curves.png`` to ``--out``;
4. generates text from the STP-trained model through trajops.PagedTrajectoryKVCache with a capacity
   smaller than the generated length (trajectory-guided eviction), and prints the cache stats.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from trajops import sample_stp_triples, stp_loss
from trajops.nn import STPLoss
from trajops.optim import TrajectoryGuidedOptimizer

from .data import CharDataset, load_text
from .generate import generate
from .model import TrajectoryCharLM

__all__ = ["TrainConfig", "compute_loss", "main", "run"]

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
DEFAULT_LR = {"adamw": 2e-3, "trajectory": 0.05}


@dataclass
class TrainConfig:
    """Every knob of the demo; ``main`` fills it from the command line."""

    data: Optional[str] = None  # text file; None = the standard library's sources
    minutes: float = 3.0  # wall budget of the whole run (both trainings, evaluation, generation)
    steps: Optional[int] = None  # cap on training steps (each step trains both models once)
    seed: int = 0
    batch: int = 16
    seq_len: int = 128
    out: str = str(DEFAULT_OUT)
    generate: bool = True
    optimizer: str = "adamw"  # or "trajectory" (trajops.optim.TrajectoryGuidedOptimizer)
    lr: Optional[float] = None  # default per optimizer, DEFAULT_LR
    warmup: int = 20  # linear learning-rate warm-up steps
    stp_weight: float = 0.02
    stp_spans: int = 4
    embedding_dim: int = 128
    num_heads: int = 4
    num_layers: int = 2
    num_experts: int = 4
    threads: Optional[int] = None  # default: the idle CPUs, see _default_threads
    eval_batches: int = 16
    gen_chars: int = 300
    cache_capacity: int = 128
    prompt: str = "def "
    max_bytes: int = 4 * 2**20  # cap on the default corpus
    quiet: bool = False  # no progress bar / printing (tests)


def compute_loss(
    model: TrajectoryCharLM, x: Tensor, y: Tensor, stp: Optional[STPLoss] = None, *,
    triples: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
    """(total, ce, stp_term, hidden): next-character cross entropy (mean over B*T) plus, when ``stp``
    is given, its weighted STP term on the hidden states (triples given, or sampled from ``generator``).
    Without ``stp`` the total is the CE and stp_term a detached 0. All 0-d tensors; no host sync.
    """
    logits, hidden = model(x)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    if stp is None:
        return ce, ce, ce.new_zeros(()), hidden
    term = stp(hidden, triples=triples, generator=generator)
    return ce + term, ce, term, hidden


def _available_cpus() -> int:
    """CPUs this process may run on (a container's share, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _default_threads() -> int:
    """The available CPUs minus the ones already busy (1-minute load average), at least 1.

    Why not simply all CPUs: when another process keeps a core busy, torch's spinning intra-op
    threads wait on each other and a training step got 5-10x slower with 2 threads than with 1 on a
    2-CPU machine in our runs, while on an idle machine 2 threads were only ~1.5x faster than 1.
    So erring towards fewer threads costs little and avoids the collapse. ``--threads`` overrides.
    """
    cpus = _available_cpus()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        busy = 0.0
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def _windows(data: Tensor, B: int, T: int, g: torch.Generator) -> Tuple[Tensor, Tensor]:
    starts = torch.randint(0, data.numel() - T, (B,), generator=g)
    chunk = data[starts[:, None] + torch.arange(T + 1)]
    return chunk[:, :-1], chunk[:, 1:]


def _make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if name == "trajectory":
        return TrajectoryGuidedOptimizer(params, lr=lr)
    raise ValueError(f"optimizer must be 'adamw' or 'trajectory', got {name!r}")


class _Progress:
    """A one-line progress bar on stderr, redrawn with \\r at most every 0.2 s."""

    def __init__(self, enabled: bool, width: int = 28) -> None:
        self.enabled, self.width, self._last = enabled, width, 0.0

    def update(self, frac: float, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last < 0.2):
            return
        self._last = now
        n = int(self.width * min(max(frac, 0.0), 1.0))
        sys.stderr.write(f"\r[{'#' * n}{'.' * (self.width - n)}] {100 * min(frac, 1.0):5.1f}% {text}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


@torch.no_grad()
def _evaluate(model: TrajectoryCharLM, data: Tensor, cfg: TrainConfig) -> Tuple[float, float]:
    """(mean CE, mean STP straightness of the last hidden states) over fixed held-out windows.

    The straightness is the training curves' metric: ``stp_loss`` (unweighted) on sampled triples,
    drawn from a fixed generator so that both models are scored on the same windows and triples.
    """
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    ce_sum, stp_sum = 0.0, 0.0
    for _ in range(cfg.eval_batches):
        x, y = _windows(data, cfg.batch, cfg.seq_len, g)
        _, ce, _, hidden = compute_loss(model, x, y)
        ce_sum += float(ce)
        triples = sample_stp_triples(cfg.batch, cfg.seq_len, cfg.stp_spans, generator=g)
        stp_sum += float(stp_loss(hidden[-1], triples=triples))
    model.train(was)
    return ce_sum / cfg.eval_batches, stp_sum / cfg.eval_batches


def _smooth(values: Sequence[float], end: int, span: int) -> float:
    window = values[max(0, end - span):end]
    return sum(window) / len(window)


def _curve_table(curves: Dict[str, Dict[str, List[float]]], rows: int = 10) -> str:
    n = len(curves["with_stp"]["ce"])
    span = max(1, n // rows)
    marks = sorted({span * i for i in range(1, rows) if span * i < n} | {n})
    head = f"{'step':>6}  {'CE with STP':>12}  {'CE without':>11}  {'STP with':>9}  {'STP without':>11}"
    lines = [head, "-" * len(head)]
    for s in marks:
        a, b = curves["with_stp"], curves["without_stp"]
        lines.append(f"{s:>6}  {_smooth(a['ce'], s, span):>12.4f}  {_smooth(b['ce'], s, span):>11.4f}  "
                     f"{_smooth(a['stp'], s, span):>9.4f}  {_smooth(b['stp'], s, span):>11.4f}")
    return "\n".join(lines) + f"\n(training losses averaged over the {span} steps up to each row; STP = unweighted " \
                              "straightness loss 1 - cos of the last block's hidden states on the sampled triples)"


def _plot(curves, val, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    n = len(curves["with_stp"]["ce"])
    span = max(1, n // 50)
    for key, label, color in (("with_stp", "with STP", "tab:blue"), ("without_stp", "without STP", "tab:orange")):
        for ax, metric in zip(axes, ("ce", "stp")):
            ys = curves[key][metric]
            ax.plot(range(1, n + 1), ys, color=color, alpha=0.2, linewidth=0.8)
            ax.plot(range(1, n + 1), [_smooth(ys, s, span) for s in range(1, n + 1)], color=color,
                    label=f"{label} (held-out {val[key][metric]:.3f})")
    axes[0].set(title="next-character cross entropy (train)", xlabel="step", ylabel="nats")
    axes[1].set(title="STP straightness loss, last block (train)", xlabel="step", ylabel="1 - cos")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _prompt_ids(ds: CharDataset, prompt: str, val_text: str) -> Tuple[str, Tensor]:
    if not prompt or any(c not in ds.stoi for c in prompt):
        prompt = val_text[:32] or ds.chars[0]  # the user's text may lack the default prompt's characters
    return prompt, ds.encode(prompt)


def run(cfg: TrainConfig, text: Optional[str] = None) -> Dict[str, Any]:
    """Run the demo (see the module doc); returns the curves, validation numbers, paths and sample.

    ``text`` replaces the corpus (tests); otherwise ``cfg.data`` or the standard library is read.
    torch's thread count is set to ``cfg.threads`` (default: the idle CPUs) for the run and
    restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or _default_threads())
    try:
        return _run(cfg, text)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: TrainConfig, text: Optional[str]) -> Dict[str, Any]:
    t_start = time.perf_counter()
    budget = 60.0 * cfg.minutes
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, flush=True))
    if cfg.steps is not None and cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR.get(cfg.optimizer, 0.0)

    source = "the given text" if text is not None else (cfg.data or "the Python standard library's sources")
    if text is None:
        text = load_text(None, cfg.max_bytes) if cfg.data is None else load_text(cfg.data)
    ds = CharDataset(text)
    n_val = max(len(ds) // 20, cfg.seq_len + 2)
    if len(ds) - n_val < cfg.seq_len + 2:
        raise ValueError(f"the text has {len(ds)} characters: too short for seq_len={cfg.seq_len} "
                         f"(needs about {2 * (cfg.seq_len + 2)} for a train and a held-out split)")
    train_data, val_data = ds.data[:-n_val], ds.data[-n_val:]
    say(f"data: {source}: {len(ds):,} characters, vocab {ds.vocab_size}, "
        f"train {train_data.numel():,} / held-out {val_data.numel():,}; torch threads {torch.get_num_threads()} "
        f"of {_available_cpus()} CPUs")

    torch.manual_seed(cfg.seed)
    base = TrajectoryCharLM(ds.vocab_size, cfg.embedding_dim, cfg.num_heads, cfg.num_layers, cfg.num_experts,
                            max_len=max(1024, 2 * (cfg.seq_len + cfg.gen_chars + 64)))
    models = {"with_stp": base, "without_stp": copy.deepcopy(base)}  # the same init
    opts = {k: _make_optimizer(cfg.optimizer, m.parameters(), lr) for k, m in models.items()}
    stp = STPLoss(weight=cfg.stp_weight, n_spans=cfg.stp_spans)
    say(f"model: TrajectoryCharLM {sum(p.numel() for p in base.parameters()):,} parameters "
        f"(E={cfg.embedding_dim}, {cfg.num_layers} layers, {cfg.num_heads} heads, {cfg.num_experts} experts); "
        f"optimizer {cfg.optimizer} lr {lr:g}; batch {cfg.batch} x {cfg.seq_len}; STP weight {cfg.stp_weight}")

    data_gen = torch.Generator().manual_seed(cfg.seed)  # one batch per step, shared by both runs
    stp_gen = torch.Generator().manual_seed(cfg.seed + 1)  # STP triples, shared by both runs
    curves = {k: {"ce": [], "stp": []} for k in models}
    # Leave ~10% of the budget for evaluation, the plot and generation.
    train_deadline = t_start + 0.9 * budget
    bar = _Progress(not cfg.quiet)
    step, t_train = 0, time.perf_counter()
    while (cfg.steps is None or step < cfg.steps) and (step == 0 or time.perf_counter() < train_deadline):
        x, y = _windows(train_data, cfg.batch, cfg.seq_len, data_gen)
        triples = sample_stp_triples(cfg.batch, cfg.seq_len, cfg.stp_spans, generator=stp_gen)
        warm = min(1.0, (step + 1) / max(1, cfg.warmup))
        for key, model in models.items():
            for group in opts[key].param_groups:
                group["lr"] = lr * warm
            total, ce, _, hidden = compute_loss(model, x, y, stp if key == "with_stp" else None, triples=triples)
            opts[key].zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            loss_value = float(total.detach())
            if cfg.optimizer == "trajectory":
                opts[key].step(current_loss=loss_value)
            else:
                opts[key].step()
            with torch.no_grad():  # the straightness of both models, on the same triples, for the plot
                curves[key]["stp"].append(float(stp_loss(hidden[-1].detach(), triples=triples)))
            curves[key]["ce"].append(float(ce.detach()))
        step += 1
        elapsed = time.perf_counter() - t_start
        frac = step / cfg.steps if cfg.steps is not None else 0.0
        frac = max(frac, elapsed / (0.9 * budget)) if budget > 0 else frac
        bar.update(frac, f"step {step}  {elapsed:5.0f}s  CE with STP {curves['with_stp']['ce'][-1]:.3f}  "
                         f"without {curves['without_stp']['ce'][-1]:.3f}")
    bar.update(1.0, f"step {step}  {time.perf_counter() - t_start:5.0f}s", force=True)
    bar.close()
    train_seconds = time.perf_counter() - t_train

    val = {}
    for key, model in models.items():
        ce, st = _evaluate(model, val_data, cfg)
        val[key] = {"ce": ce, "stp": st}
    say(f"\ntrained {step} steps per run in {train_seconds:.1f} s ({2 * step / train_seconds:.2f} model-steps/s)\n")
    say(_curve_table(curves))
    say(f"\nheld-out ({cfg.eval_batches} batches of {cfg.batch} x {cfg.seq_len} from the last 5% of the text):")
    for key, label in (("with_stp", "with STP   "), ("without_stp", "without STP")):
        say(f"  {label}  CE {val[key]['ce']:.4f} nats/char ({val[key]['ce'] / math.log(2):.3f} bits/char), "
            f"STP straightness loss {val[key]['stp']:.4f}")

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    png, js = out / "loss_curves.png", out / "curves.json"
    _plot(curves, val, png)
    result: Dict[str, Any] = {
        "config": asdict(cfg), "lr": lr, "steps": step,
        "train_seconds": train_seconds, "vocab_size": ds.vocab_size, "curves": curves, "val": val,
    }

    if cfg.generate:
        prompt, ids = _prompt_ids(ds, cfg.prompt, text[-n_val:])
        g = torch.Generator().manual_seed(cfg.seed)
        t0 = time.perf_counter()
        train_threads = torch.get_num_threads()
        # One token at a time means tiny ops: a thread pool only adds hand-offs, and on a busy
        # machine its spinning threads made decoding ~20x slower than one thread in our runs.
        torch.set_num_threads(1)
        try:
            out_ids, cache = generate(models["with_stp"], ids, cfg.gen_chars, cfg.cache_capacity, temperature=0.8,
                                      generator=g)
        finally:
            torch.set_num_threads(train_threads)
        gen_seconds = time.perf_counter() - t0
        stats = {k: v.tolist() for k, v in cache.stats().items()}
        sample = ds.decode(out_ids)
        result["generation"] = {"prompt": prompt, "text": sample, "cache_stats": stats, "seconds": gen_seconds}
        say(f"\ngenerated {cfg.gen_chars} characters (model trained with STP, temperature 0.8) through "
            f"PagedTrajectoryKVCache(capacity={cfg.cache_capacity}) in {gen_seconds:.1f} s; prompt {prompt!r}:")
        say("-" * 72 + "\n" + sample + "\n" + "-" * 72)
        say(f"cache stats: live {stats['live']} / capacity {stats['capacity']}, evicted {stats['evicted_total']}, "
            f"pages in use {stats['pages_in_use']}, free {stats['pages_free']}")

    js.write_text(json.dumps(result, indent=1))
    result["png"], result["json"] = str(png), str(js)
    say(f"\nwrote {png} and {js} ({time.perf_counter() - t_start:.0f} s in all)")
    return result


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="UTF-8 text file (default: the Python standard library's sources)")
    p.add_argument("--minutes", type=float, default=d.minutes, help="wall budget for everything (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="cap on training steps per run")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--out", default=d.out, help="where loss_curves.png and curves.json go (default %(default)s)")
    p.add_argument("--no-generate", action="store_true", help="skip the KV-cache generation")
    p.add_argument("--optimizer", choices=("adamw", "trajectory"), default=d.optimizer)
    p.add_argument("--lr", type=float, default=None, help=f"learning rate (default {DEFAULT_LR})")
    p.add_argument("--stp-weight", type=float, default=d.stp_weight)
    p.add_argument("--embedding-dim", type=int, default=d.embedding_dim)
    p.add_argument("--num-layers", type=int, default=d.num_layers)
    p.add_argument("--num-heads", type=int, default=d.num_heads)
    p.add_argument("--num-experts", type=int, default=d.num_experts)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs not already busy, by load average)")
    p.add_argument("--gen-chars", type=int, default=d.gen_chars)
    p.add_argument("--cache-capacity", type=int, default=d.cache_capacity)
    p.add_argument("--prompt", default=d.prompt)
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    a = _parser().parse_args(argv)
    cfg = TrainConfig(
        data=a.data, minutes=a.minutes, steps=a.steps, seed=a.seed, batch=a.batch, seq_len=a.seq_len, out=a.out,
        generate=not a.no_generate, optimizer=a.optimizer, lr=a.lr, stp_weight=a.stp_weight,
        embedding_dim=a.embedding_dim, num_heads=a.num_heads, num_layers=a.num_layers, num_experts=a.num_experts,
        threads=a.threads, gen_chars=a.gen_chars, cache_capacity=a.cache_capacity, prompt=a.prompt,
    )
    return run(cfg)


if __name__ == "__main__":
    main()
