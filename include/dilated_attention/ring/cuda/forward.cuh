#pragma once
// The CUDA entry point of the ring (docs/semantics.md "Entry points", docs/ring.md): ring::cuda::forward<T>
// runs the generic driver (ring/driver/forward.hpp) with the CUDA back end (ring/cuda/forward_backend.cuh) on
// `stream`, over a transport that moves device buffers: LoopbackTransport (ring/transport/loopback.cuh,
// ranks on one GPU) or NcclTransport (ring/nccl.cuh, one process per GPU).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "../../config.hpp"
#include "forward_backend.cuh"
#include "stream_device.cuh"
#include "../driver/forward.hpp"
#include "../transport/transport.hpp"

namespace dilated_attention::ring::cuda {

// Ring forward on this rank's GPU. `shape` is the GLOBAL shape (seq_len = N); q, k, v, out are
// DEVICE views over this rank's N / P rows in options.layout's order; lse, when given, is a device
// array [batch, num_heads, N / P] of float, same row order. T is __half, __nv_bfloat16 or float;
// head_dim 32, 64, 96 or 128 (as cuda::forward). Every rank must pass the same config, shape, T
// and layout: the ranks check that first (ring/driver/agreement.hpp), before any K/V row moves; bad
// input raises std::invalid_argument naming the parameter on that rank and PeerFailure on the
// others; a failure while the ring runs raises on every rank and no output is written; a
// transfer that does not complete within options.timeout raises TransferTimeout.
//
// All device work of the call is ordered on `stream` (no host synchronisation per step; the
// transport orders its transfers on it). The call returns once O and LSE are written (it
// synchronises `stream` at the end of the call). options.num_threads and drive_progress do not
// apply (the host only records and launches).
template <class T>
Stats forward(const Config& config, const Shape& shape, Transport& transport,
              View<const dilated_attention::detail::identity_t<T>> q,
              View<const dilated_attention::detail::identity_t<T>> k,
              View<const dilated_attention::detail::identity_t<T>> v, View<T> out,
              float* lse = nullptr, const Options& options = {}, cudaStream_t stream = nullptr) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, float>,
                "dilated_attention::ring::cuda::forward supports __half, __nv_bfloat16 and float");
  return forward_on_device<T>(CudaStreamDevice{stream}, config, shape, transport, q, k, v, out, lse,
                              options);
}

}  // namespace dilated_attention::ring::cuda
