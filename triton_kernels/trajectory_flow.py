"""Triton kernels for the windowed trajectory flow (semantics: :mod:`trajops.reference.trajectory_flow`).

The host launchers live here, the ``@triton.jit`` kernels in trajectory_flow_fwd.py and
trajectory_flow_bwd.py (the device helpers they share in trajectory_flow_helpers.py); op
registration and autograd are done elsewhere (trajops/ops/trajectory_flow.py). Public launchers
(x, grad_out: (B, T, D) contiguous, or (1, total, D) packed documents with ``cu_seqlens`` (N + 1,),
see trajops/varlen.py):

* :func:`trajectory_flow_fwd`        ``x -> out``
* :func:`trajectory_flow_fwd_stats`  ``x -> (out, stats)``, stats (2, B, T) in the compute dtype:
  ``stats[0, b, i] = n_i`` (step norms), ``stats[1, b, p] = a_p = 1 / S_p`` (0 where S_p = 0).
  Not differentiable; trajops::trajectory_flow_with_stats returns it and saves it for the backward.
  ``n`` at i = T-1 is 0 (no step); with cu_seqlens the step across a document boundary keeps its
  plain norm (in no window, never read). :func:`trajops.reference.trajectory_flow_stats` defines it.
* :func:`trajectory_flow_bwd`        ``(grad_out, x[, stats]) -> dL/dx``

Notation (per sequence or document): step ``d_i = x[i+1] - x[i]``, ``n_i = ||d_i||``,
``t_i = tanh(n_i)``, step i counts iff ``n_i > eps``; position p sees the steps i = p-k for
k = 1..ws_p, ``ws_p = min(window, p - start(p))`` (start(p): first token of p's document, 0 without
cu_seqlens), recency ``r(p, k) = (ws_p - k + 1) / ws_p``, ``S_p = sum_k r t``, ``a_p = 1 / S_p``,
``out_p = sum_k r (t / n) d / S_p``. A step that crosses a document boundary lies in no window.
``eps`` is a compile-time constant (fp64 compares against the exact fp64 eps, as the reference).

Design: one program per (sequence, BLOCK_T rows), owning the full D
------------------------------------------------------------------
Each program first reduces over D (walking D chunks) everything that needs a full-D reduction for
its rows and for the window's halo rows, keeps those per-row scalars in a private scratch slot, then
walks D again (in *reverse* chunk order, so the chunks it read last, still in L2, are re-read first)
to write its output tile. The halo is recomputed by each program (no cross-program dependency). The
scratch slots are O(B*T) fp32 per pass (a few bytes per row against 2*D bytes of a bf16 row).

Bytes (DRAM, e = element size, N = B*T*D; "L2" = the second walk over the program's rows):

==============  ==========================================  =====================================
                before (3 + 4 launches)                     now
==============  ==========================================  =====================================
forward         3 launches; x read 2x, out written 1x:       1 launch; x read 1x + L2, out 1x:
                3 N e (ideal 2 N e)                          2 N e (+ 8 B/row of stats)
backward        4 launches; x 3x, grad_out 2x, dx 1x:        1 launch with the forward's stats:
                6 N e (ideal 3 N e)                          x 1x + L2, grad_out 1x + L2, dx 1x:
                                                             3 N e (+ 8 B/row); without stats one
                                                             more launch reads x once: 4 N e
fwd + bwd       9 N e                                        5 N e, the issue's floor: the public
                                                             trajops.trajectory_flow on CUDA calls
                                                             trajops::trajectory_flow_with_stats,
                                                             which saves the stats; the raw op
                                                             trajops::trajectory_flow saves only x
                                                             (its backward recomputes them: 6 N e)
==============  ==========================================  =====================================

The second walk hits L2 only while the programs in flight fit in it: a program touches
(BLOCK_T + K + 1) rows of x (forward) and about (BLOCK_T + 2K + 1) rows of x plus
(BLOCK_T + K + 1) of grad_out (backward). The launcher bounds BLOCK_T by that footprint
(:func:`_blocks`); for bf16 D=4096, K=8 the forward program holds 136 KiB (264 programs of 8 warps
in flight on an H200: ~36 MB < its 50 MB L2), the backward ~0.5 MiB (it does not fit: the reverse
walk makes the last chunks hit, the rest re-reads from DRAM, so between 3 and ~5 N e). Not yet
measured on a GPU. Packed documents add a per-token start array (int32, built by torch on device:
~20 B/token over 3 launches, 4 B/token read back, from L1 for the window rows) and a 0-d validity
flag read by each program.

Work per element (K = min(window, T-1)): forward 2 loads + 2 flops per row for the norms
((BLOCK_T + K) / BLOCK_T rows each), then K loads + 2K flops for the weighted sum; backward
2K (out and V) over BLOCK_T rows, K (out only) over K halo rows, then 2(K+1) for dd_{j-1}, dd_j.
The backward's math (q, V, s, Q and dd) is in trajectory_flow_bwd.py's docstring.


Masked steps are excluded with ``where`` (never multiplied by 0), so a NaN step does not leak into
outputs the reference keeps finite. Invalid cu_seqlens (CUDA: not checked by the host) make every
output NaN; every offset is clamped first, so no kernel reads outside a tensor whatever the values.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._common import INTERPRET, cdiv, compute_dtypes, next_power_of_2
from .trajectory_flow_bwd import _bwd_kernel
from .trajectory_flow_fwd import _fwd_kernel

__all__ = ["trajectory_flow_fwd", "trajectory_flow_fwd_stats", "trajectory_flow_bwd"]

# --------------------------------------------------------------------------------------------
# host launchers
# --------------------------------------------------------------------------------------------

# Bytes a program may touch in its two walks over D for them to hit L2 the second time, with
# ~2 programs of 8 warps per SM in flight (132 SMs x 2 x 144 KiB ~ 38 MB of an H100/H200's 50 MB).
_FOOTPRINT = 144 * 1024
_MIN_PROGRAMS = 264
# Rows per program under the interpreter: large (one program per short sequence), but tests set it
# small to exercise the halos and multi-tile paths on tiny shapes.
INTERPRET_BLOCK_T = 256


def _blocks(B: int, T: int, D: int, K: int, elem: int, backward: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_D, num_warps) for a launch.

    BLOCK_T: the most rows (8..64) whose footprint (own + halo rows, x and for the backward
    grad_out) stays within _FOOTPRINT, at least 16 for the backward (its K-row q halo costs K^2 /
    BLOCK_T flops per element), fewer while the grid would leave SMs idle. Tiles hold one 16-byte
    vector per thread and row tile when Triton can prove rows 16-byte aligned (D % 16 == 0), else 2
    scalars (the register budget that kept the previous kernels spill-free); rows of D <= 512 are
    whole in a tile. The halo tile (BLOCK_H rows) shares BLOCK_D.
    """
    bh = min(64, next_power_of_2(max(K, 1)))
    tp = next_power_of_2(T)
    if INTERPRET:  # programs run one by one in Python: few, large tiles (and halos rarely needed)
        bt = min(INTERPRET_BLOCK_T, tp)
        return bt, bh, min(next_power_of_2(D), max(16, 8192 // max(bt, bh))), 4
    per_thread = 16 // elem if D % 16 == 0 else 2
    # 8 warps, except short rows and fp64: ptxas gave those 64 (128) registers and a stack frame at
    # 8 (4) warps with 8-warp tiles on sm_90 (tests/triton_resources.py); 4-warp tiles have none
    warps = 4 if (D <= 512 or elem == 8) else 8
    tile = 32 * warps * per_thread
    row = D * elem * (2 if backward else 1)
    rows = _FOOTPRINT // max(row, 1) - (2 * K + 1 if backward else K + 1)
    bt = min(64, next_power_of_2(max(rows, 1) + 1) // 2)
    # short rows: whole rows per tile (coalesced), rows filling the rest of the register tile
    bt = max(16 if backward else 8, min(bt, tile // min(next_power_of_2(D), max(16, tile // 8))))
    while bt > 8 and B * cdiv(T, bt) < _MIN_PROGRAMS:
        bt //= 2
    bt = max(1, min(bt, tp))
    bd = max(16, min(next_power_of_2(D), tile // max(bt, bh)))
    warps = max(1, min(warps, max(bt, bh) * bd // (32 * per_thread)))
    return bt, bh, bd, warps


def _varlen(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor]):
    """(start, bad) for packed x (1, total, D): start (total,) int32, each token's document start
    (offsets clamped into [0, total]; the kernels clamp it into [0, token] too, so they never look
    before row 0 or outside a tensor whatever the offsets), bad a 0-d int32 device flag (1: invalid
    offsets, every output NaN). No host sync; 3 launches over tokens, ~20 bytes per token."""
    if cu_seqlens is None:
        return None
    from ..varlen import check_cu_seqlens, cu_seqlens_invalid

    if x.shape[0] != 1:
        raise ValueError(f"trajectory_flow: packed x must have shape (1, total, D), got {list(x.shape)}")
    total = x.shape[1]
    check_cu_seqlens("trajectory_flow", cu_seqlens, total, x.device, values=False)
    c = cu_seqlens.to(torch.int64).clamp(0, total).to(torch.int32)
    # doc = #offsets <= token in [0, N + 1]; prev[doc] = c[doc - 1], the token's document start
    prev = torch.cat([c.new_zeros(1), c])
    pos = torch.arange(total, device=x.device, dtype=torch.int32)
    start = prev[torch.searchsorted(c, pos, right=True, out_int32=True)]
    return start, cu_seqlens_invalid(cu_seqlens, total).to(torch.int32)


def _nan_if(t: torch.Tensor, vl) -> torch.Tensor:
    return t if vl is None else torch.where(vl[1] != 0, torch.full_like(t, float("nan")), t)


def _forward(x: torch.Tensor, window: int, eps: float, vl, want_out: bool):
    """(out or None, stats (2, B, T)) for x (B, T, D) contiguous; vl from :func:`_varlen`."""
    B, T, D = x.shape
    cdt, tcdt = compute_dtypes(x.dtype)
    stats = torch.zeros((2, B, T), device=x.device, dtype=cdt)
    if T < 2 or x.numel() == 0:
        return (_nan_if(torch.zeros_like(x), vl) if want_out else None), _nan_if(stats, vl)
    window = min(int(window), T)  # every window >= T - 1 means the whole prefix; keeps int32 math safe
    K = min(window, T - 1)
    bt, bh, bd, warps = _blocks(B, T, D, K, x.element_size(), backward=False)
    nt = cdiv(T, bt)
    KH = cdiv(K, bh) * bh
    slot = KH + bt
    scr = torch.empty(B * nt * 3 * slot, device=x.device, dtype=cdt)
    out = torch.empty_like(x) if want_out else x
    st, bad = vl if vl is not None else (x, x)
    _fwd_kernel[(B * nt,)](x, out, stats[0], stats[1], scr, st, bad, T, D, window, K, KH, slot, nt,
                           EPS=float(eps), CDT=tcdt, VARLEN=vl is not None, WRITE_OUT=want_out,
                           BLOCK_T=bt, BLOCK_H=bh, BLOCK_D=bd, num_warps=warps)
    return (out if want_out else None), stats


def trajectory_flow_fwd(x: torch.Tensor, window: int, eps: float,
                        cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Trajectory flow of x: (B, T, D) contiguous (or (1, total, D) with cu_seqlens (N + 1,)) ->
    out of x's shape, dtype and device. Computes in fp32 (fp64 for fp64 x); one launch (plus the
    small start-array ops with cu_seqlens). Each new ``eps`` value compiles once."""
    return trajectory_flow_fwd_stats(x, window, eps, cu_seqlens)[0]


def trajectory_flow_fwd_stats(x: torch.Tensor, window: int, eps: float,
                              cu_seqlens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, stats): out as :func:`trajectory_flow_fwd`, stats (2, B, T) in the compute dtype
    (n_i, then a_p = 1 / S_p or 0), for :func:`trajectory_flow_bwd` (not differentiable)."""
    return _forward(x, window, eps, _varlen(x, cu_seqlens), want_out=True)


def trajectory_flow_bwd(grad_out: torch.Tensor, x: torch.Tensor, window: int, eps: float,
                        cu_seqlens: Optional[torch.Tensor] = None,
                        stats: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dL/dx given grad_out = dL/dout; both (B, T, D) contiguous (or (1, total, D) with cu_seqlens).

    ``stats`` is the forward's second output for the same x, window, eps and cu_seqlens: with it
    the backward is one launch; without it one more launch recomputes it (x read once more).
    Returns a tensor of x's shape and dtype; matches :func:`trajops.reference.trajectory_flow_backward`.
    """
    B, T, D = x.shape
    cdt, tcdt = compute_dtypes(x.dtype)
    if stats is not None and (tuple(stats.shape) != (2, B, T) or stats.dtype != cdt or not stats.is_contiguous()):
        raise ValueError(f"trajectory_flow_bwd: stats must be a contiguous {cdt} tensor of shape {[2, B, T]}, "
                         f"got {stats.dtype} {list(stats.shape)}")
    vl = _varlen(x, cu_seqlens)
    if T < 2 or x.numel() == 0:
        return _nan_if(torch.zeros_like(x), vl)
    if stats is None:
        stats = _forward(x, window, eps, vl, want_out=False)[1]
    window = min(int(window), T)
    K = min(window, T - 1)
    bt, bh, bd, warps = _blocks(B, T, D, K, x.element_size(), backward=True)
    nt = cdiv(T, bt)
    KH = cdiv(K, bh) * bh
    slot_q = 1 + bt + KH
    bs = min(128, next_power_of_2(2 * KH + bt))
    slot_u = cdiv(2 * KH + bt, bs) * bs
    scr = torch.empty(B * nt * (2 * slot_q + slot_u), device=x.device, dtype=cdt)
    dx = torch.empty_like(x)
    st, bad = vl if vl is not None else (x, x)
    _bwd_kernel[(B * nt,)](x, grad_out, dx, stats[0], stats[1], scr, st, bad, T, D, window, K, KH,
                           slot_q, slot_u, nt, EPS=float(eps), CDT=tcdt, VARLEN=vl is not None,
                           BLOCK_T=bt, BLOCK_H=bh, BLOCK_S=bs, BLOCK_D=bd, num_warps=warps)
    return dx
