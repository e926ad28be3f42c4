#pragma once
// dQ of the backward (docs/semantics.md "The gradient") on tensor cores for 16-bit storage, FlashAttention-2
// style: the forward kernel's structure (tensor_core_kernel.cuh) with the softmax replaced by the
// known statistics. One thread block per (batch, head, window of up to 64 query rows of stride R),
// the same work units as the forward; warp w owns rows 16w..16w+15. Q is loaded once as mma A
// fragments and dO stays in shared memory (its fragments are read per tile); for each branch and
// each segment overlapping the window, the block's K and V stream through shared memory in tiles
// of 64 keys (cp.async, two stages; the dO tile's copy is completed by the first key tile's wait),
// and per tile:
//   S  = Q K^T,  dP = dO V^T                      (mma, fp32 accumulators)
//   P  = exp2(S scale log2 e - LSE log2 e)        (0 where the key is masked, as in the forward)
//   dS = P (dP g - D)                             (g = 1, or 1/G for mean mixing)
//   dQ += dS K                                    (dS rounded to T as an A fragment, K via
//                                                  ldmatrix.trans as the B operand)
// LSE and D are the row's (softmax mixing) or branch i's (mean), from the row-statistics kernel.
// Each dQ row is written once, by the block that owns it: no atomics, a fixed order.
// Both backward tensor-core kernels carry 32-bit positions and counts across their loops and
// recompute each tile's 64-bit addresses from them (row_pointers.cuh): registers for the
// accumulators, no spills at any head_dim (docs/cuda.md).

#include <cstdint>

#include "backward_plan.hpp"
#include "copy.cuh"
#include "launch_plan.hpp"
#include "mma.cuh"
#include "row_pointers.cuh"

namespace dilated_attention::cuda::device {

template <class T, int D>
__global__ void __launch_bounds__(block_threads, 1)
    tensor_core_backward_dq_kernel(const BackwardParams bp) {
  static_assert(D % 16 == 0 && D <= 128, "head_dim must be a multiple of 16, at most 128");
  using Mma = MmaOp<T>;
  constexpr int pitch = D + 8;
  constexpr int dim_tiles = D / 8;
  constexpr int key_tiles = key_stage_rows / 8;
  constexpr float log2e = 1.4426950408889634f;
  const float inf = __int_as_float(0x7f800000);
  const ForwardParams& p = bp.f;

  // At head_dim 128 the Q fragments stay in shared memory too (registers would spill).
  constexpr bool q_in_shared = backward_dq_keeps_q_in_shared(D);
  // With Q in shared memory the k-loop of S and dP need not be unrolled (nothing is indexed in
  // registers by it); rolled, its ldmatrix addresses are not all kept live at once.
  constexpr int score_unroll = q_in_shared ? 2 : D / 16;
  (void)score_unroll;  // read only by the pragma (ignored by the host emulation)
  extern __shared__ __align__(16) unsigned char shared_raw[];
  T* const row_tile = reinterpret_cast<T*>(shared_raw);  // dO (and Q before, unless q_in_shared)
  T* const q_tile = q_in_shared ? row_tile + block_window_rows * pitch : row_tile;
  T* const k_stages = q_tile + block_window_rows * pitch;
  T* const v_stages = k_stages + 2 * key_stage_rows * pitch;

  // Block coordinates, positions and counts in 32 bits (seq_len < 2^31, fewer than 2^31 blocks:
  // check_backend_limits); 64-bit addresses are recomputed from them where used
  // (row_pointers.cuh), so the loops below carry ints, not 64-bit index state.
  const WorkUnit unit = work_unit(p, blockIdx.x);
  const int batch = static_cast<int>(unit.batch), head = static_cast<int>(unit.head);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const Progression first_window = window_rows(p, unit.window);
  if (first_window.empty()) return;  // uniform
  const int window_first = static_cast<int>(first_window.first);
  const int window_count = static_cast<int>(first_window.count);
  const int window_stride = static_cast<int>(p.row_stride);
  const int kv_head = static_cast<int>(p.kv_head(head));
  const bool mean = p.mixing == Mixing::mean;

  // Q fragments live in registers for the whole block; the dO tile then takes Q's place in
  // shared memory and its fragments are read per key tile (holding both in registers spills at
  // head_dim 96 and 128).
  const int fragment_offset =
      (warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * pitch + (lane / 16) * 8;
  T* const fragment_row = row_tile + fragment_offset;
  std::uint32_t q_frag[q_in_shared ? 1 : D / 16][4];
  copy_tile_rows<T, D, block_window_rows>(
      q_tile,
      row_at(static_cast<const T*>(p.q), p.q_batch, p.q_seq, p.q_head, batch, head, window_first),
      window_stride * p.q_seq, window_count, p.q_vector);
  if constexpr (!q_in_shared) {
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(q_frag[kk], fragment_row + kk * 16);
    __syncthreads();
  }
  copy_tile_rows<T, D, block_window_rows>(row_tile,
                                          row_at(static_cast<const T*>(bp.d_out), bp.do_batch,
                                                 bp.do_seq, bp.do_head, batch, head, window_first),
                                          window_stride * bp.do_seq, window_count, bp.do_vector);
  cp_async_commit();

  float acc[dim_tiles][4];
#pragma unroll
  for (int dn = 0; dn < dim_tiles; ++dn) acc[dn][0] = acc[dn][1] = acc[dn][2] = acc[dn][3] = 0.f;

  int stage = 0;
  for (int i = 0; i < p.num_branches; ++i) {
    const int offset = static_cast<int>(p.offset(i, head));
    if (offset < 0) continue;  // uniform
    // This thread's two rows (window rows warp * 16 + g + 8 r; -1 past the window's end) and
    // their statistics in this branch (unused where the row is masked).
    int row_position[2];
    float lse_log2[2], delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = opaque(warp * 16 + g) + 8 * r;
      row_position[r] = row < window_count ? window_first + row * window_stride : -1;
      const std::int64_t row_index =
          (static_cast<std::int64_t>(batch) * p.heads + head) * p.seq_len +
          (row_position[r] < 0 ? 0 : row_position[r]);
      const std::int64_t at = (mean ? i * bp.rows : 0) + row_index;
      const float lse = mean ? bp.branch_lse[at] : p.lse[row_index];
      lse_log2[r] = lse == -inf ? 0.f : lse * log2e;
      delta[r] = bp.delta[at];
    }
    const SegmentRange segments =
        segments_overlapping(p.branch(i), Progression{window_first, window_stride, window_count});
    const int last_segment = static_cast<int>(segments.last);
    for (int s = static_cast<int>(segments.first); s <= last_segment; ++s) {
      // Everything below is recomputed per segment from ints (opaque: not hoisted out of the
      // loops into registers); the loops carry only i, offset, s, last_segment and the rows'
      // positions and statistics.
      const SegmentWork work =
          segment_work(p.branch(opaque(i)), s, offset, p.causal,
                       Progression{opaque(window_first), window_stride, opaque(window_count)});
      if (work.empty()) continue;  // uniform
      // The streamed keys: positions first + j * stride, j < count.
      const int first = static_cast<int>(work.keys.first);
      const int stride = static_cast<int>(work.keys.stride);
      const int count = static_cast<int>(work.key_count);
      const int limit[2] = {static_cast<int>(key_limit(work.keys, row_position[0], p.causal)),
                            static_cast<int>(key_limit(work.keys, row_position[1], p.causal))};
      // K and V rows of the key tile from key j0 on into stage `into`. Its 64-bit addresses are
      // recomputed per tile from ints (row_pointers.cuh).
      auto load_tile = [&](int j0, int into) {
        const int h = opaque(kv_head), r = opaque(stride);
        const int position = first + j0 * r, rows_left = count - j0;
        copy_tile_rows<T, D, key_stage_rows>(
            k_stages + into * key_stage_rows * pitch,
            row_at(static_cast<const T*>(p.k), p.k_batch, p.k_seq, p.k_head, batch, h, position),
            r * p.k_seq, rows_left, p.k_vector);
        copy_tile_rows<T, D, key_stage_rows>(
            v_stages + into * key_stage_rows * pitch,
            row_at(static_cast<const T*>(p.v), p.v_batch, p.v_seq, p.v_head, batch, h, position),
            r * p.v_seq, rows_left, p.v_vector);
      };
      load_tile(0, stage);
      cp_async_commit();
      for (int j0 = 0; j0 < count; j0 += key_stage_rows) {
        const int current = stage;
        if (j0 + key_stage_rows < count) {
          load_tile(j0 + key_stage_rows, stage ^ 1);
          cp_async_commit();
          cp_async_wait<1>();
        } else {
          cp_async_wait<0>();
        }
        __syncthreads();
        const T* const k_tile = k_stages + current * key_stage_rows * pitch;
        const T* const v_tile = v_stages + current * key_stage_rows * pitch;

        // S = Q K^T and dP = dO V^T for this warp's 16 rows and the tile's 64 keys.
        float score[key_tiles][4], grad[key_tiles][4];
#pragma unroll
        for (int nt = 0; nt < key_tiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) score[nt][e] = grad[nt][e] = 0.f;
#pragma unroll score_unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          std::uint32_t do_frag[4], q_shared_frag[4];
          ldmatrix_x4(do_frag, fragment_row + kk * 16);
          if constexpr (q_in_shared) ldmatrix_x4(q_shared_frag, q_tile + fragment_offset + kk * 16);
          const std::uint32_t(&a_q)[4] = q_in_shared ? q_shared_frag : q_frag[q_in_shared ? 0 : kk];
#pragma unroll
          for (int np = 0; np < key_tiles / 2; ++np) {
            const int row = np * 16 + (lane % 8) + (lane / 16) * 8, col = kk * 16 + ((lane / 8) % 2) * 8;
            std::uint32_t b[4];
            ldmatrix_x4(b, k_tile + row * pitch + col);
            Mma::run(score[2 * np], a_q, b[0], b[1]);
            Mma::run(score[2 * np + 1], a_q, b[2], b[3]);
            ldmatrix_x4(b, v_tile + row * pitch + col);
            Mma::run(grad[2 * np], do_frag, b[0], b[1]);
            Mma::run(grad[2 * np + 1], do_frag, b[2], b[3]);
          }
        }

        // dS = P (dP g - D), 0 where the key is masked for the row. Key j = nt * 8 + 2 t + c
        // is attended by row r iff j < local_limit[r], i.e. iff nt * 8 + c < room[r]: one compare
        // with a constant per element (no per-thread table of the thread's columns j).
        int room[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int rest = limit[r] - j0;
          room[r] = (rest < 0 ? 0 : (rest > key_stage_rows ? key_stage_rows : rest)) - 2 * t;
        }
#pragma unroll
        for (int nt = 0; nt < key_tiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e >> 1;
            const float prob = nt * 8 + (e & 1) < room[r]
                                   ? fast_exp2(fmaf(score[nt][e], p.scale_log2, -lse_log2[r]))
                                   : 0.f;
            score[nt][e] = prob * (grad[nt][e] * bp.grad_out_scale - delta[r]);
          }

        // dQ += dS K: dS as A fragments (C and A layouts agree), K^T via ldmatrix.trans.
#pragma unroll
        for (int ks = 0; ks < key_stage_rows / 16; ++ks) {
          const std::uint32_t a[4] = {Mma::pack(score[2 * ks][0], score[2 * ks][1]),
                                      Mma::pack(score[2 * ks][2], score[2 * ks][3]),
                                      Mma::pack(score[2 * ks + 1][0], score[2 * ks + 1][1]),
                                      Mma::pack(score[2 * ks + 1][2], score[2 * ks + 1][3])};
#pragma unroll
          for (int dp = 0; dp < D / 16; ++dp) {
            std::uint32_t b[4];
            ldmatrix_x4_trans(b, k_tile + (ks * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * pitch +
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

  cp_async_wait<0>();  // a window that streamed no key tile still waits for its Q/dO copies

  // Epilogue: every row of the window is written once (0 for rows that attend nothing).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + g + 8 * r;
    if (row >= window_count) continue;
    T* const dq_row = row_at(static_cast<T*>(bp.d_q), bp.dq_batch, bp.dq_seq, bp.dq_head, batch,
                             head, window_first + row * window_stride);
#pragma unroll
    for (int dn = 0; dn < dim_tiles; ++dn)
#pragma unroll
      for (int c = 0; c < 2; ++c) dq_row[dn * 8 + 2 * t + c] = T(acc[dn][2 * r + c] * p.scale);
  }
}

}  // namespace dilated_attention::cuda::device
