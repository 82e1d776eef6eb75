"""Modules built on the trajops ops: the policy around a kernel (weights, layer choice, schedules)."""
from .kv_cache import TrajectoryAwareKVCache
from .moe_router import TrajectoryGuidedMoERouter
from .multiscale_attention import MultiScaleTrajectoryAttention
from .positional_encoding import TrajectoryAdaptivePositionalEncoding
from .stp_loss import STPLoss

__all__ = [
    "MultiScaleTrajectoryAttention",
    "STPLoss",
    "TrajectoryAdaptivePositionalEncoding",
    "TrajectoryAwareKVCache",
    "TrajectoryGuidedMoERouter",
]
