#pragma once
// A brute-force dilated attention for tests: docs/semantics.md "The forward"-3 re-derived with plain loops over every
// (query, key) pair, in double. It deliberately shares no code with pattern.hpp or reference.hpp
// (only the contract's types from config.hpp), so that a slip in the library's index algebra
// cannot hide behind the same slip here. Slow on purpose: O(batch * heads * N^2 * G).
//
// Usage, with Tensor from tensors.hpp:
//   DenseResult want = dense_oracle(config, shape, q, k, v);      // q, k, v: Tensor<T> or View
//   EXPECT_LE(max_abs_diff(got, want.out), 1e-12);
//   EXPECT_LE(max_lse_diff(got_lse, want.lse), 1e-12);
// and, for hand-made masks, weighted_attention(shape, scale, q, k, v, weight) with any
// weight(h, x, y) >= 0 (a multiplicity: 0 hides the key, 2 counts it twice).

#include <dilated_attention/config.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "support/tensors.hpp"

namespace dilated_attention::testing {

// o_i(h) of docs/semantics.md "Which offset a head uses", written from the text; -1 when head h does not run branch i (partitioned).
inline std::int64_t oracle_offset(const Config& config, std::int64_t num_heads, std::size_t i,
                                  std::int64_t h) {
  const std::int64_t r = config.dilation_rates[i];
  const std::int64_t branches = static_cast<std::int64_t>(config.segment_lengths.size());
  switch (config.offsets) {
    case OffsetRule::modular: return h % r;
    case OffsetRule::blocked: {
      const std::int64_t heads_per_offset = (num_heads + r - 1) / r;  // ceil(H / r)
      return h / heads_per_offset;
    }
    case OffsetRule::partitioned: {
      // Walk the groups: group g holds floor(H/G) + (g < H mod G) heads, in order.
      std::int64_t begin = 0;
      for (std::int64_t g = 0; g < branches; ++g) {
        const std::int64_t size = num_heads / branches + (g < num_heads % branches ? 1 : 0);
        if (h >= begin && h < begin + size)
          return g == static_cast<std::int64_t>(i) ? g % r : -1;
        begin += size;
      }
      return -1;
    }
  }
  return -1;
}

// Whether x is in Sel_i(h).
inline bool oracle_selected(const Config& config, std::int64_t num_heads, std::size_t i,
                            std::int64_t h, std::int64_t x) {
  const std::int64_t w = config.segment_lengths[i], r = config.dilation_rates[i];
  const std::int64_t offset = oracle_offset(config, num_heads, i, h);
  if (offset < 0) return false;
  const std::int64_t sigma = x / w;
  const std::int64_t rho = x - sigma * w;
  return rho % r == offset;
}

// Whether y is in K_i(x, h).
inline bool oracle_attends(const Config& config, std::int64_t num_heads, std::size_t i,
                           std::int64_t h, std::int64_t x, std::int64_t y) {
  const std::int64_t w = config.segment_lengths[i];
  if (config.causal && y > x) return false;
  if (x / w != y / w) return false;
  return oracle_selected(config, num_heads, i, h, x) && oracle_selected(config, num_heads, i, h, y);
}

// C_h(x, y) for head h as a row-major seq_len x seq_len matrix. The same test as
// oracle_attends, with Sel_i(h) tabulated once per branch so that big problems stay affordable.
inline std::vector<int> count_matrix(const Config& config, const Shape& shape, std::int64_t h) {
  const std::int64_t n = shape.seq_len;
  std::vector<int> counts(static_cast<std::size_t>(n * n), 0);
  std::vector<char> selected(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < config.segment_lengths.size(); ++i) {
    const std::int64_t w = config.segment_lengths[i];
    for (std::int64_t x = 0; x < n; ++x)
      selected[static_cast<std::size_t>(x)] = oracle_selected(config, shape.num_heads, i, h, x);
    for (std::int64_t x = 0; x < n; ++x) {
      if (!selected[static_cast<std::size_t>(x)]) continue;
      for (std::int64_t y = 0; y < n; ++y)
        if (selected[static_cast<std::size_t>(y)] && x / w == y / w && !(config.causal && y > x))
          ++counts[static_cast<std::size_t>(x * n + y)];
    }
  }
  return counts;
}

// O [batch, seq, heads, head_dim] (dense) and LSE [batch, heads, seq], both in double.
struct DenseResult {
  Tensor<double> out;
  std::vector<double> lse;
  double& lse_at(const Shape& shape, std::int64_t b, std::int64_t h, std::int64_t x) {
    return lse[static_cast<std::size_t>((b * shape.num_heads + h) * shape.seq_len + x)];
  }
};

namespace oracle_detail {

template <class T>
const T* row(const View<const T>& view, std::int64_t b, std::int64_t x, std::int64_t h) {
  return view.data + b * view.batch_stride + x * view.seq_stride + h * view.head_stride;
}

template <class T>
double score(const View<const T>& q, const View<const T>& k, const Shape& shape, double scale,
             std::int64_t b, std::int64_t h, std::int64_t kv_head, std::int64_t x, std::int64_t y) {
  const T* qx = row(q, b, x, h);
  const T* ky = row(k, b, y, kv_head);
  double dot = 0.0;
  for (std::int64_t d = 0; d < shape.head_dim; ++d)
    dot += static_cast<double>(qx[d]) * static_cast<double>(ky[d]);
  return scale * dot;
}

// One row: softmax over the keys with weight(y) > 0, weighted by weight(y). Writes o (head_dim)
// and returns the LSE; an empty row gives o = 0, LSE = -inf.
template <class T, class Weight>
double softmax_row(const View<const T>& q, const View<const T>& k, const View<const T>& v,
                   const Shape& shape, double scale, std::int64_t b, std::int64_t h,
                   std::int64_t x, const Weight& weight, double* o) {
  const double inf = std::numeric_limits<double>::infinity();
  const std::int64_t kv_head = h / (shape.num_heads / shape.num_kv_heads);
  const std::int64_t n = shape.seq_len;
  std::vector<double> s(static_cast<std::size_t>(n), -inf);
  double max_score = -inf;
  for (std::int64_t y = 0; y < n; ++y)
    if (weight(y) > 0) {
      s[static_cast<std::size_t>(y)] = score(q, k, shape, scale, b, h, kv_head, x, y);
      if (s[static_cast<std::size_t>(y)] > max_score) max_score = s[static_cast<std::size_t>(y)];
    }
  for (std::int64_t d = 0; d < shape.head_dim; ++d) o[d] = 0.0;
  if (max_score == -inf) return -inf;
  double sum = 0.0;
  for (std::int64_t y = 0; y < n; ++y) {
    const double c = static_cast<double>(weight(y));
    if (!(c > 0)) continue;
    const double p = c * std::exp(s[static_cast<std::size_t>(y)] - max_score);
    sum += p;
    const T* vy = row(v, b, y, kv_head);
    for (std::int64_t d = 0; d < shape.head_dim; ++d) o[d] += p * static_cast<double>(vy[d]);
  }
  for (std::int64_t d = 0; d < shape.head_dim; ++d) o[d] /= sum;
  return max_score + std::log(sum);
}

}  // namespace oracle_detail

// softmax(S + ln W) V per (batch, head, query), with W = weight(h, x, y) >= 0 any multiplicity.
// q, k, v may be View<T> or View<const T>.
template <class T, class Weight>
DenseResult weighted_attention(const Shape& shape, double scale, View<T> q_in, View<T> k_in,
                               View<T> v_in, const Weight& weight) {
  using U = std::remove_const_t<T>;
  const View<const U> q = q_in, k = k_in, v = v_in;
  DenseResult result{Tensor<double>(shape, shape.num_heads),
                     std::vector<double>(static_cast<std::size_t>(shape.batch * shape.num_heads *
                                                                  shape.seq_len))};
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t h = 0; h < shape.num_heads; ++h)
      for (std::int64_t x = 0; x < shape.seq_len; ++x)
        result.lse_at(shape, b, h, x) = oracle_detail::softmax_row(
            q, k, v, shape, scale, b, h, x, [&](std::int64_t y) { return weight(h, x, y); },
            &result.out.at(b, x, h, 0));
  return result;
}

template <class T, class Weight>
DenseResult weighted_attention(const Shape& shape, double scale, const Tensor<T>& q,
                               const Tensor<T>& k, const Tensor<T>& v, const Weight& weight) {
  return weighted_attention(shape, scale, q.view(), k.view(), v.view(), weight);
}

// The scale a config asks for (docs/semantics.md "Tensors and scores"), derived here rather than borrowed from the library.
inline double oracle_scale(const Config& config, const Shape& shape) {
  return config.scale != 0.0 ? config.scale : 1.0 / std::sqrt(static_cast<double>(shape.head_dim));
}

// Dilated attention as docs/semantics.md "The forward" defines it, both mixings. q, k, v may be View<T> or View<const T>.
template <class T>
DenseResult dense_oracle(const Config& config, const Shape& shape, View<T> q_in, View<T> k_in,
                         View<T> v_in) {
  using U = std::remove_const_t<T>;
  const View<const U> q = q_in, k = k_in, v = v_in;
  const double scale = oracle_scale(config, shape);
  const std::int64_t n = shape.seq_len;
  // C_h for every head, computed once from the formulas.
  std::vector<std::vector<int>> counts;
  for (std::int64_t h = 0; h < shape.num_heads; ++h) counts.push_back(count_matrix(config, shape, h));
  DenseResult result =
      weighted_attention(shape, scale, q, k, v, [&](std::int64_t h, std::int64_t x, std::int64_t y) {
        return counts[static_cast<std::size_t>(h)][static_cast<std::size_t>(x * n + y)];
      });
  if (config.mixing == Mixing::softmax) return result;

  // Mean: O = (1/G) * sum over branches that select x of plain softmax over that branch's keys.
  const std::size_t branches = config.segment_lengths.size();
  std::vector<double> o(static_cast<std::size_t>(shape.head_dim));
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t h = 0; h < shape.num_heads; ++h)
      for (std::int64_t x = 0; x < n; ++x) {
        double* out = &result.out.at(b, x, h, 0);
        for (std::int64_t d = 0; d < shape.head_dim; ++d) out[d] = 0.0;
        for (std::size_t i = 0; i < branches; ++i) {
          if (!oracle_selected(config, shape.num_heads, i, h, x)) continue;
          oracle_detail::softmax_row(
              q, k, v, shape, scale, b, h, x,
              [&](std::int64_t y) { return oracle_attends(config, shape.num_heads, i, h, x, y) ? 1 : 0; },
              o.data());
          for (std::int64_t d = 0; d < shape.head_dim; ++d)
            out[d] += o[static_cast<std::size_t>(d)] / static_cast<double>(branches);
        }
      }
  return result;
}

template <class T>
DenseResult dense_oracle(const Config& config, const Shape& shape, const Tensor<T>& q,
                         const Tensor<T>& k, const Tensor<T>& v) {
  return dense_oracle(config, shape, q.view(), k.view(), v.view());
}

}  // namespace dilated_attention::testing
