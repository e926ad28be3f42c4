#pragma once
// The kernels of the inference forms (cuda/inference.cuh; docs/cuda.md "Inference forms"). All
// three compute in fp32 on the CUDA cores for every storage type (__half, __nv_bfloat16, float)
// and read rows through InferenceParams' row addressing (packed or paged; inference_plan.hpp).
//
//  - inference_row_kernel: one warp per (row, head), any number of query rows per sequence, the
//    algorithm of simt_kernel.cuh (the keys of each branch asked of BranchGeometry over the
//    sequence's kv_len positions, 32 at a time, an online softmax across branches, fixed shuffle
//    trees). Rows that are not queries (the padded form past a length) get O = 0, LSE = -inf.
//  - decode_piece_kernel: the split-KV decode path's first half. One warp per (row, head, piece);
//    piece p is chunk p - piece_base[i] of branch i's key set, piece_keys keys of it (a constant
//    of the plan, never derived from the device). It writes the partial (o normalised over the
//    piece's keys, lse = ln sum exp) of the piece, or nothing when the piece has no keys.
//  - decode_merge_kernel: one warp per (row, head); folds the row's non-empty pieces in piece
//    order, branch by branch, with merge.hpp's guarded merge (softmax mixing merges the branches
//    too, mean mixing averages them), and writes O and the LSE.
// No atomics, no order that depends on scheduling: results are bitwise reproducible.

#include <cstdint>

#include "../merge.hpp"
#include "inference_plan.hpp"
#include "online_softmax.cuh"

namespace dilated_attention::cuda::device {

template <class T>
__device__ __forceinline__ float inference_load(T value) {
  return static_cast<float>(value);
}

// Folds the keys `keys` of one branch into the warp's running (row_max, row_sum, acc) state:
// the loop body of simt_forward_kernel with InferenceParams' row addressing. `query` holds the
// row's query in fp32 (shared memory); scores are in log2 units (scale_log2).
template <class T, int D>
__device__ __forceinline__ void inference_attend(const InferenceParams& p, std::int64_t seq,
                                                 std::int64_t kv_head, const Progression& keys,
                                                 const float* query, float& row_max, float& row_sum,
                                                 float (&acc)[D / 32]) {
  constexpr int per_lane = D / 32;
  const float inf = __int_as_float(0x7f800000);
  const int lane = threadIdx.x % 32;
  const T* const k_base = static_cast<const T*>(p.k) + kv_head * p.k_head;
  const T* const v_base = static_cast<const T*>(p.v) + kv_head * p.v_head;
  for (std::int64_t chunk = 0; chunk < keys.count; chunk += 32) {
    const std::int64_t j = chunk + lane;
    const bool valid = j < keys.count;
    float score = -inf;
    std::int64_t v_offset = 0;
    if (valid) {
      const std::int64_t y = keys.at(j);
      const T* const k_row = k_base + p.key_row(seq, y, p.k_batch, p.k_seq);
      v_offset = p.key_row(seq, y, p.v_batch, p.v_seq);
      float dot = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) dot = fmaf(query[d], inference_load(k_row[d]), dot);
      score = dot * p.scale_log2;
    }
    const float prob = warp_online_softmax_step(row_max, row_sum, acc, score, valid);
    const std::int64_t here = keys.count - chunk < 32 ? keys.count - chunk : 32;
    for (int jj = 0; jj < here; ++jj) {
      const float p_j = __shfl_sync(0xffffffffu, prob, jj);
      const std::int64_t at = __shfl_sync(0xffffffffu, v_offset, jj);
      const T* const v_row = v_base + at;
#pragma unroll
      for (int e = 0; e < per_lane; ++e)
        acc[e] = fmaf(p_j, inference_load(v_row[lane + 32 * e]), acc[e]);
    }
  }
}

// Loads the query row of (seq, i, head) into this warp's fp32 slot.
template <class T, int D>
__device__ __forceinline__ void inference_load_query(const InferenceParams& p, std::int64_t seq,
                                                     std::int64_t i, std::int64_t head,
                                                     float* query) {
  const int lane = threadIdx.x % 32;
  const T* const q_row = static_cast<const T*>(p.q) + p.q_row(seq, i, head);
  __syncwarp();  // the previous work's query is no longer read
  for (int d = lane; d < D; d += 32) query[d] = inference_load(q_row[d]);
  __syncwarp();
}

// O = 0 and LSE = -inf for a row that is not a query.
template <class T, int D>
__device__ __forceinline__ void inference_write_empty(const InferenceParams& p, std::int64_t seq,
                                                      std::int64_t i, std::int64_t head) {
  const int lane = threadIdx.x % 32;
  T* const out_row = static_cast<T*>(p.out) + p.out_row(seq, i, head);
  for (int d = lane; d < D; d += 32) out_row[d] = static_cast<T>(0.f);
  if (p.lse != nullptr && lane == 0) p.lse[p.lse_at(seq, i, head)] = -__int_as_float(0x7f800000);
}

template <class T, int D>
__global__ void __launch_bounds__(32 * inference_warps)
    inference_row_kernel(const InferenceParams p) {
  static_assert(D % 32 == 0 && D <= 128, "head_dim must be a multiple of 32, at most 128");
  constexpr int per_lane = D / 32;
  const float inf = __int_as_float(0x7f800000);
  constexpr float ln2 = 0.693147180559945309f;
  // The fp32 query rows of the block's warps; the same dynamic shared array as the fp32 forward
  // kernel (simt_kernel.cuh), which the host emulation provides.
  extern __shared__ float simt_query_rows[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* const query = simt_query_rows + warp * D;
  const bool mean = p.mixing == Mixing::mean;
  const std::int64_t items = p.rows * p.heads;

  for (std::int64_t item = static_cast<std::int64_t>(blockIdx.x) * inference_warps + warp;
       item < items; item += static_cast<std::int64_t>(gridDim.x) * inference_warps) {
    const std::int64_t row = item / p.heads, head = item % p.heads;
    const std::int64_t seq = p.sequence_of(row), i = row - p.row_first(seq);
    if (i >= p.valid(seq)) {
      inference_write_empty<T, D>(p, seq, i, head);
      continue;
    }
    const std::int64_t x = p.q_begin(seq) + i, n = p.kv_len(seq), kv_head = p.kv_head(head);
    inference_load_query<T, D>(p, seq, i, head, query);

    float row_max = -inf, row_sum = 0.f, lse_mean = -inf;
    float acc[per_lane], mean_acc[per_lane];
#pragma unroll
    for (int e = 0; e < per_lane; ++e) acc[e] = mean_acc[e] = 0.f;
    for (int b = 0; b < p.num_branches; ++b) {
      const Progression keys = p.branch(b, n).keys(x, p.offset(b, head), p.causal);
      inference_attend<T, D>(p, seq, kv_head, keys, query, row_max, row_sum, acc);
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
    T* const out_row = static_cast<T*>(p.out) + p.out_row(seq, i, head);
    const float inverse = row_sum > 0.f ? 1.f / row_sum : 0.f;
#pragma unroll
    for (int e = 0; e < per_lane; ++e)
      out_row[lane + 32 * e] = static_cast<T>(mean ? mean_acc[e] : acc[e] * inverse);
    if (p.lse != nullptr && lane == 0)
      p.lse[p.lse_at(seq, i, head)] =
          mean ? lse_mean : (row_sum > 0.f ? (row_max + log2f(row_sum)) * ln2 : -inf);
  }
}

// The keys of piece `piece` for query position x of a head: a slice of one branch's key set.
DILATED_ATTENTION_HOST_DEVICE Progression decode_piece_keys_of(const InferenceParams& p, int piece,
                                                               std::int64_t x, std::int64_t n,
                                                               std::int64_t head) {
  const int branch = p.piece_branch(piece);
  const Progression keys = p.branch(branch, n).keys(x, p.offset(branch, head), p.causal);
  return piece_slice(keys, piece - p.piece_base[branch], p.piece_keys);
}

template <class T, int D>
__global__ void __launch_bounds__(32 * inference_warps)
    decode_piece_kernel(const InferenceParams p) {
  static_assert(D % 32 == 0 && D <= 128, "head_dim must be a multiple of 32, at most 128");
  constexpr int per_lane = D / 32;
  const float inf = __int_as_float(0x7f800000);
  constexpr float ln2 = 0.693147180559945309f;
  extern __shared__ float simt_query_rows[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* const query = simt_query_rows + warp * D;
  const std::int64_t works = p.rows * p.heads * p.pieces;

  for (std::int64_t work = static_cast<std::int64_t>(blockIdx.x) * inference_warps + warp;
       work < works; work += static_cast<std::int64_t>(gridDim.x) * inference_warps) {
    const int piece = static_cast<int>(work % p.pieces);
    const std::int64_t item = work / p.pieces;
    const std::int64_t row = item / p.heads, head = item % p.heads;
    const std::int64_t seq = p.sequence_of(row), i = row - p.row_first(seq);
    if (i >= p.valid(seq)) continue;  // not a query: the merge writes the empty row
    const std::int64_t x = p.q_begin(seq) + i, n = p.kv_len(seq);
    const Progression keys = decode_piece_keys_of(p, piece, x, n, head);
    if (keys.empty()) continue;  // never read: the merge skips pieces without keys
    inference_load_query<T, D>(p, seq, i, head, query);
    float row_max = -inf, row_sum = 0.f;
    float acc[per_lane];
#pragma unroll
    for (int e = 0; e < per_lane; ++e) acc[e] = 0.f;
    inference_attend<T, D>(p, seq, p.kv_head(head), keys, query, row_max, row_sum, acc);
    // row_sum > 0: the piece's first key has probability exp2(0) = 1.
    const float inverse = 1.f / row_sum;
    float* const o = p.partial_o + work * D;
#pragma unroll
    for (int e = 0; e < per_lane; ++e) o[lane + 32 * e] = acc[e] * inverse;
    if (lane == 0) p.partial_lse[work] = (row_max + log2f(row_sum)) * ln2;
  }
}

template <class T, int D>
__global__ void __launch_bounds__(32 * inference_warps)
    decode_merge_kernel(const InferenceParams p) {
  static_assert(D % 32 == 0 && D <= 128, "head_dim must be a multiple of 32, at most 128");
  constexpr int per_lane = D / 32;
  const float inf = __int_as_float(0x7f800000);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool mean = p.mixing == Mixing::mean;
  const std::int64_t items = p.rows * p.heads;

  for (std::int64_t item = static_cast<std::int64_t>(blockIdx.x) * inference_warps + warp;
       item < items; item += static_cast<std::int64_t>(gridDim.x) * inference_warps) {
    const std::int64_t row = item / p.heads, head = item % p.heads;
    const std::int64_t seq = p.sequence_of(row), i = row - p.row_first(seq);
    if (i >= p.valid(seq)) {
      inference_write_empty<T, D>(p, seq, i, head);
      continue;
    }
    const std::int64_t x = p.q_begin(seq) + i, n = p.kv_len(seq);
    float acc[per_lane], branch_acc[per_lane];
    float lse = -inf;
#pragma unroll
    for (int e = 0; e < per_lane; ++e) acc[e] = 0.f;
    for (int b = 0; b < p.num_branches; ++b) {
      const Progression keys = p.branch(b, n).keys(x, p.offset(b, head), p.causal);
      const std::int64_t chunks = piece_count(keys.count, p.piece_keys);
      float branch_lse = -inf;
#pragma unroll
      for (int e = 0; e < per_lane; ++e) branch_acc[e] = 0.f;
      for (std::int64_t c = 0; c < chunks; ++c) {
        const std::int64_t work = item * p.pieces + p.piece_base[b] + c;
        const MergeWeights<float> w = merge_weights(branch_lse, p.partial_lse[work]);
        const float* const o = p.partial_o + work * D;
#pragma unroll
        for (int e = 0; e < per_lane; ++e)
          branch_acc[e] = w.a * branch_acc[e] + w.b * o[lane + 32 * e];
        branch_lse = w.lse;
      }
      if (mean) {
        if (branch_lse != -inf) {
          const float inverse = 1.f / static_cast<float>(p.num_branches);
#pragma unroll
          for (int e = 0; e < per_lane; ++e) acc[e] += branch_acc[e] * inverse;
          lse = log_add_exp(lse, branch_lse);
        }
      } else {
        const MergeWeights<float> w = merge_weights(lse, branch_lse);
#pragma unroll
        for (int e = 0; e < per_lane; ++e) acc[e] = w.a * acc[e] + w.b * branch_acc[e];
        lse = w.lse;
      }
    }
    T* const out_row = static_cast<T*>(p.out) + p.out_row(seq, i, head);
#pragma unroll
    for (int e = 0; e < per_lane; ++e) out_row[lane + 32 * e] = static_cast<T>(acc[e]);
    if (p.lse != nullptr && lane == 0) p.lse[p.lse_at(seq, i, head)] = lse;
  }
}

}  // namespace dilated_attention::cuda::device
