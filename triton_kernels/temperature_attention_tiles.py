"""Tile plans of the temperature-attention Triton kernels (temperature_attention.py and _bwd.py).

For each kernel kind ("fwd", "dkdv", "dq") the measured-fastest tiles come first (H100/H200
sweeps: bench/sweep_attention.py, bench/results/sweep_attention_*.json), then smaller ones, each
with an estimate of its shared memory (pipeline stages x the streamed tiles, the mask tile
included, + the resident tiles) and of the registers its tiles hold. ``_common.launch`` takes the
first that fits the device and falls back on OutOfResources; tests/test_triton_resources.py checks
the real numbers with the compiler.
"""
from __future__ import annotations

import functools
from typing import Tuple

from ._common import INTERPRET, Config

__all__ = ["TILE_OVERRIDES"]


TILE_OVERRIDES: dict = {}  # kind -> list of Config (or one dict of tiles); for tuning sweeps (bench)


def _estimate(kind: str, esize: int, bm: int, bn: int, stages: int, bd: int, bdv: int, mask_kind: int) -> int:
    """Shared memory (bytes) of one program, as the pipeliner lays it out: every stage holds a copy
    of each streamed tile (the mask tile too), plus the resident operand tiles of the tensor-core
    ops. Checked against the compiler by tests/test_triton_resources.py."""
    mtile = bm * bn if mask_kind == 2 else 0
    if kind == "dkdv":  # resident k, v (BN rows); streamed q, dO (BM rows)
        return max(stages, 1) * (bm * (bd + bdv) * esize + mtile) + bn * (bd + bdv) * esize
    resident = bm * bd * esize if kind == "fwd" else bm * (bd + bdv) * esize
    return max(stages, 1) * (bn * (bd + bdv) * esize + mtile) + resident


def _regs(kind: str, esize: int, bm: int, bn: int, warps: int, bd: int, bdv: int) -> int:
    """32-bit registers per thread held by the tiles: fp32 accumulators, resident operands, and the
    (BM, BN) fp32 score/probability tiles (2 forward, 3 backward). See _common.REG_BUDGET."""
    threads = 32 * warps
    if kind == "fwd":
        words = bm * bdv + 2 * bm * bn + bm * bd * esize // 4
    elif kind == "dkdv":
        words = bn * (bd + bdv) + bn * (bd + bdv) * esize // 4 + 3 * bm * bn
    else:
        words = bm * bd + bm * (bd + bdv) * esize // 4 + 3 * bm * bn
    return words // threads


def _preferred(kind: str, esize: int, bd: int, tq: int, major: int = 9) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) measured fastest (H100/H200, bench/sweep_attention.py;
    bench/results/sweep_attention_*.json)."""
    if esize == 8:
        return (16 if tq <= 16 else 32), 32, 4, 1
    if esize == 4:
        # fp32 products take the FMA path (ieee, no tensor cores): operands live in registers. These
        # are the largest tiles that compile without spills on sm_90 (AOT check; the earlier 64x32 /
        # 32x64 4-warp tiles spilled 0.8-14 KB per thread). Not yet timed on a GPU.
        if kind == "fwd":
            return (16 if tq <= 16 else 32), 32, 8, 2
        if kind == "dkdv":
            return 16, (32 if bd == 128 else 16), 8, 1
        return (64 if bd <= 128 else 32), 16, 8, 2
    big = bd > 64
    if major < 9 and bd <= 128 and tq > 16 and kind != "dkdv":
        # sm_80 (mma.sync keeps both operands in registers): the largest tiles that compile without
        # spills there (AOT check); the Hopper ones below spill 150-600 B. Not timed on an A100.
        if kind == "fwd":
            return (128, 64, 8, 2) if big else (64, 64, 4, 3)
        return (64, 32, 4, 3) if big else (64, 64, 4, 2)
    if kind == "fwd":
        if tq <= 16:
            return 16, (128 if bd <= 64 else 64), 4, 3
        if bd > 128:
            return 64, 64, 4, 2
        return (128, 128, 8, 3) if big else (128, 64, 4, 3)
    if bd > 128:
        return (32, 64, 4, 2) if kind == "dkdv" else (64, 32, 4, 2)
    if kind == "dkdv":  # H200 sweeps (bf16 D=128 causal backward): 64x32/4 warps 2.81 ms, 64x128/8 3.86
        return (64, 32, 4, 3) if big else (64, 64, 4, 3)
    return (128, 64, 8, 3) if big else (64, 64, 4, 3)


def _candidates(kind: str, esize: int, bd: int, bdv: int, mask_kind: int, tq: int, major: int = 9
                ) -> Tuple[Config, ...]:
    """The preferred tiles, then smaller ones (fewer stages, then a shorter streamed block, then a
    shorter resident block), each with its estimate; launch() takes the first that fits."""
    if kind in TILE_OVERRIDES:
        over = TILE_OVERRIDES[kind]
        return tuple(over) if isinstance(over, (list, tuple)) else (Config.make(**over),)
    if INTERPRET:  # numpy emulation: small tiles keep the interpreter fast
        return (Config.make(BLOCK_M=16, BLOCK_N=16),)
    return _planned(kind, esize, bd, bdv, mask_kind, tq <= 16, major)


@functools.lru_cache(maxsize=None)
def _hostile_tiles(kind: str, esize: int, bd: int, bdv: int, mask_kind: int) -> Tuple[Config, ...]:
    """The one configuration of the HOSTILE launches (the heads a NaN/Inf reaches; see
    temperature_attention_nonfinite._serves): 16 x 16 tiles, so the extra flag work never spills, but
    fp32's forward and dq, whose FMA products (operands in registers) spill on small tiles with few
    warps: they take their measured tiles (AOT-checked spill-free with the flag work)."""
    if INTERPRET:
        return (Config.make(BLOCK_M=16, BLOCK_N=16),)
    if esize == 4 and kind != "dkdv":  # (its dk/dv tiles are already 16 x 16 or 16 x 32 there)
        return _planned(kind, esize, bd, bdv, mask_kind, False, 9)[:1]
    warps = 8 if esize == 4 else 4
    return (Config.make(_estimate(kind, esize, 16, 16, 1, bd, bdv, mask_kind), warps, 1,
                        _regs(kind, esize, 16, 16, warps, bd, bdv), BLOCK_M=16, BLOCK_N=16),)


@functools.lru_cache(maxsize=None)  # ~50 us of Python per call otherwise: host time of every launch
def _planned(kind: str, esize: int, bd: int, bdv: int, mask_kind: int, decode: bool, major: int
             ) -> Tuple[Config, ...]:
    bm, bn, warps, stages = _preferred(kind, esize, bd, 1 if decode else 1024, major)
    out, seen = [], set()

    def add(m, n, w, s):
        if (m, n, w, s) not in seen:
            seen.add((m, n, w, s))
            out.append(Config.make(_estimate(kind, esize, m, n, s, bd, bdv, mask_kind), w, s,
                                   _regs(kind, esize, m, n, w, bd, bdv), BLOCK_M=m, BLOCK_N=n))

    streamed, resident = ("BLOCK_M", "BLOCK_N") if kind == "dkdv" else ("BLOCK_N", "BLOCK_M")
    dims = {"BLOCK_M": bm, "BLOCK_N": bn}
    while True:
        for s in range(stages, 0, -1):
            add(dims["BLOCK_M"], dims["BLOCK_N"], warps, s)
        if dims[streamed] > 16:
            dims[streamed] //= 2
        elif dims[resident] > 16:
            dims[resident] //= 2
            warps = 4
        else:
            return tuple(out)
