#pragma once
// The row statistics that mean mixing needs and the forward does not return for a head with rows
// in several branches (docs/semantics.md "Gradient of the mean mixing"), on the backward
// primitive's workspace and micro-kernels (attend_backward.hpp): for each query row of q over
// k/v's rows, LSE = ln sum_y exp(scale * q·k_y) and D = weight * dO·O with
// O = sum_y exp(scale * q·k_y - LSE) v_y. D is accumulated as sum_y p_y (dO·v_y) in an online
// softmax, so O itself is never formed: the cost is the forward's (Products 1 and 2 per tile
// pair instead of Q Kᵀ and P V).

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "../merge.hpp"
#include "../pattern.hpp"
#include "attend.hpp"
#include "attend_backward.hpp"
#include "kernels/dispatch.hpp"
#include "kernels/pack.hpp"

namespace dilated_attention::cpu {

// attend_statistics() with kernel set K (the workspace's).
template <class K, class T, class Acc>
void attend_statistics_with(AttendBackwardWorkspace<Acc>& ws, const StridedRows<T>& q,
                            const StridedRows<T>& k, const StridedRows<T>& v,
                            const StridedRows<T>& d_out, Acc scale, Acc weight, bool causal,
                            Acc* lse, Acc* delta) {
  static_assert(std::is_same_v<typename K::value_type, Acc>, "kernel set of another type");
  const std::int64_t dim = ws.head_dim_, t = ws.tile_rows_;
  const std::int64_t num_queries = std::max<std::int64_t>(q.positions.count, 0);
  const std::int64_t num_keys = std::max<std::int64_t>(k.positions.count, 0);

  for (std::int64_t q0 = 0; q0 < num_queries; q0 += t) {
    const std::int64_t bq = std::min(t, num_queries - q0);
    const std::int64_t bqm = kernels::round_up(bq, K::rows);
    std::int64_t key_limit = 0;
    for (std::int64_t j = 0; j < bq; ++j) {
      const auto row = static_cast<std::size_t>(j);
      const std::int64_t visible =
          causal ? detail::keys_up_to(k.positions, q.positions.at(q0 + j)) : num_keys;
      ws.visible_[row] = visible;
      ws.state_[row] = OnlineSoftmax<Acc>{};
      ws.delta_[row] = Acc(0);  // running sum of p_y (dO·v_y), rescaled with the state
      key_limit = std::max(key_limit, visible);
    }
    kernels::pack_rows(q.data + q0 * q.row_stride, q.row_stride, bq, bqm, dim, ws.q_rows_.data());
    kernels::pack_rows(d_out.data + q0 * d_out.row_stride, d_out.row_stride, bq, bqm, dim,
                       ws.d_out_rows_.data());

    for (std::int64_t k0 = 0; k0 < key_limit; k0 += t) {
      const std::int64_t bk = std::min(t, key_limit - k0);
      ws.template pack_panels<K>(k, k0, bk, ws.k_panels_.data());
      ws.template pack_panels<K>(v, k0, bk, ws.v_panels_.data());
      ws.template scores<K>(bqm, 0, bk);  // Products 1 and 2: S = Q Kᵀ, dP = dO Vᵀ
      for (std::int64_t j = 0; j < bq; ++j) {
        const auto row = static_cast<std::size_t>(j);
        const std::int64_t n = std::clamp<std::int64_t>(ws.visible_[row] - k0, 0, bk);
        if (n == 0) continue;
        Acc* p_row = ws.probabilities_.data() + j * t;
        const Acc* dp_row = ws.d_scores_.data() + j * t;
        OnlineSoftmax<Acc>& state = ws.state_[row];
        const Acc factor = state.rescale(K::max_scaled(p_row, n, scale));
        state.sum += K::exp_shifted_sum(p_row, n, scale, state.max);
        Acc dot = Acc(0);
        for (std::int64_t y = 0; y < n; ++y) dot += p_row[y] * dp_row[y];
        ws.delta_[row] = ws.delta_[row] * factor + dot;
      }
    }

    for (std::int64_t j = 0; j < bq; ++j) {
      const auto row = static_cast<std::size_t>(j);
      const OnlineSoftmax<Acc>& state = ws.state_[row];
      const std::int64_t x = q.positions.at(q0 + j);
      lse[x] = state.lse();
      delta[x] = weight * ws.delta_[row] * state.inverse_sum();
    }
  }
}

// For the query at position x of each of q's rows, over k/v's rows: lse[x] = LSE and delta[x] =
// D (-inf and 0 for a row that attends nothing). Causal means key position <= query position.
// Single-threaded and deterministic for a given workspace.isa().
template <class T, class Acc>
void attend_statistics(AttendBackwardWorkspace<Acc>& workspace, const StridedRows<T>& q,
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
  kernels::with_kernels<Acc>(workspace.isa(), [&](auto kernel_set) {
    attend_statistics_with<decltype(kernel_set)>(workspace, q, k, v, d_out, scale, weight, causal,
                                                 lse, delta);
  });
}

}  // namespace dilated_attention::cpu
