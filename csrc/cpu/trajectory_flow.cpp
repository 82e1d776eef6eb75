// CPU kernels of trajops::trajectory_flow and trajops::trajectory_flow_backward.
//
// Semantics: trajops/reference/trajectory_flow.py. Work is split into tasks of consecutive rows of
// one sequence (parallel over sequences x row chunks; with cu_seqlens a sequence is one document of
// the packed x, run as if alone); each task computes the step norms it needs once, then makes one
// pass per output row, vectorized over D, accumulating in fp32 (fp64 for fp64 inputs).
//
// The recency weight r_i(p) = (i - s + 1) / ws of a step is used as the integer rho = i - s + 1:
// ws cancels between the numerator and the normalizer, so S here is ws times the reference's S.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "py_format.h"
#include "varlen.h"

namespace trajops {
namespace {

// Messages match trajops/ops/trajectory_flow.py so every backend fails the same way.
void check_flow_args(const at::Tensor& x, int64_t window, double eps) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3,
                    "trajectory_flow: x must have shape (B, T, D) or (T, D), got shape ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   "trajectory_flow: x must be float32, float64, float16 or bfloat16, got ", py_dtype(st));
  TORCH_CHECK_VALUE(window >= 1, "trajectory_flow: window must be >= 1, got ", window);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0,
                    "trajectory_flow: eps must be a finite number >= 0, got ", py_float(eps));
}

struct Shape {
  int64_t B, T, D;
};

Shape shape_of(const at::Tensor& x) {
  if (x.dim() == 2) return {1, x.size(0), x.size(1)};
  return {x.size(0), x.size(1), x.size(2)};
}

// Position p only sees ws = min(window, p) <= T - 1 steps, so any window >= T means the same as
// T; clamping it here keeps every index sum below (i + window <= 2 T) far from int64 overflow.
int64_t clamp_window(int64_t window, int64_t T) { return std::min(window, std::max<int64_t>(T, 1)); }

// Each task recomputes up to `window` steps before its first row, so tasks stay >= 2 * window.
int64_t chunk_rows(int64_t T, int64_t window) {
  return std::max<int64_t>(1, std::min<int64_t>(T, std::max<int64_t>(64, 2 * window)));
}

template <typename acc_t, typename scalar_t>
inline acc_t step_norm(const scalar_t* x0, const scalar_t* x1, int64_t D) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < D; ++k) {
    const acc_t d = static_cast<acc_t>(x1[k]) - static_cast<acc_t>(x0[k]);
    s += d * d;
  }
  return std::sqrt(s);
}

// g . (x1 - x0); g may be an fp32 work row while x is bf16.
template <typename acc_t, typename g_t, typename scalar_t>
inline acc_t dot_step(const g_t* g, const scalar_t* x0, const scalar_t* x1, int64_t D) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < D; ++k) {
    s += static_cast<acc_t>(g[k]) * (static_cast<acc_t>(x1[k]) - static_cast<acc_t>(x0[k]));
  }
  return s;
}

// Per-step factors for steps [lo, hi) of one sequence: whether the step counts (n > eps, false
// for NaN), tanh(n) and 1 / n (0 for an infinite step, whose direction is then 0 * inf = NaN,
// as in the reference).
template <typename acc_t>
struct Steps {
  int64_t lo = 0;
  std::vector<uint8_t> counts;
  std::vector<acc_t> th, inv;

  template <typename scalar_t>
  void compute(const scalar_t* x, int64_t D, int64_t lo_, int64_t hi, acc_t eps) {
    lo = lo_;
    const int64_t n_steps = std::max<int64_t>(0, hi - lo);
    counts.assign(n_steps, 0);
    th.assign(n_steps, 0);
    inv.assign(n_steps, 0);
    for (int64_t i = lo; i < hi; ++i) {
      const acc_t n = step_norm<acc_t>(x + i * D, x + (i + 1) * D, D);
      if (n > eps) {
        counts[i - lo] = 1;
        th[i - lo] = std::tanh(n);
        inv[i - lo] = acc_t(1) / n;
      }
    }
  }
  bool ok(int64_t i) const { return counts[i - lo] != 0; }
  acc_t t(int64_t i) const { return th[i - lo]; }
  acc_t rinv(int64_t i) const { return inv[i - lo]; }

  // ws * S_p for position p >= 1: the sum of rho * tanh(n) over the counting steps of its window.
  acc_t weight_sum(int64_t p, int64_t window) const {
    const int64_t s = p - std::min(window, p);
    acc_t S = 0;
    for (int64_t i = s; i < p; ++i) {
      if (ok(i)) S += static_cast<acc_t>(i - s + 1) * t(i);
    }
    return S;
  }
};

template <typename scalar_t>
void forward_task(const scalar_t* x, scalar_t* out, int64_t T, int64_t D, int64_t window, double eps,
                  int64_t p0, int64_t p1) {
  using acc_t = at::opmath_type<scalar_t>;
  Steps<acc_t> steps;
  steps.compute(x, D, std::max<int64_t>(0, p0 - window), std::max<int64_t>(0, p1 - 1),
                static_cast<acc_t>(eps));
  std::vector<acc_t> acc(D);
  for (int64_t p = p0; p < p1; ++p) {
    scalar_t* o = out + p * D;
    const acc_t S = p == 0 ? acc_t(0) : steps.weight_sum(p, window);
    if (!(S > 0)) {
      std::fill(o, o + D, scalar_t(0));
      continue;
    }
    const acc_t inv_S = acc_t(1) / S;
    std::fill(acc.begin(), acc.end(), acc_t(0));
    const int64_t s = p - std::min(window, p);
    for (int64_t i = s; i < p; ++i) {
      if (!steps.ok(i)) continue;
      const acc_t c = static_cast<acc_t>(i - s + 1) * steps.t(i) * steps.rinv(i) * inv_S;
      const scalar_t* x0 = x + i * D;
      const scalar_t* x1 = x0 + D;
      acc_t* a = acc.data();
#pragma omp simd
      for (int64_t k = 0; k < D; ++k) {
        a[k] += c * (static_cast<acc_t>(x1[k]) - static_cast<acc_t>(x0[k]));
      }
    }
    for (int64_t k = 0; k < D; ++k) o[k] = static_cast<scalar_t>(acc[k]);
  }
}

// dx for rows [j0, j1) of one sequence: dx[j] = dd_{j-1} - dd_j with
//   dd_i = [n_i > eps] (alpha V_i + beta d_i),  V_i = sum_p rho_i(p) invS_p g_p,
//   alpha = tanh(n_i) / n_i,  beta = ((1 - tanh^2)(V_i.u_i - Q_i) - alpha V_i.u_i) / n_i,
//   Q_i = sum_p rho_i(p) invS_p (g_p . out_p),  p in [i + 1, min(i + window, T - 1)].
template <typename scalar_t>
void backward_task(const scalar_t* g, const scalar_t* x, scalar_t* dx, int64_t T, int64_t D,
                   int64_t window, double eps, int64_t j0, int64_t j1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t p_lo = std::max<int64_t>(j0, 1);
  const int64_t p_hi = std::min<int64_t>(j1 - 1 + window, T - 1);  // inclusive
  Steps<acc_t> steps;
  steps.compute(x, D, std::max<int64_t>(0, p_lo - window), std::max<int64_t>(0, p_hi),
                static_cast<acc_t>(eps));

  // Per-position scalars: 1 / (ws * S_p) and g_p . out_p.
  const int64_t n_pos = std::max<int64_t>(0, p_hi - p_lo + 1);
  std::vector<acc_t> inv_S(n_pos, 0), g_out(n_pos, 0);
  for (int64_t p = p_lo; p <= p_hi; ++p) {
    const acc_t S = steps.weight_sum(p, window);
    if (!(S > 0)) continue;
    const acc_t iS = acc_t(1) / S;
    const int64_t s = p - std::min(window, p);
    acc_t go = 0;
    for (int64_t i = s; i < p; ++i) {
      if (!steps.ok(i)) continue;
      const acc_t c = static_cast<acc_t>(i - s + 1) * steps.t(i) * steps.rinv(i) * iS;
      go += c * dot_step<acc_t>(g + p * D, x + i * D, x + (i + 1) * D, D);
    }
    inv_S[p - p_lo] = iS;
    g_out[p - p_lo] = go;
  }

  std::vector<acc_t> prev(D, acc_t(0)), cur(D);
  // Writes dd_i into row (zero when the step does not count or does not exist).
  auto step_grad = [&](int64_t i, acc_t* row) {
    std::fill(row, row + D, acc_t(0));
    if (i < 0 || i > T - 2 || !steps.ok(i)) return;
    acc_t Q = 0;
    const int64_t p_end = std::min<int64_t>(i + window, T - 1);
    for (int64_t p = i + 1; p <= p_end; ++p) {
      const int64_t rho = i - (p - std::min(window, p)) + 1;
      const acc_t c = static_cast<acc_t>(rho) * inv_S[p - p_lo];
      if (c == acc_t(0)) continue;
      Q += c * g_out[p - p_lo];
      const scalar_t* gp = g + p * D;
#pragma omp simd
      for (int64_t k = 0; k < D; ++k) row[k] += c * static_cast<acc_t>(gp[k]);
    }
    const scalar_t* x0 = x + i * D;
    const scalar_t* x1 = x0 + D;
    const acc_t rn = steps.rinv(i), t = steps.t(i);
    const acc_t vu = rn * dot_step<acc_t>(row, x0, x1, D);
    const acc_t alpha = t * rn;
    const acc_t beta = ((acc_t(1) - t * t) * (vu - Q) - alpha * vu) * rn;
#pragma omp simd
    for (int64_t k = 0; k < D; ++k) {
      row[k] = alpha * row[k] + beta * (static_cast<acc_t>(x1[k]) - static_cast<acc_t>(x0[k]));
    }
  };

  step_grad(j0 - 1, prev.data());
  for (int64_t j = j0; j < j1; ++j) {
    step_grad(j, cur.data());
    scalar_t* o = dx + j * D;
    for (int64_t k = 0; k < D; ++k) o[k] = static_cast<scalar_t>(prev[k] - cur[k]);
    std::swap(prev, cur);
  }
}

// The independent sequences of x: B rows of T tokens, or the documents of a packed x. Each kernel
// task runs on one of them as if it were alone, so a step across a document boundary never exists.
struct Segment {
  int64_t offset, length;  // in tokens
};

// x (B, T, D) / (T, D) without cu_seqlens: B segments of T tokens. With cu_seqlens, x must be
// (total, D) or (1, total, D) (same message as trajops/ops/trajectory_flow.py) and the segments are
// the documents (empty ones dropped: they own no token).
std::vector<Segment> segments_of(const char* op, const at::Tensor& x, const Shape& s,
                                 const std::optional<at::Tensor>& cu_seqlens) {
  std::vector<Segment> segs;
  if (!cu_seqlens.has_value()) {
    for (int64_t b = 0; b < s.B; ++b) segs.push_back({b * s.T, s.T});
    return segs;
  }
  TORCH_CHECK_VALUE(x.dim() == 2 || x.size(0) == 1, op,
                    ": x must have shape (total, D) or (1, total, D) when cu_seqlens is given, got shape ",
                    x.sizes());
  const std::vector<int64_t> offs = checked_cu_seqlens(op, *cu_seqlens, s.T, x.device());
  for (size_t j = 0; j + 1 < offs.size(); ++j) {
    if (offs[j + 1] > offs[j]) segs.push_back({offs[j], offs[j + 1] - offs[j]});
  }
  return segs;
}

// Runs fn(seg, r0, r1) over every (segment, row chunk) in parallel; rows are relative to the segment.
template <typename Fn>
void for_each_chunk(const std::vector<Segment>& segs, int64_t D, int64_t window, const Fn& fn) {
  struct Task {
    int64_t seg, r0, r1;
  };
  std::vector<Task> tasks;
  int64_t longest = 1;
  for (size_t j = 0; j < segs.size(); ++j) {
    const int64_t T = segs[j].length;
    longest = std::max(longest, T);
    const int64_t rows = chunk_rows(T, window);
    for (int64_t r0 = 0; r0 < T; r0 += rows) tasks.push_back({static_cast<int64_t>(j), r0, std::min(T, r0 + rows)});
  }
  // Small problems run inline: waking an OpenMP team costs more than they take (and far more when
  // the other cores are busy).
  const int64_t rows = chunk_rows(longest, window);
  const int64_t task_work = rows * std::max<int64_t>(D, 1) * (std::min(window, longest) + 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(task_work, 1));
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) fn(segs[tasks[t].seg], tasks[t].r0, tasks[t].r1);
  });
}

at::Tensor trajectory_flow_cpu(const at::Tensor& x_in, int64_t window, double eps,
                               const std::optional<at::Tensor>& cu_seqlens) {
  check_flow_args(x_in, window, eps);
  const Shape s = shape_of(x_in);
  const std::vector<Segment> segs = segments_of("trajectory_flow", x_in, s, cu_seqlens);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  window = clamp_window(window, s.T);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "trajectory_flow_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t D = s.D;
    for_each_chunk(segs, D, window, [&](const Segment& g, int64_t r0, int64_t r1) {
      forward_task<scalar_t>(xp + g.offset * D, op + g.offset * D, g.length, D, window, eps, r0, r1);
    });
  });
  return out;
}

// The forward's stats (2, B, T) in the compute dtype, as trajops/ops/trajectory_flow.py checks them
// (same message). Validated although this kernel does not read them: every backend rejects the
// same bad tensor.
void check_stats(const at::Tensor& x, const Shape& s, const std::optional<at::Tensor>& stats) {
  if (!stats.has_value()) return;
  const at::ScalarType cdt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> want{2, s.B, s.T};
  TORCH_CHECK_VALUE(stats->sizes() == at::IntArrayRef(want) && stats->scalar_type() == cdt &&
                        stats->device() == x.device(),
                    "trajectory_flow_backward: stats must be a ", py_dtype(cdt), " tensor of shape ",
                    at::IntArrayRef(want), " on x's device (", x.device(), "), got ", py_dtype(stats->scalar_type()),
                    " ", stats->sizes(), " on ", stats->device());
}

// stats (the forward's per-row step norms and 1 / S) is accepted and ignored: a task here recomputes
// the norms of its rows from x while they are in cache, which costs less than reading a second
// array; the GPU kernel is the one that saves a pass over x with it.
at::Tensor trajectory_flow_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, int64_t window,
                                        double eps, const std::optional<at::Tensor>& cu_seqlens,
                                        const std::optional<at::Tensor>& stats) {
  check_flow_args(x_in, window, eps);
  TORCH_CHECK_VALUE(grad_in.sizes() == x_in.sizes(), "trajectory_flow_backward: grad_out must have the shape of x ",
                    x_in.sizes(), ", got ", grad_in.sizes());
  TORCH_CHECK_TYPE(grad_in.scalar_type() == x_in.scalar_type(),
                   "trajectory_flow_backward: grad_out must have the dtype of x (", py_dtype(x_in.scalar_type()),
                   "), got ", py_dtype(grad_in.scalar_type()));
  TORCH_CHECK(grad_in.device() == x_in.device(), "trajectory_flow_backward: grad_out and x must be on one device, got ",
              grad_in.device(), " and ", x_in.device());
  const Shape s = shape_of(x_in);
  check_stats(x_in, s, stats);
  const std::vector<Segment> segs = segments_of("trajectory_flow_backward", x_in, s, cu_seqlens);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = grad_in.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return dx;
  window = clamp_window(window, s.T);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "trajectory_flow_backward_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    const int64_t D = s.D;
    // Every row belongs to exactly one non-empty segment (offsets are checked), so dx is fully written.
    for_each_chunk(segs, D, window, [&](const Segment& sg, int64_t r0, int64_t r1) {
      backward_task<scalar_t>(gp + sg.offset * D, xp + sg.offset * D, dp + sg.offset * D, sg.length, D, window,
                              eps, r0, r1);
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(trajops, CPU, m) {
  m.impl("trajectory_flow", &trajectory_flow_cpu);
  m.impl("trajectory_flow_backward", &trajectory_flow_backward_cpu);
}

}  // namespace trajops
