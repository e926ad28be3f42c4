#pragma once
// dQ of the backward (docs/semantics.md §7) on tensor cores for 16-bit storage, FlashAttention-2
// style: the forward kernel's structure (tensor_core_kernel.cuh) with the softmax replaced by the
// known statistics. One thread block per (batch, head, window of up to 64 query rows of stride R),
// the same work units as the forward; warp w owns rows 16w..16w+15. Q is loaded once as mma A
// fragments and dO stays in shared memory (its fragments are read per tile); for each branch and each segment overlapping the window, the block's K and V
// stream through shared memory in tiles of 64 keys (cp.async, two stages; the dO tile's copy is
// completed by the first key tile's wait), and per tile:
//   S  = Q K^T,  dP = dO V^T                      (mma, fp32 accumulators)
//   P  = exp2(S scale log2 e - LSE log2 e)        (0 where the key is masked, as in the forward)
//   dS = P (dP g - D)                             (g = 1, or 1/G for mean mixing)
//   dQ += dS K                                    (dS rounded to T as an A fragment, K via
//                                                  ldmatrix.trans as the B operand)
// LSE and D are the row's (softmax mixing) or branch i's (mean), from the row-statistics kernel.
// Each dQ row is written once, by the block that owns it: no atomics, a fixed order.

#include <cstdint>

#include "backward_plan.hpp"
#include "copy.cuh"
#include "launch_plan.hpp"
#include "mma.cuh"
#include "tensor_core_kernel.cuh"  // load_rows

namespace dilated_attention::cuda::device {

template <class T, int D>
__global__ void __launch_bounds__(kThreads, 1)
    tensor_core_backward_dq_kernel(const BackwardParams bp) {
  static_assert(D % 16 == 0 && D <= 128, "head_dim must be a multiple of 16, at most 128");
  using Mma = MmaOp<T>;
  constexpr int kPitch = D + 8;
  constexpr int kDimTiles = D / 8;
  constexpr int kKeyTiles = kKeyTile / 8;
  constexpr float kLog2e = 1.4426950408889634f;
  const float kInf = __int_as_float(0x7f800000);
  const ForwardParams& p = bp.f;

  // At head_dim 128 the Q fragments stay in shared memory too (registers would spill).
  constexpr bool kQInShared = backward_dq_keeps_q_in_shared(D);
  // With Q in shared memory the k-loop of S and dP need not be unrolled (nothing is indexed in
  // registers by it); rolled, its ldmatrix addresses are not all kept live at once.
  constexpr int kScoreUnroll = kQInShared ? 2 : D / 16;
  (void)kScoreUnroll;  // read only by the pragma (ignored by the host emulation)
  extern __shared__ __align__(16) unsigned char shared_raw[];
  T* const row_tile = reinterpret_cast<T*>(shared_raw);  // dO (and Q before, unless kQInShared)
  T* const q_tile = kQInShared ? row_tile + kWindowRows * kPitch : row_tile;
  T* const k_stages = q_tile + kWindowRows * kPitch;
  T* const v_stages = k_stages + 2 * kKeyTile * kPitch;

  const WorkUnit unit = work_unit(p, blockIdx.x);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const Progression window = window_rows(p, unit.window);
  if (window.empty()) return;  // uniform
  const std::int64_t kv_head = p.kv_head(unit.head);
  const T* const q_base = static_cast<const T*>(p.q) + unit.batch * p.q_batch + unit.head * p.q_head;
  const T* const do_base =
      static_cast<const T*>(bp.d_out) + unit.batch * bp.do_batch + unit.head * bp.do_head;
  const T* const k_base = static_cast<const T*>(p.k) + unit.batch * p.k_batch + kv_head * p.k_head;
  const T* const v_base = static_cast<const T*>(p.v) + unit.batch * p.v_batch + kv_head * p.v_head;
  const bool mean = p.mixing == Mixing::mean;

  const std::int64_t row_position[2] = {
      warp * 16 + g < window.count ? window.at(warp * 16 + g) : -1,
      warp * 16 + g + 8 < window.count ? window.at(warp * 16 + g + 8) : -1};
  const std::int64_t row_base = (unit.batch * p.heads + unit.head) * p.seq_len;

  // Q fragments live in registers for the whole block; the dO tile then takes Q's place in
  // shared memory and its fragments are read per key tile (holding both in registers spills at
  // head_dim 96 and 128).
  const int fragment_offset = (warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kPitch + (lane / 16) * 8;
  T* const fragment_row = row_tile + fragment_offset;
  std::uint32_t q_frag[kQInShared ? 1 : D / 16][4];
  load_rows<T, D, kWindowRows, true>(q_tile, q_base, p.q_seq, window, 0, p.q_vector);
  if constexpr (!kQInShared) {
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(q_frag[kk], fragment_row + kk * 16);
    __syncthreads();
  }
  load_rows<T, D, kWindowRows, true>(row_tile, do_base, bp.do_seq, window, 0, bp.do_vector);
  cp_async_commit();

  float acc[kDimTiles][4];
#pragma unroll
  for (int dn = 0; dn < kDimTiles; ++dn) acc[dn][0] = acc[dn][1] = acc[dn][2] = acc[dn][3] = 0.f;

  int stage = 0;
  for (int i = 0; i < p.num_branches; ++i) {
    const BranchGeometry geometry = p.branch(i);
    const std::int64_t offset = p.offset(i, unit.head);
    if (offset < 0) continue;  // uniform
    // This branch's statistics of the thread's two rows (unused where the row is masked).
    float lse_log2[2], delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const std::int64_t x = row_position[r];
      const std::int64_t at = (mean ? i * bp.rows : 0) + row_base + (x < 0 ? 0 : x);
      const float lse = mean ? bp.branch_lse[at] : p.lse[row_base + (x < 0 ? 0 : x)];
      lse_log2[r] = lse == -kInf ? 0.f : lse * kLog2e;
      delta[r] = bp.delta[at];
    }
    const SegmentRange segments = segments_overlapping(geometry, window);
    for (std::int64_t s = segments.first; s <= segments.last; ++s) {
      const SegmentWork work = segment_work(geometry, s, offset, p.causal, window);
      if (work.empty()) continue;  // uniform
      const Progression streamed = work.keys.prefix(work.key_count);
      const std::int64_t limit[2] = {key_limit(work.keys, row_position[0], p.causal),
                                     key_limit(work.keys, row_position[1], p.causal)};
      const std::int64_t tiles = work.tiles();

      load_rows<T, D, kKeyTile, true>(k_stages + stage * kKeyTile * kPitch, k_base, p.k_seq, streamed, 0,
                                p.k_vector);
      load_rows<T, D, kKeyTile, true>(v_stages + stage * kKeyTile * kPitch, v_base, p.v_seq, streamed, 0,
                                p.v_vector);
      cp_async_commit();
      for (std::int64_t tile = 0; tile < tiles; ++tile) {
        const int current = stage;
        if (tile + 1 < tiles) {
          const std::int64_t next_j0 = (tile + 1) * kKeyTile;
          load_rows<T, D, kKeyTile, true>(k_stages + (stage ^ 1) * kKeyTile * kPitch, k_base, p.k_seq,
                                    streamed, next_j0, p.k_vector);
          load_rows<T, D, kKeyTile, true>(v_stages + (stage ^ 1) * kKeyTile * kPitch, v_base, p.v_seq,
                                    streamed, next_j0, p.v_vector);
          cp_async_commit();
          cp_async_wait<1>();
        } else {
          cp_async_wait<0>();
        }
        __syncthreads();
        const T* const k_tile = k_stages + current * kKeyTile * kPitch;
        const T* const v_tile = v_stages + current * kKeyTile * kPitch;

        // S = Q K^T and dP = dO V^T for this warp's 16 rows and the tile's 64 keys.
        float score[kKeyTiles][4], grad[kKeyTiles][4];
#pragma unroll
        for (int nt = 0; nt < kKeyTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) score[nt][e] = grad[nt][e] = 0.f;
#pragma unroll kScoreUnroll
        for (int kk = 0; kk < D / 16; ++kk) {
          std::uint32_t do_frag[4], q_shared_frag[4];
          ldmatrix_x4(do_frag, fragment_row + kk * 16);
          if constexpr (kQInShared) ldmatrix_x4(q_shared_frag, q_tile + fragment_offset + kk * 16);
          const std::uint32_t(&a_q)[4] = kQInShared ? q_shared_frag : q_frag[kQInShared ? 0 : kk];
#pragma unroll
          for (int np = 0; np < kKeyTiles / 2; ++np) {
            const int row = np * 16 + (lane % 8) + (lane / 16) * 8, col = kk * 16 + ((lane / 8) % 2) * 8;
            std::uint32_t b[4];
            ldmatrix_x4(b, k_tile + row * kPitch + col);
            Mma::run(score[2 * np], a_q, b[0], b[1]);
            Mma::run(score[2 * np + 1], a_q, b[2], b[3]);
            ldmatrix_x4(b, v_tile + row * kPitch + col);
            Mma::run(grad[2 * np], do_frag, b[0], b[1]);
            Mma::run(grad[2 * np + 1], do_frag, b[2], b[3]);
          }
        }

        // dS = P (dP g - D), 0 where the key is masked for the row.
        const std::int64_t j0 = tile * kKeyTile;
        int local_limit[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const std::int64_t rest = limit[r] - j0;
          local_limit[r] = rest < 0 ? 0 : (rest > kKeyTile ? kKeyTile : static_cast<int>(rest));
        }
#pragma unroll
        for (int nt = 0; nt < kKeyTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = nt * 8 + 2 * t + (e & 1), r = e >> 1;
            const float prob =
                j < local_limit[r] ? fast_exp2(fmaf(score[nt][e], p.scale_log2, -lse_log2[r])) : 0.f;
            score[nt][e] = prob * (grad[nt][e] * bp.grad_out_scale - delta[r]);
          }

        // dQ += dS K: dS as A fragments (C and A layouts agree), K^T via ldmatrix.trans.
#pragma unroll
        for (int ks = 0; ks < kKeyTile / 16; ++ks) {
          const std::uint32_t a[4] = {Mma::pack(score[2 * ks][0], score[2 * ks][1]),
                                      Mma::pack(score[2 * ks][2], score[2 * ks][3]),
                                      Mma::pack(score[2 * ks + 1][0], score[2 * ks + 1][1]),
                                      Mma::pack(score[2 * ks + 1][2], score[2 * ks + 1][3])};
#pragma unroll
          for (int dp = 0; dp < D / 16; ++dp) {
            std::uint32_t b[4];
            ldmatrix_x4_trans(b, k_tile + (ks * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kPitch +
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
  T* const dq_base = static_cast<T*>(bp.d_q) + unit.batch * bp.dq_batch + unit.head * bp.dq_head;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const std::int64_t x = row_position[r];
    if (x < 0) continue;
    T* const dq_row = dq_base + x * bp.dq_seq;
#pragma unroll
    for (int dn = 0; dn < kDimTiles; ++dn)
#pragma unroll
      for (int c = 0; c < 2; ++c) dq_row[dn * 8 + 2 * t + c] = T(acc[dn][2 * r + c] * p.scale);
  }
}

}  // namespace dilated_attention::cuda::device
