"""trajectory_flow, stp_loss / stp_loss_dense and adaptive_positional_encoding called as a hostile
user would: every error message has the exact text, identical on every backend (that no call crashes
the process is the crash suite's job: tests/test_hostile_inputs.py).

The C++ kernels once said "got Long" and "got -1" where the Python checks said "got torch.int64" and
"got -1.0": every case here compares the full message (type and text), so a backend that spells a
dtype, a float, a shape or the order of its checks differently fails. Runs on whatever backend this
process dispatches to (C++, reference, Triton interpreter).
"""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trajops

T = torch.ops.trajops
BIG = 2**63 - 1


def x3(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


def tri(rows=((0, 1, 2), (0, 1, 2))):
    return torch.tensor([list(rows)])


H = [x3(2, 4, 3)]
TF = "trajectory_flow: "
TRIPLES = "triples must satisfy 0 <= s < r < t < length for every row of length >= 3; got (s, r, t) = "
APE = "adaptive_positional_encoding: "

CASES = [
    # ---- trajectory_flow
    ("tf_int64", lambda: trajops.trajectory_flow(x3(2, 3, 4, dtype=torch.int64)), TypeError,
     TF + "x must be float32, float64, float16 or bfloat16, got torch.int64"),
    ("tf_complex", lambda: T.trajectory_flow(x3(2, 3, 4, dtype=torch.complex64)), TypeError,
     TF + "x must be float32, float64, float16 or bfloat16, got torch.complex64"),
    ("tf_bool", lambda: T.trajectory_flow(x3(2, 3, 4, dtype=torch.bool)), TypeError,
     TF + "x must be float32, float64, float16 or bfloat16, got torch.bool"),
    ("tf_rank1", lambda: trajops.trajectory_flow(x3(5)), ValueError,
     TF + "x must have shape (B, T, D) or (T, D), got shape [5]"),
    ("tf_rank0", lambda: T.trajectory_flow(torch.tensor(1.0)), ValueError,
     TF + "x must have shape (B, T, D) or (T, D), got shape []"),
    ("tf_window0", lambda: trajops.trajectory_flow(x3(2, 3, 4), 0), ValueError, TF + "window must be >= 1, got 0"),
    ("tf_window_min", lambda: T.trajectory_flow(x3(2, 3, 4), -BIG - 1), ValueError,
     TF + "window must be >= 1, got -9223372036854775808"),
    ("tf_eps_neg", lambda: trajops.trajectory_flow(x3(2, 3, 4), 8, -1.0), ValueError,
     TF + "eps must be a finite number >= 0, got -1.0"),
    ("tf_eps_int", lambda: T.trajectory_flow(x3(2, 3, 4), 8, -1), ValueError,
     TF + "eps must be a finite number >= 0, got -1.0"),
    ("tf_eps_third", lambda: T.trajectory_flow(x3(2, 3, 4), 8, -1 / 3), ValueError,
     TF + "eps must be a finite number >= 0, got -0.3333333333333333"),
    ("tf_eps_nan", lambda: T.trajectory_flow(x3(2, 3, 4), 8, float("nan")), ValueError,
     TF + "eps must be a finite number >= 0, got nan"),
    ("tf_eps_inf", lambda: T.trajectory_flow(x3(2, 3, 4), 8, float("inf")), ValueError,
     TF + "eps must be a finite number >= 0, got inf"),
    ("tf_eps_big", lambda: T.trajectory_flow(x3(2, 3, 4), 8, -1e16), ValueError,
     TF + "eps must be a finite number >= 0, got -1e+16"),
    ("tf_eps_small", lambda: T.trajectory_flow(x3(2, 3, 4), 8, -1e-05), ValueError,
     TF + "eps must be a finite number >= 0, got -1e-05"),
    ("tf_bw_shape", lambda: T.trajectory_flow_backward(x3(2, 3, 5), x3(2, 3, 4), 8, 1e-6), ValueError,
     "trajectory_flow_backward: grad_out must have the shape of x [2, 3, 4], got [2, 3, 5]"),
    ("tf_bw_dtype", lambda: T.trajectory_flow_backward(x3(2, 3, 4, dtype=torch.int64), x3(2, 3, 4), 8, 1e-6),
     TypeError, "trajectory_flow_backward: grad_out must have the dtype of x (torch.float32), got torch.int64"),
    ("tf_bw_device", lambda: T.trajectory_flow_backward(x3(2, 3, 4, device="meta"), x3(2, 3, 4), 1, 0.5),
     RuntimeError, "trajectory_flow_backward: grad_out and x must be on one device, got meta and cpu"),
    ("tf_bw_eps", lambda: T.trajectory_flow_backward(x3(2, 3, 4), x3(2, 3, 4), 1, -0.5), ValueError,
     TF + "eps must be a finite number >= 0, got -0.5"),
    # ---- stp_loss (raw op: the check order is hidden, triples, lengths, grads, then index values)
    ("stp_no_layer", lambda: T.stp_loss([], tri()), ValueError,
     "stp_loss: hidden must hold at least one (B, T, D) tensor, got none"),
    ("stp_int_hidden", lambda: T.stp_loss([x3(2, 4, 3, dtype=torch.int64)], tri()), TypeError,
     "stp_loss: hidden must be float32, float64, float16 or bfloat16, got torch.int64"),
    ("stp_layer_dtype", lambda: T.stp_loss([x3(2, 4, 3), x3(2, 4, 3, dtype=torch.float64)], tri()), TypeError,
     "stp_loss: every layer must have the dtype of hidden[0] (torch.float32), got torch.float64 for hidden[1]"),
    ("stp_layer_shape", lambda: T.stp_loss([x3(2, 4, 3), x3(2, 4, 2)], tri()), ValueError,
     "stp_loss: every layer must have the shape of hidden[0] [2, 4, 3], got [2, 4, 2] for hidden[1]"),
    ("stp_triples_int32", lambda: T.stp_loss(H, tri().int()), TypeError,
     "stp_loss: triples must be int64, got torch.int32"),
    ("stp_triples_rank", lambda: T.stp_loss(H, tri()[0]), ValueError,
     "stp_loss: triples must have shape (n_spans, B, 3) with n_spans >= 1, got shape [2, 3]"),
    ("stp_triples_rows", lambda: T.stp_loss(H, torch.zeros(1, 3, 3, dtype=torch.long)), ValueError,
     "stp_loss: triples must have shape (n_spans, B, 3) = (1, 2, 3), got shape [1, 3, 3]"),
    ("stp_triples_device", lambda: T.stp_loss(H, tri().to("meta")), RuntimeError,
     "stp_loss: triples must be on the device of hidden (cpu), got meta"),
    ("stp_lengths_int32", lambda: T.stp_loss(H, tri(), torch.tensor([3, 4], dtype=torch.int32)), TypeError,
     "stp_loss: lengths must be int64, got torch.int32"),
    ("stp_lengths_shape", lambda: T.stp_loss(H, tri(), torch.tensor([3, 4, 4])), ValueError,
     "stp_loss: lengths must have shape (B,) = (2,), got shape [3]"),
    ("stp_lengths_value", lambda: T.stp_loss(H, tri(), torch.tensor([3, BIG])), ValueError,
     "stp_loss: lengths must be in [0, T] = [0, 4], got 9223372036854775807 for row 1"),
    ("stp_triple_value", lambda: T.stp_loss(H, tri(((0, 1, 2), (-1, 1, 2)))), ValueError,
     "stp_loss: " + TRIPLES + "(-1, 1, 2) for span 0, row 1 (length 4)"),
    ("stp_triple_past_length", lambda: T.stp_loss(H, tri(((0, 1, 3), (0, 1, 2))), torch.tensor([3, 4])),
     ValueError, "stp_loss: " + TRIPLES + "(0, 1, 3) for span 0, row 0 (length 3)"),
    ("stp_order_shape_before_values", lambda: T.stp_loss(H, tri().int(), torch.tensor([3, 9])), TypeError,
     "stp_loss: triples must be int64, got torch.int32"),
    ("stp_order_lengths_before_triples", lambda: T.stp_loss(H, tri(((0, 1, 9), (0, 1, 2))), torch.tensor([3, 9])),
     ValueError, "stp_loss: lengths must be in [0, T] = [0, 4], got 9 for row 1"),
    ("stp_bw_grad_dtype", lambda: T.stp_loss_backward(x3(1, 1, 2, dtype=torch.float64), x3(1, 1, 2, 3), H, tri(),
                                                      None),
     TypeError, "stp_loss_backward: grad_loss must be torch.float32, got torch.float64"),
    ("stp_bw_stats_shape", lambda: T.stp_loss_backward(x3(1, 1, 2), x3(1, 1, 2, 2), H, tri(), None), ValueError,
     "stp_loss_backward: stats must have shape [1, 1, 2, 3], got [1, 1, 2, 2]"),
    ("stp_bw_order_grads_before_values",
     lambda: T.stp_loss_backward(x3(1, 1, 3), x3(1, 1, 2, 3), H, tri(((0, 1, 4), (0, 1, 2))), torch.tensor([9, 9])),
     ValueError, "stp_loss_backward: grad_loss must have shape [1, 1, 2], got [1, 1, 3]"),
    ("stp_bw_lengths_value", lambda: T.stp_loss_backward(x3(1, 1, 2), x3(1, 1, 2, 3), H, tri(),
                                                         torch.tensor([-5, 3])),
     ValueError, "stp_loss_backward: lengths must be in [0, T] = [0, 4], got -5 for row 0"),
    ("dense_int_hidden", lambda: T.stp_loss_dense([x3(2, 4, 3, dtype=torch.int32)]), TypeError,
     "stp_loss_dense: hidden must be float32, float64, float16 or bfloat16, got torch.int32"),
    ("dense_lengths_value", lambda: T.stp_loss_dense(H, torch.tensor([BIG, 3])), ValueError,
     "stp_loss_dense: lengths must be in [0, T] = [0, 4], got 9223372036854775807 for row 0"),
    ("dense_bw_order", lambda: T.stp_loss_dense_backward(x3(1, 2, 3), x3(1, 2, 3, 2), H, torch.tensor([9, 9])),
     ValueError, "stp_loss_dense_backward: grad_loss must have shape [1, 2, 2], got [1, 2, 3]"),
    ("dense_bw_lengths", lambda: T.stp_loss_dense_backward(x3(1, 2, 2), x3(1, 2, 3, 2), H, torch.tensor([9, 9])),
     ValueError, "stp_loss_dense_backward: lengths must be in [0, T] = [0, 4], got 9 for row 0"),
    ("pub_stp_lengths_float", lambda: trajops.stp_loss(x3(2, 4, 3), lengths=torch.tensor([1.0, 2.0])), TypeError,
     "stp_loss: lengths must be an integer tensor, got torch.float32"),
    ("pub_stp_lengths_value", lambda: trajops.stp_loss(x3(2, 4, 3), lengths=[1, 2**40]), ValueError,
     "stp_loss: lengths must be in [0, T] = [0, 4], got 1099511627776 for row 1"),
    ("pub_dense_reduction", lambda: trajops.stp_loss_dense(x3(2, 4, 3), reduction="max"), ValueError,
     "stp_loss_dense: reduction must be one of ('mean', 'sum', 'none'), got 'max'"),
    ("pub_sampler_spans", lambda: trajops.sample_stp_triples(2, 5, 0), ValueError,
     "sample_stp_triples: n_spans must be an int >= 1, got 0"),
    # ---- adaptive_positional_encoding
    ("ape_int", lambda: trajops.adaptive_positional_encoding(x3(2, 5, dtype=torch.int64), x3(8, 4)), TypeError,
     APE + "displacement must be float32, float64, float16 or bfloat16, got torch.int64"),
    ("ape_rank", lambda: T.adaptive_positional_encoding(x3(2, 5, 1), x3(8, 4)), ValueError,
     APE + "displacement must have shape (B, T) or (T,), got shape [2, 5, 1]"),
    ("ape_empty_table", lambda: T.adaptive_positional_encoding(x3(2, 5), x3(0, 4)), ValueError,
     APE + "pe_table must have shape (max_len, E) with max_len >= 1, got shape [0, 4]"),
    ("ape_table_dtype", lambda: T.adaptive_positional_encoding(x3(2, 5), x3(8, 4, dtype=torch.float64)), TypeError,
     APE + "pe_table must have the dtype of displacement (torch.float32), got torch.float64"),
    ("ape_positions_shape", lambda: T.adaptive_positional_encoding(x3(2, 5), x3(8, 4), torch.arange(4)), ValueError,
     APE + "positions must have shape (T,) = (5,) or the shape of displacement [2, 5], got shape [4]"),
    ("ape_positions_complex", lambda: T.adaptive_positional_encoding(x3(2, 5), x3(8, 4),
                                                                     x3(5, dtype=torch.complex64)),
     TypeError, APE + "positions must be a real (integer or floating) tensor, got torch.complex64"),
    ("ape_positions_device", lambda: T.adaptive_positional_encoding(x3(2, 5), x3(8, 4), x3(5, device="meta")),
     RuntimeError, APE + "displacement and positions must be on one device, got cpu and meta"),
    ("ape_bw_shape", lambda: T.adaptive_positional_encoding_backward(x3(2, 5, 3), x3(2, 5), x3(8, 4), None, False),
     ValueError,
     "adaptive_positional_encoding_backward: grad_out must have the output's shape [2, 5, 4], got [2, 5, 3]"),
    ("ape_bw_dtype", lambda: T.adaptive_positional_encoding_backward(x3(2, 5, 4, dtype=torch.float64), x3(2, 5),
                                                                     x3(8, 4), None, True),
     TypeError, "adaptive_positional_encoding_backward: grad_out must have the dtype of pe_table (torch.float32), "
                "got torch.float64"),
]


@pytest.mark.parametrize("thunk,exc,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_message(thunk, exc, message):
    with pytest.raises(Exception) as info:
        thunk()
    assert (type(info.value), str(info.value)) == (exc, message)


@settings(max_examples=60, deadline=None)
@given(eps=st.one_of(st.floats(max_value=-1e-320, allow_nan=False), st.sampled_from([-0.1, -2.5e-7, -1e22, -9e15])))
def test_float_arguments_are_spelled_as_python_spells_them(eps):
    # The C++ kernels print floats as repr() does (shortest round-trip digits, ".0", "e-05", "inf").
    with pytest.raises(ValueError) as info:
        T.trajectory_flow(x3(1, 2, 1), 1, eps)
    assert str(info.value) == f"trajectory_flow: eps must be a finite number >= 0, got {eps}"
