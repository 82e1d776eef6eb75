"""Issue 20's reproducers, items 1-7, as written in the issue (ids issue.item<N>_...)."""
from __future__ import annotations

import math

import torch

import trajops
from hostile_cases import RESULT, check, check_shape, raises, register, rows_nan, same
from hostile_cases_kv import STATE, check_padding_last
from hostile_cases_kv_evict import compare_with_reference
from trajops import reference as R
from trajops.ops import temperature_attention as _ta

OPS = "torch.ops.trajops."


def item1():
    x = torch.randn(1, 3, 2, requires_grad=True); trajops.trajectory_flow(x, window=2**63 - 1).sum().backward()  # noqa
    y = x.detach().clone().requires_grad_()
    trajops.trajectory_flow(y, window=3).sum().backward()
    same(x.grad, y.grad, "grad with window 2**63-1 vs window=T", 1e-6)


register("issue.item1_flow_backward_huge_window", item1, RESULT, "trajops.trajectory_flow",
         OPS + "trajectory_flow_backward")


def _item2_state():
    c = trajops.PagedTrajectoryKVCache(1, 8, 4, 1, 4, 3, 2, 8); k = torch.randn(2, 1, 2, 4)  # noqa: E702
    c.append(0, k, k, torch.randn(2, 3)); pt = c.page_table.clone(); pt[0, 1] = 10**6  # noqa: E702
    return c, pt


def item2_relevance():
    c, pt = _item2_state()
    torch.ops.trajops.kv_relevance(c.traj_pool, c.ts_pool, c.live_pool, pt, torch.randn(2, 3), c.now, .7, .1)


def item2_topk():
    c, pt = _item2_state()
    torch.ops.trajops.kv_topk(c.traj_pool, c.ts_pool, c.live_pool, pt, torch.randn(2, 3), c.now, .7, .1, 3)


def item2_evict():
    c, pt = _item2_state()
    pt[0, 0] = 10**6  # row 0 owns one page (entry 0) before the append
    torch.ops.trajops.kv_evict_append_(c.traj_pool, c.ts_pool, c.live_pool, c.pinned_pool, pt, c.live_count,
                                       c.capacity, c.free_pages, c.free_top, c.evicted_total, c.now,
                                       torch.randn(2, 3, 3), torch.full((2,), 3), None, .7, .1)


def item2_paged():
    c, pt = _item2_state()
    torch.ops.trajops.paged_temperature_attention(torch.randn(2, 1, 1, 4), c.k_pool[0], c.v_pool[0], pt, c.live_pool,
                                                  torch.tensor(1.0), None, None)


register("issue.item2_kv_relevance_page_table", item2_relevance, raises("page_table"), OPS + "kv_relevance")
register("issue.item2_kv_topk_page_table", item2_topk, raises("page_table"), OPS + "kv_topk")
register("issue.item2_kv_evict_append_page_table", item2_evict, raises("page_table"), OPS + "kv_evict_append_")
register("issue.item2_paged_attention_page_table", item2_paged, raises("page_table"),
         OPS + "paged_temperature_attention")


def item3():
    q, k, v = torch.randn(1,1,3,8), torch.randn(1,1,4,8), torch.randn(1,1,4,8); q[0,0,1,2] = float('nan')  # noqa
    out, lse = trajops.temperature_attention(q, k, v, 1.0, return_lse=True)
    clean = trajops.temperature_attention(q.nan_to_num(0.0), k, v, 1.0, return_lse=True)
    check(bool(rows_nan(out, 1)[0, 0, 1] and lse[0, 0, 1].isnan()), f"row 1 must be NaN, got {out[0, 0, 1].tolist()}, "
                                                                     f"lse {lse[0, 0, 1].item()}")
    same(out[0, 0, ::2], clean[0][0, 0, ::2], "rows 0 and 2 vs a clean run", 1e-5)


register("issue.item3_attention_nan_query_row", item3, RESULT, "trajops.temperature_attention",
         OPS + "temperature_attention")


def item4():
    m = trajops.nn.TrajectoryAdaptivePositionalEncoding(6, max_len=16)
    check_shape(m(torch.randn(2, 0, 6)), (2, 0, 6), "(B, 0, E) input")
    check_shape(m(torch.randn(0, 6)), (0, 6), "(0, E) input")


register("issue.item4_ape_module_t0", item4, RESULT, "trajops.nn.TrajectoryAdaptivePositionalEncoding")


def item5():
    c = trajops.nn.TrajectoryAwareKVCache(2, 2); old, new = torch.randn(1,2,2), torch.randn(1,2,2)  # noqa
    c.update_cache(old, old, torch.tensor([1., 0.])); c.update_cache(new, new, torch.tensor([1e-9, 1e-9]))  # noqa
    keys, _ = c.cache.gather(0, c._live_in_order()[None])
    same(keys[0, 0], torch.stack([old[0, 1], new[0, 1]]), "entries kept (insertion order): the seed keeps [old1, new1]")


register("issue.item5_nn_kv_cache_tiny_trajectory", item5, RESULT, "trajops.nn.TrajectoryAwareKVCache")


def _item6_cache():
    """One row, capacity 4, entries written under -e1, e1, e1."""
    c = trajops.PagedTrajectoryKVCache(1, 2, 4, 1, 2, 2, 1, 4)
    for t in ([-1.0, 0.0], [1.0, 0.0], [1.0, 0.0]):
        kv = torch.randn(1, 1, 1, 2)
        c.append(0, kv, kv, torch.tensor([t]))
        c.step()
    return c


def item6_evict():
    c = _item6_cache()
    st = {name: getattr(c, name).clone() for name in STATE}
    compare_with_reference(st, torch.full((1, 3, 2), math.nan), torch.tensor([3]))


def item6_topk_nan_query():
    c = _item6_cache()
    args = (c.traj_pool, c.ts_pool, c.live_pool, c.page_table, torch.full((1, 2), math.nan), c.now, .7, .1, 4)
    got, want = torch.ops.trajops.kv_topk(*args), R.kv_topk(*args)
    check_padding_last(got[0])
    same(got[0], want[0], "kv_topk slots with a NaN query vs the reference")
    same(got[1], want[1], "kv_topk scores with a NaN query vs the reference")


def item6_stored_nan():
    c = _item6_cache()
    c.traj_pool[0, 1] = math.nan
    args = (c.traj_pool, c.ts_pool, c.live_pool, c.page_table, torch.tensor([[1.0, 0.0]]), c.now, .7, .1, 4)
    got, want = torch.ops.trajops.kv_topk(*args), R.kv_topk(*args)
    check_padding_last(got[0])
    check_padding_last(want[0])
    same(got[0], want[0], "kv_topk slots with a stored NaN entry vs the reference")


register("issue.item6_evict_nan_trajectory", item6_evict, RESULT, OPS + "kv_evict_append_")
register("issue.item6_topk_nan_query", item6_topk_nan_query, RESULT, OPS + "kv_topk")
register("issue.item6_topk_stored_nan_entry", item6_stored_nan, RESULT, OPS + "kv_topk")


def item7_ape_e0():
    d = torch.rand(2, 5, requires_grad=True)
    tab = torch.zeros(16, 0, requires_grad=True)
    trajops.adaptive_positional_encoding(d, tab).sum().backward()
    same(d.grad, torch.zeros(2, 5), "grad of displacement with E = 0")
    check_shape(tab.grad, (16, 0), "grad of the (16, 0) table")


def item7_stp_large_step():
    h = (torch.arange(4, dtype=torch.float32)[:, None] * 1e20 * torch.ones(3)).expand(1, 4, 3).contiguous()
    loss = trajops.stp_loss(h, triples=torch.tensor([[[0, 1, 3]]]))
    check(abs(float(loss)) < 1e-6, f"parallel steps of 1e20: loss 0.0 (as F.cosine_similarity), got {float(loss)}")


def item7_subnormal_tau():
    q, k, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    out, lse = trajops.temperature_attention(q, k, v, torch.tensor(1e-45), return_lse=True)
    check(bool(out.isnan().all() and lse.isnan().all()), f"tau = 1e-45 (fp32): NaN rows, got lse {lse.tolist()}")


def item7_neg_inf_v():
    q, k, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    k[0, 0, 0] = -q[0, 0].mean(0) * 1e3  # key 0's weight underflows to 0 for every query
    v[0, 0, 0, 0] = -math.inf
    out, lse = trajops.temperature_attention(q, k, v, 1.0, return_lse=True)
    want = _ta._reference_forward(q, k, v, torch.tensor(1.0), None, False, None)
    same(out, want[0], "out vs the reference", 1e-5)


def item7_dtype_long():
    c = trajops.PagedTrajectoryKVCache(1, 8, 4, 1, 4, 3, 2, 8, dtype=torch.long)
    kv = torch.full((1, 1, 1, 4), 2.5)
    c.append(0, kv, kv, torch.randn(1, 3))


def item7_message_spelling():
    # every backend spells dtypes as Python does ("torch.int64", not "Long")
    trajops.trajectory_flow(torch.ones(1, 3, 2, dtype=torch.long))


register("issue.item7_ape_backward_e0", item7_ape_e0, RESULT, "trajops.adaptive_positional_encoding",
         OPS + "adaptive_positional_encoding_backward")
register("issue.item7_stp_loss_step_1e20", item7_stp_large_step, RESULT, "trajops.stp_loss", OPS + "stp_loss")
register("issue.item7_subnormal_tau", item7_subnormal_tau, RESULT, "trajops.temperature_attention")
register("issue.item7_neg_inf_v_underflow", item7_neg_inf_v, RESULT, "trajops.temperature_attention")
register("issue.item7_kv_cache_dtype_long", item7_dtype_long, raises("dtype", types=("TypeError", "ValueError")),
         "trajops.PagedTrajectoryKVCache")
register("issue.item7_message_dtype_spelling", item7_message_spelling, raises("x", also=("torch.int64",)),
         "trajops.trajectory_flow")
