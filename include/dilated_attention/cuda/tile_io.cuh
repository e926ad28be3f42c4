#pragma once
// Row copies between global memory and the shared tiles of the tensor-core kernels: K/V (and the
// backward's Q/dO) tiles of a stride progression, the forward's query-window tile, and 16-byte
// output stores. Rows are addressed in place by stride (position y of a tensor at
// base + y * seq_stride): no gather kernel, no temporary copy.

#include <cstdint>

#include "../pattern.hpp"
#include "copy.cuh"
#include "launch_plan.hpp"
#include "mma.cuh"
#include "query_window.hpp"

namespace dilated_attention::cuda::device {

// Copies rows j0..j0+Rows-1 of the progression `rows` (positions in the sequence; position y is
// at base + y * seq_stride) into a shared tile with row pitch D + 8. Rows past `rows.count` are
// zero. With vector_io (the tensor's 16-byte flag) the copy is asynchronous (cp.async, completed by cp_async_wait + barrier);
// otherwise element-wise and synchronous (completed by the barrier). `Rolled` keeps the copy loop
// rolled; otherwise it is unrolled fully. Which one avoids register spills depends on the kernel
// and head_dim (ptxas -v, docs/cuda.md's table); the kernels choose per head_dim.
template <class T, int D, int Rows, bool Rolled = false>
__device__ __forceinline__ void load_rows(T* tile, const T* base, std::int64_t seq_stride,
                                          const Progression& rows, std::int64_t j0,
                                          bool vector_io) {
  constexpr int kPitch = D + 8;
  constexpr int kUnroll = Rolled ? 1 : Rows * (D / 8) / kThreads;
  (void)kUnroll;  // read only by the pragma (ignored by the host emulation)
  if (vector_io) {
    constexpr int kChunks = D / 8;  // 16-byte chunks per row
#pragma unroll kUnroll
    for (int c = threadIdx.x; c < Rows * kChunks; c += kThreads) {
      const int row = c / kChunks, col = (c % kChunks) * 8;
      const std::int64_t j = j0 + row;
      const bool valid = j < rows.count;
      const T* source = valid ? base + rows.at(j) * seq_stride + col : base;
      cp_async_16(tile + row * kPitch + col, source, valid);
    }
  } else {
    for (int e = threadIdx.x; e < Rows * D; e += kThreads) {
      const int row = e / D, col = e % D;
      const std::int64_t j = j0 + row;
      tile[row * kPitch + col] = j < rows.count ? base[rows.at(j) * seq_stride + col] : T(0.0f);
    }
  }
}

// Copies the rows of a query window (window row order) into a shared tile with row pitch D + 8;
// rows past the window are zero. Asynchronous with vector_io, as load_rows.
template <class T, int D, bool Rolled>
__device__ __forceinline__ void load_window_rows(T* tile, const T* base, std::int64_t seq_stride,
                                                 const QueryWindow& window, bool vector_io) {
  constexpr int kPitch = D + 8;
  constexpr int kChunks = D / 8;
  constexpr int kUnroll = Rolled ? 1 : kWindowRows * kChunks / kThreads;
  (void)kUnroll;  // read only by the pragma (ignored by the host emulation)
  if (vector_io) {
#pragma unroll kUnroll
    for (int c = threadIdx.x; c < kWindowRows * kChunks; c += kThreads) {
      const int row = c / kChunks, col = (c % kChunks) * 8;
      const bool valid = row < window.count;
      const T* source = valid ? base + window.position(row) * seq_stride + col : base;
      cp_async_16(tile + row * kPitch + col, source, valid);
    }
  } else {
    for (int e = threadIdx.x; e < kWindowRows * D; e += kThreads) {
      const int row = e / D, col = e % D;
      tile[row * kPitch + col] =
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
