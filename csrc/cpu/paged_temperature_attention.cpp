// CPU kernel of trajops::paged_temperature_attention: decode attention read straight from page pools.
//
// Semantics: trajops/reference/paged_temperature_attention.py (gather the live slots of each row, then
// softmax(c q k^T) v with c = scale / tau). This kernel never gathers the dense K/V copy:
//   1. keys: per row, the physical slots of its live keys (every logical slot of its pages, or the
//      listed `slots`), in logical order; pages whose table entry is -1 are skipped unread. This is
//      the only pass over page_table / live_pool (bytes per slot, not per head).
//   2. partials (flash decoding): each row's key list is cut into chunks (work items, sized so that
//      they outnumber the threads even for a single row); per kv head, an online softmax over the
//      chunk's keys for the G * n query rows that read that kv head (G = Hq / Hkv), so each K/V row
//      is loaded once for the whole group, gives (m, l, acc).
//   3. merge: per (row, query head, query), the chunks' partials rescaled to their common max; with
//      k_new / v_new, the query's new keys 0..i are scored and added here too (one softmax over both:
//      a decode step needs no second attention and no log-sum-exp merge; O(n^2 D) per head, for small n).
// One pass over the live K/V bytes (the reference's gather reads them, writes a copy and reads that
// again); with n = 1 the arithmetic (G dots and G axpys per K/V row) is of the same order as the reads.
//
// Numerics: fp32 accumulation (fp64 for fp64); fp16/bf16 K/V rows are widened to fp32 as they are
// loaded. The fp32 path uses a polynomial exp (relative error < 2e-7 on the (-inf, 0] arguments of
// the softmax) that vectorizes; fp64 uses std::exp.
// NaN/Inf (the rule: reference/paged_temperature_attention.py): only a row's keys are read; a row
// without one gives 0 / -inf; else a query row is NaN when c = scale / tau is not finite (its items
// run with c = 0), when one of its scores is not finite (a NaN/Inf in its q row or a key's k row;
// the score is then dropped, so the math stays finite), or when its output is not finite (a NaN/Inf
// in a key's v row reaches it through p * v, 0 * Inf included). Cost: an (x - x) per score and per
// output element, against D multiply-adds per score.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "temperature_attention.h"

namespace trajops {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;
constexpr const char* kOp = "paged_temperature_attention";
constexpr int64_t kBlock = 16;  // keys per online-softmax step (scores of a block stay in L1)

// ---------------------------------------------------------------- checks
// Messages match _check in trajops/ops/paged_temperature_attention.py so every backend fails the same way.
void check(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool, const Tensor& page_table,
           const Tensor& live_pool, const Tensor& tau, const OptTensor& slots, c10::optional<double> scale,
           const OptTensor& k_new, const OptTensor& v_new) {
  TORCH_CHECK_VALUE(q.dim() == 4, kOp, ": q must have shape (B, Hq, n, D), got ", q.sizes());
  TORCH_CHECK_VALUE(k_pool.dim() == 4 && v_pool.dim() == 4, kOp,
                    ": k_pool and v_pool must have shape (P, S, Hkv, D), got ", k_pool.sizes(), " and ",
                    v_pool.sizes());
  const auto st = q.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, kOp,
                   ": q must be float32, float64, float16 or bfloat16, got ", py_dtype(st));
  TORCH_CHECK_TYPE(k_pool.scalar_type() == st && v_pool.scalar_type() == st, kOp,
                   ": q, k_pool and v_pool must have one dtype, got ", py_dtype(st), ", ",
                   py_dtype(k_pool.scalar_type()), " and ", py_dtype(v_pool.scalar_type()));
  const auto B = q.size(0), Hq = q.size(1), n = q.size(2), D = q.size(3);
  const auto P = k_pool.size(0), S = k_pool.size(1), Hkv = k_pool.size(2);
  TORCH_CHECK_VALUE(v_pool.size(0) == P && v_pool.size(1) == S && v_pool.size(2) == Hkv && v_pool.size(3) >= 1, kOp,
                    ": v_pool must have shape (P, S, Hkv, Dv) = (", P, ", ", S, ", ", Hkv,
                    ", Dv) like k_pool, got ", v_pool.sizes());
  TORCH_CHECK_VALUE(k_pool.size(3) == D && D >= 1 && S >= 1, kOp,
                    ": q and k_pool must have one head size D >= 1, got q ", q.sizes(), " and k_pool ",
                    k_pool.sizes());
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, kOp, ": the pools' Hkv=", Hkv, " heads must divide q's Hq=", Hq);
  TORCH_CHECK_TYPE(page_table.scalar_type() == at::kLong && live_pool.scalar_type() == at::kBool, kOp,
                   ": page_table must be int64 and live_pool bool, got ", py_dtype(page_table.scalar_type()),
                   " and ", py_dtype(live_pool.scalar_type()));
  TORCH_CHECK_VALUE(page_table.dim() == 2 && page_table.size(0) >= B, kOp,
                    ": page_table must have shape (>= B, MP) with B=", B, ", got ", page_table.sizes());
  TORCH_CHECK_VALUE(live_pool.dim() == 2 && live_pool.size(0) == P && live_pool.size(1) == S, kOp,
                    ": live_pool must have shape (P, S) = (", P, ", ", S, "), got ", live_pool.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(tau.scalar_type()), kOp, ": tau must be a floating-point tensor, got ",
                   py_dtype(tau.scalar_type()));
  const std::vector<int64_t> rows{B, Hq, n};
  TORCH_CHECK_VALUE(broadcastable(tau.sizes(), rows), kOp, ": tau must be broadcastable to (B, Hq, n) = (", B,
                    ", ", Hq, ", ", n, "), got shape ", tau.sizes());
  if (slots.has_value()) {
    TORCH_CHECK_TYPE(slots->scalar_type() == at::kLong, kOp, ": slots must be int64, got ",
                     py_dtype(slots->scalar_type()));
    TORCH_CHECK_VALUE(slots->dim() == 2 && slots->size(0) == B, kOp, ": slots must have shape (B, k) with B=", B,
                      ", got ", slots->sizes());
  }
  TORCH_CHECK_VALUE(k_new.has_value() == v_new.has_value(), kOp, ": k_new and v_new must be given together");
  if (k_new.has_value()) {
    TORCH_CHECK_TYPE(k_new->scalar_type() == st && v_new->scalar_type() == st, kOp,
                     ": q, k_new and v_new must have one dtype, got ", py_dtype(st), ", ",
                     py_dtype(k_new->scalar_type()), " and ", py_dtype(v_new->scalar_type()));
    const auto Dv = v_pool.size(3);
    TORCH_CHECK_VALUE(k_new->dim() == 4 && k_new->size(0) == B && k_new->size(1) == Hkv && k_new->size(2) == n &&
                          k_new->size(3) == D,
                      kOp, ": k_new must have shape (B, Hkv, n, D) = (", B, ", ", Hkv, ", ", n, ", ", D, "), got ",
                      k_new->sizes());
    TORCH_CHECK_VALUE(v_new->dim() == 4 && v_new->size(0) == B && v_new->size(1) == Hkv && v_new->size(2) == n &&
                          v_new->size(3) == Dv,
                      kOp, ": v_new must have shape (B, Hkv, n, Dv) = (", B, ", ", Hkv, ", ", n, ", ", Dv, "), got ",
                      v_new->sizes());
  }
  std::vector<const Tensor*> others{&k_pool, &v_pool, &page_table, &live_pool, &tau};
  if (slots.has_value()) others.push_back(&*slots);
  if (k_new.has_value()) others.insert(others.end(), {&*k_new, &*v_new});
  bool same = true;
  std::string names = "[";
  for (size_t i = 0; i < others.size(); ++i) {
    same &= others[i]->device() == q.device();
    names += (i ? ", '" : "'") + others[i]->device().str() + "'";
  }
  TORCH_CHECK(same, kOp, ": every tensor must be on q's device (", q.device(), "), got ", names, "]");
  if (scale.has_value())
    TORCH_CHECK_VALUE(std::isfinite(*scale) && *scale > 0, kOp, ": scale must be a finite number > 0, got ",
                      py_float(*scale));
}

// ---------------------------------------------------------------- math helpers
// exp(x) in float for x <= 0 (softmax arguments), branch-free so that loops of it vectorize;
// relative error below 2e-7 on [-87, 0], and exp(x < -87) ~ 1e-38 (0 to fp32 attention).
inline float exp_le0(float x) { return fast_exp(x); }
inline double exp_le0(double x) { return std::exp(x); }

template <typename acc_t>
inline acc_t dot(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out[r * stride] = q_r . k for the R rows q_r = q + r * D: k is loaded once per 4 rows, each row
// keeps its own vector of partial sums (one horizontal sum per dot, not per element).
template <typename acc_t>
inline void dots(const acc_t* __restrict q, const acc_t* __restrict k, int64_t R, int64_t D, acc_t* out,
                 int64_t stride) {
  typedef acc_t vec __attribute__((vector_size(32)));
  constexpr int64_t W = 32 / sizeof(acc_t);
  const int64_t full = D / W * W;
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    const acc_t* q0 = q + r * D;
    vec a0 = {}, a1 = {}, a2 = {}, a3 = {}, kv, qv;
    for (int64_t d = 0; d < full; d += W) {
      std::memcpy(&kv, k + d, sizeof(vec));
      std::memcpy(&qv, q0 + d, sizeof(vec));
      a0 += qv * kv;
      std::memcpy(&qv, q0 + D + d, sizeof(vec));
      a1 += qv * kv;
      std::memcpy(&qv, q0 + 2 * D + d, sizeof(vec));
      a2 += qv * kv;
      std::memcpy(&qv, q0 + 3 * D + d, sizeof(vec));
      a3 += qv * kv;
    }
    const vec* a[4] = {&a0, &a1, &a2, &a3};
    for (int u = 0; u < 4; ++u) {
      acc_t sum = 0;
      for (int64_t w = 0; w < W; ++w) sum += (*a[u])[w];
      for (int64_t d = full; d < D; ++d) sum += q0[u * D + d] * k[d];
      out[(r + u) * stride] = sum;
    }
  }
  for (; r < R; ++r) out[r * stride] = dot(q + r * D, k, D);
}

// out[u * stride] = q . k_u for the 8 rows k_u (fp32): 8 vector accumulators over D, finished by one
// transpose_sum. With the small head dims of decode (D = 32..128) the per-dot horizontal sums of dots()
// cost as much as the multiplies; here they cost 12 shuffle-adds for 8 dots.
inline void dots8(const float* __restrict q, const float* const (&k)[8], int64_t D, float* out, int64_t stride,
                  int64_t count) {
  v8 a[8] = {}, qv, kv;
  const int64_t full = D / 8 * 8;
  for (int64_t d = 0; d < full; d += 8) {
    std::memcpy(&qv, q + d, sizeof(v8));
    for (int u = 0; u < 8; ++u) {
      std::memcpy(&kv, k[u] + d, sizeof(v8));
      a[u] += qv * kv;
    }
  }
  const v8 sums = transpose_sum(a);
  for (int64_t u = 0; u < count; ++u) {
    float tail = 0;
    for (int64_t d = full; d < D; ++d) tail += q[d] * k[u][d];
    out[u * stride] = sums[u] + tail;
  }
}

// A K or V row as acc_t: the pool's own memory when it already is acc_t, else widened into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* load_row(const scalar_t* __restrict src, acc_t* __restrict buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {  // bf16 = the high half of an fp32
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t w = static_cast<uint32_t>(bits[i]) << 16;
      std::memcpy(buf + i, &w, sizeof(float));
    }
    return buf;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  }
}

// Asks for the next key's head rows while the current one is computed: pages are scattered, so
// the hardware prefetcher cannot guess where the next slot lives.
template <typename scalar_t>
inline void prefetch_rows(const scalar_t* row, int64_t heads, int64_t head_stride, int64_t len) {
  constexpr int64_t line = 64 / sizeof(scalar_t);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < len; i += line) __builtin_prefetch(row + h * head_stride + i);
}

// ---------------------------------------------------------------- the kernel
struct Keys {  // the live keys of every row, as element offsets of their K and V rows (kv head 0)
  std::vector<int64_t> begin;  // (B + 1): row b's keys are [begin[b], begin[b + 1])
  std::vector<int64_t> koff, voff;
};

Keys collect_keys(const Tensor& k_pool, const Tensor& v_pool, const Tensor& page_table, const Tensor& live_pool,
                  const OptTensor& slots, int64_t B) {
  const int64_t P = k_pool.size(0), S = k_pool.size(1), MP = page_table.size(1), L = MP * S;
  const int64_t* pt = page_table.data_ptr<int64_t>();
  const int64_t pt0 = page_table.stride(0), pt1 = page_table.stride(1);
  const bool* live = live_pool.data_ptr<bool>();
  const int64_t lv0 = live_pool.stride(0), lv1 = live_pool.stride(1);
  // Entries are -1 (no page) or a page of the pool, checked before any read (as the Python checks).
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < MP; ++p)
      TORCH_CHECK_INDEX(pt[b * pt0 + p * pt1] >= -1 && pt[b * pt0 + p * pt1] < P, kOp, ": page_table[", b, ", ", p, "] = ", pt[b * pt0 + p * pt1],
                        " is not a page of the pool (P=", P, ")");
  const bool listed = slots.has_value();  // (an empty slots tensor may have a null data pointer)
  const int64_t* sl = listed ? slots->data_ptr<int64_t>() : nullptr;
  const int64_t K = slots.has_value() ? slots->size(1) : 0;
  const int64_t sl0 = slots.has_value() ? slots->stride(0) : 0, sl1 = slots.has_value() ? slots->stride(1) : 0;

  // for_row(b, emit) calls emit(page, offset) for each key of row b, in order
  auto for_row = [&](int64_t b, auto&& emit) {
    if (!listed) {
      for (int64_t p = 0; p < MP; ++p) {
        const int64_t page = pt[b * pt0 + p * pt1];
        if (page < 0) continue;  // never read
        for (int64_t s = 0; s < S; ++s)
          if (live[page * lv0 + s * lv1]) emit(page, s);
      }
    } else {
      for (int64_t i = 0; i < K; ++i) {
        const int64_t j = sl[b * sl0 + i * sl1];
        if (j < 0 || j >= L) continue;
        const int64_t page = pt[b * pt0 + (j / S) * pt1], s = j % S;
        if (page >= 0 && live[page * lv0 + s * lv1]) emit(page, s);
      }
    }
  };
  Keys keys;
  keys.begin.assign(B + 1, 0);
  // Listing is ~1 ns per slot: threads only for rows of many slots (a decode step of a short context would
  // spend more on waking the pool's threads, twice, than on the list)
  const int64_t per_row = std::max<int64_t>(1, listed ? K : L);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / per_row);
  at::parallel_for(0, B, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      int64_t count = 0;
      for_row(b, [&](int64_t, int64_t) { ++count; });
      keys.begin[b + 1] = count;
    }
  });
  for (int64_t b = 0; b < B; ++b) keys.begin[b + 1] += keys.begin[b];
  keys.koff.resize(keys.begin[B]);
  keys.voff.resize(keys.begin[B]);
  const int64_t k0 = k_pool.stride(0), k1 = k_pool.stride(1), v0 = v_pool.stride(0), v1 = v_pool.stride(1);
  at::parallel_for(0, B, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      int64_t at_ = keys.begin[b];
      for_row(b, [&](int64_t page, int64_t s) {
        keys.koff[at_] = page * k0 + s * k1;
        keys.voff[at_] = page * v0 + s * v1;
        ++at_;
      });
    }
  });
  return keys;
}

template <typename scalar_t, typename acc_t>
void attend(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool, const Keys& keys, const Tensor& c,
            const OptTensor& k_new, const OptTensor& v_new, Tensor& out, Tensor& lse) {
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), D = q.size(3);
  const int64_t Hkv = k_pool.size(2), Dv = v_pool.size(3), G = Hq / Hkv, R = G * n;
  const int64_t kh = k_pool.stride(2), vh = v_pool.stride(2);
  const scalar_t* kp = k_pool.data_ptr<scalar_t>();
  const scalar_t* vp = v_pool.data_ptr<scalar_t>();
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const int64_t q0 = q.stride(0), q1 = q.stride(1), q2 = q.stride(2), q3 = q.stride(3);
  const acc_t* cp = c.data_ptr<acc_t>();  // (B, Hq, n) contiguous, NaN = bad tau
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  // Work item = one chunk of one row's keys, for every kv head: a slot's Hkv head rows are adjacent
  // in the pool, so reading them together sweeps each page once in address order (an item per kv
  // head strided through every page Hkv times, 4 KB apart: 3x slower here). Enough chunks to keep
  // every thread busy on a single row; a few hundred keys at least so that partials and the merge
  // stay negligible.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t total = keys.begin[B];
  const int64_t want_chunks = 8 * threads;
  const int64_t chunk_len = std::max<int64_t>(256, (total + want_chunks - 1) / want_chunks);
  std::vector<int64_t> chunk_begin(B + 1, 0);  // row b's chunks are [chunk_begin[b], chunk_begin[b + 1])
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = keys.begin[b + 1] - keys.begin[b];
    chunk_begin[b + 1] = chunk_begin[b] + (len + chunk_len - 1) / chunk_len;
  }
  const int64_t chunks = chunk_begin[B];
  std::vector<int64_t> chunk_row(chunks);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t ch = chunk_begin[b]; ch < chunk_begin[b + 1]; ++ch) chunk_row[ch] = b;

  // partials of (chunk, kv head) it = ch * Hkv + h: m, l (R each) and acc (R, Dv); bad: a non-finite score
  const int64_t items = chunks * Hkv;
  std::vector<acc_t> part_m(items * R), part_l(items * R), part_acc(items * R * Dv);
  std::vector<uint8_t> part_bad(items * R, 0);

  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> qs(Hkv * R * D), s(Hkv * R * kBlock), kbuf(8 * D), vbuf(2 * Dv);
    for (int64_t ch = lo; ch < hi; ++ch) {
      const int64_t b = chunk_row[ch];
      const int64_t row_first = keys.begin[b] + (ch - chunk_begin[b]) * chunk_len;
      const int64_t row_last = std::min(row_first + chunk_len, keys.begin[b + 1]);
      // row b's queries pre-multiplied by c (0 on bad-tau rows: finite here, NaN at the merge),
      // grouped by kv head: qs[h][g * n + i] is query i of head h * G + g
      for (int64_t hq = 0; hq < Hq; ++hq)
        for (int64_t i = 0; i < n; ++i) {
          acc_t cr = cp[(b * Hq + hq) * n + i];
          if (std::isnan(cr)) cr = 0;
          const scalar_t* src = qp + b * q0 + hq * q1 + i * q2;
          acc_t* dst = qs.data() + (hq * n + i) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d * q3]) * cr;
        }
      std::fill(part_m.begin() + ch * Hkv * R, part_m.begin() + (ch + 1) * Hkv * R, kNegInf);
      std::fill(part_l.begin() + ch * Hkv * R, part_l.begin() + (ch + 1) * Hkv * R, acc_t(0));
      std::fill(part_acc.begin() + ch * Hkv * R * Dv, part_acc.begin() + (ch + 1) * Hkv * R * Dv, acc_t(0));
      for (int64_t j0 = row_first; j0 < row_last; j0 += kBlock) {
        const int64_t nb = std::min(kBlock, row_last - j0);
        // scores: keys in address order of their slots (a slot's Hkv head rows are adjacent), so the
        // pool is swept sequentially; each K row serves the R query rows of its group
        if constexpr (std::is_same_v<acc_t, float>) {  // 8 keys at a time (dots8)
          for (int64_t t0 = 0; t0 < nb; t0 += 8) {
            const int64_t m8 = std::min<int64_t>(8, nb - t0);
            for (int64_t u = 0; u < 8 && t0 + 8 + u < nb; ++u) prefetch_rows(kp + keys.koff[j0 + t0 + 8 + u], Hkv, kh, D);
            for (int64_t h = 0; h < Hkv; ++h) {
              const float* kr[8];
              for (int64_t u = 0; u < 8; ++u)  // missing keys of a short block repeat key 0 (results unused)
                kr[u] = u < m8 ? load_row<scalar_t, acc_t>(kp + keys.koff[j0 + t0 + u] + h * kh, kbuf.data() + u * D, D)
                               : kr[0];
              for (int64_t r = 0; r < R; ++r)
                dots8(qs.data() + (h * R + r) * D, kr, D, s.data() + (h * R + r) * kBlock + t0, 1, m8);
            }
          }
        } else {
          for (int64_t t = 0; t < nb; ++t) {
            const scalar_t* krow = kp + keys.koff[j0 + t];
            if (t + 1 < nb) prefetch_rows(kp + keys.koff[j0 + t + 1], Hkv, kh, D);
            for (int64_t h = 0; h < Hkv; ++h) {
              const acc_t* kr = load_row<scalar_t, acc_t>(krow + h * kh, kbuf.data(), D);
              dots(qs.data() + h * R * D, kr, R, D, s.data() + h * R * kBlock + t, kBlock);
            }
          }
        }
        // online softmax per (kv head, query row): p = exp(s - m), rescale l and acc when m grows
        for (int64_t hr = 0; hr < Hkv * R; ++hr) {
          const int64_t it_r = ch * Hkv * R + hr;  // (ch * Hkv + h) * R + r
          acc_t& m = part_m[it_r];
          acc_t& l = part_l[it_r];
          acc_t* sr = s.data() + hr * kBlock;
          acc_t z = 0;  // 0 when every score is finite, NaN otherwise
#pragma omp simd reduction(+ : z)
          for (int64_t t = 0; t < nb; ++t) z += sr[t] - sr[t];
          if (z != 0) {  // a non-finite q row or k row: the row is NaN at the merge; keep the math finite
            part_bad[it_r] = 1;
            for (int64_t t = 0; t < nb; ++t)
              if (!std::isfinite(sr[t])) sr[t] = kNegInf;
          }
          acc_t bm = kNegInf;
          for (int64_t t = 0; t < nb; ++t) bm = sr[t] > bm ? sr[t] : bm;
          const acc_t mn = std::max(m, bm);
          // every score -inf so far: nothing to add yet (exp(-inf - -inf) would be NaN)
          const acc_t shift = mn == kNegInf ? acc_t(0) : mn;
          acc_t sum = 0;
          for (int64_t t = 0; t < nb; ++t) {
            sr[t] = exp_le0(sr[t] - shift);
            sum += sr[t];
          }
          if (m != mn) {
            const acc_t alpha = m == kNegInf ? acc_t(0) : exp_le0(m - mn);
            l *= alpha;
            acc_t* ar = part_acc.data() + it_r * Dv;
            for (int64_t d = 0; d < Dv; ++d) ar[d] *= alpha;
            m = mn;
          }
          l += sum;
        }
        // values, in the same sequential order; each V row serves the R query rows of its group, two
        // keys per pass over the accumulators
        for (int64_t t = 0; t < nb; t += 2) {
          const bool two = t + 1 < nb;
          const scalar_t* vrow0 = vp + keys.voff[j0 + t];
          const scalar_t* vrow1 = vp + keys.voff[j0 + t + (two ? 1 : 0)];
          if (t + 2 < nb) prefetch_rows(vp + keys.voff[j0 + t + 2], Hkv, vh, Dv);
          if (t + 3 < nb) prefetch_rows(vp + keys.voff[j0 + t + 3], Hkv, vh, Dv);
          for (int64_t h = 0; h < Hkv; ++h) {
            const acc_t* __restrict v0 = load_row<scalar_t, acc_t>(vrow0 + h * vh, vbuf.data(), Dv);
            const acc_t* __restrict v1 = two ? load_row<scalar_t, acc_t>(vrow1 + h * vh, vbuf.data() + Dv, Dv) : v0;
            for (int64_t r = 0; r < R; ++r) {
              const acc_t p0 = s[(h * R + r) * kBlock + t];
              acc_t* __restrict ar = part_acc.data() + ((ch * Hkv + h) * R + r) * Dv;
              if (two) {
                const acc_t p1 = s[(h * R + r) * kBlock + t + 1];
                for (int64_t d = 0; d < Dv; ++d) ar[d] += p0 * v0[d] + p1 * v1[d];
              } else {  // (not 0 * v1: an infinite value would turn it into NaN)
                for (int64_t d = 0; d < Dv; ++d) ar[d] += p0 * v0[d];
              }
            }
          }
        }
      }
    }
  });

  // merge the chunks of each (row, kv head)
  scalar_t* op = out.data_ptr<scalar_t>();  // (B, Hq, n, Dv) contiguous
  acc_t* lp = lse.data_ptr<acc_t>();        // (B, Hq, n) contiguous
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  // (tiny next to the partials: threads only when the rows' partials are large, each wake-up costs)
  const int64_t merge_work = std::max<int64_t>(1, (chunks / std::max<int64_t>(B, 1) + 1) * R * Dv);
  // new keys (k_new / v_new, contiguous (B, Hkv, n, D|Dv)): query i of a row also sees new keys 0..i, scored here
  // (n small: a decode step has one, its own token)
  const bool has_new = k_new.has_value();
  const scalar_t* knp = has_new ? k_new->data_ptr<scalar_t>() : nullptr;
  const scalar_t* vnp = has_new ? v_new->data_ptr<scalar_t>() : nullptr;
  const int64_t new_work = has_new ? n * (D + Dv) : 0;
  at::parallel_for(0, B * Hkv, std::max<int64_t>(1, 65536 / (merge_work + R * new_work)), [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> o(Dv), sn(has_new ? n : 0), qb(has_new ? D : 0), kb(has_new ? D : 0), vb(has_new ? Dv : 0);
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      const bool has_keys = has_new || keys.begin[b + 1] > keys.begin[b];
      const scalar_t* kn = knp + bh * n * D;
      const scalar_t* vn = vnp + bh * n * Dv;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < n; ++i) {
          const int64_t r = g * n + i, hq = h * G + g, row = (b * Hq + hq) * n + i;
          scalar_t* dst = op + row * Dv;
          acc_t M = kNegInf;
          bool bad = std::isnan(cp[row]);
          for (int64_t ch = chunk_begin[b]; ch < chunk_begin[b + 1]; ++ch) {
            M = std::max(M, part_m[(ch * Hkv + h) * R + r]);
            bad = bad || part_bad[(ch * Hkv + h) * R + r];
          }
          if (has_new) {  // scores c q_i . k_j of the new keys j <= i (a bad tau: c = 0 here, NaN below)
            const acc_t cr = std::isnan(cp[row]) ? acc_t(0) : cp[row];
            const scalar_t* src = qp + b * q0 + hq * q1 + i * q2;
            for (int64_t d = 0; d < D; ++d) qb[d] = static_cast<acc_t>(src[d * q3]) * cr;
            for (int64_t j = 0; j <= i; ++j) {
              const acc_t sj = dot(qb.data(), load_row<scalar_t, acc_t>(kn + j * D, kb.data(), D), D);
              if (std::isfinite(sj)) {
                sn[j] = sj;
                M = std::max(M, sj);
              } else {  // a NaN/Inf in the q row or the key's k row
                sn[j] = kNegInf;
                bad = true;
              }
            }
          }
          acc_t row_lse;
          if (!has_keys || bad) {
            row_lse = has_keys ? nan : kNegInf;
            std::fill(o.begin(), o.end(), has_keys ? nan : acc_t(0));
          } else {  // (every score of the row is finite here, so M is)
            std::fill(o.begin(), o.end(), acc_t(0));
            acc_t L = 0;
            for (int64_t ch = chunk_begin[b]; ch < chunk_begin[b + 1]; ++ch) {
              const int64_t it = ch * Hkv + h;
              const acc_t mc = part_m[it * R + r];
              if (mc == kNegInf) continue;
              const acc_t w = std::exp(mc - M);
              L += w * part_l[it * R + r];
              const acc_t* a = part_acc.data() + (it * R + r) * Dv;
              for (int64_t d = 0; d < Dv; ++d) o[d] += w * a[d];
            }
            for (int64_t j = 0; has_new && j <= i; ++j) {
              const acc_t w = exp_le0(sn[j] - M);
              L += w;
              const acc_t* vr = load_row<scalar_t, acc_t>(vn + j * Dv, vb.data(), Dv);
              for (int64_t d = 0; d < Dv; ++d) o[d] += w * vr[d];
            }
            const acc_t inv = acc_t(1) / L;
            acc_t z = 0;
            for (int64_t d = 0; d < Dv; ++d) {
              o[d] *= inv;
              z += o[d] - o[d];
            }
            row_lse = M + std::log(L);
            if (z != 0) {  // a NaN/Inf in the v row of one of its keys: the whole row is NaN
              row_lse = nan;
              std::fill(o.begin(), o.end(), nan);
            }
          }
          for (int64_t d = 0; d < Dv; ++d) dst[d] = static_cast<scalar_t>(o[d]);
          lp[row] = row_lse;
        }
    }
  });
}

std::tuple<Tensor, Tensor> paged_temperature_attention_cpu(const Tensor& q, const Tensor& k_pool, const Tensor& v_pool,
                                                           const Tensor& page_table, const Tensor& live_pool,
                                                           const Tensor& tau, const OptTensor& slots,
                                                           c10::optional<double> scale, const OptTensor& k_new,
                                                           const OptTensor& v_new) {
  check(q, k_pool, v_pool, page_table, live_pool, tau, slots, scale, k_new, v_new);
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), D = q.size(3), Dv = v_pool.size(3);
  const auto cd = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({B, Hq, n, Dv}, q.options());
  auto lse = at::empty({B, Hq, n}, q.options().dtype(cd));
  if (B * Hq * n == 0) return {out, lse};
  // The kernel indexes pools by strides but reads each head row as a contiguous run.
  const Tensor kp = k_pool.stride(3) == 1 ? k_pool : k_pool.contiguous();
  const Tensor vp = v_pool.stride(3) == 1 ? v_pool : v_pool.contiguous();
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  // c = scale / tau per (b, hq, i) (a true division in cd), NaN where tau is not positive finite or
  // the quotient overflows (as the reference's temperature_coefficient)
  const Tensor c = temperature_coefficients(tau, B, Hq, n, sc, cd);
  const Keys keys = collect_keys(kp, vp, page_table, live_pool, slots, B);
  const OptTensor kn = k_new.has_value() ? OptTensor(k_new->contiguous()) : c10::nullopt;
  const OptTensor vn = v_new.has_value() ? OptTensor(v_new->contiguous()) : c10::nullopt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), kOp, [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    attend<scalar_t, acc_t>(q, kp, vp, keys, c, kn, vn, out, lse);
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(trajops, CPU, m) { m.impl("paged_temperature_attention", &paged_temperature_attention_cpu); }

}  // namespace trajops
