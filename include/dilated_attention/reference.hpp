#pragma once
// The oracle: docs/semantics.md "The forward" (forward) and docs/semantics.md "The gradient" (gradient) computed as written, in double,
// one query row at a time, with the multiplicity C_h(x, y) counted from the key sets K_i(x, h)
// that the pattern gives each branch. Slow on purpose and public on purpose: users check their
// own integrations against it, and every other test in this repository uses it as the ground
// truth; reference::backward itself is checked against finite differences of forward.

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <vector>

#include "arguments.hpp"
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

// One query row x of head h: its scores s(x, y) and multiplicities C_h(x, y) over the window of
// positions that x's segments cover (C is zero outside it), built branch by branch as
// docs/semantics.md "The forward" defines them. Forward and backward both start from this.
class RowScores {
 public:
  template <class T>
  void build(const Pattern& pattern, std::int64_t head, std::int64_t x, const T* qx,
             const T* k_head, std::int64_t k_seq_stride, double scale) {
    lo_ = x;
    hi_ = x + 1;
    for (std::int64_t i = 0; i < pattern.num_branches(); ++i) {
      const BranchGeometry g = pattern.branch(i);
      const std::int64_t s = g.segment_of(x);
      lo_ = std::min(lo_, g.segment_begin(s));
      hi_ = std::max(hi_, g.segment_begin(s) + g.segment_length(s));
    }
    if (pattern.config().causal) hi_ = x + 1;
    counts_.assign(static_cast<std::size_t>(hi_ - lo_), 0.0);
    scores_.assign(static_cast<std::size_t>(hi_ - lo_), 0.0);
    // Each branch adds 1 to the keys it gives x.
    for (std::int64_t i = 0; i < pattern.num_branches(); ++i) {
      const Progression keys = pattern.keys(i, head, x);
      for (std::int64_t j = 0; j < keys.count; ++j) counts_[at(keys.at(j))] += 1.0;
    }
    max_ = -std::numeric_limits<double>::infinity();
    for (std::int64_t y = lo_; y < hi_; ++y) {
      if (counts_[at(y)] == 0.0) continue;
      const double s = scale * dot(qx, k_head + y * k_seq_stride, pattern.shape().head_dim);
      scores_[at(y)] = s;
      max_ = std::max(max_, s);
    }
  }

  double count(std::int64_t y) const { return counts_[at(y)]; }
  double score(std::int64_t y) const { return scores_[at(y)]; }
  double max() const { return max_; }
  // Calls visit(y) for every key with C > 0, in increasing position.
  template <class Visit>
  void for_each_key(Visit&& visit) const {
    for (std::int64_t y = lo_; y < hi_; ++y)
      if (counts_[at(y)] != 0.0) visit(y);
  }
  // LSE of the softmax mixing: ln sum_y C exp(s); -inf for a row with no key.
  double lse() const {
    if (max_ == -std::numeric_limits<double>::infinity()) return max_;
    double sum = 0.0;
    for_each_key([&](std::int64_t y) { sum += count(y) * std::exp(score(y) - max_); });
    return max_ + std::log(sum);
  }

 private:
  std::size_t at(std::int64_t y) const { return static_cast<std::size_t>(y - lo_); }
  std::int64_t lo_ = 0, hi_ = 0;
  std::vector<double> counts_, scores_;
  double max_ = 0.0;
};

}  // namespace detail

// Same groups and meaning as dilated_attention::forward (docs/semantics.md "Entry points"), but
// no options: the oracle is single-threaded and has no kernels to choose. T is any floating type
// that converts to and from double (float, double, half types); outputs.lse is optional.
// Synchronous.
template <class T>
void forward(const Config& config, const Shape& shape,
             const Inputs<dilated_attention::detail::identity_t<T>>& inputs,
             const Outputs<T>& outputs) {
  const View<const T> q = inputs.q, k = inputs.k, v = inputs.v;
  const View<T> out = outputs.out;
  lse_type_t<T>* const lse = outputs.lse;
  validate(config, shape, q, k, v, out, lse);
  const Pattern pattern(config, shape);
  const double scale = resolved_scale(config, shape);
  const std::int64_t n = shape.seq_len, dim = shape.head_dim, branches = pattern.num_branches();
  const double inf = std::numeric_limits<double>::infinity();

  std::vector<double> accumulator(static_cast<std::size_t>(dim)), row(static_cast<std::size_t>(dim));
  detail::RowScores scores;
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t h = 0; h < shape.num_heads; ++h) {
      const std::int64_t kvh = pattern.kv_head(h);
      const T* k_head = k.data + b * k.batch_stride + kvh * k.head_stride;
      const T* v_head = v.data + b * v.batch_stride + kvh * v.head_stride;
      for (std::int64_t x = 0; x < n; ++x) {
        const T* qx = q.data + b * q.batch_stride + x * q.seq_stride + h * q.head_stride;
        scores.build(pattern, h, x, qx, k_head, k.seq_stride, scale);
        auto add_value = [&](std::int64_t y, double p) {
          const T* vy = v_head + y * v.seq_stride;
          for (std::int64_t d = 0; d < dim; ++d)
            accumulator[static_cast<std::size_t>(d)] += p * static_cast<double>(vy[d]);
        };

        // Softmax over the multiset union: weight C * exp(s - max).
        const double max_score = scores.max();
        double sum = 0.0;
        std::fill(accumulator.begin(), accumulator.end(), 0.0);
        if (max_score > -inf)
          scores.for_each_key([&](std::int64_t y) {
            const double p = scores.count(y) * std::exp(scores.score(y) - max_score);
            sum += p;
            add_value(y, p);
          });
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
              branch_max = std::max(branch_max, scores.score(keys.at(j)));
            double branch_sum = 0.0;
            std::fill(accumulator.begin(), accumulator.end(), 0.0);
            for (std::int64_t j = 0; j < keys.count; ++j) {
              const double p = std::exp(scores.score(keys.at(j)) - branch_max);
              branch_sum += p;
              add_value(keys.at(j), p);
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

// The gradient of docs/semantics.md "The gradient", computed as written, in double, one query row at a
// time: the row's scores and its multiplicities are rebuilt exactly as forward builds them, and
// every (query, key) pair adds its terms to dQ, dK, dV. `out` and `lse` are checked like every
// other input but not read: the oracle recomputes O and LSE in double, so that its gradient is
// exact even when the caller's copies were rounded to float. Same groups as
// dilated_attention::backward, no options; T as for reference::forward. Synchronous.
template <class T>
void backward(const Config& config, const Shape& shape,
              const Inputs<dilated_attention::detail::identity_t<T>>& inputs,
              const Outputs<const dilated_attention::detail::identity_t<T>>& forward_outputs,
              View<const dilated_attention::detail::identity_t<T>> d_out,
              const Gradients<T>& gradients) {
  const View<const T> q = inputs.q, k = inputs.k, v = inputs.v, out = forward_outputs.out;
  const lse_type_t<T>* const lse = forward_outputs.lse;
  const View<T> d_q = gradients.d_q, d_k = gradients.d_k, d_v = gradients.d_v;
  validate_backward(config, shape, q, k, v, out, lse, d_out, d_q, d_k, d_v);
  const Pattern pattern(config, shape);
  const double scale = resolved_scale(config, shape);
  const std::int64_t n = shape.seq_len, dim = shape.head_dim, branches = pattern.num_branches();
  const auto udim = static_cast<std::size_t>(dim);

  // dK and dV sum over every query that attends a key, from every head of its GQA group, so
  // they accumulate here and are written once at the end.
  const auto kv_elements = static_cast<std::size_t>(shape.batch * n * shape.num_kv_heads * dim);
  std::vector<double> grad_k(kv_elements, 0.0), grad_v(kv_elements, 0.0);
  auto kv_index = [&](std::int64_t b, std::int64_t y, std::int64_t kvh) {
    return static_cast<std::size_t>(((b * n + y) * shape.num_kv_heads + kvh) * dim);
  };

  std::vector<double> q_row(udim), grad_out(udim), grad_q(udim), o_row(udim), grad_o_branch(udim);
  detail::RowScores row;
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t h = 0; h < shape.num_heads; ++h) {
      const std::int64_t kvh = pattern.kv_head(h);
      const T* k_head = k.data + b * k.batch_stride + kvh * k.head_stride;
      const T* v_head = v.data + b * v.batch_stride + kvh * v.head_stride;
      for (std::int64_t x = 0; x < n; ++x) {
        const T* qx = q.data + b * q.batch_stride + x * q.seq_stride + h * q.head_stride;
        const T* dox = d_out.data + b * d_out.batch_stride + x * d_out.seq_stride +
                       h * d_out.head_stride;
        for (std::size_t d = 0; d < udim; ++d) {
          q_row[d] = static_cast<double>(qx[d]);
          grad_out[d] = static_cast<double>(dox[d]);
        }
        std::fill(grad_q.begin(), grad_q.end(), 0.0);
        row.build(pattern, h, x, qx, k_head, k.seq_stride, scale);

        // One softmax (weights p over `keys`) and the upstream gradient g of its output: adds
        // dV += p g, dS = p (g.v - g.o), dQ += scale dS k, dK += scale dS q (docs/semantics.md
        // docs/semantics.md "Gradient of the softmax mixing"). `weight(y)` is p(y); `keys` lists each key once.
        auto add_softmax_gradient = [&](auto&& keys, auto&& weight, const std::vector<double>& g) {
          std::fill(o_row.begin(), o_row.end(), 0.0);
          keys([&](std::int64_t y) {
            const T* vy = v_head + y * v.seq_stride;
            const double p = weight(y);
            for (std::size_t d = 0; d < udim; ++d) o_row[d] += p * static_cast<double>(vy[d]);
          });
          double g_dot_o = 0.0;
          for (std::size_t d = 0; d < udim; ++d) g_dot_o += g[d] * o_row[d];
          keys([&](std::int64_t y) {
            const T* ky = k_head + y * k.seq_stride;
            const T* vy = v_head + y * v.seq_stride;
            const double p = weight(y);
            double g_dot_v = 0.0;
            for (std::size_t d = 0; d < udim; ++d) g_dot_v += g[d] * static_cast<double>(vy[d]);
            const double ds = p * (g_dot_v - g_dot_o);
            const std::size_t at = kv_index(b, y, kvh);
            for (std::size_t d = 0; d < udim; ++d) {
              grad_q[d] += scale * ds * static_cast<double>(ky[d]);
              grad_k[at + d] += scale * ds * q_row[d];
              grad_v[at + d] += p * g[d];
            }
          });
        };

        if (config.mixing == Mixing::softmax) {
          const double row_lse = row.lse();
          if (row_lse > -std::numeric_limits<double>::infinity()) {
            // P(x, y) = C(x, y) exp(s - LSE): the multiplicity is part of the probability.
            add_softmax_gradient([&](auto&& visit) { row.for_each_key(visit); },
                                 [&](std::int64_t y) {
                                   return row.count(y) * std::exp(row.score(y) - row_lse);
                                 },
                                 grad_out);
          }
        } else {
          // Mean: branch i's own softmax receives dO / G (docs/semantics.md "Gradient of the mean mixing").
          for (std::size_t d = 0; d < udim; ++d)
            grad_o_branch[d] = grad_out[d] / static_cast<double>(branches);
          for (std::int64_t i = 0; i < branches; ++i) {
            const Progression keys = pattern.keys(i, h, x);
            if (keys.empty()) continue;
            double branch_max = -std::numeric_limits<double>::infinity();
            for (std::int64_t j = 0; j < keys.count; ++j)
              branch_max = std::max(branch_max, row.score(keys.at(j)));
            double branch_sum = 0.0;
            for (std::int64_t j = 0; j < keys.count; ++j)
              branch_sum += std::exp(row.score(keys.at(j)) - branch_max);
            const double branch_lse = branch_max + std::log(branch_sum);
            add_softmax_gradient(
                [&](auto&& visit) {
                  for (std::int64_t j = 0; j < keys.count; ++j) visit(keys.at(j));
                },
                [&](std::int64_t y) { return std::exp(row.score(y) - branch_lse); },
                grad_o_branch);
          }
        }

        T* dqx = d_q.data + b * d_q.batch_stride + x * d_q.seq_stride + h * d_q.head_stride;
        for (std::size_t d = 0; d < udim; ++d) dqx[d] = static_cast<T>(grad_q[d]);
      }
    }

  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t y = 0; y < n; ++y)
      for (std::int64_t kvh = 0; kvh < shape.num_kv_heads; ++kvh) {
        const std::size_t at = kv_index(b, y, kvh);
        T* dky = d_k.data + b * d_k.batch_stride + y * d_k.seq_stride + kvh * d_k.head_stride;
        T* dvy = d_v.data + b * d_v.batch_stride + y * d_v.seq_stride + kvh * d_v.head_stride;
        for (std::size_t d = 0; d < udim; ++d) {
          dky[d] = static_cast<T>(grad_k[at + d]);
          dvy[d] = static_cast<T>(grad_v[at + d]);
        }
      }
}

// Deprecated in 0.1.0, removed in 0.2.0: the positional spellings, forwarding to the calls above.
template <class T>
[[deprecated(
    "use reference::forward<T>(config, shape, {q, k, v}, {out, lse}); removed in 0.2.0")]] void
forward(const Config& config, const Shape& shape,
        View<const dilated_attention::detail::identity_t<T>> q,
        View<const dilated_attention::detail::identity_t<T>> k,
        View<const dilated_attention::detail::identity_t<T>> v, View<T> out,
        lse_type_t<T>* lse = nullptr) {
  reference::forward<T>(config, shape, Inputs<T>{q, k, v}, Outputs<T>{out, lse});
}

template <class T>
[[deprecated(
    "use reference::backward<T>(config, shape, {q, k, v}, {out, lse}, d_out, "
    "{d_q, d_k, d_v}); removed in 0.2.0")]] void
backward(const Config& config, const Shape& shape,
         View<const dilated_attention::detail::identity_t<T>> q,
         View<const dilated_attention::detail::identity_t<T>> k,
         View<const dilated_attention::detail::identity_t<T>> v,
         View<const dilated_attention::detail::identity_t<T>> out,
         const lse_type_t<dilated_attention::detail::identity_t<T>>* lse,
         View<const dilated_attention::detail::identity_t<T>> d_out, View<T> d_q, View<T> d_k,
         View<T> d_v) {
  reference::backward<T>(config, shape, Inputs<T>{q, k, v}, Outputs<const T>{out, lse}, d_out,
                         Gradients<T>{d_q, d_k, d_v});
}

}  // namespace reference
}  // namespace dilated_attention
