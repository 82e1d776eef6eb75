// Argument checks of the KV cache's CPU kernels (csrc/cpu/kv_cache.cpp). Messages and their order
// match trajops/ops/kv_cache.py, so that every backend fails the same way.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

namespace trajops {
namespace kv_checks {

using at::Tensor;
constexpr const char* kOp = "kv_cache";
constexpr int64_t kMaxK = 2147483647;  // as trajops/ops/kv_cache.py

// ---------------------------------------------------------------- checks
// Messages and order match trajops/ops/kv_cache.py, so that every backend fails the same way. Shapes
// first, then (before any access) every value the kernels index with or count from.
inline void check_pool(const Tensor& traj_pool, const Tensor& ts_pool, const Tensor& live_pool, const Tensor& page_table) {
  TORCH_CHECK_VALUE(traj_pool.dim() == 3 && traj_pool.scalar_type() == at::kFloat, kOp,
                    ": traj_pool must be float32 (num_pages, page_size, traj_dim), got ",
                    py_dtype(traj_pool.scalar_type()), " ", traj_pool.sizes());
  const auto P = traj_pool.size(0), S = traj_pool.size(1);
  TORCH_CHECK_VALUE(ts_pool.dim() == 2 && ts_pool.size(0) == P && ts_pool.size(1) == S &&
                        ts_pool.scalar_type() == at::kLong,
                    kOp, ": ts_pool must be int64 (", P, ", ", S, "), got ", py_dtype(ts_pool.scalar_type()), " ",
                    ts_pool.sizes());
  TORCH_CHECK_VALUE(live_pool.dim() == 2 && live_pool.size(0) == P && live_pool.size(1) == S &&
                        live_pool.scalar_type() == at::kBool,
                    kOp, ": live_pool must be bool (", P, ", ", S, "), got ", py_dtype(live_pool.scalar_type()),
                    " ", live_pool.sizes());
  TORCH_CHECK_VALUE(page_table.dim() == 2 && page_table.scalar_type() == at::kLong, kOp,
                    ": page_table must be int64 (max_batch, max_pages), got ", py_dtype(page_table.scalar_type()),
                    " ", page_table.sizes());
}

// query (B, Dt) or new_traj (B, n, Dt), floating point, B <= max_batch.
inline void check_trajectories(const char* name, const Tensor& t, int64_t dims, const Tensor& traj_pool,
                        const Tensor& page_table) {
  const auto Dt = traj_pool.size(2), MB = page_table.size(0);
  const std::string want = dims == 2 ? "(B, " + std::to_string(Dt) + ")" : "(B, n, " + std::to_string(Dt) + ")";
  TORCH_CHECK_VALUE(t.dim() == dims && t.size(-1) == Dt && t.size(0) <= MB && at::isFloatingType(t.scalar_type()),
                    kOp, ": ", name, " must be a floating-point ", want, " tensor with B <= ", MB, ", got ",
                    py_dtype(t.scalar_type()), " ", t.sizes());
}

inline void check_int(const char* name, const Tensor& t, at::IntArrayRef shape, const std::string& what) {
  TORCH_CHECK_VALUE(t.sizes() == shape && t.scalar_type() == at::kLong, kOp, ": ", name, " must be int64 ", what,
                    ", got ", py_dtype(t.scalar_type()), " ", t.sizes());
}

inline std::string dims_str(int64_t n) { return "(" + std::to_string(n) + ",)"; }

// The weights the cache itself accepts; Python's repr spells the value (py_format.h).
inline void check_weights(double alpha, double decay) {
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, kOp, ": alpha must be in [0, 1], got ", py_float(alpha));
  TORCH_CHECK_VALUE(std::isfinite(decay) && decay >= 0.0, kOp, ": decay must be a finite number >= 0, got ",
                    py_float(decay));
}

inline void check_read(const Tensor& traj_pool, const Tensor& ts_pool, const Tensor& live_pool, const Tensor& page_table,
                const Tensor& query, const Tensor& now) {
  check_pool(traj_pool, ts_pool, live_pool, page_table);
  check_trajectories("query", query, 2, traj_pool, page_table);
  check_int("now", now, {}, "0-d");
}

// The first B rows of the (contiguous) page table hold -1 or a page in [0, P).
inline void check_page_table_values(const int64_t* pt, int64_t B, int64_t MP, int64_t P) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < MP; ++j) {
      const int64_t v = pt[b * MP + j];
      TORCH_CHECK_INDEX(v >= -1 && v < P, kOp, ": page_table entries must be -1 or a page in [0, ", P, "), got ", v,
                        " at [", b, ", ", j, "]");
    }
}

// kv_evict_append_: shapes and dtypes of the state and the call's arguments, then every value the
// kernel indexes with or counts from, before any access.
inline void check_evict(const Tensor& traj_pool, const Tensor& ts_pool, const Tensor& live_pool,
                        const Tensor& pinned_pool, const Tensor& page_table, const Tensor& live_count,
                        const Tensor& capacity, const Tensor& free_pages, const Tensor& free_top,
                        const Tensor& evicted_total, const Tensor& now, const Tensor& new_traj, const Tensor& lengths,
                        const c10::optional<Tensor>& pin, double alpha, double decay,
                        const c10::optional<Tensor>& pos_pool, const c10::optional<Tensor>& next_position) {
  check_pool(traj_pool, ts_pool, live_pool, page_table);
  check_trajectories("new_traj", new_traj, 3, traj_pool, page_table);
  const auto P = traj_pool.size(0), S = traj_pool.size(1), MP = page_table.size(1);
  const auto MB = page_table.size(0), L = MP * S, B = new_traj.size(0), n = new_traj.size(1);
  TORCH_CHECK_VALUE(pinned_pool.dim() == 2 && pinned_pool.size(0) == P && pinned_pool.size(1) == S &&
                        pinned_pool.scalar_type() == at::kBool,
                    kOp, ": pinned_pool must be bool (", P, ", ", S, "), got ", py_dtype(pinned_pool.scalar_type()),
                    " ", pinned_pool.sizes());
  check_int("live_count", live_count, {MB}, dims_str(MB));
  check_int("capacity", capacity, {MB}, dims_str(MB));
  check_int("free_pages", free_pages, {P}, dims_str(P));
  check_int("free_top", free_top, {}, "0-d");
  check_int("evicted_total", evicted_total, {MB}, dims_str(MB));
  check_int("now", now, {}, "0-d");
  check_int("lengths", lengths, {B}, dims_str(B));
  if (pin.has_value())
    TORCH_CHECK_VALUE(pin->dim() == 2 && pin->size(0) == B && pin->size(1) == n && pin->scalar_type() == at::kBool,
                      kOp, ": pin must be bool (", B, ", ", n, "), got ", py_dtype(pin->scalar_type()), " ",
                      pin->sizes());
  TORCH_CHECK_VALUE(pos_pool.has_value() == next_position.has_value(), kOp,
                    ": pos_pool and next_position must be given together (or neither)");
  if (pos_pool.has_value()) {
    check_int("pos_pool", *pos_pool, {P, S}, "(" + std::to_string(P) + ", " + std::to_string(S) + ")");
    check_int("next_position", *next_position, {MB}, dims_str(MB));
  }
  for (const Tensor* t : {&traj_pool, &ts_pool, &live_pool, &pinned_pool, &page_table, &live_count, &free_pages,
                          &evicted_total})
    TORCH_CHECK(t->is_contiguous(), kOp, ": the cache state tensors must be contiguous");
  if (pos_pool.has_value())
    TORCH_CHECK(pos_pool->is_contiguous() && next_position->is_contiguous(), kOp,
                ": the cache state tensors must be contiguous");
  check_weights(alpha, decay);
  // values, before any access (same order as the Python checks)
  const int64_t* ptp = page_table.data_ptr<int64_t>();
  check_page_table_values(ptp, B, MP, P);
  const int64_t top = *free_top.data_ptr<int64_t>();  // CPU: read in place
  TORCH_CHECK_INDEX(top >= 0 && top <= P, kOp, ": free_top must be in [0, ", P, "], got ", top);
  for (int64_t i = 0; i < top; ++i) {
    const int64_t page = free_pages.data_ptr<int64_t>()[i];
    TORCH_CHECK_INDEX(page >= 0 && page < P, kOp, ": free_pages[:free_top] must hold pages in [0, ", P, "), got ",
                      page, " at ", i);
  }
  {  // each page held once by the rows' tables and the stack: page releases then always fit the stack
    std::vector<char> seen(P, 0);
    auto hold = [&](int64_t page) {
      TORCH_CHECK_VALUE(!seen[page], kOp, ": page ", page,
                        " is held twice by page_table[:B] and free_pages[:free_top]");
      seen[page] = 1;
    };
    for (int64_t i = 0; i < B * MP; ++i)
      if (ptp[i] >= 0) hold(ptp[i]);
    for (int64_t i = 0; i < top; ++i) hold(free_pages.data_ptr<int64_t>()[i]);
  }
  auto lens = lengths.contiguous(), caps = capacity.contiguous();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t c = live_count.data_ptr<int64_t>()[b];
    TORCH_CHECK_VALUE(c >= 0 && c <= L, kOp, ": live_count must be in [0, ", L, "], got ", c, " for row ", b);
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t c = caps.data_ptr<int64_t>()[b];
    TORCH_CHECK_VALUE(c >= 0, kOp, ": capacity must be >= 0, got ", c, " for row ", b);
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t m = lens.data_ptr<int64_t>()[b];
    TORCH_CHECK_VALUE(m >= 0 && m <= n, kOp, ": lengths must be in [0, ", n, "], got ", m, " for row ", b);
  }
}

// kv_write_: the pools, the written slots and the new keys and values agree in shape and dtype.
inline void check_write(const Tensor& k_pool, const Tensor& v_pool, const Tensor& written, const Tensor& k,
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

}  // namespace kv_checks
}  // namespace trajops
