#pragma once
// The work units of the CPU backward (cpu/backward.hpp, docs/semantics.md "The gradient"): what one thread
// does for one (batch, head, window) of row statistics, one (batch, kv head, block) of the fused
// path, and one key or query window of the narrow-storage path. Each sums its gradient rows in a
// fixed order and shares none of them with another unit of the same phase.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "../config.hpp"
#include "../merge.hpp"
#include "../pattern.hpp"
#include "attend_backward.hpp"
#include "attend_statistics.hpp"
#include "forward.hpp"

namespace dilated_attention {

namespace cpu::detail {

// Row statistics, indexed by position: the LSE the probabilities are normalised with and
// D = weight * dO·O_i. One set (sets == 1) when every head's are the forward's own: softmax
// mixing, and mean mixing where no head has rows selected by two branches (partitioned, G = 1);
// then lse is the caller's and D = dO·O. Otherwise one set per branch in own_lse and delta, and
// per head `direct` says how phase 1 fills them.
template <class Acc>
struct RowStatistics {
  const Acc* forward_lse;  // the caller's, [batch, heads, seq_len]
  const Acc* lse;          // forward_lse (sets == 1) or own_lse
  std::vector<Acc> own_lse, delta;
  std::int64_t sets, batch, heads, seq_len;
  // Per head, with one set per branch: the branch whose statistics are the forward's (the only
  // one selecting rows for the head, or 0 when none does), or -1 when several branches select
  // rows and each branch's are recomputed.
  std::vector<std::int64_t> direct;

  std::int64_t offset(std::int64_t branch, std::int64_t b, std::int64_t h) const {
    const std::int64_t set = sets == 1 ? 0 : branch;
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
                       AttendBackwardWorkspace<accumulator_t<T>>& workspace) {
  using Acc = accumulator_t<T>;
  const Config& config = pattern.config();
  const std::int64_t dim = pattern.shape().head_dim;
  const std::int64_t direct = stats.sets == 1 ? 0 : stats.direct[static_cast<std::size_t>(h)];
  if (direct >= 0) {
    // The forward's own statistics (docs/semantics.md "Gradient of the mean mixing"): its LSE,
    // and D = dO·O, which under mean is (dO / G)·O_i for the one branch i with O = O_i / G.
    Acc* delta = stats.delta.data() + stats.offset(direct, b, h);
    for (std::int64_t x = x0; x < x1; ++x) {
      const T* o = out.data + b * out.batch_stride + x * out.seq_stride + h * out.head_stride;
      const T* g =
          d_out.data + b * d_out.batch_stride + x * d_out.seq_stride + h * d_out.head_stride;
      Acc sum = Acc(0);
      for (std::int64_t d = 0; d < dim; ++d) sum += static_cast<Acc>(g[d]) * static_cast<Acc>(o[d]);
      delta[x] = sum;
    }
    if (stats.sets > 1)
      std::copy(stats.forward_lse + stats.offset(0, b, h) + x0,
                stats.forward_lse + stats.offset(0, b, h) + x1,
                stats.own_lse.data() + stats.offset(direct, b, h) + x0);
    return;
  }
  // mean, a head with rows in several branches: each branch's LSE_i and D_i = (dO / G)·O_i of the
  // window's rows, recomputed over the same blocks and keys as the forward visits.
  const Acc scale = static_cast<Acc>(resolved_scale(config, pattern.shape()));
  const Acc weight = Acc(1) / static_cast<Acc>(pattern.num_branches());
  const std::int64_t kv_head = pattern.kv_head(h);
  pattern.for_each_block_in(h, x0, x1, [&](std::int64_t i, const Progression& block,
                                            const Progression& queries) {
    const Progression keys = config.causal ? block.prefix(block.index_of(queries.last()) + 1) : block;
    attend_statistics(workspace, rows_of(q, b, h, queries), rows_of(k, b, kv_head, keys),
                      rows_of(v, b, kv_head, keys), rows_of(d_out, b, h, queries), dim, scale,
                      weight, config.causal, stats.own_lse.data() + stats.offset(i, b, h),
                      stats.delta.data() + stats.offset(i, b, h));
  });
}

// One thread's scratch for phases 2 and 3: the block primitive's workspace and a window's
// gradient accumulators, window x head_dim each (two for dK, dV; phase 3 uses the first).
template <class Acc>
struct BackwardWorkspace {
  BackwardWorkspace(std::int64_t window, std::int64_t head_dim, CpuIsa isa)
      : grad(head_dim, isa),
        first(static_cast<std::size_t>(window * head_dim)),
        second(static_cast<std::size_t>(window * head_dim)) {}
  AttendBackwardWorkspace<Acc> grad;
  std::vector<Acc> first, second;
};

// One BackwardWorkspace per worker thread for a whole backward call, shared by its phases: the
// workers of each cpu::run_units call claim slots 0, 1, ... on entry (one each), and the pool is
// reset after the call has joined them. A slot's scratch is allocated by the first worker that
// claims it, so it is allocated once per call and thread. The contents never carry results from
// one unit to the next (every unit initialises what it reads), so which slot a unit gets does not
// matter to the results.
template <class Acc>
class WorkspacePool {
 public:
  WorkspacePool(int threads, std::int64_t window, std::int64_t head_dim, CpuIsa isa)
      : slots_(static_cast<std::size_t>(std::max(threads, 1))),
        window_(window),
        head_dim_(head_dim),
        isa_(isa) {}

  BackwardWorkspace<Acc>& claim() {  // by each worker of one run_units call, once
    auto& slot = slots_.at(static_cast<std::size_t>(next_.fetch_add(1)));
    if (!slot) slot = std::make_unique<BackwardWorkspace<Acc>>(window_, head_dim_, isa_);
    return *slot;
  }
  void reset() { next_.store(0); }  // after the run_units call returned

 private:
  std::vector<std::unique_ptr<BackwardWorkspace<Acc>>> slots_;
  std::int64_t window_, head_dim_;
  CpuIsa isa_;
  std::atomic<int> next_{0};
};

template <class T>
void store_rows(const std::vector<accumulator_t<T>>& rows, View<T> view, std::int64_t b,
                std::int64_t h, std::int64_t x0, std::int64_t x1, std::int64_t dim) {
  for (std::int64_t x = x0; x < x1; ++x) {
    T* destination = view.data + b * view.batch_stride + x * view.seq_stride + h * view.head_stride;
    const accumulator_t<T>* source = rows.data() + (x - x0) * dim;
    for (std::int64_t d = 0; d < dim; ++d) destination[d] = static_cast<T>(source[d]);
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
  std::fill_n(workspace.first.begin(), (y1 - y0) * dim, Acc(0));
  std::fill_n(workspace.second.begin(), (y1 - y0) * dim, Acc(0));
  for (std::int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h)
    pattern.for_each_block_in(
        h, y0, y1, [&](std::int64_t i, const Progression& block, const Progression& keys) {
          // A causal key is seen only by the queries at or after it.
          const Progression queries =
              config.causal ? block.slice(block.index_of(keys.first), block.count) : block;
          const std::int64_t row = keys.first - y0, stride = keys.stride * dim;
          attend_backward(workspace.grad, rows_of(q, b, h, queries), rows_of(k, b, kv_head, keys),
                          rows_of(v, b, kv_head, keys), rows_of(d_out, b, h, queries),
                          stats.lse + stats.offset(i, b, h),
                          stats.delta.data() + stats.offset(i, b, h), dim, scale, weight,
                          config.causal, GradientRows<Acc>{},
                          GradientRows<Acc>{workspace.first.data() + row * dim, stride},
                          GradientRows<Acc>{workspace.second.data() + row * dim, stride});
        });
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
  std::fill_n(workspace.first.begin(), (x1 - x0) * dim, Acc(0));
  pattern.for_each_block_in(
      h, x0, x1, [&](std::int64_t i, const Progression& block, const Progression& queries) {
        const Progression keys =
            config.causal ? block.prefix(block.index_of(queries.last()) + 1) : block;
        const std::int64_t row = queries.first - x0;
        attend_backward(workspace.grad, rows_of(q, b, h, queries), rows_of(k, b, kv_head, keys),
                        rows_of(v, b, kv_head, keys), rows_of(d_out, b, h, queries),
                        stats.lse + stats.offset(i, b, h),
                        stats.delta.data() + stats.offset(i, b, h), dim, scale, weight,
                        config.causal,
                        GradientRows<Acc>{workspace.first.data() + row * dim, queries.stride * dim},
                        GradientRows<Acc>{}, GradientRows<Acc>{});
      });
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
                AttendBackwardWorkspace<T>& workspace) {
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
    attend_backward(workspace, rows_of(q, b, h, rows), rows_of(k, b, kv_head, rows),
                    rows_of(v, b, kv_head, rows), rows_of(d_out, b, h, rows),
                    stats.lse + stats.offset(block.branch, b, h),
                    stats.delta.data() + stats.offset(block.branch, b, h), dim, scale, weight,
                    config.causal, gradient(d_q, h), gradient(d_k, kv_head),
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
