#pragma once
// The work decomposition of the 16-bit forward kernel (host+device, tested on the host): query
// windows, and for each (window, branch, segment) the window's rows that are queries there,
// packed into 16-row slices (one warp's mma tile each).
//
// A query window is up to 64 positions base + R*j + k, j < 64/K, k < K, with R the row stride of
// launch_plan.hpp (the lcm of the rates when a window fits the shortest segment, else 1) and K
// (1, 2 or 4) consecutive residues mod R. With R = lcm every rate divides R, so a branch of rate
// r selects, inside one segment, whole residue classes of the window: K/r of them when r <= K,
// one or none when r >= K, i.e. always whole multiples of 64/K >= 16 rows. The kernel packs the
// selected rows of each (branch, segment) in position order into slices of 16 and skips the
// slices that are empty, so no branch multiplies rows it does not select. Because the rows of a
// slice are consecutive selected positions (for r <= K, keys r apart in the block's compressed
// order), the causal staircase inside a slice stays narrow, and each warp stops at its own
// slice's key limit (16-key steps) instead of the window's.
//
// The packing differs between branches, so a row's online-softmax state moves with it: the
// kernel keeps one record per window row in shared memory between works (tensor_core_kernel.cuh).

#include <cstdint>

#include "../host_device.hpp"
#include "../pattern.hpp"
#include "launch_plan.hpp"

namespace dilated_attention::cuda {

inline constexpr int slice_rows = 16;  // rows of one warp's m16 tile
inline constexpr int key_step = 16;    // keys per skippable step (ldmatrix.x4 of K, k of P.V)

// Residues per query window: the largest of 4, 2, 1 that divides R.
DILATED_ATTENTION_HOST_DEVICE int window_residues(std::int64_t row_stride) {
  return row_stride % 4 == 0 ? 4 : (row_stride % 2 == 0 ? 2 : 1);
}

// Query windows per (batch, head). Never more than ForwardParams::windows (the grid the backward
// kernels share), so the forward launches that grid and its extra blocks return at once:
// (R/K) ceil(N K / 64R) <= R ceil(N / 64R) <= R ceil(ceil(N/R) / 64).
DILATED_ATTENTION_HOST_DEVICE std::int64_t query_window_count(std::int64_t seq_len,
                                                              std::int64_t row_stride) {
  const std::int64_t residues = window_residues(row_stride);
  const std::int64_t span = row_stride * (block_window_rows / residues);  // positions per chunk
  return (row_stride / residues) * ((seq_len + span - 1) / span);
}

// Window rows rho = j*K + k, in increasing position order; rows past seq_len are cut off the end.
struct QueryWindow {
  std::int64_t base = 0, stride = 1;
  int residues = 1, count = 0;
  DILATED_ATTENTION_HOST_DEVICE std::int64_t position(int row) const {
    return base + stride * (row / residues) + row % residues;
  }
  DILATED_ATTENTION_HOST_DEVICE bool empty() const { return count <= 0; }
};

// Window `index` of a (batch, head): residue groups vary fastest, so neighbouring blocks cover
// neighbouring positions and share keys and values in L2. Empty past query_window_count.
DILATED_ATTENTION_HOST_DEVICE QueryWindow query_window(const ForwardParams& p,
                                                       std::int64_t index) {
  QueryWindow window;
  window.stride = p.row_stride;
  window.residues = window_residues(p.row_stride);
  const auto groups = static_cast<std::uint32_t>(p.row_stride / window.residues);
  const auto at = static_cast<std::uint32_t>(index);  // below the grid's 2^31
  const std::int64_t rows_per_residue = block_window_rows / window.residues;
  window.base = static_cast<std::int64_t>(at / groups) * p.row_stride * rows_per_residue +
                static_cast<std::int64_t>(at % groups) * window.residues;
  if (window.base >= p.seq_len) return window;
  // Whole steps j (all K residues below seq_len), then the residues of the last partial step.
  const std::int64_t rest = p.seq_len - window.base;
  const std::int64_t steps = rest / p.row_stride, tail = rest % p.row_stride;
  const std::int64_t rows =
      steps * window.residues + (tail < window.residues ? tail : window.residues);
  window.count = static_cast<int>(rows < block_window_rows ? rows : block_window_rows);
  return window;
}

// Segments of a branch that hold rows of the (non-empty) window.
DILATED_ATTENTION_HOST_DEVICE SegmentRange segments_overlapping(const BranchGeometry& g,
                                                                const QueryWindow& window) {
  return {g.segment_of(window.position(0)), g.segment_of(window.position(window.count - 1))};
}

// A block's stride for 32-bit arithmetic: positions lie below 2^31 (check_backend_limits), so a
// stride of 2^31 or more (r may be as large as w) leaves only the block's first row in range,
// which 2^31 keeps: every other distance is neither a multiple of it nor past its first quotient.
DILATED_ATTENTION_HOST_DEVICE std::uint32_t stride32(const Progression& keys) {
  return keys.stride < (std::int64_t{1} << 31) ? static_cast<std::uint32_t>(keys.stride)
                                               : std::uint32_t{1} << 31;
}

// Whether window row `row` is a query of the block `keys` (one segment's rows for one offset):
// Progression::contains in 32 bits, which keeps the kernel's per-work ballots off 64-bit division.
DILATED_ATTENTION_HOST_DEVICE bool selects(const Progression& keys, const QueryWindow& window,
                                           int row) {
  if (row >= window.count || keys.count <= 0) return false;
  const std::int64_t from_first = window.position(row) - keys.first;
  if (from_first < 0) return false;
  const auto distance = static_cast<std::uint32_t>(from_first);
  const std::uint32_t stride = stride32(keys);
  return distance % stride == 0 && distance / stride < static_cast<std::uint32_t>(keys.count);
}

// key_limit (launch_plan.hpp) of a position x that `keys` contains, in 32 bits as above.
DILATED_ATTENTION_HOST_DEVICE int selected_key_limit(const Progression& keys, std::int64_t x,
                                                     bool causal) {
  const auto distance = static_cast<std::uint32_t>(x - keys.first);
  return causal ? static_cast<int>(distance / stride32(keys)) + 1 : static_cast<int>(keys.count);
}

DILATED_ATTENTION_HOST_DEVICE int popcount64(std::uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __popcll(x);
#else
  int n = 0;
  for (; x != 0; x &= x - 1) ++n;
  return n;
#endif
}

// The index of the n-th (from 0) set bit of a mask with more than n bits set.
DILATED_ATTENTION_HOST_DEVICE int nth_set_bit(std::uint64_t mask, int n) {
  int at = 0;
  for (int width = 32; width > 0; width /= 2) {
    const std::uint64_t low = mask & ((std::uint64_t{1} << width) - 1);
    const int below = popcount64(low);
    if (n >= below) {
      n -= below;
      mask >>= width;
      at += width;
    } else {
      mask = low;
    }
  }
  return at;
}

// The work of one (window, branch, segment): the block's keys, the window rows that are its
// queries (bit rho of `rows`), packed in position order: query n is row nth_set_bit(rows, n) and
// lies in slice n / 16.
struct QueryWork {
  Progression keys;
  std::uint64_t rows = 0;
  int queries = 0;    // set bits of rows
  int key_count = 0;  // keys streamed: all, or when causal those up to the last query
  DILATED_ATTENTION_HOST_DEVICE bool empty() const { return queries == 0; }
  DILATED_ATTENTION_HOST_DEVICE int tiles() const {
    return (key_count + key_stage_rows - 1) / key_stage_rows;
  }
  DILATED_ATTENTION_HOST_DEVICE int slices() const {
    return (queries + slice_rows - 1) / slice_rows;
  }
};

// The window rows that `keys` selects, as a mask. The kernel computes the same mask with two warp
// ballots of selects(); this loop is the host's.
inline std::uint64_t selected_rows(const Progression& keys, const QueryWindow& window) {
  std::uint64_t rows = 0;
  for (int row = 0; row < window.count; ++row)
    if (selects(keys, window, row)) rows |= std::uint64_t{1} << row;
  return rows;
}

// The work from the block and the mask of its queries in the window.
DILATED_ATTENTION_HOST_DEVICE QueryWork query_work(const Progression& keys, std::uint64_t rows,
                                                  const QueryWindow& window, bool causal) {
  QueryWork work;
  work.keys = keys;
  work.rows = rows;
  work.queries = popcount64(rows);
  if (work.queries == 0) return work;
  // Positions increase with the row index, so the last query has the largest key set.
  const std::int64_t last = window.position(nth_set_bit(rows, work.queries - 1));
  work.key_count = selected_key_limit(keys, last, causal);
  return work;
}

// Keys attended by any query of slice `slice` (0 for a slice without queries): the limit of its
// last query, since limits grow with the position. A warp streams no further than this.
DILATED_ATTENTION_HOST_DEVICE int slice_key_limit(const QueryWork& work,
                                                  const QueryWindow& window, int slice,
                                                  bool causal) {
  if (slice * slice_rows >= work.queries) return 0;
  const int last = slice * slice_rows + slice_rows - 1 < work.queries - 1
                       ? slice * slice_rows + slice_rows - 1
                       : work.queries - 1;
  return selected_key_limit(work.keys, window.position(nth_set_bit(work.rows, last)), causal);
}

// Keys a slice multiplies in key tile `tile`: its limit inside the tile rounded up to the 16-key
// step (0: the warp skips the tile).
DILATED_ATTENTION_HOST_DEVICE int slice_tile_keys(int slice_limit, int tile) {
  const int rest = slice_limit - tile * key_stage_rows;
  if (rest <= 0) return 0;
  return rest >= key_stage_rows ? key_stage_rows : (rest + key_step - 1) / key_step * key_step;
}

}  // namespace dilated_attention::cuda
