"""trajops.paged_temperature_attention against gather + trajops.temperature_attention.

The caches here are built by real streams of appends with evictions: pages with holes, partly
filled pages, rows of different lengths and an empty row. Half types are compared with the fp64
oracle on the same rounded pools (conftest's TOL).
"""
from __future__ import annotations

import math

import pytest
import torch

import trajops
from trajops import reference as R
from trajops.kv_cache import PagedTrajectoryKVCache

from conftest import DTYPES, INTERPRETER, TOL, assert_close

OP = torch.ops.trajops.paged_temperature_attention


def _cache(B=3, Hkv=2, D=8, S=4, cap=10, steps=9, dtype=torch.float32, seed=0, empty_row=True):
    """A 2-layer cache after a stream of appends: rows get different lengths, evictions leave holes."""
    gen = torch.Generator().manual_seed(seed)
    pages = B * (-(-cap // S))
    c = PagedTrajectoryKVCache(2, pages, S, Hkv, D, 4, B, cap, dtype=dtype)
    for step in range(steps):
        n = (3, 1, 5, 2)[step % 4]
        lengths = torch.randint(0, n + 1, (B,), generator=gen)
        lengths[0] = n  # row 0 keeps growing past capacity: it evicts
        if empty_row:
            lengths[B - 1] = 0  # the last row never gets a token
        traj = torch.randn(B, n, 4, generator=gen)
        for layer in range(2):
            k = torch.randn(B, Hkv, n, D, generator=gen).to(dtype)
            v = torch.randn(B, Hkv, n, D, generator=gen).to(dtype)
            c.append(layer, k, v, traj, lengths=lengths)
        c.step()
    return c


def _dense(c, layer, B, slots=None):
    """Dense K, V (B, Hkv, L, D) and key mask (B, L) through the cache's own gather and live map
    (independent of the reference's paged_gather)."""
    L = c.max_slots
    if slots is None:
        slots = torch.arange(L).expand(B, L)
    k, v = c.gather(layer, slots)
    inside = (slots >= 0) & (slots < L)
    ok = inside & c.live_slots()[:B].gather(1, slots.clamp(0, max(L - 1, 0)))
    return k, v, ok


def _expected(q, c, layer, tau, scale=None, slots=None):
    """gather + trajops.temperature_attention (the op the public function promises to equal)."""
    k, v, ok = _dense(c, layer, q.shape[0], slots)
    return trajops.temperature_attention(q, k, v, tau, attn_mask=ok[:, None, None, :], scale=scale, return_lse=True)


def _oracle(q, c, layer, tau, scale=None, slots=None):
    """The reference attention in fp64 on the same (rounded) values, over the dense gather."""
    t = tau if isinstance(tau, torch.Tensor) else torch.tensor(float(tau))
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v, ok = _dense(c, layer, q.shape[0], slots)
    B, Hq, n, _ = q.shape
    coef = R.temperature_coefficient(t.double(), (B, Hq, n), s, torch.float64, ok.any(-1)[:, None, None])
    return R.temperature_attention(q.double(), k.double(), v.double(), coef, ok[:, None, None, :], False)


def test_the_stream_makes_holes_partial_pages_and_uneven_rows():
    c = _cache()
    live = c.live_slots()
    assert live[0].sum() == 10 and live[2].sum() == 0 and 0 < live[1].sum() <= 10
    phys = R.kv_logical_to_physical(c.page_table, c.page_size)
    owned = phys >= 0
    assert (owned & ~live).any(), "no hole: the eviction stream did not exercise dead slots"
    per_page = live.view(live.shape[0], -1, c.page_size).sum(-1)
    assert ((per_page > 0) & (per_page < c.page_size)).any(), "no partly filled page"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3])
def test_matches_gather_plus_attention(dtype, n):
    c = _cache(dtype=dtype)
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(3, 4, n, 8, generator=gen).to(dtype)  # GQA: 4 query heads over 2 kv heads
    tau = (torch.rand(4, 1, generator=gen) + 0.5)
    for layer in (0, 1):
        out, lse = trajops.paged_temperature_attention(q, c, layer, tau, return_lse=True)
        assert out.dtype == dtype and out.shape == (3, 4, n, 8) and out.is_contiguous()
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        o_out, o_lse = _oracle(q, c, layer, tau)
        assert_close(out, o_out, dtype)
        assert_close(lse, o_lse, dtype)
        if dtype in (torch.float32, torch.float64):
            e_out, e_lse = _expected(q, c, layer, tau)
            assert_close(out, e_out)
            assert_close(lse, e_lse)
        # the empty row: out 0, lse -inf
        assert (out[2] == 0).all() and (lse[2] == -math.inf).all()


@pytest.mark.parametrize("tau_shape", ["float", "0d", "H1", "1H1", "B1n", "BHn"])
def test_tau_shapes_and_scale(tau_shape):
    c = _cache(dtype=torch.float64)
    B, Hq, n = 3, 4, 2
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(B, Hq, n, 8, generator=gen, dtype=torch.float64)
    shapes = {"0d": (), "H1": (Hq, 1), "1H1": (1, Hq, 1), "B1n": (B, 1, n), "BHn": (B, Hq, n)}
    tau = 0.8 if tau_shape == "float" else torch.rand(shapes[tau_shape], generator=gen, dtype=torch.float32) + 0.3
    out, lse = trajops.paged_temperature_attention(q, c, 0, tau, scale=0.37, return_lse=True)
    e_out, e_lse = _expected(q, c, 0, tau, scale=0.37)
    assert_close(out, e_out)
    assert_close(lse, e_lse)


def test_slots_subsets_topk_padding_duplicates_and_out_of_range():
    c = _cache(dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 2, 1, 8, generator=gen, dtype=torch.float64)
    traj = torch.randn(3, 4, generator=gen)
    cases = [c.topk(traj, k)[0] for k in (1, 4, 25)]  # 25 > live: -1 padded
    L = c.max_slots
    cases.append(torch.tensor([[0, 0, 3, -1, L, L + 7, -5], [1, 2, 2, 5, 11, 0, -1], [0, 1, 2, 3, 4, 5, 6]]))
    cases.append(torch.full((3, 4), -1, dtype=torch.long))  # nothing: every row empty
    cases.append(torch.empty(3, 0, dtype=torch.long))
    for slots in cases:
        out, lse = trajops.paged_temperature_attention(q, c, 1, 1.3, slots=slots, return_lse=True)
        e_out, e_lse = _expected(q, c, 1, 1.3, slots=slots)
        assert_close(out, e_out)
        assert_close(lse, e_lse)
    # a slot listed twice counts twice: row 1 lists slot 2 twice
    dup = cases[3][:2].clone()
    dup[0] = -1
    once = torch.tensor([[1, 2, 5, 11, 0]])
    live = c.live_slots()[1]
    assert live[2], "the duplicated slot must be live for this check"
    k, v, _ = _dense(c, 1, 2, once.expand(2, -1))
    weight = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0], dtype=torch.float64)[None, None, None, :]
    ok = live[once[0]].double()[None, None, None, :]
    qq = q[1:2]
    logits = (qq @ k[1:2].transpose(-1, -2)) / math.sqrt(8) / 1.3
    p = torch.exp(logits - logits.max(-1, keepdim=True).values) * weight * ok
    want = (p / p.sum(-1, keepdim=True)) @ v[1:2]
    got = trajops.paged_temperature_attention(q[:2], c, 1, 1.3, slots=dup)
    assert_close(got[1:2], want)


def test_bad_tau_rows_are_nan_and_empty_rows_stay_empty():
    c = _cache(dtype=torch.float32)
    q = torch.randn(3, 2, 2, 8)
    tau = torch.ones(3, 2, 2)
    tau[0, 1, 0] = 0.0
    tau[1, 0, 1] = math.nan
    tau[2, :, :] = -1.0  # row 2 is empty: its bad tau cannot reach the output
    out, lse = trajops.paged_temperature_attention(q, c, 0, tau, return_lse=True)
    assert torch.isnan(out[0, 1, 0]).all() and torch.isnan(lse[0, 1, 0])
    assert torch.isnan(out[1, 0, 1]).all() and torch.isnan(lse[1, 0, 1])
    assert (out[2] == 0).all() and (lse[2] == -math.inf).all()
    good = ~torch.isnan(lse)
    assert good.sum() == lse.numel() - 2
    e_out, e_lse = _expected(q, c, 0, tau)
    assert_close(out, e_out)
    assert_close(lse, e_lse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_head_size_differs_and_strided_q(dtype):
    c = _cache(dtype=dtype)
    gen = torch.Generator().manual_seed(5)
    P, S, Hkv = c.num_pages, c.page_size, c.num_kv_heads
    v_pool = torch.randn(P, S, Hkv, 5, generator=gen).to(dtype)
    q = torch.randn(3, 1, 4, 8, generator=gen).to(dtype).transpose(1, 2)  # (B, Hq, n=1, D), not contiguous
    tau = torch.tensor(0.9)
    out, lse = OP(q, c.k_pool[0], v_pool, c.page_table, c.live_pool, tau, None, None)
    assert out.shape == (3, 4, 1, 5) and out.is_contiguous()
    e_out, e_lse = R.paged_temperature_attention(q.double(), c.k_pool[0].double(), v_pool.double(), c.page_table,
                                                 c.live_pool, tau.double(), None, 1 / math.sqrt(8))
    assert_close(out, e_out, dtype)
    assert_close(lse, e_lse, dtype)


def test_fewer_rows_than_the_cache_and_page_table_rows_beyond_b_are_ignored():
    c = _cache(B=3, dtype=torch.float64)
    q = torch.randn(2, 2, 1, 8, dtype=torch.float64)
    out, lse = trajops.paged_temperature_attention(q, c, 0, 1.0, return_lse=True)
    e_out, e_lse = _expected(q, c, 0, 1.0)
    assert_close(out, e_out)
    assert_close(lse, e_lse)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_rows_many_pages(dtype):
    c = _cache(B=2, Hkv=2, D=64, S=16, cap=700, steps=0, dtype=dtype, empty_row=False)
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):  # 3 x 300 tokens into capacity 700: the last append evicts 200
        for layer in range(2):
            k = torch.randn(2, 2, 300, 64, generator=gen).to(dtype)
            c.append(layer, k, -k, torch.randn(2, 300, 4, generator=gen))
        c.step()
    q = torch.randn(2, 8, 1, 64, generator=gen).to(dtype)
    out, lse = trajops.paged_temperature_attention(q, c, 1, 0.6, return_lse=True)
    o_out, o_lse = _oracle(q, c, 1, 0.6)
    assert_close(out, o_out, dtype)
    assert_close(lse, o_lse, dtype)


def test_matches_after_more_evictions_every_step():
    """Decode loop: after each append + step the op agrees with gather + attention."""
    c = _cache(B=2, cap=6, steps=0, dtype=torch.float64, empty_row=False)
    gen = torch.Generator().manual_seed(2)
    for step in range(12):
        k = torch.randn(2, 2, 1, 8, generator=gen, dtype=torch.float64)
        for layer in range(2):
            c.append(layer, k, k * 2, torch.randn(2, 4, generator=gen))
        c.step()
        q = torch.randn(2, 4, 1, 8, generator=gen, dtype=torch.float64)
        out = trajops.paged_temperature_attention(q, c, step % 2, 0.5)
        assert_close(out, _expected(q, c, step % 2, 0.5)[0])


def test_opcheck():
    c = _cache(dtype=torch.float32)
    q = torch.randn(3, 4, 2, 8)
    tau = torch.rand(4, 1) + 0.5
    slots = c.topk(torch.randn(3, 4), 5)[0]
    for s in (None, slots):
        torch.library.opcheck(OP.default, (q, c.k_pool[0], c.v_pool[0], c.page_table, c.live_pool, tau, s, 0.5))


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph(backend):
    if INTERPRETER and backend == "inductor":
        pytest.skip("inductor codegen for the interpreter pass is covered by the C++ pass")
    c = _cache(dtype=torch.float32)
    q = torch.randn(3, 4, 1, 8)
    tau = torch.rand(3, 4, 1) + 0.5
    slots = c.topk(torch.randn(3, 4), 4)[0]

    def step(q, tau, slots):
        return trajops.paged_temperature_attention(q, c, 1, tau, slots=slots, return_lse=True)

    got = torch.compile(step, fullgraph=True, backend=backend)(q, tau, slots)
    want = step(q, tau, slots)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])


def test_bad_inputs():
    c = _cache(dtype=torch.float32)
    q = torch.randn(3, 4, 1, 8)
    k, v, pt, live = c.k_pool[0], c.v_pool[0], c.page_table, c.live_pool
    tau = torch.tensor(1.0)
    bad = [
        ((q[0], k, v, pt, live, tau, None, None), ValueError, "q must have shape"),
        ((q.double(), k, v, pt, live, tau, None, None), TypeError, "one dtype"),
        ((q.int(), k, v, pt, live, tau, None, None), TypeError, "q must be float32"),
        ((torch.randn(3, 3, 1, 8), k, v, pt, live, tau, None, None), ValueError, "must divide"),
        ((torch.randn(3, 4, 1, 6), k, v, pt, live, tau, None, None), ValueError, "one head size"),
        ((q, k, v[:, :2], pt, live, tau, None, None), ValueError, "v_pool must have shape"),
        ((q, k[0], v, pt, live, tau, None, None), ValueError, "k_pool and v_pool must have shape"),
        ((q, k, v, pt[:2], live, tau, None, None), ValueError, "page_table must have shape"),
        ((q, k, v, pt.int(), live, tau, None, None), TypeError, "page_table must be int64"),
        ((q, k, v, pt, live.float(), tau, None, None), TypeError, "live_pool bool"),
        ((q, k, v, pt, live[:, :2], tau, None, None), ValueError, "live_pool must have shape"),
        ((q, k, v, pt, live, torch.ones(2, 4, 1), None, None), ValueError, "tau must be broadcastable"),
        ((q, k, v, pt, live, torch.tensor(1), None, None), TypeError, "tau must be a floating-point"),
        ((q, k, v, pt, live, tau, torch.zeros(3, 2, dtype=torch.int32), None), TypeError, "slots must be int64"),
        ((q, k, v, pt, live, tau, torch.zeros(2, 2, dtype=torch.long), None), ValueError, "slots must have shape"),
        ((q, k, v, pt, live, tau, None, 0.0), ValueError, "scale must be"),
        ((q, k, v, pt, live, tau, None, math.inf), ValueError, "scale must be"),
    ]
    for args, exc, match in bad:
        with pytest.raises(exc, match=match):
            OP(*args)
    with pytest.raises(IndexError, match="layer must be"):
        trajops.paged_temperature_attention(q, c, 2, 1.0)
    with pytest.raises(RuntimeError, match="inference only"):
        trajops.paged_temperature_attention(q.requires_grad_(), c, 0, 1.0)
    with torch.no_grad():
        trajops.paged_temperature_attention(q, c, 0, 1.0)


def test_rows_of_many_blocks_and_splits():
    """Rows long enough that the kernels split them across programs and merge the partials."""
    gen = torch.Generator().manual_seed(13)
    c = PagedTrajectoryKVCache(1, 2 * 20, 8, 2, 8, 4, 2, 150, dtype=torch.float64)
    for n in (60, 60, 60, 1):  # 181 tokens into capacity 150: evictions leave holes across pages
        k = torch.randn(2, 2, n, 8, generator=gen, dtype=torch.float64)
        c.append(0, k, k.flip(-1), torch.randn(2, n, 4, generator=gen), lengths=torch.tensor([n, n // 2]))
        c.step()
    q = torch.randn(2, 6, 2, 8, generator=gen, dtype=torch.float64)
    tau = torch.rand(2, 6, 2, generator=gen, dtype=torch.float64) + 0.4
    tau[1, 3, 1] = math.inf
    out, lse = trajops.paged_temperature_attention(q, c, 0, tau, return_lse=True)
    e_out, e_lse = _expected(q, c, 0, tau)
    assert_close(out, e_out)
    assert_close(lse, e_lse)
    assert torch.isnan(lse[1, 3, 1]) and torch.isfinite(lse[0]).all()
