#pragma once
// dilated_attention::cuda::forward: the host entry point of the GPU back end (docs/semantics.md "Entry points").
// validate() first (it only does arithmetic on the pointers and strides, so device pointers are
// fine), then the back end's own limits, then the launch plan, then one kernel launch on
// options.stream (detail::launch, which also checks shared memory against the device's limit and that
// no earlier CUDA error is pending). Nothing is allocated; the call is asynchronous like any launch on a stream.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../arguments.hpp"
#include "../config.hpp"
#include "error.cuh"
#include "launch_checks.hpp"
#include "launch_plan.hpp"
#include "options.cuh"
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

// The dynamic shared memory each forward kernel was granted per device (launch_checks.hpp).
template <class T>
SharedMemoryGrants& shared_memory_grants(std::int64_t head_dim) {
  static SharedMemoryGrants grants[4];  // head_dim 32, 64, 96, 128
  return grants[head_dim / 32 - 1];
}

// The current device and its opt-in limit of dynamic shared memory per block.
struct DeviceLimits {
  int device;
  std::size_t shared_bytes;
};
inline DeviceLimits current_device_limits() {
  DeviceLimits limits{0, 0};
  check(cudaGetDevice(&limits.device), "cudaGetDevice");
  int bytes = 0;
  check(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, limits.device),
        "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  limits.shared_bytes = static_cast<std::size_t>(bytes);
  return limits;
}

// An error already pending in this host thread comes from an earlier call of the caller, not from
// us: say so, instead of letting the cudaGetLastError after our launch report it as ours. The
// error is left pending (cudaPeekAtLastError), so the caller's own checks still see it.
inline void check_no_pending_error(const char* entry_point) {
  const cudaError_t pending = cudaPeekAtLastError();
  if (pending == cudaSuccess) return;
  throw std::runtime_error(std::string("dilated_attention::cuda: ") + entry_point +
                           " not launched: a CUDA error from an earlier call (not from "
                           "dilated_attention) is pending: " + cudaGetErrorName(pending) + ": " +
                           cudaGetErrorString(pending));
}

// Grants `bytes` of dynamic shared memory to `kernel` on `device` unless already granted.
template <class Kernel>
void grant_shared_memory(Kernel kernel, SharedMemoryGrants& grants, int device, std::size_t bytes) {
  if (grants.covers(device, bytes)) return;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes)),
        "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  grants.record(device, bytes);
}

// Runs a plan made by make_launch_plan<T>, after the checks that need the device: shared memory
// against its limit (std::invalid_argument), no error pending from the caller. Only forward()
// calls it, after validate().
template <class T>
void launch(const Config& config, const Shape& shape, const LaunchPlan& plan,
            cudaStream_t stream) {
  const DeviceLimits limits = current_device_limits();
  check_shared_memory(plan.shared_bytes, limits.shared_bytes, config, shape,
                      "dilated_attention::cuda::forward");
  check_no_pending_error("dilated_attention::cuda::forward");
  const KernelFunction kernel = kernel_for<T>(plan.params.head_dim);
  grant_shared_memory(kernel, shared_memory_grants<T>(plan.params.head_dim), limits.device,
                      plan.shared_bytes);
  const auto blocks = static_cast<unsigned>(plan.blocks);
  kernel<<<blocks, static_cast<unsigned>(plan.threads), plan.shared_bytes, stream>>>(plan.params);
  check(cudaGetLastError(), "dilated attention kernel launch");
}

}  // namespace detail

// docs/semantics.md "Entry points", GPU: inputs.q, .k, .v, outputs.out (and outputs.lse when not
// null: [batch, num_heads, seq_len] float, contiguous) are device pointers. Bad arguments raise
// std::invalid_argument before anything is enqueued; CUDA failures raise std::runtime_error with
// the CUDA error string. Asynchronous: one launch on options.stream, no synchronisation, no
// allocation (options.workspace is not used); the outputs are ready when the stream reaches it.
template <class T>
void forward(const Config& config, const Shape& shape,
             const Inputs<dilated_attention::detail::identity_t<T>>& inputs,
             const Outputs<T>& outputs, const Options& options = {}) {
  static_assert(is_supported_type_v<T>,
                "dilated_attention::cuda::forward supports __half, __nv_bfloat16 and float");
  static_assert(std::is_same_v<lse_type_t<T>, float>, "the CUDA LSE is float");
  const View<const T> q = inputs.q, k = inputs.k, v = inputs.v;
  const View<T> out = outputs.out;
  float* const lse = outputs.lse;
  validate(config, shape, q, k, v, out, lse);
  const LaunchPlan plan = make_launch_plan<T>(config, shape, q, k, v, out, lse, kernel_kind_v<T>);
  detail::launch<T>(config, shape, plan, options.stream);
}

// Deprecated in 0.1.0, removed in 0.2.0: the positional spelling, forwarding to the call above.
template <class T>
[[deprecated(
    "use cuda::forward<T>(config, shape, {q, k, v}, {out, lse}, {stream}); removed in "
    "0.2.0")]] void
forward(const Config& config, const Shape& shape,
        View<const dilated_attention::detail::identity_t<T>> q,
        View<const dilated_attention::detail::identity_t<T>> k,
        View<const dilated_attention::detail::identity_t<T>> v, View<T> out, float* lse = nullptr,
        cudaStream_t stream = nullptr) {
  Options options;
  options.stream = stream;
  cuda::forward<T>(config, shape, Inputs<T>{q, k, v}, Outputs<T>{out, lse}, options);
}

}  // namespace dilated_attention::cuda
