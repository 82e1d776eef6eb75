"""One module per op: validation, fake impl, autograd and kernels by device."""

# stp_inject is not an op of its own but a seam built on the stp_loss op; exported here and from
# ``trajops`` (importing it imports and registers stp_loss first).
from .stp_inject import stp_inject  # noqa: E402,F401
