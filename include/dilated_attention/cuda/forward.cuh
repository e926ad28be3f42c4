#pragma once
// dilated_attention::cuda::forward: the host entry point of the GPU back end (docs/semantics.md §4).
// validate() first (it only does arithmetic on the pointers and strides, so device pointers are
// fine), then the back end's own limits, then the launch plan, then one kernel launch on
// `stream`. Nothing is allocated; the call is asynchronous like any launch on a stream.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "../config.hpp"
#include "error.cuh"
#include "launch_plan.hpp"
#include "simt_kernel.cuh"
#include "tensor_core_kernel.cuh"

namespace dilated_attention::cuda {

template <class T>
inline constexpr bool is_supported_type_v =
    std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, float>;

// The kernel that runs for storage type T: tensor cores for 16-bit types, SIMT for float.
template <class T>
inline constexpr KernelKind kernel_kind_v =
    std::is_same_v<T, float> ? KernelKind::simt : KernelKind::tensor_core;

namespace detail {

using KernelFunction = void (*)(ForwardParams);

template <class T, int D>
KernelFunction kernel_for_head_dim() {
  if constexpr (std::is_same_v<T, float>)
    return &device::simt_forward_kernel<T, D>;
  else
    return &device::tensor_core_forward_kernel<T, D>;
}

template <class T>
KernelFunction kernel_for(std::int64_t head_dim) {
  switch (head_dim) {
    case 32: return kernel_for_head_dim<T, 32>();
    case 64: return kernel_for_head_dim<T, 64>();
    case 96: return kernel_for_head_dim<T, 96>();
    case 128: return kernel_for_head_dim<T, 128>();
  }
  return nullptr;  // unreachable: check_backend_limits rejected the head_dim
}

}  // namespace detail

// Runs a plan made by make_launch_plan<T>. Exposed so that benchmarks can time the launch alone.
template <class T>
void launch(const LaunchPlan& plan, cudaStream_t stream) {
  const detail::KernelFunction kernel = detail::kernel_for<T>(plan.params.head_dim);
  // More than 48 KiB of dynamic shared memory must be granted per kernel (and per device).
  if (plan.shared_bytes > 48 * 1024)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(plan.shared_bytes)),
          "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  const auto blocks = static_cast<unsigned>(plan.blocks);
  kernel<<<blocks, static_cast<unsigned>(plan.threads), plan.shared_bytes, stream>>>(plan.params);
  check(cudaGetLastError(), "dilated attention kernel launch");
}

// docs/semantics.md §4, GPU: q, k, v, out (and lse when not null: [batch, num_heads, seq_len] fp32,
// contiguous) are device pointers. Bad arguments raise std::invalid_argument before any device
// work; CUDA failures raise std::runtime_error with the CUDA error string. Asynchronous on
// `stream`: synchronise before reading the results on the host.
template <class T>
void forward(const Config& config, const Shape& shape,
             View<const dilated_attention::detail::identity_t<T>> q,
             View<const dilated_attention::detail::identity_t<T>> k,
             View<const dilated_attention::detail::identity_t<T>> v, View<T> out,
             float* lse = nullptr, cudaStream_t stream = nullptr) {
  static_assert(is_supported_type_v<T>,
                "dilated_attention::cuda::forward supports __half, __nv_bfloat16 and float");
  validate(config, shape, q, k, v, out, lse);
  const LaunchPlan plan = make_launch_plan<T>(config, shape, q, k, v, out, lse, kernel_kind_v<T>);
  launch<T>(plan, stream);
}

}  // namespace dilated_attention::cuda
