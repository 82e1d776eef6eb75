// Argument checks and row layout of the CPU STP kernels (csrc/cpu/stp_loss.cpp for the sampled
// loss, csrc/cpu/stp_loss_dense.cpp for the dense one). Messages and their order match
// trajops/ops/stp_loss.py, so that every backend fails the same way.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "py_format.h"
#include "varlen.h"

namespace trajops {
namespace stp {

// ---------------------------------------------------------------- checks
// Messages match trajops/ops/stp_loss.py so every backend fails the same way.
inline void check_hidden(const char* op, at::TensorList hidden) {
  TORCH_CHECK_VALUE(!hidden.empty(), op, ": hidden must hold at least one (B, T, D) tensor, got none");
  const auto& h0 = hidden[0];
  TORCH_CHECK_VALUE(h0.dim() == 3, op, ": hidden[0] must have shape (B, T, D), got shape ", h0.sizes());
  const auto st = h0.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
                   ": hidden must be float32, float64, float16 or bfloat16, got ", py_dtype(st));
  for (size_t i = 1; i < hidden.size(); ++i) {
    const auto& h = hidden[i];
    TORCH_CHECK_VALUE(h.sizes() == h0.sizes(), op, ": every layer must have the shape of hidden[0] ", h0.sizes(),
                      ", got ", h.sizes(), " for hidden[", i, "]");
    TORCH_CHECK_TYPE(h.scalar_type() == st, op, ": every layer must have the dtype of hidden[0] (", py_dtype(st),
                     "), got ", py_dtype(h.scalar_type()), " for hidden[", i, "]");
    TORCH_CHECK(h.device() == h0.device(), op, ": every layer must be on the device of hidden[0] (", h0.device(),
                "), got ", h.device(), " for hidden[", i, "]");
  }
}

inline void check_index(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                        const char* spec, const at::Tensor& h0) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", py_dtype(t.scalar_type()));
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", spec, " = ", shape_str(shape),
                    ", got shape ", t.sizes());
  TORCH_CHECK(t.device() == h0.device(), op, ": ", name, " must be on the device of hidden (", h0.device(), "), got ",
              t.device());
}

// Dtype, shape and device of every argument are checked first and index values last, in the
// order of trajops/ops/stp_loss.py, so that an input with several faults gets the same message.
inline void check_lengths(const char* op, const c10::optional<at::Tensor>& lengths, const at::Tensor& h0) {
  if (!lengths.has_value()) return;
  check_index(op, "lengths", *lengths, {h0.size(0)}, "(B,)", h0);
}

inline void check_length_values(const char* op, const c10::optional<at::Tensor>& lengths, const at::Tensor& h0) {
  if (!lengths.has_value()) return;
  const int64_t B = h0.size(0), T = h0.size(1);
  const auto len = lengths->contiguous();
  const int64_t* l = len.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(l[b] >= 0 && l[b] <= T, op, ": lengths must be in [0, T] = [0, ", T, "], got ", l[b],
                      " for row ", b);
  }
}

// The rows of a packed batch are its N documents: triples are (n_spans, N, 3).
inline void check_triples(const char* op, const at::Tensor& triples, const at::Tensor& h0, int64_t n_rows,
                          bool packed) {
  const char* spec = packed ? "(n_spans, N, 3)" : "(n_spans, B, 3)";
  TORCH_CHECK_VALUE(triples.dim() == 3 && triples.size(0) >= 1, op, ": triples must have shape ", spec,
                    " with n_spans >= 1, got shape ", triples.sizes());
  check_index(op, "triples", triples, {triples.size(0), n_rows, 3}, spec, h0);
}

// cu_seqlens: one packed row, no lengths, then checked_cu_seqlens (shape, dtype, device, values).
// Returns the offsets (empty without cu_seqlens).
inline std::vector<int64_t> check_packed(const char* op, const at::Tensor& h0,
                                         const c10::optional<at::Tensor>& lengths,
                                         const c10::optional<at::Tensor>& cu_seqlens) {
  if (!cu_seqlens.has_value()) return {};
  TORCH_CHECK_VALUE(h0.size(0) == 1, op,
                    ": with cu_seqlens, hidden must be one packed row (1, total, D), got batch size ", h0.size(0));
  TORCH_CHECK_VALUE(!lengths.has_value(), op, ": pass either lengths or cu_seqlens, not both");
  return checked_cu_seqlens(op, *cu_seqlens, h0.size(1), h0.device());
}

// Rows of the sampled loss: row b of a padded batch (tokens b*T .. b*T + T - 1, valid prefix
// lengths[b]) or document j of a packed one (tokens cu[j] .. cu[j+1] - 1, all valid).
struct Rows {
  std::vector<int64_t> base, cap, len;  // first token, capacity, valid length
  int64_t max_cap = 0;
};

inline Rows make_rows(const std::vector<int64_t>& cu, const c10::optional<at::Tensor>& lengths, int64_t B, int64_t T) {
  Rows r;
  if (!cu.empty()) {
    const int64_t N = static_cast<int64_t>(cu.size()) - 1;
    for (int64_t j = 0; j < N; ++j) {
      r.base.push_back(cu[j]);
      r.cap.push_back(cu[j + 1] - cu[j]);
      r.max_cap = std::max(r.max_cap, cu[j + 1] - cu[j]);
    }
    r.len = r.cap;
    return r;
  }
  r.len.assign(B, T);
  if (lengths.has_value()) {
    const auto len = lengths->contiguous();
    std::copy(len.data_ptr<int64_t>(), len.data_ptr<int64_t>() + B, r.len.begin());
  }
  for (int64_t b = 0; b < B; ++b) r.base.push_back(b * T);
  r.cap.assign(B, T);
  r.max_cap = T;
  return r;
}

// Per packed position p: the end (exclusive) of its document; empty without cu_seqlens.
inline std::vector<int64_t> document_ends(const std::vector<int64_t>& cu) {
  std::vector<int64_t> ends;
  if (cu.empty()) return ends;
  ends.resize(cu.back());
  for (size_t j = 0; j + 1 < cu.size(); ++j) std::fill(ends.begin() + cu[j], ends.begin() + cu[j + 1], cu[j + 1]);
  return ends;
}

// Run after check_length_values: the lengths are then known to lie in [0, T].
inline void check_triple_values(const char* op, const at::Tensor& triples, const Rows& rows) {
  const int64_t B = static_cast<int64_t>(rows.len.size());
  const auto tri = triples.contiguous();
  const int64_t* p = tri.data_ptr<int64_t>();
  for (int64_t i = 0; i < triples.size(0); ++i) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = rows.len[b];
      if (n < 3) continue;
      const int64_t* q = p + (i * B + b) * 3;
      TORCH_CHECK_VALUE(0 <= q[0] && q[0] < q[1] && q[1] < q[2] && q[2] < n, op,
                        ": triples must satisfy 0 <= s < r < t < length for every row of length >= 3; "
                        "got (s, r, t) = (",
                        q[0], ", ", q[1], ", ", q[2], ") for span ", i, ", row ", b, " (length ", n, ")");
    }
  }
}

inline void check_grad(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                       const at::Tensor& h0) {
  const auto acc = h0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(t.scalar_type() == acc, op, ": ", name, " must be ", py_dtype(acc), ", got ",
                   py_dtype(t.scalar_type()));
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == h0.device(), op, ": ", name, " must be on the device of hidden (", h0.device(), ")");
}

inline std::vector<int64_t> row_lengths(const c10::optional<at::Tensor>& lengths, int64_t B, int64_t T) {
  std::vector<int64_t> out(B, T);
  if (lengths.has_value()) {
    const auto len = lengths->contiguous();
    std::copy(len.data_ptr<int64_t>(), len.data_ptr<int64_t>() + B, out.begin());
  }
  return out;
}

}  // namespace stp
}  // namespace trajops
