#pragma once
// The fp32 forward kernel: plain fp32 FMA on the CUDA cores (no TF32), so float inputs keep
// float accuracy (errors of a few ulp times the accumulated length, ~1e-6 relative).
//
// One warp per query row (batch, head, x). Its keys in each branch are asked of the pattern
// (BranchGeometry::keys, the very progression the reference uses) and taken 32 at a time: lane j
// scores key j against the row's query (held in shared memory), the warp folds the 32 scores
// into the row's online-softmax state, and each lane accumulates its D/32 output dimensions over
// the 32 keys, reading V rows coalesced. Reductions are fixed shuffle trees, so results are
// bitwise reproducible. This is a correctness path: it does not use tensor cores and is far
// slower than the 16-bit kernel.

#include <cstdint>

#include "../merge.hpp"
#include "launch_plan.hpp"
#include "online_softmax.cuh"

namespace dilated_attention::cuda::device {

template <class T>
__device__ __forceinline__ float to_float(T value) {
  return static_cast<float>(value);
}

template <class T, int D>
__global__ void __launch_bounds__(32 * detail::simt_rows_per_block, 4)
    simt_forward_kernel(const ForwardParams p) {
  static_assert(D % 32 == 0 && D <= 128, "head_dim must be a multiple of 32, at most 128");
  constexpr int per_lane = D / 32;
  constexpr int rows_per_block = detail::simt_rows_per_block;
  const float inf = __int_as_float(0x7f800000);
  constexpr float ln2 = 0.693147180559945309f;

  extern __shared__ float simt_query_rows[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* const query = simt_query_rows + warp * D;
  const bool mean = p.mixing == Mixing::mean;
  const std::int64_t rows = p.batch * p.heads * p.seq_len;

  for (std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * rows_per_block + warp; row < rows;
       row += static_cast<std::int64_t>(gridDim.x) * rows_per_block) {
    const std::int64_t x = row % p.seq_len, head = (row / p.seq_len) % p.heads;
    const std::int64_t batch = row / (p.seq_len * p.heads);
    const std::int64_t kv_head = p.kv_head(head);
    const T* const q_row =
        static_cast<const T*>(p.q) + batch * p.q_batch + x * p.q_seq + head * p.q_head;
    const T* const k_base = static_cast<const T*>(p.k) + batch * p.k_batch + kv_head * p.k_head;
    const T* const v_base = static_cast<const T*>(p.v) + batch * p.v_batch + kv_head * p.v_head;

    __syncwarp();  // the previous row's query is no longer read
    for (int d = lane; d < D; d += 32) query[d] = to_float(q_row[d]);
    __syncwarp();

    float row_max = -inf, row_sum = 0.f, lse_mean = -inf;
    float acc[per_lane], mean_acc[per_lane];
#pragma unroll
    for (int e = 0; e < per_lane; ++e) acc[e] = mean_acc[e] = 0.f;

    for (int i = 0; i < p.num_branches; ++i) {
      const Progression keys = p.branch(i).keys(x, p.offset(i, head), p.causal);
      for (std::int64_t chunk = 0; chunk < keys.count; chunk += 32) {
        const std::int64_t j = chunk + lane;
        const bool valid = j < keys.count;
        const std::int64_t y = valid ? keys.at(j) : 0;
        float score = -inf;
        if (valid) {
          const T* const k_row = k_base + y * p.k_seq;
          float dot = 0.f;
#pragma unroll 8
          for (int d = 0; d < D; ++d) dot = fmaf(query[d], to_float(k_row[d]), dot);
          score = dot * p.scale_log2;
        }
        const float prob = warp_online_softmax_step(row_max, row_sum, acc, score, valid);
        const std::int64_t here = keys.count - chunk < 32 ? keys.count - chunk : 32;
        for (int jj = 0; jj < here; ++jj) {
          const float p_j = __shfl_sync(0xffffffffu, prob, jj);
          const std::int64_t y_j = __shfl_sync(0xffffffffu, y, jj);
          const T* const v_row = v_base + y_j * p.v_seq;
#pragma unroll
          for (int e = 0; e < per_lane; ++e)
            acc[e] = fmaf(p_j, to_float(v_row[lane + 32 * e]), acc[e]);
        }
      }
      if (mean) {
        if (row_sum > 0.f) {
          const float inverse = 1.f / (row_sum * static_cast<float>(p.num_branches));
#pragma unroll
          for (int e = 0; e < per_lane; ++e) mean_acc[e] += acc[e] * inverse;
          lse_mean = log_add_exp(lse_mean, (row_max + log2f(row_sum)) * ln2);
        }
#pragma unroll
        for (int e = 0; e < per_lane; ++e) acc[e] = 0.f;
        row_max = -inf;
        row_sum = 0.f;
      }
    }

    T* const out_row = static_cast<T*>(p.out) + batch * p.o_batch + x * p.o_seq + head * p.o_head;
    const float inverse = row_sum > 0.f ? 1.f / row_sum : 0.f;
#pragma unroll
    for (int e = 0; e < per_lane; ++e)
      out_row[lane + 32 * e] = static_cast<T>(mean ? mean_acc[e] : acc[e] * inverse);
    if (p.lse != nullptr && lane == 0)
      p.lse[(batch * p.heads + head) * p.seq_len + x] =
          mean ? lse_mean : (row_sum > 0.f ? (row_max + log2f(row_sum)) * ln2 : -inf);
  }
}

}  // namespace dilated_attention::cuda::device
