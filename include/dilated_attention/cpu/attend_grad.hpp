#pragma once
// The block-level CPU backward primitive (docs/semantics.md §7): the gradient of one head's query
// rows attending one head's key/value rows, everything addressed in the caller's memory by
// stride, as in the forward primitive (attend.hpp). Dilation is a row stride; nothing is gathered.
//
// FlashAttention-2's recipe, one (query tile, key tile) pair at a time, with the row statistics
// of the forward supplied by the caller:
//   P  = exp(scale * Q Kᵀ - LSE)          (masked: causal, empty rows)
//   dP = weight * dO Vᵀ
//   dS = scale * P ∘ (dP - D)             D = rowsum(weight * dO ∘ O), computed by the caller
//   dV += weight * Pᵀ dO,  dK += dSᵀ Q,  dQ += dS K
// `weight` is 1 for softmax mixing and 1/G for mean mixing (dO_i = dO / G). Any of dQ, dK, dV may
// be left out: the backward driver asks for dK and dV in one pass and dQ in another, so that
// every gradient row is finished by one work unit (no racing accumulation).
//
// The five tile products are Eigen GEMMs on strided maps, each labelled "Product n" below with
// its formula. Tiles are sized so that Eigen's packed operands of every product stay within
// 64 KiB: Eigen packs them on the stack, and the backward must run on a thread with a 128 KiB
// stack (docs/design.md, "Backward"; a whole backward call was measured to need 72 KiB).

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "../merge.hpp"
#include "../pattern.hpp"
#include "attend.hpp"
#include "exp.hpp"

namespace dilated_attention::cpu {

// Where gradient rows accumulate: row j at data + j * row_stride (head_dim contiguous values of
// the accumulator type). A null `data` means "not wanted".
template <class Acc>
struct GradientRows {
  Acc* data = nullptr;
  std::int64_t row_stride = 0;
};

namespace detail {

// The backward's products are Eigen GEMMs on strided maps (the forward runs on cpu/kernels/).
template <class Acc>
using RowMajorMatrix = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class Acc>
using ConstRowsMap = Eigen::Map<const RowMajorMatrix<Acc>, Eigen::Unaligned, Eigen::OuterStride<>>;

// Rows of a backward tile (query and key tiles alike): the largest multiple of 8, at most 128,
// for which the operands of every product, (rows + rows) x head_dim and (rows + head_dim) x rows,
// fit a 64 KiB stack budget. Eigen packs at most those operands, so its stack use stays below it.
// (A larger budget buys 5-10% at D = 128 but leaves too little of a 128 KiB stack to the caller.)
inline std::int64_t grad_tile_rows(std::int64_t head_dim, std::size_t element_size) {
  const std::int64_t budget = 64 * 1024 / static_cast<std::int64_t>(element_size);
  std::int64_t rows = 128;
  while (rows > 8 && (2 * rows * head_dim > budget || (rows + head_dim) * rows > budget)) rows -= 8;
  return rows;
}

}  // namespace detail

// Scratch for attend_grad(), sized by head_dim alone (never by sequence or segment length). One
// per thread, reused across calls.
template <class Acc>
class AttendGradWorkspace {
 public:
  explicit AttendGradWorkspace(std::int64_t head_dim)
      : head_dim_(head_dim),
        tile_rows_(detail::grad_tile_rows(head_dim, sizeof(Acc))),
        probabilities_(tile_rows_, tile_rows_),
        d_scores_(tile_rows_, tile_rows_),
        lse_(static_cast<std::size_t>(tile_rows_)),
        delta_(static_cast<std::size_t>(tile_rows_)),
        visible_(static_cast<std::size_t>(tile_rows_)),
        state_(static_cast<std::size_t>(tile_rows_)) {}

  std::int64_t head_dim() const { return head_dim_; }
  std::int64_t tile_rows() const { return tile_rows_; }

 private:
  template <class T, class A>
  friend void attend_grad(AttendGradWorkspace<A>&, const StridedRows<T>&, const StridedRows<T>&,
                          const StridedRows<T>&, const StridedRows<T>&, const A*, const A*,
                          std::int64_t, A, A, bool, GradientRows<A>, GradientRows<A>,
                          GradientRows<A>);
  template <class T, class A>
  friend void attend_statistics(AttendGradWorkspace<A>&, const StridedRows<T>&,
                                const StridedRows<T>&, const StridedRows<T>&,
                                const StridedRows<T>&, std::int64_t, A, A, bool, A*, A*);

  // Rows [begin, begin + count) of `rows` as an Acc matrix: mapped in place when the storage is
  // the accumulator type, else widened into `buffer` (allocated on first use, then reused).
  template <class T>
  detail::ConstRowsMap<Acc> tile(const StridedRows<T>& rows, std::int64_t begin, std::int64_t count,
                                 detail::RowMajorMatrix<Acc>& buffer) const {
    const T* first = rows.data + begin * rows.row_stride;
    if constexpr (std::is_same_v<T, Acc>) {
      return detail::ConstRowsMap<Acc>(first, count, head_dim_,
                                       Eigen::OuterStride<>(rows.row_stride));
    } else {
      if (buffer.rows() < count) buffer.resize(tile_rows_, head_dim_);
      for (std::int64_t i = 0; i < count; ++i)
        for (std::int64_t d = 0; d < head_dim_; ++d)
          buffer(i, d) = static_cast<Acc>(first[i * rows.row_stride + d]);
      return detail::ConstRowsMap<Acc>(buffer.data(), count, head_dim_,
                                       Eigen::OuterStride<>(head_dim_));
    }
  }

  std::int64_t head_dim_, tile_rows_;
  detail::RowMajorMatrix<Acc> probabilities_;  // tile x tile: scores, then P
  detail::RowMajorMatrix<Acc> d_scores_;       // tile x tile: dP, then dS
  std::vector<Acc> lse_, delta_;               // per query row of the tile
  std::vector<std::int64_t> visible_;          // per query row: keys it may see
  std::vector<OnlineSoftmax<Acc>> state_;      // per query row (attend_statistics)
  detail::RowMajorMatrix<Acc> q_buffer_, d_out_buffer_, k_buffer_, v_buffer_;  // widening only
};

// Accumulates the gradient of the block attention of q's rows over k/v's rows (docs/semantics.md
// §7). d_out has q's rows (same positions; its own data and stride). lse[x] and delta[x] are the
// row statistics of the query at sequence position x: the LSE the probabilities are normalised
// with, and D = weight * rowsum(dO ∘ O). A row with lse = -inf attends nothing and contributes
// nothing. Results are added (+=) to d_q (q's rows), d_k and d_v (k's rows); null ones are
// skipped. Causal means key position <= query position. Single-threaded and deterministic: the
// summation order depends only on the row counts.
template <class T, class Acc>
void attend_grad(AttendGradWorkspace<Acc>& workspace, const StridedRows<T>& q,
                 const StridedRows<T>& k, const StridedRows<T>& v, const StridedRows<T>& d_out,
                 const Acc* lse, const Acc* delta, std::int64_t head_dim, Acc scale, Acc weight,
                 bool causal, GradientRows<Acc> d_q, GradientRows<Acc> d_k,
                 GradientRows<Acc> d_v) {
  static_assert(std::is_same_v<Acc, accumulator_t<T>>, "attend_grad: Acc must be accumulator_t<T>");
  using Map = Eigen::Map<detail::RowMajorMatrix<Acc>, Eigen::Unaligned, Eigen::OuterStride<>>;
  if (head_dim != workspace.head_dim())
    throw std::invalid_argument(
        "dilated_attention::cpu::attend_grad: head_dim differs from the workspace's");
  if (k.positions.count != v.positions.count || q.positions.count != d_out.positions.count)
    throw std::invalid_argument(
        "dilated_attention::cpu::attend_grad: k and v (or q and d_out) have different row counts");
  const std::int64_t num_queries = std::max<std::int64_t>(q.positions.count, 0);
  const std::int64_t num_keys = std::max<std::int64_t>(k.positions.count, 0);
  const std::int64_t tile = workspace.tile_rows();

  for (std::int64_t q0 = 0; q0 < num_queries; q0 += tile) {
    const std::int64_t bq = std::min(tile, num_queries - q0);
    std::int64_t key_limit = 0;
    for (std::int64_t j = 0; j < bq; ++j) {
      const std::int64_t x = q.positions.at(q0 + j);
      const auto row = static_cast<std::size_t>(j);
      workspace.lse_[row] = lse[x];
      workspace.delta_[row] = delta[x];
      std::int64_t visible = causal ? detail::keys_up_to(k.positions, x) : num_keys;
      if (lse[x] == negative_infinity<Acc>()) visible = 0;  // an empty row: nothing flows back
      workspace.visible_[row] = visible;
      key_limit = std::max(key_limit, visible);
    }
    if (key_limit == 0) continue;
    const auto q_tile = workspace.tile(q, q0, bq, workspace.q_buffer_);
    const auto d_out_tile = workspace.tile(d_out, q0, bq, workspace.d_out_buffer_);

    // Causal key tiles wholly in the future of every row of this query tile are never visited.
    for (std::int64_t k0 = 0; k0 < key_limit; k0 += tile) {
      const std::int64_t bk = std::min(tile, key_limit - k0);
      const auto k_tile = workspace.tile(k, k0, bk, workspace.k_buffer_);
      const auto v_tile = workspace.tile(v, k0, bk, workspace.v_buffer_);
      auto p = workspace.probabilities_.topLeftCorner(bq, bk);
      auto ds = workspace.d_scores_.topLeftCorner(bq, bk);

      // Product 1: S = Q Kᵀ (unscaled; the scale enters the exponent below).
      p.noalias() = q_tile * k_tile.transpose();
      // Product 2: dP = dO Vᵀ (the mixing weight is applied per row below).
      ds.noalias() = d_out_tile * v_tile.transpose();

      for (std::int64_t j = 0; j < bq; ++j) {
        const auto row = static_cast<std::size_t>(j);
        const std::int64_t n = std::clamp<std::int64_t>(workspace.visible_[row] - k0, 0, bk);
        auto p_row = p.row(j);
        // P = exp(scale * S - LSE) on the visible keys, 0 on the rest.
        if (n > 0)
          static_cast<void>(detail::exp_shifted_sum(p_row.data(), n, scale, workspace.lse_[row]));
        p_row.tail(bk - n).setZero();
        // dS = scale * P ∘ (weight * dP - D); zero wherever P is.
        ds.row(j).array() = (scale * p_row.array()) *
                            (weight * ds.row(j).array() - workspace.delta_[row]);
      }

      if (d_v.data != nullptr) {
        Map d_v_tile(d_v.data + k0 * d_v.row_stride, bk, head_dim, Eigen::OuterStride<>(d_v.row_stride));
        // Product 3: dV += weight * Pᵀ dO.
        d_v_tile.noalias() += weight * (p.transpose() * d_out_tile);
      }
      if (d_k.data != nullptr) {
        Map d_k_tile(d_k.data + k0 * d_k.row_stride, bk, head_dim, Eigen::OuterStride<>(d_k.row_stride));
        // Product 4: dK += dSᵀ Q.
        d_k_tile.noalias() += ds.transpose() * q_tile;
      }
      if (d_q.data != nullptr) {
        Map d_q_tile(d_q.data + q0 * d_q.row_stride, bq, head_dim, Eigen::OuterStride<>(d_q.row_stride));
        // Product 5: dQ += dS K.
        d_q_tile.noalias() += ds * k_tile;
      }
    }
  }
}

// The row statistics that mean mixing needs and the forward does not return (docs/semantics.md
// §7.2): for each query row of q over k/v's rows, LSE = ln sum_y exp(scale * q·k_y) and
// D = weight * dO·O with O = sum_y exp(scale * q·k_y - LSE) v_y, written to lse[x] and delta[x]
// for the query at position x (-inf and 0 for a row that attends nothing). D is accumulated as
// sum_y p_y (dO·v_y) in an online softmax, so O itself is never formed: the cost is the forward's
// (Products 1 and 2 per tile pair instead of Q Kᵀ and P V), on the same stack-bounded tiles.
template <class T, class Acc>
void attend_statistics(AttendGradWorkspace<Acc>& workspace, const StridedRows<T>& q,
                       const StridedRows<T>& k, const StridedRows<T>& v,
                       const StridedRows<T>& d_out, std::int64_t head_dim, Acc scale, Acc weight,
                       bool causal, Acc* lse, Acc* delta) {
  static_assert(std::is_same_v<Acc, accumulator_t<T>>,
                "attend_statistics: Acc must be accumulator_t<T>");
  if (head_dim != workspace.head_dim())
    throw std::invalid_argument(
        "dilated_attention::cpu::attend_statistics: head_dim differs from the workspace's");
  if (k.positions.count != v.positions.count || q.positions.count != d_out.positions.count)
    throw std::invalid_argument(
        "dilated_attention::cpu::attend_statistics: k and v (or q and d_out) have different row "
        "counts");
  const std::int64_t num_queries = std::max<std::int64_t>(q.positions.count, 0);
  const std::int64_t num_keys = std::max<std::int64_t>(k.positions.count, 0);
  const std::int64_t tile = workspace.tile_rows();

  for (std::int64_t q0 = 0; q0 < num_queries; q0 += tile) {
    const std::int64_t bq = std::min(tile, num_queries - q0);
    std::int64_t key_limit = 0;
    for (std::int64_t j = 0; j < bq; ++j) {
      const auto row = static_cast<std::size_t>(j);
      const std::int64_t visible =
          causal ? detail::keys_up_to(k.positions, q.positions.at(q0 + j)) : num_keys;
      workspace.visible_[row] = visible;
      workspace.state_[row] = OnlineSoftmax<Acc>{};
      workspace.delta_[row] = Acc(0);  // running sum of p_y (dO·v_y), rescaled with the state
      key_limit = std::max(key_limit, visible);
    }
    const auto q_tile = workspace.tile(q, q0, bq, workspace.q_buffer_);
    const auto d_out_tile = workspace.tile(d_out, q0, bq, workspace.d_out_buffer_);

    for (std::int64_t k0 = 0; k0 < key_limit; k0 += tile) {
      const std::int64_t bk = std::min(tile, key_limit - k0);
      const auto k_tile = workspace.tile(k, k0, bk, workspace.k_buffer_);
      const auto v_tile = workspace.tile(v, k0, bk, workspace.v_buffer_);
      auto p = workspace.probabilities_.topLeftCorner(bq, bk);
      auto dp = workspace.d_scores_.topLeftCorner(bq, bk);

      // Product 1: S = Q Kᵀ.
      p.noalias() = q_tile * k_tile.transpose();
      // Product 2: dP = dO Vᵀ.
      dp.noalias() = d_out_tile * v_tile.transpose();

      for (std::int64_t j = 0; j < bq; ++j) {
        const auto row = static_cast<std::size_t>(j);
        const std::int64_t n = std::clamp<std::int64_t>(workspace.visible_[row] - k0, 0, bk);
        if (n == 0) continue;
        auto p_row = p.row(j);
        OnlineSoftmax<Acc>& state = workspace.state_[row];
        const Acc extreme = scale >= Acc(0) ? p_row.head(n).maxCoeff() : p_row.head(n).minCoeff();
        const Acc factor = state.rescale(scale * extreme);
        state.sum += detail::exp_shifted_sum(p_row.data(), n, scale, state.max);
        workspace.delta_[row] = workspace.delta_[row] * factor +
                                p_row.head(n).dot(dp.row(j).head(n));
      }
    }

    for (std::int64_t j = 0; j < bq; ++j) {
      const auto row = static_cast<std::size_t>(j);
      const OnlineSoftmax<Acc>& state = workspace.state_[row];
      const std::int64_t x = q.positions.at(q0 + j);
      lse[x] = state.lse();
      delta[x] = weight * workspace.delta_[row] * state.inverse_sum();
    }
  }
}

}  // namespace dilated_attention::cpu
