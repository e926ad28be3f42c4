#pragma once
// dilated_attention::cuda::backward: the gradient of docs/semantics.md "The gradient" on the GPU.
// validate_backward() first (pointer arithmetic only), then the back end's limits and the
// workspace, then three kernel launches (backward_plan.hpp): row statistics, dQ and dK/dV (the last
// two on tensor cores for 16-bit storage) on options.stream. The row statistics go
// to options.workspace, or to a stream-ordered allocation of backward_workspace_size() bytes when
// it is null. No floating-point atomics, bitwise reproducible. Asynchronous: nothing synchronises.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <type_traits>

#include "../arguments.hpp"
#include "../config.hpp"
#include "backward_kernel.cuh"
#include "tensor_core_backward_dk_dv_kernel.cuh"
#include "tensor_core_backward_dq_kernel.cuh"
#include "backward_plan.hpp"
#include "error.cuh"
#include "forward.cuh"
#include "launch_checks.hpp"
#include "options.cuh"

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

// The checks that need the device, before anything is enqueued: shared memory against its limit
// (std::invalid_argument), no error pending from the caller; then the kernels' shared-memory
// grants (function attributes, not stream work).
template <class T>
void prepare_backward_launch(const Config& config, const Shape& shape, const BackwardPlan& plan) {
  const DeviceLimits limits = current_device_limits();
  check_shared_memory(std::max(plan.dq_shared_bytes, plan.dk_dv_shared_bytes), limits.shared_bytes,
                      config, shape, "dilated_attention::cuda::backward");
  check_no_pending_error("dilated_attention::cuda::backward");
  const BackwardKernels kernels = backward_kernels_for<T>(plan.params.f.head_dim);
  grant_shared_memory(kernels.dq, backward_grants<T>(0, plan.params.f.head_dim), limits.device,
                      plan.dq_shared_bytes);
  grant_shared_memory(kernels.dk_dv, backward_grants<T>(1, plan.params.f.head_dim), limits.device,
                      plan.dk_dv_shared_bytes);
}

// The three launches of a prepared plan whose workspace is bound, on `stream`.
template <class T>
void enqueue_backward(const BackwardPlan& plan, cudaStream_t stream) {
  const BackwardKernels kernels = backward_kernels_for<T>(plan.params.f.head_dim);
  const auto threads = static_cast<unsigned>(plan.threads);
  // The row-statistics kernel needs at most 4 KiB of shared memory: no attribute.
  kernels.row_statistics<<<static_cast<unsigned>(plan.query_blocks), threads, plan.shared_bytes,
                           stream>>>(plan.params);
  check(cudaGetLastError(), "dilated attention backward row-statistics kernel launch");
  kernels.dq<<<static_cast<unsigned>(plan.dq_blocks), static_cast<unsigned>(plan.dq_threads),
               plan.dq_shared_bytes, stream>>>(plan.params);
  check(cudaGetLastError(), "dilated attention backward dQ kernel launch");
  kernels.dk_dv<<<static_cast<unsigned>(plan.dk_dv_blocks), static_cast<unsigned>(plan.dk_dv_threads),
                  plan.dk_dv_shared_bytes, stream>>>(plan.params);
  check(cudaGetLastError(), "dilated attention backward dK/dV kernel launch");
}

}  // namespace detail

// docs/semantics.md "The gradient" on device pointers: inputs, forward_outputs (out and the
// forward's float LSE, [batch, num_heads, seq_len]) and d_out are read; gradients.d_q, .d_k, .d_v
// are overwritten. T is __half, __nv_bfloat16 or float; arithmetic is fp32. The row statistics
// go to options.workspace (device memory of at least backward_workspace_size(config, shape)
// bytes, 256-byte aligned, that nothing else uses until the call's work on options.stream is
// done) or, when it is null, to backward_workspace_size() bytes the call allocates with
// cudaMallocAsync on options.stream and frees with cudaFreeAsync after its launches, on the same
// stream. Bad arguments (a given workspace too small, misaligned or overlapping a tensor among
// them) raise std::invalid_argument before anything is enqueued; CUDA failures raise
// std::runtime_error. Asynchronous: no synchronisation; the gradients are ready when the stream
// reaches the call's last launch.
template <class T>
void backward(const Config& config, const Shape& shape,
              const Inputs<dilated_attention::detail::identity_t<T>>& inputs,
              const Outputs<const dilated_attention::detail::identity_t<T>>& forward_outputs,
              View<const dilated_attention::detail::identity_t<T>> d_out,
              const Gradients<T>& gradients, const Options& options = {}) {
  static_assert(is_supported_type_v<T>,
                "dilated_attention::cuda::backward supports __half, __nv_bfloat16 and float");
  static_assert(std::is_same_v<lse_type_t<T>, float>, "the CUDA LSE is float");
  const View<const T> q = inputs.q, k = inputs.k, v = inputs.v, out = forward_outputs.out;
  const float* const lse = forward_outputs.lse;
  const View<T> d_q = gradients.d_q, d_k = gradients.d_k, d_v = gradients.d_v;
  validate_backward(config, shape, q, k, v, out, lse, d_out, d_q, d_k, d_v);
  check_backend_limits(config, shape);
  if (options.workspace != nullptr)
    check_backward_workspace<T>(config, shape, q, k, v, out, lse, d_out, d_q, d_k, d_v,
                                options.workspace, options.workspace_bytes);
  BackwardPlan plan = make_backward_plan_without_workspace<T>(
      config, shape, q, k, v, out, lse, d_out, d_q, d_k, d_v, kernel_kind_v<T>);
  detail::prepare_backward_launch<T>(config, shape, plan);  // the last check that can reject
  if (options.workspace != nullptr) {
    bind_backward_workspace(plan, config, shape, options.workspace);
    detail::enqueue_backward<T>(plan, options.stream);
    return;
  }
  void* workspace = nullptr;
  check(cudaMallocAsync(&workspace, backward_workspace_size(config, shape), options.stream),
        "cudaMallocAsync(backward workspace)");
  bind_backward_workspace(plan, config, shape, workspace);
  try {
    detail::enqueue_backward<T>(plan, options.stream);
  } catch (...) {
    cudaFreeAsync(workspace, options.stream);  // best effort: the launch error is the one to report
    throw;
  }
  check(cudaFreeAsync(workspace, options.stream), "cudaFreeAsync(backward workspace)");
}

// Deprecated in 0.1.0, removed in 0.2.0: the positional spelling, forwarding to the call above.
template <class T>
[[deprecated(
    "use cuda::backward<T>(config, shape, {q, k, v}, {out, lse}, d_out, "
    "{d_q, d_k, d_v}, {stream, workspace, workspace_bytes}); removed in 0.2.0")]] void
backward(const Config& config, const Shape& shape,
         View<const dilated_attention::detail::identity_t<T>> q,
         View<const dilated_attention::detail::identity_t<T>> k,
         View<const dilated_attention::detail::identity_t<T>> v,
         View<const dilated_attention::detail::identity_t<T>> out, const float* lse,
         View<const dilated_attention::detail::identity_t<T>> d_out, View<T> d_q, View<T> d_k,
         View<T> d_v, void* workspace, std::size_t workspace_bytes, cudaStream_t stream = nullptr) {
  // The old spelling never allocated: a null workspace is still rejected.
  if (workspace == nullptr) {
    validate_backward(config, shape, q, k, v, out, lse, d_out, d_q, d_k, d_v);
    check_backend_limits(config, shape);
    check_backward_workspace<T>(config, shape, q, k, v, out, lse, d_out, d_q, d_k, d_v, workspace,
                                workspace_bytes);  // throws
  }
  cuda::backward<T>(config, shape, Inputs<T>{q, k, v}, Outputs<const T>{out, lse}, d_out,
                    Gradients<T>{d_q, d_k, d_v}, Options{stream, workspace, workspace_bytes});
}

}  // namespace dilated_attention::cuda
