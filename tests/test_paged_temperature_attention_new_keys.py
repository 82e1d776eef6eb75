"""paged_temperature_attention with new tokens (k_new / v_new): the pools' keys ++ the new keys, causal among them.

The oracle is independent of the op's reference: the cache's own gather + live map, the new keys concatenated,
a (B, 1, n, L + n) mask (every live old key, new keys 0..i for query i), and trajops.temperature_attention (or the
fp64 reference attention for half types). The caches come from tests/test_paged_temperature_attention.py's
stream (holes, partial pages, uneven rows, an empty row).
"""
from __future__ import annotations

import math

import pytest
import torch

import trajops
from trajops import reference as R
from trajops.kv_forward import ForwardKVCache

from conftest import DTYPES, INTERPRETER, assert_close
from test_paged_temperature_attention import _cache, _dense

OP = torch.ops.trajops.paged_temperature_attention


def _new(B, Hkv, n, D, Dv, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hkv, n, D, generator=gen).to(dtype), torch.randn(B, Hkv, n, Dv, generator=gen).to(dtype)


def _keys_and_mask(c, layer, B, k_new, v_new, slots=None):
    k, v, ok = _dense(c, layer, B, slots)
    n, L = k_new.shape[2], ok.shape[1]
    mask = torch.cat([ok[:, None, None, :].expand(B, 1, n, L),
                      torch.ones(n, n, dtype=torch.bool).tril().expand(B, 1, n, n)], dim=3)
    return torch.cat([k, k_new], 2), torch.cat([v, v_new], 2), mask


def _expected(q, c, layer, tau, k_new, v_new, scale=None, slots=None):
    k, v, mask = _keys_and_mask(c, layer, q.shape[0], k_new, v_new, slots)
    return trajops.temperature_attention(q, k, v, tau, attn_mask=mask, scale=scale, return_lse=True)


def _oracle(q, c, layer, tau, k_new, v_new, scale=None):
    k, v, mask = _keys_and_mask(c, layer, q.shape[0], k_new, v_new)
    B, Hq, n, D = q.shape
    t = tau if isinstance(tau, torch.Tensor) else torch.tensor(float(tau))
    coef = R.temperature_coefficient(t.double(), (B, Hq, n), 1.0 / math.sqrt(D) if scale is None else scale,
                                     torch.float64)
    return R.temperature_attention(q.double(), k.double(), v.double(), coef, mask, False)


def _call(q, c, layer, tau, k_new, v_new, scale=None, slots=None):
    # a float tau in q's compute dtype, as the public functions make it
    t = tau if isinstance(tau, torch.Tensor) else torch.tensor(float(tau), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return OP(q, c.k_pool[layer], c.v_pool[layer], c.page_table, c.live_pool, t, slots, scale, k_new, v_new)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 6])
def test_matches_gather_cat_new_plus_causal_attention(dtype, n):
    c = _cache(dtype=dtype)
    gen = torch.Generator().manual_seed(10 + n)
    q = torch.randn(3, 4, n, 8, generator=gen).to(dtype)  # GQA: 4 query heads over 2 kv heads
    tau = torch.rand(3, 4, n, generator=gen) + 0.5
    k_new, v_new = _new(3, 2, n, 8, 8, dtype, n)
    for layer in (0, 1):
        out, lse = _call(q, c, layer, tau, k_new, v_new)
        assert out.dtype == dtype and out.shape == (3, 4, n, 8)
        o_out, o_lse = _oracle(q, c, layer, tau, k_new, v_new)
        assert_close(out, o_out, dtype)
        assert_close(lse, o_lse, dtype)
        if dtype in (torch.float32, torch.float64):
            e_out, e_lse = _expected(q, c, layer, tau, k_new, v_new)
            assert_close(out, e_out)
            assert_close(lse, e_lse)
    # the row without old keys (row 2) attends its new keys only: query 0 sees exactly its own token
    assert torch.isfinite(lse[2]).all()
    g = 4 // 2
    assert_close(out[2, :, 0].double(), v_new[2].repeat_interleave(g, dim=0)[:, 0].double(), dtype)


def test_scale_slots_value_head_size_and_strided_new_keys():
    c = _cache(dtype=torch.float64, Hkv=1, D=6)
    gen = torch.Generator().manual_seed(4)
    n = 3
    q = torch.randn(3, 2, n, 6, generator=gen, dtype=torch.float64)
    # strided views: k_new every other token of a longer buffer, v_new a slice of wider head rows
    k_new = torch.randn(3, 1, 2 * n, 6, generator=gen, dtype=torch.float64)[:, :, ::2]
    v_new = torch.randn(3, 1, n, 9, generator=gen, dtype=torch.float64)[..., :6]
    assert not k_new.is_contiguous() and not v_new.is_contiguous()
    slots = torch.tensor([[0, 3, 3, -1, 99], [1, 2, 5, 0, 0], [0, 1, 2, 3, 4]])
    for kw in (dict(scale=0.41), dict(slots=slots), dict(scale=2.0, slots=slots)):
        out, lse = _call(q, c, 1, 0.9, k_new, v_new, **kw)
        e_out, e_lse = _expected(q, c, 1, 0.9, k_new, v_new, **kw)
        assert_close(out, e_out)
        assert_close(lse, e_lse)


def test_nan_rules_with_new_keys():
    c = _cache(dtype=torch.float64)
    n = 3
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 2, n, 8, generator=gen, dtype=torch.float64)
    tau = torch.rand(3, 2, n, generator=gen, dtype=torch.float64) + 0.5
    k_new, v_new = _new(3, 2, n, 8, 8, torch.float64, 5)
    tau[2, 0, 1] = -1.0  # a bad tau on the row without old keys: NaN too (it has keys now: its new ones)
    k_new[0, 1, 1, 3] = math.nan  # new key 1 of row 0, kv head 1: queries 1, 2 of head 1 are NaN, query 0 is not
    v_new[1, 0, 2, 0] = math.inf  # new value 2 of row 1, kv head 0: only query 2 of head 0 reaches it
    out, lse = _call(q, c, 0, tau, k_new, v_new)
    rows = out.isnan().any(-1)
    want = torch.zeros_like(rows)
    want[2, 0, 1] = True
    want[0, 1, 1:] = True
    want[1, 0, 2] = True
    assert torch.equal(rows, want)
    assert torch.equal(lse.isnan(), want)
    e_out, e_lse = _expected(q, c, 0, tau, k_new, v_new)
    assert torch.equal(e_out.isnan().any(-1), want)
    assert_close(out.nan_to_num(), e_out.nan_to_num())


def test_opcheck_and_compile():
    c = _cache(dtype=torch.float32)
    q = torch.randn(3, 4, 2, 8)
    k_new, v_new = _new(3, 2, 2, 8, 8, torch.float32, 1)
    args = (q, c.k_pool[0], c.v_pool[0], c.page_table, c.live_pool, torch.tensor(1.1), None, None, k_new, v_new)
    torch.library.opcheck(OP, args)
    fn = torch.compile(lambda *a: OP(*a), backend="eager", fullgraph=True)
    for got, want in zip(fn(*args), OP(*args)):
        assert_close(got, want)


def test_bad_new_keys():
    c = _cache(dtype=torch.float32)
    q = torch.randn(3, 4, 2, 8)
    k_new, v_new = _new(3, 2, 2, 8, 8, torch.float32, 1)
    base = (q, c.k_pool[0], c.v_pool[0], c.page_table, c.live_pool, torch.tensor(1.0), None, None)
    cases = [
        ((k_new, None), ValueError, "k_new and v_new must be given together"),
        ((None, v_new), ValueError, "k_new and v_new must be given together"),
        ((k_new[:, :, :1], v_new), ValueError, r"k_new must have shape \(B, Hkv, n, D\) = \(3, 2, 2, 8\)"),
        ((k_new, v_new[..., :5]), ValueError, r"v_new must have shape \(B, Hkv, n, Dv\) = \(3, 2, 2, 8\)"),
        ((k_new.repeat(1, 2, 1, 1), v_new), ValueError, "k_new must have shape"),
        ((k_new.double(), v_new), TypeError, "q, k_new and v_new must have one dtype"),
        ((k_new, v_new.half()), TypeError, "q, k_new and v_new must have one dtype"),
    ]
    for (kn, vn), exc, msg in cases:
        with pytest.raises(exc, match=msg):
            OP(*base, kn, vn)
    with pytest.raises(RuntimeError, match="every tensor must be on q's device"):
        OP(*base, k_new.to("meta"), v_new)


def _attend_stream(monkeypatch, fused, seed, spans, masks):
    """Outputs of ForwardKVCache.stage + attend over forwards of ``spans`` new tokens (2 layers), with the
    op's new keys (fused) or the merge path; masks(n, live) gives each layer's attn_mask."""
    import trajops.kv_attention as KA

    monkeypatch.setattr(KA, "_MAX_FUSED_NEW", 16 if fused else 0)
    gen = torch.Generator().manual_seed(seed)
    c = ForwardKVCache(2, 12, 8, max_batch_size=2)
    outs = []
    with torch.no_grad():
        for n in spans:
            for layer, mask in enumerate(masks(n, c.live)):
                k, v = torch.randn(2, 2, n, 8, generator=gen), torch.randn(2, 2, n, 8, generator=gen)
                q = torch.randn(2, 4, n, 8, generator=gen)
                c.stage(k, v, layer)
                outs.append(c.attend(q, layer, scale=0.3, attn_mask=mask))
    return outs


@pytest.mark.skipif(INTERPRETER, reason="class-level decode loop: the C++ and reference passes cover it")
@pytest.mark.parametrize("masked", [False, True])
def test_forward_cache_fused_path_equals_the_merge_path(monkeypatch, masked):
    """ForwardKVCache.attend uses the op's new keys for short spans; the merge path (new keys apart + a
    log-sum-exp merge) must give the same attention."""
    def masks(n, live):
        mask = torch.ones(2, 1, n, live + n, dtype=torch.bool).tril(live) if masked else None
        return mask, mask

    runs = [_attend_stream(monkeypatch, fused, 0, (7, 3, 1, 1, 2, 1), masks) for fused in (True, False)]
    for a, b in zip(*runs):
        assert_close(a, b)


@pytest.mark.skipif(INTERPRETER, reason="class-level decode loop: the C++ and reference passes cover it")
def test_forward_cache_rereads_a_layer_given_another_mask(monkeypatch):
    """ForwardKVCache.attend decides once per forward whether the new keys are causal (transformers hands
    every layer one mask object); a layer given another mask (here: row 0's decode token hidden from
    itself) must be decided again, i.e. equal the merge path layer by layer."""
    def masks(n, live):
        causal = torch.ones(2, 1, n, live + n, dtype=torch.bool).tril(live)
        other = causal.clone()
        other[0, :, :, live:] = False  # row 0: no new key (only the old ones)
        return (causal, other) if live else (causal, causal)

    runs = [_attend_stream(monkeypatch, fused, 1, (5, 1, 1), masks) for fused in (True, False)]
    for a, b in zip(*runs):
        assert_close(a, b)
