// The dense CPU kernels of trajops::temperature_attention (csrc/cpu/temperature_attention.cpp), for
// kernels built on them (the packed variant runs them on each document's views).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <limits>
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

// c = scale / tau for every query row, contiguous (B, Hq, Tq) in cd (float or double): a true division of
// scale rounded to cd by tau rounded to cd, NaN where tau is not positive finite or the quotient overflows
// (a subnormal tau); the reference's temperature_coefficient without has_keys. tau: broadcastable to
// (B, Hq, Tq) (checked by the caller). One strided loop, no ATen temporaries: a decode step calls it per
// layer, where the ~8 elementwise ops it replaces cost more than the attention itself.
inline at::Tensor temperature_coefficients(const at::Tensor& tau, int64_t B, int64_t Hq, int64_t Tq, double scale,
                                           at::ScalarType cd) {
  const at::Tensor t = tau.expand({B, Hq, Tq});  // a view: broadcast dims get stride 0
  at::Tensor c = at::empty({B, Hq, Tq}, tau.options().dtype(cd));
  const int64_t s0 = t.stride(0), s1 = t.stride(1), s2 = t.stride(2);
  AT_DISPATCH_FLOATING_TYPES(cd, "temperature_coefficients", [&] {
    using cd_t = scalar_t;
    cd_t* out = c.data_ptr<cd_t>();
    const cd_t sc = static_cast<cd_t>(scale), nan = std::numeric_limits<cd_t>::quiet_NaN();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "temperature_coefficients", [&] {
      const scalar_t* tp = t.data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < Hq; ++h)
          for (int64_t i = 0; i < Tq; ++i) {
            const cd_t tv = static_cast<cd_t>(tp[b * s0 + h * s1 + i * s2]);
            const cd_t cv = sc / tv;
            *out++ = (tv > 0 && std::isfinite(tv) && std::isfinite(cv)) ? cv : nan;
          }
    });
  });
  return c;
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
