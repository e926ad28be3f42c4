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

// The key tiles of one block for one tensor (K or V), streamed with a per-thread row pointer:
// thread tid copies 16-byte chunk tid % kChunks of rows tid / kChunks + i * kPass of every tile,
// so one pointer, advanced by kPass rows per chunk and by a tile per tile, replaces load_rows'
// 64-bit index math (two 64-bit products) of every chunk. Only for 16-byte aligned rows
// (cp.async); rows past the block are zero-filled. At head_dim 96 (12 chunks per row) the first
// 120 threads copy, 10 rows per pass. `Rolled` keeps the chunk loop rolled (as load_rows').
template <class T, int D, bool Rolled = false>
class KeyTileStream {
 public:
  static constexpr int kPitch = D + 8;
  static constexpr int kChunks = D / 8;                  // 16-byte chunks per row
  static constexpr int kPass = kThreads / kChunks;       // rows the block copies per pass
  static constexpr int kIterations = (kKeyTile + kPass - 1) / kPass;
  static constexpr bool kExact = kPass * kChunks == kThreads && kKeyTile % kPass == 0;

  // The block's first `count` keys (`keys`: rows first + j * stride), tile 0 next.
  __device__ __forceinline__ void start(std::int64_t seq_stride, const Progression& keys,
                                        int count) {
    const int tid = threadIdx.x;
    const int row = tid < kPass * kChunks ? tid / kChunks : kKeyTile;  // kKeyTile: copies nothing
    const int col = (tid % kChunks) * 8;
    // Elements between consecutive keys; 0 for a block of one key (its stride may exceed the
    // sequence, and no second key is ever addressed).
    const std::int64_t key_step = keys.count > 1 ? keys.stride * seq_stride : 0;
    next_ = keys.first * seq_stride + (row < kKeyTile ? row : 0) * key_step + col;
    pass_step_ = kPass * key_step;
    tile_step_ = kKeyTile * key_step;
    remaining_ = count - row;
    shared_ = row * kPitch + col;
  }

  // The next tile into `tile` (a stage of kKeyTile rows with pitch D + 8), from the tensor's rows
  // at `base` (position y at base + y * seq_stride); zero-filled chunks read nothing and are given
  // `base` itself. Offsets stay integers until a chunk is valid: no pointer past the tensor.
  __device__ __forceinline__ void issue(T* tile, const T* base) {
    constexpr int kUnroll = Rolled ? 1 : kIterations;
    (void)kUnroll;  // read only by the pragma (ignored by the host emulation)
    std::int64_t source = next_;
#pragma unroll kUnroll
    for (int i = 0; i < kIterations; ++i) {
      const bool inside = kExact || shared_ + i * kPass * kPitch < kKeyTile * kPitch;
      if (inside) {
        const bool valid = i * kPass < remaining_;
        cp_async_16(tile + shared_ + i * kPass * kPitch, valid ? base + source : base, valid);
      }
      source += pass_step_;
    }
    next_ += tile_step_;
    remaining_ -= kKeyTile;
  }

 private:
  std::int64_t next_;  // elements from the tensor's base to this thread's first chunk of the next tile
  std::int64_t pass_step_, tile_step_;
  int remaining_;  // keys of the block from this thread's first row of the next tile on
  int shared_;     // its offset in a stage
};

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
