// CPU kernels of trajops::temperature_attention_varlen and its backward: temperature attention on
// packed documents (cu_seqlens offsets, conventions in trajops/varlen.py and varlen.h).
//
// Semantics: trajops/ops/temperature_attention_varlen.py (document j's rows are the dense op on its
// own rows). So the kernel is the dense CPU kernel (temperature_attention.cpp: ATen's fused flash
// kernel on pre-scaled queries, the NaN/Inf rule included) run on each document's views: q rows
// [cu_q[j], cu_q[j+1]) seen as a (1, Hq, Lq, D) batch, no copy. A document's keys never meet
// another's queries by construction, and the per-document bottom-right causal alignment is the
// dense kernel's own. A document without queries is skipped (its keys get zero gradients); one
// without keys gives out 0, lse -inf.
// Threads: large documents run one after the other, each using every thread; small ones (less than
// kSmallWork query-key-head triples) run side by side, one document per thread (the dense kernel is
// then serial: ATen runs a parallel_for nested in a parallel region inline). Running every small
// document with all threads costs a few thread barriers each, and on a busy machine a barrier
// waits for a descheduled thread: measured 2026-12-04, 2 cores under load ~9, 64 documents of 128
// tokens (H8 D64 causal fp32): 5.3 s that way against 0.16 s on one thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"
#include "temperature_attention.h"
#include "varlen.h"

namespace trajops {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;
constexpr const char* kOp = "temperature_attention_varlen";
constexpr int64_t kSmallWork = int64_t{1} << 20;  // Lq * Lk * Hq below this: one thread per document

at::ScalarType compute_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

int64_t longest(const std::vector<int64_t>& offs) {
  int64_t m = 0;
  for (size_t j = 1; j < offs.size(); ++j) m = std::max(m, offs[j] - offs[j - 1]);
  return m;
}

// Messages match trajops/ops/temperature_attention_varlen.py so every backend fails the same way.
// Returns the offsets of q's and k's documents.
std::pair<std::vector<int64_t>, std::vector<int64_t>> check(const Tensor& q, const Tensor& k, const Tensor& v,
                                                            const Tensor& tau, const Tensor& cu_q,
                                                            const Tensor& cu_k, int64_t max_q, int64_t max_k,
                                                            c10::optional<double> scale) {
  check_qkv(kOp, q, k, v, tau, 3, "(total, H, D) (packed tokens)");
  const auto total_q = q.size(0), Hq = q.size(1), D = q.size(2);
  const auto total_k = k.size(0), Hkv = k.size(1);
  TORCH_CHECK_VALUE(Hkv >= 1 && v.size(1) == Hkv && Hq % Hkv == 0, kOp,
                    ": k and v must have the same number of heads Hkv >= 1 dividing q's Hq, got Hq=", Hq, ", k ",
                    k.sizes(), " and v ", v.sizes());
  TORCH_CHECK_VALUE(v.size(0) == total_k, kOp, ": k and v must have one number of packed tokens total_k, got k ",
                    k.sizes(), " and v ", v.sizes());
  TORCH_CHECK_VALUE(k.size(2) == D && D >= 1, kOp, ": q and k must have one head size D >= 1, got q ", q.sizes(),
                    " and k ", k.sizes());
  TORCH_CHECK_VALUE(v.size(2) >= 1, kOp, ": v must have a head size >= 1, got ", v.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(tau.scalar_type()), kOp, ": tau must be a floating-point tensor, got ",
                   py_dtype(tau.scalar_type()));
  const std::vector<int64_t> rows{total_q, Hq};
  TORCH_CHECK_VALUE(broadcastable(tau.sizes(), rows), kOp, ": tau must be broadcastable to (total_q, Hq) = ",
                    shape_str(rows), ", got shape ", tau.sizes());
  auto offs_q = checked_cu_seqlens(kOp, cu_q, total_q, q.device(), "cu_seqlens_q");
  auto offs_k = checked_cu_seqlens(kOp, cu_k, total_k, q.device(), "cu_seqlens_k");
  TORCH_CHECK_VALUE(offs_q.size() == offs_k.size(), kOp,
                    ": cu_seqlens_q and cu_seqlens_k must have one length N + 1 (N documents), got ", offs_q.size(),
                    " and ", offs_k.size());
  const std::tuple<const char*, int64_t, const std::vector<int64_t>*> maxes[] = {{"max_seqlen_q", max_q, &offs_q},
                                                                                 {"max_seqlen_k", max_k, &offs_k}};
  for (const auto& [name, m, offs] : maxes) {
    TORCH_CHECK_VALUE(m >= 0, kOp, ": ", name, " must be >= 0, got ", m);
    const int64_t l = longest(*offs);
    TORCH_CHECK_VALUE(m >= l, kOp, ": ", name, " must be at least the longest document's length ", l, ", got ", m);
  }
  if (scale.has_value())
    TORCH_CHECK_VALUE(std::isfinite(*scale) && *scale > 0, kOp, ": scale must be a finite number > 0, got ",
                      py_float(*scale));
  return {std::move(offs_q), std::move(offs_k)};
}

// Runs doc(j) for every document j with queries and keys: large ones in turn (each parallel inside),
// then the small ones spread over the threads (each serial inside); see the file comment.
template <typename F>
void for_each_document(const std::vector<int64_t>& offs_q, const std::vector<int64_t>& offs_k, int64_t Hq,
                       const F& doc) {
  std::vector<size_t> small;
  for (size_t j = 0; j + 1 < offs_q.size(); ++j) {
    const int64_t lq = offs_q[j + 1] - offs_q[j], lk = offs_k[j + 1] - offs_k[j];
    if (lq == 0 || lk == 0) continue;  // no rows, or rows without keys: their outputs are as allocated
    if (lq * lk * Hq >= kSmallWork) {
      doc(j);
    } else {
      small.push_back(j);
    }
  }
  // Worker threads do not inherit the caller's thread-local state (the dispatch keys that keep
  // autograd out of a kernel's inner ops, grad mode...): carried over explicitly, as at::launch does.
  const at::ThreadLocalState state;
  at::parallel_for(0, static_cast<int64_t>(small.size()), 1, [&](int64_t lo, int64_t hi) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t i = lo; i < hi; ++i) doc(small[i]);
  });
}

// Rows [start, start + len) of a packed (total, H, X) tensor as a (1, H, len, X) batch (a view).
Tensor doc4(const Tensor& t, int64_t start, int64_t len) {
  return t.narrow(0, start, len).transpose(0, 1).unsqueeze(0);
}

// Rows [start, start + len) of a (total, H) tensor as (1, H, len) (a view).
Tensor doc3(const Tensor& t, int64_t start, int64_t len) { return t.narrow(0, start, len).t().unsqueeze(0); }

std::tuple<Tensor, Tensor> temperature_attention_varlen_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                            const Tensor& tau, const Tensor& cu_seqlens_q,
                                                            const Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                            int64_t max_seqlen_k, bool causal,
                                                            c10::optional<double> scale) {
  const auto [offs_q, offs_k] = check(q, k, v, tau, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  const auto total_q = q.size(0), Hq = q.size(1), Dv = v.size(2);
  const auto cd = compute_dtype(q.scalar_type());
  auto out = at::zeros({total_q, Hq, Dv}, q.options());
  auto lse = at::full({total_q, Hq}, -std::numeric_limits<double>::infinity(), q.options().dtype(cd));
  // tau in the compute dtype, as every row sees it: the dense kernel forms scale / tau there too.
  const auto tau_rows = tau.to(cd).expand({total_q, Hq});
  for_each_document(offs_q, offs_k, Hq, [&](size_t j) {
    const int64_t sq = offs_q[j], lq = offs_q[j + 1] - sq, sk = offs_k[j], lk = offs_k[j + 1] - sk;
    auto [o, l] = temperature_attention_cpu(doc4(q, sq, lq), doc4(k, sk, lk), doc4(v, sk, lk),
                                            doc3(tau_rows, sq, lq), c10::nullopt, causal, scale);
    doc4(out, sq, lq).copy_(o);  // documents own disjoint rows: no two threads write one element
    doc3(lse, sq, lq).copy_(l);
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> temperature_attention_varlen_backward_cpu(
    const Tensor& grad_out, const OptTensor& grad_lse, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& tau, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, c10::optional<double> scale, const Tensor& out, const Tensor& lse) {
  const auto [offs_q, offs_k] = check(q, k, v, tau, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  const auto total_q = q.size(0), Hq = q.size(1), Dv = v.size(2);
  const auto cd = compute_dtype(q.scalar_type());
  const std::vector<int64_t> out_shape{total_q, Hq, Dv}, rows{total_q, Hq};
  check_like(kOp, "grad_out", grad_out, out_shape, q.scalar_type(), q);
  check_like(kOp, "out", out, out_shape, q.scalar_type(), q);
  check_like(kOp, "lse", lse, rows, cd, q);
  if (grad_lse.has_value()) check_like(kOp, "grad_lse", *grad_lse, rows, c10::nullopt, q);
  // Every output is contiguous and zero where no document row reaches it (keys of documents
  // without queries, rows without keys).
  auto dq = at::zeros(q.sizes(), q.options());
  auto dk = at::zeros(k.sizes(), k.options());
  auto dv = at::zeros(v.sizes(), v.options());
  auto dtau_rows = at::zeros({total_q, Hq}, q.options().dtype(cd));
  const auto tau_rows = tau.to(cd).expand({total_q, Hq});
  for_each_document(offs_q, offs_k, Hq, [&](size_t j) {
    const int64_t sq = offs_q[j], lq = offs_q[j + 1] - sq, sk = offs_k[j], lk = offs_k[j + 1] - sk;
    OptTensor gl;
    if (grad_lse.has_value()) gl = doc3(*grad_lse, sq, lq);
    auto [dqj, dkj, dvj, dtj] = temperature_attention_backward_cpu(
        doc4(grad_out, sq, lq), gl, doc4(q, sq, lq), doc4(k, sk, lk), doc4(v, sk, lk), doc3(tau_rows, sq, lq),
        c10::nullopt, causal, scale, doc4(out, sq, lq), doc3(lse, sq, lq));
    doc4(dq, sq, lq).copy_(dqj);
    doc4(dk, sk, lk).copy_(dkj);
    doc4(dv, sk, lk).copy_(dvj);
    doc3(dtau_rows, sq, lq).copy_(dtj.expand({1, Hq, lq}));
  });
  // per-row dtau summed to tau's own shape (deterministic), as the reference does
  auto dtau = at::sum_to(dtau_rows, tau.sizes()).to(tau.scalar_type()).contiguous();
  return {dq, dk, dv, dtau};
}

}  // namespace

TORCH_LIBRARY_IMPL(trajops, CPU, m) {
  m.impl("temperature_attention_varlen", &temperature_attention_varlen_cpu);
  m.impl("temperature_attention_varlen_backward", &temperature_attention_varlen_backward_cpu);
}

}  // namespace trajops
