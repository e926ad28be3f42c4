#pragma once
// What the GPU ring tests (ring_cuda_forward_test.cu, ring_cuda_backward_test.cu) share to run a
// rank on the device: its CUDA ring options, and views over device copies of its host tensors.

#include <dilated_attention/config.hpp>
#include <dilated_attention/ring/cuda/options.cuh>

#include "support/tensors.hpp"

namespace dilated_attention::testing {

// The CUDA ring's options: the common settings of `options` and the rank's stream.
inline ring::cuda::Options device_options(const ring::Options& options, cudaStream_t stream) {
  ring::cuda::Options device;
  static_cast<ring::CommonOptions&>(device) = options;
  device.device.stream = stream;
  return device;
}

// A view over `data`, a device copy of `host`'s storage (padding included): the same strides.
template <class T>
View<T> on_device(const Tensor<T>& host, T* data) {
  return {data, host.batch_stride, host.seq_stride, host.head_stride};
}

}  // namespace dilated_attention::testing
