"""Triton kernels for the STP (trajectory-straightness) loss (semantics: :mod:`trajops.reference`).

The host launchers live here, the ``@triton.jit`` kernels in stp_loss_sampled.py and
stp_loss_dense.py (see "Kernels" below); op registration and autograd are done elsewhere. Public
launchers (``hidden`` is a list of L >= 1 contiguous (B, T, D) tensors of one shape, dtype and
device; ``lengths`` an optional contiguous (B,) int64 tensor):

* :func:`stp_fwd`        ``(hidden, triples (S, B, 3), lengths) -> loss (L, S, B), stats (L, S, B, 3)``
* :func:`stp_bwd`        ``(grad_loss, stats, hidden, triples, lengths) -> [dL/dh] * L``
* :func:`stp_dense_fwd`  ``(hidden, lengths) -> loss (L, B, T-2), stats (L, B, T-1, 2)``
* :func:`stp_dense_bwd`  ``(grad_loss, stats, hidden, lengths) -> [dL/dh] * L``

Notation: for a triple s < r < t of row b, ``a = h[r] - h[s]``, ``b = h[t] - h[r]``,
``Na = max(|a|, eps)``, ``Nb = max(|b|, eps)``, ``cos = a.b / (Na Nb)``, ``loss = 1 - cos``; with
``w = -grad``, ``ga = (w / Na) (b / Nb - ca a)``, ``gb = (w / Nb) (a / Na - cb b)``
(``ca = cos / |a|``, 0 at |a| = 0; bounded by 1 / Na), and ``dh[s] -= ga``, ``dh[r] += ga - gb``,
``dh[t] += gb``. No intermediate overflows: when a plain sum of squares (or a.b) is not finite,
the forwards redo that program's sums on a / max|a| and b / max|b| (two more loops over D that
finite hidden states below ~1e19 in fp32 never take), and the stats carry cos, not a.b.
Everything is computed in fp32 (fp64 for fp64 inputs); losses and stats are stored in that dtype,
gradients in the input dtype.

Layers without a copy
---------------------
Every kernel covers all L layers in one launch without stacking them: it receives ``hidden[0]`` as
its base pointer plus an int64 tensor of per-layer element offsets
``(hidden[l].data_ptr() - hidden[0].data_ptr()) // element_size`` (the same for the list of output
gradients). One flat address space per device makes ``base + offset`` address layer l (CUDA's
unified virtual addressing; the interpreter reads raw CPU addresses). With one layer the offset
load is compiled out (``MULTI=False``); when every offset is a multiple of 16 elements the kernels
tell the compiler so (``OFF_ALIGNED``), so that the row loads stay vectorized.

Row validity
------------
Row b is active iff ``lengths[b] >= 3`` (all rows when T >= 3 without lengths). Inactive rows get 0
loss, 0 stats and no gradient. Index values are not checked on the host (that would cost a sync on
CUDA): instead, the sampled forward writes NaN loss and stats for a triple of an active row that is
not ``0 <= s < r < t < lengths[b]`` and for every triple of a row with ``lengths[b]`` outside
[0, T], and the dense forward writes NaN everywhere in a row with ``lengths[b]`` outside [0, T]. No
kernel ever reads or writes out of bounds for such indices (their loads and stores are masked) and
the backwards skip them (no gradient).

Packed sequences
----------------
With ``cu_seqlens`` the op layer passes hidden (1, total, D) and, for the sampled kernels, per
document j a row base ``row_base[j]`` (its first packed token) and its length as ``lengths[j]``
(``T`` = total): "row" j addresses tokens ``row_base[j] + pos`` instead of ``j * T + pos``. The
dense kernels keep the one packed row and get ``ends`` (total,): the end of each position's
document; a step q exists iff ``q + 1 < ends[q]``, a triple iff ``q + 2 < ends[q]``. Both are
built from offsets clamped into [0, total], so no address leaves a tensor whatever the values;
invalid offsets are passed as lengths -1, which NaN the outputs (the rule above).

Kernels (one launch each)
-------------------------
The sampled kernels (``_stp_fwd_kernel``, ``_stp_bwd_kernel``) live in stp_loss_sampled.py, the
dense ones (``_stp_dense_fwd_kernel``, ``_stp_dense_bwd_kernel``) in stp_loss_dense.py, the device
helpers they share in stp_loss_helpers.py; each module's docstring describes its kernels' grids.
This module holds the host launchers: tiles, grids and the layer offsets.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ._common import INTERPRET, cdiv, compute_dtypes, next_power_of_2
from .stp_loss_dense import _stp_dense_bwd_kernel, _stp_dense_fwd_kernel
from .stp_loss_sampled import _stp_bwd_kernel, _stp_fwd_kernel

__all__ = ["stp_fwd", "stp_bwd", "stp_dense_fwd", "stp_dense_bwd"]

STP_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default, as the reference


# --------------------------------------------------------------------------------------------
# host launchers
# --------------------------------------------------------------------------------------------

# The Triton interpreter (TRITON_INTERPRET=1) runs programs one by one in Python, where fewer,
# larger programs are much faster and occupancy means nothing.
_INTERPRET = INTERPRET
_MIN_PROGRAMS = 1 if _INTERPRET else 512  # ~4 per H100 SM, when the problem allows


def _per_thread(D: int, elem_size: int) -> int:
    """Elements per thread per tile row chunk: one 16-byte vector when rows can be 16-byte aligned
    (Triton specializes D % 16 == 0), else 2."""
    return 16 // elem_size if D % 16 == 0 else 2


def _tile_elems(D: int, elem_size: int) -> int:
    if _INTERPRET:  # each tile op is one numpy call there (~1 ms of Python): big tiles, few programs
        return 8192
    return 256 * _per_thread(D, elem_size)  # 8 warps


def _num_warps(elems: int, D: int, elem_size: int) -> int:
    return max(1, min(8, elems // (32 * _per_thread(D, elem_size))))


def _rows_cols(n_rows: int, n_programs_per_row_block: int, D: int, elem_size: int) -> Tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_D) for kernels that loop over D: rows fill the tile D leaves free, then
    shrink until there are enough programs; columns then take back the room rows gave up."""
    tile = _tile_elems(D, elem_size)
    block_d = min(next_power_of_2(D), tile // 16 if n_rows > 1 else tile)
    block_r = max(1, min(tile // block_d, next_power_of_2(n_rows)))
    while block_r > 1 and n_programs_per_row_block * cdiv(n_rows, block_r) < _MIN_PROGRAMS:
        block_r //= 2
    block_d = min(next_power_of_2(D), tile // block_r)
    return block_r, block_d


def _offsets(ts: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, bool]:
    """(int64 tensor of the element offsets of ts[l] from ts[0], on ts[0]'s device; whether every
    offset is a multiple of 16 elements). Pinned + non_blocking on CUDA: no wait for the copy."""
    base = ts[0].data_ptr()
    es = ts[0].element_size()
    offs = []
    for t in ts:
        delta = t.data_ptr() - base
        assert delta % es == 0, "layers must be element-aligned relative to hidden[0]"
        offs.append(delta // es)
    aligned = all(o % 16 == 0 for o in offs)
    dev = ts[0].device
    host = torch.tensor(offs, dtype=torch.int64)
    if dev.type == "cpu":
        return host, aligned
    if dev.type == "cuda":
        host = host.pin_memory()
    return host.to(dev, non_blocking=True), aligned


def _check_layers(hidden: Sequence[torch.Tensor]) -> None:
    assert len(hidden) >= 1, "hidden must hold at least one layer"
    h0 = hidden[0]
    assert h0.dim() == 3
    for h in hidden:
        assert h.shape == h0.shape and h.dtype == h0.dtype and h.device == h0.device
        assert h.is_contiguous(), "every layer must be contiguous"


def _len_arg(lengths: Optional[torch.Tensor], dummy: torch.Tensor):
    if lengths is None:
        return dummy, False
    assert lengths.dtype == torch.int64 and lengths.is_contiguous()
    return lengths, True


def _opt_arg(t: Optional[torch.Tensor], dummy: torch.Tensor):
    if t is None:
        return dummy, False
    assert t.dtype == torch.int64 and t.is_contiguous()
    return t, True


def stp_fwd(hidden: List[torch.Tensor], triples: torch.Tensor, lengths: Optional[torch.Tensor] = None,
            row_base: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sampled STP loss: loss (L, S, B) and stats (L, S, B, 3) = (|a|, |b|, cos), compute dtype.

    triples (S, B, 3) int64 contiguous. Packed (hidden (1, total, D)): B = N documents,
    ``row_base`` (N,) int64 their first tokens and ``lengths`` their lengths (required then). Invalid triples of active rows (and rows with lengths
    outside [0, T]) get NaN loss and stats; inactive rows get 0.
    """
    _check_layers(hidden)
    h0 = hidden[0]
    _, T, D = h0.shape
    B = h0.shape[0] if row_base is None else row_base.shape[0]
    assert row_base is None or lengths is not None
    L, S = len(hidden), triples.shape[0]
    assert triples.shape == (S, B, 3) and triples.dtype == torch.int64 and triples.is_contiguous()
    cdt, tcdt = compute_dtypes(h0.dtype)
    N = L * S * B
    if N == 0 or h0.numel() == 0:
        # No launch (T == 0 has no active rows). D == 0: a = b = 0, so the reference's loss is
        # 1 - 0 = 1 on active rows; bad indices are not flagged here (no kernel runs).
        loss = torch.zeros((L, S, B), dtype=cdt, device=h0.device)
        if N and T >= 3 and D == 0:
            if lengths is None:
                loss.fill_(1.0)
            else:
                loss[:] = (lengths >= 3).to(cdt)
        return loss, torch.zeros((L, S, B, 3), dtype=cdt, device=h0.device)
    loss = torch.empty((L, S, B), dtype=cdt, device=h0.device)
    stats = torch.empty((L, S, B, 3), dtype=cdt, device=h0.device)
    offs, aligned = _offsets(hidden)
    len_t, has_len = _len_arg(lengths, triples)
    base_t, has_base = _opt_arg(row_base, triples)
    es = h0.element_size()
    bn, bd = _rows_cols(N, 1, D, es)
    _stp_fwd_kernel[(cdiv(N, bn),)](
        h0, offs, triples, len_t, base_t, loss, stats, N, S * B, B, T, D,
        HAS_LEN=has_len, HAS_BASE=has_base, MULTI=L > 1, OFF_ALIGNED=aligned, IS_D1=D == 1, EPS=STP_EPS, CDT=tcdt,
        BLOCK_N=bn, BLOCK_D=bd, num_warps=_num_warps(bn * bd, D, es))
    return loss, stats


def stp_bwd(grad_loss: torch.Tensor, stats: torch.Tensor, hidden: List[torch.Tensor],
            triples: torch.Tensor, lengths: Optional[torch.Tensor] = None,
            row_base: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """Gradient of sum(grad_loss * loss) w.r.t. each layer (L tensors of hidden's shape and dtype).
    Packed: ``row_base`` and ``lengths`` as :func:`stp_fwd`.

    grad_loss (L, S, B) and stats (L, S, B, 3) contiguous in the compute dtype. Repeated positions
    accumulate in span order, deterministically. Invalid triples contribute nothing.
    """
    _check_layers(hidden)
    h0 = hidden[0]
    _, T, D = h0.shape
    B = h0.shape[0] if row_base is None else row_base.shape[0]
    assert row_base is None or lengths is not None
    L, S = len(hidden), triples.shape[0]
    cdt, tcdt = compute_dtypes(h0.dtype)
    assert triples.shape == (S, B, 3) and triples.dtype == torch.int64 and triples.is_contiguous()
    assert grad_loss.shape == (L, S, B) and grad_loss.dtype == cdt and grad_loss.is_contiguous()
    assert stats.shape == (L, S, B, 3) and stats.dtype == cdt and stats.is_contiguous()
    grads = [torch.zeros_like(h) for h in hidden]
    if B == 0 or T < 3 or D == 0 or S == 0:
        return grads
    hoffs, h_al = _offsets(hidden)
    goffs, g_al = _offsets(grads)
    len_t, has_len = _len_arg(lengths, triples)
    base_t, has_base = _opt_arg(row_base, triples)
    es = h0.element_size()
    pt = _per_thread(D, es)
    if _INTERPRET:
        bd = min(next_power_of_2(D), _tile_elems(D, es))
    else:
        # One program walks all S spans (latency-bound): prefer more, narrower programs.
        bd = min(next_power_of_2(D), 128 * pt)
        while bd > 32 * pt and L * B * cdiv(D, bd) < _MIN_PROGRAMS:
            bd //= 2
    nd = cdiv(D, bd)
    _stp_bwd_kernel[(L * B * nd,)](
        h0, grads[0], hoffs, goffs, triples, len_t, base_t, grad_loss, stats, S, B, T, D, nd,
        HAS_LEN=has_len, HAS_BASE=has_base, MULTI=L > 1, H_ALIGNED=h_al, G_ALIGNED=g_al, EPS=STP_EPS, CDT=tcdt,
        BLOCK_D=bd, num_warps=max(1, min(8, bd // (32 * pt))), num_stages=1)
    return grads


def stp_dense_fwd(hidden: List[torch.Tensor], lengths: Optional[torch.Tensor] = None,
                  ends: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense STP loss over every (p, p+1, p+2): loss (L, B, max(T-2, 0)) and stats
    (L, B, max(T-1, 0), 2) = (|d_q|, cos_q), compute dtype (reference.stp_loss_dense).
    Packed (B = 1): ``ends`` (T,) int64, the end of each position's document."""
    _check_layers(hidden)
    h0 = hidden[0]
    B, T, D = h0.shape
    L = len(hidden)
    cdt, tcdt = compute_dtypes(h0.dtype)
    if B == 0 or T < 2 or D == 0:
        # No launch. D == 0: zero steps, so loss 1 on valid triples as the reference. (T == 2
        # launches: no triple, but the one step's norm is a stat.)
        loss = torch.zeros((L, B, max(T - 2, 0)), dtype=cdt, device=h0.device)
        if B and T >= 3:
            p = torch.arange(T - 2, device=h0.device)
            valid = (p + 2 < T).expand(B, -1) if lengths is None else p[None, :] + 2 < lengths[:, None]
            if ends is not None:
                valid = valid & (p + 2 < ends[p])[None, :]
            loss[:] = valid.to(cdt)
        return loss, torch.zeros((L, B, max(T - 1, 0), 2), dtype=cdt, device=h0.device)
    loss = torch.empty((L, B, T - 2), dtype=cdt, device=h0.device)
    stats = torch.empty((L, B, T - 1, 2), dtype=cdt, device=h0.device)
    offs, aligned = _offsets(hidden)
    len_t, has_len = _len_arg(lengths, stats)
    end_t, has_end = _opt_arg(ends, offs)
    loss_arg = loss if T > 2 else stats  # T == 2: nothing is stored into loss (empty)
    es = h0.element_size()
    bp, bd = _rows_cols(T - 1, L * B, D, es)
    nq = cdiv(T - 1, bp)
    _stp_dense_fwd_kernel[(L * B * nq,)](
        h0, offs, len_t, end_t, loss_arg, stats, B, T, D, nq,
        HAS_LEN=has_len, HAS_END=has_end, MULTI=L > 1, OFF_ALIGNED=aligned, IS_D1=D == 1, EPS=STP_EPS, CDT=tcdt,
        BLOCK_P=bp, BLOCK_D=bd, num_warps=_num_warps(bp * bd, D, es))
    return loss, stats


def stp_dense_bwd(grad_loss: torch.Tensor, stats: torch.Tensor, hidden: List[torch.Tensor],
                  lengths: Optional[torch.Tensor] = None, ends: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """Gradient of sum(grad_loss * dense loss) w.r.t. each layer (reference.stp_loss_dense_backward).

    grad_loss (L, B, T-2), stats (L, B, T-1, 2), contiguous in the compute dtype.
    """
    _check_layers(hidden)
    h0 = hidden[0]
    B, T, D = h0.shape
    L = len(hidden)
    cdt, tcdt = compute_dtypes(h0.dtype)
    if B == 0 or T < 3 or D == 0:
        return [torch.zeros_like(h) for h in hidden]
    assert grad_loss.shape == (L, B, T - 2) and grad_loss.dtype == cdt and grad_loss.is_contiguous()
    assert stats.shape == (L, B, T - 1, 2) and stats.dtype == cdt and stats.is_contiguous()
    grads = [torch.empty_like(h) for h in hidden]
    hoffs, h_al = _offsets(hidden)
    goffs, g_al = _offsets(grads)
    len_t, has_len = _len_arg(lengths, grad_loss)
    end_t, has_end = _opt_arg(ends, hoffs)
    es = h0.element_size()
    tile = _tile_elems(D, es)
    if _INTERPRET:
        bd = min(next_power_of_2(D), tile)
        bt = min(tile // bd, next_power_of_2(T))
    else:
        # 16-row tiles: each tile also reads 4 halo rows (mostly L2 hits), 1.25x its rows.
        bt = min(16, next_power_of_2(T))
        bd = min(next_power_of_2(D), max(tile // bt, 16))
    nt, nd = cdiv(T, bt), cdiv(D, bd)
    _stp_dense_bwd_kernel[(L * B * nt * nd,)](
        h0, grads[0], hoffs, goffs, len_t, end_t, grad_loss, stats, B, T, D, nt, nd,
        HAS_LEN=has_len, HAS_END=has_end, MULTI=L > 1, H_ALIGNED=h_al, G_ALIGNED=g_al, EPS=STP_EPS, CDT=tcdt,
        BLOCK_T=bt, BLOCK_D=bd, num_warps=_num_warps(bt * bd, D, es))
    return grads
