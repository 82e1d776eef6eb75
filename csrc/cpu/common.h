// Helpers shared by the CPU kernels: error messages spelled as Python spells them, so that every
// backend of an op fails with the same text.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace trajops {

// Python's spelling of a dtype (torch.float32).
inline std::string dtype_name(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(st);
  }
}

inline std::string shape_str(at::IntArrayRef s) {  // (2, 3) as Python prints a tuple
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

}  // namespace trajops
