"""The seed's two-phase protocol, batched over seeds: every seed is one row of (S, 8, 4) factor tensors.

Phase 1 (induction): fit C = W((U a) * (V b)) with 8 products on fresh random 2x2 pairs, AdamW.
Phase 2 (crystallization): keep the 7 most important products (:func:`verify.sparsify`), fine-tune
them under that mask, round to integers (:func:`verify.discretize`) and :func:`verify.verify`.

AdamW is elementwise and each seed's loss only reads its own row, so the seeds are independent runs
that share one tensor program (20 seeds cost about what one costs: the work is Python overhead).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

import trajops

from .verify import Rule, apply_rule, discretize, same_orbit_signature, sparsify, verify

SLOTS = 8  # the model's products; the target rank is 7


@dataclass
class Config:
    """One training configuration (shared by all seeds of a run)."""
    batch: int = 32
    steps1: int = 8000            # phase 1 steps (fresh samples each step: an "epoch" is one step)
    steps2: int = 4000            # phase 2 masked fine-tuning steps
    lr: float = 3e-2              # peak; cosine decay to 0 within each phase
    weight_decay: float = 1e-4
    init_scale: float = 0.5
    noise: float = 0.0            # sigma of Gaussian noise added to all weights at the end of phase 1
    checkpoints: int = 64         # weight snapshots per phase, for the trajectory straightness
    dtype: torch.dtype = torch.float64
    rank7_tol: float = 1e-8       # phase-2 loss below this: a real-valued rank-7 decomposition was reached


def _masked(rule: Rule, mask: Optional[Tensor]) -> Rule:
    if mask is None:
        return rule
    m = mask.to(rule[0].dtype)
    return rule[0] * m[..., :, None], rule[1] * m[..., :, None], rule[2] * m[..., None, :]


def eval_loss(rule: Rule, gen: torch.Generator, samples: int = 1024) -> Tensor:
    """Per-seed mean squared error on ``samples`` fresh standard-normal pairs. rule: (S, R, 4)... -> (S,)."""
    S = rule[0].shape[0]
    A = torch.randn(S, samples, 2, 2, generator=gen, dtype=rule[0].dtype)
    B = torch.randn(S, samples, 2, 2, generator=gen, dtype=rule[0].dtype)
    with torch.no_grad():
        return ((apply_rule(*rule, A, B) - A @ B) ** 2).mean((1, 2, 3))


def train_phase(rule: Rule, cfg: Config, steps: int, gen: torch.Generator,
                mask: Optional[Tensor] = None) -> Tuple[Rule, Tensor]:
    """AdamW with cosine decay on (U, V, W) of shapes (S, R, 4), (S, R, 4), (S, 4, R).

    Returns (the trained rule, masked if ``mask`` (S, R) is given; detached copies) and the snapshots
    (S, cfg.checkpoints, 12 R) of the flattened, masked weights, evenly spaced over the phase.
    """
    params = [x.detach().clone().requires_grad_(True) for x in rule]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    S = params[0].shape[0]
    every = max(1, steps // max(1, cfg.checkpoints))
    snaps: List[Tensor] = []
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * t / steps))
        A = torch.randn(S, cfg.batch, 2, 2, generator=gen, dtype=cfg.dtype)
        B = torch.randn(S, cfg.batch, 2, 2, generator=gen, dtype=cfg.dtype)
        # Sum of per-seed means: each seed's gradient is exactly its own run's gradient.
        loss = ((apply_rule(*_masked(tuple(params), mask), A, B) - A @ B) ** 2).mean((1, 2, 3)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if t % every == 0 or t == steps - 1:
            with torch.no_grad():
                snaps.append(torch.cat([p.flatten(1) for p in _masked(tuple(params), mask)], dim=1))
    out = tuple(p.detach() for p in _masked(tuple(params), mask))
    return out, torch.stack(snaps, dim=1)  # type: ignore[return-value]


def straightness(snaps: Tensor) -> Tensor:
    """Mean local curvature of each seed's weight trajectory: ``trajops.stp_loss_dense`` on the
    snapshots (S, T, D) as S "sequences of hidden states" -> (S,); 0 = a straight line, 1 = turning
    90 degrees at every checkpoint on average, 2 = reversing."""
    if snaps.shape[1] < 3:
        return torch.full((snaps.shape[0],), float("nan"), dtype=snaps.dtype)
    return trajops.stp_loss_dense(snaps, reduction="none")[0].mean(-1)


def init_rule(seeds: List[int], cfg: Config) -> Rule:
    """Independent Gaussian init per seed (its own generator): U, V (S, 8, 4), W (S, 4, 8)."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        out.append([torch.randn(shape, generator=g, dtype=cfg.dtype) * cfg.init_scale
                    for shape in ((SLOTS, 4), (SLOTS, 4), (4, SLOTS))])
    return tuple(torch.stack([o[i] for o in out]) for i in range(3))  # type: ignore[return-value]


def crystallize(rule: Rule, cfg: Config, gen: torch.Generator, *, zero_shot: bool = True) -> Dict[str, object]:
    """Phase 2 on a batch of fitted rules (S, 8, 4)...: sparsify to 7, masked fine-tune, round, verify.

    Returns per-seed lists: loss2 (masked fine-tune loss), delta (distance to integers before rounding),
    rank7 (loss2 < cfg.rank7_tol), strassen_signature (rank7 and Strassen's product-rank fingerprint:
    Strassen in another basis), passed / reasons (verify), the rounded rules of the passing seeds,
    and the phase-2 snapshots "snaps" (S, T, 96): the flattened 8-slot weights, the dropped slot zero.
    """
    (U, V, W), mask = sparsify(*rule, k=7)
    tuned, snaps = train_phase((U, V, W), cfg, cfg.steps2, gen, mask=mask)
    loss2 = eval_loss(tuned, gen)
    keep = mask.nonzero()[:, 1].view(mask.shape[0], 7)  # the 7 kept slots per seed, in slot order
    idx4 = keep[:, :, None].expand(-1, -1, 4)
    U7, V7 = tuned[0].gather(1, idx4), tuned[1].gather(1, idx4)
    W7 = tuned[2].gather(2, keep[:, None, :].expand(-1, 4, -1))
    (Ur, Vr, Wr), delta = discretize(U7, V7, W7)
    orbit = same_orbit_signature(U7, V7, W7) & (loss2 < cfg.rank7_tol)
    passed, reasons, rules = [], [], {}
    for s in range(U7.shape[0]):
        v = verify(Ur[s], Vr[s], Wr[s], sizes=None if not zero_shot else (2, 4, 8, 16, 32, 64))
        ok = v.passed if zero_shot else not [r for r in v.reasons if r != "zero-shot not run"]
        passed.append(bool(ok))
        reasons.append(list(v.reasons))
        if ok:
            rules[s] = {"U": Ur[s].tolist(), "V": Vr[s].tolist(), "W": Wr[s].tolist(),
                        "zero_shot": {str(k): e for k, e in v.zero_shot.items()}}
    return {"loss2": loss2.tolist(), "delta": delta.tolist(), "rank7": (loss2 < cfg.rank7_tol).tolist(),
            "strassen_signature": orbit.tolist(),
            "passed": passed, "reasons": reasons, "rules": rules, "snaps": snaps}


def run_protocol(seeds: List[int], cfg: Config, *, zero_shot: bool = True) -> Dict[str, object]:
    """Both phases for every seed in ``seeds`` (one batched program). Returns a JSON-ready dict of
    per-seed results plus summary rates (fit: phase-1 loss < 1e-6; rank7; success = verify passed)."""
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if not 1 <= cfg.batch:
        raise ValueError(f"cfg.batch must be >= 1, got {cfg.batch}")
    gen = torch.Generator().manual_seed(10_000 + seeds[0])
    rule, snaps1 = train_phase(init_rule(seeds, cfg), cfg, cfg.steps1, gen)
    loss1 = eval_loss(rule, gen)
    if cfg.noise > 0:  # the seed's fragility test: perturb the phase-1 weights, then crystallize
        rule = tuple(x + cfg.noise * torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in rule)
    res = crystallize(rule, cfg, gen, zero_shot=zero_shot)
    snaps2 = res.pop("snaps")
    res.update(seeds=list(seeds), loss1=loss1.tolist(), straight1=straightness(snaps1).tolist(),
               straight2=straightness(snaps2).tolist())
    S = len(seeds)
    res["fit_rate"] = sum(x < 1e-6 for x in res["loss1"]) / S
    res["rank7_rate"] = sum(res["rank7"]) / S
    res["signature_rate"] = sum(res["strassen_signature"]) / S
    res["success_rate"] = sum(res["passed"]) / S
    return res


def noisy_rule_basin(rule: Rule, sigmas: List[float], draws: int = 20, seed: int = 0) -> Dict[str, float]:
    """Fraction of ``draws`` Gaussian perturbations (sigma each) of an exact rule that round back to a
    passing rule (discretize + verify without zero-shot, which exactness implies). -> {str(sigma): rate}."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for sigma in sigmas:
        ok = 0
        for _ in range(draws):
            noisy = tuple(x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype) for x in rule)
            (U, V, W), _ = discretize(*noisy)
            v = verify(U, V, W, sizes=None)
            ok += v.reasons == ("zero-shot not run",)
        out[str(sigma)] = ok / draws
    return out
