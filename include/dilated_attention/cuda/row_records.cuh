#pragma once
// The forward kernel's per-row state between works (query_window.hpp): one fp32 record per
// query-window row in shared memory -- D accumulators, the running max (for Mixing::mean: the
// log-sum-exp of the closed branches) and the sum -- and the moves of a thread's two rows (C
// fragment rows g and g + 8 of its warp's slice) between its registers and their records.
// Rows are window rows; -1 marks a slot past the work's queries. The 4 threads of a row (t = lane
// % 4) each hold a share of its sum and 2 of every 8 accumulator columns.

#include <cstdint>

#include "../merge.hpp"
#include "launch_plan.hpp"
#include "query_window.hpp"
#include "tile_io.cuh"

namespace dilated_attention::cuda::device {

// Max and sum over the 4 threads of a C-fragment row.
__device__ __forceinline__ float row_max4(float value) {
  value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, 1));
  return fmaxf(value, __shfl_xor_sync(0xffffffffu, value, 2));
}
__device__ __forceinline__ float row_sum4(float value) {
  value += __shfl_xor_sync(0xffffffffu, value, 1);
  return value + __shfl_xor_sync(0xffffffffu, value, 2);
}

template <int D>
struct RowRecords {
  static constexpr int dim_tiles = D / 8;
  static constexpr float ln2 = 0.693147180559945309f;
  float* acc;  // [block_window_rows][D]
  float* max;  // [block_window_rows]
  float* sum;  // [block_window_rows]

  // The records at `memory` (launch_plan.hpp's forward_shared_bytes counts them).
  __device__ __forceinline__ static RowRecords in(float* memory) {
    return {memory, memory + block_window_rows * D,
            memory + block_window_rows * D + block_window_rows};
  }

  // Every row empty: no key seen (max -inf, sum 0), zero accumulators; for mean a zero sum of
  // branch outputs and a log-sum-exp of -inf. Completed by a barrier.
  __device__ __forceinline__ void clear(int tid) const {
    for (int e = tid; e < block_window_rows * D; e += block_threads) acc[e] = 0.f;
    if (tid < block_window_rows) {
      max[tid] = -__int_as_float(0x7f800000);
      sum[tid] = 0.f;
    }
  }

  // The state of the thread's rows into their records (every lane takes part: the sums are
  // shuffled).
  __device__ __forceinline__ void save(const int (&row)[2], const float (&row_max)[2],
                                       const float (&row_sum)[2],
                                       const float (&state)[dim_tiles][4], int t) const {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float total = row_sum4(row_sum[r]);
      if (row[r] < 0) continue;
      if (t == 0) {
        max[row[r]] = row_max[r];
        sum[row[r]] = total;
      }
#pragma unroll
      for (int dn = 0; dn < dim_tiles; ++dn)
#pragma unroll
        for (int c = 0; c < 2; ++c) acc[row[r] * D + dn * 8 + 2 * t + c] = state[dn][2 * r + c];
    }
  }

  // The thread's rows from their records (the whole sum to t = 0); empty for slots without a row.
  __device__ __forceinline__ void load(const int (&row)[2], float (&row_max)[2],
                                       float (&row_sum)[2], float (&state)[dim_tiles][4],
                                       int t) const {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[r] = row[r] >= 0 ? max[row[r]] : -__int_as_float(0x7f800000);
      row_sum[r] = row[r] >= 0 && t == 0 ? sum[row[r]] : 0.f;
#pragma unroll
      for (int dn = 0; dn < dim_tiles; ++dn)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          state[dn][2 * r + c] = row[r] >= 0 ? acc[row[r] * D + dn * 8 + 2 * t + c] : 0.f;
    }
  }

  // Mixing::mean: a work's rows closed (each lies in one segment of the branch, so its branch
  // partial is complete): O_i / G added into the record, LSE_i into its log-sum-exp.
  __device__ __forceinline__ void close(const int (&row)[2], const float (&row_max)[2],
                                        const float (&row_sum)[2],
                                        const float (&state)[dim_tiles][4], int t, int branches,
                                        float scale_log2) const {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float total = row_sum4(row_sum[r]);
      if (row[r] < 0 || !(total > 0.f)) continue;
      const float inverse = 1.f / (total * static_cast<float>(branches));
      if (t == 0)
        max[row[r]] = log_add_exp(max[row[r]], (row_max[r] * scale_log2 + log2f(total)) * ln2);
#pragma unroll
      for (int dn = 0; dn < dim_tiles; ++dn)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          acc[row[r] * D + dn * 8 + 2 * t + c] += state[dn][2 * r + c] * inverse;
    }
  }

  // Every row of the window written once from its record: O = acc / sum and
  // LSE = (max scale log2e + log2 sum) ln 2 (mean: the summed partials and the log-sum-exp), a
  // row no branch selected as (0, -inf); 16-byte stores of 8 outputs when out's rows are aligned.
  // After a barrier that follows the last save or close.
  template <class T>
  __device__ __forceinline__ void write(const QueryWindow& window, T* out_base,
                                        std::int64_t out_seq, bool out_vector, float* lse_base,
                                        bool mean, float scale_log2, int tid) const {
    constexpr int chunks = D / 8;
    for (int c = tid; c < window.count * chunks; c += block_threads) {
      const int row = c / chunks, col = (c % chunks) * 8;
      const float total = sum[row];
      const float scale = mean ? 1.f : (total > 0.f ? 1.f / total : 0.f);
      store_eight(out_base + window.position(row) * out_seq + col, acc + row * D + col, scale,
                  out_vector);
    }
    if (lse_base == nullptr) return;
    for (int row = tid; row < window.count; row += block_threads) {
      const float total = sum[row];
      lse_base[window.position(row)] =
          mean ? max[row]
               : (total > 0.f ? (max[row] * scale_log2 + log2f(total)) * ln2
                              : -__int_as_float(0x7f800000));
    }
  }
};

}  // namespace dilated_attention::cuda::device
