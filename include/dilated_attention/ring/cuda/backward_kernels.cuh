#pragma once
// The device kernels of the ring's CUDA gradient back end (ring/cuda/backward_backend.cuh,
// docs/semantics.md "The gradient"): what the CPU gradient back end (ring/cpu/backward_backend.hpp) does per
// block, batched per step so that a step is one or two launches on the compute stream.
//
// - ring_statistics_kernel (mean mixing): a block's (lse_b, D_b = weight·dO·O_b) for each of its
//   query rows, merged into the branch's (LSE_i, D_i) with merge.hpp's guarded merge, exactly as
//   the CPU back end's statistics() merges them.
// - ring_query_gradient_kernel: dQ += scale·dS K of a step's blocks, dS = P ∘ (weight·dP - D),
//   P = exp(scale·S - LSE), dP = dO Vᵀ; items grouped by (batch, query head), one thread block per
//   group and tile of 64 local query rows, one warp per query row.
// - ring_key_gradient_kernel: dK += scale·dSᵀ Q and dV += weight·Pᵀ dO of the same blocks (S and
//   dP computed again); items grouped by (batch, kv head), one thread block per group and tile of
//   64 destination rows (local key rows, or rows of a received piece), one warp per key row. The
//   destination is the fp32 accumulator of the shard's own rows, or the fp32 partial buffer at
//   the piece's offset (dK rows then dV rows, the received message's layout).
// The per-row kernels (D = dO·O, the returned partials, the cast) are in
// ring/cuda/backward_row_kernels.cuh.
// Determinism without atomics: every accumulator row is written by one warp at a time, in the
// group's fixed item order (a block barrier between items), and each warp sums its keys (or
// queries) in chunks of 32 in a fixed order with fixed shuffle trees: bitwise reproducible.
// The math is SIMT fp32 (no tensor cores): correctness and determinism first.
// Index math: Progression (pattern.hpp) only; the causal cut is Progression::count_up_to.

#include <cstdint>

#include "../../config.hpp"
#include "../../cuda/simt_kernel.cuh"
#include "../../merge.hpp"
#include "../../pattern.hpp"
#include "forward_kernels.cuh"

namespace dilated_attention::ring::device {

// One block of a step: query rows of one head against the keys of one (branch, segment, offset).
struct BackwardItem {
  std::int64_t set, batch, head, kv_head;  // set: the branch's row statistics (mean), else 0
  Progression queries;                     // global positions (the causal cut compares these)
  std::int64_t query_row;  // local row of queries.first; query j sits at query_row + j * stride
  Progression keys;        // global positions
  std::int64_t key_row;    // local row of keys.first, when the keys are the shard's own
  const void* received;    // else: keys.count K rows then keys.count V rows, head_dim each
  float* partial;          // received keys: their dK rows then dV rows (fp32), in the partials
};

struct RingBackwardParams {
  const BackwardItem* items;
  const std::int64_t*
      group_begin;  // items of (non-empty) group g: [group_begin[g], group_begin[g + 1])
  const void *q, *k, *v, *d_out;
  Strides q_strides, k_strides, v_strides, d_out_strides;
  float* lse;    // [set][batch][heads][rows]: the forward's LSE (softmax) or each branch's (mean)
  float* delta;  // [set][batch][heads][rows]: D
  float* d_q;    // [batch][heads][rows][head_dim]
  float *d_k, *d_v;  // [batch][kv_heads][rows][head_dim]
  std::int64_t batch, heads, kv_heads, rows, tiles;
  float scale, weight;
  bool causal;
};

namespace backward_detail {

template <class T>
__device__ __forceinline__ const T* row_of(const void* base, const Strides& s, std::int64_t b,
                                           std::int64_t x, std::int64_t head) {
  return static_cast<const T*>(base) + b * s.batch + x * s.seq + head * s.head;
}

template <class T>
__device__ __forceinline__ float dot(const float* shared_row, const T* row, int d_count) {
  using dilated_attention::cuda::device::to_float;
  float sum = 0.f;
  for (int d = 0; d < d_count; ++d) sum = fmaf(shared_row[d], to_float(row[d]), sum);
  return sum;
}

// The statistics of one (set, batch, head, local row): its index in lse / delta.
__device__ __forceinline__ std::int64_t statistic(const RingBackwardParams& p,
                                                  const BackwardItem& item, std::int64_t row) {
  return ((item.set * p.batch + item.batch) * p.heads + item.head) * p.rows + row;
}

}  // namespace backward_detail

// `Statistics` = true: ring_statistics_kernel; false: ring_query_gradient_kernel. Both walk a
// query row's keys in chunks of 32 (lane j: key j of the chunk); q and dO rows in shared memory.
template <class T, int D, bool Statistics>
__device__ void query_side(const RingBackwardParams& p) {
  static_assert(D % 32 == 0 && D <= 128, "head_dim must be a multiple of 32, at most 128");
  constexpr int per_lane = D / 32;
  const float inf = __int_as_float(0x7f800000);
  using backward_detail::dot;
  using dilated_attention::cuda::device::ScoreBase;
  using dilated_attention::cuda::device::to_float;
  using dilated_attention::cuda::device::warp_online_softmax_step;
  using dilated_attention::cuda::device::warp_sum;
  using dilated_attention::cuda::device::WarpSoftmaxStep;

  extern __shared__ float ring_query_rows[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* const query = ring_query_rows + warp * 2 * D;
  float* const upstream = query + D;  // dO of the row
  const std::int64_t group = blockIdx.x / p.tiles, tile = blockIdx.x % p.tiles;
  const std::int64_t row_lo = tile * block_query_rows;
  const std::int64_t row_hi =
      row_lo + block_query_rows < p.rows ? row_lo + block_query_rows : p.rows;

  for (std::int64_t index = p.group_begin[group]; index < p.group_begin[group + 1]; ++index) {
    const BackwardItem item = p.items[index];
    const Progression local{item.query_row, item.queries.stride, item.queries.count};
    const Progression mine = local.within(row_lo, row_hi);
    const T* const k_base = static_cast<const T*>(p.k) + item.batch * p.k_strides.batch +
                            item.kv_head * p.k_strides.head;
    const T* const v_base = static_cast<const T*>(p.v) + item.batch * p.v_strides.batch +
                            item.kv_head * p.v_strides.head;
    const T* const packed = static_cast<const T*>(item.received);
    for (std::int64_t m = warp; m < mine.count; m += block_warps) {
      const std::int64_t row = mine.at(m);
      const std::int64_t x = item.queries.at(local.index_of(row));
      const std::int64_t at = backward_detail::statistic(p, item, row);
      const float row_lse = Statistics ? 0.f : p.lse[at];
      const float row_delta = Statistics ? 0.f : p.delta[at];
      std::int64_t limit = p.causal ? item.keys.count_up_to(x) : item.keys.count;
      if (!Statistics && row_lse == -inf) limit = 0;  // an empty row: nothing flows back
      const T* const q_row =
          backward_detail::row_of<T>(p.q, p.q_strides, item.batch, row, item.head);
      const T* const g_row =
          backward_detail::row_of<T>(p.d_out, p.d_out_strides, item.batch, row, item.head);
      __syncwarp();  // the previous row is no longer read
      for (int d = lane; d < D; d += 32) {
        query[d] = to_float(q_row[d]);
        upstream[d] = to_float(g_row[d]);
      }
      __syncwarp();

      float row_max = -inf, row_sum = 0.f, row_dot = 0.f, acc[per_lane];
#pragma unroll
      for (int e = 0; e < per_lane; ++e) acc[e] = 0.f;
      for (std::int64_t chunk = 0; chunk < limit; chunk += 32) {
        const std::int64_t j = chunk + lane;
        const bool valid = j < limit;
        float score = -inf, d_prob = 0.f;
        if (valid) {
          const T* const k_row =
              packed != nullptr ? packed + j * D
                                : k_base + (item.key_row + j * item.keys.stride) * p.k_strides.seq;
          const T* const v_row =
              packed != nullptr ? packed + (item.keys.count + j) * D
                                : v_base + (item.key_row + j * item.keys.stride) * p.v_strides.seq;
          score = dot(query, k_row, D) * p.scale;
          d_prob = dot(upstream, v_row, D);
        }
        if constexpr (Statistics) {
          // Online softmax of the block's scores; row_dot accumulates p_j (dO·v_j) beside it.
          const WarpSoftmaxStep step =
              warp_online_softmax_step<ScoreBase::e>(row_max, row_sum, score, valid);
          row_dot = row_dot * step.factor + warp_sum(step.prob * d_prob);
        } else {
          const float prob = valid ? expf(score - row_lse) : 0.f;
          const float d_score = p.scale * prob * (p.weight * d_prob - row_delta);
          const std::int64_t here = limit - chunk < 32 ? limit - chunk : 32;
          for (int jj = 0; jj < here; ++jj) {
            const float ds = __shfl_sync(0xffffffffu, d_score, jj);
            const std::int64_t key = chunk + jj;
            const T* const k_row =
                packed != nullptr
                    ? packed + key * D
                    : k_base + (item.key_row + key * item.keys.stride) * p.k_strides.seq;
#pragma unroll
            for (int e = 0; e < per_lane; ++e)
              acc[e] = fmaf(ds, to_float(k_row[lane + 32 * e]), acc[e]);
          }
        }
      }
      if constexpr (Statistics) {
        const float lse = row_sum > 0.f ? row_max + logf(row_sum) : -inf;
        const float delta = row_sum > 0.f ? p.weight * row_dot / row_sum : 0.f;
        const MergeWeights<float> w = merge_weights(p.lse[at], lse);
        __syncwarp();  // every lane has read the old lse
        if (lane == 0) {
          p.delta[at] = w.a * p.delta[at] + w.b * delta;
          p.lse[at] = w.lse;
        }
      } else {
        float* const d_q_row = p.d_q + ((item.batch * p.heads + item.head) * p.rows + row) * D;
#pragma unroll
        for (int e = 0; e < per_lane; ++e) d_q_row[lane + 32 * e] += acc[e];
      }
    }
    __syncthreads();  // the next item may touch a row another warp handled in this one
  }
}

template <class T, int D>
__global__ void __launch_bounds__(block_threads)
    ring_statistics_kernel(const RingBackwardParams p) {
  query_side<T, D, true>(p);
}

template <class T, int D>
__global__ void __launch_bounds__(block_threads)
    ring_query_gradient_kernel(const RingBackwardParams p) {
  query_side<T, D, false>(p);
}

// dK and dV of a step's blocks: one warp per key row, its k and v rows in shared memory; the
// visible queries in chunks of 32 (lane i: query i of the chunk).
template <class T, int D>
__global__ void __launch_bounds__(block_threads)
    ring_key_gradient_kernel(const RingBackwardParams p) {
  static_assert(D % 32 == 0 && D <= 128, "head_dim must be a multiple of 32, at most 128");
  constexpr int per_lane = D / 32;
  const float inf = __int_as_float(0x7f800000);
  using backward_detail::dot;
  using dilated_attention::cuda::device::to_float;

  extern __shared__ float ring_query_rows[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* const key = ring_query_rows + warp * 2 * D;
  float* const value = key + D;
  const std::int64_t group = blockIdx.x / p.tiles, tile = blockIdx.x % p.tiles;
  const std::int64_t row_lo = tile * block_query_rows;
  const std::int64_t row_hi =
      row_lo + block_query_rows < p.rows ? row_lo + block_query_rows : p.rows;

  for (std::int64_t index = p.group_begin[group]; index < p.group_begin[group + 1]; ++index) {
    const BackwardItem item = p.items[index];
    const T* const packed = static_cast<const T*>(item.received);
    // Destination rows: local key rows, or row j of the received piece.
    const Progression destination =
        packed != nullptr ? Progression{0, 1, item.keys.count}
                          : Progression{item.key_row, item.keys.stride, item.keys.count};
    const Progression mine = destination.within(row_lo, row_hi);
    for (std::int64_t m = warp; m < mine.count; m += block_warps) {
      const std::int64_t j = destination.index_of(mine.at(m));
      const std::int64_t y = item.keys.at(j);
      const T* const k_row =
          packed != nullptr
              ? packed + j * D
              : backward_detail::row_of<T>(p.k, p.k_strides, item.batch, mine.at(m), item.kv_head);
      const T* const v_row =
          packed != nullptr
              ? packed + (item.keys.count + j) * D
              : backward_detail::row_of<T>(p.v, p.v_strides, item.batch, mine.at(m), item.kv_head);
      __syncwarp();
      for (int d = lane; d < D; d += 32) {
        key[d] = to_float(k_row[d]);
        value[d] = to_float(v_row[d]);
      }
      __syncwarp();
      const std::int64_t first = p.causal ? item.queries.count_up_to(y - 1) : 0;  // x >= y
      float acc_k[per_lane], acc_v[per_lane];
#pragma unroll
      for (int e = 0; e < per_lane; ++e) acc_k[e] = acc_v[e] = 0.f;
      for (std::int64_t chunk = first; chunk < item.queries.count; chunk += 32) {
        const std::int64_t i = chunk + lane;
        float prob = 0.f, d_score = 0.f;
        if (i < item.queries.count) {
          const std::int64_t row = item.query_row + i * item.queries.stride;
          const std::int64_t at = backward_detail::statistic(p, item, row);
          const float row_lse = p.lse[at];
          if (row_lse != -inf) {
            const float score = dot(
                key, backward_detail::row_of<T>(p.q, p.q_strides, item.batch, row, item.head), D);
            const float d_prob = dot(
                value,
                backward_detail::row_of<T>(p.d_out, p.d_out_strides, item.batch, row, item.head),
                D);
            prob = expf(score * p.scale - row_lse);
            d_score = p.scale * prob * (p.weight * d_prob - p.delta[at]);
          }
        }
        const std::int64_t here = item.queries.count - chunk < 32 ? item.queries.count - chunk : 32;
        for (int ii = 0; ii < here; ++ii) {
          const float p_i = __shfl_sync(0xffffffffu, prob, ii);
          const float ds_i = __shfl_sync(0xffffffffu, d_score, ii);
          const std::int64_t row = item.query_row + (chunk + ii) * item.queries.stride;
          const T* const q_row =
              backward_detail::row_of<T>(p.q, p.q_strides, item.batch, row, item.head);
          const T* const g_row =
              backward_detail::row_of<T>(p.d_out, p.d_out_strides, item.batch, row, item.head);
#pragma unroll
          for (int e = 0; e < per_lane; ++e) {
            acc_k[e] = fmaf(ds_i, to_float(q_row[lane + 32 * e]), acc_k[e]);
            acc_v[e] = fmaf(p_i, to_float(g_row[lane + 32 * e]), acc_v[e]);
          }
        }
      }
      float* d_k_row;
      float* d_v_row;
      if (packed != nullptr) {
        d_k_row = item.partial + j * D;
        d_v_row = item.partial + (item.keys.count + j) * D;
      } else {
        const std::int64_t at =
            ((item.batch * p.kv_heads + item.kv_head) * p.rows + mine.at(m)) * D;
        d_k_row = p.d_k + at;
        d_v_row = p.d_v + at;
      }
#pragma unroll
      for (int e = 0; e < per_lane; ++e) {
        d_k_row[lane + 32 * e] += acc_k[e];
        d_v_row[lane + 32 * e] += p.weight * acc_v[e];
      }
    }
    __syncthreads();  // the next item may touch a row another warp handled in this one
  }
}

}  // namespace dilated_attention::ring::device
