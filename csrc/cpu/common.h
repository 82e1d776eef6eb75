// Helpers shared by the CPU kernels: error messages spelled as Python spells them, so that every
// backend of an op fails with the same text.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "py_format.h"  // py_dtype, py_float: values spelled as Python spells them

namespace trajops {

inline std::string shape_str(at::IntArrayRef s) {  // (2, 3) as Python prints a tuple
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

// Shape `shape` broadcasts to `target` (trailing-aligned, 1 or equal).
inline bool broadcastable(at::IntArrayRef shape, at::IntArrayRef target) {
  if (shape.size() > target.size()) return false;
  for (size_t i = 1; i <= shape.size(); ++i) {
    const auto s = shape[shape.size() - i], t = target[target.size() - i];
    if (s != 1 && s != t) return false;
  }
  return true;
}

// exp(x) in float, branch-free so that loops of it vectorize; relative error below 2e-7 on [-87, 0].
inline float fast_exp(float x) {
  x = std::max(x, -87.0f);
  const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}

// GCC/clang vectors of 8 floats (AVX where -march allows, SSE pairs otherwise).
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#if defined(__clang__)
#define TRAJOPS_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define TRAJOPS_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif

// r[s] = sum of the lanes of v[s], s = 0..7, in 3 shuffle-add levels: 8 dot products finished at once
// (one horizontal sum each would cost 7 scalar adds).
inline v8 transpose_sum(const v8 (&v)[8]) {
  v8 u[4], w[2];
  for (int p = 0; p < 4; ++p)  // [v0 lanes 01, v1 lanes 01, v0 23, v1 23, ...] summed
    u[p] = TRAJOPS_SHUFFLE(v[2 * p], v[2 * p + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
           TRAJOPS_SHUFFLE(v[2 * p], v[2 * p + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int p = 0; p < 2; ++p)  // [v0 0..3, v1 0..3, v2 0..3, v3 0..3, v0 4..7, ...]
    w[p] = TRAJOPS_SHUFFLE(u[2 * p], u[2 * p + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           TRAJOPS_SHUFFLE(u[2 * p], u[2 * p + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return TRAJOPS_SHUFFLE(w[0], w[1], 0, 1, 2, 3, 8, 9, 10, 11) + TRAJOPS_SHUFFLE(w[0], w[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

}  // namespace trajops
