"""Loads trajops._C, defines the op schemas when it is absent, and registers kernels by device.

Backends (TRAJOPS_BACKEND, read once at import):
  auto       CPU -> C++ (trajops._C) or the reference if it is not built; CUDA -> Triton, or the
             reference if triton is not installed; any other device -> the reference.
  reference  every device runs the pure-PyTorch reference (debugging; _C is not loaded).
  triton     CUDA -> Triton, and CPU tensors too when TRITON_INTERPRET=1 (the Triton interpreter;
             this is how the Triton kernels are tested on a machine without a GPU).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Callable, Dict, Optional

import torch

__all__ = ["BACKEND", "HAS_EXTENSION", "HAS_TRITON", "SCHEMAS", "backends", "register_kernels"]

# The C++ TORCH_LIBRARY block in csrc/trajops.cpp defines the same strings; tests compare them.
SCHEMAS: Dict[str, str] = {
    "trajectory_flow": "trajectory_flow(Tensor x, int window=8, float eps=1e-06, Tensor? cu_seqlens=None) -> Tensor",
    "trajectory_flow_with_stats": "trajectory_flow_with_stats(Tensor x, int window=8, float eps=1e-06, "
    "Tensor? cu_seqlens=None) -> (Tensor, Tensor)",
    "trajectory_flow_backward": "trajectory_flow_backward(Tensor grad_out, Tensor x, int window, float eps, "
    "Tensor? cu_seqlens=None, Tensor? stats=None) -> Tensor",
    "stp_loss": "stp_loss(Tensor[] hidden, Tensor triples, Tensor? lengths=None, Tensor? cu_seqlens=None) -> "
    "(Tensor, Tensor)",
    "stp_loss_backward": "stp_loss_backward(Tensor grad_loss, Tensor stats, Tensor[] hidden, Tensor triples, "
    "Tensor? lengths, Tensor? cu_seqlens=None) -> Tensor[]",
    "stp_loss_dense": "stp_loss_dense(Tensor[] hidden, Tensor? lengths=None, Tensor? cu_seqlens=None) -> "
    "(Tensor, Tensor)",
    "stp_loss_dense_backward": "stp_loss_dense_backward(Tensor grad_loss, Tensor stats, Tensor[] hidden, "
    "Tensor? lengths, Tensor? cu_seqlens=None) -> Tensor[]",
    "kv_relevance": "kv_relevance(Tensor traj_pool, Tensor ts_pool, Tensor live_pool, Tensor page_table, "
    "Tensor query, Tensor now, float alpha, float decay) -> Tensor",
    "kv_topk": "kv_topk(Tensor traj_pool, Tensor ts_pool, Tensor live_pool, Tensor page_table, Tensor query, "
    "Tensor now, float alpha, float decay, int k) -> (Tensor, Tensor)",
    "kv_evict_append_": "kv_evict_append_(Tensor(a!) traj_pool, Tensor(b!) ts_pool, Tensor(c!) live_pool, "
    "Tensor(d!) pinned_pool, Tensor(e!) page_table, Tensor(f!) live_count, Tensor capacity, Tensor(g!) free_pages, "
    "Tensor(h!) free_top, Tensor(i!) evicted_total, Tensor now, Tensor new_traj, Tensor lengths, Tensor? pin, "
    "float alpha, float decay, Tensor(j!)? pos_pool=None, Tensor(k!)? next_position=None) -> (Tensor, Tensor, Tensor)",
    "kv_write_": "kv_write_(Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor written, Tensor k, Tensor v) -> ()",
    "paged_temperature_attention": "paged_temperature_attention(Tensor q, Tensor k_pool, Tensor v_pool, "
    "Tensor page_table, Tensor live_pool, Tensor tau, Tensor? slots=None, float? scale=None, Tensor? k_new=None, "
    "Tensor? v_new=None) -> (Tensor, Tensor)",
    "adaptive_positional_encoding": "adaptive_positional_encoding(Tensor displacement, Tensor pe_table, "
    "Tensor? positions=None) -> Tensor",
    "adaptive_positional_encoding_backward": "adaptive_positional_encoding_backward(Tensor grad_out, "
    "Tensor displacement, Tensor pe_table, Tensor? positions, bool need_table) -> (Tensor, Tensor, Tensor)",
    "temperature_attention": "temperature_attention(Tensor q, Tensor k, Tensor v, Tensor tau, Tensor? attn_mask=None, "
    "bool causal=False, float? scale=None) -> (Tensor, Tensor)",
    "temperature_attention_backward": "temperature_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, "
    "Tensor k, Tensor v, Tensor tau, Tensor? attn_mask, bool causal, float? scale, Tensor out, Tensor lse) -> "
    "(Tensor, Tensor, Tensor, Tensor)",
    "temperature_attention_varlen": "temperature_attention_varlen(Tensor q, Tensor k, Tensor v, Tensor tau, "
    "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, float? scale) -> "
    "(Tensor, Tensor)",
    "temperature_attention_varlen_backward": "temperature_attention_varlen_backward(Tensor grad_out, "
    "Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor tau, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    "int max_seqlen_q, int max_seqlen_k, bool causal, float? scale, Tensor out, Tensor lse) -> "
    "(Tensor, Tensor, Tensor, Tensor)",
}

_CHOICES = ("auto", "reference", "triton")
BACKEND = os.environ.get("TRAJOPS_BACKEND", "auto").strip().lower() or "auto"
if BACKEND not in _CHOICES:
    raise ValueError(f"TRAJOPS_BACKEND must be one of {_CHOICES}, got {BACKEND!r}")

HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_extension() -> bool:
    if BACKEND != "auto":
        return False
    try:
        from trajops import _C  # noqa: F401  (importing runs the C++ registrations)
    except ImportError as exc:
        warnings.warn(
            f"trajops: the C++ extension trajops._C could not be loaded ({exc}); CPU ops run the "
            "pure-PyTorch reference. Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


HAS_EXTENSION = _load_extension()

if not HAS_EXTENSION:
    _lib = torch.library.Library("trajops", "DEF")  # kept alive for the life of the process
    for _schema in SCHEMAS.values():
        _lib.define(_schema)


def backends() -> Dict[str, str]:
    """What each device runs: e.g. {"cpu": "cpp", "cuda": "triton", "other": "reference"}."""
    if BACKEND == "reference":
        return {"cpu": "reference", "cuda": "reference", "other": "reference"}
    if BACKEND == "triton":
        return {"cpu": "triton-interpreter" if _INTERPRET else "reference", "cuda": "triton", "other": "reference"}
    return {
        "cpu": "cpp" if HAS_EXTENSION else "reference",
        "cuda": "triton" if HAS_TRITON else "reference",
        "other": "reference",
    }


def triton_runs_on(device: torch.device) -> bool:
    """Whether the ops registered with a Triton kernel dispatch to it on ``device`` (CUDA with Triton; CPU under
    TRAJOPS_BACKEND=triton TRITON_INTERPRET=1). Internal callers whose arguments were already checked (e.g. the
    later layers of a decode step) may then call the launcher directly: on a GPU a decode step is host-bound."""
    kind = device.type if device.type in ("cpu", "cuda") else "other"
    return backends()[kind] in ("triton", "triton-interpreter") and importlib.util.find_spec(
        "trajops.triton_kernels") is not None


def register_kernels(op: str, reference: Callable, triton: Optional[Callable]) -> None:
    """Registers `reference` for every device without a kernel and `triton` where BACKEND says.

    The C++ CPU kernel needs no registration here: trajops._C registers it when it is loaded.
    ``triton=None`` (an op without Triton kernels yet) leaves CUDA on the reference.
    """
    qualname = f"trajops::{op}"
    torch.library.register_kernel(qualname, None, reference)  # CompositeExplicitAutograd
    chosen = backends()
    for device in ("cpu", "cuda"):
        if chosen[device].startswith("triton") and triton is not None:
            torch.library.register_kernel(qualname, device, triton)
        elif chosen[device] == "reference":
            torch.library.register_kernel(qualname, device, reference)
