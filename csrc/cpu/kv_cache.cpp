// CPU kernels of trajops::kv_relevance, trajops::kv_topk, trajops::kv_evict_append_ and trajops::kv_write_.
//
// Semantics: trajops/reference/kv_cache.py. Relevance of a live slot for a query trajectory q:
// alpha * (unit_rows(q) . e) + (1 - alpha) * exp(-decay * (now - ts)), e the slot's stored unit
// trajectory; rankings break ties by older timestamp, then lower logical slot.
//
// kv_evict_append_ runs in two phases so that an exhausted page pool leaves everything unchanged:
// phase 1 plans every row (evictions, page pops and releases on a private copy of the free-page
// stack, slot per new token) reading the state only; phase 2 writes the plan. Rows are planned in
// order because they share the free-page stack; the scoring inside a row (the O(slots * D_t) part)
// is parallel. The query units are computed with the same ATen ops as the reference.
//
// The scoring and ranking helpers are in kv_cache_ranking.h, the argument checks in
// kv_cache_checks.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"
#include "kv_cache_checks.h"
#include "kv_cache_ranking.h"

namespace trajops {
namespace {

using at::Tensor;
using kv_checks::check_evict;
using kv_checks::check_read;
using kv_checks::check_weights;
using kv_checks::check_page_table_values;
using kv_checks::check_write;
using kv_checks::kMaxK;
using kv_checks::kOp;
using kv_rank::Scorer;
using kv_rank::make_scorer;
using kv_rank::row_phys;
using kv_rank::select_ranked;
using kv_rank::unit_rows;

// ---------------------------------------------------------------- kv_relevance / kv_topk
Tensor kv_relevance_cpu(const Tensor& traj_pool, const Tensor& ts_pool, const Tensor& live_pool,
                        const Tensor& page_table, const Tensor& query, const Tensor& now, double alpha, double decay) {
  check_read(traj_pool, ts_pool, live_pool, page_table, query, now);
  check_weights(alpha, decay);
  const auto B = query.size(0), MP = page_table.size(1), S = traj_pool.size(1);
  auto traj = traj_pool.contiguous(), ts = ts_pool.contiguous(), live = live_pool.contiguous();
  auto pt = page_table.contiguous();
  check_page_table_values(pt.data_ptr<int64_t>(), B, MP, traj.size(0));
  const std::vector<float> q = unit_rows(query);
  auto out = at::empty({B, MP * S}, query.options().dtype(at::kFloat));
  const Scorer score = make_scorer(traj, ts, live, now.item<int64_t>(), alpha, decay);
  const int64_t* ptp = pt.data_ptr<int64_t>();
  const float* qp = q.data();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * MP, std::max<int64_t>(1, 16384 / S), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / MP, j = r % MP, page = ptp[b * MP + j];
      for (int64_t o = 0; o < S; ++o) op[b * MP * S + j * S + o] = score(page >= 0 ? page * S + o : -1, qp + b * query.size(1));
    }
  });
  return out;
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
  const std::vector<float> q = unit_rows(query);
  const int64_t Dt = query.size(1);
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
      select_ranked(cand, take, true, phys, q.data() + b * Dt, score, sc, tsl);
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
    const Tensor& new_traj, const Tensor& lengths, const c10::optional<Tensor>& pin, double alpha, double decay,
    const c10::optional<Tensor>& pos_pool, const c10::optional<Tensor>& next_position) {
  check_evict(traj_pool, ts_pool, live_pool, pinned_pool, page_table, live_count, capacity, free_pages, free_top,
              evicted_total, now, new_traj, lengths, pin, alpha, decay, pos_pool, next_position);
  const auto P = traj_pool.size(0), S = traj_pool.size(1), Dt = traj_pool.size(2), MP = page_table.size(1);
  const auto L = MP * S, B = new_traj.size(0), n = new_traj.size(1);
  const int64_t* ptp = page_table.data_ptr<int64_t>();
  // CPU scalars read in place (item() is a dispatch each; a decode step calls this op once per token)
  int64_t top = *free_top.data_ptr<int64_t>();
  auto lens = lengths.contiguous(), caps = capacity.contiguous();
  const int64_t tnow = *now.data_ptr<int64_t>();
  const std::vector<float> units = unit_rows(new_traj);
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
      const float* q = m > 0 ? units.data() + (b * n + m - 1) * Dt : zeros.data();
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
  // positions (optional): token t of row b is the row's next_position[b] + t-th valid token
  int64_t* pos_w = pos_pool.has_value() ? pos_pool->data_ptr<int64_t>() : nullptr;
  int64_t* next_w = pos_w != nullptr ? next_position->data_ptr<int64_t>() : nullptr;
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
      if (pos_w != nullptr) pos_w[ph] = next_w[b] + t;
      std::copy_n(units.data() + (b * n + t) * Dt, Dt, traj_w + ph * Dt);
    }
    std::copy(p.new_pt.begin(), p.new_pt.end(), pt_w + b * MP);
    live_count.data_ptr<int64_t>()[b] += p.n_write - p.e;
    evicted_total.data_ptr<int64_t>()[b] += p.e + (p.m - p.n_write);
    if (next_w != nullptr) next_w[b] += p.m;
  }
  std::copy(stack.begin(), stack.end(), free_pages.data_ptr<int64_t>());
  *free_top.data_ptr<int64_t>() = top;
  return {evicted, written, at::scalar_tensor(true, lengths.options().dtype(at::kBool))};
}

// ---------------------------------------------------------------- kv_write_
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
