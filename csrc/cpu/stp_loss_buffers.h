// Gradient buffers and small tensor helpers of the CPU STP kernels (csrc/cpu/stp_loss.cpp,
// csrc/cpu/stp_loss_dense.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace trajops {
namespace stp {

inline std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

inline at::ScalarType acc_type(const at::Tensor& h) {
  return h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Zeroes `bytes` bytes. Large spans use streaming stores: the gradient is write-only here, and
// ordinary stores would first read every cache line they fill (a hidden second pass over memory).
inline void zero_bytes(void* dst, size_t bytes) {
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
inline std::pair<at::Tensor, bool> grad_buffer(const at::Tensor& h, bool hugepages) {
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

template <typename acc_t, typename scalar_t>
inline void store_row(scalar_t* out, const acc_t* a, const acc_t* b, int64_t D) {  // out = a - b
#pragma omp simd
  for (int64_t k = 0; k < D; ++k) out[k] = static_cast<scalar_t>(a[k] - b[k]);
}

}  // namespace stp
}  // namespace trajops
