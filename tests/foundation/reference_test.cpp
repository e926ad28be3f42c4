// docs/semantics.md "Guarantees" oracles 1-8 for reference::forward, in float and double, against the brute-force
// dense attention of support/dense_oracle.hpp (written without pattern.hpp) and against direct
// constructions: hand-written masks, per-branch runs merged by hand, repeated heads, perturbed
// futures.

#include <dilated_attention/reference.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "support/dense_oracle.hpp"
#include "support/random_config.hpp"
#include "support/tensors.hpp"

namespace da = dilated_attention;
namespace dt = dilated_attention::testing;

namespace {

constexpr double positive_infinity = std::numeric_limits<double>::infinity();

template <class T>
struct Tolerance;
template <>
struct Tolerance<double> {
  static constexpr double value = 1e-12;
};
template <>
struct Tolerance<float> {
  static constexpr double value = 1e-5;
};

template <class T>
using Lse = da::lse_type_t<T>;

template <class T>
struct Result {
  dt::Tensor<T> out;
  std::vector<Lse<T>> lse;
};

// Runs the reference into NaN-filled buffers, so that an element it forgets to write fails
// every comparison.
template <class T>
Result<T> run(const da::Config& config, const da::Shape& shape, const dt::Inputs<T>& in,
              std::int64_t out_pad = 0, std::int64_t out_seq_pad = 0) {
  Result<T> result{
      dt::Tensor<T>(shape, shape.num_heads, out_pad, out_seq_pad),
      std::vector<Lse<T>>(dt::lse_size(shape), std::numeric_limits<Lse<T>>::quiet_NaN())};
  result.out.fill(std::numeric_limits<T>::quiet_NaN());
  da::reference::forward(config, shape, {in.q.view(), in.k.view(), in.v.view()},
                         da::Outputs{result.out.view(), result.lse.data()});
  return result;
}

template <class T>
void expect_matches(const Result<T>& got, const dt::DenseResult& want) {
  EXPECT_LE(dt::max_abs_diff(got.out, want.out), Tolerance<T>::value);
  EXPECT_LE(dt::max_lse_diff(got.lse, want.lse), Tolerance<T>::value);
}

template <class T>
void expect_bitwise_equal(const Result<T>& a, const Result<T>& b) {
  EXPECT_TRUE(dt::bitwise_equal(a.out, b.out));
  EXPECT_TRUE(dt::bitwise_equal(a.lse, b.lse));
}

using dt::make_config;

const da::OffsetRule all_rules[] = {da::OffsetRule::modular, da::OffsetRule::blocked,
                                    da::OffsetRule::partitioned};

double default_scale(const da::Shape& shape) { return 1.0 / std::sqrt(double(shape.head_dim)); }

template <class T>
class ReferenceOracles : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
struct TypeNames {
  template <class T>
  static std::string GetName(int) {
    return std::is_same_v<T, float> ? "float" : "double";
  }
};
TYPED_TEST_SUITE(ReferenceOracles, Types, TypeNames);

// Oracle 1: one branch covering the sequence with r = 1 is dense attention, whatever the rule.
TYPED_TEST(ReferenceOracles, OneCoveringBranchIsDenseAttention) {
  using T = TypeParam;
  const da::Shape shape{2, 37, 4, 2, 8};
  const auto in = dt::random_inputs<T>(shape, 11);
  for (const da::OffsetRule rule : all_rules)
    for (const bool causal : {false, true})
      for (const std::int64_t w : {shape.seq_len, shape.seq_len + 13}) {
        const da::Config config = make_config({w}, {1}, causal, rule);
        SCOPED_TRACE(dt::describe(config, shape));
        const auto want = dt::weighted_attention(shape, default_scale(shape), in.q, in.k, in.v,
                                                 [&](std::int64_t, std::int64_t x, std::int64_t y) {
                                                   return !causal || y <= x ? 1 : 0;
                                                 });
        expect_matches(run(config, shape, in), want);
      }
}

// Oracle 2: one branch with r = 1 is block-diagonal attention with blocks of w.
TYPED_TEST(ReferenceOracles, RateOneIsBlockDiagonal) {
  using T = TypeParam;
  const da::Shape shape{1, 30, 3, 3, 5};
  const auto in = dt::random_inputs<T>(shape, 12);
  for (const bool causal : {false, true})
    for (const std::int64_t w : {1, 7, 10, 29}) {
      const da::Config config = make_config({w}, {1}, causal);
      SCOPED_TRACE(dt::describe(config, shape));
      const auto want =
          dt::weighted_attention(shape, default_scale(shape), in.q, in.k, in.v,
                                 [&](std::int64_t, std::int64_t x, std::int64_t y) {
                                   return x / w == y / w && (!causal || y <= x) ? 1 : 0;
                                 });
      expect_matches(run(config, shape, in), want);
    }
}

// Oracle 3: one branch (w, r) is dense attention masked to "same segment, both rows selected for
// the head, y <= x if causal"; rows the head does not select give exactly (0, -inf).
TYPED_TEST(ReferenceOracles, OneBranchIsMaskedDenseAttention) {
  using T = TypeParam;
  const da::Shape shape{1, 41, 5, 5, 6};
  const auto in = dt::random_inputs<T>(shape, 13);
  const std::int64_t cases[][2] = {{9, 4}, {10, 3}, {5, 5}, {12, 1}, {41, 6}, {3, 2}};
  for (const auto& wr : cases)
    for (const da::OffsetRule rule : all_rules)
      for (const bool causal : {false, true}) {
        const std::int64_t w = wr[0], r = wr[1], heads = shape.num_heads;
        const da::Config config = make_config({w}, {r}, causal, rule);
        SCOPED_TRACE(dt::describe(config, shape));
        // The offsets spelled out once more, for one branch: modular h mod r, blocked
        // h / ceil(H / r), partitioned (a single group) 0 mod r.
        const auto offset = [&](std::int64_t h) {
          switch (rule) {
            case da::OffsetRule::modular: return h % r;
            case da::OffsetRule::blocked: return h / ((heads + r - 1) / r);
            default: return std::int64_t{0};
          }
        };
        const auto selected = [&](std::int64_t h, std::int64_t x) {
          return (x % w) % r == offset(h);
        };
        const auto want = dt::weighted_attention(
            shape, default_scale(shape), in.q, in.k, in.v,
            [&](std::int64_t h, std::int64_t x, std::int64_t y) {
              return x / w == y / w && selected(h, x) && selected(h, y) && (!causal || y <= x) ? 1
                                                                                               : 0;
            });
        const Result<T> got = run(config, shape, in);
        expect_matches(got, want);
        std::int64_t empty_rows = 0;
        for (std::int64_t h = 0; h < heads; ++h)
          for (std::int64_t x = 0; x < shape.seq_len; ++x) {
            if (selected(h, x)) continue;
            ++empty_rows;
            EXPECT_EQ(got.lse[static_cast<std::size_t>(h * shape.seq_len + x)], -positive_infinity);
            for (std::int64_t d = 0; d < shape.head_dim; ++d)
              EXPECT_EQ(got.out.at(0, x, h, d), T(0));
          }
        if (r > 1) {
          EXPECT_GT(empty_rows, 0);
        }
      }
}

// Oracle 4: several branches are softmax(S + ln C) V, and the same as each branch run alone and
// merged with weights exp(LSE_i - LSE), LSE = ln sum_i exp(LSE_i). (Per-branch runs keep each
// head's offset only for the rules whose offsets do not depend on the branch count.)
TYPED_TEST(ReferenceOracles, SeveralBranchesMergeTheirPartials) {
  using T = TypeParam;
  const da::Shape shape{2, 53, 6, 3, 7};
  const auto in = dt::random_inputs<T>(shape, 14);
  for (const da::OffsetRule rule : {da::OffsetRule::modular, da::OffsetRule::blocked})
    for (const bool causal : {false, true}) {
      const da::Config config = make_config({8, 12, 5, 20}, {2, 5, 1, 3}, causal, rule);
      SCOPED_TRACE(dt::describe(config, shape));
      const Result<T> got = run(config, shape, in);
      expect_matches(got, dt::dense_oracle(config, shape, in.q, in.k, in.v));

      // Merge the single-branch results by hand, in double.
      std::vector<Result<T>> parts;
      for (std::size_t i = 0; i < config.segment_lengths.size(); ++i)
        parts.push_back(
            run(make_config({config.segment_lengths[i]}, {config.dilation_rates[i]}, causal, rule),
                shape, in));
      double worst_o = 0.0, worst_lse = 0.0;
      for (std::int64_t b = 0; b < shape.batch; ++b)
        for (std::int64_t h = 0; h < shape.num_heads; ++h)
          for (std::int64_t x = 0; x < shape.seq_len; ++x) {
            const std::size_t at =
                static_cast<std::size_t>((b * shape.num_heads + h) * shape.seq_len + x);
            double lse = -positive_infinity;
            for (const auto& part : parts) {
              const double li = part.lse[at];
              const double hi = std::max(lse, li);
              if (hi > -positive_infinity)
                lse = hi + std::log(std::exp(lse - hi) + std::exp(li - hi));
            }
            if (lse == -positive_infinity) {
              EXPECT_EQ(got.lse[at], -positive_infinity);
            } else {
              worst_lse = std::max(worst_lse, std::abs(lse - double(got.lse[at])));
            }
            for (std::int64_t d = 0; d < shape.head_dim; ++d) {
              double o = 0.0;
              if (lse > -positive_infinity)
                for (const auto& part : parts)
                  o += std::exp(double(part.lse[at]) - lse) * double(part.out.at(b, x, h, d));
              worst_o = std::max(worst_o, std::abs(o - double(got.out.at(b, x, h, d))));
            }
          }
      EXPECT_LE(worst_o, 4 * Tolerance<T>::value);
      EXPECT_LE(worst_lse, 4 * Tolerance<T>::value);

      // Mean mixing is the plain average of the single-branch outputs (0 where not selected).
      da::Config mean = config;
      mean.mixing = da::Mixing::mean;
      const Result<T> averaged = run(mean, shape, in);
      double worst_mean = 0.0;
      for (std::int64_t b = 0; b < shape.batch; ++b)
        for (std::int64_t x = 0; x < shape.seq_len; ++x)
          for (std::int64_t h = 0; h < shape.num_heads; ++h)
            for (std::int64_t d = 0; d < shape.head_dim; ++d) {
              double o = 0.0;
              for (const auto& part : parts)
                o += double(part.out.at(b, x, h, d)) / double(parts.size());
              worst_mean = std::max(worst_mean, std::abs(o - double(averaged.out.at(b, x, h, d))));
            }
      EXPECT_LE(worst_mean, 4 * Tolerance<T>::value);
      EXPECT_TRUE(dt::bitwise_equal(averaged.lse, got.lse))
          << "mean mixing reports the softmax LSE";
    }
}

// Oracle 5: listing a branch twice leaves O unchanged and raises LSE by ln 2; so does listing
// a whole config twice.
TYPED_TEST(ReferenceOracles, BranchListedTwice) {
  using T = TypeParam;
  const da::Shape shape{1, 40, 5, 5, 4};
  const auto in = dt::random_inputs<T>(shape, 15);
  for (const da::OffsetRule rule : {da::OffsetRule::modular, da::OffsetRule::blocked})
    for (const bool causal : {false, true})
      for (const da::Mixing mixing : {da::Mixing::softmax, da::Mixing::mean}) {
        const da::Config once = make_config({9, 16}, {3, 4}, causal, rule, mixing);
        const da::Config twice = make_config({9, 16, 9, 16}, {3, 4, 3, 4}, causal, rule, mixing);
        const da::Config single = make_config({9}, {3}, causal, rule, mixing);
        const da::Config single_twice = make_config({9, 9}, {3, 3}, causal, rule, mixing);
        SCOPED_TRACE(dt::describe(twice, shape));
        for (const auto& [a_config, b_config] :
             {std::make_pair(once, twice), std::make_pair(single, single_twice)}) {
          const Result<T> a = run(a_config, shape, in), b = run(b_config, shape, in);
          EXPECT_LE(dt::max_abs_diff(a.out, b.out), Tolerance<T>::value);
          double worst = 0.0;
          for (std::size_t j = 0; j < a.lse.size(); ++j) {
            if (a.lse[j] == -positive_infinity) {
              EXPECT_EQ(b.lse[j], -positive_infinity);
              continue;
            }
            worst = std::max(worst, std::abs(double(b.lse[j]) - double(a.lse[j]) - std::log(2.0)));
          }
          EXPECT_LE(worst, Tolerance<T>::value);
        }
      }
}

template <class T>
dt::Tensor<T> first_rows(const dt::Tensor<T>& t, std::int64_t rows) {
  da::Shape shape = t.shape;
  shape.seq_len = rows;
  dt::Tensor<T> result(shape, t.heads);
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t x = 0; x < rows; ++x)
      for (std::int64_t h = 0; h < t.heads; ++h)
        for (std::int64_t d = 0; d < shape.head_dim; ++d) result.at(b, x, h, d) = t.at(b, x, h, d);
  return result;
}

// Oracle 6: under causal masking, K and V at positions > x cannot change O[x] or LSE[x], not by
// one bit; and a shorter sequence gives the same leading rows (no padded or phantom keys).
TYPED_TEST(ReferenceOracles, CausalRowsIgnoreTheFuture) {
  using T = TypeParam;
  const da::Shape shape{2, 45, 6, 2, 5};
  const auto in = dt::random_inputs<T>(shape, 16);
  for (const da::OffsetRule rule : all_rules)
    for (const da::Mixing mixing : {da::Mixing::softmax, da::Mixing::mean}) {
      const da::Config config = make_config({7, 16, 50}, {2, 5, 3}, true, rule, mixing);
      SCOPED_TRACE(dt::describe(config, shape));
      const Result<T> base = run(config, shape, in);
      for (const std::int64_t cut : {1, 10, 23, 44}) {
        dt::Inputs<T> changed = in;
        for (std::int64_t b = 0; b < shape.batch; ++b)
          for (std::int64_t y = cut; y < shape.seq_len; ++y)
            for (std::int64_t h = 0; h < shape.num_kv_heads; ++h)
              for (std::int64_t d = 0; d < shape.head_dim; ++d) {
                changed.k.at(b, y, h, d) = T(3) * changed.k.at(b, y, h, d) + T(1);
                changed.v.at(b, y, h, d) = T(-2) * changed.v.at(b, y, h, d) + T(5);
              }
        const Result<T> after = run(config, shape, changed);
        const Result<T> shorter =
            run(config, {shape.batch, cut, shape.num_heads, shape.num_kv_heads, shape.head_dim},
                dt::Inputs<T>{first_rows(in.q, cut), first_rows(in.k, cut), first_rows(in.v, cut)});
        bool changed_some_later_row = false;
        for (std::int64_t b = 0; b < shape.batch; ++b)
          for (std::int64_t h = 0; h < shape.num_heads; ++h)
            for (std::int64_t x = 0; x < shape.seq_len; ++x) {
              const std::size_t at =
                  static_cast<std::size_t>((b * shape.num_heads + h) * shape.seq_len + x);
              const bool same =
                  std::memcmp(&base.out.at(b, x, h, 0), &after.out.at(b, x, h, 0),
                              sizeof(T) * static_cast<std::size_t>(shape.head_dim)) == 0 &&
                  std::memcmp(&base.lse[at], &after.lse[at], sizeof(Lse<T>)) == 0;
              if (x < cut) {
                EXPECT_TRUE(same) << "cut " << cut << " batch " << b << " head " << h << " row "
                                  << x;
                const std::size_t short_at =
                    static_cast<std::size_t>((b * shape.num_heads + h) * cut + x);
                EXPECT_EQ(std::memcmp(&base.out.at(b, x, h, 0), &shorter.out.at(b, x, h, 0),
                                      sizeof(T) * static_cast<std::size_t>(shape.head_dim)),
                          0);
                EXPECT_EQ(std::memcmp(&base.lse[at], &shorter.lse[short_at], sizeof(Lse<T>)), 0);
              } else {
                changed_some_later_row |= !same;
              }
            }
        if (cut < shape.seq_len) {
          EXPECT_TRUE(changed_some_later_row) << "the perturbation did nothing";
        }
      }
    }
}

// Oracle 7: awkward shapes against the brute force: N a multiple of no w, r dividing no w, H a
// multiple of neither G nor any r, short last segments, GQA, batches, both mixings, all rules.
TYPED_TEST(ReferenceOracles, AwkwardShapesMatchDenseOracle) {
  using T = TypeParam;
  struct Case {
    std::vector<std::int64_t> w, r;
    da::Shape shape;
  };
  const Case cases[] = {
      {{8, 12, 30}, {3, 5, 7}, {1, 67, 7, 7, 6}},       {{5, 9}, {2, 4}, {2, 43, 5, 1, 4}},
      {{16, 32, 64}, {1, 3, 5}, {1, 100, 9, 3, 8}},     {{7}, {6}, {1, 50, 11, 11, 3}},
      {{4, 6, 10, 25}, {3, 4, 6, 7}, {1, 59, 7, 7, 5}},
  };
  for (const Case& c : cases)
    for (const da::OffsetRule rule : all_rules)
      for (const bool causal : {false, true})
        for (const da::Mixing mixing : {da::Mixing::softmax, da::Mixing::mean}) {
          const da::Config config = make_config(c.w, c.r, causal, rule, mixing);
          SCOPED_TRACE(dt::describe(config, c.shape));
          const auto in = dt::random_inputs<T>(c.shape, 17);
          expect_matches(run(config, c.shape, in),
                         dt::dense_oracle(config, c.shape, in.q, in.k, in.v));
        }
}

// Random problems of every rule, causal and not, both mixings.
TYPED_TEST(ReferenceOracles, RandomProblemsMatchDenseOracle) {
  using T = TypeParam;
  std::mt19937_64 engine(18);
  dt::RandomConfigLimits limits;
  limits.max_head_dim = 6;
  limits.max_batch = 2;
  limits.max_seq_len = 48;
  for (int trial = 0; trial < 24; ++trial) {
    dt::Problem p = dt::random_problem(engine, all_rules[trial % 3], trial % 2 == 1, limits);
    p.config.mixing = trial % 4 < 2 ? da::Mixing::softmax : da::Mixing::mean;
    SCOPED_TRACE(dt::describe(p));
    const auto in = dt::random_inputs<T>(p.shape, 1000 + static_cast<std::uint64_t>(trial));
    expect_matches(run(p.config, p.shape, in),
                   dt::dense_oracle(p.config, p.shape, in.q, in.k, in.v));
  }
}

// Oracle 7, the LongNet paper's own branch set: w = 2048 .. 32768, r = 1, 2, 4, 6, 12, 12 heads.
// At N = 777 every segment overruns the sequence (each branch is one short segment); scaled down
// by 16 (w = 128 .. 2048) the segments repeat and the last ones are short. The sizes keep the
// O(N^2) brute force affordable in a Debug build.
TYPED_TEST(ReferenceOracles, PaperConfigMatchesDenseOracle) {
  using T = TypeParam;
  const std::vector<std::int64_t> rates = {1, 2, 4, 6, 12};
  const da::Shape shape{1, 777, 12, 12, 8};
  const auto in = dt::random_inputs<T>(shape, 19);
  const da::Config paper =
      make_config({2048, 4096, 8192, 16384, 32768}, rates, std::is_same_v<T, double>);
  {
    SCOPED_TRACE(dt::describe(paper, shape));
    expect_matches(run(paper, shape, in), dt::dense_oracle(paper, shape, in.q, in.k, in.v));
  }
  const da::Config scaled =
      make_config({128, 256, 512, 1024, 2048}, rates, std::is_same_v<T, float>);
  SCOPED_TRACE(dt::describe(scaled, shape));
  expect_matches(run(scaled, shape, in), dt::dense_oracle(scaled, shape, in.q, in.k, in.v));
}

// Oracle 8: grouped-query attention equals multi-head attention with each K/V head repeated
// H / Hkv times, bit for bit.
TYPED_TEST(ReferenceOracles, GroupedQueryEqualsRepeatedHeads) {
  using T = TypeParam;
  for (const std::int64_t kv_heads : {1, 2, 3}) {
    const da::Shape gqa{2, 33, 6, kv_heads, 5};
    const da::Shape mha{2, 33, 6, 6, 5};
    const auto in = dt::random_inputs<T>(gqa, 20);
    dt::Inputs<T> repeated{in.q, dt::Tensor<T>(mha, 6), dt::Tensor<T>(mha, 6)};
    const std::int64_t group = 6 / kv_heads;
    for (std::int64_t b = 0; b < 2; ++b)
      for (std::int64_t y = 0; y < 33; ++y)
        for (std::int64_t h = 0; h < 6; ++h)
          for (std::int64_t d = 0; d < 5; ++d) {
            repeated.k.at(b, y, h, d) = in.k.at(b, y, h / group, d);
            repeated.v.at(b, y, h, d) = in.v.at(b, y, h / group, d);
          }
    for (const da::OffsetRule rule : all_rules) {
      const da::Config config = make_config({6, 14}, {4, 3}, kv_heads == 2, rule);
      SCOPED_TRACE(dt::describe(config, gqa));
      expect_bitwise_equal(run(config, gqa, in), run(config, mha, repeated));
      expect_matches(run(config, gqa, in), dt::dense_oracle(config, gqa, in.q, in.k, in.v));
      // The oracle takes mutable views too.
      expect_matches(
          run(config, mha, repeated),
          dt::dense_oracle(config, mha, repeated.q.view(), repeated.k.view(), repeated.v.view()));
    }
  }
}

// The dilated-attention-pytorch preset: partitioned offsets with mean mixing.
TYPED_TEST(ReferenceOracles, PartitionedMeanPresetMatchesDenseOracle) {
  using T = TypeParam;
  const da::Shape shape{2, 48, 8, 8, 4};
  const auto in = dt::random_inputs<T>(shape, 21);
  for (const bool causal : {false, true}) {
    const da::Config config =
        make_config({8, 16, 24}, {1, 2, 4}, causal, da::OffsetRule::partitioned, da::Mixing::mean);
    SCOPED_TRACE(dt::describe(config, shape));
    const Result<T> got = run(config, shape, in);
    expect_matches(got, dt::dense_oracle(config, shape, in.q, in.k, in.v));
    // Group 2 (heads 6, 7) runs branch 2 alone with offset 2 mod 4: rows with in-segment index
    // 2 mod 4 get a third of that branch's softmax, the rest stay exactly 0.
    for (std::int64_t x = 0; x < shape.seq_len; ++x)
      if ((x % 24) % 4 != 2) {
        for (std::int64_t d = 0; d < shape.head_dim; ++d) EXPECT_EQ(got.out.at(1, x, 7, d), T(0));
      }
  }
}

// Strided views: padding after each head and each row, in every input and the output. The
// result equals the contiguous one bit for bit and the output's padding is never written.
TYPED_TEST(ReferenceOracles, NonContiguousViews) {
  using T = TypeParam;
  const da::Shape shape{2, 29, 4, 2, 6};
  const auto dense = dt::random_inputs<T>(shape, 22);
  dt::Inputs<T> padded{dt::Tensor<T>(shape, 4, 3, 5), dt::Tensor<T>(shape, 2, 1, 0),
                       dt::Tensor<T>(shape, 2, 0, 7)};
  padded.q.fill_random(99);  // garbage in the padding
  padded.k.fill_random(98);
  padded.v.fill_random(97);
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t x = 0; x < shape.seq_len; ++x)
      for (std::int64_t d = 0; d < shape.head_dim; ++d) {
        for (std::int64_t h = 0; h < 4; ++h) padded.q.at(b, x, h, d) = dense.q.at(b, x, h, d);
        for (std::int64_t h = 0; h < 2; ++h) {
          padded.k.at(b, x, h, d) = dense.k.at(b, x, h, d);
          padded.v.at(b, x, h, d) = dense.v.at(b, x, h, d);
        }
      }
  for (const bool causal : {false, true}) {
    const da::Config config = make_config({5, 12}, {2, 5}, causal, da::OffsetRule::blocked);
    const Result<T> want = run(config, shape, dense);
    const Result<T> got = run(config, shape, padded, 2, 3);
    expect_bitwise_equal(got, want);
    // Every padding element of the output still holds the NaN it was filled with.
    std::size_t untouched = 0, logical = 0;
    for (const T value : got.out.storage) untouched += std::isnan(value) ? 1 : 0;
    logical =
        static_cast<std::size_t>(shape.batch * shape.seq_len * shape.num_heads * shape.head_dim);
    EXPECT_EQ(untouched, got.out.storage.size() - logical);
  }
}

// Inputs may broadcast: a batch stride of 0 reads the same K and V for every batch.
TYPED_TEST(ReferenceOracles, BroadcastInputsAreRead) {
  using T = TypeParam;
  const da::Shape shape{3, 20, 2, 1, 4};
  const da::Shape one{1, 20, 2, 1, 4};
  auto in = dt::random_inputs<T>(shape, 23);
  const auto shared = dt::random_inputs<T>(one, 24);
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t x = 0; x < shape.seq_len; ++x)
      for (std::int64_t d = 0; d < shape.head_dim; ++d) {
        in.k.at(b, x, 0, d) = shared.k.at(0, x, 0, d);
        in.v.at(b, x, 0, d) = shared.v.at(0, x, 0, d);
      }
  const da::Config config = make_config({6}, {2});
  const Result<T> want = run(config, shape, in);
  dt::Tensor<T> out(shape, shape.num_heads);
  std::vector<Lse<T>> lse(dt::lse_size(shape));
  da::View<const T> k = shared.k.view(), v = shared.v.view();
  k.batch_stride = 0;
  v.batch_stride = 0;
  da::reference::forward(config, shape, {in.q.view(), k, v}, da::Outputs{out.view(), lse.data()});
  EXPECT_TRUE(dt::bitwise_equal(out, want.out));
  EXPECT_TRUE(dt::bitwise_equal(lse, want.lse));
}

// Batches are independent: each equals a run on that batch alone.
TYPED_TEST(ReferenceOracles, BatchesAreIndependent) {
  using T = TypeParam;
  const da::Shape shape{3, 26, 3, 3, 4};
  const da::Shape one{1, 26, 3, 3, 4};
  const auto in = dt::random_inputs<T>(shape, 25);
  const da::Config config = make_config({6, 11}, {2, 3}, true);
  const Result<T> all = run(config, shape, in);
  expect_matches(all, dt::dense_oracle(config, shape, in.q, in.k, in.v));
  for (std::int64_t b = 0; b < shape.batch; ++b) {
    const auto slice = [&](const dt::Tensor<T>& t) {
      dt::Tensor<T> r(one, t.heads);
      for (std::int64_t x = 0; x < one.seq_len; ++x)
        for (std::int64_t h = 0; h < t.heads; ++h)
          for (std::int64_t d = 0; d < one.head_dim; ++d) r.at(0, x, h, d) = t.at(b, x, h, d);
      return r;
    };
    const Result<T> alone = run(config, one, dt::Inputs<T>{slice(in.q), slice(in.k), slice(in.v)});
    for (std::int64_t x = 0; x < one.seq_len; ++x)
      for (std::int64_t h = 0; h < 3; ++h) {
        EXPECT_EQ(std::memcmp(&alone.out.at(0, x, h, 0), &all.out.at(b, x, h, 0), sizeof(T) * 4),
                  0);
        EXPECT_EQ(alone.lse[static_cast<std::size_t>(h * 26 + x)],
                  all.lse[static_cast<std::size_t>((b * 3 + h) * 26 + x)]);
      }
  }
}

// A custom scale is used as given (and 0 means 1/sqrt(head_dim)).
TYPED_TEST(ReferenceOracles, CustomScale) {
  using T = TypeParam;
  const da::Shape shape{1, 31, 3, 3, 9};
  const auto in = dt::random_inputs<T>(shape, 26);
  for (const double scale : {0.37, 2.5, 1e-3}) {
    da::Config config = make_config({10, 31}, {3, 2}, false, da::OffsetRule::modular);
    config.scale = scale;
    SCOPED_TRACE(dt::describe(config, shape));
    const Result<T> got = run(config, shape, in);
    expect_matches(got, dt::dense_oracle(config, shape, in.q, in.k, in.v));
    config.scale = 0.0;
    EXPECT_GT(dt::max_abs_diff(got.out, run(config, shape, in).out), 1e-3)
        << "the scale was ignored";
  }
  da::Config explicit_default = make_config({10, 31}, {3, 2});
  explicit_default.scale = 1.0 / 3.0;  // = 1/sqrt(9)
  expect_bitwise_equal(run(explicit_default, shape, in),
                       run(make_config({10, 31}, {3, 2}), shape, in));
}

// Large scores must not overflow: the softmax is taken relative to the row maximum.
TYPED_TEST(ReferenceOracles, LargeScoresStayFinite) {
  using T = TypeParam;
  const da::Shape shape{1, 24, 2, 2, 4};
  const auto in = dt::random_inputs<T>(shape, 27);
  da::Config config = make_config({8, 24}, {1, 3}, true);
  config.scale = 300.0;  // scores in the hundreds to thousands: exp() alone would overflow
  const Result<T> got = run(config, shape, in);
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t x = 0; x < 24; ++x) {
      EXPECT_TRUE(std::isfinite(got.lse[static_cast<std::size_t>(h * 24 + x)]));
      for (std::int64_t d = 0; d < 4; ++d) EXPECT_TRUE(std::isfinite(got.out.at(0, x, h, d)));
    }
  const auto want = dt::dense_oracle(config, shape, in.q, in.k, in.v);
  EXPECT_LE(dt::max_abs_diff(got.out, want.out), Tolerance<T>::value);
  // LSE is of the size of the scores here: compare relative to it.
  for (std::size_t j = 0; j < want.lse.size(); ++j)
    EXPECT_NEAR(double(got.lse[j]), want.lse[j],
                Tolerance<T>::value * std::max(1.0, std::abs(want.lse[j])));
}

// The LSE pointer is optional; leaving it out changes nothing else.
TYPED_TEST(ReferenceOracles, LseMayBeNull) {
  using T = TypeParam;
  static_assert(std::is_same_v<Lse<double>, double> && std::is_same_v<Lse<float>, float>);
  const da::Shape shape{2, 19, 4, 2, 3};
  const auto in = dt::random_inputs<T>(shape, 28);
  const da::Config config = make_config({4, 9}, {3, 2}, true, da::OffsetRule::partitioned);
  const Result<T> with = run(config, shape, in);
  dt::Tensor<T> out(shape, shape.num_heads);
  da::reference::forward(config, shape, {in.q.view(), in.k.view(), in.v.view()},
                         da::Outputs{out.view()});
  EXPECT_TRUE(dt::bitwise_equal(out, with.out));
  dt::Tensor<T> out2(shape, shape.num_heads);
  da::reference::forward(config, shape, {in.q.view(), in.k.view(), in.v.view()},
                         da::Outputs{out2.view()});
  EXPECT_TRUE(dt::bitwise_equal(out2, with.out));
}

// Mixing does not matter with one branch: mean over one branch is that branch's softmax.
TYPED_TEST(ReferenceOracles, MeanOfOneBranchIsSoftmax) {
  using T = TypeParam;
  const da::Shape shape{1, 27, 3, 3, 4};
  const auto in = dt::random_inputs<T>(shape, 29);
  for (const bool causal : {false, true}) {
    const Result<T> softmax = run(make_config({10}, {3}, causal), shape, in);
    const Result<T> mean =
        run(make_config({10}, {3}, causal, da::OffsetRule::modular, da::Mixing::mean), shape, in);
    EXPECT_LE(dt::max_abs_diff(softmax.out, mean.out), Tolerance<T>::value);
    EXPECT_TRUE(dt::bitwise_equal(softmax.lse, mean.lse));
  }
}

// Run to run, the reference gives the same bits.
TYPED_TEST(ReferenceOracles, Deterministic) {
  using T = TypeParam;
  const da::Shape shape{2, 40, 5, 5, 6};
  const auto in = dt::random_inputs<T>(shape, 30);
  const da::Config config = make_config({8, 16, 40}, {1, 3, 7}, false, da::OffsetRule::blocked);
  expect_bitwise_equal(run(config, shape, in), run(config, shape, in));
}

}  // namespace
