#pragma once
// The device kernels of the ring's CUDA back end (ring/cuda/forward_backend.cuh): what the CPU back end
// does with loops, batched per step so that a step is one or two launches on the compute stream.
//
// - ring_pack_kernel: K rows then V rows of a progression of one (batch, kv head) into a message
//   (one thread block per piece of the message).
// - ring_attend_merge_kernel: the partial (o, lse) of a block -- query rows of one head against
//   the keys of one (branch, segment, offset), local or received -- merged into fp32
//   accumulators with merge.hpp's guarded merge (lse = -inf is the identity; never NaN). A step's
//   work items are grouped by (batch, head) in the driver's order (branch, offset, block); one
//   thread block takes one group and one tile of 64 local query rows and applies the group's
//   items in that order, one warp per query row, a block barrier between items. So every
//   accumulator row is updated by one warp at a time, in the schedule's fixed order: no atomics,
//   bitwise reproducible.
// - ring_finish_kernel: the mixing (softmax: the one accumulator; mean: O = sum / G,
//   LSE = ln sum exp LSE_i) and the cast to the storage type.
// Index math: Progression (pattern.hpp) only; the causal cut is Progression::count_up_to.
// The attend is SIMT fp32 (as cuda/simt_kernel.cuh): lane j scores key j of a chunk of 32
// against the row's query (in shared memory), the warp folds the chunk into an online softmax
// with fixed shuffle trees, each lane accumulates D/32 output dimensions.

#include <cstdint>

#include "../../config.hpp"
#include "../../cuda/simt_kernel.cuh"
#include "../../merge.hpp"
#include "../../pattern.hpp"

namespace dilated_attention::ring::device {

inline constexpr int block_warps = 4;
inline constexpr int block_threads = 32 * block_warps;
inline constexpr int block_query_rows =
    64;  // local query rows per thread block of the attend kernel

// Element strides of a [batch, seq, heads, head_dim] tensor.
struct Strides {
  std::int64_t batch, seq, head;
};

// One piece of a message: K rows then V rows of (batch, kv_head) at local rows `rows`, written
// at `destination` (2 * rows.count * head_dim elements).
struct PackItem {
  void* destination;
  std::int64_t batch, kv_head;
  Progression rows;  // local rows (a piece never crosses a chunk of the layout)
};

struct PackParams {
  const PackItem* items;
  const void *k, *v;
  Strides k_strides, v_strides;
  std::int64_t head_dim;
};

template <class T>
__global__ void __launch_bounds__(block_threads) ring_pack_kernel(const PackParams p) {
  const PackItem item = p.items[blockIdx.x];
  T* const out = static_cast<T*>(item.destination);
  const std::int64_t per_tensor = item.rows.count * p.head_dim;
  for (std::int64_t e = threadIdx.x; e < 2 * per_tensor; e += blockDim.x) {
    const bool is_v = e >= per_tensor;
    const std::int64_t within = is_v ? e - per_tensor : e;
    const std::int64_t j = within / p.head_dim, d = within % p.head_dim;
    const Strides& s = is_v ? p.v_strides : p.k_strides;
    const T* const source = static_cast<const T*>(is_v ? p.v : p.k);
    out[e] = source[item.batch * s.batch + item.rows.at(j) * s.seq + item.kv_head * s.head + d];
  }
}

// One block's partial for one (batch, query head), merged into accumulator `slot`.
struct AttendItem {
  std::int64_t slot, batch, head, kv_head;
  Progression queries;     // global positions (the causal cut compares these)
  std::int64_t query_row;  // local row of queries.first; query j sits at query_row + j * stride
  Progression keys;        // global positions
  std::int64_t key_row;    // local row of keys.first, when the keys are the shard's own
  const void* received;    // else: keys.count K rows then keys.count V rows, head_dim each
};

struct AttendParams {
  const AttendItem* items;
  const std::int64_t* group_begin;  // items of group (batch * heads + head): [begin[g], begin[g+1])
  const void *q, *k, *v;
  Strides q_strides, k_strides, v_strides;
  float* acc_o;                     // [slot][batch][heads][rows][head_dim]
  float* acc_lse;                   // [slot][batch][heads][rows]
  std::int64_t batch, heads, rows;  // the local shape (rows = N / P)
  std::int64_t tiles;               // ceil(rows / block_query_rows)
  float scale_log2;                 // scale * log2(e)
  bool causal;
};

template <class T, int D>
__global__ void __launch_bounds__(block_threads) ring_attend_merge_kernel(const AttendParams p) {
  static_assert(D % 32 == 0 && D <= 128, "head_dim must be a multiple of 32, at most 128");
  constexpr int per_lane = D / 32;
  const float inf = __int_as_float(0x7f800000);
  constexpr float ln2 = 0.693147180559945309f;
  using dilated_attention::cuda::device::to_float;
  using dilated_attention::cuda::device::warp_online_softmax_step;

  extern __shared__ float ring_query_rows[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* const query = ring_query_rows + warp * D;
  const std::int64_t group = blockIdx.x / p.tiles, tile = blockIdx.x % p.tiles;
  const std::int64_t row_lo = tile * block_query_rows;
  const std::int64_t row_hi =
      row_lo + block_query_rows < p.rows ? row_lo + block_query_rows : p.rows;

  for (std::int64_t index = p.group_begin[group]; index < p.group_begin[group + 1]; ++index) {
    const AttendItem item = p.items[index];
    const Progression local{item.query_row, item.queries.stride, item.queries.count};
    const Progression mine = local.within(row_lo, row_hi);  // this tile's rows of the item
    const T* const k_base = static_cast<const T*>(p.k) + item.batch * p.k_strides.batch +
                            item.kv_head * p.k_strides.head;
    const T* const v_base = static_cast<const T*>(p.v) + item.batch * p.v_strides.batch +
                            item.kv_head * p.v_strides.head;
    const T* const packed = static_cast<const T*>(item.received);
    for (std::int64_t m = warp; m < mine.count; m += block_warps) {
      const std::int64_t row = mine.at(m);
      const std::int64_t x = item.queries.at(local.index_of(row));
      const std::int64_t limit = p.causal ? item.keys.count_up_to(x) : item.keys.count;
      const T* const q_row = static_cast<const T*>(p.q) + item.batch * p.q_strides.batch +
                             row * p.q_strides.seq + item.head * p.q_strides.head;
      __syncwarp();  // the previous row's query is no longer read
      for (int d = lane; d < D; d += 32) query[d] = to_float(q_row[d]);
      __syncwarp();

      float row_max = -inf, row_sum = 0.f, acc[per_lane];
#pragma unroll
      for (int e = 0; e < per_lane; ++e) acc[e] = 0.f;
      for (std::int64_t chunk = 0; chunk < limit; chunk += 32) {
        const std::int64_t j = chunk + lane;
        const bool valid = j < limit;
        float score = -inf;
        if (valid) {
          const T* const k_row =
              packed != nullptr ? packed + j * D
                                : k_base + (item.key_row + j * item.keys.stride) * p.k_strides.seq;
          float dot = 0.f;
#pragma unroll 8
          for (int d = 0; d < D; ++d) dot = fmaf(query[d], to_float(k_row[d]), dot);
          score = dot * p.scale_log2;
        }
        const float prob = warp_online_softmax_step(row_max, row_sum, acc, score, valid);
        const std::int64_t here = limit - chunk < 32 ? limit - chunk : 32;
        for (int jj = 0; jj < here; ++jj) {
          const float p_j = __shfl_sync(0xffffffffu, prob, jj);
          const std::int64_t key = chunk + jj;
          const T* const v_row =
              packed != nullptr
                  ? packed + (item.keys.count + key) * D
                  : v_base + (item.key_row + key * item.keys.stride) * p.v_strides.seq;
#pragma unroll
          for (int e = 0; e < per_lane; ++e)
            acc[e] = fmaf(p_j, to_float(v_row[lane + 32 * e]), acc[e]);
        }
      }
      // The block's partial (o = acc / sum, lse), merged into the running accumulator.
      const float lse = row_sum > 0.f ? (row_max + log2f(row_sum)) * ln2 : -inf;
      const float inverse = row_sum > 0.f ? 1.f / row_sum : 0.f;
      const std::int64_t at =
          ((item.slot * p.batch + item.batch) * p.heads + item.head) * p.rows + row;
      const MergeWeights<float> w = merge_weights(p.acc_lse[at], lse);
      float* const acc_row = p.acc_o + at * D;
#pragma unroll
      for (int e = 0; e < per_lane; ++e)
        acc_row[lane + 32 * e] = w.a * acc_row[lane + 32 * e] + w.b * (acc[e] * inverse);
      __syncwarp();  // every lane has read the old lse
      if (lane == 0) p.acc_lse[at] = w.lse;
    }
    __syncthreads();  // the next item may touch a row another warp handled in this one
  }
}

struct FinishParams {
  const float *acc_o, *acc_lse;
  void* out;
  Strides out_strides;
  float* lse;  // [batch][heads][rows], or null
  std::int64_t accumulators, batch, heads, rows, head_dim;
};

// One thread per output element (batch, head, row, d); the slots are summed in a fixed order.
template <class T>
__global__ void __launch_bounds__(block_threads) ring_finish_kernel(const FinishParams p) {
  const std::int64_t elements = p.batch * p.heads * p.rows * p.head_dim;
  const std::int64_t stride_per_slot = p.batch * p.heads * p.rows;
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       e < elements; e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t d = e % p.head_dim,
                       row = e / p.head_dim;  // row = (b * heads + h) * rows + x
    const std::int64_t x = row % p.rows, h = (row / p.rows) % p.heads, b = row / (p.rows * p.heads);
    float o = 0.f, row_lse = negative_infinity<float>();
    for (std::int64_t slot = 0; slot < p.accumulators; ++slot) {
      o += p.acc_o[(slot * stride_per_slot + row) * p.head_dim + d];
      row_lse = log_add_exp(row_lse, p.acc_lse[slot * stride_per_slot + row]);
    }
    if (p.accumulators != 1) o *= 1.f / static_cast<float>(p.accumulators);
    static_cast<T*>(
        p.out)[b * p.out_strides.batch + x * p.out_strides.seq + h * p.out_strides.head + d] =
        static_cast<T>(o);
    if (p.lse != nullptr && d == 0) p.lse[row] = row_lse;
  }
}

struct FillParams {
  float* data;
  std::int64_t count;
  float value;
};

// Sets `count` floats to `value` (the accumulators' initial lse = -inf). A template only so that
// every translation unit that includes this header may define it.
template <class V = float>
__global__ void __launch_bounds__(block_threads) ring_fill_kernel(const FillParams p) {
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       e < p.count; e += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    p.data[e] = static_cast<V>(p.value);
}

}  // namespace dilated_attention::ring::device
