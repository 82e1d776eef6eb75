"""Triton kernels for the adaptive positional encoding lookup (semantics: :mod:`trajops.reference`).

Only ``@triton.jit`` kernels and their host launchers live here; op registration and autograd are
done elsewhere. Public launchers:

* :func:`adaptive_positional_encoding_fwd`  ``(displacement (B, T), pe_table (L, E), positions)
  -> out (B, T, E)``
* :func:`adaptive_positional_encoding_bwd`  ``(grad_out (B, T, E), displacement, pe_table,
  positions, need_table) -> (grad_displacement (B, T), dL/ds (B, T), grad_table (L, E) or (0,))``

Notation: ``s[b, t] = positions[t] + cumsum(displacement[b])[t]`` (fp64), ``p = clamp(s, 0, L-1)``,
``f = floor(p)``, ``c = min(f + 1, L-1)``, ``a = p - f``, ``out = (1 - a) pe[f] + a pe[c]``.

Design
------
The scan along T is a per-sequence dependency chain of B*T scalars, tiny next to the (B, T, E)
output, so it gets its own launch (one program per sequence, ``tl.cumsum`` over BLOCK_T-long
chunks with an fp64 carry) and writes s into an fp64 (B, T) buffer. Every other kernel is then
embarrassingly parallel over rows:

Forward (2 launches): positions; then the lookup over (rows x E) tiles, which reads two table
rows per output row (mostly cache hits: neighbouring positions share table rows) and writes out.

Backward (3 launches, a 4th when the table needs a gradient): positions; per-row
``dL/ds = [0 <= s <= L-1] * g . (pe[c] - pe[f])`` (loops over E); the reverse cumsum per
sequence; and the table scatter. The scatter runs one program per E block that walks every row
in order (load, add, store), so it is deterministic without atomics; that is latency-bound, but
the seed's table is a buffer, so this path only runs for a trainable table.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _positions_kernel(d_ptr, pos_ptr, s_ptr, T, POS_MODE: tl.constexpr, BLOCK_T: tl.constexpr):
    """s[b, t] = base[t] + cumsum(d[b])[t] in fp64; d: (B, T); grid: B programs.

    POS_MODE 0: base = t; 1: base = pos[t] (shared (T,)); 2: base = pos[b, t].
    """
    b = tl.program_id(0)
    row0 = b.to(tl.int64) * T
    carry = tl.full([], 0.0, tl.float64)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        m = t < T
        x = tl.load(d_ptr + row0 + t, mask=m, other=0.0).to(tl.float64)
        cs = tl.cumsum(x, 0) + carry
        carry += tl.sum(x, 0)
        if POS_MODE == 0:
            base = t.to(tl.float64)
        elif POS_MODE == 1:
            base = tl.load(pos_ptr + t, mask=m, other=0).to(tl.float64)
        else:
            base = tl.load(pos_ptr + row0 + t, mask=m, other=0).to(tl.float64)
        tl.store(s_ptr + row0 + t, cs + base, mask=m)


@triton.jit
def _lookup(s, L):
    """(f, c, a, inside) for fp64 positions s: table rows, weight of row c, clamp's gradient mask.

    A NaN s reads rows 0 and min(1, L-1) with weight NaN (as the reference).
    """
    hi = tl.zeros_like(s) + (L - 1)  # (L may arrive as a constexpr 1)
    is_nan = s != s
    # explicit where: tl.minimum / tl.maximum need not propagate NaN
    p = tl.where(is_nan, s, tl.where(s < 0.0, 0.0, tl.where(s > hi, hi, s)))
    fl = tl.floor(p)
    f = tl.where(is_nan, 0.0, fl).to(tl.int64)
    c = tl.minimum(f + 1, L - 1)
    inside = (s >= 0.0) & (s <= hi)
    return f, c, p - fl, inside


@triton.jit
def _fwd_kernel(s_ptr, pe_ptr, out_ptr, N, L, E, n_e_tiles, CDT: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """out[r, cols] for a (BLOCK_R, BLOCK_E) tile of the N = B*T rows; pe: (L, E); out: (N, E)."""
    pid = tl.program_id(0)
    r = (pid // n_e_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % n_e_tiles) * BLOCK_E + tl.arange(0, BLOCK_E)
    r_ok = r < N
    m = r_ok[:, None] & (cols < E)[None, :]
    s = tl.load(s_ptr + r, mask=r_ok, other=0.0)
    f, c, a, _ = _lookup(s, L)
    lo = tl.load(pe_ptr + f[:, None] * E + cols[None, :], mask=m, other=0.0).to(CDT)
    up = tl.load(pe_ptr + c[:, None] * E + cols[None, :], mask=m, other=0.0).to(CDT)
    w = a.to(CDT)[:, None]
    out = (1 - w) * lo + w * up
    tl.store(out_ptr + r.to(tl.int64)[:, None] * E + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _slope_kernel(s_ptr, pe_ptr, g_ptr, gs_ptr, N, L, E, CDT: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """gs[r] = [0 <= s <= L-1] * sum_e g[r, e] (pe[c, e] - pe[f, e]) into fp64; grid over row tiles."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < N
    s = tl.load(s_ptr + r, mask=r_ok, other=0.0)
    f, c, _, inside = _lookup(s, L)
    acc = tl.zeros([BLOCK_R], dtype=CDT)
    for e0 in range(0, E, BLOCK_E):
        cols = e0 + tl.arange(0, BLOCK_E)
        m = r_ok[:, None] & (cols < E)[None, :]
        g = tl.load(g_ptr + r.to(tl.int64)[:, None] * E + cols[None, :], mask=m, other=0.0).to(CDT)
        lo = tl.load(pe_ptr + f[:, None] * E + cols[None, :], mask=m, other=0.0).to(CDT)
        up = tl.load(pe_ptr + c[:, None] * E + cols[None, :], mask=m, other=0.0).to(CDT)
        acc += tl.sum(g * (up - lo), axis=1)
    tl.store(gs_ptr + r, tl.where(inside, acc.to(tl.float64), 0.0), mask=r_ok)


@triton.jit
def _reverse_scan_kernel(gs_ptr, gd_ptr, gso_ptr, T, BLOCK_T: tl.constexpr):
    """gd[b, t] = sum_{j >= t} gs[b, j] (fp64 carry), and gs copied out in gd's dtype; grid: B."""
    b = tl.program_id(0)
    row0 = b.to(tl.int64) * T
    carry = tl.full([], 0.0, tl.float64)
    n_chunks = tl.cdiv(T, BLOCK_T)
    for i in range(0, n_chunks):
        # The chunk is walked backwards (t descending), so a plain prefix scan is the suffix sum:
        # total - prefix + x would spread one NaN/Inf of gs over positions it does not reach.
        t = (n_chunks - 1 - i) * BLOCK_T + (BLOCK_T - 1 - tl.arange(0, BLOCK_T))
        m = t < T
        x = tl.load(gs_ptr + row0 + t, mask=m, other=0.0)
        suffix = carry + tl.cumsum(x, 0)
        carry += tl.sum(x, 0)
        tl.store(gd_ptr + row0 + t, suffix.to(gd_ptr.dtype.element_ty), mask=m)
        tl.store(gso_ptr + row0 + t, x.to(gso_ptr.dtype.element_ty), mask=m)


@triton.jit
def _table_grad_kernel(s_ptr, g_ptr, gt_ptr, N, L, E, CDT: tl.constexpr, BLOCK_E: tl.constexpr):
    """gt[f] += (1 - a) g[r], gt[c] += a g[r] for every row r in order; gt: (L, E) in CDT, zeroed.

    Grid: one program per E block; each owns its columns, so there is no race and the order of the
    sums is fixed. f and c are read-modify-written one after the other (they may be one row).
    """
    cols = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    cm = cols < E
    for r in range(0, N):
        s = tl.load(s_ptr + r)
        f, c, a, _ = _lookup(s, L)
        w = a.to(CDT)
        row = tl.full([], 0, tl.int64) + r  # 64-bit offsets (r is a plain int in the interpreter)
        g = tl.load(g_ptr + row * E + cols, mask=cm, other=0.0).to(CDT)
        lo_ptr = gt_ptr + f * E + cols
        tl.store(lo_ptr, tl.load(lo_ptr, mask=cm, other=0.0) + (1 - w) * g, mask=cm)
        up_ptr = gt_ptr + c * E + cols
        tl.store(up_ptr, tl.load(up_ptr, mask=cm, other=0.0) + w * g, mask=cm)


# --------------------------------------------------------------------------------------------
# host launchers
# --------------------------------------------------------------------------------------------


def _compute_dtypes(dtype: torch.dtype):
    if dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _scan_block(T: int) -> int:
    return min(4096 if _INTERPRET else 1024, triton.next_power_of_2(max(T, 1)))


def _tile(N: int, E: int):
    """(BLOCK_R, BLOCK_E, num_warps) for the row-tile kernels: ~4K elements a tile on a GPU."""
    tile = 16384 if _INTERPRET else 4096
    block_e = min(triton.next_power_of_2(max(E, 1)), 512)
    block_r = max(1, min(tile // block_e, triton.next_power_of_2(max(N, 1))))
    return block_r, block_e, max(1, min(8, block_r * block_e // 256))


def _semantic_positions(d: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
    B, T = d.shape
    s = torch.empty((B, T), device=d.device, dtype=torch.float64)
    mode = 0 if positions is None else (1 if positions.dim() == 1 else 2)
    pos = d if positions is None else positions  # unused pointer when mode == 0
    _positions_kernel[(B,)](d, pos, s, T, POS_MODE=mode, BLOCK_T=_scan_block(T), num_warps=4)
    return s


def adaptive_positional_encoding_fwd(displacement: torch.Tensor, pe_table: torch.Tensor,
                                     positions: Optional[torch.Tensor]) -> torch.Tensor:
    """out (B, T, E) in pe_table's dtype; displacement (B, T), pe_table (L, E), positions None,
    (T,) or (B, T), all contiguous, with B*T > 0 and E > 0."""
    B, T = displacement.shape
    L, E = pe_table.shape
    _, tcdt = _compute_dtypes(pe_table.dtype)
    s = _semantic_positions(displacement, positions)
    out = torch.empty((B, T, E), device=pe_table.device, dtype=pe_table.dtype)
    N = B * T
    br, be, nw = _tile(N, E)
    ne = triton.cdiv(E, be)
    _fwd_kernel[(triton.cdiv(N, br) * ne,)](s, pe_table, out, N, L, E, ne, CDT=tcdt, BLOCK_R=br, BLOCK_E=be,
                                            num_warps=nw)
    return out


def adaptive_positional_encoding_bwd(grad_out: torch.Tensor, displacement: torch.Tensor, pe_table: torch.Tensor,
                                     positions: Optional[torch.Tensor], need_table: bool):
    """(grad_displacement (B, T), dL/ds (B, T), both in displacement's dtype; grad_table (L, E) in
    pe_table's dtype or an empty (0,) tensor); inputs contiguous, grad_out (B, T, E), B*T > 0."""
    B, T = displacement.shape
    L, E = pe_table.shape
    cdt, tcdt = _compute_dtypes(pe_table.dtype)
    s = _semantic_positions(displacement, positions)
    N = B * T
    gs = torch.empty((B, T), device=displacement.device, dtype=torch.float64)
    br, be, nw = _tile(N, E)
    br = max(1, min(br, 64))  # one program per row tile (no E axis): keep enough programs
    _slope_kernel[(triton.cdiv(N, br),)](s, pe_table, grad_out, gs, N, L, E, CDT=tcdt, BLOCK_R=br,
                                         BLOCK_E=max(1, min(be, 4096 // br)), num_warps=4)
    gd = torch.empty_like(displacement)
    gso = torch.empty_like(displacement)
    _reverse_scan_kernel[(B,)](gs, gd, gso, T, BLOCK_T=_scan_block(T), num_warps=4)
    if not need_table:
        return gd, gso, pe_table.new_empty(0)
    gt = torch.zeros((L, E), device=pe_table.device, dtype=cdt)
    if E > 0:
        # one warp, >= 32 columns: every column belongs to exactly one thread (no replicated lanes
        # racing on the read-modify-write)
        be = max(32, min(256, triton.next_power_of_2(E)))
        _table_grad_kernel[(triton.cdiv(E, be),)](s, grad_out, gt, N, L, E, CDT=tcdt, BLOCK_E=be, num_warps=1)
    return gd, gso, gt.to(pe_table.dtype)
