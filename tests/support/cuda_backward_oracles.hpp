#pragma once
// Plain C++ oracles of the CUDA backward tests (no CUDA compiler needed), shared by the host
// emulation (cuda_emulated_backward_test.cpp) and the GPU tests (cuda_backward_test_body.cuh):
// the cases, seeded inputs together with the `out` and `lse` that forward returns for them, and
// the check of a kernel's gradients against reference::backward (docs/semantics.md "The gradient").
//
// Tolerance, per gradient tensor, relative to its largest reference element (docs/semantics.md "Guarantees of the gradient"'s form; floored
// at 1% of the largest element of all three gradients):
//   float: 1e-4 (docs/semantics.md "Guarantees of the gradient");
//   __half, __nv_bfloat16: 4 u_T (u_T = 2^-11 and 2^-8, the unit roundoff of T). The kernels
//   compute in fp32 from the same 16-bit inputs as the oracle, so their error is (a) rounding each
//   gradient to T once (<= u_T of the element) plus (b) D = dO . O computed from the forward's O
//   rounded to T, an O(u_T) relative error of D that enters dS = P (dO . v - D) linearly; 4 u_T
//   bounds both with a factor-2 margin, and is far below what a gradient that is wrong in any
//   term shows (tests/cuda/cuda_emulated_backward_test.cpp checks that a planted error fails).

#include <dilated_attention/config.hpp>
#include <dilated_attention/pattern.hpp>
#include <dilated_attention/reference.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "support/cuda_test_oracles.hpp"

namespace dilated_attention::testing {

// The inputs of one backward call: q, k, v, d_out random; out and lse as forward returns them
// (computed in double by reference::forward, rounded to T and to float).
template <class T>
struct BackwardInputs {
  Tensor<T> q, k, v, out, d_out;
  std::vector<float> lse;
};

template <class T>
BackwardInputs<T> random_backward_inputs(const Shape& shape, std::int64_t pad, std::int64_t seq_pad,
                                         const Config& config, std::uint64_t seed) {
  BackwardInputs<T> in{Tensor<T>(shape, shape.num_heads, pad, seq_pad),
                       Tensor<T>(shape, shape.num_kv_heads, pad, seq_pad),
                       Tensor<T>(shape, shape.num_kv_heads, pad, seq_pad),
                       Tensor<T>(shape, shape.num_heads, pad, seq_pad),
                       Tensor<T>(shape, shape.num_heads, pad, seq_pad),
                       {}};
  in.q.fill_random(seed);
  in.k.fill_random(seed + 1);
  in.v.fill_random(seed + 2);
  in.d_out.fill_random(seed + 3);
  const Tensor<double> q = widen(in.q), k = widen(in.k), v = widen(in.v);
  Tensor<double> out(shape, shape.num_heads);
  std::vector<double> lse(lse_size(shape));
  reference::forward<double>(config, shape, {q.view(), k.view(), v.view()},
                             {out.view(), lse.data()});
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t x = 0; x < shape.seq_len; ++x)
      for (std::int64_t h = 0; h < shape.num_heads; ++h)
        for (std::int64_t d = 0; d < shape.head_dim; ++d)
          in.out.at(b, x, h, d) = from_double<T>(out.at(b, x, h, d));
  in.lse.assign(lse.begin(), lse.end());
  return in;
}

// Gradients of one run, downloaded (or computed by the host emulation).
template <class T>
struct BackwardResult {
  Tensor<T> d_q, d_k, d_v;
};

// Gradient tensors poisoned with NaN, so that an element a kernel forgets to write cannot pass.
template <class T>
BackwardResult<T> poisoned_gradients(const Shape& shape, std::int64_t pad, std::int64_t seq_pad) {
  BackwardResult<T> result{Tensor<T>(shape, shape.num_heads, pad, seq_pad),
                           Tensor<T>(shape, shape.num_kv_heads, pad, seq_pad),
                           Tensor<T>(shape, shape.num_kv_heads, pad, seq_pad)};
  const T nan(std::numeric_limits<float>::quiet_NaN());
  result.d_q.fill(nan);
  result.d_k.fill(nan);
  result.d_v.fill(nan);
  return result;
}

template <class T>
double backward_tolerance() {
  if (std::is_same_v<T, float>) return 1e-4;
  return 4.0 * (std::is_same_v<T, __half> ? 0x1p-11 : 0x1p-8);
}

template <class T>
double max_abs(const Tensor<T>& t) {
  double worst = 0.0;
  for (std::int64_t b = 0; b < t.shape.batch; ++b)
    for (std::int64_t x = 0; x < t.shape.seq_len; ++x)
      for (std::int64_t h = 0; h < t.heads; ++h)
        for (std::int64_t d = 0; d < t.shape.head_dim; ++d)
          worst = std::max(worst, std::abs(to_double(t.at(b, x, h, d))));
  return worst;
}

template <class T>
std::size_t touched_padding(const Tensor<T>& t) {
  std::size_t touched = 0;
  for (std::int64_t b = 0; b < t.shape.batch; ++b)
    for (std::int64_t x = 0; x < t.shape.seq_len; ++x)
      for (std::int64_t h = 0; h < t.heads; ++h)
        for (std::int64_t d = t.shape.head_dim; d < t.head_stride; ++d)
          if (!std::isnan(to_double(t.at(b, x, h, d)))) ++touched;
  return touched;
}

// Compares the three gradients with reference::backward on the same (widened) inputs; returns
// the largest error / bound ratio seen (for the record and for the mutation check).
template <class T>
double check_backward_result(const Case& c, const BackwardInputs<T>& in,
                             const BackwardResult<T>& result) {
  const Shape& s = c.shape;
  const Tensor<double> q = widen(in.q), k = widen(in.k), v = widen(in.v), out = widen(in.out),
                       d_out = widen(in.d_out);
  const std::vector<double> lse(in.lse.begin(), in.lse.end());
  Tensor<double> d_q(s, s.num_heads), d_k(s, s.num_kv_heads), d_v(s, s.num_kv_heads);
  reference::backward<double>(c.config, s, {q.view(), k.view(), v.view()}, {out.view(), lse.data()},
                              d_out.view(), {d_q.view(), d_k.view(), d_v.view()});
  const double tolerance = backward_tolerance<T>();
  double worst_ratio = 0.0;
  const char* names[3] = {"d_q", "d_k", "d_v"};
  const Tensor<double>* expected[3] = {&d_q, &d_k, &d_v};
  const Tensor<T>* got[3] = {&result.d_q, &result.d_k, &result.d_v};
  const double largest = std::max({max_abs(d_q), max_abs(d_k), max_abs(d_v)});
  for (int i = 0; i < 3; ++i) {
    // Per tensor, relative to its largest element; floored at 1% of the largest gradient element
    // of the three (docs/semantics.md "Guarantees of the gradient"'s measure), which matters only for a tensor that is zero in exact
    // arithmetic (e.g. dQ of a row whose keys all carry the same score) but not in fp32.
    const double bound = tolerance * std::max(max_abs(*expected[i]), 0.01 * largest);
    const double error = max_abs_diff(*got[i], *expected[i]);
    EXPECT_LE(error, bound) << names[i] << ": error " << error << ", bound " << bound
                            << " (largest reference element " << max_abs(*expected[i]) << ")";
    if (bound > 0)
      worst_ratio = std::max(worst_ratio, error / bound);
    else if (error > 0)
      worst_ratio = std::numeric_limits<double>::infinity();
    EXPECT_EQ(touched_padding(*got[i]), 0u) << names[i] << ": the kernel wrote into padding";
  }
  return worst_ratio;
}

// The backward cases: every rule, both mixings, causal, GQA, multiplicity (a branch listed twice,
// overlapping branches), rows no branch selects, strided layouts; small enough for the emulation
// (one warp per row, every shuffle a fiber barrier).
inline std::vector<Case> backward_cases(std::int64_t head_dim) {
  const auto shape = [head_dim](std::int64_t b, std::int64_t n, std::int64_t h, std::int64_t hkv) {
    return Shape{b, n, h, hkv, head_dim};
  };
  using R = OffsetRule;
  using M = Mixing;
  std::vector<Case> cases = {
      {"dense", make_config({64}, {1}), shape(1, 40, 2, 2)},
      {"dense causal, several segments", make_config({24}, {1}, true), shape(2, 50, 2, 1)},
      {"dilated r not dividing w, causal", make_config({20}, {3}, true), shape(1, 45, 3, 3)},
      {"three branches softmax causal", make_config({8, 16, 32}, {1, 2, 4}, true),
       shape(1, 48, 4, 4)},
      {"overlapping branches (multiplicity)", make_config({16, 16, 32}, {1, 2, 2}),
       shape(1, 40, 2, 2)},
      {"modular mean", make_config({12, 30}, {1, 3}, false, R::modular, M::mean),
       shape(1, 45, 3, 3)},
      {"blocked mean causal", make_config({16, 32}, {2, 4}, true, R::blocked, M::mean),
       shape(1, 40, 5, 5)},
      {"partitioned mean", make_config({8, 16, 32}, {1, 2, 4}, false, R::partitioned, M::mean),
       shape(1, 40, 4, 4)},
      {"partitioned mean causal GQA 5:1, H not a multiple of G",
       make_config({8, 16, 32}, {1, 2, 4}, true, R::partitioned, M::mean), shape(1, 37, 5, 1)},
      {"partitioned softmax causal (empty rows)",
       make_config({16, 32}, {2, 4}, true, R::partitioned), shape(1, 40, 3, 3)},
      {"GQA 4:2 mean causal", make_config({16, 32}, {1, 2}, true, R::modular, M::mean),
       shape(1, 36, 4, 2)},
      {"GQA 6:2 softmax", make_config({16, 48}, {2, 3}), shape(1, 30, 6, 2)},
      {"single position", make_config({4, 8}, {1, 2}, true), shape(2, 1, 2, 1)},
  };
  Case padded{"padded layout", make_config({10, 20}, {1, 2}, true), shape(2, 30, 2, 2), 3, 5};
  cases.push_back(padded);
  // The tensor-core dQ kernel's windows: several key tiles per block, and windows of stride
  // R = 2 (launch_plan.hpp's choose_row_stride) spanning two segments, causal, GQA, mean.
  cases.push_back({"several key tiles, mean causal",
                   make_config({150, 300}, {1, 2}, true, R::blocked, M::mean),
                   shape(1, 300, 2, 2)});
  cases.push_back({"strided windows R = 2, causal GQA", make_config({128, 256}, {1, 2}, true),
                   shape(1, 300, 4, 2)});
  return cases;
}

}  // namespace dilated_attention::testing
