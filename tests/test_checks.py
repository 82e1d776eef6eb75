"""trajops/ops/_checks.py: the fast argument checks behave exactly as torch._check_value / _check_type / _check."""
from __future__ import annotations

import pytest
import torch

from trajops.ops._checks import check, check_type, check_value


@pytest.mark.parametrize("ours, theirs, error", [(check_value, torch._check_value, ValueError),
                                                 (check_type, torch._check_type, TypeError),
                                                 (check, torch._check, RuntimeError)])
def test_same_errors_as_torch(ours, theirs, error):
    ours(True, lambda: "never built")
    for fn in (ours, theirs):
        with pytest.raises(error, match="^op: x must be 3-D, got 2$"):
            fn(False, lambda: "op: x must be 3-D, got 2")
        with pytest.raises(TypeError):  # a condition that is not a bool (here a tensor) is refused, as torch does
            fn(torch.tensor(True), lambda: "op: message")
