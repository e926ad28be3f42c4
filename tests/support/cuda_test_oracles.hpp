#pragma once
// Plain C++ oracles of the CUDA tests (no CUDA compiler needed): the naive implementation
// computed in the storage type (the yardstick of docs/semantics.md "Guarantees" (item 10)), the test cases, seeded inputs, and
// the check of a kernel's result against the fp64 reference. Shared by the GPU tests
// (cuda_test_support.cuh) and the host emulation of the kernels (cuda_emulated_kernel_test.cpp).

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

#include "support/random_config.hpp"
#include "support/tensors.hpp"

namespace dilated_attention::testing {

template <class T>
double to_double(T value) {
  return static_cast<double>(static_cast<float>(value));
}
template <>
inline double to_double<double>(double value) {
  return value;
}

template <class T>
T from_double(double value) {
  return T(static_cast<float>(value));
}

// docs/semantics.md "The forward" computed naively with every intermediate rounded to the storage type T (scores, the
// running max, exponentials, sums, products, the output): "a naive implementation computed in
// the same storage type". Arithmetic on T is emulated as float arithmetic rounded back to T,
// which is exact rounding for half and bfloat16. LSE is computed the same way.
template <class T>
void naive_in_storage_type(const Config& config, const Shape& shape, const Tensor<T>& q,
                           const Tensor<T>& k, const Tensor<T>& v, Tensor<T>& out,
                           std::vector<double>& lse) {
  const Pattern pattern(config, shape);
  auto round = [](double x) { return to_double(from_double<T>(x)); };
  const double scale = round(resolved_scale(config, shape));
  const std::int64_t n = shape.seq_len, dim = shape.head_dim, branches = pattern.num_branches();
  const double inf = std::numeric_limits<double>::infinity();
  lse.assign(static_cast<std::size_t>(shape.batch * shape.num_heads * n), -inf);
  std::vector<double> o(static_cast<std::size_t>(dim)), row(static_cast<std::size_t>(dim));
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t h = 0; h < shape.num_heads; ++h) {
      const std::int64_t kvh = pattern.kv_head(h);
      for (std::int64_t x = 0; x < n; ++x) {
        // One softmax over a list of (key, weight) groups: all branches at once (softmax
        // mixing) or one branch at a time (mean mixing).
        auto attend = [&](const std::vector<Progression>& key_sets, std::vector<double>& result,
                          double& result_lse) {
          double max_score = -inf;
          std::vector<double> scores;
          for (const Progression& keys : key_sets)
            for (std::int64_t j = 0; j < keys.count; ++j) {
              double dot = 0.0;
              for (std::int64_t d = 0; d < dim; ++d)
                dot = round(dot + round(to_double(q.at(b, x, h, d)) *
                                        to_double(k.at(b, keys.at(j), kvh, d))));
              const double s = round(dot * scale);
              scores.push_back(s);
              max_score = std::max(max_score, s);
            }
          std::fill(result.begin(), result.end(), 0.0);
          if (scores.empty()) {
            result_lse = -inf;
            return;
          }
          double sum = 0.0;
          std::size_t at = 0;
          for (const Progression& keys : key_sets)
            for (std::int64_t j = 0; j < keys.count; ++j, ++at) {
              const double p = round(std::exp(round(scores[at] - max_score)));
              sum = round(sum + p);
              for (std::int64_t d = 0; d < dim; ++d)
                result[static_cast<std::size_t>(d)] =
                    round(result[static_cast<std::size_t>(d)] +
                          round(p * to_double(v.at(b, keys.at(j), kvh, d))));
            }
          for (double& value : result) value = round(value / sum);
          result_lse = round(max_score + round(std::log(sum)));
        };
        std::vector<Progression> all;
        for (std::int64_t i = 0; i < branches; ++i) {
          const Progression keys = pattern.keys(i, h, x);
          if (!keys.empty()) all.push_back(keys);
        }
        double row_lse = -inf;
        attend(all, row, row_lse);  // softmax mixing, and the LSE of both mixings
        if (config.mixing == Mixing::mean) {
          std::fill(row.begin(), row.end(), 0.0);
          for (const Progression& keys : all) {
            double branch_lse = 0.0;
            attend({keys}, o, branch_lse);
            for (std::int64_t d = 0; d < dim; ++d)
              row[static_cast<std::size_t>(d)] =
                  round(row[static_cast<std::size_t>(d)] +
                        round(o[static_cast<std::size_t>(d)] / static_cast<double>(branches)));
          }
        }
        for (std::int64_t d = 0; d < dim; ++d)
          out.at(b, x, h, d) = from_double<T>(row[static_cast<std::size_t>(d)]);
        lse[static_cast<std::size_t>((b * shape.num_heads + h) * n + x)] = row_lse;
      }
    }
}

// A test case: config, shape and layout padding (pad 0: dense; a pad that is not a multiple of
// 8 elements forces the element-wise copy path; a multiple of 8 keeps 16-byte transfers).
struct Case {
  std::string name;
  Config config;
  Shape shape;
  std::int64_t pad = 0, seq_pad = 0;
};

inline std::string describe(const Case& c) {
  std::string text = c.name + " [B" + std::to_string(c.shape.batch) + " N" +
                     std::to_string(c.shape.seq_len) + " H" + std::to_string(c.shape.num_heads) +
                     " Hkv" + std::to_string(c.shape.num_kv_heads) + " D" +
                     std::to_string(c.shape.head_dim) + "] w,r =";
  for (std::size_t i = 0; i < c.config.segment_lengths.size(); ++i)
    text += " (" + std::to_string(c.config.segment_lengths[i]) + "," +
            std::to_string(c.config.dilation_rates[i]) + ")";
  text += std::string(c.config.causal ? " causal " : " ") + to_string(c.config.offsets) + " " +
          to_string(c.config.mixing) + " pad " + std::to_string(c.pad);
  return text;
}

template <class T>
struct DeviceTestInputs {
  Tensor<T> q, k, v;
};

template <class T>
DeviceTestInputs<T> random_device_test_inputs(const Shape& shape, std::int64_t pad,
                                              std::int64_t seq_pad, std::uint64_t seed) {
  DeviceTestInputs<T> in{Tensor<T>(shape, shape.num_heads, pad, seq_pad),
                         Tensor<T>(shape, shape.num_kv_heads, pad, seq_pad),
                         Tensor<T>(shape, shape.num_kv_heads, pad, seq_pad)};
  in.q.fill_random(seed);
  in.k.fill_random(seed + 1);
  in.v.fill_random(seed + 2);
  return in;
}

template <class T>
Tensor<double> widen(const Tensor<T>& t) {
  Tensor<double> wide(t.shape, t.heads);
  for (std::int64_t b = 0; b < t.shape.batch; ++b)
    for (std::int64_t x = 0; x < t.shape.seq_len; ++x)
      for (std::int64_t h = 0; h < t.heads; ++h)
        for (std::int64_t d = 0; d < t.shape.head_dim; ++d)
          wide.at(b, x, h, d) = to_double(t.at(b, x, h, d));
  return wide;
}

// The result of one kernel run, downloaded (or computed by the host emulation).
template <class T>
struct KernelResult {
  Tensor<T> out;
  std::vector<float> lse;
};

// docs/semantics.md "Guarantees" (item 10) for 16-bit types: max error against the fp64 reference at most twice the naive
// storage-type implementation's, with a floor of 1e-6 for cases where the naive result happens
// to be exact (a block of one key returns v itself). For float (no naive yardstick in docs/semantics.md)
// the same rule with a floor of 2e-5. Both documented in docs/cuda.md. Also: the output view's
// padding still holds the NaN poison (never written).
template <class T>
void check_result(const Case& c, const DeviceTestInputs<T>& in, const KernelResult<T>& result) {
  // The oracle runs on the inputs widened exactly to double.
  const Tensor<double> q = widen(in.q), k = widen(in.k), v = widen(in.v);
  Tensor<double> expected(c.shape, c.shape.num_heads);
  std::vector<double> expected_lse(result.lse.size());
  reference::forward<double>(c.config, c.shape, {q.view(), k.view(), v.view()},
                             {expected.view(), expected_lse.data()});

  Tensor<T> naive(c.shape, c.shape.num_heads);
  std::vector<double> naive_lse;
  naive_in_storage_type(c.config, c.shape, in.q, in.k, in.v, naive, naive_lse);

  const double floor = std::is_same_v<T, float> ? 2e-5 : 1e-6;
  const double naive_error = max_abs_diff(naive, expected);
  const double error = max_abs_diff(result.out, expected);
  EXPECT_LE(error, std::max(2.0 * naive_error, floor))
      << "output: kernel error " << error << ", naive " << naive_error;
  const double naive_lse_error = max_lse_diff(naive_lse, expected_lse);
  const double lse_error = max_lse_diff(result.lse, expected_lse);
  EXPECT_LE(lse_error, std::max(2.0 * naive_lse_error, floor))
      << "lse: kernel error " << lse_error << ", naive " << naive_lse_error;

  std::size_t touched_padding = 0;
  for (std::int64_t b = 0; b < c.shape.batch; ++b)
    for (std::int64_t x = 0; x < c.shape.seq_len; ++x)
      for (std::int64_t h = 0; h < c.shape.num_heads; ++h)
        for (std::int64_t d = c.shape.head_dim; d < result.out.head_stride; ++d)
          if (!std::isnan(to_double(result.out.at(b, x, h, d)))) ++touched_padding;
  EXPECT_EQ(touched_padding, 0u) << "the kernel wrote into the output view's padding";
}

// An output tensor and LSE array poisoned with NaN, so that an element a kernel forgets to
// write cannot pass.
template <class T>
KernelResult<T> poisoned_result(const Shape& shape, std::int64_t pad, std::int64_t seq_pad) {
  KernelResult<T> result;
  result.out = Tensor<T>(shape, shape.num_heads, pad, seq_pad);
  result.out.fill(T(std::numeric_limits<float>::quiet_NaN()));
  result.lse.assign(static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len),
                    std::numeric_limits<float>::quiet_NaN());
  return result;
}

// The cases every dtype runs: each rule of docs/semantics.md "The forward"-3 and each oracle of docs/semantics.md "Guarantees" that a single device
// can check, on awkward sizes (N not a multiple of the window or of w, r not dividing w, H not
// a multiple of G or r, several key tiles per block, several segments per window).
inline std::vector<Case> correctness_cases(std::int64_t head_dim) {
  const auto shape = [head_dim](std::int64_t b, std::int64_t n, std::int64_t h, std::int64_t hkv) {
    return Shape{b, n, h, hkv, head_dim};
  };
  using R = OffsetRule;
  using M = Mixing;
  std::vector<Case> cases = {
      {"dense (w >= N, r = 1)", make_config({512}, {1}), shape(2, 150, 2, 2)},
      {"dense causal", make_config({512}, {1}, true), shape(1, 200, 2, 2)},
      {"block diagonal", make_config({48}, {1}), shape(1, 150, 2, 2)},
      {"one dilated branch, r not dividing w", make_config({40}, {3}), shape(1, 130, 4, 4)},
      {"one dilated branch causal", make_config({100}, {3}, true), shape(1, 230, 3, 3)},
      {"several key tiles per block", make_config({512}, {2}), shape(1, 700, 2, 2)},
      {"several segments per window", make_config({5, 13}, {2, 3}, true), shape(1, 90, 3, 3)},
      {"three branches modular softmax", make_config({20, 50, 120}, {1, 3, 7}),
       shape(1, 200, 5, 5)},
      {"three branches causal", make_config({20, 50, 120}, {1, 3, 7}, true), shape(1, 200, 5, 5)},
      {"blocked softmax", make_config({16, 64}, {2, 4}, false, R::blocked), shape(1, 160, 5, 5)},
      {"blocked mean causal", make_config({16, 64}, {2, 4}, true, R::blocked, M::mean),
       shape(1, 160, 5, 5)},
      {"modular mean", make_config({32, 96, 160}, {1, 2, 5}, false, R::modular, M::mean),
       shape(1, 170, 4, 4)},
      {"partitioned mean (dilated-attention-pytorch)",
       make_config({32, 64, 128}, {1, 2, 4}, false, R::partitioned, M::mean), shape(2, 128, 5, 5)},
      {"partitioned softmax causal",
       make_config({32, 64, 128}, {1, 2, 4}, true, R::partitioned, M::softmax),
       shape(1, 150, 4, 4)},
      {"GQA 6:2", make_config({64, 128}, {1, 2}, true), shape(1, 140, 6, 2)},
      {"GQA 6:3 blocked mean", make_config({64, 128}, {2, 2}, false, R::blocked, M::mean),
       shape(1, 140, 6, 3)},
      {"branch listed twice", make_config({64, 64}, {2, 2}), shape(1, 100, 2, 2)},
      {"paper config (scaled N)", make_config({2048, 4096, 8192, 16384, 32768}, {1, 2, 4, 6, 12}),
       shape(1, 260, 12, 12)},
      {"single position", make_config({4, 8}, {1, 2}, true), shape(2, 1, 2, 1)},
      {"r = w", make_config({7}, {7}), shape(1, 50, 8, 8)},
  };
  // Strided layouts: an odd pad forces the element-wise path, a pad of 8 keeps 16-byte copies.
  Case odd{"odd padding (element-wise copies)", make_config({40, 96}, {1, 3}, true),
           shape(2, 120, 3, 3), 1, 3};
  Case even{"aligned padding (cp.async)", make_config({40, 96}, {1, 3}, true), shape(2, 120, 3, 3),
            8, 8};
  cases.push_back(odd);
  cases.push_back(even);
  // Windows of stride R = lcm of the rates (launch_plan.hpp's choose_row_stride: 64 R <= min w).
  cases.push_back({"strided windows R = 2, causal GQA", make_config({128, 256}, {1, 2}, true),
                   shape(1, 300, 4, 2)});
  cases.push_back({"strided windows R = 4, blocked mean",
                   make_config({256, 512}, {2, 4}, false, R::blocked, M::mean),
                   shape(1, 400, 3, 3)});
  // Query windows of K residues mod R (cuda/query_window.hpp), each (branch, segment) packing its
  // rows into 16-row slices: R = 12 (K = 4, the paper's rates), R = 6 (K = 2), R = 3 (K = 1);
  // windows straddling segments, several tiles, rows that move between packings.
  cases.push_back({"packed slices R = 12 causal (paper rates)",
                   make_config({768, 1536, 3072, 6144, 12288}, {1, 2, 4, 6, 12}, true),
                   shape(1, 800, 3, 3)});
  cases.push_back({"packed slices R = 12 blocked mean GQA 4:2",
                   make_config({768, 1536}, {4, 12}, false, R::blocked, M::mean),
                   shape(1, 1000, 4, 2)});
  cases.push_back({"packed slices R = 6 partitioned causal",
                   make_config({384, 768}, {2, 3}, true, R::partitioned), shape(1, 700, 4, 4)});
  cases.push_back({"packed slices R = 3 modular mean causal, odd padding",
                   make_config({192, 384}, {1, 3}, true, R::modular, M::mean), shape(2, 450, 2, 2),
                   1, 3});
  return cases;
}

}  // namespace dilated_attention::testing
