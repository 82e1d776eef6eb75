// CPU kernels of trajops::stp_loss_dense (every consecutive triple) and its backward; the sampled
// loss is in csrc/cpu/stp_loss.cpp, the argument checks in stp_loss_checks.h, the gradient buffers
// in stp_loss_buffers.h.
//
// Semantics: trajops/reference/stp_loss.py. For a triple with a = h[r] - h[s], b = h[t] - h[r]:
// loss = 1 - a.b / (max(|a|, eps) max(|b|, eps)). The forwards write per-triple stats (|a|, |b|,
// cos) so that the backwards never redo a reduction over D. All sums are in fp32 (fp64 for fp64),
// without intermediate overflow (the per-triple math is in stp_cosine.h).
//
//
// Determinism without atomics: every gradient row is written by exactly one task, once. The
// dense backward computes dh[p] = gd[p-1] - gd[p] from a rolling window of steps.
//
// Packed sequences (cu_seqlens, hidden (1, total, D)): the dense kernels run the one packed row
// with each position's document end, a triple (p, p+1, p+2) or a step (q, q+1) existing only
// inside one document.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "stp_cosine.h"
#include "stp_loss_buffers.h"
#include "stp_loss_checks.h"

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace trajops {
namespace {

using stp::CosGrad;
using stp::Term;
using stp::acc_type;
using stp::add_cos_grad;
using stp::check_grad;
using stp::check_hidden;
using stp::check_length_values;
using stp::check_lengths;
using stp::check_packed;
using stp::contiguous_all;
using stp::document_ends;
using stp::grad_buffer;
using stp::row_lengths;
using stp::step_norm;
using stp::store_row;
using stp::triple_cosine;
using stp::zero_bytes;

// ---------------------------------------------------------------- dense (every consecutive triple)
template <typename scalar_t>
void dense_forward(const std::vector<at::Tensor>& hidden, const std::vector<int64_t>& len,
                   const std::vector<int64_t>& ends, at::Tensor& loss, at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = hidden.size(), B = hidden[0].size(0), T = hidden[0].size(1), D = hidden[0].size(2);
  const int64_t P = std::max<int64_t>(T - 2, 0), Q = std::max<int64_t>(T - 1, 0);
  acc_t* lo = loss.data_ptr<acc_t>();
  acc_t* st = stats.data_ptr<acc_t>();
  const int64_t chunk = 64;
  const int64_t per_seq = (Q + chunk - 1) / chunk;
  at::parallel_for(0, L * B * per_seq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task / (B * per_seq), b = (task / per_seq) % B, c = task % per_seq;
      const int64_t nq = std::max<int64_t>(len[b] - 1, 0);  // valid steps q: q + 1 < len
      const int64_t q0 = c * chunk, q1 = std::min(nq, q0 + chunk);
      const scalar_t* x = hidden[l].data_ptr<scalar_t>() + b * T * D;
      acc_t* s = st + (l * B + b) * Q * 2;
      acc_t* lrow = lo + (l * B + b) * P;
      // Triple q supplies |d_q| and its cosine; the last valid step has no triple of its own.
      // Packed: a triple or a step that leaves its document does not exist (stats stay 0).
      for (int64_t q = q0; q < q1; ++q) {
        if (!ends.empty() && q + 1 >= ends[q]) continue;
        if (q + 1 < nq && (ends.empty() || q + 2 < ends[q])) {
          const auto cs = triple_cosine<acc_t>(x + q * D, x + (q + 1) * D, x + (q + 2) * D, D);
          s[2 * q] = cs.na;
          s[2 * q + 1] = cs.cos;
          lrow[q] = acc_t(1) - cs.cos;
        } else {
          s[2 * q] = step_norm<acc_t>(x + q * D, x + (q + 1) * D, D);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> stp_loss_dense_cpu(at::TensorList hidden_in,
                                                      const c10::optional<at::Tensor>& lengths,
                                                      const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "stp_loss_dense";
  check_hidden(op, hidden_in);
  const auto ends = document_ends(check_packed(op, hidden_in[0], lengths, cu_seqlens));
  check_lengths(op, lengths, hidden_in[0]);
  check_length_values(op, lengths, hidden_in[0]);
  const auto hidden = contiguous_all(hidden_in);
  const int64_t L = hidden.size(), B = hidden[0].size(0), T = hidden[0].size(1);
  const int64_t P = std::max<int64_t>(T - 2, 0), Q = std::max<int64_t>(T - 1, 0);
  const auto opts = hidden[0].options().dtype(acc_type(hidden[0]));
  auto loss = at::zeros({L, B, P}, opts);
  auto stats = at::zeros({L, B, Q, 2}, opts);
  const auto len = row_lengths(lengths, B, T);
  if (L * B * Q == 0) return {loss, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden[0].scalar_type(), "stp_loss_dense_cpu", [&] {
    dense_forward<scalar_t>(hidden, len, ends, loss, stats);
  });
  return {loss, stats};
}

template <typename scalar_t>
void dense_backward(const std::vector<at::Tensor>& hidden, const std::vector<int64_t>& len,
                    const std::vector<int64_t>& ends, const at::Tensor& grad_loss, const at::Tensor& stats,
                    std::vector<at::Tensor>& grads) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = hidden.size(), B = hidden[0].size(0), T = hidden[0].size(1), D = hidden[0].size(2);
  const int64_t P = std::max<int64_t>(T - 2, 0), Q = std::max<int64_t>(T - 1, 0);
  const acc_t* gl = grad_loss.data_ptr<acc_t>();
  const acc_t* st = stats.data_ptr<acc_t>();
  const int64_t chunk = 64;
  const int64_t per_seq = (T + chunk - 1) / chunk;
  at::parallel_for(0, L * B * per_seq, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gprev(D), gcur(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task / (B * per_seq), b = (task / per_seq) % B, c = task % per_seq;
      const int64_t np = std::max<int64_t>(len[b] - 2, 0);  // valid triples p < np
      const int64_t p0 = c * chunk, p1 = std::min(T, p0 + chunk);
      const scalar_t* x = hidden[l].data_ptr<scalar_t>() + b * T * D;
      scalar_t* g = grads[l].data_ptr<scalar_t>() + b * T * D;
      const acc_t* s = st + (l * B + b) * Q * 2;
      const acc_t* glr = gl + (l * B + b) * P;
      auto coef = [&](int64_t p) {  // triple p: a = d_p, b = d_{p+1}
        return CosGrad<acc_t>(s[2 * p], s[2 * p + 2], s[2 * p + 1], -glr[p]);
      };
      // gd[q] = d loss / d step q = ga of triple q (its a) + gb of triple q - 1 (its b), counting
      // only valid triples p < np; dh[p] = gd[p-1] - gd[p]. Invalid triples are skipped, so padding
      // past a row's length is never read (a NaN there cannot leak in as 0 * NaN).
      // Packed: triple p exists only inside one document (p + 2 < its end).
      auto valid = [&](int64_t p) { return p >= 0 && p < np && (ends.empty() || p + 2 < ends[p]); };
      auto step_grad = [&](int64_t q, acc_t* out) {
        std::fill(out, out + D, acc_t(0));
        if (valid(q)) {
          add_cos_grad<Term::kGa>(out, x + q * D, x + (q + 1) * D, x + (q + 2) * D, coef(q), D);
        }
        if (valid(q - 1)) {
          add_cos_grad<Term::kGb>(out, x + (q - 1) * D, x + q * D, x + (q + 1) * D, coef(q - 1), D);
        }
      };
      const int64_t pend = std::min(p1, np + 2);  // rows from np + 2 on get no gradient
      if (p0 < pend) {
        if (p0 > 0) {
          step_grad(p0 - 1, gprev.data());
        } else {
          std::fill(gprev.begin(), gprev.end(), acc_t(0));
        }
        for (int64_t p = p0; p < pend; ++p) {
          step_grad(p, gcur.data());
          store_row(g + p * D, gprev.data(), gcur.data(), D);
          std::swap(gprev, gcur);
        }
      }
      const int64_t z0 = std::max(p0, pend);
      if (p1 > z0) zero_bytes(g + z0 * D, (p1 - z0) * D * sizeof(scalar_t));
    }
  });
}

std::vector<at::Tensor> stp_loss_dense_backward_cpu(const at::Tensor& grad_loss_in, const at::Tensor& stats_in,
                                                    at::TensorList hidden_in,
                                                    const c10::optional<at::Tensor>& lengths,
                                                    const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "stp_loss_dense_backward";
  check_hidden(op, hidden_in);
  const auto ends = document_ends(check_packed(op, hidden_in[0], lengths, cu_seqlens));
  check_lengths(op, lengths, hidden_in[0]);
  const int64_t L = hidden_in.size(), B = hidden_in[0].size(0), T = hidden_in[0].size(1), D = hidden_in[0].size(2);
  const int64_t P = std::max<int64_t>(T - 2, 0), Q = std::max<int64_t>(T - 1, 0);
  check_grad(op, "grad_loss", grad_loss_in, {L, B, P}, hidden_in[0]);
  check_grad(op, "stats", stats_in, {L, B, Q, 2}, hidden_in[0]);
  check_length_values(op, lengths, hidden_in[0]);
  const auto hidden = contiguous_all(hidden_in);
  const auto len = row_lengths(lengths, B, T);
  std::vector<at::Tensor> grads;
  for (const auto& h : hidden) grads.push_back(grad_buffer(h, /*hugepages=*/true).first);  // written in full
  if (B * T * D == 0) return grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden[0].scalar_type(), "stp_loss_dense_backward_cpu",
                                  [&] { dense_backward<scalar_t>(hidden, len, ends, grad_loss_in.contiguous(),
                                                                 stats_in.contiguous(), grads); });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(trajops, CPU, m) {
  m.impl("stp_loss_dense", &stp_loss_dense_cpu);
  m.impl("stp_loss_dense_backward", &stp_loss_dense_backward_cpu);
}

}  // namespace trajops
