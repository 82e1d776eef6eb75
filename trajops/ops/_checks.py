"""Argument checks shared by several ops (the C++ kernels spell the same messages; see each op).

Every check names the op first (``f"{op}: ..."``) and the argument, and raises through
:func:`check_value` / :func:`check_type` / :func:`check` (``torch._check_*`` semantics) so that fake impls
(torch.compile) raise the same errors as the kernels. Per-op checks stay in their op's module; what two
ops check alike lives here.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["DTYPES", "broadcastable", "check", "check_backward_tensors", "check_head_sizes", "check_qkv", "check_type",
           "check_value"]


# torch._check_value & co. cost ~2 us each (SymBool handling), and an op's Python checks make 10-20 of them
# per call: on a GPU, where those checks run on the host before every launch, that was ~35 us of a decode
# call's host time. A condition that is a plain Python bool takes the fast path (True: nothing to do); any
# other condition (a SymBool under torch.compile / fake tensors) goes to torch's own check, unchanged.
def check_value(cond, message: Callable[[], str]) -> None:
    """torch._check_value: ValueError(message()) unless cond."""
    if cond is True:
        return
    torch._check_with(ValueError, cond, message)


def check_type(cond, message: Callable[[], str]) -> None:
    """torch._check_type: TypeError(message()) unless cond."""
    if cond is True:
        return
    torch._check_with(TypeError, cond, message)


def check(cond, message: Callable[[], str]) -> None:
    """torch._check: RuntimeError(message()) unless cond."""
    if cond is True:
        return
    torch._check_with(RuntimeError, cond, message)

# The float dtypes every op accepts.
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def broadcastable(shape: Sequence[int], target: Sequence[int]) -> bool:
    """True iff ``shape`` broadcasts to ``target`` without growing its rank past target's."""
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


def check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor, tau: Tensor, rank: int, layout: str) -> None:
    """Rank, dtype and device of q, k, v and tau: the first checks of the dense (rank 4, (B, H, T, D))
    and the packed (rank 3, (total, H, D)) attention ops; csrc/cpu/temperature_attention.h
    (check_qkv) spells the same messages."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_value(
            t.dim() == rank,
            lambda: f"{op}: {name} must have shape {layout}, got shape {list(t.shape)}",
        )
    check_type(
        q.dtype in DTYPES, lambda: f"{op}: q must be float32, float64, float16 or bfloat16, got {q.dtype}"
    )
    check_type(
        k.dtype == q.dtype and v.dtype == q.dtype,
        lambda: f"{op}: q, k and v must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}",
    )
    check(
        k.device == q.device and v.device == q.device and tau.device == q.device,
        lambda: f"{op}: q, k, v and tau must be on one device, got {q.device}, {k.device}, {v.device} and "
        f"{tau.device}",
    )


def check_backward_tensors(op: str, q: Tensor, out_shape, lse_shape, grad_out: Tensor, out: Tensor, lse: Tensor,
                           grad_lse) -> None:
    """Shape, dtype and device of the attention backward's grad_out, out, lse and grad_lse (dense and
    packed ops; ``op`` is the backward's name)."""
    from ..reference._common import compute_dtype

    for name, t, shape, dtype in (
        ("grad_out", grad_out, tuple(out_shape), q.dtype),
        ("out", out, tuple(out_shape), q.dtype),
        ("lse", lse, tuple(lse_shape), compute_dtype(q.dtype)),
        ("grad_lse", grad_lse, tuple(lse_shape), None),
    ):
        if t is None:
            continue
        check_value(
            tuple(t.shape) == shape,
            lambda: f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}",
        )
        check_type(
            dtype is None or t.dtype == dtype, lambda: f"{op}: {name} must be {dtype}, got {t.dtype}"
        )
        check(t.device == q.device, lambda: f"{op}: {name} must be on {q.device}, got {t.device}")


def check_head_sizes(op: str, q: Tensor, k: Tensor, v: Tensor, tau: Tensor) -> None:
    """q and k share a head size D >= 1 (last dimension), v's is >= 1, tau is floating point: the
    dense and packed attention ops check these in this order after their head-count checks."""
    D = q.shape[-1]
    check_value(
        k.shape[-1] == D and D >= 1,
        lambda: f"{op}: q and k must have one head size D >= 1, got q {list(q.shape)} and k {list(k.shape)}",
    )
    check_value(v.shape[-1] >= 1, lambda: f"{op}: v must have a head size >= 1, got {list(v.shape)}")
    check_type(
        tau.is_floating_point(), lambda: f"{op}: tau must be a floating-point tensor, got {tau.dtype}"
    )
