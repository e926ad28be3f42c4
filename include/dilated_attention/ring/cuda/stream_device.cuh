#pragma once
// The Device policy of ring/cuda/forward_backend.cuh on a real GPU: every operation ordered on the
// call's stream -- cudaMallocAsync / cudaFreeAsync per buffer (the device's default memory pool;
// a release never waits for the device, the memory stays valid for the work enqueued before it),
// asynchronous uploads, memsets and launches -- errors as std::runtime_error (cuda/error.cuh).

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../../cuda/error.cuh"

namespace dilated_attention::ring {

struct CudaStreamDevice {
  cudaStream_t stream = nullptr;

  void* allocate(std::size_t bytes) const {
    void* data = nullptr;
    dilated_attention::cuda::check(cudaMallocAsync(&data, bytes, stream),
                                   "cudaMallocAsync (ring buffer)");
    return data;
  }
  // Stream-ordered: freed once the stream reaches this point (a back end goes with its finish()
  // still queued). An error here would be a stale one of the stream; the call reports those.
  void release(void* data) const noexcept { static_cast<void>(cudaFreeAsync(data, stream)); }

  // Host data is pageable: cudaMemcpyAsync stages it before returning, so the caller may reuse it.
  void upload(void* device, const void* host, std::size_t bytes) const {
    dilated_attention::cuda::check(
        cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream),
        "cudaMemcpyAsync (ring work items)");
  }
  void zero(void* device, std::size_t bytes) const {
    dilated_attention::cuda::check(cudaMemsetAsync(device, 0, bytes, stream),
                                   "cudaMemsetAsync (ring accumulators)");
  }
  template <class Params>
  void launch(void (*kernel)(Params), std::int64_t blocks, int threads, std::size_t shared_bytes,
              const Params& params) const {
    kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads), shared_bytes, stream>>>(
        params);
    dilated_attention::cuda::check(cudaGetLastError(), "ring kernel launch");
  }
  void synchronize() const {
    dilated_attention::cuda::check(cudaStreamSynchronize(stream),
                                   "cudaStreamSynchronize (ring call)");
  }
  void* queue() const { return static_cast<void*>(stream); }
};

}  // namespace dilated_attention::ring
