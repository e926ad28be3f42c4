#pragma once
// The fast CPU forward (docs/semantics.md "Entry points"): dilated attention straight from the caller's memory.
//
// Work unit: one (batch, head, window of consecutive positions). Inside a window, for each
// branch and each segment overlapping it, the window's rows that the head selects form a
// strided query tile; cpu::attend computes its partial against that segment's strided keys
// (the causal prefix only), and the partial is merged into the window's running (o, lse)
// (merge.hpp). Branches and segments are visited in a fixed order, so every output row is
// finished by one thread, once, identically whatever the thread count. All index math comes
// from pattern.hpp.
//
// A window spans window_rows * max(r) positions (max(r) capped at 8), so that even the most
// dilated branch gives cpu::attend window_rows queries per call (each call packs its keys and
// values once per query chunk, so taller calls amortise the packing), while the window's
// scratch stays independent of N and w.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "../arguments.hpp"
#include "../config.hpp"
#include "../merge.hpp"
#include "../pattern.hpp"
#include "attend.hpp"
#include "threads.hpp"

namespace dilated_attention {

namespace cpu::detail {

template <class Acc>
using RowMajorMatrix = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Rows of the most dilated branch in one work unit.
inline constexpr std::int64_t window_rows = 512;

// Positions per work unit: window_rows rows of the most dilated branch.
inline std::int64_t window_length(const Pattern& pattern) {
  std::int64_t max_rate = 1;
  for (std::int64_t i = 0; i < pattern.num_branches(); ++i)
    max_rate = std::max(max_rate, pattern.branch(i).r);
  return window_rows * std::min<std::int64_t>(max_rate, 8);
}

// The most keys one attend() call of the forward sees: the longest block (w / r rows, rounded
// up). Scratch is sized by min(this, key_chunk).
inline std::int64_t longest_block(const Pattern& pattern) {
  std::int64_t longest = 1;
  for (std::int64_t i = 0; i < pattern.num_branches(); ++i) {
    const BranchGeometry branch = pattern.branch(i);
    longest = std::max(longest, (std::min(branch.w, branch.n) + branch.r - 1) / branch.r);
  }
  return longest;
}

// One thread's scratch, allocated once per call: the block primitive's packed operands plus the
// window's running result and the partial of the current block. Sized by the window, head_dim
// and the chunk limits only.
template <class Acc>
struct ForwardWorkspace {
  ForwardWorkspace(std::int64_t window, std::int64_t head_dim, CpuIsa isa, std::int64_t max_keys)
      : attend(head_dim, isa, window, max_keys),
        window_o(window, head_dim),
        partial_o(window, head_dim),
        window_lse(static_cast<std::size_t>(window)),
        partial_lse(static_cast<std::size_t>(window)) {}

  AttendWorkspace<Acc> attend;
  RowMajorMatrix<Acc> window_o, partial_o;
  std::vector<Acc> window_lse, partial_lse;
};

template <class T>
StridedRows<T> strided_rows(const T* head_base, std::int64_t seq_stride, const Progression& rows) {
  return {head_base + rows.first * seq_stride, rows.stride * seq_stride, rows};
}

// Where one (sequence, head)'s query rows live: position x's query row is at
// q + (x - origin) * q_stride, its output row at out + (x - origin) * out_stride, its LSE at
// lse[x - origin] (lse may be null). The ordinary forward has origin 0; the inference forms
// (inference.hpp) point these at a packed or offset batch, so no row is ever gathered.
template <class T>
struct HeadRows {
  const T* q;
  std::int64_t q_stride;
  T* out;
  std::int64_t out_stride;
  lse_type_t<T>* lse;
  std::int64_t origin;
};

// Merges one partial (part_o, part_lse) into a row's running result, as the forward does for
// every block: softmax mixing by LSE weights, mean mixing by the branch weight (the LSE then
// only says whether the row attended anything). Explicit fma, so that the rounding is the same
// wherever this is inlined and however the loop is vectorised: every path that merges the same
// partials in the same order gets the same bits (decode, chunked prefill, varlen, padded).
template <class Acc>
inline void merge_partial_row(Acc* row_o, Acc& row_lse, const Acc* part_o, Acc part_lse,
                              std::int64_t dim, Mixing mixing, Acc branch_weight) {
  if (mixing == Mixing::softmax) {
    const MergeWeights<Acc> weights = merge_weights(row_lse, part_lse);
    for (std::int64_t d = 0; d < dim; ++d)
      row_o[d] = std::fma(weights.a, row_o[d], weights.b * part_o[d]);
    row_lse = weights.lse;
  } else {
    for (std::int64_t d = 0; d < dim; ++d) row_o[d] = std::fma(branch_weight, part_o[d], row_o[d]);
    row_lse = log_add_exp(row_lse, part_lse);
  }
}

// Rows [x0, x1) of one head: every block of the rows (pattern.for_each_block_in) attends its
// keys -- key_source(keys) gives the K and V rows of a progression of key positions -- and the
// partials merge into the rows in branch and segment order.
template <class T, class KeySource>
void forward_rows(const Pattern& pattern, std::int64_t head, std::int64_t x0, std::int64_t x1,
                  const HeadRows<T>& rows, const KeySource& key_source,
                  ForwardWorkspace<accumulator_t<T>>& workspace) {
  using Acc = accumulator_t<T>;
  const Config& config = pattern.config();
  const Shape& shape = pattern.shape();
  const std::int64_t dim = shape.head_dim, length = x1 - x0;
  const Acc scale = static_cast<Acc>(resolved_scale(config, shape));
  const Acc branch_weight = Acc(1) / static_cast<Acc>(pattern.num_branches());  // mean mixing

  auto window_o = workspace.window_o.topRows(length);
  window_o.setZero();
  std::fill_n(workspace.window_lse.begin(), length, negative_infinity<Acc>());

  pattern.for_each_block_in(head, x0, x1, [&](std::int64_t, const Progression& block,
                                               const Progression& queries) {
    // A causal query sees the block up to itself; the last query of the tile bounds them all.
    const Progression keys = config.causal ? block.prefix(block.index_of(queries.last()) + 1) : block;
    const StridedRows<T> q_rows{rows.q + (queries.first - rows.origin) * rows.q_stride,
                                queries.stride * rows.q_stride, queries};
    const auto kv = key_source(keys);
    attend(workspace.attend, q_rows, kv.first, kv.second, dim, scale, config.causal,
           workspace.partial_o.data(), workspace.partial_lse.data());
    for (std::int64_t j = 0; j < queries.count; ++j) {
      const std::int64_t row = queries.at(j) - x0;
      merge_partial_row(
          window_o.row(row).data(), workspace.window_lse[static_cast<std::size_t>(row)],
          workspace.partial_o.row(j).data(), workspace.partial_lse[static_cast<std::size_t>(j)],
          dim, config.mixing, branch_weight);
    }
  });

  for (std::int64_t x = x0; x < x1; ++x) {
    T* destination = rows.out + (x - rows.origin) * rows.out_stride;
    const Acc* source = window_o.row(x - x0).data();
    for (std::int64_t d = 0; d < dim; ++d) destination[d] = static_cast<T>(source[d]);
  }
  if (rows.lse != nullptr)
    for (std::int64_t x = x0; x < x1; ++x)
      rows.lse[x - rows.origin] =
          static_cast<lse_type_t<T>>(workspace.window_lse[static_cast<std::size_t>(x - x0)]);
}

template <class T>
void forward_window(const Pattern& pattern, std::int64_t batch, std::int64_t head, std::int64_t x0,
                    std::int64_t x1, View<const T> q, View<const T> k, View<const T> v, View<T> out,
                    lse_type_t<T>* lse, ForwardWorkspace<accumulator_t<T>>& workspace) {
  const Shape& shape = pattern.shape();
  const std::int64_t kv_head = pattern.kv_head(head);
  const T* k_head = k.data + batch * k.batch_stride + kv_head * k.head_stride;
  const T* v_head = v.data + batch * v.batch_stride + kv_head * v.head_stride;
  const HeadRows<T> rows{
      q.data + batch * q.batch_stride + head * q.head_stride,
      q.seq_stride,
      out.data + batch * out.batch_stride + head * out.head_stride,
      out.seq_stride,
      lse != nullptr ? lse + (batch * shape.num_heads + head) * shape.seq_len : nullptr,
      0};
  forward_rows<T>(
      pattern, head, x0, x1, rows,
      [&](const Progression& keys) {
        return std::make_pair(strided_rows(k_head, k.seq_stride, keys),
                              strided_rows(v_head, v.seq_stride, keys));
      },
      workspace);
}

}  // namespace cpu::detail

// Fast CPU kernel (docs/semantics.md "Entry points"). T is float, double, or Eigen::bfloat16 /
// Eigen::half (stored narrow, accumulated in float). Reads inputs.q, .k, .v; writes outputs.out
// and, when outputs.lse is not null, the LSE ([batch, num_heads, seq_len], contiguous, of
// lse_type_t<T>). Uses options.num_threads threads (0: the DILATED_ATTENTION_NUM_THREADS
// environment variable, else the CPUs this process may use; negative: rejected) and the inner
// kernels of options.isa (automatic: DILATED_ATTENTION_CPU_ISA, else the best this CPU runs).
// Synchronous. Raises std::invalid_argument before touching the output on bad input. Results are
// bitwise identical from run to run and for any thread count (for one CpuIsa; paths differ by
// rounding).
template <class T>
void forward(const Config& config, const Shape& shape, const Inputs<detail::identity_t<T>>& inputs,
             const Outputs<T>& outputs, const CpuOptions& options = {}) {
  static_assert(
      std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, Eigen::bfloat16> ||
          std::is_same_v<T, Eigen::half>,
      "dilated_attention::forward (CPU): T is float, double, Eigen::bfloat16 or Eigen::half");
  static_assert(std::is_same_v<lse_type_t<T>, cpu::accumulator_t<T>>,
                "the LSE is stored in the accumulator type");
  const View<const T> q = inputs.q, k = inputs.k, v = inputs.v;
  const View<T> out = outputs.out;
  lse_type_t<T>* const lse = outputs.lse;
  validate(config, shape, q, k, v, out, lse);
  const int num_threads = cpu::resolve_num_threads(options);
  const CpuIsa isa = cpu::resolve_isa(options.isa);  // throws before any output is written
  const Pattern pattern(config, shape);
  const std::int64_t window = std::min(cpu::detail::window_length(pattern), shape.seq_len);
  const std::int64_t max_keys = cpu::detail::longest_block(pattern);
  const std::int64_t windows = (shape.seq_len + window - 1) / window;
  const std::int64_t units = shape.batch * shape.num_heads * windows;

  // Consecutive units are consecutive windows of one head, so threads working side by side
  // share the same key/value segments in cache.
  cpu::run_units(units, num_threads, [&](const auto& next) {
    cpu::detail::ForwardWorkspace<cpu::accumulator_t<T>> workspace(window, shape.head_dim, isa,
                                                                   max_keys);
    for (std::int64_t unit = next(); unit >= 0; unit = next()) {
      const std::int64_t w = unit % windows, bh = unit / windows;
      const std::int64_t x0 = w * window, x1 = std::min(shape.seq_len, x0 + window);
      cpu::detail::forward_window<T>(pattern, bh / shape.num_heads, bh % shape.num_heads, x0, x1, q,
                                     k, v, out, lse, workspace);
    }
  });
}

// Deprecated in 0.1.0, removed in 0.2.0: the positional spellings, forwarding to the call above.
template <class T>
[[deprecated(
    "use forward<T>(config, shape, {q, k, v}, {out, lse}, options); removed in 0.2.0")]] void
forward(const Config& config, const Shape& shape, View<const detail::identity_t<T>> q,
        View<const detail::identity_t<T>> k, View<const detail::identity_t<T>> v, View<T> out,
        lse_type_t<T>* lse, const CpuOptions& options) {
  forward<T>(config, shape, Inputs<T>{q, k, v}, Outputs<T>{out, lse}, options);
}

template <class T>
[[deprecated("use forward<T>(config, shape, {q, k, v}, {out, lse}); removed in 0.2.0")]] void
forward(const Config& config, const Shape& shape, View<const detail::identity_t<T>> q,
        View<const detail::identity_t<T>> k, View<const detail::identity_t<T>> v, View<T> out,
        lse_type_t<T>* lse = nullptr) {
  forward<T>(config, shape, Inputs<T>{q, k, v}, Outputs<T>{out, lse}, CpuOptions{});
}

}  // namespace dilated_attention
