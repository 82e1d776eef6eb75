"""Modules built on the trajops ops: the policy around a kernel (weights, layer choice, schedules)."""
from .kv_cache import TrajectoryAwareKVCache
from .moe_router import TrajectoryGuidedMoERouter
from .multiscale_attention import MultiScaleTrajectoryAttention
from .positional_encoding import TrajectoryAdaptivePositionalEncoding
from .stp_inject import STPInject
from .stp_loss import STPLoss

__all__ = [
    "MultiScaleTrajectoryAttention",
    "STPInject",
    "STPLoss",
    "TrajectoryAdaptivePositionalEncoding",
    "TrajectoryAwareKVCache",
    "TrajectoryGuidedMoERouter",
]
