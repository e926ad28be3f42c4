#pragma once
// The fused forward kernel for 16-bit storage (__half, __nv_bfloat16) on tensor cores, in the
// FlashAttention-2 style, for every branch at once.
//
// One thread block = one work unit (batch, head, query window of up to block_window_rows positions,
// query_window.hpp). The window's rows are loaded once into a shared Q tile. For each branch and
// each segment overlapping the window (a "work"), the window rows that the block selects are
// packed in position order into 16-row slices, one per warp (slices without queries are
// skipped); the warp's Q fragments come from the tile by ldmatrix at the packed rows. The block's
// keys (rows of the segment with the head's offset, i.e. stride r) stream through shared memory
// in tiles of key_stage_rows rows with cp.async double buffering, addressed by stride in place
// (row_pointers.cuh, shared with the backward): no gather, no copy. Each warp multiplies only up
// to its own slice's key limit (16-key steps). Scores and P.V use mma.sync m16n8k16 with fp32
// accumulators; keys past a query's causal limit and past the block are masked to -inf. The
// online-softmax state (max, sum, accumulator) of a row continues from one branch to the next:
// for Mixing::softmax this is exactly softmax(S + ln C) V of docs/semantics.md "The forward". When the
// packing changes, the state moves through one fp32 record per window row in shared memory
// (row_records.cuh). Mixing::mean closes each work's rows (normalised partial / G added into the
// row's record, LSE_i into its log-sum-exp). Each output row is written once, by the block that
// owns it, from its record, with no merge kernel.

#include <cstdint>

#include "copy.cuh"
#include "launch_plan.hpp"
#include "mma.cuh"
#include "query_window.hpp"
#include "row_pointers.cuh"
#include "row_records.cuh"
#include "tile_io.cuh"

namespace dilated_attention::cuda::device {

// The window rows that `keys` selects (query_window.hpp's selected_rows), by two ballots: lane l
// tests rows l and l + 32. Every warp computes the whole mask, so it is uniform in the block.
__device__ __forceinline__ std::uint64_t ballot_rows(const Progression& keys,
                                                     const QueryWindow& window, int lane) {
  const unsigned low = __ballot_sync(0xffffffffu, selects(keys, window, lane));
  const unsigned high = __ballot_sync(0xffffffffu, selects(keys, window, lane + 32));
  return std::uint64_t{low} | (std::uint64_t{high} << 32);
}

template <class T, int D>
__global__ void __launch_bounds__(block_threads) tensor_core_forward_kernel(const ForwardParams p) {
  static_assert(D % 16 == 0 && D <= 128, "head_dim must be a multiple of 16, at most 128");
  using Mma = MmaOp<T>;
  constexpr int pitch = D + 8;
  constexpr int dim_tiles = D / 8;               // n-tiles of the output
  constexpr int key_tiles = key_stage_rows / 8;  // n-tiles of the scores
  const float inf = __int_as_float(0x7f800000);

  extern __shared__ __align__(16) unsigned char shared_raw[];
  T* const q_tile = reinterpret_cast<T*>(shared_raw);
  T* const k_stages = q_tile + block_window_rows * pitch;
  T* const v_stages = k_stages + 2 * key_stage_rows * pitch;
  // One record per window row (launch_plan.hpp's forward_shared_bytes): D accumulators, the max
  // (mean: the log-sum-exp of the branches) and the sum.
  const RowRecords<D> records =
      RowRecords<D>::in(reinterpret_cast<float*>(v_stages + 2 * key_stage_rows * pitch));

  const WorkUnit unit = work_unit(p, blockIdx.x);
  const QueryWindow window = query_window(p, unit.window);
  if (window.empty()) return;  // uniform: the whole block leaves before any barrier
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const std::int64_t kv_head = p.kv_head(unit.head);
  const T* const q_base =
      static_cast<const T*>(p.q) + unit.batch * p.q_batch + unit.head * p.q_head;
  const T* const k_base = static_cast<const T*>(p.k) + unit.batch * p.k_batch + kv_head * p.k_head;
  const T* const v_base = static_cast<const T*>(p.v) + unit.batch * p.v_batch + kv_head * p.v_head;
  const bool mean = p.mixing == Mixing::mean;

  // Copy loops rolled at head_dim 96 and 128, unrolled below: the choice without spills (ptxas -v).
  constexpr bool rolled = D >= 96;
  load_window_rows<T, D, rolled>(q_tile, q_base, p.q_seq, window, p.q_vector);
  cp_async_commit();
  records.clear(tid);
  cp_async_wait<0>();
  __syncthreads();

  // The online-softmax state of this thread's two rows of the current packing (C fragment rows g
  // and g + 8 of its warp's slice): the running max of the raw scores q.k (the scale is positive,
  // so it is also the max of the scaled ones; probabilities are exp2(s scale log2e - pivot)), this
  // thread's share of the sum (the 4 threads of a row are summed when the state is saved), and
  // the accumulators.
  float row_max[2] = {-inf, -inf};
  float row_sum[2] = {0.f, 0.f};
  float acc[dim_tiles][4];
  int row_index[2] = {-1, -1};  // their window rows, -1 for none
  std::uint32_t q_frag[D / 16][4];
  // The packing (QueryWork::rows) that row_index and q_frag are for, 0 for none; for softmax the
  // registers hold the state of its rows (mean closes every work's rows at its end).
  std::uint64_t packed = 0;

  // The works of the block, in branch and segment order: the next one with queries after the
  // cursor (every warp ballots the same masks, so the answer is uniform).
  int cursor_branch = 0;
  std::int64_t cursor_segment = -1;  // -1: the branch's first segment overlapping the window
  auto next_work = [&](QueryWork& found) -> bool {
    for (; cursor_branch < p.num_branches; ++cursor_branch, cursor_segment = -1) {
      const std::int64_t offset = p.offset(cursor_branch, unit.head);
      if (offset < 0) continue;
      const BranchGeometry geometry = p.branch(cursor_branch);
      const SegmentRange segments = segments_overlapping(geometry, window);
      if (cursor_segment < segments.first) cursor_segment = segments.first;
      for (; cursor_segment <= segments.last; ++cursor_segment) {
        const Progression keys = geometry.rows(cursor_segment, offset);
        found = query_work(keys, ballot_rows(keys, window, lane), window, p.causal);
        if (!found.empty()) {
          ++cursor_segment;
          return true;
        }
      }
    }
    return false;
  };
  // Key tile `tile` of a work into stage `into` (row_pointers.cuh: a per-thread row pointer walked
  // down the tile), K and V in separate cp.async groups, so that S = QK^T starts while V is still
  // in flight. A block of one key gets a row step of 0: its stride may exceed the sequence.
  auto issue_tile = [&](const QueryWork& of, int tile, int into) {
    const std::int64_t first = of.keys.first + std::int64_t{tile} * key_stage_rows * of.keys.stride;
    const std::int64_t step = of.keys.count > 1 ? of.keys.stride : 0;
    const int rows_left = of.key_count - tile * key_stage_rows;
    copy_tile_rows<T, D, key_stage_rows>(k_stages + into * key_stage_rows * pitch,
                                         k_base + first * p.k_seq, step * p.k_seq, rows_left,
                                         p.k_vector);
    cp_async_commit();
    copy_tile_rows<T, D, key_stage_rows>(v_stages + into * key_stage_rows * pitch,
                                         v_base + first * p.v_seq, step * p.v_seq, rows_left,
                                         p.v_vector);
    cp_async_commit();
  };

  QueryWork work;
  bool more = next_work(work);
  int stage = 0;
  if (more) issue_tile(work, 0, stage);
  while (more) {
    // Repack: this thread's rows are queries warp * 16 + g and + 8 of the work, its warp's Q
    // fragments those of queries warp * 16 .. + 15.
    if (work.rows != packed) {  // uniform
      if (!mean && packed != 0) {
        records.save(row_index, row_max, row_sum, acc, t);
        __syncthreads();  // the records are written before their new owners read them
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int n = warp * slice_rows + g + 8 * r;
        row_index[r] = n < work.queries ? nth_set_bit(work.rows, n) : -1;
      }
      const int n = warp * slice_rows + (lane % 8) + ((lane / 8) % 2) * 8;
      const int row = n < work.queries ? nth_set_bit(work.rows, n) : 0;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ldmatrix_x4(q_frag[kk], q_tile + row * pitch + kk * 16 + (lane / 16) * 8);
    }
    if (mean || work.rows != packed) {  // uniform
      // Mean: every work starts afresh. Softmax: the rows' state so far.
      const int from[2] = {mean ? -1 : row_index[0], mean ? -1 : row_index[1]};
      records.load(from, row_max, row_sum, acc, t);
      packed = work.rows;
    }

    // Key limits in 32 bits: a block has fewer than 2^31 keys (check_backend_limits).
    const int limit[2] = {
        row_index[0] >= 0 ? selected_key_limit(work.keys, window.position(row_index[0]), p.causal) : 0,
        row_index[1] >= 0 ? selected_key_limit(work.keys, window.position(row_index[1]), p.causal) : 0};
    const int warp_limit = slice_key_limit(work, window, warp, p.causal);
    const int tiles = work.tiles();
    QueryWork next;
    bool next_more = false;

    for (int tile = 0; tile < tiles; ++tile) {
      const int current = stage;
      cp_async_wait<1>();  // this tile's K (its V may still be in flight)
      __syncthreads();     // ... visible to all, and every warp is done with the other stage
      // Prefetch into the other stage: the work's next tile, or the next work's first one.
      bool prefetched = true;
      if (tile + 1 < tiles) {
        issue_tile(work, tile + 1, stage ^ 1);
      } else {
        next_more = next_work(next);
        if (next_more) issue_tile(next, 0, stage ^ 1);
        prefetched = next_more;
      }

      // Keys this warp multiplies in the tile (16-key steps); 0: its slice attends none.
      const int warp_keys = slice_tile_keys(warp_limit, tile);
      const T* const k_tile = k_stages + current * key_stage_rows * pitch;
      const T* const v_tile = v_stages + current * key_stage_rows * pitch;
      float score[key_tiles][4];
      float factor[2];
      if (warp_keys > 0) {  // uniform in the warp
        // S = Q K^T for this warp's 16 rows and the tile's keys up to warp_keys.
#pragma unroll
        for (int nt = 0; nt < key_tiles; ++nt)
          score[nt][0] = score[nt][1] = score[nt][2] = score[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
          for (int np = 0; np < key_tiles / 2; ++np) {
            if (np * key_step >= warp_keys) continue;
            std::uint32_t b[4];
            ldmatrix_x4(b, k_tile + (np * 16 + (lane % 8) + (lane / 16) * 8) * pitch + kk * 16 +
                               ((lane / 8) % 2) * 8);
            Mma::run(score[2 * np], q_frag[kk], b[0], b[1]);
            Mma::run(score[2 * np + 1], q_frag[kk], b[2], b[3]);
          }

        // Mask: key j of the block is attended by a row iff j < its limit (0 for rows past the
        // work's queries). Then the running max of each row.
        const int j0 = tile * key_stage_rows;
        int local_limit[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int rest = limit[r] - j0;
          local_limit[r] = rest < 0 ? 0 : (rest > key_stage_rows ? key_stage_rows : rest);
        }
        float tile_max[2] = {-inf, -inf};
#pragma unroll
        for (int nt = 0; nt < key_tiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = nt * 8 + 2 * t + (e & 1);
            const float value = j < local_limit[e >> 1] ? score[nt][e] : -inf;
            score[nt][e] = value;
            tile_max[e >> 1] = fmaxf(tile_max[e >> 1], value);
          }
        float pivot[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float new_max = fmaxf(row_max[r], row_max4(tile_max[r]));
          // A row that has seen no key yet keeps max -inf: exponentiate against 0 so that its
          // masked scores give exp2(-inf) = 0 rather than NaN.
          factor[r] = new_max == -inf ? 1.f : fast_exp2((row_max[r] - new_max) * p.scale_log2);
          pivot[r] = new_max == -inf ? 0.f : new_max * p.scale_log2;
          row_max[r] = new_max;
          row_sum[r] *= factor[r];
        }
#pragma unroll
        for (int nt = 0; nt < key_tiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            // One FFMA and one MUFU.EX2 per score: exp2(s scale log2e - max scale log2e).
            const float prob = fast_exp2(fmaf(score[nt][e], p.scale_log2, -pivot[e >> 1]));
            score[nt][e] = prob;
            row_sum[e >> 1] += prob;
          }
      }

      // This tile's V: its group is the oldest but the prefetch's two.
      if (prefetched)
        cp_async_wait<2>();
      else
        cp_async_wait<0>();
      __syncthreads();

      if (warp_keys > 0) {
#pragma unroll
        for (int dn = 0; dn < dim_tiles; ++dn)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[dn][e] *= factor[e >> 1];
        // O += P V: the score accumulators become A fragments (the C and A layouts agree); key
        // steps past warp_keys hold only zeros and are skipped.
#pragma unroll
        for (int ks = 0; ks < key_stage_rows / 16; ++ks) {
          if (ks * key_step >= warp_keys) continue;
          const std::uint32_t a[4] = {Mma::pack(score[2 * ks][0], score[2 * ks][1]),
                                      Mma::pack(score[2 * ks][2], score[2 * ks][3]),
                                      Mma::pack(score[2 * ks + 1][0], score[2 * ks + 1][1]),
                                      Mma::pack(score[2 * ks + 1][2], score[2 * ks + 1][3])};
#pragma unroll
          for (int dp = 0; dp < D / 16; ++dp) {
            std::uint32_t b[4];
            ldmatrix_x4_trans(b, v_tile + (ks * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * pitch +
                                     dp * 16 + (lane / 16) * 8);
            Mma::run(acc[2 * dp], a, b[0], b[1]);
            Mma::run(acc[2 * dp + 1], a, b[2], b[3]);
          }
        }
      }
      stage ^= 1;
    }
    if (mean) records.close(row_index, row_max, row_sum, acc, t, p.num_branches, p.scale_log2);
    work = next;
    more = next_more;
  }

  // Epilogue: every row of the window written once, from its record.
  if (!mean && packed != 0) records.save(row_index, row_max, row_sum, acc, t);
  __syncthreads();
  records.write(window, static_cast<T*>(p.out) + unit.batch * p.o_batch + unit.head * p.o_head,
                p.o_seq, p.o_vector,
                p.lse != nullptr ? p.lse + (unit.batch * p.heads + unit.head) * p.seq_len : nullptr,
                mean, p.scale_log2, tid);
}

}  // namespace dilated_attention::cuda::device
