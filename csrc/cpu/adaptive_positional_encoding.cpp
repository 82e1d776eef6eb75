// CPU kernels of trajops::adaptive_positional_encoding and its backward.
//
// Semantics: trajops/reference/adaptive_positional_encoding.py. The semantic positions are a
// sequential fp64 scan along T, computed inside the one parallel region over the B*T rows that
// also does the lookup (forward) or the reduction over E (backward), in fp32 (fp64 for fp64
// inputs); the backward's reverse scan then runs on the calling thread (O(B T)). The table
// gradient is a scatter: it runs parallel over column blocks of E, each walking every row in
// order, so the sums are deterministic and independent of the thread count.
//
// Memory traffic (B T rows of E elements; fp32 op case B=8 T=2048 E=256: 16 MiB per B T E tensor):
//   forward:  writes out once (B T E; streaming stores from 4 MiB up, see stream_copy), reads d
//             (B T) and per row two table rows, each table row fetched once per task (rows walked
//             position-major); 1 pass, 1 parallel region.
//   backward: reads grad_out once (B T E) and the same table rows, writes grad_displacement and
//             grad_position (B T each): 1 pass, then the O(B T) reverse scan; the table gradient
//             (need_table) is a 2nd pass over grad_out in a 3rd region.
//   Measured (bench/results/cpu-2core-ape-issue15.md, 2-core Zen 4): with a warm cache the
//   forward runs near a bare 16 MiB store loop; the backward's slope dot is bound by its row's 48
//   vector loads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"
#include "py_format.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

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

// Where one row reads the table: rows f and c with weight a on c, and whether the unclamped
// position lies in [0, L-1] (clamp's gradient mask).
struct RowLookup {
  int64_t f, c;
  double a;
  bool inside;
};

inline RowLookup lookup(double x, int64_t L) {
  const double hi = static_cast<double>(L - 1);
  // clamp like torch.clamp: NaN stays NaN (std::min/max would drop it)
  const double p = std::isnan(x) ? x : std::min(std::max(x, 0.0), hi);
  const double fl = std::floor(p);
  const int64_t fi = std::isnan(fl) ? 0 : static_cast<int64_t>(fl);
  return {fi, std::min<int64_t>(fi + 1, L - 1), p - fl, x >= 0.0 && x <= hi};
}

// The semantic positions of the flattened rows [r0, r1) of d (B, T): fn(r, lookup) once per row.
// A range that starts inside a sequence first re-sums that sequence's earlier displacements in the
// same order as a full scan, so every split gives the sequential fp64 scan bit for bit; the re-sum
// is O(T) per task next to the task's O(rows * E) lookups. This keeps each op at one parallel
// region: every region is a barrier that waits for the slowest thread, and on a machine whose other
// core is busy each extra one costs a scheduler time slice (DESIGN.md "Benchmarks").
//
// Order: position-major across the task's sequences (t outer, b inner), each sequence still summed
// in its own t order. The sequences' positions at one t are close (t plus a drift), so they read
// nearby table rows and each table row is fetched once per task rather than once per sequence;
// sequence by sequence, a row read by sequence b had been evicted by the time b + 1 read it when
// the cache was full of other data (bench/results/cpu-2core-ape-issue15.md: 0.91-0.98x -> 0.77-0.85x
// compile for the forward on one core in that state; within noise with a warm cache).
template <typename scalar_t, typename F>
inline void for_each_row(const scalar_t* dp, const double* pp, int64_t pos_stride_b, int64_t T, int64_t L,
                         int64_t r0, int64_t r1, F&& fn) {
  if (r0 >= r1) return;
  const int64_t b0 = r0 / T, b1 = (r1 - 1) / T;  // the task's first and last sequence
  const int64_t t_first = r0 - b0 * T;           // sequence b0 starts at this t in the task
  const int64_t t_end = r1 - b1 * T;             // sequence b1 ends (exclusive) at this t in the task
  std::vector<double> run(b1 - b0 + 1, 0.0);     // each sequence's running sum
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t b = b0; b <= b1; ++b) {
      if (b == b1 && t >= t_end) break;
      double& s = run[b - b0];
      s += static_cast<double>(dp[b * T + t]);
      if (b == b0 && t < t_first) continue;  // b0's prefix: summed, not looked up
      fn(b * T + t, lookup(s + (pp ? pp[b * pos_stride_b + t] : static_cast<double>(t)), L));
    }
    if (b0 == b1 && t + 1 >= t_end) break;
  }
}

// positions as a contiguous fp64 tensor (undefined when absent) and its batch stride (0: one (T,)
// row shared by the batch).
std::pair<at::Tensor, int64_t> positions_f64(const std::optional<at::Tensor>& positions, int64_t T) {
  if (!positions.has_value()) return {at::Tensor(), 0};
  at::Tensor pos = positions->to(at::kDouble).contiguous();
  return {pos, pos.dim() == 2 ? T : 0};
}

// Rows per task: at least ~64K elements of work, so that small calls run serially (no barrier).
int64_t row_grain(int64_t E) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(E, 1)); }

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

// Streaming (non-temporal) stores for large forward outputs, which the kernel never reads back.
// Measured on the 2-core Zen 4 (bench/results/cpu-2core-ape-issue15.md): when the cache holds other
// data, as it does inside a model or the benchmark, ordinary stores of the 16 MiB output first evict
// it and read each destination line (read-for-ownership); streaming stores skip both, and the
// forward took 0.60x compile's time instead of 0.96x on one core. When the previous call's output is
// still cached (the same buffer rewritten in a loop), a bare store loop is ~20% slower with them;
// the op on one core measured no loss there (0.50x compile, 0.52x before). Outputs under kStreamMinBytes
// are stored normally so that they stay in the caches for the op that reads them next. The ISA is
// the one the file is compiled for (setup.py: -march=native; SSE2 with TRAJOPS_PORTABLE=1).
#if defined(__AVX512F__)
constexpr int64_t kStreamBytes = 64;
inline void stream_store(char* dst, const char* src) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_loadu_si512(src));
}
#elif defined(__AVX__)
constexpr int64_t kStreamBytes = 32;
inline void stream_store(char* dst, const char* src) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}
#elif defined(__SSE2__)
constexpr int64_t kStreamBytes = 16;
inline void stream_store(char* dst, const char* src) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(dst), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}
#else
constexpr int64_t kStreamBytes = 0;  // no streaming stores on this target: every output is stored normally
inline void stream_store(char*, const char*) {}
#endif
constexpr int64_t kStreamMinBytes = int64_t(4) << 20;  // 2x the per-core L2 of the machine measured

// n bytes to dst: streaming stores for the kStreamBytes-aligned body, memcpy for the unaligned head
// and tail (a row of E elements need not start on an aligned address).
inline void stream_copy(char* dst, const char* src, int64_t n) {
  if constexpr (kStreamBytes > 0) {
    const auto mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) & (kStreamBytes - 1));
    const int64_t head = std::min(n, mis ? kStreamBytes - mis : 0);
    std::memcpy(dst, src, head);
    dst += head, src += head, n -= head;
    for (; n >= kStreamBytes; n -= kStreamBytes, dst += kStreamBytes, src += kStreamBytes) stream_store(dst, src);
  }
  std::memcpy(dst, src, n);
}

// Streaming stores are weakly ordered: each thread fences its own before the region's barrier.
inline void stream_fence() {
#if defined(__SSE2__)
  if constexpr (kStreamBytes > 0) _mm_sfence();
#endif
}

// One output row computed by lerp_row into an L1-resident buffer, then streamed out: the values are
// those of the direct path bit for bit, whichever path writes them.
template <typename scalar_t, typename acc_t>
inline void lerp_row_streamed(const scalar_t* lo, const scalar_t* up, acc_t a, scalar_t* o, int64_t E) {
  constexpr int64_t kBuf = 4096 / sizeof(scalar_t);
  alignas(64) scalar_t buf[kBuf];
  for (int64_t e0 = 0; e0 < E; e0 += kBuf) {
    const int64_t n = std::min(kBuf, E - e0);
    lerp_row<scalar_t, acc_t>(lo + e0, up + e0, a, buf, n);
    stream_copy(reinterpret_cast<char*>(o + e0), reinterpret_cast<const char*>(buf),
                n * static_cast<int64_t>(sizeof(scalar_t)));
  }
}

// g . (up - lo), in kLanes independent partial sums added in a fixed order, so the result does not
// depend on the thread count. A single running sum compiled to a scalar add chain (latency-bound,
// 3.5 ms for 16K rows of 256 on one core) and `omp simd reduction` was not vectorized here;
// independent lanes are, without reassociation.
template <typename scalar_t, typename acc_t>
inline acc_t slope_dot(const scalar_t* g, const scalar_t* lo, const scalar_t* up, int64_t E) {
  constexpr int64_t kLanes = 16;
  acc_t part[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= E; e += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      part[j] += static_cast<acc_t>(g[e + j]) * (static_cast<acc_t>(up[e + j]) - static_cast<acc_t>(lo[e + j]));
    }
  }
  acc_t s = 0;
  for (int64_t j = 0; j < kLanes; ++j) s += part[j];
  for (; e < E; ++e) s += static_cast<acc_t>(g[e]) * (static_cast<acc_t>(up[e]) - static_cast<acc_t>(lo[e]));
  return s;
}

#if defined(__AVX512F__)
// fp32 on AVX-512 (the file is built with -march=native): the loop above compiles to one 16-lane
// accumulator, a chain of dependent FMAs, and a 16-add serial fold per row (30 ns per row of 256 on
// the 2-core Zen 4 measured, the whole backward's time). Four accumulators over 64-element blocks and
// a tree fold take 22 ns, which is where the row's 48 vector loads bound it. Still a fixed order.
template <>
inline float slope_dot<float, float>(const float* g, const float* lo, const float* up, int64_t E) {
  const auto add_term = [&](int64_t e, __m512 acc) {  // acc + g[e:e+16] * (up - lo)[e:e+16]
    return _mm512_fmadd_ps(_mm512_loadu_ps(g + e), _mm512_sub_ps(_mm512_loadu_ps(up + e), _mm512_loadu_ps(lo + e)),
                           acc);
  };
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t e = 0;
  for (; e + 64 <= E; e += 64) {
    for (int k = 0; k < 4; ++k) acc[k] = add_term(e + 16 * k, acc[k]);
  }
  for (; e + 16 <= E; e += 16) acc[0] = add_term(e, acc[0]);
  if (e < E) {  // the last E % 16 elements, masked (masked-off lanes load as 0 and add 0)
    const __mmask16 m = static_cast<__mmask16>((1u << (E - e)) - 1);
    const __m512 dv = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, up + e), _mm512_maskz_loadu_ps(m, lo + e));
    acc[1] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, g + e), dv, acc[1]);
  }
  // Tree fold of the 16 lanes. The all-lanes mask forms of the shuffles: GCC 12's unmasked ones (and
  // _mm512_reduce_add_ps) start from _mm512_undefined_ps and trip -Wmaybe-uninitialized.
  constexpr __mmask16 kAll = 0xFFFF;
  __m512 v = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
  v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, kAll, v, v, _MM_SHUFFLE(1, 0, 3, 2)));  // 256-bit halves
  v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, kAll, v, v, _MM_SHUFFLE(2, 3, 0, 1)));  // 128-bit quarters
  v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, kAll, v, _MM_SHUFFLE(1, 0, 3, 2)));  // pairs in 128 bits
  v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, kAll, v, _MM_SHUFFLE(2, 3, 0, 1)));  // neighbours
  return _mm512_cvtss_f32(v);
}
#endif

std::vector<int64_t> out_shape(const at::Tensor& d, const at::Tensor& pe) {
  std::vector<int64_t> shape(d.sizes().begin(), d.sizes().end());
  shape.push_back(pe.size(1));
  return shape;
}

at::Tensor apenc_cpu(const at::Tensor& d_in, const at::Tensor& pe_in, const std::optional<at::Tensor>& positions) {
  check_args(d_in, pe_in, positions);
  const at::Tensor pe = pe_in.contiguous();
  at::Tensor out = at::empty(out_shape(d_in, pe_in), pe.options());
  if (out.numel() == 0) return out;
  const int64_t L = pe.size(0), E = pe.size(1);
  const at::Tensor d2 = as_2d(d_in).contiguous();
  const int64_t T = d2.size(1), rows = d2.size(0) * T;
  const auto pos = positions_f64(positions, T);  // (a lambda cannot capture a structured binding in C++17)
  const int64_t pos_stride_b = pos.second;
  const double* pp = pos.first.defined() ? pos.first.const_data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pe.scalar_type(), "adaptive_positional_encoding_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dp = d2.const_data_ptr<scalar_t>();
    const scalar_t* tp = pe.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool stream = kStreamBytes > 0 && static_cast<int64_t>(out.nbytes()) >= kStreamMinBytes;
    at::parallel_for(0, rows, row_grain(E), [&](int64_t r0, int64_t r1) {
      if (stream) {
        for_each_row(dp, pp, pos_stride_b, T, L, r0, r1, [&](int64_t r, const RowLookup& lk) {
          lerp_row_streamed<scalar_t, acc_t>(tp + lk.f * E, tp + lk.c * E, static_cast<acc_t>(lk.a), op + r * E, E);
        });
        stream_fence();
      } else {
        for_each_row(dp, pp, pos_stride_b, T, L, r0, r1, [&](int64_t r, const RowLookup& lk) {
          lerp_row<scalar_t, acc_t>(tp + lk.f * E, tp + lk.c * E, static_cast<acc_t>(lk.a), op + r * E, E);
        });
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
  const at::Tensor d2 = as_2d(d_in).contiguous();
  const int64_t B = d2.size(0), T = d2.size(1), rows = B * T;
  const auto pos = positions_f64(positions, T);  // (a lambda cannot capture a structured binding in C++17)
  const int64_t pos_stride_b = pos.second;
  const double* pp = pos.first.defined() ? pos.first.const_data_ptr<double>() : nullptr;
  at::Tensor gt_acc;
  if (need_table) gt_acc = at::zeros({L, E}, pe.options().dtype(at::toOpMathType(pe.scalar_type())));
  at::Tensor gd = at::empty({B, T}, d2.options());
  at::Tensor gso = at::empty({B, T}, d2.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pe.scalar_type(), "adaptive_positional_encoding_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dp = d2.const_data_ptr<scalar_t>();
    const scalar_t* tp = pe.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    // dL/ds per row in fp64: the reverse scan over it must not lose the small terms of a long sum.
    std::vector<double> gs(rows);
    // Only the table gradient needs the lookups again (a second pass, in row order).
    std::vector<RowLookup> lks(need_table ? rows : 0);
    at::parallel_for(0, rows, row_grain(E), [&](int64_t r0, int64_t r1) {
      for_each_row(dp, pp, pos_stride_b, T, L, r0, r1, [&](int64_t r, const RowLookup& lk) {
        gs[r] = lk.inside ? static_cast<double>(slope_dot<scalar_t, acc_t>(gp + r * E, tp + lk.f * E,
                                                                            tp + lk.c * E, E))
                          : 0.0;
        if (need_table) lks[r] = lk;
      });
    });
    // Reverse cumsum per sequence, written in the output dtype: O(B T), serial unless B T is large.
    scalar_t* gdp = gd.mutable_data_ptr<scalar_t>();
    scalar_t* gsp = gso.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 262144 / std::max<int64_t>(T, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double acc = 0;
        for (int64_t t = T - 1; t >= 0; --t) {
          const double x = gs[b * T + t];
          acc += x;
          gdp[b * T + t] = static_cast<scalar_t>(acc);
          gsp[b * T + t] = static_cast<scalar_t>(x);
        }
      }
    });
    if (need_table && E > 0) {
      // Parallel over column blocks of E, each walking every row in order: deterministic sums,
      // independent of the thread count.
      acc_t* gtp = gt_acc.mutable_data_ptr<acc_t>();
      constexpr int64_t kCols = 64;
      const int64_t blocks = (E + kCols - 1) / kCols;
      at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t e0 = k * kCols, e1 = std::min(E, e0 + kCols);
          for (int64_t r = 0; r < rows; ++r) {
            const acc_t a = static_cast<acc_t>(lks[r].a);
            const acc_t wa = acc_t(1) - a;
            const scalar_t* gr = gp + r * E;
            acc_t* lo = gtp + lks[r].f * E;
            acc_t* up = gtp + lks[r].c * E;
            // Two passes, not one: f and c may be the same row (at L-1).
            for (int64_t e = e0; e < e1; ++e) lo[e] += wa * static_cast<acc_t>(gr[e]);
            for (int64_t e = e0; e < e1; ++e) up[e] += a * static_cast<acc_t>(gr[e]);
          }
        }
      });
    }
  });
  at::Tensor gt = need_table ? gt_acc.to(pe.scalar_type()) : at::empty({0}, pe.options());
  return {gd.view(d_in.sizes()), gso.view(d_in.sizes()), gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(trajops, CPU, m) {
  m.impl("adaptive_positional_encoding", &apenc_cpu);
  m.impl("adaptive_positional_encoding_backward", &apenc_backward_cpu);
}

}  // namespace trajops
