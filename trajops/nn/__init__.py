"""Modules built on the trajops ops: the policy around a kernel (weights, layer choice, schedules)."""
from .kv_cache import TrajectoryAwareKVCache
from .positional_encoding import TrajectoryAdaptivePositionalEncoding
from .stp_loss import STPLoss

__all__ = ["STPLoss", "TrajectoryAdaptivePositionalEncoding", "TrajectoryAwareKVCache"]
