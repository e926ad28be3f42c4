#pragma once
// dK and dV of the backward (docs/semantics.md "The gradient") on tensor cores for 16-bit storage; the
// companion of tensor_core_backward_dq_kernel.cuh (which describes the shared scheme).

#include <cstdint>

#include "backward_plan.hpp"
#include "copy.cuh"
#include "launch_plan.hpp"
#include "mma.cuh"
#include "row_pointers.cuh"

namespace dilated_attention::cuda::device {

// dK and dV on tensor cores for 16-bit storage: the dQ kernel seen from the keys' side. One
// thread block per (batch, kv head, window of up to 64 key positions of stride R) -- the forward's
// windows, so each key row has exactly one owner and is written once. Its K and V rows stay in
// shared memory; for every query head of the GQA group, every branch and every segment
// overlapping the window, the block's queries (all its rows, or when causal those at or after
// the window's first key) stream through shared memory in tiles of 32 with their Q, dO rows and
// their LSE and D (two stages), and per tile:
//   S^T = K Q^T,  dP^T = V dO^T                       (keys are the mma rows)
//   P^T = exp2(S^T scale log2 e - LSE log2 e), 0 where the pair is masked
//   dS^T = P^T (dP^T g - D)
//   dV += (g P^T) dO,  dK += dS^T Q                   (ldmatrix.trans of the dO and Q tiles)
// in that fixed order: no atomics, bitwise reproducible.
template <class T, int D>
__global__ void __launch_bounds__(block_threads, 1)
    tensor_core_backward_dk_dv_kernel(const BackwardParams bp) {
  static_assert(D % 16 == 0 && D <= 128, "head_dim must be a multiple of 16, at most 128");
  using Mma = MmaOp<T>;
  constexpr int pitch = D + 8;
  constexpr int dim_tiles = D / 8;
  constexpr int query_stage_rows =
      backward_query_stage_rows;                     // queries per streamed tile (32: registers)
  constexpr int query_tiles = query_stage_rows / 8;  // n-tiles of S^T
  constexpr float log2e = 1.4426950408889634f;
  const float inf = __int_as_float(0x7f800000);
  const ForwardParams& p = bp.f;

  extern __shared__ __align__(16) unsigned char shared_raw[];
  T* const k_tile = reinterpret_cast<T*>(shared_raw);  // the window's keys
  T* const v_tile = k_tile + block_window_rows * pitch;
  T* const q_stages = v_tile + block_window_rows * pitch;  // two stages each
  T* const do_stages = q_stages + 2 * query_stage_rows * pitch;
  float* const lse_stages = reinterpret_cast<float*>(do_stages + 2 * query_stage_rows * pitch);
  float* const delta_stages = lse_stages + 2 * query_stage_rows;

  // Block coordinates, positions and counts in 32 bits (seq_len < 2^31, fewer than 2^31 blocks:
  // check_backend_limits); 64-bit addresses are recomputed from them where used
  // (row_pointers.cuh), so the loops below carry ints, not 64-bit index state.
  const std::int64_t window_index = blockIdx.x % p.windows, rest = blockIdx.x / p.windows;
  const int batch = static_cast<int>(rest / p.kv_heads);
  const int kv_head = static_cast<int>(rest % p.kv_heads);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const Progression first_window = window_rows(p, window_index);
  if (first_window.empty()) return;  // uniform
  const int window_first = static_cast<int>(first_window.first);
  const int window_count = static_cast<int>(first_window.count);
  const int window_stride = static_cast<int>(p.row_stride);
  const bool mean = p.mixing == Mixing::mean;
  const int group = static_cast<int>(p.heads / p.kv_heads);

  // The key rows whose dK, dV this thread accumulates (C fragment rows g and g + 8 of the warp):
  // window rows warp * 16 + g + 8 r, present while below window_count.
  const int fragment_offset =
      (warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * pitch + (lane / 16) * 8;

  copy_tile_rows<T, D, block_window_rows>(k_tile,
                                          row_at(static_cast<const T*>(p.k), p.k_batch, p.k_seq,
                                                 p.k_head, batch, kv_head, window_first),
                                          window_stride * p.k_seq, window_count, p.k_vector);
  copy_tile_rows<T, D, block_window_rows>(v_tile,
                                          row_at(static_cast<const T*>(p.v), p.v_batch, p.v_seq,
                                                 p.v_head, batch, kv_head, window_first),
                                          window_stride * p.v_seq, window_count, p.v_vector);
  cp_async_commit();

  float acc_k[dim_tiles][4], acc_v[dim_tiles][4];
#pragma unroll
  for (int dn = 0; dn < dim_tiles; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_k[dn][e] = acc_v[dn][e] = 0.f;

  int stage = 0;
  for (int head = kv_head * group; head < (kv_head + 1) * group; ++head) {
    for (int i = 0; i < p.num_branches; ++i) {
      const int offset = static_cast<int>(p.offset(i, head));
      if (offset < 0) continue;  // uniform
      const SegmentRange segments =
          segments_overlapping(p.branch(i), Progression{window_first, window_stride, window_count});
      const int last_segment = static_cast<int>(segments.last);
      for (int s = static_cast<int>(segments.first); s <= last_segment; ++s) {
        // Everything below is recomputed per segment from ints (opaque: not hoisted out of the
        // loops into registers); the loops carry only head, i, offset, s, last_segment.
        const int branch = opaque(i);
        const BranchGeometry geometry = p.branch(branch);
        const Progression window{opaque(window_first), window_stride, opaque(window_count)};
        // Blocks are symmetric: the block's rows are the queries, the window's rows in it the keys.
        const SegmentWork work = segment_work(geometry, s, offset, false, window);
        if (work.queries.empty()) continue;  // uniform
        const Progression& block = work.keys;
        const std::int64_t start = p.causal ? block.index_of(work.queries.first) : 0;
        // The streamed queries: positions first + j * stride, j < count.
        const int first = static_cast<int>(block.at(start));
        const int stride = static_cast<int>(block.stride);
        const int count = static_cast<int>(block.count - start);
        // Query j attends key row r iff lo[r] <= j < count (lo[r] = count: row r is not a key of
        // this block, or past the window's end).
        int lo[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = opaque(warp * 16 + g) + 8 * r;
          const bool in_window = row < window.count;
          const int y = static_cast<int>(window.first) + (in_window ? row : 0) * window_stride;
          const bool in_block = in_window && block.contains(y);
          lo[r] = !in_block ? count : (p.causal ? static_cast<int>(block.index_of(y) - start) : 0);
        }
        // Q, dO rows (cp.async) and LSE, D (plain loads) of the query tile from query j0 on into
        // stage `into`. Its 64-bit addresses are recomputed per tile from ints (row_pointers.cuh).
        auto load_tile = [&](int j0, int into) {
          const int h = opaque(head), r = opaque(stride);
          const int position = first + j0 * r, rows_left = count - j0;
          copy_tile_rows<T, D, query_stage_rows>(
              q_stages + into * query_stage_rows * pitch,
              row_at(static_cast<const T*>(p.q), p.q_batch, p.q_seq, p.q_head, batch, h, position),
              r * p.q_seq, rows_left, p.q_vector);
          copy_tile_rows<T, D, query_stage_rows>(
              do_stages + into * query_stage_rows * pitch,
              row_at(static_cast<const T*>(bp.d_out), bp.do_batch, bp.do_seq, bp.do_head, batch, h,
                     position),
              r * bp.do_seq, rows_left, bp.do_vector);
          if (tid < query_stage_rows) {
            const bool valid = tid < rows_left;
            const std::int64_t row_index =
                (static_cast<std::int64_t>(batch) * p.heads + h) * p.seq_len +
                (valid ? position + tid * r : 0);
            const std::int64_t at = (mean ? opaque(branch) * bp.rows : 0) + row_index;
            const float lse = valid ? (mean ? bp.branch_lse[at] : p.lse[at]) : -inf;
            lse_stages[into * query_stage_rows + tid] = lse == -inf ? 0.f : lse * log2e;
            delta_stages[into * query_stage_rows + tid] = valid ? bp.delta[at] : 0.f;
          }
        };
        load_tile(0, stage);
        cp_async_commit();
        for (int j0 = 0; j0 < count; j0 += query_stage_rows) {
          const int current = stage;
          if (j0 + query_stage_rows < count) {
            load_tile(j0 + query_stage_rows, stage ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
          } else {
            cp_async_wait<0>();
          }
          __syncthreads();
          const T* const q_tile = q_stages + current * query_stage_rows * pitch;
          const T* const do_tile = do_stages + current * query_stage_rows * pitch;
          const float* const lse_log2 = lse_stages + current * query_stage_rows;
          const float* const delta = delta_stages + current * query_stage_rows;

          // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys and the tile's 32 queries.
          float score[query_tiles][4], grad[query_tiles][4];
#pragma unroll
          for (int nt = 0; nt < query_tiles; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) score[nt][e] = grad[nt][e] = 0.f;
#pragma unroll 2
          for (int kk = 0; kk < D / 16; ++kk) {
            std::uint32_t a_k[4], a_v[4];
            ldmatrix_x4(a_k, k_tile + fragment_offset + kk * 16);
            ldmatrix_x4(a_v, v_tile + fragment_offset + kk * 16);
#pragma unroll
            for (int np = 0; np < query_tiles / 2; ++np) {
              const int row = np * 16 + (lane % 8) + (lane / 16) * 8;
              const int col = kk * 16 + ((lane / 8) % 2) * 8;
              std::uint32_t b[4];
              ldmatrix_x4(b, q_tile + row * pitch + col);
              Mma::run(score[2 * np], a_k, b[0], b[1]);
              Mma::run(score[2 * np + 1], a_k, b[2], b[3]);
              ldmatrix_x4(b, do_tile + row * pitch + col);
              Mma::run(grad[2 * np], a_v, b[0], b[1]);
              Mma::run(grad[2 * np + 1], a_v, b[2], b[3]);
            }
          }

          // g P^T (as dV needs it) and dS^T, 0 where masked, packed at once into 16-bit A
          // fragments (the C and A layouts agree): the fp32 tiles die here, which keeps the
          // dV and dK accumulators in registers.
          // Query j of the tile attends key row r iff local_lo <= j < local_hi (0 <= local_lo <=
          // local_hi <= query_stage_rows), i.e. iff j - local_lo < local_hi - local_lo as unsigned:
          // per element one add of a constant and one compare, from two values per row and tile
          // (no per-thread table of the thread's columns j held in registers).
          const int local_hi = count - j0 < query_stage_rows ? count - j0 : query_stage_rows;
          unsigned from_lo[2], span[2];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int a = lo[r] - j0;
            const int local_lo = a < 0 ? 0 : (a > query_stage_rows ? query_stage_rows : a);
            from_lo[r] = static_cast<unsigned>(2 * t - local_lo);
            span[r] = static_cast<unsigned>(local_hi - local_lo);
          }
          std::uint32_t p_frag[query_stage_rows / 16][4], s_frag[query_stage_rows / 16][4];
#pragma unroll
          for (int nt = 0; nt < query_tiles; ++nt)
#pragma unroll
            for (int half = 0; half < 2; ++half) {  // elements 2 half, 2 half + 1: one row
              float prob[2], ds[2];
#pragma unroll
              for (int c = 0; c < 2; ++c) {
                const int e = 2 * half + c, j = nt * 8 + 2 * t + c;
                const bool valid = from_lo[half] + static_cast<unsigned>(nt * 8 + c) < span[half];
                const float pr = valid ? fast_exp2(fmaf(score[nt][e], p.scale_log2, -lse_log2[j])) : 0.f;
                ds[c] = pr * (grad[nt][e] * bp.grad_out_scale - delta[j]);
                prob[c] = pr * bp.grad_out_scale;
              }
              // n-tile nt is half (nt % 2) of k-step nt / 2; A registers: rows g / g + 8, then
              // columns 0-7 / 8-15.
              p_frag[nt / 2][2 * (nt % 2) + half] = Mma::pack(prob[0], prob[1]);
              s_frag[nt / 2][2 * (nt % 2) + half] = Mma::pack(ds[0], ds[1]);
            }

          // dV += (g P^T) dO and dK += dS^T Q, B operands by ldmatrix.trans of the tiles.
#pragma unroll
          for (int ks = 0; ks < query_stage_rows / 16; ++ks) {
            const int row = ks * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
              std::uint32_t b[4];
              ldmatrix_x4_trans(b, do_tile + row * pitch + dp * 16 + (lane / 16) * 8);
              Mma::run(acc_v[2 * dp], p_frag[ks], b[0], b[1]);
              Mma::run(acc_v[2 * dp + 1], p_frag[ks], b[2], b[3]);
              ldmatrix_x4_trans(b, q_tile + row * pitch + dp * 16 + (lane / 16) * 8);
              Mma::run(acc_k[2 * dp], s_frag[ks], b[0], b[1]);
              Mma::run(acc_k[2 * dp + 1], s_frag[ks], b[2], b[3]);
            }
          }
          __syncthreads();  // every warp is done with this stage before it is refilled
          stage ^= 1;
        }
      }
    }
  }
  cp_async_wait<0>();  // a window no query reaches still waits for its own K/V copies

  // Epilogue: every key row of the window is written once (0 for keys no query attends).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + g + 8 * r;
    if (row >= window_count) continue;
    const int y = window_first + row * window_stride;
    T* const dk_row =
        row_at(static_cast<T*>(bp.d_k), bp.dk_batch, bp.dk_seq, bp.dk_head, batch, kv_head, y);
    T* const dv_row =
        row_at(static_cast<T*>(bp.d_v), bp.dv_batch, bp.dv_seq, bp.dv_head, batch, kv_head, y);
#pragma unroll
    for (int dn = 0; dn < dim_tiles; ++dn)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        dk_row[dn * 8 + 2 * t + c] = T(acc_k[dn][2 * r + c] * p.scale);
        dv_row[dn * 8 + 2 * t + c] = T(acc_v[dn][2 * r + c]);
      }
  }
}

}  // namespace dilated_attention::cuda::device
