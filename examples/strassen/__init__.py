"""Strassen crystallization (issue 19): train a bilinear 2x2 matmul model, crystallize it to 7 integer
products, verify it and transfer it zero-shot to 64 x 64. ``python -m examples.strassen --seeds 20``."""
from .train import Config, crystallize, run_protocol, straightness
from .verify import (Verification, discretize, naive_rule, recursive_matmul, sparsify, strassen_rule, verify,
                     zero_shot)

__all__ = ["Config", "Verification", "crystallize", "discretize", "naive_rule", "recursive_matmul", "run_protocol",
           "sparsify", "straightness", "strassen_rule", "verify", "zero_shot"]
