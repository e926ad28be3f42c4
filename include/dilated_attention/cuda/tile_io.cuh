#pragma once
// The forward kernel's own row copies: its query-window tile (global -> shared) and its 16-byte
// output stores. Rows are addressed in place (position y of a tensor at base + y * seq_stride):
// no gather kernel, no temporary copy. Key/value tiles go through row_pointers.cuh's
// copy_tile_rows, shared with the backward kernels.

#include <cstdint>

#include "../pattern.hpp"
#include "copy.cuh"
#include "launch_plan.hpp"
#include "mma.cuh"
#include "query_window.hpp"

namespace dilated_attention::cuda::device {

// Copies the rows of a query window (window row order) into a shared tile with row pitch D + 8;
// rows past the window are zero. With vector_io (the tensor's 16-byte flag) asynchronous
// (cp.async, completed by cp_async_wait + barrier), else element-wise and synchronous.
template <class T, int D, bool Rolled>
__device__ __forceinline__ void load_window_rows(T* tile, const T* base, std::int64_t seq_stride,
                                                 const QueryWindow& window, bool vector_io) {
  constexpr int pitch = D + 8;
  constexpr int chunks = D / 8;
  constexpr int copy_unroll = Rolled ? 1 : block_window_rows * chunks / block_threads;
  (void)copy_unroll;  // read only by the pragma (ignored by the host emulation)
  if (vector_io) {
#pragma unroll copy_unroll
    for (int c = threadIdx.x; c < block_window_rows * chunks; c += block_threads) {
      const int row = c / chunks, col = (c % chunks) * 8;
      const bool valid = row < window.count;
      const T* source = valid ? base + window.position(row) * seq_stride + col : base;
      cp_async_16(tile + row * pitch + col, source, valid);
    }
  } else {
    for (int e = threadIdx.x; e < block_window_rows * D; e += block_threads) {
      const int row = e / D, col = e % D;
      tile[row * pitch + col] =
          row < window.count ? base[window.position(row) * seq_stride + col] : T(0.0f);
    }
  }
}

// Eight consecutive outputs from fp32 values times `scale`: one 16-byte store with vector_io.
template <class T>
__device__ __forceinline__ void store_eight(T* to, const float* from, float scale,
                                            bool vector_io) {
  if (vector_io) {
    std::uint32_t packed[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      packed[i] = MmaOp<T>::pack(from[2 * i] * scale, from[2 * i + 1] * scale);
    store_16(to, packed);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) to[e] = T(from[e] * scale);
  }
}

}  // namespace dilated_attention::cuda::device
