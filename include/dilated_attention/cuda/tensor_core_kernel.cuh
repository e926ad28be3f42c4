#pragma once
// The fused forward kernel for 16-bit storage (__half, __nv_bfloat16) on tensor cores, in the
// FlashAttention-2 style, for every branch at once.
//
// One thread block = one work unit (batch, head, window of up to kWindowRows positions with
// stride R, launch_plan.hpp). The window's query rows are loaded once into registers as mma A
// fragments; warp w owns rows 16w..16w+15 of the window. For each branch and each segment overlapping the window, the block's keys (rows
// of the segment with the head's offset, i.e. stride r) stream through shared memory in tiles of
// kKeyTile rows with cp.async double buffering, addressed by stride in place: no gather, no copy.
// Scores and P.V use mma.sync m16n8k16 with fp32 accumulators. Rows of the window that a branch
// does not select, keys past a query's causal limit and keys past the block are masked to -inf,
// so the online-softmax state (max, sum, accumulator) of each row simply continues from one
// branch to the next: for Mixing::softmax this is exactly softmax(S + ln C) V of docs/semantics.md §2, and
// each output row is written once, by the block that owns it, with no merge kernel.
// Mixing::mean closes each branch (normalises its partial), adds it / G into a per-thread slot
// array in shared memory and restarts the state.

#include <cstdint>

#include "../merge.hpp"
#include "copy.cuh"
#include "launch_plan.hpp"
#include "mma.cuh"

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

__device__ __forceinline__ float row_max4(float value) {
  value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, 1));
  return fmaxf(value, __shfl_xor_sync(0xffffffffu, value, 2));
}
__device__ __forceinline__ float row_sum4(float value) {
  value += __shfl_xor_sync(0xffffffffu, value, 1);
  return value + __shfl_xor_sync(0xffffffffu, value, 2);
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads)
    tensor_core_forward_kernel(const ForwardParams p) {
  static_assert(D % 16 == 0 && D <= 128, "head_dim must be a multiple of 16, at most 128");
  using Mma = MmaOp<T>;
  constexpr int kPitch = D + 8;
  constexpr int kDimTiles = D / 8;  // n-tiles of the output
  constexpr int kKeyTiles = kKeyTile / 8;  // n-tiles of the scores
  const float kInf = __int_as_float(0x7f800000);
  constexpr float kLn2 = 0.693147180559945309f;

  extern __shared__ __align__(16) unsigned char shared_raw[];
  T* const q_tile = reinterpret_cast<T*>(shared_raw);
  T* const k_stages = q_tile + kWindowRows * kPitch;
  T* const v_stages = k_stages + 2 * kKeyTile * kPitch;
  float* const mean_slots = reinterpret_cast<float*>(v_stages + 2 * kKeyTile * kPitch);

  const WorkUnit unit = work_unit(p, blockIdx.x);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const Progression window = window_rows(p, unit.window);
  if (window.empty()) return;  // uniform: the whole block leaves before any barrier
  const std::int64_t kv_head = p.kv_head(unit.head);
  const T* const q_base =
      static_cast<const T*>(p.q) + unit.batch * p.q_batch + unit.head * p.q_head;
  const T* const k_base = static_cast<const T*>(p.k) + unit.batch * p.k_batch + kv_head * p.k_head;
  const T* const v_base = static_cast<const T*>(p.v) + unit.batch * p.v_batch + kv_head * p.v_head;
  const bool mean = p.mixing == Mixing::mean;

  // The two rows of the window whose scores and outputs this thread holds (C fragment rows).
  // -1 for rows past the window's end: they are in no block and are not written.
  const std::int64_t row_position[2] = {
      warp * 16 + g < window.count ? window.at(warp * 16 + g) : -1,
      warp * 16 + g + 8 < window.count ? window.at(warp * 16 + g + 8) : -1};

  // Query fragments, loaded once and reused by every branch.
  std::uint32_t q_frag[D / 16][4];
  // Copy loops rolled at head_dim 128, unrolled below: the choice without spills (ptxas -v).
  constexpr bool kRolled = D == 128;
  load_rows<T, D, kWindowRows, kRolled>(q_tile, q_base, p.q_seq, window, 0, p.q_vector);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    ldmatrix_x4(q_frag[kk],
                q_tile + (warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kPitch + kk * 16 +
                    (lane / 16) * 8);

  // Online-softmax state per row: the running max of the raw scores q.k (the scale is positive,
  // so it is also the max of the scaled ones); probabilities are exp2(s scale log2e - pivot).
  float row_max[2] = {-kInf, -kInf};
  float row_sum[2] = {0.f, 0.f};  // this thread's share; the 4 threads of a row are summed at the end
  float acc[kDimTiles][4];
#pragma unroll
  for (int dn = 0; dn < kDimTiles; ++dn) acc[dn][0] = acc[dn][1] = acc[dn][2] = acc[dn][3] = 0.f;
  float lse_mean[2] = {-kInf, -kInf};  // Mixing::mean: ln sum_i exp(LSE_i)
  if (mean) {
#pragma unroll
    for (int e = 0; e < kDimTiles * 4; ++e) mean_slots[e * kThreads + tid] = 0.f;
  }

  int stage = 0;
  for (int i = 0; i < p.num_branches; ++i) {
    const BranchGeometry geometry = p.branch(i);
    const std::int64_t offset = p.offset(i, unit.head);
    if (offset >= 0) {
      const SegmentRange segments = segments_overlapping(geometry, window);
      for (std::int64_t s = segments.first; s <= segments.last; ++s) {
        const SegmentWork work = segment_work(geometry, s, offset, p.causal, window);
        if (work.empty()) continue;  // uniform across the block
        const Progression streamed = work.keys.prefix(work.key_count);
        const std::int64_t limit[2] = {key_limit(work.keys, row_position[0], p.causal),
                                       key_limit(work.keys, row_position[1], p.causal)};
        const std::int64_t tiles = work.tiles();

        load_rows<T, D, kKeyTile, kRolled>(k_stages + stage * kKeyTile * kPitch, k_base, p.k_seq, streamed,
                                  0, p.k_vector);
        load_rows<T, D, kKeyTile, kRolled>(v_stages + stage * kKeyTile * kPitch, v_base, p.v_seq, streamed,
                                  0, p.v_vector);
        cp_async_commit();
        for (std::int64_t tile = 0; tile < tiles; ++tile) {
          const int current = stage;
          if (tile + 1 < tiles) {  // prefetch the next tile into the other stage
            const std::int64_t next_j0 = (tile + 1) * kKeyTile;
            load_rows<T, D, kKeyTile, kRolled>(k_stages + (stage ^ 1) * kKeyTile * kPitch, k_base,
                                      p.k_seq, streamed, next_j0, p.k_vector);
            load_rows<T, D, kKeyTile, kRolled>(v_stages + (stage ^ 1) * kKeyTile * kPitch, v_base,
                                      p.v_seq, streamed, next_j0, p.v_vector);
            cp_async_commit();
            cp_async_wait<1>();
          } else {
            cp_async_wait<0>();
          }
          __syncthreads();

          const T* const k_tile = k_stages + current * kKeyTile * kPitch;
          const T* const v_tile = v_stages + current * kKeyTile * kPitch;

          // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
          float score[kKeyTiles][4];
#pragma unroll
          for (int nt = 0; nt < kKeyTiles; ++nt)
            score[nt][0] = score[nt][1] = score[nt][2] = score[nt][3] = 0.f;
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
            for (int np = 0; np < kKeyTiles / 2; ++np) {
              std::uint32_t b[4];
              ldmatrix_x4(b, k_tile + (np * 16 + (lane % 8) + (lane / 16) * 8) * kPitch +
                                 kk * 16 + ((lane / 8) % 2) * 8);
              Mma::run(score[2 * np], q_frag[kk], b[0], b[1]);
              Mma::run(score[2 * np + 1], q_frag[kk], b[2], b[3]);
            }

          // Mask: key j of the block is attended by a row iff j < its limit (0 when the branch
          // does not select the row). Then the running max of each row.
          const std::int64_t j0 = tile * kKeyTile;
          int local_limit[2];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const std::int64_t rest = limit[r] - j0;
            local_limit[r] = rest < 0 ? 0 : (rest > kKeyTile ? kKeyTile : static_cast<int>(rest));
          }
          float tile_max[2] = {-kInf, -kInf};
#pragma unroll
          for (int nt = 0; nt < kKeyTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int j = nt * 8 + 2 * t + (e & 1);
              const float value = j < local_limit[e >> 1] ? score[nt][e] : -kInf;
              score[nt][e] = value;
              tile_max[e >> 1] = fmaxf(tile_max[e >> 1], value);
            }
          float factor[2], pivot[2];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float new_max = fmaxf(row_max[r], row_max4(tile_max[r]));
            // A row that has seen no key yet keeps max -inf: exponentiate against 0 so that
            // its masked scores give exp2(-inf) = 0 rather than NaN.
            factor[r] = new_max == -kInf ? 1.f : fast_exp2((row_max[r] - new_max) * p.scale_log2);
            pivot[r] = new_max == -kInf ? 0.f : new_max * p.scale_log2;
            row_max[r] = new_max;
            row_sum[r] *= factor[r];
          }
#pragma unroll
          for (int nt = 0; nt < kKeyTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              // One FFMA and one MUFU.EX2 per score: exp2(s scale log2e - max scale log2e).
              const float prob = fast_exp2(fmaf(score[nt][e], p.scale_log2, -pivot[e >> 1]));
              score[nt][e] = prob;
              row_sum[e >> 1] += prob;
            }
#pragma unroll
          for (int dn = 0; dn < kDimTiles; ++dn)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[dn][e] *= factor[e >> 1];

          // O += P V: the score accumulators become A fragments (the C and A layouts agree).
#pragma unroll
          for (int ks = 0; ks < kKeyTile / 16; ++ks) {
            const std::uint32_t a[4] = {Mma::pack(score[2 * ks][0], score[2 * ks][1]),
                                        Mma::pack(score[2 * ks][2], score[2 * ks][3]),
                                        Mma::pack(score[2 * ks + 1][0], score[2 * ks + 1][1]),
                                        Mma::pack(score[2 * ks + 1][2], score[2 * ks + 1][3])};
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
              std::uint32_t b[4];
              ldmatrix_x4_trans(b, v_tile + (ks * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kPitch +
                                       dp * 16 + (lane / 16) * 8);
              Mma::run(acc[2 * dp], a, b[0], b[1]);
              Mma::run(acc[2 * dp + 1], a, b[2], b[3]);
            }
          }
          __syncthreads();  // every warp is done with this stage before it is refilled
          stage ^= 1;
        }
      }
    }
    if (mean) {
      // Close branch i: O_i / G into the slots, LSE_i into the log-sum, and restart the state.
      float inverse[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float sum = row_sum4(row_sum[r]);
        inverse[r] = sum > 0.f ? 1.f / (sum * static_cast<float>(p.num_branches)) : 0.f;
        if (sum > 0.f)
          lse_mean[r] = log_add_exp(lse_mean[r], (row_max[r] * p.scale_log2 + log2f(sum)) * kLn2);
        row_max[r] = -kInf;
        row_sum[r] = 0.f;
      }
#pragma unroll
      for (int dn = 0; dn < kDimTiles; ++dn)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          mean_slots[(dn * 4 + e) * kThreads + tid] += acc[dn][e] * inverse[e >> 1];
          acc[dn][e] = 0.f;
        }
    }
  }

  // Epilogue: every row of the window is written exactly once, unselected rows as (0, -inf).
  float inverse[2], lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (mean) {
      inverse[r] = 1.f;
      lse[r] = lse_mean[r];
    } else {
      const float sum = row_sum4(row_sum[r]);
      inverse[r] = sum > 0.f ? 1.f / sum : 0.f;
      lse[r] = sum > 0.f ? (row_max[r] * p.scale_log2 + log2f(sum)) * kLn2 : -kInf;
    }
  }
  T* const out_base = static_cast<T*>(p.out) + unit.batch * p.o_batch + unit.head * p.o_head;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const std::int64_t x = row_position[r];
    if (x < 0) continue;
    T* const out_row = out_base + x * p.o_seq;
#pragma unroll
    for (int dn = 0; dn < kDimTiles; ++dn)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int e = 2 * r + c;
        const float value =
            mean ? mean_slots[(dn * 4 + e) * kThreads + tid] : acc[dn][e] * inverse[r];
        out_row[dn * 8 + 2 * t + c] = T(value);
      }
    if (p.lse != nullptr && t == 0)
      p.lse[(unit.batch * p.heads + unit.head) * p.seq_len + x] = lse[r];
  }
}

}  // namespace dilated_attention::cuda::device
