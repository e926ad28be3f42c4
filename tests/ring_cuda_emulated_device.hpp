#pragma once
// The Device policy of the ring's CUDA back ends (ring/cuda_shard.cuh) on the host, for the
// emulation tests: memory is memory, launches run the kernel's blocks one after another
// (emulation::launch), the "stream" is program order. One process-wide lock serialises
// launches: the emulation's fibers and shared memory are per process, and the ranks are threads.
// Include after cuda_host_emulation.hpp and the ring's CUDA headers.

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <new>

namespace dilated_attention::testing {

inline std::mutex& emulated_launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

struct EmulatedDevice {
  static void* allocate(std::size_t bytes) { return ::operator new(bytes, std::align_val_t(256)); }
  static void release(void* data) noexcept { ::operator delete(data, std::align_val_t(256)); }
  void upload(void* device, const void* host, std::size_t bytes) const { std::memcpy(device, host, bytes); }
  void zero(void* device, std::size_t bytes) const { std::memset(device, 0, bytes); }
  template <class Params>
  void launch(void (*kernel)(Params), std::int64_t blocks, int threads, std::size_t shared_bytes,
              const Params& params) const {
    EXPECT_LE(shared_bytes, sizeof(ring::device::ring_query_rows));
    const std::lock_guard<std::mutex> lock(emulated_launch_mutex());
    emulation::launch(static_cast<unsigned>(blocks), static_cast<unsigned>(threads),
                      reinterpret_cast<unsigned char*>(ring::device::ring_query_rows), shared_bytes,
                      [&] { kernel(params); });
  }
  void synchronize() const {}
  void* queue() const { return stream; }
  void* stream = nullptr;  // what the driver hands to the transport's stream hooks
};

}  // namespace dilated_attention::testing
