#pragma once
// Row addressing of the tensor-core backward kernels with little register state: a tile's rows
// are a pointer to its first row plus 32-bit in-tile row indices, and a row of one (batch, head)
// is found from its 32-bit position. Every position, stride and count of a block or window lies
// below seq_len < 2^31 (check_backend_limits), so only the final product with a tensor's 64-bit
// element stride is widened. The kernels therefore carry ints (positions, counts, the rate)
// across their loops instead of 64-bit progressions and pointers, and recompute each tile's
// 64-bit addresses from them and the kernel parameters (which live in the constant bank, not in
// registers): the 64-bit index state no longer competes with the accumulators for registers.

#include <cstdint>

#include "copy.cuh"
#include "launch_plan.hpp"  // block_threads

namespace dilated_attention::cuda::device {

// Row `position` of one (batch, head) slice of a tensor whose elements start at `data`.
template <class T>
__device__ __forceinline__ T* row_at(T* data, std::int64_t batch_stride, std::int64_t seq_stride,
                                     std::int64_t head_stride, int batch, int head, int position) {
  return data + batch * batch_stride + head * head_stride + position * seq_stride;
}

// x, as a value the compiler cannot see through: what is computed from it (per-thread copy
// offsets, mask indices) is recomputed inside the loop that uses it, a few integer instructions,
// instead of being hoisted out of every loop and held in registers through the whole kernel,
// where it would crowd out the accumulators. Emits no instruction.
__device__ __forceinline__ int opaque(int x) {
#if !defined(DILATED_ATTENTION_CUDA_HOST_EMULATION)
  asm volatile("" : "+r"(x));
#endif
  return x;
}

// Copies the first `Rows` rows of a tile into a shared tile of row pitch D + 8: row j of the
// tile is at first_row + j * row_step (row_step = stride * seq_stride elements), rows
// j >= rows_left are zero (so masked rows meet finite values and 0 * x stays 0). With vector_io
// (the tensor's 16-byte flag) the copy is asynchronous (cp.async, completed by cp_async_wait +
// barrier); otherwise element-wise and synchronous (completed by the barrier). The chunk -> thread
// map is the forward's former load_rows (16-byte chunk c by thread c % block_threads), so coalescing is
// unchanged. When a row's chunks divide among the threads (head_dim 32, 64, 128) each thread
// copies one column of rows row0, row0 + P, ... (P = block_threads / chunks per row) and walks its
// row pointer (kept as a 64-bit offset from first_row, so that no pointer past the tensor is ever
// formed) down them: one 64-bit add per chunk, no per-chunk index state. Otherwise (head_dim 96)
// the chunk's 32-bit in-tile row times row_step.
template <class T, int D, int Rows>
__device__ __forceinline__ void copy_tile_rows(T* tile, const T* first_row, std::int64_t row_step,
                                               int rows_left, bool vector_io) {
  constexpr int pitch = D + 8;
  constexpr int chunks = D / 8;  // 16-byte chunks per row
  static_assert(Rows * chunks % block_threads == 0,
                "every thread copies the same number of chunks");
  constexpr int per_thread = Rows * chunks / block_threads;
  const int tid = opaque(threadIdx.x);
  if (vector_io) {
    if constexpr (block_threads % chunks == 0) {
      constexpr int rows_per_pass = block_threads / chunks;
      const int row0 = tid / chunks, col = (tid % chunks) * 8;
      std::int64_t offset = row0 * row_step + col;  // of the thread's next chunk from first_row
#pragma unroll 1
      for (int k = 0; k < per_thread; ++k) {
        const int row = row0 + k * rows_per_pass;
        const bool valid = row < rows_left;
        cp_async_16(tile + row * pitch + col, valid ? first_row + offset : first_row, valid);
        offset += rows_per_pass * row_step;
      }
    } else {
#pragma unroll 1
      for (int k = 0; k < per_thread; ++k) {
        const int c = tid + k * block_threads, row = c / chunks, col = (c % chunks) * 8;
        const bool valid = row < rows_left;
        cp_async_16(tile + row * pitch + col, valid ? first_row + row * row_step + col : first_row,
                    valid);
      }
    }
  } else {
    for (int e = tid; e < Rows * D; e += block_threads) {
      const int row = e / D, col = e % D;
      tile[row * pitch + col] = row < rows_left ? first_row[row * row_step + col] : T(0.0f);
    }
  }
}

}  // namespace dilated_attention::cuda::device
