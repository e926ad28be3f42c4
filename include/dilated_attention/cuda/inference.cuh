#pragma once
// dilated_attention::cuda::forward for the inference forms (docs/semantics.md "Inference forms",
// docs/cuda.md "Inference forms"): decode and chunked prefill (QueryRange), varlen (Sequences
// with packed K/V), paged K/V (Sequences + PagedKeyValues) and padded batches (ValidLengths).
//
// Memory: q, k, v, out, lse and the pages (paged.k, paged.v) are DEVICE pointers; the
// descriptions' arrays -- Sequences' offsets, lengths and begins, the page table, the valid
// lengths -- are HOST arrays. The call validates them on the host (std::invalid_argument naming
// the member, before anything is enqueued), packs what the kernels need into one small table,
// copies it into a pinned staging buffer of its own (inference_staging.hpp: reused once its last
// upload is done), and then, on options.stream: cudaMallocAsync of the device table (and of the
// split-KV partials), cudaMemcpyAsync of the table from the pinned buffer, the kernel launches,
// cudaFreeAsync. The host arrays need to stay valid only until the call returns; the call does
// not wait for the stream (docs/cuda.md "Inference forms"). Not for CUDA graph capture: a
// replayed upload would read a staging buffer that later calls reuse.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../arguments.hpp"
#include "../config.hpp"
#include "../sequences.hpp"
#include "error.cuh"
#include "forward.cuh"
#include "inference_kernel.cuh"
#include "inference_plan.hpp"
#include "inference_staging.hpp"
#include "options.cuh"

namespace dilated_attention::cuda {

namespace detail {

using InferenceKernel = void (*)(InferenceParams);

struct InferenceKernels {
  InferenceKernel row, piece, merge;
};

template <class T, int D>
InferenceKernels inference_kernels_for_head_dim() {
  return {&device::inference_row_kernel<T, D>, &device::decode_piece_kernel<T, D>,
          &device::decode_merge_kernel<T, D>};
}

template <class T>
InferenceKernels inference_kernels_for(std::int64_t head_dim) {
  switch (head_dim) {
    case 32: return inference_kernels_for_head_dim<T, 32>();
    case 64: return inference_kernels_for_head_dim<T, 64>();
    case 96: return inference_kernels_for_head_dim<T, 96>();
    default: return inference_kernels_for_head_dim<T, 128>();  // checked: 128
  }
}

// Bytes of the call's device buffer: the table, then (split path) the partials' o and lse.
inline std::size_t round_up_256(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

// Runs a plan of inference_plan.hpp on `stream`: one stream-ordered buffer for the table and the
// partials, the upload, one launch (row kernel) or two (piece, then merge kernel), the free.
template <class T>
void run_inference(InferencePlan plan, cudaStream_t stream) {
  if (plan.empty()) return;
  check_no_pending_error("dilated_attention::cuda::forward");
  const std::size_t table_bytes = plan.table.values.size() * sizeof(std::int64_t);
  const std::size_t partial_o_bytes =
      plan.partial_floats / static_cast<std::size_t>(plan.params.head_dim + 1) *
      static_cast<std::size_t>(plan.params.head_dim) * sizeof(float);
  const std::size_t partial_lse_bytes =
      plan.partial_floats / static_cast<std::size_t>(plan.params.head_dim + 1) * sizeof(float);
  const std::size_t total =
      round_up_256(table_bytes) + round_up_256(partial_o_bytes) + round_up_256(partial_lse_bytes);
  // The table goes through a pinned staging buffer (inference_staging.hpp), so that the upload
  // is asynchronous and the caller's arrays (and our vector) may go at once.
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  HostStaging& staging = HostStaging::instance();
  int slot = -1;
  void* const host = staging.acquire(table_bytes, device, slot);
  std::memcpy(host, plan.table.values.data(), table_bytes);
  void* buffer = nullptr;
  const cudaError_t allocated = cudaMallocAsync(&buffer, total, stream);
  if (allocated != cudaSuccess) {
    staging.release_unused(slot);
    check(allocated, "cudaMallocAsync (inference table)");
  }
  auto* const bytes = static_cast<unsigned char*>(buffer);
  plan.params.table = reinterpret_cast<const std::int64_t*>(bytes);
  plan.params.partial_o = reinterpret_cast<float*>(bytes + round_up_256(table_bytes));
  plan.params.partial_lse =
      reinterpret_cast<float*>(bytes + round_up_256(table_bytes) + round_up_256(partial_o_bytes));
  cudaError_t status = cudaMemcpyAsync(buffer, host, table_bytes, cudaMemcpyHostToDevice, stream);
  if (status != cudaSuccess) {
    staging.release_unused(slot);
  } else {
    try {
      staging.release_after(slot, stream);
    } catch (...) {
      (void)cudaFreeAsync(buffer, stream);
      throw;
    }
  }
  const InferenceKernels kernels = inference_kernels_for<T>(plan.params.head_dim);
  if (status == cudaSuccess) {
    const auto threads = static_cast<unsigned>(plan.threads);
    if (plan.split) {
      kernels
          .piece<<<static_cast<unsigned>(plan.piece_blocks), threads, plan.shared_bytes, stream>>>(
              plan.params);
      status = cudaGetLastError();
      if (status == cudaSuccess) {
        kernels.merge<<<static_cast<unsigned>(plan.row_blocks), threads, 0, stream>>>(plan.params);
        status = cudaGetLastError();
      }
    } else {
      kernels.row<<<static_cast<unsigned>(plan.row_blocks), threads, plan.shared_bytes, stream>>>(
          plan.params);
      status = cudaGetLastError();
    }
  }
  const cudaError_t freed = cudaFreeAsync(buffer, stream);
  check(status, "dilated attention inference table upload or kernel launch");
  check(freed, "cudaFreeAsync (inference table)");
}

}  // namespace detail

// Form 1, decode and chunked prefill: rows [range.begin, range.begin + range.count) of the
// forward over shape.seq_len (= kv_len) positions. q, out [B, count, H, D]; k, v [B, kv_len,
// Hkv, D]; lse [B, H, count] float (or null). count == 1 runs the split-KV decode kernels.
template <class T>
void forward(const Config& config, const Shape& shape, const QueryRange& range,
             const Inputs<dilated_attention::detail::identity_t<T>>& inputs,
             const Outputs<T>& outputs, const Options& options = {}) {
  static_assert(is_supported_type_v<T>,
                "dilated_attention::cuda::forward supports __half, __nv_bfloat16 and float");
  detail::run_inference<T>(plan_query_range<T>(config, shape, range, inputs, outputs),
                           options.stream);
}

// Form 2, varlen: sequences.query_offsets and .kv_offsets (host arrays) cut packed q, out
// [total_q, H, D] and k, v [total_k, Hkv, D] (views with batch dimension 1); lse [H, total_q].
// Each sequence is its own sequence. When no sequence has more than one query row, the split-KV
// decode kernels run.
template <class T>
void forward(const Config& config, const HeadShape& heads, const Sequences& sequences,
             const Inputs<dilated_attention::detail::identity_t<T>>& inputs,
             const Outputs<T>& outputs, const Options& options = {}) {
  static_assert(is_supported_type_v<T>,
                "dilated_attention::cuda::forward supports __half, __nv_bfloat16 and float");
  detail::run_inference<T>(plan_varlen<T>(config, heads, sequences, inputs, outputs),
                           options.stream);
}

// Form 3, paged K/V: q, out [total_q, H, D] packed by sequences.query_offsets; the keys of
// sequence b are its first sequences.kv_lengths[b] positions in the pages of `paged` (device
// pages, HOST page table). Any page size >= 1.
template <class T>
void forward(const Config& config, const HeadShape& heads, const Sequences& sequences,
             View<const dilated_attention::detail::identity_t<T>> q,
             const PagedKeyValues<dilated_attention::detail::identity_t<T>>& paged,
             const Outputs<T>& outputs, const Options& options = {}) {
  static_assert(is_supported_type_v<T>,
                "dilated_attention::cuda::forward supports __half, __nv_bfloat16 and float");
  detail::run_inference<T>(plan_paged<T>(config, heads, sequences, q, paged, outputs),
                           options.stream);
}

// Form 4, padded: [B, N, H, D] tensors with lengths.lengths[b] (host array) valid rows; rows at
// or past a length get O = 0 and LSE = -inf, and the inputs there are never read.
template <class T>
void forward(const Config& config, const Shape& shape, const ValidLengths& lengths,
             const Inputs<dilated_attention::detail::identity_t<T>>& inputs,
             const Outputs<T>& outputs, const Options& options = {}) {
  static_assert(is_supported_type_v<T>,
                "dilated_attention::cuda::forward supports __half, __nv_bfloat16 and float");
  detail::run_inference<T>(plan_padded<T>(config, shape, lengths, inputs, outputs), options.stream);
}

}  // namespace dilated_attention::cuda
