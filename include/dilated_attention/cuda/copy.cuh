#pragma once
// Global -> shared copies of one 16-byte chunk with cp.async (sm_80+), which lets the next key
// tile load while the current one is multiplied, and 16-byte global stores. A chunk past the end of a block is zero-filled
// (src-size 0), so masked keys meet finite values and 0 * v stays 0, never NaN.

// Under DILATED_ATTENTION_CUDA_HOST_EMULATION (tests only: tests/support/cuda_host_emulation.hpp) the
// test provides these primitives itself, so the kernels run on the host without a GPU.
#if !defined(DILATED_ATTENTION_CUDA_HOST_EMULATION)

#include <cstdint>

#include "mma.cuh"

namespace dilated_attention::cuda::device {

__device__ __forceinline__ void cp_async_16(void* shared, const void* global, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int source_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared)),
               "l"(global), "r"(source_bytes));
#else
  (void)shared, (void)global, (void)valid;
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// One 16-byte store to global memory (`global` 16-byte aligned), e.g. eight 16-bit outputs.
__device__ __forceinline__ void store_16(void* global, const std::uint32_t (&words)[4]) {
  *static_cast<uint4*>(global) = make_uint4(words[0], words[1], words[2], words[3]);
}

// Wait until at most `Pending` committed groups of this thread are still in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
#endif
}

}  // namespace dilated_attention::cuda::device

#endif  // !DILATED_ATTENTION_CUDA_HOST_EMULATION
