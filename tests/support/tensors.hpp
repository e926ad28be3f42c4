#pragma once
// Test support: owned tensors in the BNHD layout, seeded random fills, strided (non-contiguous)
// layouts, and error measures against the fp64 reference. Header-only, test code only.

#include <dilated_attention/config.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace dilated_attention::testing {

// A [batch, seq, heads, head_dim] tensor that owns its memory. `pad` extra elements after each
// head and `seq_pad` extra heads' worth after each row make the layout non-contiguous, so tests
// exercise the View strides rather than the dense layout alone.
template <class T>
struct Tensor {
  Shape shape;
  std::int64_t heads = 0;
  std::int64_t head_stride = 0, seq_stride = 0, batch_stride = 0;
  std::vector<T> storage;

  Tensor() = default;
  Tensor(const Shape& s, std::int64_t num_heads, std::int64_t pad = 0, std::int64_t seq_pad = 0)
      : shape(s), heads(num_heads) {
    head_stride = s.head_dim + pad;
    seq_stride = num_heads * head_stride + seq_pad;
    batch_stride = s.seq_len * seq_stride;
    storage.assign(static_cast<std::size_t>(s.batch * batch_stride), T(0));
  }
  T& at(std::int64_t b, std::int64_t x, std::int64_t h, std::int64_t d) {
    return storage[static_cast<std::size_t>(b * batch_stride + x * seq_stride + h * head_stride + d)];
  }
  const T& at(std::int64_t b, std::int64_t x, std::int64_t h, std::int64_t d) const {
    return storage[static_cast<std::size_t>(b * batch_stride + x * seq_stride + h * head_stride + d)];
  }
  View<T> view() { return {storage.data(), batch_stride, seq_stride, head_stride}; }
  View<const T> view() const { return {storage.data(), batch_stride, seq_stride, head_stride}; }
  // Fills every element (padding too, so that a kernel reading padding would show up).
  void fill_random(std::uint64_t seed, double stddev = 1.0) {
    std::mt19937_64 engine(seed);
    std::normal_distribution<double> normal(0.0, stddev);
    for (T& value : storage) value = static_cast<T>(normal(engine));
  }
  void fill(T value) { std::fill(storage.begin(), storage.end(), value); }
};

// Largest |a - b| over the logical elements of two tensors of the same shape.
template <class A, class B>
double max_abs_diff(const Tensor<A>& a, const Tensor<B>& b) {
  double worst = 0.0;
  for (std::int64_t i = 0; i < a.shape.batch; ++i)
    for (std::int64_t x = 0; x < a.shape.seq_len; ++x)
      for (std::int64_t h = 0; h < a.heads; ++h)
        for (std::int64_t d = 0; d < a.shape.head_dim; ++d) {
          const double diff = std::abs(static_cast<double>(a.at(i, x, h, d)) -
                                       static_cast<double>(b.at(i, x, h, d)));
          if (!(diff <= worst)) worst = diff;  // NaN propagates as a failure
        }
  return worst;
}

// Largest difference of two LSE arrays; equal infinities count as equal, anything else
// involving an infinity or NaN is infinitely far.
template <class A, class B>
double max_lse_diff(const std::vector<A>& a, const std::vector<B>& b) {
  double worst = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    if (std::isinf(x) || std::isinf(y)) {
      if (!(x == y)) return std::numeric_limits<double>::infinity();
      continue;
    }
    const double diff = std::abs(x - y);
    if (!(diff <= worst)) worst = diff;
  }
  return worst;
}

// Elements of an LSE array [batch, num_heads, seq_len].
inline std::size_t lse_size(const Shape& shape) {
  return static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len);
}

// A tensor of `heads` heads filled by fill_random(seed); pads as in the Tensor constructor.
template <class T>
Tensor<T> random_tensor(const Shape& shape, std::int64_t heads, std::uint64_t seed,
                        std::int64_t pad = 0, std::int64_t seq_pad = 0) {
  Tensor<T> tensor(shape, heads, pad, seq_pad);
  tensor.fill_random(seed);
  return tensor;
}

// Q [.., num_heads, ..] and K, V [.., num_kv_heads, ..], seeded from one number.
template <class T>
struct Inputs {
  Tensor<T> q, k, v;
};
template <class T>
Inputs<T> random_inputs(const Shape& shape, std::uint64_t seed, std::int64_t pad = 0,
                        std::int64_t seq_pad = 0) {
  return {random_tensor<T>(shape, shape.num_heads, seed, pad, seq_pad),
          random_tensor<T>(shape, shape.num_kv_heads, seed + 1, pad, seq_pad),
          random_tensor<T>(shape, shape.num_kv_heads, seed + 2, pad, seq_pad)};
}

// Whether the logical elements of two tensors are bitwise equal (determinism checks); padding
// is ignored. NaNs with the same payload count as equal, +0 and -0 do not.
template <class T>
bool bitwise_equal(const Tensor<T>& a, const Tensor<T>& b) {
  if (a.shape.batch != b.shape.batch || a.shape.seq_len != b.shape.seq_len ||
      a.heads != b.heads || a.shape.head_dim != b.shape.head_dim)
    return false;
  for (std::int64_t i = 0; i < a.shape.batch; ++i)
    for (std::int64_t x = 0; x < a.shape.seq_len; ++x)
      for (std::int64_t h = 0; h < a.heads; ++h)
        if (std::memcmp(&a.at(i, x, h, 0), &b.at(i, x, h, 0),
                        static_cast<std::size_t>(a.shape.head_dim) * sizeof(T)) != 0)
          return false;
  return true;
}
template <class T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// The logical elements of `from` widened into `to` (same shape and heads; padding untouched),
// so the fp64 reference sees exactly the values the kernel under test was given.
template <class T>
void copy_to_double(const Tensor<T>& from, Tensor<double>& to) {
  for (std::int64_t b = 0; b < from.shape.batch; ++b)
    for (std::int64_t x = 0; x < from.shape.seq_len; ++x)
      for (std::int64_t h = 0; h < from.heads; ++h)
        for (std::int64_t d = 0; d < from.shape.head_dim; ++d)
          to.at(b, x, h, d) = static_cast<double>(from.at(b, x, h, d));
}

}  // namespace dilated_attention::testing
