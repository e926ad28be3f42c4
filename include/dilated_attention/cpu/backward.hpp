#pragma once
// The fast CPU backward (docs/semantics.md "The gradient"): exact gradients of the forward's definition,
// straight from the caller's memory, bitwise identical for any thread count.
//
// Phase 1 (every storage type): row statistics, one unit per (batch, head, window of the
// forward's length). softmax: D(x) = dO(x)·O(x), with the forward's LSE read in place. mean, for
// a head whose rows only one branch selects (every head under partitioned, any head when G = 1):
// the same, since then O = O_i / G and LSE = LSE_i, so D_i = (dO/G)·O_i = dO·O. mean, for a head
// with rows in several branches: each branch's LSE_i(x) and D_i(x) = (dO(x)/G)·O_i(x),
// recomputed by cpu::attend_statistics over the forward's blocks (one extra forward's worth of
// that head's work; O_i itself is never formed).
//
// Then, for float and double storage (gradients accumulate in place, in the output's type):
//   2. branch by branch, one unit per (batch, kv head, block): every query head of the GQA group
//      that uses the block adds its whole gradient -- dQ, dK, dV, five products per pair -- to
//      the outputs (zeroed in phase 1). A gradient row belongs to one block per branch, so the
//      units of a branch never share a row, and the branches follow each other in a fixed order.
// For bfloat16 and half storage (a gradient must be summed in float and rounded once):
//   2. dK, dV: a unit owns (batch, kv head, key window) in a float accumulator; for every query
//      head of the group, branch and segment, the block's keys in the window meet all of the
//      block's queries (causal: those at or after the first key).
//   3. dQ: a unit owns (batch, head, query window); P and dS are recomputed (two more products
//      per pair: seven in all instead of five).
// Either way every gradient element is summed by one thread in one fixed order: results are
// bitwise identical for any thread count. Extra memory: the row statistics (B·H·N values; 2G
// times that for mean when some head's are recomputed) and per thread the primitive's tiles
// (plus, for narrow storage, a window's float accumulators); never N x w or N x N. docs/design.md ("Backward") has the
// measurements behind these choices. All index math comes from pattern.hpp; the block math
// lives in cpu::attend_backward.

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "../arguments.hpp"
#include "../config.hpp"
#include "../pattern.hpp"
#include "attend_backward.hpp"
#include "backward_units.hpp"
#include "forward.hpp"
#include "threads.hpp"

namespace dilated_attention {

// Fast CPU backward (docs/semantics.md "The gradient"). `forward_outputs` are what forward
// returned (out and its lse, not null) for the same inputs and config; gradients.d_q, .d_k, .d_v
// are overwritten (with GQA, d_k and d_v sum over the query heads of each group). T as for
// forward; options as for forward. Synchronous. Raises std::invalid_argument before touching any
// output on bad input. Results are bitwise identical from run to run and for any thread count.
template <class T>
void backward(const Config& config, const Shape& shape, const Inputs<detail::identity_t<T>>& inputs,
              const Outputs<const detail::identity_t<T>>& forward_outputs,
              View<const detail::identity_t<T>> d_out, const Gradients<T>& gradients,
              const CpuOptions& options = {}) {
  static_assert(
      std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, Eigen::bfloat16> ||
          std::is_same_v<T, Eigen::half>,
      "dilated_attention::backward (CPU): T is float, double, Eigen::bfloat16 or Eigen::half");
  static_assert(std::is_same_v<lse_type_t<T>, cpu::accumulator_t<T>>,
                "the LSE is stored in the accumulator type");
  using Acc = cpu::accumulator_t<T>;
  const View<const T> q = inputs.q, k = inputs.k, v = inputs.v, out = forward_outputs.out;
  const lse_type_t<T>* const lse = forward_outputs.lse;
  const View<T> d_q = gradients.d_q, d_k = gradients.d_k, d_v = gradients.d_v;
  validate_backward(config, shape, q, k, v, out, lse, d_out, d_q, d_k, d_v);
  const CpuIsa isa = cpu::resolve_isa(options.isa);  // once, before any thread starts
  const int num_threads = cpu::resolve_num_threads(options);
  const Pattern pattern(config, shape);
  const std::int64_t window = cpu::detail::window_length(pattern);
  const std::int64_t windows = (shape.seq_len + window - 1) / window;
  const std::int64_t dim = shape.head_dim;
  const std::int64_t rows = shape.batch * shape.num_heads * shape.seq_len;

  // mean: a head whose rows only one branch selects has the forward's statistics (its sole
  // branch's); only heads with rows in several branches need each branch's recomputed.
  const bool recompute = config.mixing == Mixing::mean && pattern.mean_recomputes_statistics();
  std::vector<std::int64_t> direct(static_cast<std::size_t>(shape.num_heads), 0);
  if (recompute)
    for (std::int64_t h = 0; h < shape.num_heads; ++h)
      direct[static_cast<std::size_t>(h)] = pattern.mean_statistics_branch(h);
  const std::int64_t sets = recompute ? pattern.num_branches() : 1;
  cpu::detail::RowStatistics<Acc> stats{
      lse, lse, {}, {}, sets, shape.batch, shape.num_heads, shape.seq_len, std::move(direct)};
  stats.delta.assign(static_cast<std::size_t>(sets * rows), Acc(0));
  if (recompute) {
    stats.own_lse.assign(static_cast<std::size_t>(sets * rows), negative_infinity<Acc>());
    stats.lse = stats.own_lse.data();
  }

  // Storage in the accumulator type (float, double) takes the fused path: gradients accumulate
  // in place, one branch after another. Narrow storage (bfloat16, half) accumulates each row in
  // a float window and rounds it once (phases 2 and 3 below).
  constexpr bool fused = std::is_same_v<T, Acc>;
  // Per thread, one workspace for the whole call (window accumulators for narrow storage only).
  cpu::detail::WorkspacePool<Acc> pool(num_threads, fused ? 0 : window, dim, isa);

  // Phase 1: row statistics, per (batch, head, window); the fused path also zeroes the
  // gradients here (each unit its own rows: d_q of its head, d_k and d_v of kv head h < Hkv).
  cpu::run_units(shape.batch * shape.num_heads * windows, num_threads, [&](const auto& next) {
    cpu::AttendBackwardWorkspace<Acc>& workspace = pool.claim().grad;
    for (std::int64_t unit = next(); unit >= 0; unit = next()) {
      const std::int64_t w = unit % windows, bh = unit / windows;
      const std::int64_t b = bh / shape.num_heads, h = bh % shape.num_heads;
      const std::int64_t x0 = w * window, x1 = std::min(shape.seq_len, x0 + window);
      cpu::detail::statistics_window<T>(pattern, b, h, x0, x1, q, k, v, out, d_out, stats,
                                        workspace);
      if constexpr (fused) {
        cpu::detail::zero_rows(d_q, b, h, x0, x1, dim);
        if (h < shape.num_kv_heads) {
          cpu::detail::zero_rows(d_k, b, h, x0, x1, dim);
          cpu::detail::zero_rows(d_v, b, h, x0, x1, dim);
        }
      }
    }
  });
  pool.reset();

  if constexpr (fused) {
    // Phase 2 (fused): branch by branch, one unit per (batch, kv head, block).
    const std::vector<Block> blocks = pattern.blocks();
    for (std::int64_t i = 0; i < pattern.num_branches(); ++i) {
      std::vector<const Block*> branch;
      for (const Block& block : blocks)
        if (block.branch == i) branch.push_back(&block);
      const auto count = static_cast<std::int64_t>(branch.size());
      cpu::run_units(shape.batch * shape.num_kv_heads * count, num_threads, [&](const auto& next) {
        cpu::AttendBackwardWorkspace<Acc>& workspace = pool.claim().grad;
        for (std::int64_t unit = next(); unit >= 0; unit = next()) {
          const std::int64_t bg = unit / count;
          cpu::detail::block_unit<T>(pattern, *branch[static_cast<std::size_t>(unit % count)],
                                     bg / shape.num_kv_heads, bg % shape.num_kv_heads, q, k, v,
                                     d_out, stats, d_q, d_k, d_v, workspace);
        }
      });
      pool.reset();
    }
    return;
  }

  // Phase 2: dK and dV, per (batch, kv head, key window).
  cpu::run_units(shape.batch * shape.num_kv_heads * windows, num_threads, [&](const auto& next) {
    cpu::detail::BackwardWorkspace<Acc>& workspace = pool.claim();
    for (std::int64_t unit = next(); unit >= 0; unit = next()) {
      const std::int64_t w = unit % windows, bh = unit / windows;
      const std::int64_t y0 = w * window, y1 = std::min(shape.seq_len, y0 + window);
      cpu::detail::key_window<T>(pattern, bh / shape.num_kv_heads, bh % shape.num_kv_heads, y0, y1,
                                 q, k, v, d_out, stats, d_k, d_v, workspace);
    }
  });
  pool.reset();

  // Phase 3: dQ, per (batch, head, query window).
  cpu::run_units(shape.batch * shape.num_heads * windows, num_threads, [&](const auto& next) {
    cpu::detail::BackwardWorkspace<Acc>& workspace = pool.claim();
    for (std::int64_t unit = next(); unit >= 0; unit = next()) {
      const std::int64_t w = unit % windows, bh = unit / windows;
      const std::int64_t x0 = w * window, x1 = std::min(shape.seq_len, x0 + window);
      cpu::detail::query_window<T>(pattern, bh / shape.num_heads, bh % shape.num_heads, x0, x1, q,
                                   k, v, d_out, stats, d_q, workspace);
    }
  });
}

// Deprecated in 0.1.0, removed in 0.2.0: the positional spellings, forwarding to the call above.
template <class T>
[[deprecated(
    "use backward<T>(config, shape, {q, k, v}, {out, lse}, d_out, {d_q, d_k, d_v}, "
    "options); removed in 0.2.0")]] void
backward(const Config& config, const Shape& shape, View<const detail::identity_t<T>> q,
         View<const detail::identity_t<T>> k, View<const detail::identity_t<T>> v,
         View<const detail::identity_t<T>> out, const lse_type_t<detail::identity_t<T>>* lse,
         View<const detail::identity_t<T>> d_out, View<T> d_q, View<T> d_k, View<T> d_v,
         const CpuOptions& options) {
  backward<T>(config, shape, Inputs<T>{q, k, v}, Outputs<const T>{out, lse}, d_out,
              Gradients<T>{d_q, d_k, d_v}, options);
}

template <class T>
[[deprecated(
    "use backward<T>(config, shape, {q, k, v}, {out, lse}, d_out, {d_q, d_k, d_v}); "
    "removed in 0.2.0")]] void
backward(const Config& config, const Shape& shape, View<const detail::identity_t<T>> q,
         View<const detail::identity_t<T>> k, View<const detail::identity_t<T>> v,
         View<const detail::identity_t<T>> out, const lse_type_t<detail::identity_t<T>>* lse,
         View<const detail::identity_t<T>> d_out, View<T> d_q, View<T> d_k, View<T> d_v) {
  backward<T>(config, shape, Inputs<T>{q, k, v}, Outputs<const T>{out, lse}, d_out,
              Gradients<T>{d_q, d_k, d_v}, CpuOptions{});
}

}  // namespace dilated_attention
