"""One module per op: validation, fake impl, autograd and kernels by device."""
