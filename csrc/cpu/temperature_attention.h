// The dense CPU kernels of trajops::temperature_attention (csrc/cpu/temperature_attention.cpp), for
// kernels built on them (the packed variant runs them on each document's views).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <utility>

#include "py_format.h"

namespace trajops {

// Rank, dtype and device of q, k, v and tau: the first checks of the dense (rank 4, "(B, H, T, D)")
// and the packed (rank 3, "(total, H, D) (packed tokens)") ops, as trajops/ops/_checks.py spells them.
inline void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& tau, int64_t rank, const char* layout) {
  const std::pair<const char*, const at::Tensor*> qkv[] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, t] : qkv)
    TORCH_CHECK_VALUE(t->dim() == rank, op, ": ", name, " must have shape ", layout, ", got shape ", t->sizes());
  const auto st = q.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
                   ": q must be float32, float64, float16 or bfloat16, got ", py_dtype(st));
  TORCH_CHECK_TYPE(k.scalar_type() == st && v.scalar_type() == st, op, ": q, k and v must have one dtype, got ",
                   py_dtype(st), ", ", py_dtype(k.scalar_type()), " and ", py_dtype(v.scalar_type()));
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device() && tau.device() == q.device(), op,
              ": q, k, v and tau must be on one device, got ", q.device(), ", ", k.device(), ", ", v.device(),
              " and ", tau.device());
}

// A backward input (grad_out, out, lse, grad_lse) of op's backward: shape, dtype (none: any) and device.
inline void check_like(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                       c10::optional<at::ScalarType> dtype, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, "_backward: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(!dtype.has_value() || t.scalar_type() == *dtype, op, "_backward: ", name, " must be ",
                   py_dtype(*dtype), ", got ", py_dtype(t.scalar_type()));
  TORCH_CHECK(t.device() == q.device(), op, "_backward: ", name, " must be on ", q.device(), ", got ", t.device());
}

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
