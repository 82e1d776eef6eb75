// CPU kernels of trajops::stp_loss (sampled triples) and its backward; the dense loss is in
// csrc/cpu/stp_loss_dense.cpp, the argument checks in stp_loss_checks.h, the gradient buffers in
// stp_loss_buffers.h.
//
// Semantics: trajops/reference/stp_loss.py. For a triple with a = h[r] - h[s], b = h[t] - h[r]:
// loss = 1 - a.b / (max(|a|, eps) max(|b|, eps)). The forwards write per-triple stats (|a|, |b|,
// cos) so that the backwards never redo a reduction over D. All sums are in fp32 (fp64 for fp64),
// without intermediate overflow (the per-triple math is in stp_cosine.h).
//
// Determinism without atomics: every gradient row is written by exactly one task, once. The
// sampled backward sorts each sequence's (position, span, role) entries, so repeated positions
// are summed in a fixed order in a work row; rows no triple touches are zero-filled by the same
// task.
//
// Packed sequences (cu_seqlens, hidden (1, total, D)): the sampled kernels run "row" j over
// document j (base token cu[j], length and capacity cu[j+1] - cu[j]) instead of row b (base b*T,
// capacity T).
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
using stp::Rows;
using stp::Term;
using stp::acc_type;
using stp::add_cos_grad;
using stp::check_grad;
using stp::check_hidden;
using stp::check_length_values;
using stp::check_lengths;
using stp::check_packed;
using stp::check_triple_values;
using stp::check_triples;
using stp::contiguous_all;
using stp::grad_buffer;
using stp::make_rows;
using stp::store_row;
using stp::triple_cosine;
using stp::zero_bytes;

// ---------------------------------------------------------------- sampled triples
template <typename scalar_t>
void sampled_forward(const std::vector<at::Tensor>& hidden, const int64_t* tri, const Rows& rows, int64_t S,
                     at::Tensor& loss, at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = hidden.size(), B = rows.len.size(), D = hidden[0].size(2);
  const auto& len = rows.len;
  std::vector<const scalar_t*> base(L);
  for (int64_t l = 0; l < L; ++l) base[l] = hidden[l].data_ptr<scalar_t>();
  acc_t* lo = loss.data_ptr<acc_t>();
  acc_t* st = stats.data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
  at::parallel_for(0, L * S * B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t l = i / (S * B), sb = i % (S * B), b = sb % B;
      if (len[b] < 3) continue;
      const int64_t* q = tri + sb * 3;
      const scalar_t* row = base[l] + rows.base[b] * D;
      const auto c = triple_cosine<acc_t>(row + q[0] * D, row + q[1] * D, row + q[2] * D, D);
      lo[i] = acc_t(1) - c.cos;
      st[3 * i] = c.na;
      st[3 * i + 1] = c.nb;
      st[3 * i + 2] = c.cos;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> stp_loss_cpu(at::TensorList hidden_in, const at::Tensor& triples_in,
                                                const c10::optional<at::Tensor>& lengths,
                                                const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "stp_loss";
  check_hidden(op, hidden_in);
  const auto cu = check_packed(op, hidden_in[0], lengths, cu_seqlens);
  const bool packed = cu_seqlens.has_value();
  const int64_t B = packed ? static_cast<int64_t>(cu.size()) - 1 : hidden_in[0].size(0);
  check_triples(op, triples_in, hidden_in[0], B, packed);
  check_lengths(op, lengths, hidden_in[0]);
  check_length_values(op, lengths, hidden_in[0]);
  const auto rows = make_rows(cu, lengths, hidden_in[0].size(0), hidden_in[0].size(1));
  check_triple_values(op, triples_in, rows);
  const auto hidden = contiguous_all(hidden_in);
  const auto triples = triples_in.contiguous();
  const int64_t L = hidden.size(), S = triples.size(0);
  const auto opts = hidden[0].options().dtype(acc_type(hidden[0]));
  auto loss = at::zeros({L, S, B}, opts);
  auto stats = at::zeros({L, S, B, 3}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden[0].scalar_type(), "stp_loss_cpu", [&] {
    sampled_forward<scalar_t>(hidden, triples.data_ptr<int64_t>(), rows, S, loss, stats);
  });
  return {loss, stats};
}

// One gradient contribution: span `span` touches position `pos` in role 0 (s), 1 (r) or 2 (t).
struct Entry {
  int64_t pos, span, role;
  bool operator<(const Entry& o) const {
    return pos != o.pos ? pos < o.pos : (span != o.span ? span < o.span : role < o.role);
  }
};

template <typename scalar_t>
void sampled_backward(const std::vector<at::Tensor>& hidden, const int64_t* tri, const Rows& rows, int64_t S,
                      const at::Tensor& grad_loss, const at::Tensor& stats, std::vector<at::Tensor>& grads,
                      const std::vector<bool>& zeroed) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = hidden.size(), B = rows.len.size(), D = hidden[0].size(2);
  const auto& len = rows.len;
  // Per row b: its 3S entries sorted by position (shared by all layers); inactive rows get none.
  std::vector<std::vector<Entry>> entries(B);
  for (int64_t b = 0; b < B; ++b) {
    if (len[b] < 3) continue;
    auto& e = entries[b];
    e.reserve(3 * S);
    for (int64_t i = 0; i < S; ++i)
      for (int64_t k = 0; k < 3; ++k) e.push_back({tri[(i * B + b) * 3 + k], i, k});
    std::sort(e.begin(), e.end());
  }
  // Coefficients of every (layer, span, row): the only math that needs the stats.
  std::vector<CosGrad<acc_t>> coef(L * S * B);
  const acc_t* gl = grad_loss.data_ptr<acc_t>();
  const acc_t* st = stats.data_ptr<acc_t>();
  for (int64_t i = 0; i < L * S * B; ++i) {
    if (len[i % B] >= 3) coef[i] = CosGrad<acc_t>(st[3 * i], st[3 * i + 1], st[3 * i + 2], -gl[i]);
  }
  // Tasks: (layer, row, chunk of positions). Each writes its chunk of gradient rows exactly once.
  // Every token belongs to exactly one row (padded: row b's T tokens; packed: one document), so
  // the tasks together write the whole gradient. Chunks past a short document's end do nothing.
  const int64_t chunk = 64;
  const int64_t per_seq = (rows.max_cap + chunk - 1) / chunk;
  at::parallel_for(0, L * B * per_seq, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> work(D), zeros(D, acc_t(0));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task / (B * per_seq), b = (task / per_seq) % B, c = task % per_seq;
      const int64_t p0 = c * chunk, p1 = std::min(rows.cap[b], p0 + chunk);
      if (p0 >= p1) continue;
      const scalar_t* hrow = hidden[l].data_ptr<scalar_t>() + rows.base[b] * D;
      scalar_t* grow = grads[l].data_ptr<scalar_t>() + rows.base[b] * D;
      const auto& e = entries[b];
      auto it = std::lower_bound(e.begin(), e.end(), Entry{p0, -1, -1});
      int64_t p = p0;  // first row of the chunk not yet written
      while (it != e.end() && it->pos < p1) {
        const int64_t pos = it->pos;
        if (pos > p && !zeroed[l]) zero_bytes(grow + p * D, (pos - p) * D * sizeof(scalar_t));
        std::fill(work.begin(), work.end(), acc_t(0));
        for (; it != e.end() && it->pos == pos; ++it) {
          const int64_t* q = tri + (it->span * B + b) * 3;
          const auto& cg = coef[(l * S + it->span) * B + b];
          const scalar_t *x0 = hrow + q[0] * D, *x1 = hrow + q[1] * D, *x2 = hrow + q[2] * D;
          // d/dh[s] = -d/da, d/dh[r] = d/da - d/db, d/dh[t] = d/db.
          if (it->role == 0) {
            add_cos_grad<Term::kMinusGa>(work.data(), x0, x1, x2, cg, D);
          } else if (it->role == 1) {
            add_cos_grad<Term::kGaMinusGb>(work.data(), x0, x1, x2, cg, D);
          } else {
            add_cos_grad<Term::kGb>(work.data(), x0, x1, x2, cg, D);
          }
        }
        store_row(grow + pos * D, work.data(), zeros.data(), D);
        p = pos + 1;
      }
      if (p1 > p && !zeroed[l]) zero_bytes(grow + p * D, (p1 - p) * D * sizeof(scalar_t));
    }
  });
}

std::vector<at::Tensor> stp_loss_backward_cpu(const at::Tensor& grad_loss_in, const at::Tensor& stats_in,
                                              at::TensorList hidden_in, const at::Tensor& triples_in,
                                              const c10::optional<at::Tensor>& lengths,
                                              const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "stp_loss_backward";
  check_hidden(op, hidden_in);
  const auto cu = check_packed(op, hidden_in[0], lengths, cu_seqlens);
  const bool packed = cu_seqlens.has_value();
  const int64_t B = packed ? static_cast<int64_t>(cu.size()) - 1 : hidden_in[0].size(0);
  check_triples(op, triples_in, hidden_in[0], B, packed);
  check_lengths(op, lengths, hidden_in[0]);
  const int64_t L = hidden_in.size(), S = triples_in.size(0), T = hidden_in[0].size(1);
  check_grad(op, "grad_loss", grad_loss_in, {L, S, B}, hidden_in[0]);
  check_grad(op, "stats", stats_in, {L, S, B, 3}, hidden_in[0]);
  check_length_values(op, lengths, hidden_in[0]);
  const auto rows = make_rows(cu, lengths, hidden_in[0].size(0), T);
  check_triple_values(op, triples_in, rows);
  const auto hidden = contiguous_all(hidden_in);
  const auto triples = triples_in.contiguous();
  std::vector<at::Tensor> grads;
  std::vector<bool> zeroed;
  for (const auto& h : hidden) {
    auto buf = grad_buffer(h, /*hugepages=*/false);  // mostly untouched: keep 4 KiB pages
    grads.push_back(buf.first);
    zeroed.push_back(buf.second);
  }
  if (hidden[0].numel() == 0 || B == 0) {
    for (size_t l = 0; l < grads.size(); ++l)
      if (!zeroed[l]) grads[l].zero_();  // packed with no document: nothing writes the buffer
    return grads;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden[0].scalar_type(), "stp_loss_backward_cpu", [&] {
    sampled_backward<scalar_t>(hidden, triples.data_ptr<int64_t>(), rows, S, grad_loss_in.contiguous(),
                               stats_in.contiguous(), grads, zeroed);
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(trajops, CPU, m) {
  m.impl("stp_loss", &stp_loss_cpu);
  m.impl("stp_loss_backward", &stp_loss_backward_cpu);
}

}  // namespace trajops
