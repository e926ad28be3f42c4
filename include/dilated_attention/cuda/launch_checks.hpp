#pragma once
// Host-side checks and bookkeeping around a kernel launch, in plain C++ so that they are tested
// on machines without a GPU (tests/cuda/cuda_launch_plan_test.cpp):
//  - the shared memory a plan needs against the device's per-block limit, as
//    std::invalid_argument naming what asked for it (docs/semantics.md "Bad input"'s style), before any
//    launch rather than as a launch failure;
//  - pointer alignment that the kernels rely on (element type, the fp32 LSE, the workspace);
//  - which dynamic shared-memory sizes a kernel was already granted on each device, so that
//    cudaFuncSetAttribute runs once per (kernel, device, larger size) instead of on every call.

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "../config.hpp"

namespace dilated_attention::cuda {

// Raises std::invalid_argument when `bytes` of dynamic shared memory per block exceed what the
// device grants (cudaDevAttrMaxSharedMemoryPerBlockOptin): e.g. head_dim 128 with mean mixing
// needs 117 KiB, more than the 99 KiB of an sm_86/sm_89 GPU.
inline void check_shared_memory(std::size_t bytes, std::size_t device_limit, const Config& config,
                                const Shape& shape, const char* what) {
  if (bytes <= device_limit) return;
  dilated_attention::detail::reject(
      what, " with shape.head_dim = ", shape.head_dim, " and config.mixing = ",
      config.mixing == Mixing::mean ? "mean" : "softmax", " needs ", bytes,
      " bytes of shared memory per block, but this device allows at most ", device_limit,
      " (cudaDevAttrMaxSharedMemoryPerBlockOptin)");
}

// Raises std::invalid_argument unless `pointer` (named `name`) is a multiple of `alignment`.
inline void check_alignment(const void* pointer, std::size_t alignment, const char* name,
                            const char* why) {
  if (reinterpret_cast<std::uintptr_t>(pointer) % alignment == 0) return;
  dilated_attention::detail::reject(name, " = ", pointer, " is not aligned to ", alignment,
                                    " bytes: ", why);
}

// The dynamic shared memory already granted to one kernel on each device. Lock-free: two threads
// that race may both call cudaFuncSetAttribute, which is harmless (same kernel, same value or a
// larger one recorded by the other).
class SharedMemoryGrants {
 public:
  static constexpr int max_devices = 64;
  // True when a launch of `bytes` on `device` needs no cudaFuncSetAttribute first.
  bool covers(int device, std::size_t bytes) const {
    if (bytes <= default_bytes) return true;
    if (device < 0 || device >= max_devices) return false;
    return granted_[device].load(std::memory_order_acquire) >= bytes;
  }
  // Records a successful cudaFuncSetAttribute(MaxDynamicSharedMemorySize, bytes) on `device`.
  void record(int device, std::size_t bytes) {
    if (device < 0 || device >= max_devices) return;
    std::size_t seen = granted_[device].load(std::memory_order_relaxed);
    while (seen < bytes &&
           !granted_[device].compare_exchange_weak(seen, bytes, std::memory_order_release)) {
    }
  }
  // Every kernel may use 48 KiB of dynamic shared memory without asking.
  static constexpr std::size_t default_bytes = 48 * 1024;

 private:
  std::atomic<std::size_t> granted_[max_devices] = {};
};

}  // namespace dilated_attention::cuda
