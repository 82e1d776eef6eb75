"""Packed variable-length sequences: ``cu_seqlens`` offsets, as FlashAttention's varlen API uses them.

A packed batch concatenates N documents along the token axis: ``x`` is (total, ...) (or (1, total,
...)) and ``cu_seqlens`` (N + 1,) int32 or int64 holds the offsets, document j being the tokens
``cu_seqlens[j] <= i < cu_seqlens[j + 1]``. A valid ``cu_seqlens`` starts at 0, never decreases and
ends at ``total``; empty documents (equal neighbours) are allowed, so is N = 0 (``[0]`` with
total = 0). Ops that take ``cu_seqlens`` compute each document as if it were alone.

Checks (every backend, the same text; C++: csrc/cpu/varlen.h):

* shape, dtype and device of ``cu_seqlens`` are checked everywhere, fake impls included;
* its values are checked where reading them costs no device sync (CPU tensors): ValueError;
* on CUDA the values are not read by the host: the kernels clamp every offset into [0, total] (no
  read outside a tensor whatever the values) and :func:`cu_seqlens_invalid` gives a 0-d device flag
  that makes every output NaN, the project's rule for corrupt index tensors on a GPU.

Helpers for users: :func:`cu_seqlens_from_position_ids` (transformers' packing with
``DataCollatorWithFlattening``: position ids restart at 0 at each document) and
:func:`cu_seqlens_from_lengths`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "check_cu_seqlens",
    "cu_seqlens_from_lengths",
    "cu_seqlens_from_position_ids",
    "cu_seqlens_invalid",
    "document_ids",
    "max_seqlen",
    "positions_in_document",
]

_INDEX_DTYPES = (torch.int32, torch.int64)


def _same_device(a: torch.device, b: torch.device) -> bool:
    # torch.device("cuda") and torch.device("cuda:0") name one device.
    if a.type != b.type:
        return False
    if a.type == "cuda":
        cur = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)
    return a.index == b.index or a.index is None or b.index is None


def check_cu_seqlens(
    op: str,
    cu_seqlens: Tensor,
    total: int,
    device: torch.device,
    *,
    name: str = "cu_seqlens",
    values: bool = True,
) -> None:
    """Raise if ``cu_seqlens`` is not a valid offset vector for ``total`` packed tokens on ``device``.

    Args:
        op: the op's name, the first word of every message (``"trajectory_flow"``).
        cu_seqlens: (N + 1,) int32/int64 offsets.
        total: the number of packed tokens.
        device: the device of the packed data.
        name: the argument's name in messages (``"cu_seqlens_q"``...).
        values: also check the values (start 0, non-decreasing, end ``total``). Only done for CPU
            tensors (a CUDA tensor would need a device sync; see :func:`cu_seqlens_invalid`) and
            never for fake/meta tensors.

    Raises:
        TypeError: not a tensor, or not int32/int64.
        ValueError: not 1-D with at least one entry, on another device, or invalid values.
    """
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be torch.int32 or torch.int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(
            f"{op}: {name} must have shape (N + 1,) for N packed documents, got shape {list(cu_seqlens.shape)}"
        )
    if not _same_device(cu_seqlens.device, device):
        raise ValueError(f"{op}: {name} must be on the device of the packed tensors ({device}), got {cu_seqlens.device}")
    if not values or cu_seqlens.device.type != "cpu" or _is_fake(cu_seqlens):
        return
    offs = cu_seqlens.tolist()
    if offs[0] != 0:
        raise ValueError(f"{op}: {name} must start at 0, got {offs[0]}")
    for j in range(1, len(offs)):
        if offs[j] < offs[j - 1]:
            raise ValueError(
                f"{op}: {name} must be non-decreasing, got {offs[j - 1]} then {offs[j]} at index {j}"
            )
    if offs[-1] != total:
        raise ValueError(f"{op}: {name} must end at the number of packed tokens {total}, got {offs[-1]}")


def _is_fake(t: Tensor) -> bool:
    if t.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return is_fake(t)


def cu_seqlens_invalid(cu_seqlens: Tensor, total: int) -> Tensor:
    """0-d bool tensor on ``cu_seqlens``' device: True iff the offsets are not valid for ``total``.

    A few element-wise ops, no host sync (CUDA-graph capturable): for CUDA launchers, which pass the
    flag to their kernels instead of raising.
    """
    c = cu_seqlens.to(torch.int64)
    bad = (c[0] != 0) | (c[-1] != total)
    if c.shape[0] > 1:
        bad = bad | (c[1:] < c[:-1]).any()
    return bad


def cu_seqlens_from_lengths(lengths: Tensor, dtype: torch.dtype = torch.int32) -> Tensor:
    """(N,) document lengths -> (N + 1,) offsets ``[0, l0, l0 + l1, ...]`` (no host sync on CUDA).

    On CPU the lengths are checked: >= 0, and a total that does not fit ``dtype`` raises instead
    of wrapping around.
    """
    if not isinstance(lengths, Tensor):
        raise TypeError(f"cu_seqlens_from_lengths: lengths must be a tensor, got {type(lengths).__name__}")
    if lengths.dim() != 1:
        raise ValueError(f"cu_seqlens_from_lengths: lengths must be 1-D, got shape {list(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"cu_seqlens_from_lengths: lengths must be an integer tensor, got {lengths.dtype}")
    if dtype not in _INDEX_DTYPES:
        raise TypeError(f"cu_seqlens_from_lengths: dtype must be torch.int32 or torch.int64, got {dtype}")
    if lengths.device.type == "cpu" and lengths.numel() and bool((lengths < 0).any()):
        raise ValueError("cu_seqlens_from_lengths: lengths must be >= 0")
    if lengths.device.type == "cpu" and lengths.numel():
        # Summed in fp64 so that an int64 overflow cannot hide itself (the bound is approximate
        # only within fp64 rounding of int64's maximum).
        total = float(lengths.to(torch.float64).sum())
        if total > torch.iinfo(dtype).max:
            raise ValueError(
                f"cu_seqlens_from_lengths: the total length {total:.0f} does not fit dtype {dtype}"
            )
    out = torch.zeros(lengths.shape[0] + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths.to(torch.int64), 0, out=out[1:])
    return out.to(dtype)


def cu_seqlens_from_position_ids(position_ids: Tensor, dtype: torch.dtype = torch.int32) -> Tensor:
    """Document offsets of a packed batch from its position ids, as transformers packs them.

    ``DataCollatorWithFlattening`` concatenates the examples into one row and restarts
    ``position_ids`` at 0 for each: a document starts at every 0 (and at the first token). A 2-D
    ``position_ids`` (R, T) is read row after row (a row start also starts a document), which matches
    packed data reshaped to (R * T, ...).

    Args:
        position_ids: (total,) or (R, T) integer tensor.
        dtype: int32 (FlashAttention's convention, default) or int64.

    Returns:
        (N + 1,) ``dtype`` offsets on ``position_ids``' device. The number of documents depends on
        the values, so this reads them (one device sync on CUDA): call it once per batch, outside
        compiled regions.
    """
    if not isinstance(position_ids, Tensor):
        raise TypeError(f"cu_seqlens_from_position_ids: position_ids must be a tensor, got {type(position_ids).__name__}")
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"cu_seqlens_from_position_ids: position_ids must be an integer tensor, got {position_ids.dtype}")
    if position_ids.dim() not in (1, 2):
        raise ValueError(
            "cu_seqlens_from_position_ids: position_ids must have shape (total,) or (R, T), "
            f"got shape {list(position_ids.shape)}"
        )
    if dtype not in _INDEX_DTYPES:
        raise TypeError(f"cu_seqlens_from_position_ids: dtype must be torch.int32 or torch.int64, got {dtype}")
    p = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
    starts = p == 0
    if p.shape[1] > 0:
        starts[:, 0] = True
    total = p.numel()
    idx = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
    end = torch.tensor([total], dtype=idx.dtype, device=idx.device)
    return torch.cat([idx, end]).to(dtype)


def max_seqlen(cu_seqlens: Tensor) -> int:
    """Length of the longest document (0 without documents); reads the values (a sync on CUDA)."""
    if cu_seqlens.numel() < 2:
        return 0
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())


def document_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """(total,) int64: the document of each packed token (valid offsets assumed; no host sync)."""
    c = cu_seqlens.to(torch.int64)
    n_docs = c.shape[0] - 1
    return torch.repeat_interleave(
        torch.arange(n_docs, device=c.device), c[1:] - c[:-1], output_size=total
    )


def positions_in_document(cu_seqlens: Tensor, total: int, doc: Optional[Tensor] = None) -> Tensor:
    """(total,) int64: each token's position inside its document (valid offsets assumed)."""
    if doc is None:
        doc = document_ids(cu_seqlens, total)
    return torch.arange(total, device=cu_seqlens.device) - cu_seqlens.to(torch.int64)[doc]
