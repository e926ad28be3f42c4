#pragma once
// dilated_attention::cuda::Options: how a CUDA entry point runs (docs/semantics.md "Entry points",
// docs/cuda.md). Every call validates on the host (std::invalid_argument before anything is
// enqueued), enqueues all of its device work on `stream` and returns without synchronising: the
// outputs are ready when the stream reaches that point.

#include <cuda_runtime_api.h>

#include <cstddef>

namespace dilated_attention::cuda {

struct Options {
  // The stream every launch (and, for backward without a workspace, the stream-ordered
  // allocation and free) goes on; null is the legacy default stream.
  cudaStream_t stream = nullptr;
  // backward only: device memory of at least backward_workspace_size(config, shape) bytes,
  // 256-byte aligned, that nothing else uses until the call's work on `stream` is done. Null:
  // the call allocates it itself with cudaMallocAsync on `stream` and frees it with
  // cudaFreeAsync after its launches, on the same stream. forward needs none and ignores both.
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
};

}  // namespace dilated_attention::cuda
