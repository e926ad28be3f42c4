#pragma once
// The CUDA entry point of the ring backward (docs/semantics.md "Entry points", docs/semantics.md "The gradient", docs/ring.md):
// ring::cuda::backward<T> runs the generic driver (ring/driver/backward.hpp) with the CUDA gradient back
// end (ring/cuda/backward_backend.cuh) on options.device.stream, over a transport that moves device buffers
// (LoopbackTransport, ring/transport/loopback.cuh; NcclTransport, ring/nccl.cuh).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "../../arguments.hpp"
#include "../../config.hpp"
#include "options.cuh"
#include "backward_call.cuh"
#include "stream_device.cuh"
#include "../transport/transport.hpp"

namespace dilated_attention::ring::cuda {

// Ring backward on this rank's GPU. Each rank passes what ring::cuda::forward gave it: `shape` is
// the GLOBAL shape; inputs, forward_outputs.out, d_out and the gradients are DEVICE views over
// this rank's N / P rows in options.layout's order; forward_outputs.lse is the forward's device
// array [batch, num_heads, N / P] of float, same row order. gradients.d_q receives this rank's
// rows of the single-device dQ, d_k and d_v this rank's rows of dK and dV; all three are
// overwritten. T is __half, __nv_bfloat16 or float; head_dim 32, 64, 96 or 128. The protocol and
// guarantees are ring::backward's: the ranks agree first (std::invalid_argument naming the
// parameter on a bad rank, PeerFailure on the others), no gradient is written unless every rank
// succeeded, TransferTimeout after options.timeout; bitwise reproducible run to run.
// Asynchronous as ring::cuda::forward: all device work is enqueued on options.device.stream and
// the call returns without waiting for the gradients (written when the stream gets there).
// drive_progress does not apply.
template <class T>
Stats backward(const Config& config, const Shape& shape, Transport& transport,
               const Inputs<dilated_attention::detail::identity_t<T>>& inputs,
               const Outputs<const dilated_attention::detail::identity_t<T>>& forward_outputs,
               View<const dilated_attention::detail::identity_t<T>> d_out,
               const Gradients<T>& gradients, const Options& options = {}) {
  static_assert(
      std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, float>,
      "dilated_attention::ring::cuda::backward supports __half, __nv_bfloat16 and float");
  return backward_on_device<T>(CudaStreamDevice{options.device.stream}, config, shape, transport,
                               inputs, forward_outputs, d_out, gradients, options);
}

// The positional spelling of 0.1 (ring::Options and the stream apart). Unlike the new call, it
// still returns once the gradients are written (it synchronises the stream), as it always did.
template <class T>
[[deprecated(
    "use ring::cuda::backward(config, shape, transport, {q, k, v}, {out, lse}, d_out, {d_q, d_k, "
    "d_v}, options) with options.device.stream; removed in 0.2.0")]] Stats
backward(const Config& config, const Shape& shape, Transport& transport,
         View<const dilated_attention::detail::identity_t<T>> q,
         View<const dilated_attention::detail::identity_t<T>> k,
         View<const dilated_attention::detail::identity_t<T>> v,
         View<const dilated_attention::detail::identity_t<T>> out, const float* lse,
         View<const dilated_attention::detail::identity_t<T>> d_out, View<T> d_q, View<T> d_k,
         View<T> d_v, const dilated_attention::ring::Options& options = {},
         cudaStream_t stream = nullptr) {
  Options device_options;
  static_cast<CommonOptions&>(device_options) = options;
  device_options.device.stream = stream;
  const Stats stats =
      backward<T>(config, shape, transport, Inputs<T>{q, k, v}, Outputs<const T>{out, lse}, d_out,
                  Gradients<T>{d_q, d_k, d_v}, device_options);
  CudaStreamDevice{stream}.synchronize();
  return stats;
}

}  // namespace dilated_attention::ring::cuda
