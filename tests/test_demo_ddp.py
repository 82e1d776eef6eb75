"""The demo model under torch.distributed DDP (gloo, 2 CPU processes) equals one process on the global batch.

Each rank trains on its half of a fixed global batch; the loss (CE plus the STP term, on triples
drawn once for the global batch and split the same way) is a mean over equal halves, so DDP's
averaged gradients must be the single-process gradients of the whole batch, step after step, and the
parameters after a few optimizer steps must agree too.
"""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from demo.model import TrajectoryCharLM
from demo.train import compute_loss
from trajops import sample_stp_triples
from trajops.nn import STPLoss

WORLD = 2
STEPS = 3
GLOBAL_B, T, V = 4, 24, 19
ATOL, RTOL = 1e-6, 1e-5
TIMEOUT_S = 120  # the workers' whole life; a hang fails the test instead of stalling the suite


def _build() -> TrajectoryCharLM:
    return TrajectoryCharLM(V, embedding_dim=32, num_heads=4, num_layers=2, num_experts=3)


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # Momentum SGD: linear in the gradients, so fp32 rounding differences in the allreduce stay
    # at rounding size in the parameters (Adam's g / sqrt(v) would blow them up where g ~ 0).
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def _train(model: torch.nn.Module, batches, rows: slice):
    """STEPS optimizer steps on rows ``rows`` of each global batch; returns per-step grads and final params."""
    opt = _optimizer(model)
    stp = STPLoss(weight=0.1)
    grads = []
    for x, y, triples in batches:
        total, _, _, _ = compute_loss(model, x[rows], y[rows], stp, triples=triples[:, rows])
        opt.zero_grad(set_to_none=True)
        total.backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, port: int, init_path: str, batches_path: str, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # two processes on a small machine: no oversubscription
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        model = _build()
        model.load_state_dict(torch.load(init_path))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        half = GLOBAL_B // WORLD
        grads, params = _train(ddp, torch.load(batches_path), slice(rank * half, (rank + 1) * half))
        strip = lambda d: {n.removeprefix("module."): t for n, t in d.items()}  # noqa: E731
        torch.save({"grads": [strip(g) for g in grads], "params": strip(params)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(*args) -> None:
    ctx = mp.spawn(_worker, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):  # raises ProcessRaisedException / ProcessExitedException with the cause
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(5)
            pytest.fail(f"the {WORLD} DDP workers did not finish within {TIMEOUT_S} s (gloo rendezvous on "
                        f"127.0.0.1 or a collective hung); they were killed")


def test_ddp_gloo_two_processes_matches_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    torch.manual_seed(0)
    model = _build()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        chunk = torch.randint(0, V, (GLOBAL_B, T + 1), generator=g)
        triples = sample_stp_triples(GLOBAL_B, T, 4, generator=g)  # (n_spans, B, 3): one draw, split by row
        batches.append((chunk[:, :-1], chunk[:, 1:], triples))
    torch.save(init, tmp_path / "init.pt")
    torch.save(batches, tmp_path / "batches.pt")

    _run_workers(_free_port(), str(tmp_path / "init.pt"), str(tmp_path / "batches.pt"), str(tmp_path))

    ref_grads, ref_params = _train(model, batches, slice(None))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r, res in enumerate(results):
        for step, (got, want) in enumerate(zip(res["grads"], ref_grads)):
            assert got.keys() == want.keys()
            for name in want:
                torch.testing.assert_close(
                    got[name], want[name], atol=ATOL, rtol=RTOL,
                    msg=lambda m, name=name, step=step, r=r: f"rank {r}, step {step}, grad of {name}: {m}")
        for name in ref_params:
            torch.testing.assert_close(res["params"][name], ref_params[name], atol=ATOL, rtol=RTOL,
                                       msg=lambda m, name=name, r=r: f"rank {r}, parameter {name}: {m}")
    # The parameters really moved (the comparison is not between two copies of the init).
    assert max((ref_params[n] - init[n]).abs().max() for n in ref_params) > 1e-3
