// CPU kernels of trajops::temperature_attention and its backward.
//
// Semantics: trajops/reference/temperature_attention.py. With c = scale / tau per query row,
// softmax(c q k^T) v is flash attention on the pre-scaled queries q' = c q with scale 1, so the CPU
// kernel is ATen's own fused flash kernel (_scaled_dot_product_flash_attention_for_cpu: blocked,
// online softmax, BLAS GEMM tiles, never materializes the (Tq, Tk) scores) called on q'. Its
// backward gives dq'; then dq = c dq' and dtau = -(q . dq) / tau, an epilogue over (B, Hq, Tq) rows.
// Why not our own C++ kernel: that kernel is the one F.scaled_dot_product_attention runs on CPU, so
// this path is by construction as fast as the SDPA composite (the target); the benchmark
// (bench/bench_temperature_attention.py) also measures it against a GEMM of equal FLOPs, which
// bounds what any hand-written kernel could gain.
//
// What the ATen kernel lacks, and how it is bridged:
//   - bool masks and bottom-right causal: turned into one additive (0 / -inf) mask of the mask's
//     own broadcast shape; plain is_causal when Tq = Tk and there is no mask;
//   - rows with no allowed key: ATen returns out 0 and lse 0; we return lse -inf, and zero c there
//     so that a bad tau on an empty row cannot put NaN into the gradients;
//   - Dv != D: zero columns pad the smaller head size (they change no logit and no output);
//   - a head dimension without unit stride: copied (the private op assumes it; see pad_head);
//   - the gradient of lse: ATen's backward uses out only through delta = rowsum(dO * O). One extra
//     head column with v = 0, dO = 1 and O = -grad_lse turns delta into delta - grad_lse, which is
//     exactly the lse term of dS = P * (dP - delta + grad_lse), and changes nothing else;
//   - NaN/Inf (the rule is in the reference's docstring): ATen turns a row whose scores are all NaN
//     into out 0 / lse 0, lets the NaN of a bad tau leak into other rows' gradients, and multiplies
//     the zero weight of a masked key by its v (0 * NaN = NaN leaks into rows that may not see it).
//     So ATen only ever sees finite data: bad rows (c not finite, a non-finite q row, or an allowed
//     key whose k or v row is not finite) run with c = 0; non-finite q, k, v elements are replaced by
//     0 in copies; the rule's NaNs are written afterwards (out and lse of bad rows; in the backward,
//     dq and dtau of bad rows and of rows with a non-finite grad_out row / grad_lse, and the dk, dv
//     rows of every key such a row may attend).
//     Cost on finite inputs: one read of q and k and one of the output (all_finite: bit tests that
//     vectorize, no allocation) in the forward -- v is checked through the output, which a
//     non-finite v that matters always reaches -- and one read of q, k, v and dO in the backward,
//     plus O(B Hq Tq) flag work. That is small next to attention except for very short query
//     blocks: with Tq = 1 (decode; use paged_temperature_attention there) the read of k is half the
//     attention's own read of K and V: B8 H8 Tk4096 D64 fp32 forward, one thread, 9.4 -> 12.9 ms. Only
//     hostile inputs pay for the copies, a second ATen call when v is not finite, and the flags of
//     the keys each row may attend (a (B, Hq, Tq, Tk) bool reduction under a mask).
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common.h"
#include "temperature_attention.h"

namespace trajops {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;
constexpr const char* kOp = "temperature_attention";

// ---------------------------------------------------------------- checks
// Messages match trajops/ops/temperature_attention.py so every backend fails the same way.
void check(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& tau, const OptTensor& mask,
           c10::optional<double> scale) {
  check_qkv(kOp, q, k, v, tau, 4, "(B, H, T, D)");
  const auto B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  const auto Hkv = k.size(1), Tk = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && v.size(0) == B, kOp, ": q, k and v must have one batch size, got ", B, ", ",
                    k.size(0), " and ", v.size(0));
  TORCH_CHECK_VALUE(Hkv >= 1 && v.size(1) == Hkv && Hq % Hkv == 0, kOp,
                    ": k and v must have the same number of heads Hkv >= 1 dividing q's Hq, got Hq=", Hq, ", k ",
                    k.sizes(), " and v ", v.sizes());
  TORCH_CHECK_VALUE(v.size(2) == Tk, kOp, ": k and v must have one length Tk, got k ", k.sizes(), " and v ",
                    v.sizes());
  TORCH_CHECK_VALUE(k.size(3) == D && D >= 1, kOp, ": q and k must have one head size D >= 1, got q ", q.sizes(),
                    " and k ", k.sizes());
  TORCH_CHECK_VALUE(v.size(3) >= 1, kOp, ": v must have a head size >= 1, got ", v.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(tau.scalar_type()), kOp, ": tau must be a floating-point tensor, got ",
                   py_dtype(tau.scalar_type()));
  const std::vector<int64_t> rows{B, Hq, Tq};
  TORCH_CHECK_VALUE(broadcastable(tau.sizes(), rows), kOp, ": tau must be broadcastable to (B, Hq, Tq) = ",
                    shape_str(rows), ", got shape ", tau.sizes());
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, kOp, ": attn_mask must be bool (True = attend), got ",
                     py_dtype(m.scalar_type()));
    TORCH_CHECK(m.device() == q.device(), kOp, ": attn_mask must be on q's device (", q.device(), "), got ",
                m.device());
    const std::vector<int64_t> full{B, Hq, Tq, Tk};
    TORCH_CHECK_VALUE(m.dim() == 4 && broadcastable(m.sizes(), full), kOp,
                      ": attn_mask must have rank 4 and be broadcastable to (B, Hq, Tq, Tk) = ", shape_str(full),
                      ", got shape ", m.sizes());
  }
  if (scale.has_value())
    TORCH_CHECK_VALUE(std::isfinite(*scale) && *scale > 0, kOp, ": scale must be a finite number > 0, got ", py_float(*scale));
}

at::ScalarType compute_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// ---------------------------------------------------------------- non-finite inputs
// Every one of the n words at data finite: no word has all exponent bits `exp` set. An OR of
// equality masks (SSE2 compares; no float reduction, which would not vectorize without fast-math),
// one read, no allocation. Doubles are tested on their high 32-bit words.
template <typename U>
bool bits_finite(const void* data, int64_t n, int64_t stride, U exp) {
  const U* p = static_cast<const U*>(data);
  std::atomic<bool> finite{true};
  at::parallel_for(0, n, 1 << 15, [&](int64_t lo, int64_t hi) {
    U bad = 0;
    for (int64_t i = lo; i < hi; ++i) bad |= static_cast<U>((p[i * stride] & exp) == exp);
    if (bad) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

bool all_finite(const Tensor& t) {
  if (t.numel() == 0) return true;
  if (t.is_non_overlapping_and_dense()) {  // its elements fill [data_ptr, data_ptr + numel) in some order
    const int64_t n = t.numel();
    switch (t.scalar_type()) {
      case at::kFloat: return bits_finite<uint32_t>(t.data_ptr(), n, 1, 0x7f800000u);
      case at::kDouble: {  // the 32-bit word of each double that holds its exponent
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        const int64_t high = 0;
#else
        const int64_t high = 1;
#endif
        return bits_finite<uint32_t>(static_cast<const uint32_t*>(t.data_ptr()) + high, n, 2, 0x7ff00000u);
      }
      case at::kHalf: return bits_finite<uint16_t>(t.data_ptr(), n, 1, 0x7c00u);
      case at::kBFloat16: return bits_finite<uint16_t>(t.data_ptr(), n, 1, 0x7f80u);
      default: break;
    }
  }
  return at::isfinite(t).all().item<bool>();
}

Tensor zero_nonfinite(const Tensor& t) { return at::where(at::isfinite(t), t, at::zeros({}, t.options())); }

// ---------------------------------------------------------------- the ATen flash call, prepared
struct Plan {
  Tensor c;                 // (B, Hq, Tq) scale / tau in the compute dtype; NaN for bad tau, 0 on empty rows
  Tensor c_kernel;          // c with 0 on bad rows: what ATen sees, so a bad row cannot pollute others
  Tensor bad;               // (B, Hq, Tq) rows the rule makes NaN (they have an allowed key)
  bool any_bad = false;
  Tensor q, k, v;           // what ATen reads: the inputs, or copies with NaN/Inf replaced by 0
  OptTensor bias;           // additive 0 / -inf mask for ATen, in q's dtype; none when not needed
  OptTensor nonempty;       // rows with at least one allowed key (broadcastable to (B, Hq, Tq)); none = all
  bool is_causal = false;   // ATen's top-left causal, used when Tq = Tk and there is no mask
  double scale = 1.0;
};

// Keys each query may attend, broadcastable to (B, Hq, Tq, Tk); none = every key.
OptTensor allowed_keys(const Tensor& q, const Tensor& k, const OptTensor& mask, bool causal) {
  const auto Tq = q.size(2), Tk = k.size(2);
  OptTensor allowed;
  if (causal && Tq > 1) {  // with Tq = 1 the bottom-right causal row sees every key
    auto i = at::arange(Tq, q.options().dtype(at::kLong)).unsqueeze(1);
    auto j = at::arange(Tk, q.options().dtype(at::kLong)).unsqueeze(0);
    allowed = j.le(i + (Tk - Tq)).view({1, 1, Tq, Tk});
  }
  if (mask.has_value()) allowed = allowed.has_value() ? at::logical_and(*allowed, *mask) : *mask;
  return allowed;
}

// (B, Hq, Tq) rows that may attend a key flagged in key_bad (B, Hkv, Tk).
Tensor rows_meeting(const Tensor& key_bad, const Tensor& q, const Tensor& k, const OptTensor& mask, bool causal) {
  const auto B = q.size(0), Hq = q.size(1), Tq = q.size(2), Tk = k.size(2);
  auto per_head = key_bad.repeat_interleave(Hq / k.size(1), 1).view({B, Hq, 1, Tk});
  auto allowed = allowed_keys(q, k, mask, causal);
  auto meet = allowed.has_value() ? at::logical_and(*allowed, per_head).any(-1) : per_head.any(-1);
  return meet.expand({B, Hq, Tq});
}

// scan_v false: v is taken as finite (the forward checks it through its output instead).
Plan plan(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& tau, const OptTensor& mask, bool causal,
          c10::optional<double> scale, bool scan_v) {
  const auto B = q.size(0), Hq = q.size(1), Tq = q.size(2), Tk = k.size(2);
  const auto cd = compute_dtype(q.scalar_type());
  Plan p;
  p.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  if (causal && Tq > 1 && Tq == Tk && !mask.has_value()) {
    p.is_causal = true;
  } else if (auto allowed = allowed_keys(q, k, mask, causal); allowed.has_value()) {
    p.bias = at::zeros({}, q.options()).masked_fill(allowed->logical_not(), -std::numeric_limits<double>::infinity());
    p.nonempty = allowed->any(-1);
  }
  p.c = temperature_coefficients(tau, B, Hq, Tq, p.scale, cd);
  if (p.nonempty.has_value()) p.c = at::where(*p.nonempty, p.c, at::zeros({}, p.c.options())).contiguous();
  // Host checks are free on CPU (no device to wait for): finite inputs pay one read each, no copy.
  p.bad = at::isnan(p.c);
  p.q = q, p.k = k, p.v = v;
  if (!all_finite(q)) {
    auto row = at::isfinite(q).all(-1).logical_not();
    p.bad.logical_or_(p.nonempty.has_value() ? at::logical_and(row, *p.nonempty) : row);
    p.q = zero_nonfinite(q);
  }
  const bool k_ok = all_finite(k), v_ok = !scan_v || all_finite(v);
  if (!k_ok || !v_ok) {
    auto key_bad = at::logical_and(at::isfinite(k).all(-1), at::isfinite(v).all(-1)).logical_not();
    p.bad.logical_or_(rows_meeting(key_bad, q, k, mask, causal));
    if (!k_ok) p.k = zero_nonfinite(k);
    if (!v_ok) p.v = zero_nonfinite(v);
  }
  p.any_bad = p.bad.any().item<bool>();
  p.c_kernel = p.any_bad ? p.c.masked_fill(p.bad, 0) : p.c;
  return p;
}

// Also gives the head dimension unit stride: ATen's private flash op (unlike the public SDPA, which
// checks first) silently returns wrong values for a strided or expanded last dimension.
Tensor pad_head(const Tensor& t, int64_t size) {
  const auto d = t.size(3);
  if (d != size) return at::constant_pad_nd(t, {0, size - d});
  return t.stride(3) == 1 ? t : t.contiguous();
}

Tensor prescaled_q(const Plan& p) {
  return (p.q.to(p.c.scalar_type()) * p.c_kernel.unsqueeze(-1)).to(p.q.scalar_type());
}

}  // namespace

// ---------------------------------------------------------------- kernels
// Not static: temperature_attention_varlen.cpp runs them on each document (declared in the header).
std::tuple<Tensor, Tensor> temperature_attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const Tensor& tau, const OptTensor& attn_mask, bool causal,
                                                     c10::optional<double> scale) {
  check(q, k, v, tau, attn_mask, scale);
  const auto B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3), Tk = k.size(2), Dv = v.size(3);
  const auto cd = compute_dtype(q.scalar_type());
  if (B * Hq * Tq == 0 || Tk == 0)
    return {at::zeros({B, Hq, Tq, Dv}, q.options()),
            at::full({B, Hq, Tq}, -std::numeric_limits<double>::infinity(), q.options().dtype(cd))};
  const auto Dm = std::max(D, Dv);
  auto run = [&](const Plan& p) {
    return at::_scaled_dot_product_flash_attention_for_cpu(pad_head(prescaled_q(p), Dm), pad_head(p.k, Dm),
                                                           pad_head(p.v, Dm), 0.0, p.is_causal, p.bias, 1.0);
  };
  Plan p = plan(q, k, v, tau, attn_mask, causal, scale, /*scan_v=*/false);
  auto [out, lse] = run(p);
  // v is checked through ATen's output: a NaN/Inf in the v row of a key some row may attend reaches
  // that row's output (p * Inf, 0 * Inf and 0 * NaN are not finite), so v is only read, and the call
  // run again on a finite copy, when the output is not finite.
  if (!all_finite(out) && !all_finite(v)) {
    p = plan(q, k, v, tau, attn_mask, causal, scale, /*scan_v=*/true);
    std::tie(out, lse) = run(p);
  }
  // Outputs are contiguous whatever the inputs' layout (ATen's follows q's), as the fake impl says.
  out = out.narrow(3, 0, Dv).contiguous();
  if (p.nonempty.has_value())
    lse = at::where(*p.nonempty, lse, at::scalar_tensor(-std::numeric_limits<double>::infinity(), lse.options()));
  lse = lse.expand({B, Hq, Tq}).contiguous();
  if (p.any_bad) {  // the rule's NaN rows (see the file comment)
    out.masked_fill_(p.bad.unsqueeze(-1), std::nan(""));
    lse.masked_fill_(p.bad, std::nan(""));
  }
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> temperature_attention_backward_cpu(
    const Tensor& grad_out, const OptTensor& grad_lse, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& tau, const OptTensor& attn_mask, bool causal, c10::optional<double> scale, const Tensor& out,
    const Tensor& lse) {
  check(q, k, v, tau, attn_mask, scale);
  const auto B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3), Tk = k.size(2), Dv = v.size(3);
  const auto cd = compute_dtype(q.scalar_type());
  const std::vector<int64_t> out_shape{B, Hq, Tq, Dv}, rows{B, Hq, Tq};
  check_like(kOp, "grad_out", grad_out, out_shape, q.scalar_type(), q);
  check_like(kOp, "out", out, out_shape, q.scalar_type(), q);
  check_like(kOp, "lse", lse, rows, cd, q);
  if (grad_lse.has_value()) check_like(kOp, "grad_lse", *grad_lse, rows, c10::nullopt, q);
  if (B * Hq * Tq == 0 || Tk == 0)
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()), at::zeros(v.sizes(), v.options()),
            at::zeros(tau.sizes(), tau.options())};

  Plan p = plan(q, k, v, tau, attn_mask, causal, scale, /*scan_v=*/true);
  // Rows whose gradients are NaN: the forward's bad rows, rows whose scores overflowed to +inf there
  // (lse NaN), and rows with a non-finite grad_out row or grad_lse, among rows with an allowed key.
  // (grad_out and grad_lse lose their non-finite elements even on rows without a key, whose zero
  // weights would multiply them.)
  auto nan_rows = at::logical_or(p.bad, lse.isnan());
  Tensor g = grad_out, o = out;
  OptTensor gl = grad_lse;
  if (!all_finite(grad_out)) {
    nan_rows.logical_or_(at::isfinite(grad_out).all(-1).logical_not());
    g = zero_nonfinite(grad_out);
  }
  if (grad_lse.has_value() && !all_finite(*grad_lse)) {
    nan_rows.logical_or_(at::isfinite(*grad_lse).logical_not());
    gl = zero_nonfinite(*grad_lse);
  }
  if (p.nonempty.has_value()) nan_rows.logical_and_(*p.nonempty);
  const bool any_nan = nan_rows.any().item<bool>();
  // ATen sees those rows with c = 0, dO = 0, O = 0, grad_lse = 0 and lse = 0: they then add exactly
  // 0 to every key, and the keys they may attend get NaN below.
  auto lse_aten = at::where(lse.isneginf(), at::zeros({}, lse.options()), lse);  // ATen's own lse of empty rows
  if (any_nan) {
    p.c_kernel = p.c_kernel.masked_fill(nan_rows, 0);
    g = g.masked_fill(nan_rows.unsqueeze(-1), 0);
    o = out.masked_fill(nan_rows.unsqueeze(-1), 0);
    if (gl.has_value()) gl = gl->masked_fill(nan_rows, 0);
    lse_aten = lse_aten.masked_fill(nan_rows, 0);
  }
  const bool with_lse = gl.has_value();
  const auto Dm = std::max(D, Dv) + (with_lse ? 1 : 0);
  auto go = pad_head(g, Dm);
  o = pad_head(o, Dm);
  if (with_lse) {  // the extra column: v = 0 (padding), dO = 1, O = -grad_lse (see the file comment)
    go = go.clone();
    go.select(3, Dm - 1).fill_(1);
    o = o.clone();
    o.select(3, Dm - 1).copy_(gl->neg());
  }
  auto [dqs, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      go, pad_head(prescaled_q(p), Dm), pad_head(p.k, Dm), pad_head(p.v, Dm), o, lse_aten, 0.0, p.is_causal,
      p.bias, 1.0);
  auto dq = dqs.narrow(3, 0, D).to(cd) * p.c.unsqueeze(-1);
  if (any_nan) dq.masked_fill_(nan_rows.unsqueeze(-1), std::nan(""));
  auto rowdot = (p.q.to(cd) * dq).sum(-1);
  auto dtau = at::sum_to(rowdot.neg() * (p.c / p.scale), tau.sizes()).to(tau.scalar_type());
  dk = dk.narrow(3, 0, D).contiguous();
  dv = dv.narrow(3, 0, Dv).contiguous();
  if (any_nan) {  // NaN reaches every key a NaN row may attend, in its (batch, kv head)
    auto reach = nan_rows.unsqueeze(-1);
    if (auto allowed = allowed_keys(q, k, attn_mask, causal); allowed.has_value())
      reach = at::logical_and(reach, *allowed);
    const auto Hkv = k.size(1);
    auto keys = reach.expand({B, Hq, Tq, Tk}).reshape({B, Hkv, (Hq / Hkv) * Tq, Tk}).any(2).unsqueeze(-1);
    dk.masked_fill_(keys, std::nan(""));
    dv.masked_fill_(keys, std::nan(""));
  }
  return {dq.to(q.scalar_type()).contiguous(), dk, dv, dtau};
}

TORCH_LIBRARY_IMPL(trajops, CPU, m) {
  m.impl("temperature_attention", &temperature_attention_cpu);
  m.impl("temperature_attention_backward", &temperature_attention_backward_cpu);
}

}  // namespace trajops
