"""Pure-PyTorch references: the definition of every trajops op's semantics.

Every kernel (C++, Triton) is tested against these functions. They are vectorized (no Python loop
over the sequence or the samples), differentiable through plain autograd, and compute in fp32 (fp64
for fp64 inputs). One module per op.
"""
from . import adaptive_positional_encoding as _adaptive_positional_encoding
from . import kv_cache as _kv_cache
from . import paged_temperature_attention as _paged_temperature_attention
from . import stp_loss as _stp_loss
from . import temperature_attention as _temperature_attention
from . import trajectory_flow as _trajectory_flow
from .adaptive_positional_encoding import *  # noqa: F401,F403
from .kv_cache import *  # noqa: F401,F403
from .paged_temperature_attention import *  # noqa: F401,F403
from .stp_loss import *  # noqa: F401,F403
from .temperature_attention import *  # noqa: F401,F403
from .trajectory_flow import *  # noqa: F401,F403

__all__ = sorted(
    _adaptive_positional_encoding.__all__ + _kv_cache.__all__ + _paged_temperature_attention.__all__ + _stp_loss.__all__ + _temperature_attention.__all__ + _trajectory_flow.__all__
)
