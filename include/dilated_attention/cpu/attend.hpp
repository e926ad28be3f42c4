#pragma once
// The block-level CPU primitive: one head's query rows attend one head's key/value rows, all
// addressed in the caller's memory by stride. Dilation is a row stride, so an Eigen::Map with an
// OuterStride of r * seq_stride *is* the dilated block: nothing is gathered, and no score matrix
// larger than one tile (query_tile x key_tile) ever exists.
//
// Inside, a flash-style loop: for each query tile, key tiles are folded into a running
// (max, sum) per row (merge.hpp's OnlineSoftmax) with the unnormalised output beside it; the
// tile products are Eigen GEMMs on the strided maps. The forward driver (forward.hpp) and the
// ring driver both build on this, so it is the one place the inner loop lives.

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "../merge.hpp"
#include "../pattern.hpp"
#include "exp.hpp"

namespace dilated_attention::cpu {

// Accumulator type: double for double storage, float otherwise (float, Eigen::bfloat16).
template <class T>
using accumulator_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Rows of one head addressed by stride: no gathered copies. Row j lives at data + j * row_stride
// (head_dim contiguous elements) and sits at sequence position positions.at(j); positions.count
// is the row count. Positions are increasing (a stride >= 1) whenever count > 1.
template <class T>
struct StridedRows {
  const T* data;
  std::int64_t row_stride;
  Progression positions;
};

namespace detail {

template <class Acc>
using RowMajorMatrix = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class Acc>
using ConstRowsMap = Eigen::Map<const RowMajorMatrix<Acc>, Eigen::Unaligned, Eigen::OuterStride<>>;

// How many of `keys` lie at or before position x: the causal prefix a query at x may see.
inline std::int64_t keys_up_to(const Progression& keys, std::int64_t x) {
  if (keys.count <= 1) return keys.count == 1 && keys.first <= x ? 1 : 0;
  return keys.count_up_to(x);
}

}  // namespace detail

// Largest tile sizes of the inner loop. Each key tile is packed by the GEMM once per query tile,
// so taller query tiles amortise packing (128 rows measured 5-10% faster than 64); a key tile
// bounds the score scratch (query_tile x key_tile, 128 KiB in float). The workspace shrinks both
// for wide heads and for double (tile_rows below).
inline constexpr std::int64_t query_tile = 128;
inline constexpr std::int64_t key_tile = 256;

namespace detail {

// Rows of a tile such that every GEMM operand block of a tile product (rows x head_dim, and
// query x key rows) fits Eigen's stack allocation limit: the products then never touch the
// heap, whatever the head width or accumulator type.
inline std::int64_t tile_rows(std::int64_t most, std::int64_t other_side,
                              std::size_t element_size) {
  const std::int64_t budget =
      EIGEN_STACK_ALLOCATION_LIMIT / static_cast<std::int64_t>(element_size);
  const std::int64_t rows = budget / std::max<std::int64_t>(other_side, 1);
  return std::clamp<std::int64_t>(rows / 8 * 8, 8, most);
}

}  // namespace detail

// Scratch for attend(), sized by head_dim alone (never by sequence or segment length). One per
// thread; reusing it across calls avoids an allocation per block.
template <class Acc>
class AttendWorkspace {
 public:
  explicit AttendWorkspace(std::int64_t head_dim)
      : head_dim_(head_dim),
        query_rows_(detail::tile_rows(query_tile, head_dim, sizeof(Acc))),
        key_rows_(detail::tile_rows(key_tile, std::max(head_dim, query_rows_), sizeof(Acc))),
        scores_(query_rows_, key_rows_),
        accumulator_(query_rows_, head_dim),
        state_(static_cast<std::size_t>(query_rows_)),
        visible_(static_cast<std::size_t>(query_rows_)) {}

  std::int64_t head_dim() const { return head_dim_; }
  std::int64_t query_rows() const { return query_rows_; }  // rows of a query tile
  std::int64_t key_rows() const { return key_rows_; }      // rows of a key tile

 private:
  template <class T, class A>
  friend void attend(AttendWorkspace<A>&, const StridedRows<T>&, const StridedRows<T>&,
                     const StridedRows<T>&, std::int64_t, A, bool, A*, A*);

  // The rows [begin, begin + count) of `rows` as an Acc matrix. Storage of the accumulator type
  // is mapped in place with the row stride; other storage (bfloat16) is widened into `buffer`,
  // one tile at a time.
  template <class T>
  detail::ConstRowsMap<Acc> tile(const StridedRows<T>& rows, std::int64_t begin, std::int64_t count,
                                 detail::RowMajorMatrix<Acc>& buffer) {
    const T* first = rows.data + begin * rows.row_stride;
    if constexpr (std::is_same_v<T, Acc>) {
      return detail::ConstRowsMap<Acc>(first, count, head_dim_,
                                       Eigen::OuterStride<>(rows.row_stride));
    } else {
      if (buffer.rows() < count) buffer.resize(std::max(query_rows_, key_rows_), head_dim_);
      for (std::int64_t i = 0; i < count; ++i)
        for (std::int64_t d = 0; d < head_dim_; ++d)
          buffer(i, d) = static_cast<Acc>(first[i * rows.row_stride + d]);
      return detail::ConstRowsMap<Acc>(buffer.data(), count, head_dim_,
                                       Eigen::OuterStride<>(head_dim_));
    }
  }

  std::int64_t head_dim_, query_rows_, key_rows_;
  detail::RowMajorMatrix<Acc> scores_;       // query_rows x key_rows: scores, then probabilities
  detail::RowMajorMatrix<Acc> accumulator_;  // query_rows x head_dim: unnormalised output
  std::vector<OnlineSoftmax<Acc>> state_;    // per query row of the tile
  std::vector<std::int64_t> visible_;        // per query row: keys it may see (causal prefix)
  detail::RowMajorMatrix<Acc> q_buffer_, k_buffer_, v_buffer_;  // widening only (bfloat16)
};

// attend() with caller-owned scratch (workspace.head_dim() must equal head_dim).
template <class T, class Acc>
void attend(AttendWorkspace<Acc>& workspace, const StridedRows<T>& q, const StridedRows<T>& k,
            const StridedRows<T>& v, std::int64_t head_dim, Acc scale, bool causal, Acc* out_o,
            Acc* out_lse) {
  static_assert(std::is_same_v<Acc, accumulator_t<T>>, "attend: Acc must be accumulator_t<T>");
  if (head_dim != workspace.head_dim())
    throw std::invalid_argument(
        "dilated_attention::cpu::attend: head_dim differs from the workspace's");
  if (k.positions.count != v.positions.count)
    throw std::invalid_argument(
        "dilated_attention::cpu::attend: k and v have different row counts");
  const std::int64_t num_queries = std::max<std::int64_t>(q.positions.count, 0);
  const std::int64_t num_keys = std::max<std::int64_t>(k.positions.count, 0);
  Eigen::Map<detail::RowMajorMatrix<Acc>> out(out_o, num_queries, head_dim);

  const std::int64_t query_rows = workspace.query_rows(), key_rows = workspace.key_rows();
  for (std::int64_t q0 = 0; q0 < num_queries; q0 += query_rows) {
    const std::int64_t bq = std::min(query_rows, num_queries - q0);
    const auto q_tile = workspace.tile(q, q0, bq, workspace.q_buffer_);

    // Keys each row may see; the tile's key loop stops after the longest prefix.
    std::int64_t key_limit = 0;
    for (std::int64_t j = 0; j < bq; ++j) {
      const std::int64_t visible =
          causal ? detail::keys_up_to(k.positions, q.positions.at(q0 + j)) : num_keys;
      workspace.visible_[static_cast<std::size_t>(j)] = visible;
      workspace.state_[static_cast<std::size_t>(j)] = OnlineSoftmax<Acc>{};
      key_limit = std::max(key_limit, visible);
    }
    auto accumulator = workspace.accumulator_.topRows(bq);
    accumulator.setZero();

    // Causal tiles wholly in the future of every row of this query tile are never visited.
    for (std::int64_t k0 = 0; k0 < key_limit; k0 += key_rows) {
      const std::int64_t bk = std::min(key_rows, key_limit - k0);
      const auto k_tile = workspace.tile(k, k0, bk, workspace.k_buffer_);
      auto scores = workspace.scores_.topLeftCorner(bq, bk);
      scores.noalias() = q_tile * k_tile.transpose();

      for (std::int64_t j = 0; j < bq; ++j) {
        auto row = scores.row(j);
        const std::int64_t n =
            std::clamp<std::int64_t>(workspace.visible_[static_cast<std::size_t>(j)] - k0, 0, bk);
        if (n == 0) {  // every key of this tile is in the row's future
          row.setZero();
          continue;
        }
        OnlineSoftmax<Acc>& state = workspace.state_[static_cast<std::size_t>(j)];
        // The largest score is scale times the largest (or, for a negative scale, the
        // smallest) dot product: one pass over the raw products.
        const Acc extreme = scale >= Acc(0) ? row.head(n).maxCoeff() : row.head(n).minCoeff();
        const Acc factor = state.rescale(scale * extreme);
        state.sum += detail::exp_shifted_sum(row.data(), n, scale, state.max);
        row.tail(bk - n).setZero();
        if (factor != Acc(1)) accumulator.row(j) *= factor;
      }
      const auto v_tile = workspace.tile(v, k0, bk, workspace.v_buffer_);
      accumulator.noalias() += scores * v_tile;
    }

    for (std::int64_t j = 0; j < bq; ++j) {
      const OnlineSoftmax<Acc>& state = workspace.state_[static_cast<std::size_t>(j)];
      out.row(q0 + j) = accumulator.row(j) * state.inverse_sum();
      out_lse[q0 + j] = state.lse();
    }
  }
}

// The partial (docs/semantics.md vocabulary) of the query rows over the key/value rows: for query row j,
// out_o[j * head_dim + d] is the softmax-normalised output and out_lse[j] = ln sum_y exp(scale *
// <q_j, k_y>) over the keys it attends (-inf and o = 0 when it attends none). Causal means key
// position <= query position. k and v have the same positions and count. Single-threaded;
// callers parallelise over independent calls. Deterministic: the result depends only on the
// inputs, never on thread count or timing. Allocates its scratch per call; the workspace
// overload above reuses it.
template <class T>
void attend(const StridedRows<T>& q, const StridedRows<T>& k, const StridedRows<T>& v,
            std::int64_t head_dim, accumulator_t<T> scale, bool causal, accumulator_t<T>* out_o,
            accumulator_t<T>* out_lse) {
  if (head_dim <= 0)
    throw std::invalid_argument("dilated_attention::cpu::attend: head_dim must be positive");
  AttendWorkspace<accumulator_t<T>> workspace(head_dim);
  attend(workspace, q, k, v, head_dim, scale, causal, out_o, out_lse);
}

}  // namespace dilated_attention::cpu
