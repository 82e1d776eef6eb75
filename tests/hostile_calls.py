"""Calls trajectory_flow, the STP losses and adaptive_positional_encoding (public functions, raw ops
and backwards) with extreme and corrupt arguments; every call must return or raise a Python
exception. Run as a child process by tests/test_hostile_flow_stp_ape.py, so that a crash (a signal)
is a test failure instead of the end of the test run. Prints one line per call, then "done N".
"""
from __future__ import annotations

import itertools
import sys

import torch

import trajops

T = torch.ops.trajops
BIG = 2**63 - 1
NAN, INF = float("nan"), float("inf")


def calls():
    # ---- trajectory_flow: windows at the int64 limit, empty and tiny shapes, extreme eps
    for shape, window in itertools.product([(1, 3, 2), (2, 1, 4), (0, 5, 3), (2, 0, 3), (2, 5, 0), (3, 2)],
                                           [1, 2**31 - 1, 2**31, 2**62, BIG - 1, BIG, -BIG - 1]):
        def flow(shape=shape, window=window):
            x = torch.randn(shape, requires_grad=True)
            trajops.trajectory_flow(x, window).sum().backward()
            T.trajectory_flow_backward(torch.randn(shape), x.detach(), window, 1e-6)
        yield f"flow {shape} window={window}", flow
    for eps in (0.0, 5e-324, 1e300, 1.7976931348623157e308):
        yield f"flow eps={eps}", lambda eps=eps: trajops.trajectory_flow(torch.randn(2, 5, 3), 3, eps)
    yield "flow nonfinite x", lambda: T.trajectory_flow_backward(
        torch.full((1, 4, 2), INF), torch.tensor([[[NAN, INF], [-INF, 0.0], [1e38, -1e38], [3e38, 3e38]]]), BIG, 0.0)

    # ---- STP: index values at the int64 limits, short and empty rows, corrupt stats
    h = [torch.randn(2, 5, 3), torch.randn(2, 5, 3)]
    for triple in ([0, 1, BIG], [-BIG - 1, 0, 1], [BIG - 2, BIG - 1, BIG], [2, 1, 0], [0, 0, 0], [4, 4, 4]):
        tri = torch.tensor([[triple, [0, 1, 2]]])
        for lengths in (None, torch.tensor([5, 2]), torch.tensor([BIG, 3]), torch.tensor([-BIG - 1, 5])):
            lens = None if lengths is None else lengths.tolist()
            yield f"stp {triple} lengths={lens}", lambda tri=tri, lengths=lengths: T.stp_loss(h, tri, lengths)
            yield f"stp_backward {triple} lengths={lens}", lambda tri=tri, lengths=lengths: T.stp_loss_backward(
                torch.ones(2, 1, 2), torch.full((2, 1, 2, 3), NAN), h, tri, lengths)
    for lengths in (None, torch.tensor([0, 0]), torch.tensor([BIG, BIG]), torch.tensor([-1, 6]), torch.tensor([5, 1])):
        lens = None if lengths is None else lengths.tolist()
        yield f"dense_backward lengths={lens}", lambda lengths=lengths: T.stp_loss_dense_backward(
            torch.full((2, 2, 3), INF), torch.full((2, 2, 4, 2), -INF), h, lengths)
        yield f"dense lengths={lens}", lambda lengths=lengths: T.stp_loss_dense(h, lengths)
    for B, Tn, D in ((0, 5, 3), (2, 0, 3), (2, 1, 3), (2, 2, 3), (2, 3, 0), (1, 3, 1)):
        def empty(B=B, Tn=Tn, D=D):
            x = torch.randn(B, Tn, D, requires_grad=True)
            (trajops.stp_loss(x, 3) + trajops.stp_loss_dense(x)).backward()
            zeros = torch.zeros(B, dtype=torch.long)
            trajops.stp_loss([x, x], triples=torch.zeros(2, B, 3, dtype=torch.long), lengths=zeros)
        yield f"stp empty {(B, Tn, D)}", empty
    huge = torch.tensor([[[3e38, -3e38], [-3e38, 3e38], [3e38, 3e38]]])
    yield "stp huge values", lambda: trajops.stp_loss_dense(huge)
    yield "sampler n_spans", lambda: trajops.sample_stp_triples(2, 5, 2**62)
    yield "sampler seq_len", lambda: trajops.sample_stp_triples(2, BIG, 3, lengths=torch.tensor([BIG, -BIG - 1]))

    # ---- adaptive_positional_encoding: positions at the int64 and float limits, one-row tables
    for L, E in ((1, 3), (4, 0), (4, 3)):
        table = torch.randn(L, E, requires_grad=True)
        for positions in (None, torch.tensor([BIG, -BIG - 1, 0]), torch.tensor([1e308, -1e308, NAN]),
                          torch.tensor([[INF, -INF, 2.0]] * 2, dtype=torch.float64).float()):
            def ape(table=table, positions=positions):
                d = torch.tensor([[1e308, 1e308, -INF], [NAN, 0.0, 0.5]]).float().requires_grad_()
                trajops.adaptive_positional_encoding(d, table, positions).sum().backward()
            yield f"ape L={L} E={E} positions={None if positions is None else positions.tolist()}", ape
    for shape in ((0,), (2, 0), (0, 3)):
        yield f"ape empty {shape}", lambda shape=shape: T.adaptive_positional_encoding_backward(
            torch.zeros(shape + (4,)), torch.zeros(shape), torch.randn(5, 4), None, True)
    yield "ape module T=0", lambda: trajops.nn.TrajectoryAdaptivePositionalEncoding(4, 8)(torch.randn(2, 0, 4))


def main() -> int:
    n = 0
    for name, fn in calls():
        try:
            fn()
            outcome = "ok"
        except Exception as e:  # noqa: BLE001 -- any Python exception is an acceptable answer here
            outcome = type(e).__name__
        print(f"{name}: {outcome}", flush=True)
        n += 1
    print(f"done {n}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
