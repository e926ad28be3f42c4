#pragma once
// The backward kernels (docs/semantics.md "The gradient"), plain fp32 arithmetic on the CUDA cores for every
// storage type (16-bit inputs are widened on load; gradients are rounded to T once, at the end).
// One warp per row; the three kernels and their ownership rules are described in
// backward_plan.hpp. A row's keys (or a key's queries) are taken 32 at a time: lane j handles
// element j (one dot product over head_dim each), then the warp walks the 32 in order and every
// lane accumulates its head_dim / 32 gradient dimensions -- a fixed order, no atomics, so the
// gradients are bitwise reproducible. This is the correctness-first structure (as the fp32
// forward); a tiled tensor-core version is the next step (docs/cuda.md).

#include <cstdint>

#include "backward_plan.hpp"
#include "launch_plan.hpp"
#include "simt_kernel.cuh"  // warp_max, warp_sum, to_float

namespace dilated_attention::cuda::device {

// Loads `D` elements of a row, times `factor`, into a warp's shared row (lane-strided).
template <class T, int D>
__device__ __forceinline__ void load_row(float* shared, const T* row, float factor, int lane) {
  for (int d = lane; d < D; d += 32) shared[d] = to_float(row[d]) * factor;
}

// Dot product of a shared fp32 row with a global row of T, in a fixed order.
template <class T, int D>
__device__ __forceinline__ float dot_row(const float* shared, const T* row) {
  float dot = 0.f;
#pragma unroll 8
  for (int d = 0; d < D; ++d) dot = fmaf(shared[d], to_float(row[d]), dot);
  return dot;
}

// The LSE and D that the terms of (row, branch i) use: the row's own (softmax mixing: one
// softmax over every branch) or branch i's (mean mixing).
struct RowStatistics {
  float lse_log2;  // LSE * log2 e, -inf for a row that attends nothing
  float delta;
};
__device__ __forceinline__ RowStatistics row_statistics(const BackwardParams& p, int branch,
                                                        std::int64_t row) {
  constexpr float log2e = 1.4426950408889634f;
  const bool mean = p.f.mixing == Mixing::mean;
  const std::int64_t at = mean ? branch * p.rows + row : row;
  const float lse = mean ? p.branch_lse[at] : p.f.lse[row];
  return {lse * log2e, p.delta[at]};
}

// Kernel 1: D = dO . O per row (softmax, and mean for a row that at most one branch selects), or
// per branch LSE_i and D_i = (dO / G) . O_i with O_i recomputed by an online softmax over the
// branch's keys (mean, a row that several branches select).
template <class T, int D>
__global__ void __launch_bounds__(backward_block_threads, 4)
    backward_row_statistics_kernel(const BackwardParams p) {
  constexpr int per_lane = D / 32;
  constexpr float ln2 = 0.693147180559945309f;
  const float inf = __int_as_float(0x7f800000);
  extern __shared__ float backward_rows[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* const query = backward_rows + warp * 2 * D;
  float* const grad_out = query + D;
  const ForwardParams& f = p.f;
  for (std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * backward_block_warps + warp;
       row < p.rows; row += static_cast<std::int64_t>(gridDim.x) * backward_block_warps) {
    const std::int64_t x = row % f.seq_len, head = (row / f.seq_len) % f.heads;
    const std::int64_t batch = row / (f.seq_len * f.heads);
    const T* const do_row = static_cast<const T*>(p.d_out) + batch * p.do_batch + x * p.do_seq + head * p.do_head;
    // mean: the branches that select this row. With at most one, O = O_i / G and LSE = LSE_i,
    // so D_i = (dO / G) . O_i = dO . O and the forward's LSE serve as they do for softmax
    // (docs/semantics.md "Gradient of the mean mixing"); only rows of several branches recompute.
    int selecting = 0, sole = -1;
    if (f.mixing == Mixing::mean)
      for (int i = 0; i < f.num_branches; ++i)
        if (f.branch(i).selected(x, f.offset(i, head))) ++selecting, sole = i;
    if (selecting <= 1) {
      const T* const o_row = static_cast<const T*>(f.out) + batch * f.o_batch + x * f.o_seq + head * f.o_head;
      float partial = 0.f;
#pragma unroll
      for (int e = 0; e < per_lane; ++e)
        partial = fmaf(to_float(do_row[lane + 32 * e]), to_float(o_row[lane + 32 * e]), partial);
      const float delta = warp_sum(partial);
      if (lane == 0) {
        if (f.mixing == Mixing::softmax) {
          p.delta[row] = delta;
        } else {
          for (int i = 0; i < f.num_branches; ++i) {
            p.delta[i * p.rows + row] = i == sole ? delta : 0.f;
            p.branch_lse[i * p.rows + row] = i == sole ? f.lse[row] : -inf;
          }
        }
      }
      continue;
    }
    const std::int64_t kv_head = f.kv_head(head);
    const T* const q_row = static_cast<const T*>(f.q) + batch * f.q_batch + x * f.q_seq + head * f.q_head;
    const T* const k_base = static_cast<const T*>(f.k) + batch * f.k_batch + kv_head * f.k_head;
    const T* const v_base = static_cast<const T*>(f.v) + batch * f.v_batch + kv_head * f.v_head;
    __syncwarp();  // the previous row is no longer read
    load_row<T, D>(query, q_row, 1.f, lane);
    load_row<T, D>(grad_out, do_row, p.grad_out_scale, lane);
    __syncwarp();
    for (int i = 0; i < f.num_branches; ++i) {
      const Progression keys = f.branch(i).keys(x, f.offset(i, head), f.causal);
      float row_max = -inf, row_sum = 0.f, acc[per_lane];
#pragma unroll
      for (int e = 0; e < per_lane; ++e) acc[e] = 0.f;
      for (std::int64_t chunk = 0; chunk < keys.count; chunk += 32) {
        const std::int64_t j = chunk + lane;
        const bool valid = j < keys.count;
        const std::int64_t y = valid ? keys.at(j) : 0;
        const float score =
            valid ? dot_row<T, D>(query, k_base + y * f.k_seq) * f.scale_log2 : -inf;
        const float prob = warp_online_softmax_step(row_max, row_sum, acc, score, valid);
        const std::int64_t here = keys.count - chunk < 32 ? keys.count - chunk : 32;
        for (int jj = 0; jj < here; ++jj) {
          const float p_j = __shfl_sync(0xffffffffu, prob, jj);
          const std::int64_t y_j = __shfl_sync(0xffffffffu, y, jj);
          const T* const v_row = v_base + y_j * f.v_seq;
#pragma unroll
          for (int e = 0; e < per_lane; ++e)
            acc[e] = fmaf(p_j, to_float(v_row[lane + 32 * e]), acc[e]);
        }
      }
      // D_i = (dO / G) . O_i with O_i = acc / sum; an unselected row has no terms (D_i = 0).
      float partial = 0.f;
      const float inverse = row_sum > 0.f ? 1.f / row_sum : 0.f;
#pragma unroll
      for (int e = 0; e < per_lane; ++e)
        partial = fmaf(grad_out[lane + 32 * e], acc[e] * inverse, partial);
      const float delta = warp_sum(partial);
      if (lane == 0) {
        p.delta[i * p.rows + row] = delta;
        p.branch_lse[i * p.rows + row] = row_sum > 0.f ? (row_max + log2f(row_sum)) * ln2 : -inf;
      }
    }
  }
}

// Kernel 2: dQ(x) = scale * sum over branches and keys y of dS(x, y) k_y, with
// dS = P (dO . v_y - D), P = exp(s - LSE).
template <class T, int D>
__global__ void __launch_bounds__(backward_block_threads, 4)
    backward_dq_kernel(const BackwardParams p) {
  constexpr int per_lane = D / 32;
  const float inf = __int_as_float(0x7f800000);
  extern __shared__ float backward_rows[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* const query = backward_rows + warp * 2 * D;
  float* const grad_out = query + D;
  const ForwardParams& f = p.f;
  for (std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * backward_block_warps + warp;
       row < p.rows; row += static_cast<std::int64_t>(gridDim.x) * backward_block_warps) {
    const std::int64_t x = row % f.seq_len, head = (row / f.seq_len) % f.heads;
    const std::int64_t batch = row / (f.seq_len * f.heads);
    const std::int64_t kv_head = f.kv_head(head);
    const T* const k_base = static_cast<const T*>(f.k) + batch * f.k_batch + kv_head * f.k_head;
    const T* const v_base = static_cast<const T*>(f.v) + batch * f.v_batch + kv_head * f.v_head;
    __syncwarp();
    load_row<T, D>(query, static_cast<const T*>(f.q) + batch * f.q_batch + x * f.q_seq + head * f.q_head, 1.f, lane);
    load_row<T, D>(grad_out, static_cast<const T*>(p.d_out) + batch * p.do_batch + x * p.do_seq + head * p.do_head,
                   p.grad_out_scale, lane);
    __syncwarp();
    float acc[per_lane];
#pragma unroll
    for (int e = 0; e < per_lane; ++e) acc[e] = 0.f;
    for (int i = 0; i < f.num_branches; ++i) {
      const Progression keys = f.branch(i).keys(x, f.offset(i, head), f.causal);
      if (keys.empty()) continue;
      const RowStatistics stats = row_statistics(p, i, row);
      if (stats.lse_log2 == -inf) continue;  // attends nothing (cannot happen with keys; kept safe)
      for (std::int64_t chunk = 0; chunk < keys.count; chunk += 32) {
        const std::int64_t j = chunk + lane;
        const bool valid = j < keys.count;
        const std::int64_t y = valid ? keys.at(j) : 0;
        float ds = 0.f;
        if (valid) {
          const float prob = exp2f(dot_row<T, D>(query, k_base + y * f.k_seq) * f.scale_log2 - stats.lse_log2);
          ds = prob * (dot_row<T, D>(grad_out, v_base + y * f.v_seq) - stats.delta);
        }
        const std::int64_t here = keys.count - chunk < 32 ? keys.count - chunk : 32;
        for (int jj = 0; jj < here; ++jj) {
          const float ds_j = __shfl_sync(0xffffffffu, ds, jj);
          const std::int64_t y_j = __shfl_sync(0xffffffffu, y, jj);
          const T* const k_row = k_base + y_j * f.k_seq;
#pragma unroll
          for (int e = 0; e < per_lane; ++e)
            acc[e] = fmaf(ds_j, to_float(k_row[lane + 32 * e]), acc[e]);
        }
      }
    }
    T* const dq_row = static_cast<T*>(p.d_q) + batch * p.dq_batch + x * p.dq_seq + head * p.dq_head;
#pragma unroll
    for (int e = 0; e < per_lane; ++e) dq_row[lane + 32 * e] = static_cast<T>(acc[e] * f.scale);
  }
}

// Kernel 3: dK(y) = scale * sum dS(x, y) q_x and dV(y) = sum P(x, y) dO(x) over every query head
// of y's GQA group, every branch, and the queries x of y's block in that branch (x >= y when
// causal) -- in that fixed order.
template <class T, int D>
__global__ void __launch_bounds__(backward_block_threads, 4)
    backward_dk_dv_kernel(const BackwardParams p) {
  constexpr int per_lane = D / 32;
  const float inf = __int_as_float(0x7f800000);
  extern __shared__ float backward_rows[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* const key = backward_rows + warp * 2 * D;
  float* const value = key + D;
  const ForwardParams& f = p.f;
  const std::int64_t group = f.heads / f.kv_heads;
  for (std::int64_t key_row = static_cast<std::int64_t>(blockIdx.x) * backward_block_warps + warp;
       key_row < p.key_rows;
       key_row += static_cast<std::int64_t>(gridDim.x) * backward_block_warps) {
    const std::int64_t y = key_row % f.seq_len, kv_head = (key_row / f.seq_len) % f.kv_heads;
    const std::int64_t batch = key_row / (f.seq_len * f.kv_heads);
    __syncwarp();
    load_row<T, D>(key, static_cast<const T*>(f.k) + batch * f.k_batch + y * f.k_seq + kv_head * f.k_head, 1.f, lane);
    load_row<T, D>(value, static_cast<const T*>(f.v) + batch * f.v_batch + y * f.v_seq + kv_head * f.v_head, 1.f, lane);
    __syncwarp();
    float acc_k[per_lane], acc_v[per_lane];
#pragma unroll
    for (int e = 0; e < per_lane; ++e) acc_k[e] = acc_v[e] = 0.f;
    for (std::int64_t head = kv_head * group; head < (kv_head + 1) * group; ++head) {
      const T* const q_base = static_cast<const T*>(f.q) + batch * f.q_batch + head * f.q_head;
      const T* const do_base = static_cast<const T*>(p.d_out) + batch * p.do_batch + head * p.do_head;
      const std::int64_t row_base = (batch * f.heads + head) * f.seq_len;
      for (int i = 0; i < f.num_branches; ++i) {
        // y's block in branch i for this head's offset: its queries attend y (when causal, those
        // at or after y). Empty when the offset does not select y.
        const Progression block = f.branch(i).keys(y, f.offset(i, head), false);
        const Progression queries = f.causal ? block.within(y, f.seq_len) : block;
        for (std::int64_t chunk = 0; chunk < queries.count; chunk += 32) {
          const std::int64_t j = chunk + lane;
          const bool valid = j < queries.count;
          const std::int64_t x = valid ? queries.at(j) : 0;
          float prob = 0.f, ds = 0.f;
          if (valid) {
            const RowStatistics stats = row_statistics(p, i, row_base + x);
            if (stats.lse_log2 != -inf) {
              prob = exp2f(dot_row<T, D>(key, q_base + x * f.q_seq) * f.scale_log2 - stats.lse_log2);
              ds = prob * (dot_row<T, D>(value, do_base + x * p.do_seq) * p.grad_out_scale - stats.delta);
            }
          }
          const std::int64_t here = queries.count - chunk < 32 ? queries.count - chunk : 32;
          for (int jj = 0; jj < here; ++jj) {
            const float p_j = __shfl_sync(0xffffffffu, prob, jj) * p.grad_out_scale;
            const float ds_j = __shfl_sync(0xffffffffu, ds, jj);
            const std::int64_t x_j = __shfl_sync(0xffffffffu, x, jj);
            const T* const q_row = q_base + x_j * f.q_seq;
            const T* const do_row = do_base + x_j * p.do_seq;
#pragma unroll
            for (int e = 0; e < per_lane; ++e) {
              acc_k[e] = fmaf(ds_j, to_float(q_row[lane + 32 * e]), acc_k[e]);
              acc_v[e] = fmaf(p_j, to_float(do_row[lane + 32 * e]), acc_v[e]);
            }
          }
        }
      }
    }
    T* const dk_row = static_cast<T*>(p.d_k) + batch * p.dk_batch + y * p.dk_seq + kv_head * p.dk_head;
    T* const dv_row = static_cast<T*>(p.d_v) + batch * p.dv_batch + y * p.dv_seq + kv_head * p.dv_head;
#pragma unroll
    for (int e = 0; e < per_lane; ++e) {
      dk_row[lane + 32 * e] = static_cast<T>(acc_k[e] * f.scale);
      dv_row[lane + 32 * e] = static_cast<T>(acc_v[e]);
    }
  }
}

}  // namespace dilated_attention::cuda::device
