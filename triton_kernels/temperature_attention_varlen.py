"""Host launchers of attention with a per-query temperature over packed variable-length documents
(FlashAttention's varlen layout; the conventions: trajops/varlen.py). The kernels are the dense ones
(temperature_attention.py, temperature_attention_bwd.py, temperature_attention_nonfinite.py) compiled
with ``VARLEN=True``, so tiles, the shared-memory budget, the OutOfResources fallback and the NaN/Inf
rule are theirs.

* :func:`attention_varlen_fwd` ``(q, k, v, tau, scale, cu_q, cu_k, max_q, max_k, causal) -> (out, lse)``
* :func:`attention_varlen_bwd` ``(grad_out, grad_lse, q, k, v, tau, scale, cu_q, cu_k, max_q, max_k, causal,
  out, lse) -> (dq, dk, dv, dtau)``

q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), any strides; tau (total_q, Hq) of any
float dtype and any strides (0 strides for broadcast values); cu_q, cu_k (N + 1,) int32/int64 on the
device of q. Document j is query tokens cu_q[j] .. cu_q[j + 1] against key tokens cu_k[j] .. cu_k[j + 1];
the result equals the dense op on each document alone (B = 1): bottom-right causal per document, a
row without keys (an empty key document, or causal with more queries than keys) has out 0 and lse
-inf, and the NaN/Inf rule holds per document (a NaN in one document never reaches another).
Outputs: out (total_q, Hq, Dv) in q's dtype, lse (total_q, Hq) and dtau (total_q, Hq) per query row
in the compute dtype (fp32, fp64 for fp64), dq, dk, dv contiguous in the inputs' shapes.

How VARLEN works: the grids are (cdiv(max_q, BLOCK_M), N * Hq) (forward, dq), (cdiv(max_k, BLOCK_N),
N * Hkv) (dk/dv, key flags) and (cdiv(max_q * Hq, BLOCK_R), N) (delta). A program reads its document's
offsets from cu_q / cu_k, clamps them into [0, total] (no access outside a tensor whatever they
hold), offsets its token axis by the document's start and uses the document's lengths; programs past
their document's end do no work and store nothing. The packed tensors are passed as (B, H, T, D)
views with a zero batch stride. Row statistics (lse, delta, dtau) are (total_q, Hq), row
token * Hq + head. The NaN/Inf split works per (document, kv head): the key flags are (Hkv, total_k)
and their "first flagged key" per (document, kv head), so a NaN in one document sends only that
document's heads to the HOSTILE launches.

Invalid offsets (not starting at 0, decreasing, not ending at total, a document longer than max_q /
max_k, which would leave rows unwritten) are detected by a 0-d device flag without a host sync
(trajops.varlen.cu_seqlens_invalid and two max reductions): every output is then NaN. cu_q and cu_k
of different lengths raise ValueError (shapes are host facts).

Cost, against the dense kernels on the same tokens (sum over documents of the dense cost of each):
FLOPs 4 * Hq * D * sum_j Tq_j * Tk_j forward (about half causal), 2.5x that backward, i.e. no work on
the padding a padded batch would compute. HBM bytes as the dense kernels per document, plus the
offsets (2 int reads per program) and, per output, one masked_fill pass that writes NaN only when the
flag is set (on CUDA it reads every output once more: out, lse forward; dq, dk, dv, dtau backward --
about 1 + Dv / (2 D) of the forward's q read; on CPU tensors the flag is read first and the pass
skipped when clean). Grids are sized by the longest document: with very unequal documents, programs
of the short ones exit at once (a few microseconds per thousand). Launches: forward 4 + the flag
(~6 tiny element-wise ops) + 2 masked_fill; backward as the dense one + the same.

AOT resources (tests/triton_resources.py --filter varlen --full; Triton 3.9 results in
bench/results/aot_varlen_attention_triton-3.9.jsonl, 252 launches for sm_90 + sm_80, taken before the
2-warp HOSTILE change below): every variant compiles and fits shared memory on both. Register spills:
the dense ones at the same tiles (bf16/fp16 dk/dv at the measured-fastest tiles, D=256 dq and D=256
pointer forward: 312 B against the dense pointer forward's 240 B, which the dense op avoids on sm_90
through TMA), and, new with VARLEN (the document's offsets and lengths are loaded values held in
registers, where the dense Tq / Tk are kernel arguments): the fp32 D=256 forward on sm_90 (1752 B
causal, 8 B not; dense 0) and the 16 x 16 HOSTILE dk/dv of bf16 D=256 (24 B) and fp32 D=128 (8 B)
(the HOSTILE dq of bf16 D=64 / D=128 spilled 16 / 8 B on 4 warps: now on 2, see _hostile); on sm_80
also the fp32 D=256 forward (16-40 B) and fp32 D=64 forward / dq (8-16 B), not compared with the
dense kernels there (the dense sm_80 check covers bf16 D=128 only). Not retuned (no GPU to time
smaller tiles against the spill); the CI checks bf16 D=128 causal only. Triton 3.6 (the lowest;
bench/results/aot_varlen_attention_triton-3.6-sm{90,80}.jsonl): all compile and fit; spills in the
same dense classes (half-precision dk/dv, D=256), plus fp32 D=64 causal forward (sm_90, 8 B) and
fp32 dq (sm_80: D=256 8 B, D=64 16 B).

Not done for VARLEN (dense-only): attn_mask (no MASK_KIND), the Hopper TMA forward (a 4-D TMA box
cannot stop at a document's end), and the opt-in atomic-dq backward; VARLEN always takes the pointer
forward and the two-kernel backward. The grid's second axis (N * Hq) is bounded by CUDA's 65535 as
the dense B * Hq is.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from ._common import INTERPRET, cdiv, device_spec, launch, next_power_of_2
from .temperature_attention import _block, _candidates, _fwd_kernel, _hostile_tiles, _precision, _scale_pair
from .temperature_attention_bwd import _delta_kernel, _dkdv_kernel, _dq_kernel
from .temperature_attention_nonfinite import NO_FLAGGED_KEY, any_hostile, key_flags_varlen

__all__ = ["attention_varlen_fwd", "attention_varlen_bwd", "offsets_invalid"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_offsets(cu_q: torch.Tensor, cu_k: torch.Tensor) -> int:
    """N, the number of documents; the offsets' shapes must agree (a host fact: no sync)."""
    for name, cu in (("cu_q", cu_q), ("cu_k", cu_k)):
        if cu.dim() != 1 or cu.shape[0] < 1 or cu.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"temperature_attention (varlen): {name} must be a (N + 1,) int32/int64 tensor, "
                             f"got shape {list(cu.shape)} and {cu.dtype}")
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError(f"temperature_attention (varlen): cu_q and cu_k must have one length N + 1, got "
                         f"{cu_q.shape[0]} and {cu_k.shape[0]}")
    return cu_q.shape[0] - 1


def offsets_invalid(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int, max_q: int,
                    max_k: int) -> torch.Tensor:
    """0-d bool on the offsets' device, no host sync: the offsets are not valid for the packed totals,
    or a document is longer than max_q / max_k (the grids would leave its last rows unwritten)."""
    from trajops.varlen import cu_seqlens_invalid

    bad = cu_seqlens_invalid(cu_q, total_q) | cu_seqlens_invalid(cu_k, total_k)
    if cu_q.shape[0] > 1:
        bad = bad | ((cu_q[1:] - cu_q[:-1]).max() > max_q) | ((cu_k[1:] - cu_k[:-1]).max() > max_k)
    return bad


def _poison(bad: torch.Tensor, *outs: torch.Tensor) -> None:
    """Every element of ``outs`` NaN where ``bad`` (0-d) is set. On CPU tensors the flag is read (free)
    and a clean call costs nothing; on a GPU a masked_fill per output, no sync."""
    if bad.device.type == "cpu":
        if bool(bad):
            for t in outs:
                t.fill_(float("nan"))
        return
    for t in outs:
        t.masked_fill_(bad, float("nan"))


def _strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    """(batch, head, token, dim) strides of a packed (total, H, D) tensor seen as (B, H, T, D) with a
    zero batch stride (the document's start comes from the offsets)."""
    return 0, t.stride(1), t.stride(0), t.stride(2)


def _hostile(kind: str, es: int, bd: int, bdv: int):
    """The HOSTILE launches' tiles (the dense ones: 16 x 16), on 2 warps in half precision up to head
    size 128: the document's offsets and lengths held in registers made the 4-warp 16 x 16 dq spill
    (8 B bf16 D=128 with Triton 3.6, 16 B D=64 with 3.9; AOT, sm_90); on 2 warps D=64 and D=128
    compile without spills (D=256 spills more on 2 warps than on 4: 24-40 B, kept on 4). These
    launches serve only the heads a NaN/Inf reaches."""
    cfgs = _hostile_tiles(kind, es, bd, bdv, 0)
    if es != 2 or max(bd, bdv) > 128 or INTERPRET:
        return cfgs
    return tuple(dataclasses.replace(c, num_warps=2) for c in cfgs)


def _what(q, v, causal: bool, backward: bool = False) -> str:
    return (f"temperature_attention (varlen) on {q.device} ({str(q.dtype).replace('torch.', '')}, D={q.shape[2]}, "
            f"Dv={v.shape[2]}, causal={bool(causal)})" + (" backward" if backward else ""))


def attention_varlen_fwd(q, k, v, tau, scale: float, cu_q, cu_k, max_q: int, max_k: int, causal: bool
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """out (total_q, Hq, Dv) in q's dtype, lse (total_q, Hq) in the compute dtype; see the module docstring."""
    total_q, Hq, D = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    Dv = v.shape[2]
    N = _check_offsets(cu_q, cu_k)
    max_q, max_k = int(max_q), int(max_k)
    out = torch.empty((total_q, Hq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((total_q, Hq), dtype=_compute_dtype(q.dtype), device=q.device)
    if total_q * Hq == 0:
        return out, lse
    bad = offsets_invalid(cu_q, cu_k, total_q, total_k, max_q, max_k)
    if N == 0 or max_q <= 0:  # no row can be valid (the flag is set): nothing to launch
        pass
    elif total_k == 0 or max_k <= 0:  # every document is without keys (or the flag is set)
        out.zero_()
        lse.fill_(float("-inf"))
    else:
        tau = tau.expand(total_q, Hq)
        kf, first = key_flags_varlen(k, v, cu_k, max_k)
        bd, bdv = _block(D), _block(Dv)
        es = q.element_size()
        cands = _candidates("fwd", es, bd, bdv, 0, max_q, device_spec(q.device).capability[0])
        key = ("fwd", q.dtype, bd, bdv, 0, bool(causal), max_q <= 16, "varlen")
        grid = lambda cfg: (cdiv(max_q, cfg["BLOCK_M"]), N * Hq)  # noqa: E731
        args = (q, k, v, tau, q, out, lse, kf, first, cu_q, cu_k, *_strides(q), *_strides(k), *_strides(v),
                0, tau.stride(1), tau.stride(0), 0, 0, 0, 0, *_strides(out), *_scale_pair(scale),
                Hq, Hkv, Hq // Hkv, max_q, max_k, D, Dv, total_q, total_k)
        flags = dict(CAUSAL=bool(causal), MASK_KIND=0, PREC=_precision(q.dtype), EVEN_D=D == bd, EVEN_DV=Dv == bdv,
                     VARLEN=True, BLOCK_D=bd, BLOCK_DV=bdv)
        what = _what(q, v, causal)
        launch(_fwd_kernel, grid, args, cands, key, q.device, what, HOSTILE=False, **flags)
        if any_hostile(first, NO_FLAGGED_KEY):  # the (document, kv head)s with a flagged key, small tiles
            launch(_fwd_kernel, grid, args, _hostile("fwd", es, bd, bdv), key + ("hostile",), q.device,
                   what, HOSTILE=True, **flags)
    _poison(bad, out, lse)
    return out, lse


def attention_varlen_bwd(grad_out, grad_lse: Optional[torch.Tensor], q, k, v, tau, scale: float, cu_q, cu_k,
                         max_q: int, max_k: int, causal: bool, out, lse):
    """(dq, dk, dv) contiguous in q's, k's, v's shapes and dtypes, and dtau (total_q, Hq) per query row in
    the compute dtype (0 on rows without a key), to be summed to tau's shape by the caller."""
    total_q, Hq, D = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    Dv = v.shape[2]
    N = _check_offsets(cu_q, cu_k)
    max_q, max_k = int(max_q), int(max_k)
    cdt = _compute_dtype(q.dtype)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    dtau = torch.empty((total_q, Hq), dtype=cdt, device=q.device)
    bad = offsets_invalid(cu_q, cu_k, total_q, total_k, max_q, max_k)
    if total_q * Hq == 0 or total_k == 0 or N == 0 or max_q <= 0 or max_k <= 0:
        for t in (dq, dk, dv, dtau):
            t.zero_()
        _poison(bad, dq, dk, dv, dtau)
        return dq, dk, dv, dtau
    tau = tau.expand(total_q, Hq)
    grad_out = grad_out.contiguous()
    out = out.contiguous()
    lse = lse.contiguous()
    delta = torch.empty((total_q, Hq), dtype=cdt, device=q.device)
    lse2 = torch.empty_like(delta)  # lse, NaN on the rows whose gradients the NaN/Inf rule makes NaN
    rf = torch.empty((total_q, Hq), dtype=torch.uint8, device=q.device)  # rows whose q and dO load as 0
    kf, first = key_flags_varlen(k, v, cu_k, max_k)
    host = torch.zeros((N * Hkv,), dtype=torch.int32, device=q.device)  # (document, kv head)s with an rf row
    dlse = grad_lse.contiguous() if grad_lse is not None else delta
    bd, bdv = _block(D), _block(Dv)
    block_r = 16 if INTERPRET else max(16, min(64, next_power_of_2(12288 // (2 * bdv + bd) + 1) // 2))
    _delta_kernel[(cdiv(max_q * Hq, block_r), N)](
        out, grad_out, dlse, lse, q, delta, lse2, rf, host, cu_q, total_q * Hq, Hq, Hkv, Hq // Hkv, max_q, D, Dv,
        *_strides(q), total_q, HAS_DLSE=grad_lse is not None, VARLEN=True, BLOCK_R=block_r, BLOCK_D=bd,
        BLOCK_DV=bdv)
    es = q.element_size()
    what = _what(q, v, causal, backward=True)
    flags = dict(CAUSAL=bool(causal), MASK_KIND=0, PREC=_precision(q.dtype), EVEN_D=D == bd, EVEN_DV=Dv == bdv,
                 VARLEN=True, BLOCK_D=bd, BLOCK_DV=bdv)
    key = (q.dtype, bd, bdv, 0, bool(causal), "varlen")
    sp = _scale_pair(scale)
    major = device_spec(q.device).capability[0]
    tau_st = (0, tau.stride(1), tau.stride(0))
    no_mask = (0, 0, 0, 0)
    tail = (*sp, Hq, Hkv, Hq // Hkv, max_q, max_k, D, Dv, total_q, total_k)
    dkdv_grid = lambda cfg: (cdiv(max_k, cfg["BLOCK_N"]), N * Hkv)  # noqa: E731
    dkdv_args = (q, k, v, tau, q, grad_out, lse2, delta, rf, kf, first, host, dk, dv, delta, cu_q, cu_k,
                 *_strides(q), *_strides(k), *_strides(v), *tau_st, *no_mask, *_strides(grad_out), *_strides(dk),
                 *_strides(dv), *tail)
    dq_grid = lambda cfg: (cdiv(max_q, cfg["BLOCK_M"]), N * Hq)  # noqa: E731
    dq_args = (q, k, v, tau, q, grad_out, lse2, delta, rf, kf, first, host, dq, dtau, cu_q, cu_k,
               *_strides(q), *_strides(k), *_strides(v), *tau_st, *no_mask, *_strides(grad_out), *_strides(dq),
               *tail)
    launch(_dkdv_kernel, dkdv_grid, dkdv_args, _candidates("dkdv", es, bd, bdv, 0, max_q, major),
           ("dkdv", False) + key, q.device, what, ATOMIC_DQ=False, HOSTILE=False, **flags)
    launch(_dq_kernel, dq_grid, dq_args, _candidates("dq", es, bd, bdv, 0, max_q, major), ("dq",) + key, q.device,
           what, HOSTILE=False, **flags)
    if any_hostile(first, NO_FLAGGED_KEY, host):
        launch(_dkdv_kernel, dkdv_grid, dkdv_args, _hostile("dkdv", es, bd, bdv),
               ("dkdv", "hostile") + key, q.device, what, ATOMIC_DQ=False, HOSTILE=True, **flags)
        launch(_dq_kernel, dq_grid, dq_args, _hostile("dq", es, bd, bdv), ("dq", "hostile") + key,
               q.device, what, HOSTILE=True, **flags)
    _poison(bad, dq, dk, dv, dtau)
    return dq, dk, dv, dtau
