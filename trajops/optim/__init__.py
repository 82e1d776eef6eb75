"""Optimizers whose update is multi-tensor (``torch._foreach_*``) math: drop-ins for the seed's."""
from .trajectory_guided import TrajectoryGuidedOptimizer, trajectory_stability

__all__ = ["TrajectoryGuidedOptimizer", "trajectory_stability"]
