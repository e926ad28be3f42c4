#pragma once
// The oracle: docs/semantics.md §2 computed as written, in double, one query row at a time, with the
// multiplicity C_h(x, y) counted from the key sets K_i(x, h) that the pattern gives each branch.
// Slow on purpose and public on purpose: users check their own integrations against it, and
// every other test in this repository uses it as the ground truth.

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <vector>

#include "config.hpp"
#include "merge.hpp"
#include "pattern.hpp"

namespace dilated_attention {

namespace reference {

namespace detail {

template <class T>
double dot(const T* a, const T* b, std::int64_t n) {
  double sum = 0.0;
  for (std::int64_t d = 0; d < n; ++d) sum += static_cast<double>(a[d]) * static_cast<double>(b[d]);
  return sum;
}

}  // namespace detail

// Same parameters and meaning as dilated_attention::forward (docs/semantics.md §4). T is any floating type
// that converts to and from double (float, double, half types); lse is optional.
template <class T>
void forward(const Config& config, const Shape& shape,
             View<const dilated_attention::detail::identity_t<T>> q,
             View<const dilated_attention::detail::identity_t<T>> k,
             View<const dilated_attention::detail::identity_t<T>> v, View<T> out,
             lse_type_t<T>* lse = nullptr) {
  validate(config, shape, q, k, v, out, lse);
  const Pattern pattern(config, shape);
  const double scale = resolved_scale(config, shape);
  const std::int64_t n = shape.seq_len, dim = shape.head_dim, branches = pattern.num_branches();
  const double inf = std::numeric_limits<double>::infinity();

  std::vector<double> scores, weights, accumulator(static_cast<std::size_t>(dim));
  std::vector<double> row(static_cast<std::size_t>(dim));
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t h = 0; h < shape.num_heads; ++h) {
      const std::int64_t kvh = pattern.kv_head(h);
      const T* k_head = k.data + b * k.batch_stride + kvh * k.head_stride;
      const T* v_head = v.data + b * v.batch_stride + kvh * v.head_stride;
      for (std::int64_t x = 0; x < n; ++x) {
        const T* qx = q.data + b * q.batch_stride + x * q.seq_stride + h * q.head_stride;
        // C_h(x, y) is zero outside the union of x's segments, so only that window is scanned.
        std::int64_t lo = x, hi = x + 1;
        for (std::int64_t i = 0; i < branches; ++i) {
          const BranchGeometry g = pattern.branch(i);
          const std::int64_t s = g.segment_of(x);
          lo = std::min(lo, g.segment_begin(s));
          hi = std::max(hi, g.segment_begin(s) + g.segment_length(s));
        }
        if (config.causal) hi = x + 1;

        // Softmax over the multiset union: weight C * exp(s - max).
        scores.assign(static_cast<std::size_t>(hi - lo), 0.0);
        weights.assign(static_cast<std::size_t>(hi - lo), 0.0);
        // C_h(x, y), built branch by branch: each branch adds 1 to the keys it gives x.
        for (std::int64_t i = 0; i < branches; ++i) {
          const Progression keys = pattern.keys(i, h, x);
          for (std::int64_t j = 0; j < keys.count; ++j)
            weights[static_cast<std::size_t>(keys.at(j) - lo)] += 1.0;
        }
        double max_score = -inf;
        for (std::int64_t y = lo; y < hi; ++y) {
          if (weights[static_cast<std::size_t>(y - lo)] == 0.0) continue;
          const double s = scale * detail::dot(qx, k_head + y * k.seq_stride, dim);
          scores[static_cast<std::size_t>(y - lo)] = s;
          max_score = std::max(max_score, s);
        }
        double sum = 0.0;
        std::fill(accumulator.begin(), accumulator.end(), 0.0);
        if (max_score > -inf)
          for (std::int64_t y = lo; y < hi; ++y) {
            const double c = weights[static_cast<std::size_t>(y - lo)];
            if (c == 0.0) continue;
            const double p = c * std::exp(scores[static_cast<std::size_t>(y - lo)] - max_score);
            sum += p;
            const T* vy = v_head + y * v.seq_stride;
            for (std::int64_t d = 0; d < dim; ++d)
              accumulator[static_cast<std::size_t>(d)] += p * static_cast<double>(vy[d]);
          }
        const double row_lse = sum > 0.0 ? max_score + std::log(sum) : -inf;

        if (config.mixing == Mixing::softmax) {
          for (std::int64_t d = 0; d < dim; ++d)
            row[static_cast<std::size_t>(d)] = sum > 0.0 ? accumulator[static_cast<std::size_t>(d)] / sum : 0.0;
        } else {
          // Mean: each branch normalised over its own keys, averaged over all G branches.
          std::fill(row.begin(), row.end(), 0.0);
          for (std::int64_t i = 0; i < branches; ++i) {
            const Progression keys = pattern.keys(i, h, x);
            if (keys.empty()) continue;
            double branch_max = -inf;
            for (std::int64_t j = 0; j < keys.count; ++j)
              branch_max = std::max(branch_max, scores[static_cast<std::size_t>(keys.at(j) - lo)]);
            double branch_sum = 0.0;
            std::fill(accumulator.begin(), accumulator.end(), 0.0);
            for (std::int64_t j = 0; j < keys.count; ++j) {
              const std::int64_t y = keys.at(j);
              const double p = std::exp(scores[static_cast<std::size_t>(y - lo)] - branch_max);
              branch_sum += p;
              const T* vy = v_head + y * v.seq_stride;
              for (std::int64_t d = 0; d < dim; ++d)
                accumulator[static_cast<std::size_t>(d)] += p * static_cast<double>(vy[d]);
            }
            for (std::int64_t d = 0; d < dim; ++d)
              row[static_cast<std::size_t>(d)] +=
                  accumulator[static_cast<std::size_t>(d)] / branch_sum / static_cast<double>(branches);
          }
        }

        T* ox = out.data + b * out.batch_stride + x * out.seq_stride + h * out.head_stride;
        for (std::int64_t d = 0; d < dim; ++d) ox[d] = static_cast<T>(row[static_cast<std::size_t>(d)]);
        if (lse != nullptr)
          lse[(b * shape.num_heads + h) * n + x] = static_cast<lse_type_t<T>>(row_lse);
      }
    }
}

}  // namespace reference
}  // namespace dilated_attention
