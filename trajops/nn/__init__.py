"""Modules built on the trajops ops: the policy around a kernel (weights, layer choice, schedules)."""
from .stp_loss import STPLoss

__all__ = ["STPLoss"]
