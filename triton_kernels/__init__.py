"""Triton kernels and their host launchers (no torch.library registration here: see trajops/ops/)."""
