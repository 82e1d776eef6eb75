// Relevance scoring and ranking of the KV cache's CPU kernels (csrc/cpu/kv_cache.cpp): the exact
// fp64-rounded scorer, its SIMD float shortlist with an error bound, and the ranked selection
// that kv_topk and kv_evict_append_ share. Semantics: trajops/reference/kv_cache.py.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "common.h"

namespace trajops {
namespace kv_rank {

using at::Tensor;
constexpr double kKvEps = 1e-8;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// t / max(|t|, eps) of each row of t (..., Dt) in fp64, rounded to fp32, flat: the reference's kv_unit. Plain loops:
// the ops normalize B short query vectors per call, where five tensor ops cost more than the arithmetic. The sum of
// squares is fp64 in index order (ATen's norm may add in another order): the fp32 results can differ from the
// reference's only when an fp64 quotient lies within an fp64 ulp of an fp32 rounding boundary (about 2^-29 per
// element), as across devices.
inline std::vector<float> unit_rows(const Tensor& t) {
  const int64_t Dt = t.size(-1);
  const bool native = t.scalar_type() == at::kDouble || t.scalar_type() == at::kFloat;
  const Tensor c = native ? t.contiguous() : t.to(at::kFloat).contiguous();  // half/bf16 -> fp32 is exact
  std::vector<float> out(c.numel());
  const int64_t rows = Dt > 0 ? c.numel() / Dt : 0;
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "unit_rows", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0.0;
      for (int64_t d = 0; d < Dt; ++d) ss += static_cast<double>(p[r * Dt + d]) * static_cast<double>(p[r * Dt + d]);
      const double norm = std::max(std::sqrt(ss), kKvEps);
      for (int64_t d = 0; d < Dt; ++d) out[r * Dt + d] = static_cast<float>(static_cast<double>(p[r * Dt + d]) / norm);
    }
  });
  return out;
}

// Scores of the slots of one row. phys[j] = physical slot of logical slot j or -1; rows of traj
// are contiguous (the pools are made contiguous by the callers).
// The score is computed in double and rounded once to float, as the reference does, so that the
// backends agree on fp32 scores and their ties up to double rounding.
struct Scorer {
  const float* traj;
  const int64_t* ts;
  const bool* live;
  int64_t Dt;
  int64_t now;
  double a, b, d;  // alpha, 1 - alpha, decay

  float operator()(int64_t phys, const float* q) const {
    if (phys < 0 || !live[phys]) return kNegInf;
    const float* e = traj + phys * Dt;
    double acc[4] = {0.0, 0.0, 0.0, 0.0};  // independent partial sums: the loop vectorizes
    int64_t i = 0;
    for (; i + 4 <= Dt; i += 4)
      for (int u = 0; u < 4; ++u) acc[u] += static_cast<double>(e[i + u]) * q[i + u];
    for (; i < Dt; ++i) acc[0] += static_cast<double>(e[i]) * q[i];
    const double dot = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    const double age = static_cast<double>(now - ts[phys]);
    return static_cast<float>(a * dot + b * std::exp(-d * age));
  }
};

// (v8 and transpose_sum: common.h)

// Float scores of many slots at once (SIMD) and a bound on their distance to the exact scores
// (fp64, rounded to fp32): rankings then need the exact score only near their cut-off. Returns
// false when the bound does not hold (a non-finite value, a timestamp after `now`), and the
// caller scores exactly. Error sources, for unit vectors: the fp32 dot (at most Dt rounding steps
// of 2^-24 on a sum of |e_i q_i| <= 1), fast_exp, and the final roundings.
struct FastScorer {
  const float* traj;
  const int64_t* ts;
  int64_t Dt;
  int64_t now;
  double a, b, d;

  float eps() const { return static_cast<float>((Dt + 8) * 1.2e-7 + 4e-6); }

  // out: sign * the scores (sign -1 turns a best-first ranking into a lowest-first one); x: scratch of
  // `count` floats. Non-finite values are left for the caller to detect (see lowest_and_finite).
  bool operator()(const int64_t* phys, int64_t count, const float* q, float sign, float* out, float* x) const {
    const int64_t full = Dt / 8 * 8;
    bool ok = true;
    int64_t c = 0;
    // 8 slots at a time: one 8-lane partial-sum vector per slot, then a transpose-add tree turns the
    // 8 vectors into the 8 dots (a horizontal sum per slot would cost as much as its products)
    for (; c + 8 <= count; c += 8) {
      v8 acc[8];
      for (int s = 0; s < 8; ++s) {
        const float* e = traj + phys[c + s] * Dt;
        v8 a0 = {}, a1 = {}, ev, qv;  // two chains of dependent adds per slot instead of one
        int64_t i = 0;
        for (; i + 16 <= full; i += 16) {
          std::memcpy(&ev, e + i, sizeof(v8));
          std::memcpy(&qv, q + i, sizeof(v8));
          a0 += ev * qv;
          std::memcpy(&ev, e + i + 8, sizeof(v8));
          std::memcpy(&qv, q + i + 8, sizeof(v8));
          a1 += ev * qv;
        }
        for (; i < full; i += 8) {
          std::memcpy(&ev, e + i, sizeof(v8));
          std::memcpy(&qv, q + i, sizeof(v8));
          a0 += ev * qv;
        }
        acc[s] = a0 + a1;
      }
      v8 dots = transpose_sum(acc);
      for (int s = 0; s < 8; ++s) {
        const float* e = traj + phys[c + s] * Dt;
        for (int64_t i = full; i < Dt; ++i) dots[s] += e[i] * q[i];
      }
      std::memcpy(out + c, &dots, sizeof(v8));
    }
    for (; c < count; ++c) {
      const float* e = traj + phys[c] * Dt;
      float dot = 0.f;
      for (int64_t i = 0; i < Dt; ++i) dot += e[i] * q[i];
      out[c] = dot;
    }
    for (c = 0; c < count; ++c) {
      const int64_t age = now - ts[phys[c]];
      ok &= age >= 0;
      x[c] = static_cast<float>(-d * static_cast<double>(age));
    }
    const float fa = sign * static_cast<float>(a), fb = sign * static_cast<float>(b);
    for (c = 0; c < count; ++c) out[c] = fa * out[c] + fb * fast_exp(x[c]);  // vectorizes
    return ok;
  }
};

inline Scorer make_scorer(const Tensor& traj, const Tensor& ts, const Tensor& live, int64_t now, double alpha,
                          double decay) {
  return Scorer{traj.data_ptr<float>(), ts.data_ptr<int64_t>(), live.data_ptr<bool>(), traj.size(2), now, alpha,
                1.0 - alpha, decay};
}

inline void row_phys(const int64_t* pt, int64_t MP, int64_t S, std::vector<int64_t>& phys) {
  phys.resize(MP * S);
  for (int64_t j = 0; j < MP; ++j)
    for (int64_t o = 0; o < S; ++o) phys[j * S + o] = pt[j] >= 0 ? pt[j] * S + o : -1;
}

// Order of candidates: score (desc when best_first, else asc), then older ts, then lower slot.
// A NaN score ranks as -inf (least relevant), which also keeps the order a strict weak ordering.
struct RankLess {
  const float* score;
  const int64_t* ts;  // per logical slot
  bool best_first;
  static float key(float s) { return std::isnan(s) ? -std::numeric_limits<float>::infinity() : s; }
  bool operator()(int64_t x, int64_t y) const {
    const float sx = key(score[x]), sy = key(score[y]);
    if (sx != sy) return best_first ? sx > sy : sx < sy;
    if (ts[x] != ts[y]) return ts[x] < ts[y];
    return x < y;
  }
};

// Minimum of x[0..n) and whether all values are finite (a sum catches NaN and inf), 8 lanes at a time.
inline std::pair<float, bool> lowest_and_finite(const float* x, int64_t n) {
  const float inf = std::numeric_limits<float>::infinity();
  v8 mn = {inf, inf, inf, inf, inf, inf, inf, inf}, sum = {};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    v8 v;
    std::memcpy(&v, x + c, sizeof(v8));
    mn = v < mn ? v : mn;
    sum += v;
  }
  float m = inf, s = 0.f;
  for (int u = 0; u < 8; ++u) m = std::min(m, mn[u]), s += sum[u];
  for (; c < n; ++c) m = std::min(m, x[c]), s += x[c];
  return {m, std::isfinite(s)};
}

// Moves the first `take` candidates in rank order (best first, or lowest first) to the front of
// `cand` (logical slots; phys maps them to physical slots) and leaves their exact scores in sc and
// timestamps in tsl. Float SIMD scores shortlist the candidates that can rank within the first
// `take` given FastScorer's error bound; only those are scored exactly and sorted, so the result
// is exactly the full exact ranking's.
inline void select_ranked(std::vector<int64_t>& cand, int64_t take, bool best_first,
                          const std::vector<int64_t>& phys, const float* q, const Scorer& score,
                          std::vector<float>& sc, std::vector<int64_t>& tsl) {
  const int64_t N = static_cast<int64_t>(cand.size());
  take = std::min(take, N);
  if (take <= 0) return;
  if (take < N) {
    const FastScorer fast{score.traj, score.ts, score.Dt, score.now, score.a, score.b, score.d};
    std::vector<int64_t> ph(N);
    for (int64_t c = 0; c < N; ++c) ph[c] = phys[cand[c]];
    // signed so that the first `take` are always the lowest
    std::vector<float> approx(N), scratch(N);
    const float sign = best_first ? -1.0f : 1.0f;
    std::atomic<bool> ok{true};
    at::parallel_for(0, N, 16384, [&](int64_t lo, int64_t hi) {  // threads only pay for large rows
      if (!fast(ph.data() + lo, hi - lo, q, sign, approx.data() + lo, scratch.data() + lo)) ok = false;
    });
    auto [cut, finite] = lowest_and_finite(approx.data(), N);
    if (ok && finite) {
      if (take > 1) {
        std::vector<float> tmp(approx);
        std::nth_element(tmp.begin(), tmp.begin() + take - 1, tmp.end());
        cut = tmp[take - 1];
      }
      // every slot of the exact first `take` is within 2 eps of the float cut (see FastScorer);
      // 8 lanes are tested at once, and only a block with a hit is walked
      const float bound = cut + 2.0f * fast.eps();
      const v8 vb = {bound, bound, bound, bound, bound, bound, bound, bound};
      int64_t w = 0, c = 0;
      for (; c + 8 <= N; c += 8) {
        v8 v;
        std::memcpy(&v, approx.data() + c, sizeof(v8));
        const v8i hit = v <= vb;
        int64_t any[4];
        std::memcpy(any, &hit, sizeof(any));
        if ((any[0] | any[1] | any[2] | any[3]) == 0) continue;
        for (int u = 0; u < 8; ++u)
          if (approx[c + u] <= bound) cand[w++] = cand[c + u];
      }
      for (; c < N; ++c)
        if (approx[c] <= bound) cand[w++] = cand[c];
      cand.resize(w);
    }
  }
  for (int64_t j : cand) {
    sc[j] = score(phys[j], q);
    tsl[j] = score.ts[phys[j]];
  }
  std::partial_sort(cand.begin(), cand.begin() + take, cand.end(), RankLess{sc.data(), tsl.data(), best_first});
}

}  // namespace kv_rank
}  // namespace trajops
