"""STP through torch.distributed.pipelining: the stp_inject seam carries stage 0's STP gradient.

Two CPU processes (gloo, a FileStore in tmp_path) run a 4-block fp64 model split in 2 stages;
stage 0 applies STP to the hidden states it sends. The parameter gradients must equal those of
single-process training on the same batch with loss = main + weight * STP on the same triples, for
ScheduleGPipe and Schedule1F1B with 4 microbatches (and GPipe with scale_grads=False and
scale = 1/M). Without the seam (stage 0 computes STP and returns the plain hidden states) stage 0's
gradients are those of training without STP: the STP gradient is lost.

Triples: sampled once for the whole batch, passed to stage 0 as a second input of shape
(B, n_spans, 3) that the schedule chunks with the batch, so every row keeps its own triples in its
microbatch and the reference uses exactly the same ones (no per-microbatch random stream to align).
All schedules run in one spawn of 2 processes to keep the test short.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import trajops

B, T, D, N_SPANS, M, WEIGHT = 8, 6, 8, 3, 4, 0.5
# (name, schedule class name, scale_grads, how stage 0 treats STP)
CASES = [
    ("gpipe", "ScheduleGPipe", True, "seam"),
    ("1f1b", "Schedule1F1B", True, "seam"),
    ("gpipe_sum", "ScheduleGPipe", False, "seam"),
    ("gpipe_noseam", "ScheduleGPipe", True, "dropped"),
    ("1f1b_noseam", "Schedule1F1B", True, "dropped"),
]


def make_blocks() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(4)]).double()


def make_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    y = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    triples = trajops.sample_stp_triples(B, T, N_SPANS, generator=g)  # (n_spans, B, 3)
    return x, y, triples


class Stage0(nn.Module):
    """Blocks 0-1, then STP on the hidden states that cross to stage 1."""

    def __init__(self, blocks: nn.Sequential, mode: str, scale: float):
        super().__init__()
        self.blocks, self.mode, self.scale = blocks, mode, scale

    def forward(self, x: torch.Tensor, triples_bs3: torch.Tensor) -> torch.Tensor:
        h = self.blocks(x)
        triples = triples_bs3.transpose(0, 1)  # the microbatch's rows, back to (n_spans, b, 3)
        if self.mode == "seam":
            return trajops.stp_inject(h, WEIGHT, triples=triples, scale=self.scale)
        # No seam: the loss is computed (a monitor could log it) but it has nowhere to go.
        self.dropped = WEIGHT * trajops.stp_loss(h, triples=triples)
        return h


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    from torch.distributed import pipelining

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        x, y, triples = make_batch()
        blocks = make_blocks()
        grads = {}
        for name, schedule_name, scale_grads, mode in CASES:
            blocks.zero_grad(set_to_none=True)
            # With scale_grads=False the schedule sums microbatch gradients: the main loss and STP
            # are both scaled by 1/M to train the same mean (see stp_inject's ``scale``).
            scale = 1.0 if scale_grads else 1.0 / M
            if rank == 0:
                module = Stage0(blocks[:2], mode, scale)
            else:
                module = blocks[2:]
            stage = pipelining.PipelineStage(module, rank, 2, torch.device("cpu"))

            def loss_fn(out, target, scale=scale):
                return torch.nn.functional.mse_loss(out, target) * scale

            schedule = getattr(pipelining, schedule_name)(stage, M, loss_fn=loss_fn, scale_grads=scale_grads)
            if rank == 0:
                schedule.step(x, triples.transpose(0, 1).contiguous())
            else:
                schedule.step(target=y)
            grads[name] = {k: p.grad.clone() for k, p in module.named_parameters()}
        torch.save(grads, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


def reference_grads(with_stp: bool):
    """Single-process training on the whole batch: loss = mse + weight * STP(stage-0 output)."""
    blocks = make_blocks()
    x, y, triples = make_batch()
    h = blocks[:2](x)
    loss = torch.nn.functional.mse_loss(blocks[2:](h), y)
    if with_stp:
        loss = loss + WEIGHT * trajops.stp_loss(h, triples=triples)
    loss.backward()
    return {k: p.grad.clone() for k, p in blocks.named_parameters()}


@pytest.fixture(scope="module")
def pipeline_grads(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("stp_pipeline")
    # A spawn failure (an exception in either process) propagates and fails the tests.
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=2, join=True)
    per_rank = [torch.load(tmp / f"grads{r}.pt") for r in range(2)]
    merged = {}
    for name, *_ in CASES:
        # Stage 0 wraps blocks 0-1 (named blocks.0.*, blocks.1.*); a Sequential slice keeps the
        # names, so stage 1's are 2.*, 3.* as in the whole model.
        g = {k.replace("blocks.", "", 1): v for k, v in per_rank[0][name].items()}
        g.update(per_rank[1][name])
        merged[name] = g
    return merged


@pytest.mark.parametrize("case", ["gpipe", "1f1b", "gpipe_sum"])
def test_seam_matches_single_process_training(pipeline_grads, case):
    want = reference_grads(with_stp=True)
    got = pipeline_grads[case]
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=f"{case}: {k}")
    # STP does move stage 0's gradients (else this test could not tell the seam from its absence)
    no_stp = reference_grads(with_stp=False)
    assert max(float((want[k] - no_stp[k]).abs().max()) for k in want if k.startswith(("0.", "1."))) > 1e-3


@pytest.mark.parametrize("case", ["gpipe_noseam", "1f1b_noseam"])
def test_without_the_seam_stage0_loses_the_stp_gradient(pipeline_grads, case):
    with_stp, no_stp = reference_grads(with_stp=True), reference_grads(with_stp=False)
    got = pipeline_grads[case]
    stage0 = [k for k in with_stp if k.startswith(("0.", "1."))]
    assert len(stage0) == 4
    for k in with_stp:
        # equal to training without STP, everywhere
        torch.testing.assert_close(got[k], no_stp[k], atol=1e-6, rtol=0, msg=f"{case}: {k}")
    # and far from the STP reference on stage 0 (the margin is 1000x the tolerance above)
    assert max(float((got[k] - with_stp[k]).abs().max()) for k in stage0) > 1e-3
