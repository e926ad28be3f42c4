#pragma once
// The per-row kernels of the ring's CUDA gradient back end (ring/cuda/backward_backend.cuh); the
// block kernels are in ring/cuda/backward_kernels.cuh.
// - ring_delta_kernel: softmax mixing's row statistic D = dO·O, one thread per row.
// - ring_add_returned_kernel: the owner adds the returned dK/dV partials of its rows into its
//   fp32 accumulators, grouped by (batch, kv head) and 64-row tile, the pieces in step order (a
//   block barrier between them): one owner per element, a fixed order, no atomics.
// - ring_gradient_cast_kernel: the final cast of an fp32 accumulator to the storage type.

#include <cstdint>

#include "../../config.hpp"
#include "../../cuda/simt_kernel.cuh"
#include "../../pattern.hpp"
#include "forward_kernels.cuh"
#include "backward_kernels.cuh"

namespace dilated_attention::ring::device {

struct DeltaParams {
  const void *out, *d_out;
  Strides out_strides, d_out_strides;
  float* delta;  // [batch][heads][rows]
  std::int64_t batch, heads, rows, head_dim;
};

// Softmax mixing: D = dO·O for every local row, one thread per row.
template <class T>
__global__ void __launch_bounds__(block_threads) ring_delta_kernel(const DeltaParams p) {
  using dilated_attention::cuda::device::to_float;
  const std::int64_t count = p.batch * p.heads * p.rows;
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < count;
       r += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t x = r % p.rows, h = (r / p.rows) % p.heads, b = r / (p.rows * p.heads);
    const T* const o = backward_detail::row_of<T>(p.out, p.out_strides, b, x, h);
    const T* const g = backward_detail::row_of<T>(p.d_out, p.d_out_strides, b, x, h);
    float sum = 0.f;
    for (std::int64_t d = 0; d < p.head_dim; ++d) sum = fmaf(to_float(g[d]), to_float(o[d]), sum);
    p.delta[r] = sum;
  }
}

// A returned piece: dK rows then dV rows (fp32) of (batch, kv head) at local rows `rows`.
struct ReturnedItem {
  const float* partial;
  std::int64_t batch, kv_head;
  Progression rows;  // local rows
};

struct ReturnedParams {
  const ReturnedItem* items;
  const std::int64_t* group_begin;  // grouped by (batch, kv head), the non-empty groups only
  float *d_k, *d_v;
  std::int64_t kv_heads, rows, tiles, head_dim;
};

// One thread block per (batch, kv head) and tile of 64 local rows; the group's pieces in the
// driver's order (step order), a block barrier between them.
template <class V = float>
__global__ void __launch_bounds__(block_threads) ring_add_returned_kernel(const ReturnedParams p) {
  const std::int64_t group = blockIdx.x / p.tiles, tile = blockIdx.x % p.tiles;
  const std::int64_t row_lo = tile * block_query_rows;
  const std::int64_t row_hi =
      row_lo + block_query_rows < p.rows ? row_lo + block_query_rows : p.rows;
  for (std::int64_t index = p.group_begin[group]; index < p.group_begin[group + 1]; ++index) {
    const ReturnedItem item = p.items[index];
    const Progression mine = item.rows.within(row_lo, row_hi);
    for (std::int64_t e = threadIdx.x; e < mine.count * p.head_dim; e += blockDim.x) {
      const std::int64_t row = mine.at(e / p.head_dim), d = e % p.head_dim;
      const std::int64_t j = item.rows.index_of(row);
      const std::int64_t at =
          ((item.batch * p.kv_heads + item.kv_head) * p.rows + row) * p.head_dim + d;
      p.d_k[at] += static_cast<V>(item.partial[j * p.head_dim + d]);
      p.d_v[at] += static_cast<V>(item.partial[(item.rows.count + j) * p.head_dim + d]);
    }
    __syncthreads();
  }
}

struct CastParams {
  const float* from;  // [batch][heads][rows][head_dim]
  void* to;
  Strides to_strides;
  std::int64_t batch, heads, rows, head_dim;
};

// Each element rounded once to the storage type, one thread per element.
template <class T>
__global__ void __launch_bounds__(block_threads) ring_gradient_cast_kernel(const CastParams p) {
  const std::int64_t elements = p.batch * p.heads * p.rows * p.head_dim;
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       e < elements; e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t d = e % p.head_dim, row = e / p.head_dim;
    const std::int64_t x = row % p.rows, h = (row / p.rows) % p.heads, b = row / (p.rows * p.heads);
    static_cast<T*>(
        p.to)[b * p.to_strides.batch + x * p.to_strides.seq + h * p.to_strides.head + d] =
        static_cast<T>(p.from[e]);
  }
}

}  // namespace dilated_attention::ring::device
