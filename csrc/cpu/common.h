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

}  // namespace trajops
