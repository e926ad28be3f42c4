#pragma once
// The backward of a range of query rows of one sequence (docs/semantics.md "Inference forms",
// "The gradient"): the gradient of rows [begin, begin + count) of a sequence of kv_len positions
// -- d_q of those rows, d_k and d_v of every position -- at the cost of those rows' pairs, not of
// the whole prefix's. The backward of a chunked-prefill chunk, a decode row, or a sequence of a
// varlen batch whose query rows are not all of its rows (cpu/inference.hpp).
//
// It is the ordinary backward (cpu/backward.hpp) over the sequence's first n positions (n =
// begin + count when causal, whose later positions no query of the range sees, else kv_len) with
// every other row's q, O and dO taken as zero -- whose gradient terms are exact zeros -- and those
// rows' work left out:
//   phase 1    row statistics of the range's rows only (softmax: D = dO·O; mean with several
//              branches per head: each branch's LSE and D recomputed over the forward's blocks);
//   fused      (float, double) per branch, one unit per (kv head, block) for the blocks whose
//              rows meet the range, each attending only the range's rows of the block;
//   narrow     (bfloat16, half) dK, dV per (kv head, key window) over the same key windows as
//              the ordinary backward, from the range's rows of each block; dQ per (head, window
//              of the range).
// The range's q, O, dO, LSE and d_q are read and written in place in the caller's memory: query
// position x is row x - begin there. Positions handed to the block primitives are shifted by
// -begin (keys and queries alike, which leaves every causal comparison unchanged), so the row
// statistics are arrays of the range's rows and no pointer before an array's start is formed.
//
// Rounding: the block primitive lays the query tiles of each block on the grid of the whole
// block's rows (attend_backward's query_skip), and every other summation (key chunks and tiles,
// the key windows, the order of branches, blocks and heads) is the ordinary backward's. Rows
// outside the range would add exact zeros there, so every gradient element equals the
// ordinary backward's over n positions fed the zero rows (the composition this replaced); only
// the sign of an exactly zero element may differ. Bitwise identical for any thread count: every
// gradient element is summed by one unit in a fixed order.

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../arguments.hpp"
#include "../config.hpp"
#include "../pattern.hpp"
#include "../sequences.hpp"
#include "attend_backward.hpp"
#include "attend_statistics.hpp"
#include "backward_units.hpp"
#include "forward.hpp"
#include "threads.hpp"

namespace dilated_attention::cpu::detail {

// Row statistics of the range's rows (index x - begin), one set, or one per branch when mean
// mixing recomputes some head's (the RowStatistics of cpu/backward_units.hpp, by range row).
template <class Acc>
struct RangeStatistics {
  const Acc* forward_lse;  // the caller's: row j of head h at forward_lse[h * forward_head + j]
  std::int64_t forward_head;
  std::int64_t sets, heads, count;
  std::vector<Acc> own_lse, delta;   // [sets, heads, count]
  std::vector<std::int64_t> direct;  // per head, as RowStatistics::direct

  std::int64_t offset(std::int64_t branch, std::int64_t h) const {
    return ((sets == 1 ? 0 : branch) * heads + h) * count;
  }
  const Acc* lse(std::int64_t branch, std::int64_t h) const {
    return sets == 1 ? forward_lse + h * forward_head : own_lse.data() + offset(branch, h);
  }
  Acc* delta_of(std::int64_t branch, std::int64_t h) { return delta.data() + offset(branch, h); }
  const Acc* delta_of(std::int64_t branch, std::int64_t h) const {
    return delta.data() + offset(branch, h);
  }
};

// Rows `rows` (positions in [begin, begin + count), not empty) of head h of a range view, whose
// row 0 is position begin; positions shifted by -begin.
template <class T>
StridedRows<T> range_rows(const View<const T>& view, std::int64_t h, const Progression& rows,
                          std::int64_t begin) {
  return {view.data + (rows.first - begin) * view.seq_stride + h * view.head_stride,
          rows.stride * view.seq_stride, Progression{rows.first - begin, rows.stride, rows.count}};
}

// Rows `rows` (positions of the sequence, not empty) of kv head g of a sequence view; positions
// shifted by -begin like the queries'.
template <class T>
StridedRows<T> key_rows(const View<const T>& view, std::int64_t g, const Progression& rows,
                        std::int64_t begin) {
  return {view.data + rows.first * view.seq_stride + g * view.head_stride,
          rows.stride * view.seq_stride, Progression{rows.first - begin, rows.stride, rows.count}};
}

template <class Acc, class T>
GradientRows<Acc> gradient_rows(const View<T>& view, std::int64_t h, std::int64_t row,
                                std::int64_t stride) {
  return {view.data + row * view.seq_stride + h * view.head_stride, stride * view.seq_stride};
}

// The backward of rows [begin, begin + count) (count >= 1) of one sequence of kv_len positions.
// q, out, d_out and d_q: the range's rows (row j is position begin + j); k, v, d_k and d_v: the
// sequence's; batch strides unused. lse[h * lse_head + j]: the forward's LSE of row j of head h.
// d_q gets the range's rows, d_k and d_v all kv_len rows (zero where no row of the range
// attends). Views are validated by the caller.
template <class T>
void backward_range_rows(const Config& config, const HeadShape& heads, std::int64_t kv_len,
                         std::int64_t begin, std::int64_t count, View<const T> q, View<const T> k,
                         View<const T> v, View<const T> out, const lse_type_t<T>* lse,
                         std::int64_t lse_head, View<const T> d_out, View<T> d_q, View<T> d_k,
                         View<T> d_v, const CpuOptions& options) {
  using Acc = accumulator_t<T>;
  static_assert(std::is_same_v<lse_type_t<T>, Acc>, "the LSE is stored in the accumulator type");
  const std::int64_t H = heads.num_heads, G = heads.num_kv_heads, dim = heads.head_dim;
  const std::int64_t group = H / G, end = begin + count;
  const std::int64_t n = config.causal ? end : kv_len;
  const Pattern pattern(config, Shape{1, n, H, G, dim});
  const CpuIsa isa = cpu::resolve_isa(options.isa);
  const int num_threads = cpu::resolve_num_threads(options);
  const std::int64_t window = window_length(pattern);
  const std::int64_t range_windows = (count + window - 1) / window;
  const Acc scale = static_cast<Acc>(resolved_scale(config, pattern.shape()));
  const bool mean = config.mixing == Mixing::mean;
  const Acc weight = mean ? Acc(1) / static_cast<Acc>(pattern.num_branches()) : Acc(1);

  // As cpu/backward.hpp: mean recomputes each branch's statistics only for heads with rows in
  // several branches.
  RangeStatistics<Acc> stats{
      lse,   lse_head, 1,  H,
      count, {},       {}, std::vector<std::int64_t>(static_cast<std::size_t>(H), 0)};
  const bool recompute = mean && pattern.mean_recomputes_statistics();
  if (recompute)
    for (std::int64_t h = 0; h < H; ++h)
      stats.direct[static_cast<std::size_t>(h)] = pattern.mean_statistics_branch(h);
  stats.sets = recompute ? pattern.num_branches() : 1;
  stats.delta.assign(static_cast<std::size_t>(stats.sets * H * count), Acc(0));
  if (recompute)
    stats.own_lse.assign(static_cast<std::size_t>(stats.sets * H * count),
                         negative_infinity<Acc>());

  constexpr bool fused = std::is_same_v<T, Acc>;
  WorkspacePool<Acc> pool(num_threads, fused ? 0 : window, dim, isa);

  // d_k and d_v rows nothing writes: all of them on the fused path (which adds into them), those
  // past n on the narrow path (whose key windows store every row below n). Per (kv head, rows).
  {
    const std::int64_t from = fused ? 0 : n, rows = 4096;
    const std::int64_t pieces = (kv_len - from + rows - 1) / rows;
    cpu::run_units(G * pieces, num_threads, [&](const auto& next) {
      for (std::int64_t unit = next(); unit >= 0; unit = next()) {
        const std::int64_t g = unit / pieces, y0 = from + unit % pieces * rows;
        const std::int64_t y1 = std::min(kv_len, y0 + rows);
        zero_rows(d_k, 0, g, y0, y1, dim);
        zero_rows(d_v, 0, g, y0, y1, dim);
      }
    });
  }

  // Phase 1: the range's row statistics, per (head, window of the range); the fused path also
  // zeroes the range's d_q rows here.
  cpu::run_units(H * range_windows, num_threads, [&](const auto& next) {
    AttendBackwardWorkspace<Acc>& workspace = pool.claim().grad;
    for (std::int64_t unit = next(); unit >= 0; unit = next()) {
      const std::int64_t h = unit / range_windows;
      const std::int64_t x0 = begin + unit % range_windows * window,
                         x1 = std::min(end, x0 + window);
      if constexpr (fused) zero_rows(d_q, 0, h, x0 - begin, x1 - begin, dim);
      const std::int64_t direct = stats.sets == 1 ? 0 : stats.direct[static_cast<std::size_t>(h)];
      if (direct >= 0) {  // the forward's own statistics (cpu/backward_units.hpp)
        Acc* delta = stats.delta_of(direct, h);
        for (std::int64_t j = x0 - begin; j < x1 - begin; ++j) {
          const T* o = out.data + j * out.seq_stride + h * out.head_stride;
          const T* g = d_out.data + j * d_out.seq_stride + h * d_out.head_stride;
          Acc sum = Acc(0);
          for (std::int64_t d = 0; d < dim; ++d)
            sum += static_cast<Acc>(g[d]) * static_cast<Acc>(o[d]);
          delta[j] = sum;
        }
        if (stats.sets > 1)
          std::copy(lse + h * lse_head + (x0 - begin), lse + h * lse_head + (x1 - begin),
                    stats.own_lse.data() + stats.offset(direct, h) + (x0 - begin));
        continue;
      }
      const std::int64_t g = pattern.kv_head(h);
      pattern.for_each_block_in(
          h, x0, x1, [&](std::int64_t i, const Progression& block, const Progression& queries) {
            const Progression keys =
                config.causal ? block.prefix(block.index_of(queries.last()) + 1) : block;
            attend_statistics(workspace, range_rows(q, h, queries, begin),
                              key_rows(k, g, keys, begin), key_rows(v, g, keys, begin),
                              range_rows(d_out, h, queries, begin), dim, scale, weight,
                              config.causal, stats.own_lse.data() + stats.offset(i, h),
                              stats.delta_of(i, h));
          });
    }
  });
  pool.reset();

  if constexpr (fused) {
    // Per branch, the blocks with rows in the range; one unit per (kv head, block). As in
    // cpu/backward.hpp, a branch's blocks share no gradient row, and branches follow each other.
    for (std::int64_t i = 0; i < pattern.num_branches(); ++i) {
      const BranchGeometry geometry = pattern.branch(i);
      std::vector<Block> blocks;
      for (std::int64_t s = geometry.segment_of(begin); s <= geometry.segment_of(end - 1); ++s)
        for (std::int64_t o = 0; o < geometry.r; ++o) {
          const Progression rows = geometry.rows(s, o), with = pattern.heads_with_offset(i, o);
          if (!rows.within(begin, end).empty() && !with.empty())
            blocks.push_back({i, s, o, rows, with});
        }
      const auto units = static_cast<std::int64_t>(blocks.size());
      cpu::run_units(G * units, num_threads, [&](const auto& next) {
        AttendBackwardWorkspace<Acc>& workspace = pool.claim().grad;
        for (std::int64_t unit = next(); unit >= 0; unit = next()) {
          const Block& block = blocks[static_cast<std::size_t>(unit % units)];
          const std::int64_t g = unit / units;
          const Progression& rows = block.rows;
          const Progression queries = rows.within(begin, end);
          const Progression group_heads = block.heads.within(g * group, (g + 1) * group);
          for (std::int64_t e = 0; e < group_heads.count; ++e) {
            const std::int64_t h = group_heads.at(e);
            attend_backward(
                workspace, range_rows(q, h, queries, begin), key_rows(k, g, rows, begin),
                key_rows(v, g, rows, begin), range_rows(d_out, h, queries, begin), stats.lse(i, h),
                stats.delta_of(i, h), dim, scale, weight, config.causal,
                gradient_rows<Acc>(d_q, h, queries.first - begin, rows.stride),
                gradient_rows<Acc>(d_k, g, rows.first, rows.stride),
                gradient_rows<Acc>(d_v, g, rows.first, rows.stride), rows.index_of(queries.first));
          }
        }
      });
      pool.reset();
    }
    return;
  }

  // Narrow phase 2: dK, dV per (kv head, key window), the ordinary backward's key windows over n
  // positions, each block meeting the range's rows among the queries the ordinary one takes.
  const std::int64_t key_windows = (n + window - 1) / window;
  cpu::run_units(G * key_windows, num_threads, [&](const auto& next) {
    BackwardWorkspace<Acc>& workspace = pool.claim();
    for (std::int64_t unit = next(); unit >= 0; unit = next()) {
      const std::int64_t g = unit / key_windows, y0 = unit % key_windows * window;
      const std::int64_t y1 = std::min(n, y0 + window);
      std::fill_n(workspace.first.begin(), (y1 - y0) * dim, Acc(0));
      std::fill_n(workspace.second.begin(), (y1 - y0) * dim, Acc(0));
      for (std::int64_t h = g * group; h < (g + 1) * group; ++h)
        pattern.for_each_block_in(
            h, y0, y1, [&](std::int64_t i, const Progression& block, const Progression& keys) {
              const Progression inside = block.within(begin, end);
              if (inside.empty()) return;
              // The ordinary backward's queries: from the window's first key on (causal).
              const std::int64_t from = config.causal ? block.index_of(keys.first) : 0;
              const std::int64_t first = std::max(from, block.index_of(inside.first));
              const Progression queries =
                  block.slice(first, block.index_of(inside.first) + inside.count);
              if (queries.empty()) return;
              const std::int64_t row = keys.first - y0, stride = keys.stride * dim;
              attend_backward(
                  workspace.grad, range_rows(q, h, queries, begin), key_rows(k, g, keys, begin),
                  key_rows(v, g, keys, begin), range_rows(d_out, h, queries, begin),
                  stats.lse(i, h), stats.delta_of(i, h), dim, scale, weight, config.causal,
                  GradientRows<Acc>{},
                  GradientRows<Acc>{workspace.first.data() + row * dim, stride},
                  GradientRows<Acc>{workspace.second.data() + row * dim, stride}, first - from);
            });
      store_rows<T>(workspace.first, d_k, 0, g, y0, y1, dim);
      store_rows<T>(workspace.second, d_v, 0, g, y0, y1, dim);
    }
  });
  pool.reset();

  // Narrow phase 3: dQ per (head, window of the range).
  cpu::run_units(H * range_windows, num_threads, [&](const auto& next) {
    BackwardWorkspace<Acc>& workspace = pool.claim();
    for (std::int64_t unit = next(); unit >= 0; unit = next()) {
      const std::int64_t h = unit / range_windows, g = pattern.kv_head(h);
      const std::int64_t x0 = begin + unit % range_windows * window,
                         x1 = std::min(end, x0 + window);
      std::fill_n(workspace.first.begin(), (x1 - x0) * dim, Acc(0));
      pattern.for_each_block_in(
          h, x0, x1, [&](std::int64_t i, const Progression& block, const Progression& queries) {
            const Progression keys =
                config.causal ? block.prefix(block.index_of(queries.last()) + 1) : block;
            attend_backward(workspace.grad, range_rows(q, h, queries, begin),
                            key_rows(k, g, keys, begin), key_rows(v, g, keys, begin),
                            range_rows(d_out, h, queries, begin), stats.lse(i, h),
                            stats.delta_of(i, h), dim, scale, weight, config.causal,
                            GradientRows<Acc>{workspace.first.data() + (queries.first - x0) * dim,
                                              queries.stride * dim},
                            GradientRows<Acc>{}, GradientRows<Acc>{});
          });
      store_rows<T>(workspace.first, d_q, 0, h, x0 - begin, x1 - begin, dim);
    }
  });
}

}  // namespace dilated_attention::cpu::detail
