"""Fused kv_evict_append_ for a decode step (n = 1 new token per row); semantics: trajops/reference/kv_cache.py.

Public launcher (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1):

* :func:`kv_evict_append_decode` ``(the op's arguments) -> (evicted (B, 1), written (B, 1), ok ())`` or None
  when the shapes are outside what the kernel serves (n != 1, or more than MAX_SLOTS logical slots per row):
  the caller then keeps the unfused path (the reference's bookkeeping around the Triton scorer).

Why. The unfused path is the reference run as device-side torch ops: about 60 small kernels per row plus
30 for the checks and the commit, launch-bound on a GPU (a decode step of the evicting transformers cache
took 1.9x the dense cache's time on an H100). Here a decode step is 5 launches whatever B is: the
query mask (2 elementwise ops), the relevance of every slot (triton_kernels/kv_topk.py's kv_relevance,
many programs: it reads the stored trajectories, the only large read), a zero-fill of a (P + 1) int32
scratch, and one single-program bookkeeping kernel below that reads the (B, L) scores and the small
metadata and writes the step.

The bookkeeping kernel (one program, rows in order: they share the free-page stack):
  checks   the reference's ok conditions (page-table entries in [-1, P), free_top in [0, P], stack entries
           below the top in [0, P), lengths in [0, 1], live_count[:B] in [0, L], capacity[:B] >= 0, no page
           held twice: a histogram of held pages by atomics in the scratch);
  phase 1  plans every row reading the state only, on a private copy of the stack top, to learn whether the
           pool suffices (ok False: nothing is written, as the reference commits only when ok);
  phase 2  (ok) plans each row again and writes it: evictions (the e lowest candidates by the 128-bit key
           of kv_topk.py with the score order reversed: NaN and lowest score first, then older, then lower
           slot), page pops into the lowest empty entries, the token's slot (the lowest free logical
           slot), its metadata (live, ts = now, unit trajectory, pin), page releases pushed in page-table
           order, live_count and evicted_total. A row's plan reads only its own pages and the stack, and
           rows own disjoint pages (checked), so phase 2 replays phase 1's plans exactly.
Bytes: B * L * (4 score + 8 page entry / S + 1 live + 1 pin + 8 ts) read twice (both phases), tiny next to
the scorer's B * L * 4 * Dt.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import kv_topk as _topk
from ._common import next_power_of_2

__all__ = ["MAX_SLOTS", "kv_evict_append_decode"]

MAX_SLOTS = 2048  # logical slots per row held in one program's registers (4096 spills at 8 warps)


@triton.jit
def _evict_keys(score, ts, j, cand):
    """(hi, lo) uint64 keys whose maximum is the next slot to evict: lowest score first (NaN as -inf), then
    older timestamp, then lower logical slot; 0, 0 for non-candidates."""
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ranks as +0.0
    bits = score.to(tl.uint32, bitcast=True).to(tl.uint64)
    neg = bits >= 0x80000000
    sf = tl.where(neg, bits ^ 0xFFFFFFFF, bits ^ 0x80000000)  # order-preserving code of the score
    sf = tl.where(score != score, 0x007FFFFF, sf)  # NaN: -inf's code
    sf = 0xFFFFFFFF - sf  # lowest score -> largest field (never 0: the code of NaN/-inf is not 2^32 - 1)
    tsf = ts.to(tl.uint64, bitcast=True) ^ 0x7FFFFFFFFFFFFFFF  # older -> larger
    slotf = 0xFFFFFFFF - j.to(tl.uint64)
    hi = (sf << 32) | (tsf >> 32)
    lo = ((tsf & 0xFFFFFFFF) << 32) | slotf
    return tl.where(cand, hi, 0), tl.where(cand, lo, 0)


@triton.jit
def _row_plan(b, sc_ptr, live_ptr, pin_ptr, pt_ptr, ts_ptr, cnt_ptr, cap_ptr, len_ptr, free_ptr, scr_pt_ptr, top,
              P, S, MP, L, BLOCK_L: tl.constexpr, BLOCK_MP: tl.constexpr):
    """Row b's step given the stack top: (chosen [BLOCK_L] evicted logical slots, first evicted slot or -1,
    e, n_write, m, new page table [BLOCK_MP] before releases, the token's logical slot or -1, pages popped)."""
    j = tl.arange(0, BLOCK_L)
    in_row = j < L
    jm = tl.arange(0, BLOCK_MP)
    pt = tl.load(pt_ptr + b * MP + jm, mask=jm < MP, other=-1)
    page = tl.load(pt_ptr + b * MP + j // S, mask=in_row, other=-1)
    has = in_row & (page >= 0)
    phys = tl.where(has, page * S + j % S, 0)
    live = has & (tl.load(live_ptr + phys, mask=has, other=0) != 0)
    cand = live & (tl.load(pin_ptr + phys, mask=has, other=0) == 0)
    m = tl.load(len_ptr + b)
    cap = tl.load(cap_ptr + b)
    live_b = tl.load(cnt_ptr + b)
    keep = tl.minimum(m, cap)
    e = tl.minimum(tl.maximum(live_b + keep - cap, 0), tl.sum(cand.to(tl.int64), 0))
    n_write = tl.maximum(tl.minimum(keep, cap - (live_b - e)), 0)
    score = tl.load(sc_ptr + b * L + j, mask=in_row, other=0.0)
    ts = tl.load(ts_ptr + phys, mask=has, other=0)
    hi, lo = _evict_keys(score, ts, j, cand)
    chosen = j < 0  # all False
    first = tl.full([], -1, tl.int64)
    for it in range(e):  # the e lowest candidates, one maximum of the key at a time
        h = tl.where(chosen, 0, hi)
        l_ = tl.where(chosen, 0, lo)
        top_hi = tl.max(h, 0)
        top_lo = tl.max(tl.where(h == top_hi, l_, 0), 0)
        pick = (h == top_hi) & (l_ == top_lo) & cand & ~chosen
        chosen = chosen | pick
        if it == 0:
            first = tl.max(tl.where(pick, j, -1).to(tl.int64), 0)
    live_after = live & ~chosen
    free_owned = tl.sum((has & ~live_after).to(tl.int64), 0)
    need_pages = (tl.maximum(n_write - free_owned, 0) + S - 1) // S
    # pops: the lowest empty page-table entries take stack[top - 1], stack[top - 2], ...
    empty = (jm < MP) & (pt < 0)
    rank_e = tl.cumsum(empty.to(tl.int64), 0) - 1
    n_pop = tl.where(need_pages <= top, need_pages, 0)  # an exhausted pool pops nothing (the call is void)
    take = empty & (rank_e < n_pop)
    popped = tl.load(free_ptr + tl.maximum(top - 1 - rank_e, 0), mask=take, other=-1)
    new_pt = tl.where(take, popped, pt)
    # each logical slot's page in the new table: through scratch memory (a register gather by j // S
    # would need a (BLOCK_L, BLOCK_MP) compare)
    tl.debug_barrier()  # the previous reader of the scratch is done
    tl.store(scr_pt_ptr + jm, new_pt, mask=jm < MP)
    tl.debug_barrier()
    new_page = tl.load(scr_pt_ptr + j // S, mask=in_row, other=-1, volatile=True)
    # the token (written when n_write = 1) takes the lowest free logical slot of the new table
    free_slot = in_row & (new_page >= 0) & ~live_after
    tok = tl.min(tl.where(free_slot, j, BLOCK_L), 0)
    tok = tl.where((n_write > 0) & (tok < BLOCK_L), tok, -1)
    return chosen, first, e, n_write, m, new_pt, new_page, tok, tl.where(need_pages <= top, need_pages, top + 1)


@triton.jit
def _pages_live(live_now, scr_live_ptr, S, MP, BLOCK_L: tl.constexpr, BLOCK_MP: tl.constexpr,
                BLOCK_S: tl.constexpr):
    """[BLOCK_MP] whether page-table entry p has a live slot, from the per-slot flags live_now [BLOCK_L]
    (through scratch memory: the (entry, offset) view of the slots)."""
    j = tl.arange(0, BLOCK_L)
    tl.debug_barrier()
    tl.store(scr_live_ptr + j, live_now.to(tl.int8), mask=j < MP * S)
    tl.debug_barrier()
    jm = tl.arange(0, BLOCK_MP)
    o = tl.arange(0, BLOCK_S)
    idx = jm[:, None] * S + o[None, :]
    flags = tl.load(scr_live_ptr + idx, mask=(jm[:, None] < MP) & (o[None, :] < S), other=0, volatile=True)
    return tl.max(flags.to(tl.int32), 1) > 0


@triton.jit(do_not_specialize=["eps_bits"])
def _evict_decode_kernel(sc_ptr, traj_ptr, ts_ptr, live_ptr, pin_ptr, pt_ptr, cnt_ptr, cap_ptr, free_ptr,
                         top_ptr, tot_ptr, now_ptr, q_ptr, len_ptr, newpin_ptr, ev_ptr, wr_ptr, ok_ptr, hist_ptr,
                         scr_pt_ptr, scr_live_ptr, pos_ptr, next_ptr, B, P, S, MP, L, Dt, eps_bits,
                         HAS_PIN: tl.constexpr, HAS_POS: tl.constexpr,
                         BLOCK_L: tl.constexpr, BLOCK_MP: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    # ---- checks (the reference's ok conditions)
    top0 = tl.load(top_ptr)
    ok = (top0 >= 0) & (top0 <= P)
    jm = tl.arange(0, BLOCK_MP)
    for b in range(B):
        pt = tl.load(pt_ptr + b * MP + jm, mask=jm < MP, other=-1)
        ok = ok & (tl.sum(((pt < -1) | (pt >= P)).to(tl.int32), 0) == 0)
        held = (jm < MP) & (pt >= 0) & (pt < P)
        tl.atomic_add(hist_ptr + tl.where(held, pt, P), 1, mask=held)
        m = tl.load(len_ptr + b)
        live_b = tl.load(cnt_ptr + b)
        ok = ok & (m >= 0) & (m <= 1) & (live_b >= 0) & (live_b <= L) & (tl.load(cap_ptr + b) >= 0)
    for p0 in range(0, P, BLOCK_P):
        jp = p0 + tl.arange(0, BLOCK_P)
        below = (jp < P) & (jp < top0)
        fp = tl.load(free_ptr + jp, mask=below, other=0)
        ok = ok & (tl.sum((below & ((fp < 0) | (fp >= P))).to(tl.int32), 0) == 0)
        held = below & (fp >= 0) & (fp < P)
        tl.atomic_add(hist_ptr + tl.where(held, fp, P), 1, mask=held)
    tl.debug_barrier()
    for p0 in range(0, P, BLOCK_P):
        jp = p0 + tl.arange(0, BLOCK_P)
        cnt = tl.load(hist_ptr + jp, mask=jp < P, other=0, volatile=True)
        ok = ok & (tl.max(cnt, 0) <= 1)
    # ---- phase 1: is the pool large enough for every row, in order?
    top = top0
    for b in range(B):
        if ok:
            chosen, first, e, n_write, m, new_pt, new_page, tok, need = _row_plan(
                b, sc_ptr, live_ptr, pin_ptr, pt_ptr, ts_ptr, cnt_ptr, cap_ptr, len_ptr, free_ptr, scr_pt_ptr, top,
                P, S, MP, L, BLOCK_L, BLOCK_MP)
            ok = ok & (need <= top)
            top = top - tl.minimum(need, top)
            # releases: pages of the new table without a live slot after the step go back on the stack
            j = tl.arange(0, BLOCK_L)
            phys = tl.where(new_page >= 0, new_page * S + j % S, 0)
            live_now = (new_page >= 0) & (((tl.load(live_ptr + phys, mask=new_page >= 0, other=0) != 0) & ~chosen)
                                          | (j == tok))
            page_live = _pages_live(live_now, scr_live_ptr, S, MP, BLOCK_L, BLOCK_MP, BLOCK_S)
            top = top + tl.sum(((jm < MP) & (new_pt >= 0) & ~page_live).to(tl.int64), 0)
    tl.store(ok_ptr, ok.to(tl.uint8))
    # ---- phase 2: write every row's step (ok only)
    top = top0
    now = tl.load(now_ptr)
    for b in range(B):
        tl.store(ev_ptr + b, -1)
        tl.store(wr_ptr + b, -1)
        if ok:
            chosen, first, e, n_write, m, new_pt, new_page, tok, need = _row_plan(
                b, sc_ptr, live_ptr, pin_ptr, pt_ptr, ts_ptr, cnt_ptr, cap_ptr, len_ptr, free_ptr, scr_pt_ptr, top,
                P, S, MP, L, BLOCK_L, BLOCK_MP)
            top = top - need
            j = tl.arange(0, BLOCK_L)
            old_page = tl.load(pt_ptr + b * MP + j // S, mask=j < L, other=-1)
            ev_phys = tl.where(chosen, old_page * S + j % S, 0)
            tl.store(live_ptr + ev_phys, tl.zeros([BLOCK_L], tl.uint8), mask=chosen)
            tl.store(pin_ptr + ev_phys, tl.zeros([BLOCK_L], tl.uint8), mask=chosen)
            tl.store(ev_ptr + b, first)
            tl.debug_barrier()  # the token may take an evicted slot: its flags are written after these
            if tok >= 0:
                tok_page = tl.sum(tl.where(j == tok, new_page, 0), 0)
                slot = tok_page * S + tok % S
                tl.store(wr_ptr + b, slot)
                tl.store(live_ptr + slot, 1)
                tl.store(ts_ptr + slot, now)
                pin = 0
                if HAS_PIN:
                    pin = tl.load(newpin_ptr + b)
                tl.store(pin_ptr + slot, pin)
                if HAS_POS:  # the token's position: the row's count of valid tokens so far (n = 1: t = 0)
                    tl.store(pos_ptr + slot, tl.load(next_ptr + b))
                # the stored unit trajectory, as the reference's kv_unit: a NaN component makes the norm and so
                # every component NaN (_query_norm's max(norm, eps) would drop a NaN norm)
                nrm = _topk._query_norm(q_ptr + b * Dt, Dt, eps_bits, BLOCK_D)
                n_nan = 0
                for d0 in range(0, Dt, BLOCK_D):
                    cols = d0 + tl.arange(0, BLOCK_D)
                    x = tl.load(q_ptr + b * Dt + cols, mask=cols < Dt, other=0.0)
                    n_nan += tl.sum((x != x).to(tl.int32), 0)
                for d0 in range(0, Dt, BLOCK_D):
                    cols = d0 + tl.arange(0, BLOCK_D)
                    u = (tl.load(q_ptr + b * Dt + cols, mask=cols < Dt, other=0.0).to(tl.float64) / nrm).to(tl.float32)
                    tl.store(traj_ptr + slot * Dt + cols, tl.where(n_nan > 0, float("nan"), u), mask=cols < Dt)
            tl.debug_barrier()  # the releases read the live flags just written
            phys = tl.where(new_page >= 0, new_page * S + j % S, 0)
            live_now = (new_page >= 0) & (tl.load(live_ptr + phys, mask=new_page >= 0, other=0, volatile=True) != 0)
            page_live = _pages_live(live_now, scr_live_ptr, S, MP, BLOCK_L, BLOCK_MP, BLOCK_S)
            release = (jm < MP) & (new_pt >= 0) & ~page_live
            rank_r = tl.cumsum(release.to(tl.int64), 0) - 1
            tl.store(free_ptr + top + rank_r, new_pt, mask=release)
            top = top + tl.sum(release.to(tl.int64), 0)
            tl.store(pt_ptr + b * MP + jm, tl.where(release, -1, new_pt), mask=jm < MP)
            live_b = tl.load(cnt_ptr + b)
            tl.store(cnt_ptr + b, live_b - e + n_write)
            tl.store(tot_ptr + b, tl.load(tot_ptr + b) + e + (m - n_write))
            if HAS_POS:
                tl.store(next_ptr + b, tl.load(next_ptr + b) + m)
            tl.debug_barrier()  # the next row's plan reads this row's stack writes
    if ok:
        tl.store(top_ptr, top)


def kv_evict_append_decode(traj_pool, ts_pool, live_pool, pinned_pool, page_table, live_count, capacity, free_pages,
                           free_top, evicted_total, now, new_traj, lengths, pin, alpha: float, decay: float,
                           pos_pool=None, next_position=None) -> Optional[Tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]]:
    """The op on a decode step (new_traj (B, 1, Dt)), in place; None when n != 1 or a row has more than
    MAX_SLOTS logical slots (the caller runs the unfused path). Every state tensor must be contiguous.
    pos_pool / next_position (optional, together): the token's position is recorded in the same program."""
    P, S, Dt = traj_pool.shape
    B, n = new_traj.shape[0], new_traj.shape[1]
    MP = page_table.shape[1]
    L = MP * S
    state = (traj_pool, ts_pool, live_pool, pinned_pool, page_table, live_count, capacity, free_pages, evicted_total)
    if n != 1 or L > MAX_SLOTS or L == 0 or B == 0 or not all(t.is_contiguous() for t in state):
        return None
    dev = new_traj.device
    q = new_traj[:, 0].float().contiguous()
    # the eviction query: the token's trajectory, or 0 (recency alone) for a row without a valid token
    query = torch.where((lengths > 0)[:, None], q, 0.0)
    scores = _topk.kv_relevance(traj_pool, ts_pool, live_pool, page_table, query, now, alpha, decay)
    hist = torch.zeros(P + 1, dtype=torch.int32, device=dev)  # held-page histogram (the only zero-fill)
    scr_pt = torch.empty(MP, dtype=torch.long, device=dev)  # scratch of the bookkeeping program
    scr_live = torch.empty(L, dtype=torch.int8, device=dev)
    evicted = torch.empty((B, 1), dtype=torch.long, device=dev)
    written = torch.empty((B, 1), dtype=torch.long, device=dev)
    ok = torch.empty((), dtype=torch.bool, device=dev)
    ok8 = ok.view(torch.uint8)
    newpin = pin.reshape(B).contiguous().view(torch.uint8) if pin is not None else ok8
    has_pos = pos_pool is not None
    _evict_decode_kernel[(1,)](
        scores, traj_pool, ts_pool, live_pool.view(torch.uint8), pinned_pool.view(torch.uint8), page_table,
        live_count, capacity, free_pages, free_top, evicted_total, now, q, lengths, newpin, evicted, written, ok8,
        hist, scr_pt, scr_live, pos_pool if has_pos else evicted, next_position if has_pos else evicted, B, P, S, MP,
        L, Dt, _topk._EPS_BITS, HAS_PIN=pin is not None, HAS_POS=has_pos,
        BLOCK_L=next_power_of_2(L), BLOCK_MP=next_power_of_2(MP), BLOCK_S=next_power_of_2(S),
        BLOCK_P=min(1024, next_power_of_2(P)), BLOCK_D=_topk._block_d(Dt),
        num_warps=8 if L >= 1024 else 4, **_topk._FLAGS)
    return evicted, written, ok
