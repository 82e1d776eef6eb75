"""Triton kernels for the adaptive positional encoding lookup (semantics: :mod:`trajops.reference`).

Only ``@triton.jit`` kernels and their host launchers live here; op registration and autograd are
done elsewhere. Public launchers:

* :func:`adaptive_positional_encoding_fwd`  ``(displacement (B, T), pe_table (L, E), positions)
  -> out (B, T, E)``
* :func:`adaptive_positional_encoding_bwd`  ``(grad_out (B, T, E), displacement, pe_table,
  positions, need_table) -> (grad_displacement (B, T), dL/ds (B, T), grad_table (L, E) or (0,))``

Notation: ``s[b, t] = positions[t] + cumsum(displacement[b])[t]`` (fp64), ``p = clamp(s, 0, L-1)``,
``f = floor(p)``, ``c = min(f + 1, L-1)``, ``a = p - f``, ``out = (1 - a) pe[f] + a pe[c]``.

Bytes and launches (N = B*T rows, element size w; the table rows are gathers that neighbouring
positions share, L2 hits after the first read of each row)
-------------------------------------------------------------------------------------------------
Ideal: forward reads d (N w) and writes out (N E w); backward reads grad_out (N E w) and d, writes
grad_displacement and dL/ds (2 N w); one launch each.

Before (2 + 3 launches): the forward scanned s into an fp64 (B, T) buffer (write 8N, read 8N) in
a launch of B programs walking T serially, then a lookup launch; the backward re-ran that scan, a
slope launch wrote dL/ds in fp64 and a third launch (B programs) did the reverse scan.

Now:

* Forward, one launch over (sequence, row tile[, E split]) programs. A program re-sums its
  sequence's displacements before its first row in fp64 (an L2-resident read of <= T values,
  bounded by the plan to <= 1/16 of the output bytes), scans its own rows in registers
  (``tl.cumsum`` + carry) and writes its (rows x E) block of out. HBM: d once, out once.
* Backward, one launch (plus a B-int32 memset) over (sequence, row tile) programs: the same
  prefix and scan, dL/ds = [0 <= s <= L-1] g . (pe[c] - pe[f]) for its rows (grad_out read
  once, looping over E), stored as the dL/ds output and in an fp64 (B, T) scratch; the program
  that finishes a sequence last (an atomic ticket per sequence) runs the reverse scan of that
  sequence over the scratch (L2-resident) and writes grad_displacement. Deterministic: the order
  of every sum is fixed. HBM: grad_out once, d once, the two (B, T) outputs once.
* Table gradient (only for a trainable table; the seed's table is a buffer): one more launch,
  one program per E block walking every row in order (load, add, store) with its own running
  sum of d: deterministic without atomics, latency-bound.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, cdiv, compute_dtypes, next_power_of_2

# Tests set this to {"block_t": .., "block_e": .., "tiles": .., "splits": ..} to force several
# programs per sequence (the interpreter's default plan gives one), None for the normal plan.
PLAN_OVERRIDE: Optional[dict] = None

_MIN_PROGRAMS = 1024  # ~8 per H100/H200 SM, when the shape allows


@triton.jit
def _prefix(d_ptr, row0, t_end, BLOCK_P: tl.constexpr):
    """fp64 sum of d[row0 + j] for j < t_end (lane-wise, then one tree sum)."""
    acc = tl.zeros([BLOCK_P], tl.float64)
    for j0 in range(0, t_end, BLOCK_P):
        j = j0 + tl.arange(0, BLOCK_P)
        acc += tl.load(d_ptr + row0 + j, mask=j < t_end, other=0.0).to(tl.float64)
    return tl.sum(acc, 0)


@triton.jit
def _base(pos_ptr, row0, t, m, POS_MODE: tl.constexpr):
    """Physical position of rows t (fp64). POS_MODE 0: t; 1: pos[t] (shared (T,)); 2: pos[b, t]."""
    if POS_MODE == 0:
        return t.to(tl.float64)
    elif POS_MODE == 1:
        return tl.load(pos_ptr + t, mask=m, other=0).to(tl.float64)
    else:
        return tl.load(pos_ptr + row0 + t, mask=m, other=0).to(tl.float64)


@triton.jit
def _chunk_positions(d_ptr, pos_ptr, row0, t0, t_hi, carry, POS_MODE: tl.constexpr, BLOCK_T: tl.constexpr):
    """Rows t = t0 + [0, BLOCK_T) (mask m: t < t_hi) of one sequence: their fp64 positions s and the
    running displacement sum carried past them (carry: the sum of d before t0)."""
    t = t0 + tl.arange(0, BLOCK_T)
    m = t < t_hi
    x = tl.load(d_ptr + row0 + t, mask=m, other=0.0).to(tl.float64)
    s = (tl.cumsum(x, 0) + carry) + _base(pos_ptr, row0, t, m, POS_MODE)
    return t, m, s, carry + tl.sum(x, 0)


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
def _fwd_kernel(d_ptr, pos_ptr, pe_ptr, out_ptr, T, L, E, tiles, rows_per_tile, e_per_split,
                POS_MODE: tl.constexpr, CDT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                BLOCK_P: tl.constexpr):
    """out[b, t0:t1, e0:e1] for program (b * tiles + tile, split); d: (B, T), pe: (L, E), out: (B, T, E)."""
    pid = tl.program_id(0)
    b = pid // tiles
    t_lo = (pid % tiles) * rows_per_tile
    t_hi = tl.minimum(t_lo + rows_per_tile, T)
    e_lo = tl.program_id(1) * e_per_split
    e_hi = tl.minimum(e_lo + e_per_split, E)
    row0 = b.to(tl.int64) * T
    carry = _prefix(d_ptr, row0, t_lo, BLOCK_P)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        t, m, s, carry = _chunk_positions(d_ptr, pos_ptr, row0, t0, t_hi, carry, POS_MODE, BLOCK_T)
        f, c, a, _ = _lookup(s, L)
        w = a.to(CDT)[:, None]
        lo_row = f[:, None] * E
        up_row = c[:, None] * E
        out_row = (row0 + t)[:, None] * E
        for e0 in range(e_lo, e_hi, BLOCK_E):
            cols = e0 + tl.arange(0, BLOCK_E)
            mm = m[:, None] & (cols < e_hi)[None, :]
            lo = tl.load(pe_ptr + lo_row + cols[None, :], mask=mm, other=0.0).to(CDT)
            up = tl.load(pe_ptr + up_row + cols[None, :], mask=mm, other=0.0).to(CDT)
            out = (1 - w) * lo + w * up
            tl.store(out_ptr + out_row + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mm)


@triton.jit
def _bwd_kernel(g_ptr, d_ptr, pos_ptr, pe_ptr, gs_ptr, gd_ptr, gso_ptr, ticket_ptr, T, L, E, tiles,
                rows_per_tile, POS_MODE: tl.constexpr, CDT: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
    """dL/ds for rows [t0, t1) of sequence b (program b * tiles + tile); the last program of b to
    finish also writes gd[b] = reverse cumsum of dL/ds. g: (B, T, E); gs: (B, T) fp64 scratch;
    gd, gso: (B, T) in d's dtype; ticket: (B,) int32, zeroed."""
    pid = tl.program_id(0)
    b = pid // tiles
    t_lo = (pid % tiles) * rows_per_tile
    t_hi = tl.minimum(t_lo + rows_per_tile, T)
    row0 = b.to(tl.int64) * T
    carry = _prefix(d_ptr, row0, t_lo, BLOCK_P)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        t, m, s, carry = _chunk_positions(d_ptr, pos_ptr, row0, t0, t_hi, carry, POS_MODE, BLOCK_T)
        f, c, _, inside = _lookup(s, L)
        lo_row = f[:, None] * E
        up_row = c[:, None] * E
        g_row = (row0 + t)[:, None] * E
        acc = tl.zeros([BLOCK_T], dtype=CDT)
        for e0 in range(0, E, BLOCK_E):
            cols = e0 + tl.arange(0, BLOCK_E)
            mm = m[:, None] & (cols < E)[None, :]
            g = tl.load(g_ptr + g_row + cols[None, :], mask=mm, other=0.0).to(CDT)
            lo = tl.load(pe_ptr + lo_row + cols[None, :], mask=mm, other=0.0).to(CDT)
            up = tl.load(pe_ptr + up_row + cols[None, :], mask=mm, other=0.0).to(CDT)
            acc += tl.sum(g * (up - lo), axis=1)
        gs = tl.where(inside, acc.to(tl.float64), 0.0)
        tl.store(gs_ptr + row0 + t, gs, mask=m)
        tl.store(gso_ptr + row0 + t, gs.to(gso_ptr.dtype.element_ty), mask=m)
    # Every thread's stores above happen before the ticket (barrier, then a release atomic); the
    # program drawing the last ticket acquires them and reads the scratch from L2 (.cg), never L1.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + b, 1, sem="acq_rel")
    if ticket == tiles - 1:
        tl.debug_barrier()
        total = tl.full([], 0.0, tl.float64)
        n_chunks = tl.cdiv(T, BLOCK_S)
        for i in range(0, n_chunks):
            # Walked backwards (t descending) so a prefix scan is the suffix sum: total - prefix + x
            # would spread one NaN/Inf of dL/ds over positions it does not reach.
            tt = (n_chunks - 1 - i) * BLOCK_S + (BLOCK_S - 1 - tl.arange(0, BLOCK_S))
            mt = tt < T
            y = tl.load(gs_ptr + row0 + tt, mask=mt, other=0.0, cache_modifier=".cg")
            tl.store(gd_ptr + row0 + tt, (total + tl.cumsum(y, 0)).to(gd_ptr.dtype.element_ty), mask=mt)
            total += tl.sum(y, 0)


@triton.jit
def _table_grad_kernel(d_ptr, pos_ptr, g_ptr, gt_ptr, B, T, L, E, POS_MODE: tl.constexpr, CDT: tl.constexpr,
                       BLOCK_E: tl.constexpr):
    """gt[f] += (1 - a) g[r], gt[c] += a g[r] for every row r in order; gt: (L, E) in CDT, zeroed.

    Grid: one program per E block; each owns its columns, so there is no race and the order of the
    sums is fixed. The positions are a sequential fp64 sum of d walked with the rows. f and c are
    read-modify-written one after the other (they may be one row).
    """
    cols = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    cm = cols < E
    zero = tl.full([], 0, tl.int64)  # 64-bit offsets (loop indices are plain ints in the interpreter)
    for b in range(0, B):
        row0 = zero + b * T
        s_acc = tl.full([], 0.0, tl.float64)
        for t in range(0, T):
            row = row0 + t
            s_acc += tl.load(d_ptr + row).to(tl.float64)
            if POS_MODE == 0:
                base = (zero + t).to(tl.float64)
            elif POS_MODE == 1:
                base = tl.load(pos_ptr + t).to(tl.float64)
            else:
                base = tl.load(pos_ptr + row).to(tl.float64)
            f, c, a, _ = _lookup(s_acc + base, L)
            w = a.to(CDT)
            g = tl.load(g_ptr + row * E + cols, mask=cm, other=0.0).to(CDT)
            lo_ptr = gt_ptr + f * E + cols
            tl.store(lo_ptr, tl.load(lo_ptr, mask=cm, other=0.0) + (1 - w) * g, mask=cm)
            up_ptr = gt_ptr + c * E + cols
            tl.store(up_ptr, tl.load(up_ptr, mask=cm, other=0.0) + w * g, mask=cm)


# --------------------------------------------------------------------------------------------
# host launchers
# --------------------------------------------------------------------------------------------


def _plan(B: int, T: int, E: int, itemsize: int, split_e: bool) -> dict:
    """Tiles and the program grid: block_t x block_e register tiles, ``tiles`` row ranges per
    sequence of ``rows`` rows each, and ``splits`` E ranges of ``e_per_split`` columns (forward only).

    Every (tile, split) program re-sums d over its sequence's earlier positions (<= T values, L2
    hits); tiles x splits <= E / 8 per sequence keeps those reads under 1/16 of the output bytes.
    """
    def np2(n: int) -> int:
        return next_power_of_2(max(n, 1))

    if PLAN_OVERRIDE is not None:
        p = dict(PLAN_OVERRIDE)
    elif INTERPRET:  # programs run one by one in Python there: big tiles, one program per sequence
        block_e = min(np2(E), 512)
        p = {"block_e": block_e, "block_t": min(np2(T), max(1, 16384 // block_e)), "tiles": 1, "splits": 1}
    else:
        block_e = min(np2(E), 128 if itemsize == 8 else 256)
        # 4K-element tiles (2K for fp64): every element carries 64-bit gather addresses, and bigger
        # tiles cost occupancy (8K-element tiles compiled to 162-254 registers a thread on sm_90)
        block_t = min(np2(T), max(1, (2048 if itemsize == 8 else 4096) // block_e))
        budget = max(1, E // 8)
        tiles = max(1, min(cdiv(T, block_t), budget))
        splits = 1
        if split_e:
            want = cdiv(_MIN_PROGRAMS, B * tiles)
            splits = max(1, min(want, cdiv(E, block_e), budget // tiles))
        p = {"block_e": block_e, "block_t": block_t, "tiles": tiles, "splits": splits}
    bt, be = p["block_t"], p["block_e"]
    rows = cdiv(cdiv(T, max(1, p["tiles"])), bt) * bt  # whole register tiles per program
    e_per_split = max(be, cdiv(cdiv(E, max(1, p["splits"] if split_e else 1)), be) * be)
    return {"block_t": bt, "block_e": be, "rows": rows, "tiles": cdiv(T, rows),
            "e_per_split": e_per_split, "splits": max(1, cdiv(E, e_per_split)),
            "block_p": min(np2(T), 4096 if INTERPRET else 1024),
            "num_warps": max(1, min(8, bt * be // 512))}


def _pos_args(d: torch.Tensor, positions: Optional[torch.Tensor]):
    mode = 0 if positions is None else (1 if positions.dim() == 1 else 2)
    return (d if positions is None else positions), mode  # unused pointer when mode == 0


def adaptive_positional_encoding_fwd(displacement: torch.Tensor, pe_table: torch.Tensor,
                                     positions: Optional[torch.Tensor]) -> torch.Tensor:
    """out (B, T, E) in pe_table's dtype; displacement (B, T), pe_table (L, E), positions None,
    (T,) or (B, T), all contiguous, with B*T > 0 and E > 0. One launch."""
    B, T = displacement.shape
    L, E = pe_table.shape
    _, tcdt = compute_dtypes(pe_table.dtype)
    out = torch.empty((B, T, E), device=pe_table.device, dtype=pe_table.dtype)
    p = _plan(B, T, E, pe_table.element_size(), split_e=True)
    pos, mode = _pos_args(displacement, positions)
    _fwd_kernel[(B * p["tiles"], p["splits"])](
        displacement, pos, pe_table, out, T, L, E, p["tiles"], p["rows"], p["e_per_split"], POS_MODE=mode,
        CDT=tcdt, BLOCK_T=p["block_t"], BLOCK_E=p["block_e"], BLOCK_P=p["block_p"], num_warps=p["num_warps"])
    return out


def adaptive_positional_encoding_bwd(grad_out: torch.Tensor, displacement: torch.Tensor, pe_table: torch.Tensor,
                                     positions: Optional[torch.Tensor], need_table: bool):
    """(grad_displacement (B, T), dL/ds (B, T), both in displacement's dtype; grad_table (L, E) in
    pe_table's dtype or an empty (0,) tensor); inputs contiguous, grad_out (B, T, E), B*T > 0.
    One launch (two with need_table)."""
    B, T = displacement.shape
    L, E = pe_table.shape
    cdt, tcdt = compute_dtypes(pe_table.dtype)
    dev = displacement.device
    p = _plan(B, T, E, pe_table.element_size(), split_e=False)
    pos, mode = _pos_args(displacement, positions)
    # The interpreter (the tests) NaN-fills the scratch: a scan that ran before every program of its
    # sequence had stored its rows would read NaN there instead of a stale copy of the right values.
    if INTERPRET:
        gs = torch.full((B, T), math.nan, device=dev, dtype=torch.float64)
    else:
        gs = torch.empty((B, T), device=dev, dtype=torch.float64)
    gd = torch.empty_like(displacement)
    gso = torch.empty_like(displacement)
    ticket = torch.zeros((B,), device=dev, dtype=torch.int32)
    _bwd_kernel[(B * p["tiles"],)](
        grad_out, displacement, pos, pe_table, gs, gd, gso, ticket, T, L, E, p["tiles"], p["rows"], POS_MODE=mode,
        CDT=tcdt, BLOCK_T=p["block_t"], BLOCK_E=p["block_e"], BLOCK_P=p["block_p"], BLOCK_S=p["block_p"],
        num_warps=p["num_warps"])
    if not need_table:
        return gd, gso, pe_table.new_empty(0)
    gt = torch.zeros((L, E), device=pe_table.device, dtype=cdt)
    if E > 0:
        # one warp, >= 32 columns: every column belongs to exactly one thread (no replicated lanes
        # racing on the read-modify-write)
        be = max(32, min(256, next_power_of_2(E)))
        _table_grad_kernel[(cdiv(E, be),)](displacement, pos, grad_out, gt, B, T, L, E, POS_MODE=mode,
                                                  CDT=tcdt, BLOCK_E=be, num_warps=1)
    return gd, gso, gt.to(pe_table.dtype)
