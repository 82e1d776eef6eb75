// CPU kernels of trajops::kv_relevance, trajops::kv_topk, trajops::kv_evict_append_ and trajops::kv_write_.
//
// Semantics: trajops/reference/kv_cache.py. Relevance of a live slot for a query trajectory q:
// alpha * (unit(q) . e) + (1 - alpha) * exp(-decay * (now - ts)), e the slot's stored unit
// trajectory; rankings break ties by older timestamp, then lower logical slot.
//
// kv_evict_append_ runs in two phases so that an exhausted page pool leaves everything unchanged:
// phase 1 plans every row (evictions, page pops and releases on a private copy of the free-page
// stack, slot per new token) reading the state only; phase 2 writes the plan. Rows are planned in
// order because they share the free-page stack; the scoring inside a row (the O(slots * D_t) part)
// is parallel. The query units are computed with the same ATen ops as the reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"
#include "kv_cache_checks.h"

namespace trajops {
namespace {

using at::Tensor;
using kv_checks::check_evict;
using kv_checks::check_read;
using kv_checks::check_weights;
using kv_checks::check_page_table_values;
using kv_checks::kMaxK;
using kv_checks::kOp;
constexpr double kKvEps = 1e-8;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

Tensor unit(const Tensor& t) {  // t / max(|t|, eps) in fp64 rounded to fp32, exactly as the reference's kv_unit
  auto d = t.to(at::kDouble);
  return (d / d.norm(2, {-1}, true).clamp_min(kKvEps)).to(at::kFloat);
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

Scorer make_scorer(const Tensor& traj, const Tensor& ts, const Tensor& live, int64_t now, double alpha,
                   double decay) {
  return Scorer{traj.data_ptr<float>(), ts.data_ptr<int64_t>(), live.data_ptr<bool>(), traj.size(2), now, alpha,
                1.0 - alpha, decay};
}

void row_phys(const int64_t* pt, int64_t MP, int64_t S, std::vector<int64_t>& phys) {
  phys.resize(MP * S);
  for (int64_t j = 0; j < MP; ++j)
    for (int64_t o = 0; o < S; ++o) phys[j * S + o] = pt[j] >= 0 ? pt[j] * S + o : -1;
}

// ---------------------------------------------------------------- kv_relevance / kv_topk
Tensor kv_relevance_cpu(const Tensor& traj_pool, const Tensor& ts_pool, const Tensor& live_pool,
                        const Tensor& page_table, const Tensor& query, const Tensor& now, double alpha, double decay) {
  check_read(traj_pool, ts_pool, live_pool, page_table, query, now);
  check_weights(alpha, decay);
  const auto B = query.size(0), MP = page_table.size(1), S = traj_pool.size(1);
  auto traj = traj_pool.contiguous(), ts = ts_pool.contiguous(), live = live_pool.contiguous();
  auto pt = page_table.contiguous();
  check_page_table_values(pt.data_ptr<int64_t>(), B, MP, traj.size(0));
  auto q = unit(query).contiguous();
  auto out = at::empty({B, MP * S}, query.options().dtype(at::kFloat));
  const Scorer score = make_scorer(traj, ts, live, now.item<int64_t>(), alpha, decay);
  const int64_t* ptp = pt.data_ptr<int64_t>();
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * MP, std::max<int64_t>(1, 16384 / S), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / MP, j = r % MP, page = ptp[b * MP + j];
      for (int64_t o = 0; o < S; ++o) op[b * MP * S + j * S + o] = score(page >= 0 ? page * S + o : -1, qp + b * q.size(1));
    }
  });
  return out;
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

// Moves the first `take` candidates in rank order (best first, or lowest first) to the front of
// `cand` (logical slots; phys maps them to physical slots) and leaves their exact scores in sc and
// timestamps in tsl. Float SIMD scores shortlist the candidates that can rank within the first
// `take` given FastScorer's error bound; only those are scored exactly and sorted, so the result
// is exactly the full exact ranking's.
// Minimum of x[0..n) and whether all values are finite (a sum catches NaN and inf), 8 lanes at a time.
std::pair<float, bool> lowest_and_finite(const float* x, int64_t n) {
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
void select_ranked(std::vector<int64_t>& cand, int64_t take, bool best_first, const std::vector<int64_t>& phys,
                   const float* q, const Scorer& score, std::vector<float>& sc, std::vector<int64_t>& tsl) {
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

std::tuple<Tensor, Tensor> kv_topk_cpu(const Tensor& traj_pool, const Tensor& ts_pool, const Tensor& live_pool,
                                       const Tensor& page_table, const Tensor& query, const Tensor& now, double alpha,
                                       double decay, int64_t k) {
  check_read(traj_pool, ts_pool, live_pool, page_table, query, now);
  check_weights(alpha, decay);
  TORCH_CHECK_VALUE(k >= 0, kOp, ": k must be >= 0, got ", k);
  TORCH_CHECK_VALUE(k <= kMaxK, kOp, ": k must be <= ", kMaxK, ", got ", k);  // outputs are (B, k)
  const auto B = query.size(0), MP = page_table.size(1), S = traj_pool.size(1), L = MP * S;
  auto traj = traj_pool.contiguous(), ts = ts_pool.contiguous(), live = live_pool.contiguous();
  auto pt = page_table.contiguous();
  check_page_table_values(pt.data_ptr<int64_t>(), B, MP, traj.size(0));
  auto q = unit(query).contiguous();
  auto slots = at::full({B, k}, -1, query.options().dtype(at::kLong));
  auto scores = at::full({B, k}, -std::numeric_limits<double>::infinity(), query.options().dtype(at::kFloat));
  const Scorer score = make_scorer(traj, ts, live, now.item<int64_t>(), alpha, decay);
  int64_t* slot_out = slots.data_ptr<int64_t>();
  float* score_out = scores.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> phys, cand;
    std::vector<float> sc(L);
    std::vector<int64_t> tsl(L);
    const bool* livep = live.data_ptr<bool>();
    for (int64_t b = lo; b < hi; ++b) {
      row_phys(pt.data_ptr<int64_t>() + b * MP, MP, S, phys);
      cand.clear();
      for (int64_t j = 0; j < L; ++j)
        if (phys[j] >= 0 && livep[phys[j]]) cand.push_back(j);
      const int64_t take = std::min<int64_t>(k, static_cast<int64_t>(cand.size()));
      select_ranked(cand, take, true, phys, q.data_ptr<float>() + b * q.size(1), score, sc, tsl);
      for (int64_t r = 0; r < take; ++r) {
        slot_out[b * k + r] = cand[r];
        score_out[b * k + r] = sc[cand[r]];
      }
    }
  });
  return {slots, scores};
}

// ---------------------------------------------------------------- kv_evict_append_
struct RowPlan {
  std::vector<int64_t> evict;     // logical slots, in rank order
  std::vector<int64_t> evict_phys;
  std::vector<int64_t> new_pt;    // the row's page table after the call
  std::vector<int64_t> write;     // physical slot per new token, -1 if not written
  int64_t e = 0, n_write = 0, m = 0;
};

std::tuple<Tensor, Tensor, Tensor> kv_evict_append_cpu(
    Tensor& traj_pool, Tensor& ts_pool, Tensor& live_pool, Tensor& pinned_pool, Tensor& page_table, Tensor& live_count,
    const Tensor& capacity, Tensor& free_pages, Tensor& free_top, Tensor& evicted_total, const Tensor& now,
    const Tensor& new_traj, const Tensor& lengths, const c10::optional<Tensor>& pin, double alpha, double decay) {
  check_evict(traj_pool, ts_pool, live_pool, pinned_pool, page_table, live_count, capacity, free_pages, free_top,
              evicted_total, now, new_traj, lengths, pin, alpha, decay);
  const auto P = traj_pool.size(0), S = traj_pool.size(1), Dt = traj_pool.size(2), MP = page_table.size(1);
  const auto L = MP * S, B = new_traj.size(0), n = new_traj.size(1);
  const int64_t* ptp = page_table.data_ptr<int64_t>();
  int64_t top = free_top.item<int64_t>();
  auto lens = lengths.contiguous(), caps = capacity.contiguous();
  const int64_t tnow = now.item<int64_t>();
  auto units = unit(new_traj).contiguous();
  c10::optional<Tensor> pins;
  if (pin.has_value()) pins = pin->contiguous();

  const bool* livep = live_pool.data_ptr<bool>();
  const bool* pinp = pinned_pool.data_ptr<bool>();
  const Scorer score = make_scorer(traj_pool, ts_pool, live_pool, tnow, alpha, decay);
  std::vector<int64_t> stack(free_pages.data_ptr<int64_t>(), free_pages.data_ptr<int64_t>() + P);

  // ---- phase 1: plan every row (reads only)
  std::vector<RowPlan> plans(B);
  bool ok = true;
  std::vector<int64_t> phys, cand, tsl(L);
  std::vector<float> sc(L);
  std::vector<char> live_after(L);
  const std::vector<float> zeros(Dt, 0.f);
  for (int64_t b = 0; b < B && ok; ++b) {
    RowPlan& p = plans[b];
    const int64_t m = lens.data_ptr<int64_t>()[b], cap = caps.data_ptr<int64_t>()[b];
    const int64_t live_b = live_count.data_ptr<int64_t>()[b];
    p.m = m;
    row_phys(ptp + b * MP, MP, S, phys);
    cand.clear();
    for (int64_t j = 0; j < L; ++j) {
      const bool lv = phys[j] >= 0 && livep[phys[j]];
      live_after[j] = lv;
      if (lv && !pinp[phys[j]]) cand.push_back(j);
    }
    const int64_t keep = std::min(m, cap);
    p.e = std::min<int64_t>(std::max<int64_t>(live_b + keep - cap, 0), static_cast<int64_t>(cand.size()));
    p.n_write = std::max<int64_t>(std::min(keep, cap - (live_b - p.e)), 0);
    if (p.e > 0) {
      // the newest valid token's trajectory; a row without one (m = 0) scores by recency alone
      const float* q = m > 0 ? units.data_ptr<float>() + (b * n + m - 1) * Dt : zeros.data();
      select_ranked(cand, p.e, false, phys, q, score, sc, tsl);
      p.evict.assign(cand.begin(), cand.begin() + p.e);
      for (int64_t j : p.evict) {
        live_after[j] = 0;
        p.evict_phys.push_back(phys[j]);
      }
    }
    // pages: pop what the owned free slots cannot hold into the lowest empty entries
    p.new_pt.assign(ptp + b * MP, ptp + (b + 1) * MP);
    int64_t free_owned = 0;
    for (int64_t j = 0; j < L; ++j) free_owned += phys[j] >= 0 && !live_after[j];
    const int64_t need_pages = (std::max<int64_t>(p.n_write - free_owned, 0) + S - 1) / S;
    if (need_pages > top) {
      ok = false;
      break;
    }
    for (int64_t j = 0, popped = 0; j < MP && popped < need_pages; ++j)
      if (p.new_pt[j] < 0) p.new_pt[j] = stack[--top], ++popped;
    row_phys(p.new_pt.data(), MP, S, phys);
    // the last n_write valid tokens take the lowest free logical slots
    p.write.assign(n, -1);
    for (int64_t j = 0, t = m - p.n_write; j < L && t < m; ++j)
      if (phys[j] >= 0 && !live_after[j]) {
        p.write[t++] = phys[j];
        live_after[j] = 1;
      }
    // release pages without a live slot
    for (int64_t j = 0; j < MP; ++j) {
      if (p.new_pt[j] < 0) continue;
      bool any = false;
      for (int64_t o = 0; o < S && !any; ++o) any = live_after[j * S + o];
      if (!any) {
        stack[top++] = p.new_pt[j];
        p.new_pt[j] = -1;
      }
    }
  }

  auto evicted = at::full({B, n}, -1, lengths.options().dtype(at::kLong));
  auto written = at::full({B, n}, -1, lengths.options().dtype(at::kLong));
  if (!ok) return {evicted, written, at::scalar_tensor(false, lengths.options().dtype(at::kBool))};

  // ---- phase 2: apply
  bool* live_w = live_pool.data_ptr<bool>();
  bool* pin_w = pinned_pool.data_ptr<bool>();
  int64_t* ts_w = ts_pool.data_ptr<int64_t>();
  float* traj_w = traj_pool.data_ptr<float>();
  int64_t* pt_w = page_table.data_ptr<int64_t>();
  const bool* pinsrc = pins.has_value() ? pins->data_ptr<bool>() : nullptr;
  int64_t* ev_out = evicted.data_ptr<int64_t>();
  int64_t* wr_out = written.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const RowPlan& p = plans[b];
    for (int64_t r = 0; r < p.e && r < n; ++r) ev_out[b * n + r] = p.evict[r];
    for (int64_t ph : p.evict_phys) live_w[ph] = false, pin_w[ph] = false;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t ph = p.write[t];
      wr_out[b * n + t] = ph;
      if (ph < 0) continue;
      live_w[ph] = true;
      ts_w[ph] = tnow;
      pin_w[ph] = pinsrc != nullptr && pinsrc[b * n + t];
      std::copy_n(units.data_ptr<float>() + (b * n + t) * Dt, Dt, traj_w + ph * Dt);
    }
    std::copy(p.new_pt.begin(), p.new_pt.end(), pt_w + b * MP);
    live_count.data_ptr<int64_t>()[b] += p.n_write - p.e;
    evicted_total.data_ptr<int64_t>()[b] += p.e + (p.m - p.n_write);
  }
  std::copy(stack.begin(), stack.end(), free_pages.data_ptr<int64_t>());
  free_top.fill_(top);
  return {evicted, written, at::scalar_tensor(true, lengths.options().dtype(at::kBool))};
}

// ---------------------------------------------------------------- kv_write_
void check_write(const Tensor& k_pool, const Tensor& v_pool, const Tensor& written, const Tensor& k,
                 const Tensor& v) {
  TORCH_CHECK_VALUE(k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes() &&
                        v_pool.scalar_type() == k_pool.scalar_type(),
                    kOp, ": k_pool and v_pool must have one shape (num_pages, page_size, H, D) and dtype, got ",
                    k_pool.sizes(), " ", py_dtype(k_pool.scalar_type()), " and ", v_pool.sizes(), " ",
                    py_dtype(v_pool.scalar_type()));
  TORCH_CHECK_VALUE(written.dim() == 2 && written.scalar_type() == at::kLong, kOp,
                    ": written must be int64 (B, n), got ", py_dtype(written.scalar_type()), " ", written.sizes());
  const auto B = written.size(0), n = written.size(1), H = k_pool.size(2), D = k_pool.size(3);
  TORCH_CHECK_VALUE(k.dim() == 4 && k.size(0) == B && k.size(1) == H && k.size(2) == n && k.size(3) == D &&
                        v.sizes() == k.sizes(),
                    kOp, ": k and v must have shape (", B, ", ", H, ", ", n, ", ", D, "), got ", k.sizes(), " and ",
                    v.sizes());
}

// Copies token t of row b (all heads) to physical slot written[b, t] of the pools; -1 = not written.
void kv_write_cpu(Tensor& k_pool, Tensor& v_pool, const Tensor& written, const Tensor& k, const Tensor& v) {
  check_write(k_pool, v_pool, written, k, v);
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), kOp, ": k_pool and v_pool must be contiguous");
  const auto B = written.size(0), n = written.size(1), H = k_pool.size(2), D = k_pool.size(3);
  const auto slots = k_pool.size(0) * k_pool.size(1);
  auto wr = written.contiguous();
  const int64_t* w = wr.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * n; ++i)
    TORCH_CHECK_VALUE(w[i] >= -1 && w[i] < slots, kOp, ": written slot ", w[i], " is outside the pool of ", slots,
                      " slots (-1 = not written)");
  const auto esize = k_pool.element_size();
  for (auto [pool, src] : {std::pair<Tensor*, const Tensor*>{&k_pool, &k}, {&v_pool, &v}}) {
    const Tensor s = src->to(pool->scalar_type());  // no copy when the dtypes agree
    const char* sp = static_cast<const char*>(s.data_ptr());
    char* dp = static_cast<char*>(pool->data_ptr());
    const auto sb = s.stride(0) * esize, sh = s.stride(1) * esize, st = s.stride(2) * esize;
    const auto sd = s.stride(3);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < n; ++t) {
        const int64_t ph = w[b * n + t];
        if (ph < 0) continue;
        for (int64_t h = 0; h < H; ++h) {
          const char* from = sp + b * sb + t * st + h * sh;
          char* to = dp + (ph * H + h) * D * esize;
          if (sd == 1) {
            std::memcpy(to, from, D * esize);
          } else {
            for (int64_t d = 0; d < D; ++d) std::memcpy(to + d * esize, from + d * sd * esize, esize);
          }
        }
      }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(trajops, CPU, m) {
  m.impl("kv_relevance", &kv_relevance_cpu);
  m.impl("kv_topk", &kv_topk_cpu);
  m.impl("kv_evict_append_", &kv_evict_append_cpu);
  m.impl("kv_write_", &kv_write_cpu);
}

}  // namespace trajops
