// CPU kernels of trajops::adaptive_positional_encoding and its backward.
//
// Semantics: trajops/reference/adaptive_positional_encoding.py. The semantic positions are a
// sequential fp64 scan along T (parallel over B); the lookup and the reductions over E run per
// output row in fp32 (fp64 for fp64 inputs), parallel over the B*T rows. The table gradient is a
// scatter: it runs parallel over column blocks of E, each walking every row in order, so the sums
// are deterministic and independent of the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"
#include "py_format.h"

namespace trajops {
namespace {

constexpr const char* kName = "adaptive_positional_encoding";

bool is_kernel_dtype(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

std::string list_str(at::IntArrayRef s) {  // [2, 3] as Python prints a list
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Messages match trajops/ops/adaptive_positional_encoding.py so every backend fails the same way.
void check_args(const at::Tensor& d, const at::Tensor& pe, const std::optional<at::Tensor>& positions) {
  TORCH_CHECK_VALUE(d.dim() == 1 || d.dim() == 2, kName, ": displacement must have shape (B, T) or (T,), got shape ",
                    list_str(d.sizes()));
  TORCH_CHECK_TYPE(is_kernel_dtype(d.scalar_type()), kName,
                   ": displacement must be float32, float64, float16 or bfloat16, got ", py_dtype(d.scalar_type()));
  TORCH_CHECK_VALUE(pe.dim() == 2 && pe.size(0) >= 1, kName,
                    ": pe_table must have shape (max_len, E) with max_len >= 1, got shape ", list_str(pe.sizes()));
  TORCH_CHECK_TYPE(pe.scalar_type() == d.scalar_type(), kName, ": pe_table must have the dtype of displacement (",
                   py_dtype(d.scalar_type()), "), got ", py_dtype(pe.scalar_type()));
  TORCH_CHECK(pe.device() == d.device(), kName, ": displacement and pe_table must be on one device, got ", d.device(),
              " and ", pe.device());
  if (!positions.has_value()) return;
  const at::Tensor& p = *positions;
  const int64_t T = d.size(-1);
  TORCH_CHECK_VALUE((p.dim() == 1 && p.size(0) == T) || p.sizes() == d.sizes(), kName,
                    ": positions must have shape (T,) = (", T, ",) or the shape of displacement ", list_str(d.sizes()),
                    ", got shape ", list_str(p.sizes()));
  TORCH_CHECK_TYPE(p.scalar_type() != at::kBool && !at::isComplexType(p.scalar_type()), kName,
                   ": positions must be a real (integer or floating) tensor, got ", py_dtype(p.scalar_type()));
  TORCH_CHECK(p.device() == d.device(), kName, ": displacement and positions must be on one device, got ", d.device(),
              " and ", p.device());
}

// Where row (b, t) reads the table: rows f and c with weight a on c, and whether the unclamped
// position lies in [0, L-1] (clamp's gradient mask). Filled by one fp64 scan per sequence.
struct Lookup {
  std::vector<int64_t> f, c;
  std::vector<double> a;
  std::vector<uint8_t> inside;
};

Lookup scan_positions(const at::Tensor& d2, const std::optional<at::Tensor>& positions, int64_t L) {
  const int64_t B = d2.size(0), T = d2.size(1);
  Lookup lk;
  lk.f.resize(B * T);
  lk.c.resize(B * T);
  lk.a.resize(B * T);
  lk.inside.resize(B * T);
  const at::Tensor dd = d2.to(at::kDouble).contiguous();
  at::Tensor pos;
  int64_t pos_stride_b = 0;  // 0: one (T,) row shared by the batch
  if (positions.has_value()) {
    pos = positions->to(at::kDouble).contiguous();
    if (pos.dim() == 2) pos_stride_b = T;
  }
  const double* dp = dd.const_data_ptr<double>();
  const double* pp = pos.defined() ? pos.const_data_ptr<double>() : nullptr;
  const double hi = static_cast<double>(L - 1);
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(T, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double s = 0;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = b * T + t;
        s += dp[r];
        const double x = s + (pp ? pp[b * pos_stride_b + t] : static_cast<double>(t));
        // clamp like torch.clamp: NaN stays NaN (std::min/max would drop it)
        const double p = std::isnan(x) ? x : std::min(std::max(x, 0.0), hi);
        const double fl = std::floor(p);
        const int64_t fi = std::isnan(fl) ? 0 : static_cast<int64_t>(fl);
        lk.f[r] = fi;
        lk.c[r] = std::min<int64_t>(fi + 1, L - 1);
        lk.a[r] = p - fl;
        lk.inside[r] = (x >= 0.0 && x <= hi) ? 1 : 0;
      }
    }
  });
  return lk;
}

at::Tensor as_2d(const at::Tensor& t) { return t.dim() == 1 ? t.unsqueeze(0) : t; }

// (Loops with pragmas live in functions: a pragma cannot sit inside the AT_DISPATCH macro.)
template <typename scalar_t, typename acc_t>
inline void lerp_row(const scalar_t* lo, const scalar_t* up, acc_t a, scalar_t* o, int64_t E) {
  const acc_t wa = acc_t(1) - a;
#pragma omp simd
  for (int64_t e = 0; e < E; ++e) {
    o[e] = static_cast<scalar_t>(wa * static_cast<acc_t>(lo[e]) + a * static_cast<acc_t>(up[e]));
  }
}

// g . (up - lo)
template <typename scalar_t, typename acc_t>
inline acc_t slope_dot(const scalar_t* g, const scalar_t* lo, const scalar_t* up, int64_t E) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t e = 0; e < E; ++e) {
    s += static_cast<acc_t>(g[e]) * (static_cast<acc_t>(up[e]) - static_cast<acc_t>(lo[e]));
  }
  return s;
}

std::vector<int64_t> out_shape(const at::Tensor& d, const at::Tensor& pe) {
  std::vector<int64_t> shape(d.sizes().begin(), d.sizes().end());
  shape.push_back(pe.size(1));
  return shape;
}

at::Tensor apenc_cpu(const at::Tensor& d_in, const at::Tensor& pe_in, const std::optional<at::Tensor>& positions) {
  check_args(d_in, pe_in, positions);
  const at::Tensor pe = pe_in.contiguous();
  at::Tensor out = at::empty(out_shape(d_in, pe_in), pe.options());
  const int64_t L = pe.size(0), E = pe.size(1);
  const at::Tensor d2 = as_2d(d_in);
  const int64_t rows = d2.size(0) * d2.size(1);
  if (out.numel() == 0) return out;
  const Lookup lk = scan_positions(d2, positions, L);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pe.scalar_type(), "adaptive_positional_encoding_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* tp = pe.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(E, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        lerp_row<scalar_t, acc_t>(tp + lk.f[r] * E, tp + lk.c[r] * E, static_cast<acc_t>(lk.a[r]), op + r * E, E);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> apenc_backward_cpu(const at::Tensor& g_in, const at::Tensor& d_in,
                                                                  const at::Tensor& pe_in,
                                                                  const std::optional<at::Tensor>& positions,
                                                                  bool need_table) {
  check_args(d_in, pe_in, positions);
  const auto shape = out_shape(d_in, pe_in);
  TORCH_CHECK_VALUE(g_in.sizes() == at::IntArrayRef(shape), kName, "_backward: grad_out must have the output's shape ",
                    list_str(shape), ", got ", list_str(g_in.sizes()));
  TORCH_CHECK_TYPE(g_in.scalar_type() == pe_in.scalar_type(), kName,
                   "_backward: grad_out must have the dtype of pe_table (", py_dtype(pe_in.scalar_type()), "), got ",
                   py_dtype(g_in.scalar_type()));
  TORCH_CHECK(g_in.device() == d_in.device(), kName, "_backward: grad_out and displacement must be on one device, got ",
              g_in.device(), " and ", d_in.device());
  const at::Tensor pe = pe_in.contiguous();
  const at::Tensor g = g_in.contiguous();
  const int64_t L = pe.size(0), E = pe.size(1);
  const at::Tensor d2 = as_2d(d_in);
  const int64_t B = d2.size(0), T = d2.size(1), rows = B * T;
  at::Tensor gt_acc;
  if (need_table) gt_acc = at::zeros({L, E}, pe.options().dtype(at::toOpMathType(pe.scalar_type())));
  // dL/ds per row in fp64: the reverse scan over it must not lose the small terms of a long sum.
  std::vector<double> gs(rows, 0.0);
  if (rows > 0) {
    const Lookup lk = scan_positions(d2, positions, L);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pe.scalar_type(), "adaptive_positional_encoding_bwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* tp = pe.const_data_ptr<scalar_t>();
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(E, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          if (!lk.inside[r]) continue;
          gs[r] = static_cast<double>(slope_dot<scalar_t, acc_t>(gp + r * E, tp + lk.f[r] * E, tp + lk.c[r] * E, E));
        }
      });
      if (need_table && E > 0) {
        acc_t* gtp = gt_acc.mutable_data_ptr<acc_t>();
        constexpr int64_t kCols = 64;
        const int64_t blocks = (E + kCols - 1) / kCols;
        at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
          for (int64_t k = k0; k < k1; ++k) {
            const int64_t e0 = k * kCols, e1 = std::min(E, e0 + kCols);
            for (int64_t r = 0; r < rows; ++r) {
              const acc_t a = static_cast<acc_t>(lk.a[r]);
              const acc_t wa = acc_t(1) - a;
              const scalar_t* gr = gp + r * E;
              acc_t* lo = gtp + lk.f[r] * E;
              acc_t* up = gtp + lk.c[r] * E;
              // Two passes, not one: f and c may be the same row (at L-1).
              for (int64_t e = e0; e < e1; ++e) lo[e] += wa * static_cast<acc_t>(gr[e]);
              for (int64_t e = e0; e < e1; ++e) up[e] += a * static_cast<acc_t>(gr[e]);
            }
          }
        });
      }
    });
  }
  at::Tensor gs_t = at::empty({B, T}, d2.options().dtype(at::kDouble));
  at::Tensor gd_t = at::empty({B, T}, d2.options().dtype(at::kDouble));
  {
    double* sp = gs_t.mutable_data_ptr<double>();
    double* dp = gd_t.mutable_data_ptr<double>();
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(T, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double acc = 0;
        for (int64_t t = T - 1; t >= 0; --t) {
          acc += gs[b * T + t];
          dp[b * T + t] = acc;
          sp[b * T + t] = gs[b * T + t];
        }
      }
    });
  }
  const auto dst = d_in.scalar_type();
  at::Tensor gd = gd_t.to(dst).view(d_in.sizes());
  at::Tensor gsv = gs_t.to(dst).view(d_in.sizes());
  at::Tensor gt = need_table ? gt_acc.to(pe.scalar_type()) : at::empty({0}, pe.options());
  return {gd, gsv, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(trajops, CPU, m) {
  m.impl("adaptive_positional_encoding", &apenc_cpu);
  m.impl("adaptive_positional_encoding_backward", &apenc_backward_cpu);
}

}  // namespace trajops
