// Packed variable-length sequences: checks and offsets of cu_seqlens (the semantics and the same
// messages as trajops/varlen.py). A valid cu_seqlens is (N + 1,) int32/int64 on the data's device,
// starts at 0, never decreases and ends at the number of packed tokens.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "py_format.h"

namespace trajops {

// Shape, dtype and device of cu_seqlens, then its values; returns the offsets as int64.
inline std::vector<int64_t> checked_cu_seqlens(const char* op, const at::Tensor& cu, int64_t total,
                                               const at::Device& device, const char* name = "cu_seqlens") {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, op, ": ", name,
                   " must be torch.int32 or torch.int64, got ", py_dtype(cu.scalar_type()));
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, op, ": ", name,
                    " must have shape (N + 1,) for N packed documents, got shape ", cu.sizes());
  TORCH_CHECK_VALUE(cu.device() == device, op, ": ", name,
                    " must be on the device of the packed tensors (", device, "), got ", cu.device());
  const at::Tensor c = cu.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  std::vector<int64_t> offs(p, p + c.numel());
  TORCH_CHECK_VALUE(offs[0] == 0, op, ": ", name, " must start at 0, got ", offs[0]);
  for (size_t j = 1; j < offs.size(); ++j) {
    TORCH_CHECK_VALUE(offs[j] >= offs[j - 1], op, ": ", name, " must be non-decreasing, got ",
                      offs[j - 1], " then ", offs[j], " at index ", j);
  }
  TORCH_CHECK_VALUE(offs.back() == total, op, ": ", name, " must end at the number of packed tokens ",
                    total, ", got ", offs.back());
  return offs;
}

}  // namespace trajops
