// The dense CPU kernels of trajops::temperature_attention (csrc/cpu/temperature_attention.cpp), for
// kernels built on them (the packed variant runs them on each document's views).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace trajops {

// q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv), tau broadcastable to (B, Hq, Tq), attn_mask
// bool rank 4 or none -> out (B, Hq, Tq, Dv), lse (B, Hq, Tq). Checks its arguments.
std::tuple<at::Tensor, at::Tensor> temperature_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& tau,
                                                             const c10::optional<at::Tensor>& attn_mask,
                                                             bool causal, c10::optional<double> scale);

// -> dq, dk, dv and dtau (tau's shape and dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> temperature_attention_backward_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& tau, const c10::optional<at::Tensor>& attn_mask,
    bool causal, c10::optional<double> scale, const at::Tensor& out, const at::Tensor& lse);

}  // namespace trajops
