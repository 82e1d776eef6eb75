"""Pure-PyTorch references: the definition of every trajops op's semantics.

Every kernel (C++, Triton) is tested against these functions. They are vectorized (no Python loop
over the sequence or the samples), differentiable through plain autograd, and compute in fp32 (fp64
for fp64 inputs). One module per op.
"""
from .stp_loss import (
    STP_EPS,
    stp_active_rows,
    stp_dense_valid,
    stp_loss,
    stp_loss_backward,
    stp_loss_dense,
    stp_loss_dense_backward,
)
from .trajectory_flow import trajectory_flow, trajectory_flow_backward

__all__ = [
    "STP_EPS",
    "stp_active_rows",
    "stp_dense_valid",
    "stp_loss",
    "stp_loss_backward",
    "stp_loss_dense",
    "stp_loss_dense_backward",
    "trajectory_flow",
    "trajectory_flow_backward",
]
