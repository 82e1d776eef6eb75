// The per-triple math of the CPU STP kernels (csrc/cpu/stp_loss.cpp, stp_loss_dense.cpp): the
// cosine of two steps without intermediate overflow, and its gradient in the reference's factored
// form.
// Semantics: trajops/reference/stp_loss.py.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace trajops {
namespace stp {

constexpr double kEps = 1e-8;  // torch.nn.functional.cosine_similarity's default

// Gradient of cos(b, a) with cosine_similarity's eps semantics, scaled by w = -grad_loss, in the
// reference's factored form (every factor bounded, so none overflows or underflows where the
// gradient itself does not; the expanded coefficients w / (Na Nb) underflow for norms ~1e19):
//   d/da = wa (b / Nb - ca a),  d/db = wb (a / Na - cb b),
//   wa = w / Na, ca = cos / |a| (<= 1 / Na; 0 at a = 0, where the norm's gradient a / |a| is 0).
template <typename acc_t>
struct CosGrad {
  acc_t wa = 0, wb = 0, rNa = 0, rNb = 0, ca = 0, cb = 0;

  CosGrad() = default;
  CosGrad(acc_t na, acc_t nb, acc_t cos, acc_t w) {
    const acc_t eps = static_cast<acc_t>(kEps);
    const acc_t Na = na < eps ? eps : na, Nb = nb < eps ? eps : nb;  // clamp_min: NaN stays NaN
    // A non-finite weight gives NaN rows, as the reference (inf times a term that rounds to 0 on
    // one backend and not on another would give NaN here and Inf there).
    if (!std::isfinite(w)) w = std::numeric_limits<acc_t>::quiet_NaN();
    wa = w / Na;
    wb = w / Nb;
    rNa = acc_t(1) / Na;
    rNb = acc_t(1) / Nb;
    ca = na > 0 ? cos / na : acc_t(0);
    cb = nb > 0 ? cos / nb : acc_t(0);
  }
};

// What a gradient row takes from one triple (x0, x1, x2), a = x1 - x0, b = x2 - x1, with
// ga = d/da, gb = d/db: the roles s (-ga), r (ga - gb) and t (gb) of a sampled triple, and the
// step a (ga) of a dense triple. Each term is added as the reference forms it, and a term the
// role does not use is not computed (0 * NaN would put a NaN the reference does not have).
enum class Term { kMinusGa, kGaMinusGb, kGb, kGa };

template <Term kTerm, typename acc_t, typename scalar_t>
inline void add_cos_grad(acc_t* work, const scalar_t* x0, const scalar_t* x1, const scalar_t* x2,
                         const CosGrad<acc_t>& cg, int64_t D) {
  const acc_t wa = cg.wa, wb = cg.wb, rNa = cg.rNa, rNb = cg.rNb, ca = cg.ca, cb = cg.cb;
#pragma omp simd
  for (int64_t k = 0; k < D; ++k) {
    const acc_t v1 = static_cast<acc_t>(x1[k]);
    const acc_t a = v1 - static_cast<acc_t>(x0[k]);
    const acc_t b = static_cast<acc_t>(x2[k]) - v1;
    if constexpr (kTerm == Term::kMinusGa) {
      work[k] += -(wa * (b * rNb - ca * a));
    } else if constexpr (kTerm == Term::kGaMinusGb) {
      work[k] += wa * (b * rNb - ca * a) - wb * (a * rNa - cb * b);
    } else if constexpr (kTerm == Term::kGb) {
      work[k] += wb * (a * rNa - cb * b);
    } else {
      work[k] += wa * (b * rNb - ca * a);
    }
  }
}

// |a|^2, |b|^2, a.b of a = x1 - x0, b = x2 - x1.
template <typename acc_t, typename scalar_t>
inline void triple_sums(const scalar_t* x0, const scalar_t* x1, const scalar_t* x2, int64_t D, acc_t& aa, acc_t& bb,
                        acc_t& ab) {
  acc_t s_aa = 0, s_bb = 0, s_ab = 0;
#pragma omp simd reduction(+ : s_aa, s_bb, s_ab)
  for (int64_t k = 0; k < D; ++k) {
    const acc_t v1 = static_cast<acc_t>(x1[k]);
    const acc_t a = v1 - static_cast<acc_t>(x0[k]);
    const acc_t b = static_cast<acc_t>(x2[k]) - v1;
    s_aa += a * a;
    s_bb += b * b;
    s_ab += a * b;
  }
  aa = s_aa;
  bb = s_bb;
  ab = s_ab;
}

// A power of two s with max|v| / s in [1, 2), as the reference's _norm (1 for a zero max).
template <typename acc_t>
inline acc_t pow2_scale(acc_t max_abs) {
  if (!(max_abs > 0)) return acc_t(1);
  int e = 0;
  std::frexp(max_abs, &e);
  return std::ldexp(acc_t(1), e - 1);
}

// |a|, |b| and cos(b, a) = a.b / (Na Nb) of a triple, without intermediate overflow.
template <typename acc_t>
struct Cosine {
  acc_t na, nb, cos;
};

// Slow path of triple_cosine, taken only when a plain sum of squares overflowed: the sums are
// redone on a / sa and b / sb, powers of two near max|a| and max|b| (exact scalings).
#if defined(__GNUC__)
#define TRAJOPS_COLD __attribute__((noinline, cold))
#define TRAJOPS_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define TRAJOPS_COLD
#define TRAJOPS_UNLIKELY(x) (x)
#endif

template <typename acc_t, typename scalar_t>
TRAJOPS_COLD Cosine<acc_t> triple_cosine_scaled(const scalar_t* x0, const scalar_t* x1, const scalar_t* x2,
                                                int64_t D) {
  acc_t ma = 0, mb = 0;
  bool finite = true;
  for (int64_t k = 0; k < D; ++k) {
    const acc_t v1 = static_cast<acc_t>(x1[k]);
    const acc_t a = v1 - static_cast<acc_t>(x0[k]);
    const acc_t b = static_cast<acc_t>(x2[k]) - v1;
    finite = finite && std::isfinite(a) && std::isfinite(b);
    ma = std::max(ma, std::abs(a));
    mb = std::max(mb, std::abs(b));
  }
  const acc_t eps = static_cast<acc_t>(kEps);
  acc_t aa = 0, bb = 0, ab = 0;
  if (!finite) {  // a NaN or Inf component: the plain sums give the reference's NaN loss
    triple_sums<acc_t>(x0, x1, x2, D, aa, bb, ab);
    const acc_t na = std::sqrt(aa), nb = std::sqrt(bb);
    return {na, nb, ab / (na < eps ? eps : na) / (nb < eps ? eps : nb)};
  }
  const acc_t sa = pow2_scale(ma), sb = pow2_scale(mb);
  for (int64_t k = 0; k < D; ++k) {  // divisions, not 1 / s: that overflows for a subnormal s
    const acc_t v1 = static_cast<acc_t>(x1[k]);
    const acc_t a = (v1 - static_cast<acc_t>(x0[k])) / sa;
    const acc_t b = (static_cast<acc_t>(x2[k]) - v1) / sb;
    aa += a * a;
    bb += b * b;
    ab += a * b;
  }
  const acc_t na = std::sqrt(aa) * sa, nb = std::sqrt(bb) * sb;
  const acc_t Na = na < eps ? eps : na, Nb = nb < eps ? eps : nb;
  return {na, nb, ab * (sa / Na) * (sb / Nb)};  // sa <= Na and sb <= Nb: no overflow
}

template <typename acc_t, typename scalar_t>
inline Cosine<acc_t> triple_cosine(const scalar_t* x0, const scalar_t* x1, const scalar_t* x2, int64_t D) {
  acc_t aa, bb, ab;
  triple_sums<acc_t>(x0, x1, x2, D, aa, bb, ab);
  // One test for all three sums (a finite sum near the limit only costs a needless slow path).
  if (TRAJOPS_UNLIKELY(!std::isfinite(aa + bb + ab))) {
    return triple_cosine_scaled<acc_t>(x0, x1, x2, D);
  }
  const acc_t eps = static_cast<acc_t>(kEps);
  const acc_t na = std::sqrt(aa), nb = std::sqrt(bb);
  const acc_t Na = na < eps ? eps : na, Nb = nb < eps ? eps : nb;
  const acc_t den = Na * Nb;  // finite here unless both norms are within rounding of sqrt(max)
  return {na, nb, den < std::numeric_limits<acc_t>::infinity() ? ab / den : ab / Na / Nb};
}

// |x1 - x0| without intermediate overflow.
template <typename acc_t, typename scalar_t>
inline acc_t step_norm(const scalar_t* x0, const scalar_t* x1, int64_t D) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < D; ++k) {
    const acc_t d = static_cast<acc_t>(x1[k]) - static_cast<acc_t>(x0[k]);
    s += d * d;
  }
  if (std::isfinite(s)) return std::sqrt(s);
  return triple_cosine_scaled<acc_t>(x0, x1, x1, D).na;  // (x0, x1, x1): a = the step, b = 0
}

}  // namespace stp
}  // namespace trajops
