// The ring backward equals the single-device backward (docs/semantics.md "The gradient") for P = 1..4 (and
// zigzag P = 1..8), with segments below, equal to, above and not a multiple of the shard length,
// causal and not, every offset rule, both mixings, MHA and GQA; every rank sends exactly the K/V
// rows its peers' queries attend (as in the forward) and receives back exactly their dK/dV
// partials; results are bitwise the same for any thread count and run to run.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include <Eigen/Core>
#include <dilated_attention/dilated_attention.hpp>

#include "support/ring_support.hpp"
#include "support/random_config.hpp"

namespace da = dilated_attention;
using da::testing::Tensor;

namespace {

double max_abs(const Tensor<double>& t) {
  double worst = 0;
  for (std::int64_t b = 0; b < t.shape.batch; ++b)
    for (std::int64_t x = 0; x < t.shape.seq_len; ++x)
      for (std::int64_t h = 0; h < t.heads; ++h)
        for (std::int64_t d = 0; d < t.shape.head_dim; ++d)
          worst = std::max(worst, std::abs(t.at(b, x, h, d)));
  return worst;
}

// One problem: inputs, the single-device forward's O and LSE, an upstream gradient, and the
// single-device gradients (fast CPU backward and fp64 reference).
template <class T>
struct Problem {
  da::Config config;
  da::Shape shape;
  Tensor<T> q, k, v, out, d_out;
  std::vector<da::lse_type_t<T>> lse;
  Tensor<T> d_q, d_k, d_v;             // dilated_attention::backward<T>
  Tensor<double> ref_q, ref_k, ref_v;  // reference::backward<double> (double inputs only)

  // with_reference = false: only the fast single-device backward is the oracle (for larger N).
  Problem(const da::Config& c, const da::Shape& s, std::uint64_t seed, bool with_reference = true)
      : config(c), shape(s) {
    q = Tensor<T>(s, s.num_heads, 1, 3);
    k = Tensor<T>(s, s.num_kv_heads, 2);
    v = Tensor<T>(s, s.num_kv_heads, 0, 5);
    out = Tensor<T>(s, s.num_heads);
    d_out = Tensor<T>(s, s.num_heads, 3);
    q.fill_random(seed);
    k.fill_random(seed + 1);
    v.fill_random(seed + 2);
    d_out.fill_random(seed + 3);
    lse.assign(static_cast<std::size_t>(s.batch * s.num_heads * s.seq_len), 0);
    da::forward<T>(config, shape, {q.view(), k.view(), v.view()}, {out.view(), lse.data()});
    d_q = Tensor<T>(s, s.num_heads);
    d_k = Tensor<T>(s, s.num_kv_heads);
    d_v = Tensor<T>(s, s.num_kv_heads);
    da::backward<T>(config, shape, {q.view(), k.view(), v.view()}, {out.view(), lse.data()},
                    d_out.view(), {d_q.view(), d_k.view(), d_v.view()});
    if constexpr (std::is_same_v<T, double>) {
      if (!with_reference) return;
      ref_q = Tensor<double>(s, s.num_heads);
      ref_k = Tensor<double>(s, s.num_kv_heads);
      ref_v = Tensor<double>(s, s.num_kv_heads);
      da::reference::backward<double>(config, shape, {q.view(), k.view(), v.view()},
                                      {out.view(), lse.data()}, d_out.view(),
                                      {ref_q.view(), ref_k.view(), ref_v.view()});
    }
  }

  da::testing::RingGradients<T> ring(int num_ranks, da::ring::Options options = {}) const {
    return da::testing::run_ring_backward_in_process<T>(config, shape, q, k, v, out, lse, d_out,
                                                        num_ranks, options);
  }

  // Largest difference to the single-device and reference gradients, relative to the largest
  // reference gradient (at least 1).
  void expect_exact(const da::testing::RingGradients<double>& run, double tolerance) const {
    const double scale = ref_q.storage.empty()
                             ? std::max({1.0, max_abs(d_q), max_abs(d_k), max_abs(d_v)})
                             : std::max({1.0, max_abs(ref_q), max_abs(ref_k), max_abs(ref_v)});
    EXPECT_LE(da::testing::max_abs_diff(run.d_q, d_q), tolerance * scale);
    EXPECT_LE(da::testing::max_abs_diff(run.d_k, d_k), tolerance * scale);
    EXPECT_LE(da::testing::max_abs_diff(run.d_v, d_v), tolerance * scale);
    if (ref_q.storage.empty()) return;
    EXPECT_LE(da::testing::max_abs_diff(run.d_q, ref_q), tolerance * scale);
    EXPECT_LE(da::testing::max_abs_diff(run.d_k, ref_k), tolerance * scale);
    EXPECT_LE(da::testing::max_abs_diff(run.d_v, ref_v), tolerance * scale);
  }
};

using Param = da::testing::RingSweepParam;

class RingBackward : public ::testing::TestWithParam<Param> {};

TEST_P(RingBackward, EqualsSingleDeviceAndReturnsExactlyThePartialsOfSentRows) {
  const auto [set, rule, mixing, causal, gqa] = GetParam();
  const da::testing::RingBranches& branches =
      da::testing::ring_branch_sets()[static_cast<std::size_t>(set)];
  da::Config config;
  config.segment_lengths = branches.w;
  config.dilation_rates = branches.r;
  config.causal = causal;
  config.offsets = rule;
  config.mixing = mixing;
  const Problem<double> problem(config, da::Shape{2, 24, 4, gqa ? 2 : 4, 8},
                                17 + static_cast<std::uint64_t>(set));
  const da::Pattern pattern(config, problem.shape);

  for (int num_ranks = 1; num_ranks <= 4; ++num_ranks) {
    SCOPED_TRACE("P = " + std::to_string(num_ranks));
    const auto run = problem.ring(num_ranks);
    problem.expect_exact(run, 1e-12);

    // Bytes: the K/V rows out are the forward's (brute force over the pattern); the partials that
    // come back are exactly those rows' dK and dV, in the accumulator type (double here).
    std::vector<std::vector<bool>> talks;
    const auto needed = da::testing::needed_bytes(pattern, num_ranks, sizeof(double), &talks);
    std::int64_t all_sent = 0, all_returned = 0;
    for (int p = 0; p < num_ranks; ++p) {
      SCOPED_TRACE("rank " + std::to_string(p));
      const da::ring::Stats& stats = run.stats[static_cast<std::size_t>(p)];
      std::int64_t rows_out = 0, peers = 0;
      for (std::int64_t i = 0; i < pattern.num_branches(); ++i) {
        EXPECT_EQ(stats.bytes_sent_per_branch[static_cast<std::size_t>(i)],
                  needed[static_cast<std::size_t>(p)][static_cast<std::size_t>(i)]);
        rows_out += needed[static_cast<std::size_t>(p)][static_cast<std::size_t>(i)];
      }
      for (int q = 0; q < num_ranks; ++q)
        peers += talks[static_cast<std::size_t>(p)][static_cast<std::size_t>(q)] ? 1 : 0;
      EXPECT_EQ(stats.bytes_sent, rows_out);
      EXPECT_EQ(stats.gradient_bytes_received, rows_out);  // every row sent comes back, once
      EXPECT_EQ(stats.gradient_bytes_sent, stats.bytes_received);
      EXPECT_EQ(stats.gradient_recvs, peers);
      EXPECT_EQ(stats.gradient_sends, stats.recvs_posted);
      EXPECT_EQ(run.transport_bytes[static_cast<std::size_t>(p)],
                stats.bytes_sent + stats.gradient_bytes_sent);
      EXPECT_EQ(run.transport_sends[static_cast<std::size_t>(p)],
                stats.sends_posted + stats.gradient_sends);
      all_sent += stats.gradient_bytes_sent;
      all_returned += stats.gradient_bytes_received;
    }
    EXPECT_EQ(all_sent, all_returned);
  }

  for (int num_ranks : {1, 2, 3, 4, 6}) {
    SCOPED_TRACE("zigzag P = " + std::to_string(num_ranks));
    da::ring::Options options;
    options.layout = da::ring::Layout::zigzag;
    problem.expect_exact(problem.ring(num_ranks, options), 1e-12);
  }
}

INSTANTIATE_TEST_SUITE_P(Sweep, RingBackward, da::testing::ring_sweep_values(),
                         da::testing::ring_sweep_name);

// Mean mixing recomputes each branch's statistics over the steps' blocks only where some head
// has rows in several branches (docs/semantics.md "Gradient of the mean mixing"). Under
// partitioned every head has one branch: the backward computes the softmax preset's blocks
// (no statistics pass) and still equals the single-device gradient. Under modular each head
// runs every branch: the statistics pass doubles the blocks.
TEST(RingBackward, MeanRecomputesStatisticsOnlyWhereAHeadHasSeveralBranches) {
  for (const da::OffsetRule rule : {da::OffsetRule::partitioned, da::OffsetRule::modular}) {
    std::int64_t blocks[2] = {0, 0};
    for (const da::Mixing mixing : {da::Mixing::softmax, da::Mixing::mean}) {
      da::Config config = da::testing::make_config({8, 16, 48}, {1, 2, 4});
      config.offsets = rule;
      config.mixing = mixing;
      config.causal = true;
      const Problem<double> problem(config, da::Shape{1, 48, 6, 3, 8}, 41);
      const auto run = problem.ring(3);
      problem.expect_exact(run, 1e-12);
      for (const da::ring::Stats& stats : run.stats)
        blocks[mixing == da::Mixing::mean] += stats.blocks_computed;
    }
    SCOPED_TRACE(da::to_string(rule));
    if (rule == da::OffsetRule::partitioned)
      EXPECT_EQ(blocks[1], blocks[0]);
    else
      EXPECT_EQ(blocks[1], 2 * blocks[0]);
  }
}

// Zigzag at every P = 1..8 (N = 1680 = lcm(2, 4, ..., 16)), LongNet-like branches below, across
// and beyond the chunks: each rule and mixing once, causal and not, GQA.
TEST(RingBackward, ZigzagEqualsSingleDeviceForEveryPUpTo8) {
  struct Combo {
    da::OffsetRule rule;
    da::Mixing mixing;
    bool causal;
  };
  for (const Combo& combo : {Combo{da::OffsetRule::modular, da::Mixing::softmax, true},
                             Combo{da::OffsetRule::blocked, da::Mixing::mean, true},
                             Combo{da::OffsetRule::partitioned, da::Mixing::softmax, false}}) {
    const da::Config config = [&] {
      da::Config c = da::testing::make_config({60, 280, 1680}, {1, 2, 4});
      c.offsets = combo.rule;
      c.mixing = combo.mixing;
      c.causal = combo.causal;
      return c;
    }();
    const Problem<double> problem(config, da::Shape{1, 1680, 4, 2, 4}, 71);
    for (int num_ranks = 1; num_ranks <= 8; ++num_ranks) {
      SCOPED_TRACE(std::string(da::to_string(combo.rule)) + " " + da::to_string(combo.mixing) +
                   (combo.causal ? " causal" : "") + " P = " + std::to_string(num_ranks));
      da::ring::Options options;
      options.layout = da::ring::Layout::zigzag;
      problem.expect_exact(problem.ring(num_ranks, options), 1e-12);
    }
  }
}

// Zigzag at the P the N = 24 sweep cannot reach (5, 7, 8; N = 560 = lcm(10, 14, 16)), every rule,
// mixing, causal and not, MHA and GQA, against the fast single-device backward.
class RingBackwardZigzag : public ::testing::TestWithParam<da::testing::RingComboParam> {};

TEST_P(RingBackwardZigzag, EqualsSingleDeviceAtP5P7P8) {
  const auto [rule, mixing, causal, gqa] = GetParam();
  const da::Config config = da::testing::ring_zigzag_config(rule, mixing, causal);
  const Problem<double> problem(config, da::Shape{1, 560, 4, gqa ? 2 : 4, 4}, 29, false);
  for (int num_ranks : {5, 7, 8}) {
    SCOPED_TRACE("zigzag P = " + std::to_string(num_ranks));
    da::ring::Options options;
    options.layout = da::ring::Layout::zigzag;
    problem.expect_exact(problem.ring(num_ranks, options), 1e-12);
  }
}

INSTANTIATE_TEST_SUITE_P(EveryCombination, RingBackwardZigzag, da::testing::ring_combo_values());

// Float storage, several compute threads, both posting orders: within float rounding of the
// single-device backward, and bitwise the same for any thread count and from run to run.
TEST(RingBackward, FloatStorageIsBitwiseReproducibleForAnyThreadCount) {
  for (const da::Mixing mixing : {da::Mixing::softmax, da::Mixing::mean}) {
    da::Config config = da::testing::make_config({16, 40, 96}, {1, 2, 4});
    config.causal = true;
    config.mixing = mixing;
    const Problem<float> problem(config, da::Shape{1, 96, 6, 3, 16}, 5);
    double scale = 1;
    for (const Tensor<float>* t : {&problem.d_q, &problem.d_k, &problem.d_v})
      for (float value : t->storage) scale = std::max(scale, static_cast<double>(std::abs(value)));
    for (int num_ranks : {2, 3, 4}) {
      SCOPED_TRACE(std::string(da::to_string(mixing)) + " P = " + std::to_string(num_ranks));
      da::ring::Options options;
      const auto one = problem.ring(num_ranks, options);
      options.device.num_threads = 3;
      const auto three = problem.ring(num_ranks, options);
      const auto again = problem.ring(num_ranks, options);
      options.post_early = false;
      options.drive_progress = false;
      const auto late = problem.ring(num_ranks, options);
      EXPECT_LE(da::testing::max_abs_diff(one.d_q, problem.d_q), 2e-5 * scale);
      EXPECT_LE(da::testing::max_abs_diff(one.d_k, problem.d_k), 2e-5 * scale);
      EXPECT_LE(da::testing::max_abs_diff(one.d_v, problem.d_v), 2e-5 * scale);
      EXPECT_LE(da::testing::max_abs_diff(late.d_k, problem.d_k), 2e-5 * scale);
      for (const auto* run : {&three, &again}) {
        EXPECT_EQ(one.d_q.storage, run->d_q.storage);
        EXPECT_EQ(one.d_k.storage, run->d_k.storage);
        EXPECT_EQ(one.d_v.storage, run->d_v.storage);
      }
    }
  }
}

// bfloat16 and half storage accumulate in float, exactly as float storage of the same values
// does, and round each gradient once: bitwise the float ring's result, rounded.
template <class Narrow>
void expect_rounded_float_result() {
  da::Config config = da::testing::make_config({12, 32, 48}, {1, 2, 3});
  config.causal = true;
  const da::Shape shape{1, 48, 4, 2, 16};
  const Problem<Narrow> narrow(config, shape, 9);
  const auto widen = [](const Tensor<Narrow>& t) {
    Tensor<float> w(t.shape, t.heads);
    for (std::int64_t b = 0; b < t.shape.batch; ++b)
      for (std::int64_t x = 0; x < t.shape.seq_len; ++x)
        for (std::int64_t h = 0; h < t.heads; ++h)
          for (std::int64_t d = 0; d < t.shape.head_dim; ++d)
            w.at(b, x, h, d) = static_cast<float>(t.at(b, x, h, d));
    return w;
  };
  const Tensor<float> q = widen(narrow.q), k = widen(narrow.k), v = widen(narrow.v),
                      out = widen(narrow.out), d_out = widen(narrow.d_out);
  for (int num_ranks : {2, 3}) {
    SCOPED_TRACE("P = " + std::to_string(num_ranks));
    const auto got = narrow.ring(num_ranks);
    const auto wide = da::testing::run_ring_backward_in_process<float>(
        config, shape, q, k, v, out, narrow.lse, d_out, num_ranks);
    for (const auto& [g, w] : {std::pair{&got.d_q, &wide.d_q}, std::pair{&got.d_k, &wide.d_k},
                               std::pair{&got.d_v, &wide.d_v}})
      for (std::int64_t x = 0; x < shape.seq_len; ++x)
        for (std::int64_t h = 0; h < g->heads; ++h)
          for (std::int64_t d = 0; d < shape.head_dim; ++d)
            ASSERT_EQ(static_cast<float>(g->at(0, x, h, d)),
                      static_cast<float>(static_cast<Narrow>(w->at(0, x, h, d))))
                << "x " << x << " h " << h << " d " << d;
  }
}
TEST(RingBackward, BFloat16IsTheFloatResultRoundedOnce) {
  expect_rounded_float_result<Eigen::bfloat16>();
}
TEST(RingBackward, HalfIsTheFloatResultRoundedOnce) { expect_rounded_float_result<Eigen::half>(); }

// Longer sequence, LongNet-like branches and several threads on 4 ranks: the fast single-device
// backward, to float rounding.
TEST(RingBackward, EqualsCpuBackwardOnALongerSequence) {
  da::Config config = da::testing::make_config({128, 256, 512}, {1, 2, 4});
  const Problem<float> problem(config, da::Shape{1, 512, 4, 4, 32}, 41);
  da::ring::Options options;
  options.device.num_threads = 2;
  const auto run = problem.ring(4, options);
  double scale = 1;
  for (const Tensor<float>* t : {&problem.d_q, &problem.d_k, &problem.d_v})
    for (float value : t->storage) scale = std::max(scale, static_cast<double>(std::abs(value)));
  EXPECT_LE(da::testing::max_abs_diff(run.d_q, problem.d_q), 2e-5 * scale);
  EXPECT_LE(da::testing::max_abs_diff(run.d_k, problem.d_k), 2e-5 * scale);
  EXPECT_LE(da::testing::max_abs_diff(run.d_v, problem.d_v), 2e-5 * scale);
}

}  // namespace
