"""trajops: fused, differentiable torch.library ops for trajectory-guided models.

Every op is reachable as ``trajops.<name>`` and ``torch.ops.trajops.<name>``; it runs C++ on CPU,
Triton on CUDA and the pure-PyTorch reference (``trajops.reference``) anywhere else.
``trajops.backends()`` says which one each device runs.
"""
from ._library import BACKEND, HAS_EXTENSION, HAS_TRITON, backends
from . import reference
from .kv_cache import PagedTrajectoryKVCache
from .ops.adaptive_positional_encoding import adaptive_positional_encoding
from .ops.paged_temperature_attention import paged_temperature_attention
from .ops.stp_loss import sample_stp_triples, stp_loss, stp_loss_dense
from .ops.stp_inject import stp_inject
from .ops.temperature_attention import temperature_attention
from .ops.trajectory_flow import trajectory_flow
from .varlen import cu_seqlens_from_lengths, cu_seqlens_from_position_ids
from . import nn  # noqa: E402  (after the ops it uses)
from . import optim  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "BACKEND",
    "HAS_EXTENSION",
    "HAS_TRITON",
    "PagedTrajectoryKVCache",
    "adaptive_positional_encoding",
    "backends",
    "cu_seqlens_from_lengths",
    "cu_seqlens_from_position_ids",
    "nn",
    "optim",
    "paged_temperature_attention",
    "reference",
    "sample_stp_triples",
    "stp_inject",
    "stp_loss",
    "stp_loss_dense",
    "temperature_attention",
    "trajectory_flow",
]
