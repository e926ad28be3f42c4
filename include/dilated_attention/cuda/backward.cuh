#pragma once
// dilated_attention::cuda::backward: the gradient of docs/semantics.md "The gradient" on the GPU.
// validate_backward() first (pointer arithmetic only), then the back end's limits and the
// workspace, then three kernel launches on `stream` (backward_plan.hpp): row statistics, dQ and
// dK/dV (the last two on tensor cores for 16-bit storage). No allocation (the caller provides `workspace` of backward_workspace_size() bytes), no
// floating-point atomics, bitwise reproducible. Asynchronous like any launch on a stream.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <type_traits>

#include "../config.hpp"
#include "backward_kernel.cuh"
#include "tensor_core_backward_dk_dv_kernel.cuh"
#include "tensor_core_backward_dq_kernel.cuh"
#include "backward_plan.hpp"
#include "error.cuh"
#include "forward.cuh"
#include "launch_checks.hpp"

namespace dilated_attention::cuda {

namespace detail {

using BackwardKernel = void (*)(BackwardParams);
struct BackwardKernels {
  BackwardKernel row_statistics, dq, dk_dv;
};

template <class T, int D>
BackwardKernels backward_kernels_for_head_dim() {
  if constexpr (std::is_same_v<T, float>)
    return {&device::backward_row_statistics_kernel<T, D>, &device::backward_dq_kernel<T, D>,
            &device::backward_dk_dv_kernel<T, D>};
  else
    return {&device::backward_row_statistics_kernel<T, D>,
            &device::tensor_core_backward_dq_kernel<T, D>,
            &device::tensor_core_backward_dk_dv_kernel<T, D>};
}

// The dynamic shared memory the dQ (kernel 0) and dK/dV (kernel 1) kernels were granted per device.
template <class T>
SharedMemoryGrants& backward_grants(int kernel, std::int64_t head_dim) {
  static SharedMemoryGrants grants[2][4];
  return grants[kernel][head_dim / 32 - 1];
}

template <class T>
BackwardKernels backward_kernels_for(std::int64_t head_dim) {
  switch (head_dim) {
    case 32: return backward_kernels_for_head_dim<T, 32>();
    case 64: return backward_kernels_for_head_dim<T, 64>();
    case 96: return backward_kernels_for_head_dim<T, 96>();
    default: return backward_kernels_for_head_dim<T, 128>();  // check_backend_limits ran
  }
}

template <class T>
void launch_backward(const Config& config, const Shape& shape, const BackwardPlan& plan,
                     cudaStream_t stream) {
  const DeviceLimits limits = current_device_limits();
  check_shared_memory(std::max(plan.dq_shared_bytes, plan.dk_dv_shared_bytes), limits.shared_bytes,
                      config, shape, "dilated_attention::cuda::backward");
  check_no_pending_error("dilated_attention::cuda::backward");
  const BackwardKernels kernels = backward_kernels_for<T>(plan.params.f.head_dim);
  const auto threads = static_cast<unsigned>(plan.threads);
  // The row-statistics kernel needs at most 4 KiB of shared memory: no attribute.
  kernels.row_statistics<<<static_cast<unsigned>(plan.query_blocks), threads, plan.shared_bytes,
                           stream>>>(plan.params);
  check(cudaGetLastError(), "dilated attention backward row-statistics kernel launch");
  grant_shared_memory(kernels.dq, backward_grants<T>(0, plan.params.f.head_dim), limits.device,
                      plan.dq_shared_bytes);
  grant_shared_memory(kernels.dk_dv, backward_grants<T>(1, plan.params.f.head_dim), limits.device,
                      plan.dk_dv_shared_bytes);
  kernels.dq<<<static_cast<unsigned>(plan.dq_blocks), static_cast<unsigned>(plan.dq_threads),
               plan.dq_shared_bytes, stream>>>(plan.params);
  check(cudaGetLastError(), "dilated attention backward dQ kernel launch");
  kernels.dk_dv<<<static_cast<unsigned>(plan.dk_dv_blocks), static_cast<unsigned>(plan.dk_dv_threads),
                  plan.dk_dv_shared_bytes, stream>>>(plan.params);
  check(cudaGetLastError(), "dilated attention backward dK/dV kernel launch");
}

}  // namespace detail

// docs/semantics.md "The gradient" on device pointers: q, k, v, out, d_out and the forward's `lse`
// ([batch, num_heads, seq_len] float) are read; d_q, d_k, d_v are overwritten; `workspace` is
// device memory of at least backward_workspace_size(config, shape) bytes, 256-byte aligned, that
// nothing else uses until the call's work on `stream` is done. T is __half, __nv_bfloat16 or
// float; arithmetic is fp32. Bad arguments raise std::invalid_argument before any device work;
// CUDA failures raise std::runtime_error.
template <class T>
void backward(const Config& config, const Shape& shape,
              View<const dilated_attention::detail::identity_t<T>> q,
              View<const dilated_attention::detail::identity_t<T>> k,
              View<const dilated_attention::detail::identity_t<T>> v,
              View<const dilated_attention::detail::identity_t<T>> out, const float* lse,
              View<const dilated_attention::detail::identity_t<T>> d_out, View<T> d_q,
              View<T> d_k, View<T> d_v, void* workspace, std::size_t workspace_bytes,
              cudaStream_t stream = nullptr) {
  static_assert(is_supported_type_v<T>,
                "dilated_attention::cuda::backward supports __half, __nv_bfloat16 and float");
  validate_backward(config, shape, q, k, v, out, lse, d_out, d_q, d_k, d_v);
  check_backend_limits(config, shape);
  const BackwardPlan plan = make_backward_plan<T>(config, shape, q, k, v, out, lse, d_out, d_q,
                                                  d_k, d_v, workspace, workspace_bytes,
                                                  kernel_kind_v<T>);
  detail::launch_backward<T>(config, shape, plan, stream);
}

}  // namespace dilated_attention::cuda
