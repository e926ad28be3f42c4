// dilated_attention::forward (the threaded CPU kernel) against the fp64 reference and the dense
// brute-force oracle: the docs/semantics.md "Guarantees" oracles 1-8, random configs biased to awkward shapes, strided
// views, batches, GQA, every offset rule, both mixings, causal, with and without LSE.
//
// The whole file runs on the inner kernels that DILATED_ATTENTION_CPU_ISA selects (CTest runs it
// once per path: cpu_forward_test.isa.<name>, skipped where the CPU lacks the path); the
// CpuForwardIsa tests below also force each path through CpuOptions::isa. Last, the hazards: a
// forward on a thread with a 128 KiB stack.

#include <dilated_attention/dilated_attention.hpp>

#include <gtest/gtest.h>

#include <pthread.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "support/dense_oracle.hpp"
#include "support/forced_isa.hpp"
#include "support/random_config.hpp"
#include "support/tensors.hpp"

namespace {

namespace da = dilated_attention;
using da::Config;
using da::CpuOptions;
using da::Mixing;
using da::OffsetRule;
using da::Shape;
using da::testing::max_abs_diff;
using da::testing::max_lse_diff;
using da::testing::Tensor;

// Inputs in storage type T (padded, so views are not contiguous) and their exact double copies.
template <class T>
struct Inputs {
  Tensor<T> q, k, v;
  Tensor<double> qd, kd, vd;
  Inputs(const Shape& shape, std::uint64_t seed, std::int64_t pad = 0, std::int64_t seq_pad = 0)
      : q(shape, shape.num_heads, pad, seq_pad),
        k(shape, shape.num_kv_heads, pad + 1, seq_pad),
        v(shape, shape.num_kv_heads, pad, seq_pad + 2),
        qd(shape, shape.num_heads),
        kd(shape, shape.num_kv_heads),
        vd(shape, shape.num_kv_heads) {
    q.fill_random(seed);
    k.fill_random(seed + 1);
    v.fill_random(seed + 2);
    da::testing::copy_to_double(q, qd);
    da::testing::copy_to_double(k, kd);
    da::testing::copy_to_double(v, vd);
  }
};

template <class T>
struct Result {
  Tensor<T> out;
  std::vector<da::lse_type_t<T>> lse;
};

template <class T>
Result<T> run_fast(const Config& config, const Shape& shape, const Inputs<T>& in,
                   const CpuOptions& options = {}, bool with_lse = true, std::int64_t out_pad = 0) {
  Result<T> r{Tensor<T>(shape, shape.num_heads, out_pad, 0),
              std::vector<da::lse_type_t<T>>(
                  static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len), 7)};
  r.out.fill(T(7));
  da::forward(config, shape, {in.q.view(), in.k.view(), in.v.view()},
              da::Outputs{r.out.view(), with_lse ? r.lse.data() : nullptr}, options);
  return r;
}

template <class T>
Result<double> run_reference(const Config& config, const Shape& shape, const Inputs<T>& in) {
  Result<double> r{
      Tensor<double>(shape, shape.num_heads),
      std::vector<double>(static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len))};
  da::reference::forward(config, shape, {in.qd.view(), in.kd.view(), in.vd.view()},
                         da::Outputs{r.out.view(), r.lse.data()});
  return r;
}

double tolerance_for(double) { return 1e-10; }
double tolerance_for(float) { return 1e-4; }

// Forward against the reference on one problem; tolerances of the issue (double 1e-10, float
// 1e-4 relative to the output's magnitude).
template <class T>
void expect_matches_reference(const Config& config, const Shape& shape, std::uint64_t seed,
                              std::int64_t pad = 0, const CpuOptions& options = {}) {
  SCOPED_TRACE(da::testing::describe(config, shape));
  const Inputs<T> in(shape, seed, pad, pad);
  const Result<T> got = run_fast(config, shape, in, options, true, pad);
  const Result<double> want = run_reference(config, shape, in);
  double magnitude = 1.0;
  for (double value : want.out.storage) magnitude = std::max(magnitude, std::abs(value));
  const double tolerance = tolerance_for(T{}) * magnitude;
  EXPECT_LE(max_abs_diff(got.out, want.out), tolerance);
  EXPECT_LE(max_lse_diff(got.lse, want.lse), tolerance_for(T{}) * 20);
}

using da::testing::make_config;

// When DILATED_ATTENTION_CPU_ISA names a path this machine cannot run, every test is skipped
// (CTest's SKIP_REGULAR_EXPRESSION matches the message).
const ::testing::Environment* const forced_isa_environment =
    ::testing::AddGlobalTestEnvironment(new da::testing::ForcedIsaEnvironment("cpu_forward_test"));

// --- docs/semantics.md "Guarantees" oracles 1-3: against hand-written masks of the dense oracle -------------------

TEST(CpuForward, Oracle1DenseAttention) {
  for (bool causal : {false, true}) {
    const Shape shape{1, 150, 2, 2, 8};
    const Config config = make_config({300}, {1}, causal);
    const Inputs<double> in(shape, 5);
    const Result<double> got = run_fast(config, shape, in);
    const auto want = da::testing::weighted_attention(
        shape, 1.0 / std::sqrt(8.0), in.qd, in.kd, in.vd,
        [&](std::int64_t, std::int64_t x, std::int64_t y) { return !causal || y <= x ? 1 : 0; });
    EXPECT_LE(max_abs_diff(got.out, want.out), 1e-10);
    EXPECT_LE(max_lse_diff(got.lse, want.lse), 1e-10);
  }
}

TEST(CpuForward, Oracle2BlockDiagonal) {
  for (bool causal : {false, true}) {
    const Shape shape{1, 100, 2, 1, 6};
    const Config config = make_config({32}, {1}, causal);
    const Inputs<double> in(shape, 6);
    const Result<double> got = run_fast(config, shape, in);
    const auto want =
        da::testing::weighted_attention(shape, 1.0 / std::sqrt(6.0), in.qd, in.kd, in.vd,
                                        [&](std::int64_t, std::int64_t x, std::int64_t y) {
                                          return x / 32 == y / 32 && (!causal || y <= x) ? 1 : 0;
                                        });
    EXPECT_LE(max_abs_diff(got.out, want.out), 1e-10);
    EXPECT_LE(max_lse_diff(got.lse, want.lse), 1e-10);
  }
}

TEST(CpuForward, Oracle3OneDilatedBranch) {
  for (OffsetRule rule : {OffsetRule::modular, OffsetRule::blocked})
    for (bool causal : {false, true}) {
      const Shape shape{1, 97, 5, 5, 4};
      const Config config = make_config({30}, {4}, causal, rule);
      SCOPED_TRACE(da::testing::describe(config, shape));
      const Inputs<double> in(shape, 7);
      const Result<double> got = run_fast(config, shape, in);
      auto want = da::testing::dense_oracle(config, shape, in.qd, in.kd, in.vd);
      EXPECT_LE(max_abs_diff(got.out, want.out), 1e-10);
      EXPECT_LE(max_lse_diff(got.lse, want.lse), 1e-10);
    }
}

// --- Oracle 4: several branches ---------------------------------------------------------------

TEST(CpuForward, Oracle4SeveralBranchesMergeTheirLse) {
  const Shape shape{1, 130, 6, 3, 8};
  const Config config = make_config({16, 40, 128}, {1, 3, 5}, false);
  const Inputs<double> in(shape, 8);
  const Result<double> all = run_fast(config, shape, in);
  auto dense = da::testing::dense_oracle(config, shape, in.qd, in.kd, in.vd);
  EXPECT_LE(max_abs_diff(all.out, dense.out), 1e-10);
  std::vector<double> merged(all.lse.size(), -std::numeric_limits<double>::infinity());
  for (std::size_t i = 0; i < 3; ++i) {
    const Config one = make_config({config.segment_lengths[i]}, {config.dilation_rates[i]});
    const Result<double> part = run_fast(one, shape, in);
    for (std::size_t j = 0; j < merged.size(); ++j)
      merged[j] = da::log_add_exp(merged[j], part.lse[j]);
  }
  EXPECT_LE(max_lse_diff(all.lse, merged), 1e-10);
}

// --- Oracle 5: a branch listed twice ------------------------------------------------------------

TEST(CpuForward, Oracle5DuplicateBranchAddsLn2) {
  for (bool causal : {false, true}) {
    const Shape shape{1, 90, 3, 3, 5};
    const Inputs<double> in(shape, 9);
    const Result<double> once = run_fast(make_config({20}, {3}, causal), shape, in);
    const Result<double> twice = run_fast(make_config({20, 20}, {3, 3}, causal), shape, in);
    EXPECT_LE(max_abs_diff(once.out, twice.out), 1e-12);
    for (std::size_t j = 0; j < once.lse.size(); ++j) {
      if (std::isinf(once.lse[j])) {
        EXPECT_EQ(once.lse[j], twice.lse[j]);
      } else {
        EXPECT_NEAR(twice.lse[j] - once.lse[j], std::log(2.0), 1e-12);
      }
    }
  }
}

// --- Oracle 6: causality ----------------------------------------------------------------------

TEST(CpuForward, Oracle6FutureKeysDoNotMatter) {
  const Shape shape{1, 120, 4, 2, 8};
  const Config config = make_config({16, 64, 200}, {1, 2, 4}, true);
  Inputs<double> in(shape, 10);
  const Result<double> before = run_fast(config, shape, in);
  const std::int64_t x = 70;
  for (std::int64_t y = x + 1; y < shape.seq_len; ++y)
    for (std::int64_t h = 0; h < shape.num_kv_heads; ++h)
      for (std::int64_t d = 0; d < shape.head_dim; ++d) {
        in.k.at(0, y, h, d) = 1e3;
        in.v.at(0, y, h, d) = -5.0;
      }
  const Result<double> after = run_fast(config, shape, in);
  for (std::int64_t pos = 0; pos <= x; ++pos)
    for (std::int64_t h = 0; h < shape.num_heads; ++h)
      for (std::int64_t d = 0; d < shape.head_dim; ++d)
        ASSERT_EQ(before.out.at(0, pos, h, d), after.out.at(0, pos, h, d)) << pos << " " << h;
  // And the later rows did change: the perturbation reached the kernel.
  EXPECT_GT(max_abs_diff(before.out, after.out), 1e-3);
}

TEST(CpuForward, CausalPrefixDoesNotDependOnSequenceLength) {
  const Config config = make_config({48, 100}, {2, 3}, true);
  const Shape longer{1, 150, 3, 3, 4}, shorter{1, 110, 3, 3, 4};
  const Inputs<double> in(longer, 11);
  Inputs<double> cut(shorter, 0);
  for (std::int64_t x = 0; x < shorter.seq_len; ++x)
    for (std::int64_t h = 0; h < 3; ++h)
      for (std::int64_t d = 0; d < 4; ++d) {
        cut.q.at(0, x, h, d) = in.q.at(0, x, h, d);
        cut.k.at(0, x, h, d) = in.k.at(0, x, h, d);
        cut.v.at(0, x, h, d) = in.v.at(0, x, h, d);
      }
  const Result<double> a = run_fast(config, longer, in), b = run_fast(config, shorter, cut);
  // Equal to rounding: tile shapes (hence GEMM summation order) may differ with N.
  for (std::int64_t x = 0; x < shorter.seq_len; ++x)
    for (std::int64_t h = 0; h < 3; ++h)
      for (std::int64_t d = 0; d < 4; ++d)
        ASSERT_NEAR(a.out.at(0, x, h, d), b.out.at(0, x, h, d), 1e-13);
}

// --- Oracle 7: awkward shapes and the paper's config --------------------------------------------

TEST(CpuForward, Oracle7AwkwardShapes) {
  // N a multiple of no w, r dividing no w, H a multiple of neither G nor any r; short last
  // segments; segments longer than a key tile and windows that straddle segments.
  for (OffsetRule rule : {OffsetRule::modular, OffsetRule::blocked, OffsetRule::partitioned})
    for (Mixing mixing : {Mixing::softmax, Mixing::mean})
      for (bool causal : {false, true}) {
        const Config config = make_config({7, 45, 301}, {3, 4, 7}, causal, rule, mixing);
        expect_matches_reference<double>(config, Shape{1, 333, 5, 5, 4}, 12);
      }
}

TEST(CpuForward, Oracle7PaperConfigAtSmallN) {
  for (bool causal : {false, true}) {
    const Config config = make_config({2048, 4096, 8192, 16384, 32768}, {1, 2, 4, 6, 12}, causal);
    expect_matches_reference<double>(config, Shape{1, 150, 12, 12, 4}, 13);
    expect_matches_reference<float>(config, Shape{1, 150, 12, 4, 8}, 14);
  }
}

TEST(CpuForward, LongBlocksCrossManyTiles) {
  // Blocks of several query and key tiles, so the online softmax folds many tiles per row.
  for (bool causal : {false, true}) {
    expect_matches_reference<double>(make_config({600}, {1}, causal), Shape{1, 560, 1, 1, 8}, 15);
    expect_matches_reference<float>(make_config({1000, 300}, {2, 1}, causal),
                                    Shape{1, 620, 2, 1, 5}, 16);
  }
}

// --- Oracle 8: grouped-query attention ----------------------------------------------------------

TEST(CpuForward, Oracle8GqaEqualsRepeatedHeads) {
  const Shape gqa{2, 80, 6, 2, 4}, mha{2, 80, 6, 6, 4};
  const Config config = make_config({24, 50}, {2, 3}, true);
  const Inputs<double> in(gqa, 17);
  Inputs<double> rep(mha, 0);
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t x = 0; x < 80; ++x)
      for (std::int64_t h = 0; h < 6; ++h)
        for (std::int64_t d = 0; d < 4; ++d) {
          rep.q.at(b, x, h, d) = in.q.at(b, x, h, d);
          rep.k.at(b, x, h, d) = in.k.at(b, x, h / 3, d);
          rep.v.at(b, x, h, d) = in.v.at(b, x, h / 3, d);
        }
  const Result<double> a = run_fast(config, gqa, in), b = run_fast(config, mha, rep);
  EXPECT_EQ(max_abs_diff(a.out, b.out), 0.0);
  EXPECT_EQ(max_lse_diff(a.lse, b.lse), 0.0);
}

// --- Random configs -----------------------------------------------------------------------------

TEST(CpuForward, RandomProblemsMatchReference) {
  std::mt19937_64 engine(2026);
  da::testing::RandomConfigLimits limits;
  limits.max_batch = 2;
  limits.max_seq_len = 90;
  limits.max_segment = 40;
  limits.max_head_dim = 6;
  int cases = 0;
  for (int round = 0; round < 4; ++round)
    for (OffsetRule rule : {OffsetRule::modular, OffsetRule::blocked, OffsetRule::partitioned})
      for (bool causal : {false, true})
        for (Mixing mixing : {Mixing::softmax, Mixing::mean}) {
          da::testing::Problem p = da::testing::random_problem(engine, rule, causal, limits);
          p.config.mixing = mixing;
          if (round == 3) p.config.scale = 0.3;
          const int threads = 1 + (cases % 3);
          expect_matches_reference<double>(p.config, p.shape,
                                           100 + static_cast<std::uint64_t>(cases), cases % 2,
                                           CpuOptions{threads});
          expect_matches_reference<float>(p.config, p.shape,
                                          200 + static_cast<std::uint64_t>(cases), cases % 3,
                                          CpuOptions{threads});
          ++cases;
        }
}

TEST(CpuForward, LargerRandomProblemsMatchReference) {
  // Sizes past one window and one tile, still quick for the reference.
  std::mt19937_64 engine(77);
  da::testing::RandomConfigLimits limits;
  limits.max_seq_len = 400;
  limits.max_segment = 300;
  limits.max_head_dim = 12;
  limits.max_heads = 4;
  limits.max_branches = 3;
  for (OffsetRule rule : {OffsetRule::modular, OffsetRule::partitioned})
    for (bool causal : {false, true}) {
      const da::testing::Problem p = da::testing::random_problem(engine, rule, causal, limits);
      expect_matches_reference<double>(p.config, p.shape, 300, 1);
      expect_matches_reference<float>(p.config, p.shape, 301, 0);
    }
}

// --- Layouts and LSE ----------------------------------------------------------------------------

TEST(CpuForward, PaddedViewsAndBatches) {
  const Config config = make_config({20, 36}, {2, 3}, false, OffsetRule::modular, Mixing::mean);
  expect_matches_reference<double>(config, Shape{3, 71, 4, 2, 7}, 18, 3);
  expect_matches_reference<float>(config, Shape{3, 71, 4, 2, 7}, 19, 2);
}

TEST(CpuForward, BroadcastInputsWithZeroStrides) {
  // Inputs may broadcast (stride 0): one key/value row for every position and head, one query
  // row per head for every batch. The maps then have a zero row stride.
  const Shape shape{2, 50, 3, 3, 4};
  const Config config = make_config({16, 30}, {1, 3}, true);
  std::vector<double> q_data(3 * 4), kv_data(4);
  std::mt19937_64 engine(27);
  std::normal_distribution<double> normal;
  for (double& value : q_data) value = normal(engine);
  for (double& value : kv_data) value = normal(engine);
  const da::View<const double> q{q_data.data(), 0, 0, 4}, kv{kv_data.data(), 0, 0, 0};
  Tensor<double> got(shape, 3), want(shape, 3);
  std::vector<double> got_lse(300), want_lse(300);
  da::forward(config, shape, {q, kv, kv}, da::Outputs{got.view(), got_lse.data()}, CpuOptions{2});
  da::reference::forward(config, shape, {q, kv, kv}, da::Outputs{want.view(), want_lse.data()});
  EXPECT_LE(max_abs_diff(got, want), 1e-12);
  EXPECT_LE(max_lse_diff(got_lse, want_lse), 1e-12);
}

TEST(CpuForward, MoreThreadsThanWork) {
  const Config config = make_config({4}, {2});
  expect_matches_reference<double>(config, Shape{1, 5, 1, 1, 3}, 28, 0, CpuOptions{64});
}

TEST(CpuForward, LseIsOptionalAndDoesNotChangeTheOutput) {
  const Shape shape{2, 60, 3, 3, 4};
  const Config config = make_config({16, 33}, {1, 5}, true);
  const Inputs<float> in(shape, 20);
  const Result<float> with = run_fast(config, shape, in, {}, true);
  const Result<float> without = run_fast(config, shape, in, {}, false);
  EXPECT_EQ(max_abs_diff(with.out, without.out), 0.0);
  for (float value : without.lse) EXPECT_EQ(value, 7.0f);  // untouched
}

TEST(CpuForward, UnselectedRowsAreZeroWithMinusInfinityLse) {
  // One branch with r = 4: a head's unselected rows attend nothing.
  const Shape shape{1, 40, 1, 1, 3};
  const Inputs<double> in(shape, 21);
  const Result<double> got = run_fast(make_config({40}, {4}), shape, in);
  for (std::int64_t x = 0; x < 40; ++x) {
    if (x % 4 == 0) continue;
    for (std::int64_t d = 0; d < 3; ++d) EXPECT_EQ(got.out.at(0, x, 0, d), 0.0);
    EXPECT_EQ(got.lse[static_cast<std::size_t>(x)], -std::numeric_limits<double>::infinity());
  }
}

TEST(CpuForward, Bfloat16StorageWithFloatAccumulation) {
  const Shape shape{1, 100, 4, 2, 8};
  const Config config = make_config({32, 64}, {1, 2}, true);
  const Inputs<Eigen::bfloat16> in(shape, 22);
  const Result<Eigen::bfloat16> got = run_fast(config, shape, in);
  const Result<double> want = run_reference(config, shape, in);
  // The inputs are exact in double; the error is float accumulation plus one bf16 rounding.
  EXPECT_LE(max_abs_diff(got.out, want.out), 8e-3);
  EXPECT_LE(max_lse_diff(got.lse, want.lse), 1e-4);
}

TEST(CpuForward, HalfStorageWithFloatAccumulation) {
  const Shape shape{1, 90, 2, 2, 8};
  const Config config = make_config({30, 90}, {2, 3}, false, OffsetRule::blocked, Mixing::mean);
  const Inputs<Eigen::half> in(shape, 29);
  const Result<Eigen::half> got = run_fast(config, shape, in);
  const Result<double> want = run_reference(config, shape, in);
  EXPECT_LE(max_abs_diff(got.out, want.out), 2e-3);
  EXPECT_LE(max_lse_diff(got.lse, want.lse), 1e-4);
}

// --- Determinism (docs/semantics.md "Guarantees" (item 11)) -----------------------------------------------------------------

template <class T>
void expect_bitwise_equal(const Result<T>& a, const Result<T>& b) {
  ASSERT_EQ(a.out.storage.size(), b.out.storage.size());
  for (std::size_t i = 0; i < a.out.storage.size(); ++i)
    ASSERT_EQ(a.out.storage[i], b.out.storage[i]) << "element " << i;
  for (std::size_t i = 0; i < a.lse.size(); ++i) ASSERT_EQ(a.lse[i], b.lse[i]) << "lse " << i;
}

TEST(CpuForward, BitwiseIdenticalForAnyThreadCount) {
  // Several windows per head and blocks of several tiles, so threads really share the work.
  const Shape shape{2, 600, 2, 1, 8};
  for (bool causal : {false, true}) {
    const Config config = make_config({64, 300, 600}, {1, 2, 4}, causal);
    const Inputs<float> in(shape, 23);
    const Result<float> one = run_fast(config, shape, in, CpuOptions{1});
    for (int threads : {2, 3, 7})
      expect_bitwise_equal(one, run_fast(config, shape, in, CpuOptions{threads}));
    expect_bitwise_equal(one, run_fast(config, shape, in, CpuOptions{1}));
    expect_bitwise_equal(one, run_fast(config, shape, in, CpuOptions{7}));
  }
}

TEST(CpuForward, ThreadCountFromEnvironment) {
  const Shape shape{1, 50, 2, 2, 4};
  const Config config = make_config({16}, {2});
  const Inputs<double> in(shape, 24);
  const Result<double> plain = run_fast(config, shape, in, CpuOptions{1});
  ::setenv("DILATED_ATTENTION_NUM_THREADS", "3", 1);
  EXPECT_EQ(da::cpu::resolve_num_threads(CpuOptions{}), 3);
  EXPECT_EQ(da::cpu::resolve_num_threads(CpuOptions{2}), 2);  // explicit options win
  expect_bitwise_equal(plain, run_fast(config, shape, in));
  ::setenv("DILATED_ATTENTION_NUM_THREADS", "three", 1);
  Result<double> untouched{Tensor<double>(shape, 2), std::vector<double>(100, 7.0)};
  untouched.out.fill(7.0);
  EXPECT_THROW(da::forward(config, shape, {in.q.view(), in.k.view(), in.v.view()},
                           da::Outputs{untouched.out.view()}),
               std::invalid_argument);
  for (double value : untouched.out.storage) ASSERT_EQ(value, 7.0);
  ::unsetenv("DILATED_ATTENTION_NUM_THREADS");
  EXPECT_GE(da::cpu::resolve_num_threads(CpuOptions{}), 1);
  EXPECT_THROW(da::cpu::resolve_num_threads(CpuOptions{-1}), std::invalid_argument);
}

// --- Each instruction-set path, forced --------------------------------------------------------

class CpuForwardIsa : public da::testing::ForcedIsaTest {};

TEST_P(CpuForwardIsa, AwkwardShapesMatchReference) {
  // Head widths that are no multiple of any vector (40, 72), padded and strided views, N a
  // multiple of no w, r dividing no w, every offset rule, both mixings, causal or not.
  da::testing::for_each_awkward_case([&](const Config& config, std::int64_t dim, int cases) {
    expect_matches_reference<float>(config, Shape{1, 333, 5, 5, dim}, 40 + cases, 1 + cases % 3,
                                    options(1 + cases % 2));
    expect_matches_reference<double>(config, Shape{1, 150, 3, 3, dim}, 60 + cases, cases % 2,
                                     options(2));
  });
}

TEST_P(CpuForwardIsa, TinyBlocksAndDilationsLongerThanTheBlock) {
  // Blocks of 1-5 rows (w / r small), and a short last segment with fewer rows than r: offsets
  // past its end select nothing there.
  for (bool causal : {false, true}) {
    expect_matches_reference<float>(make_config({3, 5, 10}, {1, 2, 2}, causal),
                                    Shape{2, 37, 4, 2, 24}, 80, 1, options());
    expect_matches_reference<float>(make_config({40}, {16}, causal), Shape{1, 45, 16, 16, 8}, 81, 0,
                                    options(3));
    expect_matches_reference<double>(make_config({40, 6}, {16, 5}, causal, OffsetRule::blocked),
                                     Shape{1, 45, 8, 4, 5}, 82, 2, options(2));
  }
}

TEST_P(CpuForwardIsa, LongBlocksAndWideHeadsMatchReference) {
  // Blocks longer than a key tile and (for the 4k-long one) a key chunk, heads of 128.
  for (bool causal : {false, true}) {
    expect_matches_reference<float>(make_config({600, 300}, {1, 2}, causal),
                                    Shape{1, 600, 1, 1, 128}, 83, 0, options());
    expect_matches_reference<float>(make_config({3000}, {1}, causal), Shape{1, 1200, 1, 1, 16}, 84,
                                    0, options());
  }
}

TEST_P(CpuForwardIsa, BitwiseIdenticalForAnyThreadCount) {
  const Shape shape{2, 700, 2, 1, 40};
  const Config config = make_config({64, 300, 700}, {1, 2, 4}, true);
  const Inputs<float> in(shape, 86);
  const Result<float> one = run_fast(config, shape, in, options(1));
  for (int threads : {2, 3, 7})
    expect_bitwise_equal(one, run_fast(config, shape, in, options(threads)));
}

TEST_P(CpuForwardIsa, EnvironmentVariableSelectsThePath) {
  const Shape shape{1, 200, 2, 2, 40};
  const Config config = make_config({64, 128}, {1, 2});
  const Inputs<float> in(shape, 87);
  const Result<float> forced = run_fast(config, shape, in, options(2));
  const Result<float> from_environment = da::testing::with_isa_variable(
      GetParam(), [&] { return run_fast(config, shape, in, CpuOptions{2}); });
  expect_bitwise_equal(forced, from_environment);
}

INSTANTIATE_TEST_SUITE_P(Isa, CpuForwardIsa, da::testing::every_isa(), da::testing::isa_name);

TEST(CpuForward, PathsAgreeToRounding) {
  // Different kernels round differently (docs/design.md); each stays within float rounding of
  // the others.
  const Shape shape{1, 500, 2, 2, 72};
  const Config config = make_config({100, 500}, {1, 3}, true);
  const Inputs<float> in(shape, 88);
  const Result<float> generic = run_fast(config, shape, in, CpuOptions{2, da::CpuIsa::generic});
  for (da::CpuIsa isa : {da::CpuIsa::avx2, da::CpuIsa::avx512, da::CpuIsa::neon}) {
    if (!da::cpu::isa_supported(isa)) continue;
    const Result<float> other = run_fast(config, shape, in, CpuOptions{2, isa});
    EXPECT_LE(max_abs_diff(generic.out, other.out), 1e-5) << da::to_string(isa);
  }
}

TEST(CpuForward, UnsupportedForcedPathIsRejectedWithOutputUntouched) {
  const Shape shape{1, 20, 2, 2, 4};
  const Inputs<float> in(shape, 89);
  Tensor<float> out(shape, 2);
  out.fill(7.0f);
  for (da::CpuIsa isa :
       {da::CpuIsa::generic, da::CpuIsa::avx2, da::CpuIsa::avx512, da::CpuIsa::neon})
    if (!da::cpu::isa_supported(isa)) {
      EXPECT_THROW(
          da::forward<float>(make_config({8}, {2}), shape, {in.q.view(), in.k.view(), in.v.view()},
                             {out.view()}, CpuOptions{1, isa}),
          std::invalid_argument)
          << da::to_string(isa);
    }
  for (float value : out.storage) ASSERT_EQ(value, 7.0f);
}

// --- Bounded stack --------------------------------------------------------------------------------

// Runs body on a new thread whose stack is `bytes` long (musl's default is 128 KiB; glibc's 8 MiB
// hides stack-hungry code). An overflow crashes the test.
void run_with_stack(std::size_t bytes, const std::function<void()>& body) {
  pthread_attr_t attributes;
  ASSERT_EQ(pthread_attr_init(&attributes), 0);
  ASSERT_EQ(pthread_attr_setstacksize(&attributes, bytes), 0);
  struct Call {
    const std::function<void()>* body;
    std::exception_ptr error;
  } call{&body, nullptr};
  pthread_t thread;
  ASSERT_EQ(pthread_create(
                &thread, &attributes,
                [](void* argument) -> void* {
                  auto* c = static_cast<Call*>(argument);
                  try {
                    (*c->body)();
                  } catch (...) {
                    c->error = std::current_exception();
                  }
                  return nullptr;
                },
                &call),
            0);
  ASSERT_EQ(pthread_join(thread, nullptr), 0);
  pthread_attr_destroy(&attributes);
  if (call.error) std::rethrow_exception(call.error);
}

TEST(CpuForward, RunsOnAThreadWithA128KiBStack) {
  // Wide heads, long blocks and every path: the kernel's scratch is on the heap, only register
  // tiles are on the stack.
  const Shape shape{1, 700, 2, 2, 128};
  const Config config = make_config({700, 512}, {1, 2}, true);
  const Inputs<float> in(shape, 90);
  const Inputs<double> in_double(Shape{1, 300, 2, 2, 128}, 91);
  const Result<double> want = run_reference(config, shape, in);
  for (da::CpuIsa isa :
       {da::CpuIsa::generic, da::CpuIsa::avx2, da::CpuIsa::avx512, da::CpuIsa::neon}) {
    if (!da::cpu::isa_supported(isa)) continue;
    SCOPED_TRACE(da::to_string(isa));
    for (int threads : {1, 2}) {
      Result<float> got{Tensor<float>(shape, 2), std::vector<float>(2 * 700)};
      run_with_stack(128 * 1024, [&] {
        da::forward<float>(config, shape, {in.q.view(), in.k.view(), in.v.view()},
                           {got.out.view(), got.lse.data()}, CpuOptions{threads, isa});
      });
      EXPECT_LE(max_abs_diff(got.out, want.out), 1e-5);
    }
  }
  Result<double> got{Tensor<double>(in_double.q.shape, 2), std::vector<double>(2 * 300)};
  run_with_stack(128 * 1024, [&] {
    da::forward<double>(config, in_double.q.shape,
                        {in_double.q.view(), in_double.k.view(), in_double.v.view()},
                        {got.out.view(), got.lse.data()}, CpuOptions{1});
  });
  EXPECT_LE(max_abs_diff(got.out, run_reference(config, in_double.q.shape, in_double).out), 1e-10);
}

// --- Bad input -----------------------------------------------------------------------------------

TEST(CpuForward, RejectsBadInputWithOutputUntouched) {
  const Shape shape{1, 20, 2, 2, 4};
  const Inputs<float> in(shape, 25);
  Tensor<float> out(shape, 2);
  out.fill(7.0f);
  std::vector<float> lse(40, 7.0f);
  auto expect_rejected = [&](const Config& config, const Shape& s, da::View<float> o, float* l,
                             const CpuOptions& options) {
    EXPECT_THROW(
        da::forward(config, s, {in.q.view(), in.k.view(), in.v.view()}, da::Outputs{o, l}, options),
        std::invalid_argument);
    for (float value : out.storage) ASSERT_EQ(value, 7.0f);
    for (float value : lse) ASSERT_EQ(value, 7.0f);
  };
  const Config good = make_config({8}, {2});
  expect_rejected(make_config({8}, {9}), shape, out.view(), lse.data(), {});  // r > w
  expect_rejected(make_config({}, {}), shape, out.view(), lse.data(), {});    // no branch
  expect_rejected(good, Shape{1, 20, 2, 3, 4}, out.view(), lse.data(), {});   // H % Hkv
  expect_rejected(good, shape, out.view(), lse.data(), CpuOptions{-2});
  // Output aliasing an input.
  Inputs<float> alias(shape, 26);
  EXPECT_THROW(da::forward(good, shape, {alias.q.view(), alias.k.view(), alias.v.view()},
                           da::Outputs{alias.q.view()}),
               std::invalid_argument);
  // LSE overlapping the output.
  expect_rejected(good, shape, out.view(), out.storage.data() + 4, {});
}

}  // namespace
