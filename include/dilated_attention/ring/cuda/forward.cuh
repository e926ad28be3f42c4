#pragma once
// The CUDA entry point of the ring (docs/semantics.md "Entry points", docs/ring.md): ring::cuda::forward<T>
// runs the generic driver (ring/driver/forward.hpp) with the CUDA back end (ring/cuda/forward_backend.cuh) on
// options.device.stream, over a transport that moves device buffers: LoopbackTransport (ring/transport/loopback.cuh,
// ranks on one GPU) or NcclTransport (ring/nccl.cuh, one process per GPU).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "../../arguments.hpp"
#include "../../config.hpp"
#include "options.cuh"
#include "forward_backend.cuh"
#include "stream_device.cuh"
#include "../driver/forward.hpp"
#include "../transport/transport.hpp"

namespace dilated_attention::ring::cuda {

// Ring forward on this rank's GPU. `shape` is the GLOBAL shape (seq_len = N); inputs.q, k, v and
// outputs.out are DEVICE views over this rank's N / P rows in options.layout's order;
// outputs.lse, when given, is a device array [batch, num_heads, N / P] of float (lse_type_t<T>),
// same row order. T is __half, __nv_bfloat16 or float; head_dim 32, 64, 96 or 128 (as
// cuda::forward). Every rank must pass the same config, shape, T and layout: the ranks check that
// first (ring/driver/agreement.hpp), before any K/V row moves; bad input raises
// std::invalid_argument naming the parameter on that rank and PeerFailure on the others; a
// failure while the ring runs raises on every rank and no output is written; a transfer that
// does not complete within options.timeout raises TransferTimeout.
//
// Asynchronous, as every cuda:: call: all device work of the call is enqueued on
// options.device.stream (no host synchronisation per step; the transport orders its transfers
// on it), and the call returns WITHOUT waiting for the output: O and LSE are written when the
// stream reaches the end of the call. The one synchronisation inside (docs/ring.md
// "Asynchrony") comes before the commit, so that a device fault is this rank's failure before
// the ranks exchange verdicts. drive_progress does not apply (the host only records and launches).
template <class T>
Stats forward(const Config& config, const Shape& shape, Transport& transport,
              const Inputs<dilated_attention::detail::identity_t<T>>& inputs,
              const Outputs<T>& outputs, const Options& options = {}) {
  static_assert(
      std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, float>,
      "dilated_attention::ring::cuda::forward supports __half, __nv_bfloat16 and float");
  return forward_on_device<T>(CudaStreamDevice{options.device.stream}, config, shape, transport,
                              inputs, outputs, options);
}

// The positional spelling of 0.1 (ring::Options and the stream apart). Unlike the new call, it
// still returns once O and LSE are written (it synchronises the stream), as it always did.
template <class T>
[[deprecated(
    "use ring::cuda::forward(config, shape, transport, {q, k, v}, {out, lse}, options) with "
    "options.device.stream; removed in 0.2.0")]] Stats
forward(const Config& config, const Shape& shape, Transport& transport,
        View<const dilated_attention::detail::identity_t<T>> q,
        View<const dilated_attention::detail::identity_t<T>> k,
        View<const dilated_attention::detail::identity_t<T>> v, View<T> out, float* lse = nullptr,
        const dilated_attention::ring::Options& options = {}, cudaStream_t stream = nullptr) {
  Options device_options;
  static_cast<CommonOptions&>(device_options) = options;
  device_options.device.stream = stream;
  const Stats stats = forward<T>(config, shape, transport, Inputs<T>{q, k, v}, Outputs<T>{out, lse},
                                 device_options);
  CudaStreamDevice{stream}.synchronize();
  return stats;
}

}  // namespace dilated_attention::ring::cuda
