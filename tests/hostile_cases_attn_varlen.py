"""Hostile cases of temperature_attention on packed documents (cu_seqlens_q/k) and its raw ops.

Corrupt offsets (decreasing, not starting at 0, not ending at the token count, wrong dtype or rank,
one N for q and another for k), a max_seqlen below the longest document, 4-D q with cu_seqlens:
named errors, the same text on every backend. Result cases: NaN/Inf in one document never reaches
another; empty documents; a raw backward with a NaN grad_out row. On the Triton interpreter the
result cases need triton_kernels/temperature_attention_varlen.py (another branch) and are left out
while it is absent (the raising cases run: the checks come before the kernel).
"""
from __future__ import annotations

import importlib.util
import math

import torch

import trajops
from hostile_cases import RESULT, check, check_shape, raises, register, same

OP, BWD, PUB = ("torch.ops.trajops.temperature_attention_varlen",
                "torch.ops.trajops.temperature_attention_varlen_backward", "trajops.temperature_attention")
_KERNELS = trajops.backends()["cpu"] != "triton-interpreter" or \
    importlib.util.find_spec("trajops.triton_kernels.temperature_attention_varlen") is not None


def packed(lq=(2, 3), lk=(3, 4), Hq=2, Hkv=1, D=4, Dv=3):
    q, k, v = torch.randn(sum(lq), Hq, D), torch.randn(sum(lk), Hkv, D), torch.randn(sum(lk), Hkv, Dv)
    cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0).tolist()), dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(lq), cu(lk)


def _case(name, fn, expect=RESULT, targets=(PUB, OP)):
    register(f"temperature_attention_varlen.{name}", fn, expect, *targets)


# ---------------------------------------------------------------- bad arguments (raise everywhere)
def _bad(name, expect, **over):
    def fn():
        q, k, v, cu_q, cu_k = packed()
        d = dict(q=q, k=k, v=v, tau=1.0, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        d.update(over)
        trajops.temperature_attention(**d)
    _case(name, fn, expect)


I32 = torch.int32
_bad("cu_q_decreasing", raises("cu_seqlens_q", also=("non-decreasing",)),
     cu_seqlens_q=torch.tensor([0, 4, 2, 5], dtype=I32), cu_seqlens_k=torch.tensor([0, 3, 3, 7], dtype=I32))
_bad("cu_q_negative_start", raises("cu_seqlens_q"), cu_seqlens_q=torch.tensor([-1, 2, 5], dtype=I32))
_bad("cu_k_past_the_end", raises("cu_seqlens_k", also=("end at",)), cu_seqlens_k=torch.tensor([0, 3, 99], dtype=I32))
_bad("cu_k_huge", raises("cu_seqlens_k"), cu_seqlens_k=torch.tensor([0, 2**40, 7], dtype=torch.int64))
_bad("cu_q_float", raises("cu_seqlens_q"), cu_seqlens_q=torch.tensor([0.0, 2.0, 5.0]))
_bad("cu_q_uint8", raises("cu_seqlens_q"), cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.uint8))
_bad("cu_k_empty", raises("cu_seqlens_k"), cu_seqlens_k=torch.zeros(0, dtype=I32))
_bad("cu_k_2d", raises("cu_seqlens_k"), cu_seqlens_k=torch.tensor([[0, 3, 7]], dtype=I32))
_bad("cu_different_n", raises("cu_seqlens_q", "cu_seqlens_k"), cu_seqlens_k=torch.tensor([0, 7], dtype=I32))
_bad("cu_q_only", raises("cu_seqlens_k"), cu_seqlens_k=None)
_bad("cu_with_attn_mask", raises("attn_mask"), attn_mask=torch.ones(5, 7, dtype=torch.bool))
_bad("q_4d_with_cu", raises("q"), q=torch.randn(1, 2, 5, 4))
_bad("max_seqlen_q_too_small", raises("max_seqlen_q"), max_seqlen_q=1)
_bad("max_seqlen_k_negative", raises("max_seqlen_k"), max_seqlen_k=-5)
_bad("max_seqlen_q_float", raises("max_seqlen_q"), max_seqlen_q=3.0)
_bad("tau_token_major_mismatch", raises("tau"), tau=torch.ones(2, 5))  # (Hq, total_q): the dense layout
_bad("scale_nan", raises("scale"), scale=math.nan)


def _raw_backward_bad_lse():
    q, k, v, cu_q, cu_k = packed()
    out, lse = torch.zeros(5, 2, 3), torch.zeros(2, 5)  # lse in FlashAttention's (Hq, total_q) layout
    torch.ops.trajops.temperature_attention_varlen_backward(torch.ones(5, 2, 3), None, q, k, v, torch.tensor(1.0),
                                                            cu_q, cu_k, 3, 4, False, None, out, lse)


_case("raw_backward_lse_head_major", _raw_backward_bad_lse, raises("lse"), targets=(BWD,))


# ---------------------------------------------------------------- results (documents stay apart)
def _nan_in_other_document():
    q, k, v, cu_q, cu_k = packed()
    clean = trajops.temperature_attention(q, k, v, 0.9, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    k[0, 0, 1], v[2, 0, 0] = math.nan, math.inf  # keys of document 0 only
    out, lse = trajops.temperature_attention(q, k, v, 0.9, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    check(bool(out[:2].isnan().all() and lse[:2].isnan().all()), "document 0's rows must be NaN")
    same(out[2:], clean[0][2:], "document 1's out vs a clean run", 1e-6)
    same(lse[2:], clean[1][2:], "document 1's lse vs a clean run", 1e-6)


def _empty_documents():
    q, k, v, cu_q, cu_k = packed(lq=(0, 3, 2, 0), lk=(2, 0, 4, 0))
    tau = torch.ones(5, 2, requires_grad=True)
    out, lse = trajops.temperature_attention(q, k, v, tau, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                             return_lse=True)
    check_shape(out, (5, 2, 3), "out")
    check(bool((out[:3] == 0).all() and (lse[:3] == -math.inf).all()), "a document without keys: out 0, lse -inf")
    check(bool(torch.isfinite(out[3:]).all()), "the other document is finite")
    (out.sum() + lse[3:].sum()).backward()
    same(tau.grad[:3], torch.zeros(3, 2), "dtau of rows without keys")


def _no_tokens():
    q, k, v, cu_q, cu_k = packed(lq=(), lk=())
    out, lse = trajops.temperature_attention(q, k, v, 1.0, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    check_shape(out, (0, 2, 3), "out")
    check_shape(lse, (0, 2), "lse")


def _raw_backward_nan_grad_row():
    q, k, v, cu_q, cu_k = packed()
    tau = torch.tensor(1.0)
    out, lse = torch.ops.trajops.temperature_attention_varlen(q, k, v, tau, cu_q, cu_k, 3, 4, False, None)
    g = torch.ones_like(out)
    g[3, 0, 0] = math.nan  # a row of document 1
    dq, dk, dv, dtau = torch.ops.trajops.temperature_attention_varlen_backward(g, None, q, k, v, tau, cu_q, cu_k, 3,
                                                                               4, False, None, out, lse)
    check(bool(dq[3, 0].isnan().all() and dtau.isnan()), "the NaN row's dq and the (scalar) dtau are NaN")
    check(bool(torch.isfinite(dq[:2]).all() and torch.isfinite(dk[:3]).all() and torch.isfinite(dv[:3]).all()),
          "document 0's gradients stay finite")
    check(bool(dk[3:].isnan().all() and dv[3:].isnan().all()), "every key of document 1 meets the NaN row")


if _KERNELS:
    _case("nan_in_other_document", _nan_in_other_document)
    _case("empty_documents", _empty_documents, targets=(PUB, OP, BWD))
    _case("no_tokens", _no_tokens)
    _case("raw_backward_nan_grad_row", _raw_backward_nan_grad_row, targets=(OP, BWD))
