#pragma once
// The CPU compute back end of the ring backward (ring/driver/backward.hpp, docs/semantics.md "The gradient"): the
// row statistics, cpu::attend_backward on the blocks the schedule names, dK/dV partials of received
// rows written in their message's layout (they travel back to the rows' owner), the owner's sum
// of the returned partials, and the final cast. Gradients accumulate in the accumulator type and
// are rounded once, at the end.
//
// Rows are addressed by global position; the block primitives index the row statistics by
// position, so a block's positions are shifted by one constant (keys and queries alike, which
// leaves every causal comparison unchanged) so that a query's shifted position is its local row.
//
// Determinism: the work of one (batch, kv head) -- every query head of its group, in ascending
// order -- is done by one thread, in the schedule's fixed order, so no gradient row is shared
// between threads and the result never depends on the thread count.

#include <cstdint>
#include <utility>
#include <vector>

#include "../../config.hpp"
#include "../../cpu/attend.hpp"
#include "../../cpu/attend_backward.hpp"
#include "../../cpu/attend_statistics.hpp"
#include "../../merge.hpp"
#include "../../pattern.hpp"
#include "shard.hpp"
#include "../driver/layout.hpp"

namespace dilated_attention::ring {

template <class T>
class CpuBackwardBackend : public CpuShard<T> {
  using Base = CpuShard<T>;

 public:
  using Acc = cpu::accumulator_t<T>;
  using Buffer = typename Base::Buffer;
  using GradientBuffer = std::vector<Acc>;  // dK then dV rows of each piece, as the K/V message

  // local: the shard's shape; chunks: which global rows the views hold; lse: the forward's
  // [batch, heads, local rows]; branches: G; mean: the mixing; recompute: mean mixing with some
  // head whose rows several branches select (Pattern::mean_recomputes_statistics), the only
  // case whose per-branch statistics differ from the forward's LSE and dO·O
  // (docs/semantics.md "Gradient of the mean mixing").
  CpuBackwardBackend(const Shape& local, std::vector<Chunk> chunks, View<const T> q,
                     View<const T> k, View<const T> v, View<const T> out, const Acc* lse,
                     View<const T> d_out, Acc scale, bool causal, std::int64_t branches, bool mean,
                     bool recompute, int threads, CpuIsa isa = CpuIsa::automatic)
      : Base(local, std::move(chunks), q, k, v, threads, isa),
        out_(out),
        d_out_(d_out),
        lse_(lse),
        scale_(scale),
        weight_(mean ? Acc(1) / static_cast<Acc>(branches) : Acc(1)),
        causal_(causal),
        recompute_(mean && recompute),
        rows_(local.batch * local.num_heads * local.seq_len),
        delta_(static_cast<std::size_t>((recompute_ ? branches : 1) * rows_), Acc(0)),
        d_q_(static_cast<std::size_t>(rows_ * local.head_dim), Acc(0)),
        d_k_(static_cast<std::size_t>(local.batch * local.num_kv_heads * local.seq_len *
                                      local.head_dim),
             Acc(0)),
        d_v_(d_k_.size(), Acc(0)) {
    if (recompute_)
      branch_lse_.assign(static_cast<std::size_t>(branches * rows_), negative_infinity<Acc>());
  }

  // Whether the driver runs the statistics pass over every step's blocks (else
  // local_statistics).
  bool recomputes_statistics() const { return recompute_; }

  GradientBuffer make_gradient_buffer(std::size_t elements) const {
    return GradientBuffer(elements, Acc(0));
  }
  static void* gradient_bytes(GradientBuffer& buffer) { return buffer.data(); }
  static std::size_t gradient_element_size() { return sizeof(Acc); }

  // Scratch one thread reuses for every block it computes.
  struct Workspace {
    Workspace(std::int64_t head_dim, CpuIsa isa) : grad(head_dim, isa) {}
    cpu::AttendBackwardWorkspace<Acc> grad;
    std::vector<Acc> lse, delta;  // one block's row statistics (mean mixing)
  };

  // Runs body(b, g, workspace) for the (batch, kv head) pairs numbered [first, last) (pair
  // b * num_kv_heads + g), each pair on one thread.
  template <class Body>
  void for_each_kv_head(std::int64_t first, std::int64_t last, Body&& body) {
    const std::int64_t kv_heads = shape_.num_kv_heads;
    this->run_units(
        last - first, [&](CpuIsa isa) { return Workspace(shape_.head_dim, isa); },
        [&](std::int64_t unit, Workspace& workspace) {
          body((first + unit) / kv_heads, (first + unit) % kv_heads, workspace);
        });
  }

  // D(x) = dO(x)·O(x) for every local row (the forward's LSE is read in place): softmax, and
  // mean where every head has one branch (then D_i = (dO/G)·O_i = dO·O and LSE_i = LSE, while
  // the weight 1/G stays on dO). Otherwise mean needs each branch's LSE_i and D_i, which come
  // from blocks (statistics below).
  void local_statistics() {
    if (recompute_) return;
    const std::int64_t dim = shape_.head_dim;
    for (std::int64_t b = 0; b < shape_.batch; ++b)
      for (std::int64_t h = 0; h < shape_.num_heads; ++h)
        for (std::int64_t x = 0; x < shape_.seq_len; ++x) {
          const T* o =
              out_.data + b * out_.batch_stride + x * out_.seq_stride + h * out_.head_stride;
          const T* g = d_out_.data + b * d_out_.batch_stride + x * d_out_.seq_stride +
                       h * d_out_.head_stride;
          Acc sum = Acc(0);
          for (std::int64_t d = 0; d < dim; ++d)
            sum += static_cast<Acc>(g[d]) * static_cast<Acc>(o[d]);
          delta_[static_cast<std::size_t>(row(0, b, h, x))] = sum;
        }
  }

  // Mean mixing: one block's LSE and D = (dO / G)·O_block of query head h's rows `queries`,
  // merged into branch i's row statistics exactly as partial outputs merge.
  void statistics(Workspace& ws, std::int64_t i, std::int64_t b, std::int64_t h, std::int64_t g,
                  const Progression& queries, const Progression& keys, const Buffer* received,
                  std::size_t element_offset) {
    const std::int64_t shift = queries.first;  // shifted query positions 0 .. span - 1
    const std::int64_t span = queries.last() - queries.first + 1;
    ws.lse.resize(static_cast<std::size_t>(span));
    ws.delta.resize(static_cast<std::size_t>(span));
    const KeyRows keys_rows = key_rows(b, g, keys, received, element_offset, shift);
    cpu::attend_statistics(ws.grad, rows_at(q_, b, h, queries, shift), keys_rows.k, keys_rows.v,
                           rows_at(d_out_, b, h, queries, shift), shape_.head_dim, scale_, weight_,
                           causal_, ws.lse.data(), ws.delta.data());
    for (std::int64_t j = 0; j < queries.count; ++j) {
      const auto r = static_cast<std::size_t>(row(i, b, h, local_of(queries.at(j))));
      const auto s = static_cast<std::size_t>(j * queries.stride);
      const MergeWeights<Acc> w = merge_weights(branch_lse_[r], ws.lse[s]);
      delta_[r] = w.a * delta_[r] + w.b * ws.delta[s];
      branch_lse_[r] = w.lse;
    }
  }

  // The gradient of one block (branch i, query head h, kv head g): dQ of its query rows; dK and
  // dV of its keys into this rank's accumulators (received == nullptr: the rank's own rows) or
  // into `partials` at element_offset, in the received message's layout.
  void gradient(Workspace& ws, std::int64_t i, std::int64_t b, std::int64_t h, std::int64_t g,
                const Progression& queries, const Progression& keys, const Buffer* received,
                std::size_t element_offset, GradientBuffer* partials) {
    const std::int64_t dim = shape_.head_dim;
    const std::int64_t shift = queries.first - local_of(queries.first);  // positions -> local rows
    const std::int64_t set = recompute_ ? i : 0;
    const Acc* lse = recompute_ ? branch_lse_.data() + row(set, b, h, 0) : lse_ + row(0, b, h, 0);
    const KeyRows keys_rows = key_rows(b, g, keys, received, element_offset, shift);
    const cpu::GradientRows<Acc> d_q{d_q_.data() + row(0, b, h, local_of(queries.first)) * dim,
                                     queries.stride * dim};
    cpu::GradientRows<Acc> d_k, d_v;
    if (received == nullptr) {
      const std::int64_t first = kv_row(b, g, local_of(keys.first)) * dim;
      d_k = {d_k_.data() + first, keys.stride * dim};
      d_v = {d_v_.data() + first, keys.stride * dim};
    } else {
      Acc* base = partials->data() + element_offset;
      d_k = {base, dim};
      d_v = {base + keys.count * dim, dim};
    }
    cpu::attend_backward(ws.grad, rows_at(q_, b, h, queries, shift), keys_rows.k, keys_rows.v,
                         rows_at(d_out_, b, h, queries, shift), lse,
                         delta_.data() + row(set, b, h, 0), dim, scale_, weight_, causal_, d_q, d_k,
                         d_v);
  }

  // The owner's side: the dK and dV partials a peer computed for this rank's rows `rows` of
  // (batch b, kv head g), at element_offset of a returned message, added to the accumulators.
  void add_returned(const GradientBuffer& partials, std::size_t element_offset, std::int64_t b,
                    std::int64_t g, const Progression& rows) {
    const std::int64_t dim = shape_.head_dim;
    const Acc* d_k_rows = partials.data() + element_offset;
    const Acc* d_v_rows = d_k_rows + rows.count * dim;
    for (std::int64_t j = 0; j < rows.count; ++j) {
      const std::int64_t first = kv_row(b, g, local_of(rows.at(j))) * dim;
      for (std::int64_t d = 0; d < dim; ++d) {
        d_k_[static_cast<std::size_t>(first + d)] += d_k_rows[j * dim + d];
        d_v_[static_cast<std::size_t>(first + d)] += d_v_rows[j * dim + d];
      }
    }
  }

  // Writes the shard's gradients, each element rounded once to T.
  void finish(View<T> d_q, View<T> d_k, View<T> d_v) const {
    store(d_q_, d_q, shape_.num_heads);
    store(d_k_, d_k, shape_.num_kv_heads);
    store(d_v_, d_v, shape_.num_kv_heads);
  }

 private:
  using Base::k_;
  using Base::local_of;
  using Base::q_;
  using Base::shape_;
  using Base::v_;

  struct KeyRows {
    cpu::StridedRows<T> k, v;
  };

  static Progression shifted(const Progression& rows, std::int64_t shift) {
    return {rows.first - shift, rows.stride, rows.count};
  }
  cpu::StridedRows<T> rows_at(const View<const T>& view, std::int64_t b, std::int64_t head,
                              const Progression& rows, std::int64_t shift) const {
    cpu::StridedRows<T> result = this->local_rows(view, b, head, rows);
    result.positions = shifted(rows, shift);
    return result;
  }
  // The block's keys: the rank's own rows, or a received piece (K rows then V rows; a block on
  // received rows takes its whole unit, so the piece has exactly keys.count rows).
  KeyRows key_rows(std::int64_t b, std::int64_t g, const Progression& keys, const Buffer* received,
                   std::size_t element_offset, std::int64_t shift) const {
    if (received == nullptr)
      return {rows_at(k_, b, g, keys, shift), rows_at(v_, b, g, keys, shift)};
    const std::int64_t dim = shape_.head_dim;
    const T* base = received->data() + element_offset;
    return {{base, dim, shifted(keys, shift)},
            {base + keys.count * dim, dim, shifted(keys, shift)}};
  }

  std::int64_t row(std::int64_t set, std::int64_t b, std::int64_t h, std::int64_t x) const {
    return ((set * shape_.batch + b) * shape_.num_heads + h) * shape_.seq_len + x;
  }
  std::int64_t kv_row(std::int64_t b, std::int64_t g, std::int64_t x) const {
    return (b * shape_.num_kv_heads + g) * shape_.seq_len + x;
  }
  void store(const std::vector<Acc>& rows, View<T> view, std::int64_t heads) const {
    const std::int64_t dim = shape_.head_dim;
    for (std::int64_t b = 0; b < shape_.batch; ++b)
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t x = 0; x < shape_.seq_len; ++x) {
          const Acc* from = rows.data() + ((b * heads + h) * shape_.seq_len + x) * dim;
          T* to = view.data + b * view.batch_stride + x * view.seq_stride + h * view.head_stride;
          for (std::int64_t d = 0; d < dim; ++d) to[d] = static_cast<T>(from[d]);
        }
  }

  View<const T> out_, d_out_;
  const Acc* lse_;
  Acc scale_, weight_;
  bool causal_, recompute_;
  std::int64_t rows_;                    // batch * heads * local rows
  std::vector<Acc> branch_lse_, delta_;  // row statistics: [set][b][h][x]
  std::vector<Acc> d_q_, d_k_, d_v_;     // gradient accumulators, head_dim per row
};

}  // namespace dilated_attention::ring
