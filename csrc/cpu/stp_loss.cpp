// CPU kernels of trajops::stp_loss, trajops::stp_loss_dense and their backwards.
//
// Semantics: trajops/reference/stp_loss.py. For a triple with a = h[r] - h[s], b = h[t] - h[r]:
// loss = 1 - a.b / (max(|a|, eps) max(|b|, eps)). The forwards write per-triple stats (|a|, |b|,
// cos) so that the backwards never redo a reduction over D. All sums are in fp32 (fp64 for fp64),
// without intermediate overflow (the per-triple math is in stp_cosine.h).
//
// Determinism without atomics: every gradient row is written by exactly one task, once. The
// sampled backward sorts each sequence's (position, span, role) entries, so repeated positions
// are summed in a fixed order in a work row; rows no triple touches are zero-filled by the same
// task. The dense backward computes dh[p] = gd[p-1] - gd[p] from a rolling window of steps.
//
// Packed sequences (cu_seqlens, hidden (1, total, D)): the sampled kernels run "row" j over
// document j (base token cu[j], length and capacity cu[j+1] - cu[j]) instead of row b (base b*T,
// capacity T); the dense kernels run the one packed row with each position's document end, a
// triple (p, p+1, p+2) or a step (q, q+1) existing only inside one document.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "common.h"
#include "py_format.h"
#include "stp_cosine.h"
#include "varlen.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace trajops {
namespace {

using stp::CosGrad;
using stp::Term;
using stp::add_cos_grad;
using stp::step_norm;
using stp::triple_cosine;

// ---------------------------------------------------------------- checks
// Messages match trajops/ops/stp_loss.py so every backend fails the same way.
void check_hidden(const char* op, at::TensorList hidden) {
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

void check_index(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape, const char* spec,
                 const at::Tensor& h0) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", py_dtype(t.scalar_type()));
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", spec, " = ", shape_str(shape),
                    ", got shape ", t.sizes());
  TORCH_CHECK(t.device() == h0.device(), op, ": ", name, " must be on the device of hidden (", h0.device(), "), got ",
              t.device());
}

// Dtype, shape and device of every argument are checked first and index values last, in the
// order of trajops/ops/stp_loss.py, so that an input with several faults gets the same message.
void check_lengths(const char* op, const c10::optional<at::Tensor>& lengths, const at::Tensor& h0) {
  if (!lengths.has_value()) return;
  check_index(op, "lengths", *lengths, {h0.size(0)}, "(B,)", h0);
}

void check_length_values(const char* op, const c10::optional<at::Tensor>& lengths, const at::Tensor& h0) {
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
void check_triples(const char* op, const at::Tensor& triples, const at::Tensor& h0, int64_t n_rows, bool packed) {
  const char* spec = packed ? "(n_spans, N, 3)" : "(n_spans, B, 3)";
  TORCH_CHECK_VALUE(triples.dim() == 3 && triples.size(0) >= 1, op, ": triples must have shape ", spec,
                    " with n_spans >= 1, got shape ", triples.sizes());
  check_index(op, "triples", triples, {triples.size(0), n_rows, 3}, spec, h0);
}

// cu_seqlens: one packed row, no lengths, then checked_cu_seqlens (shape, dtype, device, values).
// Returns the offsets (empty without cu_seqlens).
std::vector<int64_t> check_packed(const char* op, const at::Tensor& h0, const c10::optional<at::Tensor>& lengths,
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

Rows make_rows(const std::vector<int64_t>& cu, const c10::optional<at::Tensor>& lengths, int64_t B, int64_t T) {
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
std::vector<int64_t> document_ends(const std::vector<int64_t>& cu) {
  std::vector<int64_t> ends;
  if (cu.empty()) return ends;
  ends.resize(cu.back());
  for (size_t j = 0; j + 1 < cu.size(); ++j) std::fill(ends.begin() + cu[j], ends.begin() + cu[j + 1], cu[j + 1]);
  return ends;
}

// Run after check_length_values: the lengths are then known to lie in [0, T].
void check_triple_values(const char* op, const at::Tensor& triples, const Rows& rows) {
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

void check_grad(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& h0) {
  const auto acc = h0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(t.scalar_type() == acc, op, ": ", name, " must be ", py_dtype(acc), ", got ",
                   py_dtype(t.scalar_type()));
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == h0.device(), op, ": ", name, " must be on the device of hidden (", h0.device(), ")");
}

// ---------------------------------------------------------------- helpers
std::vector<int64_t> row_lengths(const c10::optional<at::Tensor>& lengths, int64_t B, int64_t T) {
  std::vector<int64_t> out(B, T);
  if (lengths.has_value()) {
    const auto len = lengths->contiguous();
    std::copy(len.data_ptr<int64_t>(), len.data_ptr<int64_t>() + B, out.begin());
  }
  return out;
}

std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

at::ScalarType acc_type(const at::Tensor& h) { return h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Zeroes `bytes` bytes. Large spans use streaming stores: the gradient is write-only here, and
// ordinary stores would first read every cache line they fill (a hidden second pass over memory).
void zero_bytes(void* dst, size_t bytes) {
#if defined(__SSE2__)
  if (bytes >= (size_t{1} << 14)) {
    char* p = static_cast<char*>(dst);
    const size_t head = (16 - (reinterpret_cast<uintptr_t>(p) & 15)) & 15;
    std::memset(p, 0, head);
    p += head;
    bytes -= head;
    const __m128i z = _mm_setzero_si128();
    const size_t n = bytes / 16;
    for (size_t i = 0; i < n; ++i) _mm_stream_si128(reinterpret_cast<__m128i*>(p) + i, z);
    std::memset(p + n * 16, 0, bytes - n * 16);
    _mm_sfence();
    return;
  }
#endif
  std::memset(dst, 0, bytes);
}

// A gradient buffer shaped like h. Large ones are fresh anonymous mappings: the kernel hands out
// zero pages lazily (calloc semantics, as numpy.zeros), so a gradient that is zero except for a
// few touched rows costs page faults for those rows only, where at::zeros would fault in and then
// write every page. `hugepages` asks for 2 MiB pages for outputs that are written in full (one
// fault per 2 MiB instead of per 4 KiB). Returns whether the buffer is known to be zero.
// Such buffers bypass the c10 CPU allocator, so torch.profiler's memory events do not see them.
std::pair<at::Tensor, bool> grad_buffer(const at::Tensor& h, bool hugepages) {
#if defined(__linux__)
  const size_t bytes = static_cast<size_t>(h.numel()) * h.element_size();
  if (bytes >= (size_t{4} << 20)) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED) {
#if defined(MADV_HUGEPAGE)
      if (hugepages) madvise(p, bytes, MADV_HUGEPAGE);
#endif
      auto t = at::from_blob(p, h.sizes(), [bytes](void* q) { munmap(q, bytes); }, h.options());
      return {t, true};
    }
  }
#endif
  return {at::empty_like(h, at::MemoryFormat::Contiguous), false};
}

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

template <typename acc_t, typename scalar_t>
inline void store_row(scalar_t* out, const acc_t* a, const acc_t* b, int64_t D) {  // out = a - b
#pragma omp simd
  for (int64_t k = 0; k < D; ++k) out[k] = static_cast<scalar_t>(a[k] - b[k]);
}

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
  m.impl("stp_loss", &stp_loss_cpu);
  m.impl("stp_loss_backward", &stp_loss_backward_cpu);
  m.impl("stp_loss_dense", &stp_loss_dense_cpu);
  m.impl("stp_loss_dense_backward", &stp_loss_dense_backward_cpu);
}

}  // namespace trajops
