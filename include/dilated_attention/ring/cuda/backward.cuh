#pragma once
// The CUDA entry point of the ring backward (docs/semantics.md "Entry points", docs/semantics.md "The gradient", docs/ring.md):
// ring::cuda::backward<T> runs the generic driver (ring/driver/backward.hpp) with the CUDA gradient back
// end (ring/cuda/backward_backend.cuh) on `stream`, over a transport that moves device buffers
// (LoopbackTransport, ring/transport/loopback.cuh; NcclTransport, ring/nccl.cuh).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "../../config.hpp"
#include "backward_call.cuh"
#include "stream_device.cuh"
#include "../transport/transport.hpp"

namespace dilated_attention::ring::cuda {

// Ring backward on this rank's GPU. Each rank passes what ring::cuda::forward gave it: `shape` is
// the GLOBAL shape; q, k, v, out, d_out and the gradients are DEVICE views over this rank's N / P
// rows in options.layout's order; lse is the forward's device array [batch, num_heads, N / P] of
// float, same row order. d_q receives this rank's rows of the single-device dQ, d_k and d_v this
// rank's rows of dK and dV; all three are overwritten. T is __half, __nv_bfloat16 or float;
// head_dim 32, 64, 96 or 128. The protocol and guarantees are ring::backward's: the ranks agree
// first (std::invalid_argument naming the parameter on a bad rank, PeerFailure on the others), no
// gradient is written unless every rank succeeded, TransferTimeout after options.timeout; bitwise
// reproducible run to run. All device work is ordered on `stream` (no host synchronisation per
// step); the call returns once the gradients are written. options.num_threads and drive_progress
// do not apply.
template <class T>
Stats backward(const Config& config, const Shape& shape, Transport& transport,
               View<const dilated_attention::detail::identity_t<T>> q,
               View<const dilated_attention::detail::identity_t<T>> k,
               View<const dilated_attention::detail::identity_t<T>> v,
               View<const dilated_attention::detail::identity_t<T>> out, const float* lse,
               View<const dilated_attention::detail::identity_t<T>> d_out, View<T> d_q, View<T> d_k,
               View<T> d_v, const Options& options = {}, cudaStream_t stream = nullptr) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, float>,
                "dilated_attention::ring::cuda::backward supports __half, __nv_bfloat16 and float");
  return backward_on_device<T>(CudaStreamDevice{stream}, config, shape, transport, q, k, v, out, lse, d_out,
                               d_q, d_k, d_v, options);
}

}  // namespace dilated_attention::ring::cuda
