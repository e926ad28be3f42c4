#pragma once
// The work units of the CPU backward (cpu/backward.hpp, docs/semantics.md §7): what one thread
// does for one (batch, head, window) of row statistics, one (batch, kv head, block) of the fused
// path, and one key or query window of the narrow-storage path. Each sums its gradient rows in a
// fixed order and shares none of them with another unit of the same phase.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "../config.hpp"
#include "../merge.hpp"
#include "../pattern.hpp"
#include "attend_grad.hpp"
#include "forward.hpp"

namespace dilated_attention {

namespace cpu::detail {

// Per (branch, batch, head) row statistics, indexed by position: the LSE the probabilities are
// normalised with and D = weight * dO·O. softmax keeps one set (the forward's LSE is read in
// place); mean keeps one per branch.
template <class Acc>
struct RowStatistics {
  const Acc* lse;  // softmax: the caller's lse; mean: own_lse
  std::vector<Acc> own_lse, delta;
  std::int64_t batch, heads, seq_len;

  std::int64_t offset(std::int64_t set, std::int64_t b, std::int64_t h) const {
    return ((set * batch + b) * heads + h) * seq_len;
  }
};

template <class T>
StridedRows<T> rows_of(const View<const T>& view, std::int64_t b, std::int64_t h,
                       const Progression& rows) {
  return strided_rows(view.data + b * view.batch_stride + h * view.head_stride, view.seq_stride,
                      rows);
}

// Phase 1, one (batch, head, window).
template <class T>
void statistics_window(const Pattern& pattern, std::int64_t b, std::int64_t h, std::int64_t x0,
                       std::int64_t x1, View<const T> q, View<const T> k, View<const T> v,
                       View<const T> out, View<const T> d_out,
                       RowStatistics<accumulator_t<T>>& stats,
                       AttendGradWorkspace<accumulator_t<T>>& workspace) {
  using Acc = accumulator_t<T>;
  const Config& config = pattern.config();
  const std::int64_t dim = pattern.shape().head_dim;
  if (config.mixing == Mixing::softmax) {
    Acc* delta = stats.delta.data() + stats.offset(0, b, h);
    for (std::int64_t x = x0; x < x1; ++x) {
      const T* o = out.data + b * out.batch_stride + x * out.seq_stride + h * out.head_stride;
      const T* g =
          d_out.data + b * d_out.batch_stride + x * d_out.seq_stride + h * d_out.head_stride;
      Acc sum = Acc(0);
      for (std::int64_t d = 0; d < dim; ++d) sum += static_cast<Acc>(g[d]) * static_cast<Acc>(o[d]);
      delta[x] = sum;
    }
    return;
  }
  // mean: each branch's LSE_i and D_i = (dO / G)·O_i of the window's rows, recomputed over the
  // same blocks and keys as the forward visits.
  const Acc scale = static_cast<Acc>(resolved_scale(config, pattern.shape()));
  const Acc weight = Acc(1) / static_cast<Acc>(pattern.num_branches());
  const std::int64_t kv_head = pattern.kv_head(h);
  for (std::int64_t i = 0; i < pattern.num_branches(); ++i) {
    const std::int64_t offset = pattern.offset(i, h);
    if (offset < 0) continue;
    const BranchGeometry geometry = pattern.branch(i);
    for (std::int64_t s = geometry.segment_of(x0); s <= geometry.segment_of(x1 - 1); ++s) {
      const Progression block = geometry.rows(s, offset);
      const Progression queries = block.within(x0, x1);
      if (queries.empty()) continue;
      const Progression keys =
          config.causal ? block.prefix(block.index_of(queries.last()) + 1) : block;
      attend_statistics(workspace, rows_of(q, b, h, queries), rows_of(k, b, kv_head, keys),
                        rows_of(v, b, kv_head, keys), rows_of(d_out, b, h, queries), dim, scale,
                        weight, config.causal, stats.own_lse.data() + stats.offset(i, b, h),
                        stats.delta.data() + stats.offset(i, b, h));
    }
  }
}

// One thread's scratch for phases 2 and 3: the block primitive's tiles and a window's gradient
// accumulators (two for dK, dV; phase 3 uses the first).
template <class Acc>
struct BackwardWorkspace {
  BackwardWorkspace(std::int64_t window, std::int64_t head_dim)
      : grad(head_dim), first(window, head_dim), second(window, head_dim) {}
  AttendGradWorkspace<Acc> grad;
  RowMajorMatrix<Acc> first, second;
};

template <class T>
void store_rows(const RowMajorMatrix<accumulator_t<T>>& rows, View<T> view, std::int64_t b,
                std::int64_t h, std::int64_t x0, std::int64_t x1, std::int64_t dim) {
  for (std::int64_t x = x0; x < x1; ++x) {
    T* destination = view.data + b * view.batch_stride + x * view.seq_stride + h * view.head_stride;
    Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>(destination, dim) =
        rows.row(x - x0).template cast<T>();
  }
}

// Phase 2, one (batch, kv head, key window [y0, y1)).
template <class T>
void key_window(const Pattern& pattern, std::int64_t b, std::int64_t kv_head, std::int64_t y0,
                std::int64_t y1, View<const T> q, View<const T> k, View<const T> v,
                View<const T> d_out, const RowStatistics<accumulator_t<T>>& stats, View<T> d_k,
                View<T> d_v, BackwardWorkspace<accumulator_t<T>>& workspace) {
  using Acc = accumulator_t<T>;
  const Config& config = pattern.config();
  const Shape& shape = pattern.shape();
  const std::int64_t dim = shape.head_dim, group = shape.num_heads / shape.num_kv_heads;
  const Acc scale = static_cast<Acc>(resolved_scale(config, shape));
  const bool mean = config.mixing == Mixing::mean;
  const Acc weight = mean ? Acc(1) / static_cast<Acc>(pattern.num_branches()) : Acc(1);
  auto d_k_acc = workspace.first.topRows(y1 - y0);
  auto d_v_acc = workspace.second.topRows(y1 - y0);
  d_k_acc.setZero();
  d_v_acc.setZero();
  for (std::int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h)
    for (std::int64_t i = 0; i < pattern.num_branches(); ++i) {
      const std::int64_t offset = pattern.offset(i, h);
      if (offset < 0) continue;
      const std::int64_t set = mean ? i : 0;
      const Acc* lse = stats.lse + stats.offset(set, b, h);
      const Acc* delta = stats.delta.data() + stats.offset(set, b, h);
      const BranchGeometry geometry = pattern.branch(i);
      for (std::int64_t s = geometry.segment_of(y0); s <= geometry.segment_of(y1 - 1); ++s) {
        const Progression block = geometry.rows(s, offset);
        const Progression keys = block.within(y0, y1);
        if (keys.empty()) continue;
        // A causal key is seen only by the queries at or after it.
        const Progression queries =
            config.causal ? block.slice(block.index_of(keys.first), block.count) : block;
        const std::int64_t row = keys.first - y0, stride = keys.stride * dim;
        attend_grad(workspace.grad, rows_of(q, b, h, queries), rows_of(k, b, kv_head, keys),
                    rows_of(v, b, kv_head, keys), rows_of(d_out, b, h, queries), lse, delta, dim,
                    scale, weight, config.causal, GradientRows<Acc>{},
                    GradientRows<Acc>{workspace.first.data() + row * dim, stride},
                    GradientRows<Acc>{workspace.second.data() + row * dim, stride});
      }
    }
  store_rows<T>(workspace.first, d_k, b, kv_head, y0, y1, dim);
  store_rows<T>(workspace.second, d_v, b, kv_head, y0, y1, dim);
}

// Phase 3, one (batch, head, query window [x0, x1)).
template <class T>
void query_window(const Pattern& pattern, std::int64_t b, std::int64_t h, std::int64_t x0,
                  std::int64_t x1, View<const T> q, View<const T> k, View<const T> v,
                  View<const T> d_out, const RowStatistics<accumulator_t<T>>& stats, View<T> d_q,
                  BackwardWorkspace<accumulator_t<T>>& workspace) {
  using Acc = accumulator_t<T>;
  const Config& config = pattern.config();
  const Shape& shape = pattern.shape();
  const std::int64_t dim = shape.head_dim, kv_head = pattern.kv_head(h);
  const Acc scale = static_cast<Acc>(resolved_scale(config, shape));
  const bool mean = config.mixing == Mixing::mean;
  const Acc weight = mean ? Acc(1) / static_cast<Acc>(pattern.num_branches()) : Acc(1);
  auto d_q_acc = workspace.first.topRows(x1 - x0);
  d_q_acc.setZero();
  for (std::int64_t i = 0; i < pattern.num_branches(); ++i) {
    const std::int64_t offset = pattern.offset(i, h);
    if (offset < 0) continue;
    const std::int64_t set = mean ? i : 0;
    const Acc* lse = stats.lse + stats.offset(set, b, h);
    const Acc* delta = stats.delta.data() + stats.offset(set, b, h);
    const BranchGeometry geometry = pattern.branch(i);
    for (std::int64_t s = geometry.segment_of(x0); s <= geometry.segment_of(x1 - 1); ++s) {
      const Progression block = geometry.rows(s, offset);
      const Progression queries = block.within(x0, x1);
      if (queries.empty()) continue;
      const Progression keys =
          config.causal ? block.prefix(block.index_of(queries.last()) + 1) : block;
      const std::int64_t row = queries.first - x0;
      attend_grad(workspace.grad, rows_of(q, b, h, queries), rows_of(k, b, kv_head, keys),
                  rows_of(v, b, kv_head, keys), rows_of(d_out, b, h, queries), lse, delta, dim,
                  scale, weight, config.causal,
                  GradientRows<Acc>{workspace.first.data() + row * dim, queries.stride * dim},
                  GradientRows<Acc>{}, GradientRows<Acc>{});
    }
  }
  store_rows<T>(workspace.first, d_q, b, h, x0, x1, dim);
}

// Fused mode, one (batch, kv head, block of branch i): every query head of the GQA group whose
// offset is the block's adds the block's whole gradient -- dQ of its rows, dK and dV of the kv
// head's rows -- straight into the outputs. Within one branch no two blocks share a gradient row
// (a position has one offset per branch and one segment), so units never meet; branches run one
// after another. Storage of the accumulator type only (float, double).
template <class T>
void block_unit(const Pattern& pattern, const Block& block, std::int64_t b, std::int64_t kv_head,
                View<const T> q, View<const T> k, View<const T> v, View<const T> d_out,
                const RowStatistics<T>& stats, View<T> d_q, View<T> d_k, View<T> d_v,
                AttendGradWorkspace<T>& workspace) {
  static_assert(std::is_same_v<T, accumulator_t<T>>, "block_unit: T must be its own accumulator");
  const Config& config = pattern.config();
  const Shape& shape = pattern.shape();
  const std::int64_t dim = shape.head_dim, group = shape.num_heads / shape.num_kv_heads;
  const T scale = static_cast<T>(resolved_scale(config, shape));
  const bool mean = config.mixing == Mixing::mean;
  const T weight = mean ? T(1) / static_cast<T>(pattern.num_branches()) : T(1);
  const Progression& rows = block.rows;
  const Progression heads = block.heads.within(kv_head * group, (kv_head + 1) * group);
  auto gradient = [&](const View<T>& view, std::int64_t head) {
    return GradientRows<T>{view.data + b * view.batch_stride + rows.first * view.seq_stride +
                               head * view.head_stride,
                           rows.stride * view.seq_stride};
  };
  for (std::int64_t j = 0; j < heads.count; ++j) {
    const std::int64_t h = heads.at(j);
    const std::int64_t set = mean ? block.branch : 0;
    attend_grad(workspace, rows_of(q, b, h, rows), rows_of(k, b, kv_head, rows),
                rows_of(v, b, kv_head, rows), rows_of(d_out, b, h, rows),
                stats.lse + stats.offset(set, b, h), stats.delta.data() + stats.offset(set, b, h),
                dim, scale, weight, config.causal, gradient(d_q, h), gradient(d_k, kv_head),
                gradient(d_v, kv_head));
  }
}

template <class T>
void zero_rows(View<T> view, std::int64_t b, std::int64_t h, std::int64_t x0, std::int64_t x1,
               std::int64_t dim) {
  for (std::int64_t x = x0; x < x1; ++x)
    std::fill_n(view.data + b * view.batch_stride + x * view.seq_stride + h * view.head_stride, dim,
                T(0));
}

}  // namespace cpu::detail

}  // namespace dilated_attention
