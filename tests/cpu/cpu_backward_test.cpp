// dilated_attention::backward (the threaded CPU backward, docs/semantics.md "The gradient") against
// reference::backward (fp64, itself checked against finite differences of reference::forward):
// every offset rule x mixing x causal, GQA, partitioned with H not a multiple of G, r not
// dividing w, N a multiple of no segment, w >= N, batches, padded views (padding untouched),
// D = 64 and 128, empty rows, narrow storage, mean with the forward's statistics for heads that
// one branch selects rows for (and a mix of such heads with others); bitwise determinism across thread counts and calls;
// a thread with a 128 KiB stack; one test per bad input.

#include <dilated_attention/dilated_attention.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <pthread.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "support/forced_isa.hpp"
#include "support/random_config.hpp"
#include "support/tensors.hpp"

namespace {

namespace da = dilated_attention;
namespace dt = dilated_attention::testing;
using da::Config;
using da::CpuOptions;
using da::Mixing;
using da::OffsetRule;
using da::Shape;
using dt::copy_to_double;
using dt::make_config;
using dt::Tensor;
using ::testing::HasSubstr;

template <class T>
const T sentinel_value = T(7);

// Whether every storage element outside the tensor's logical extent still holds `value`.
template <class T>
bool padding_holds(const Tensor<T>& t, T value) {
  std::vector<char> logical(t.storage.size(), 0);
  for (std::int64_t b = 0; b < t.shape.batch; ++b)
    for (std::int64_t x = 0; x < t.shape.seq_len; ++x)
      for (std::int64_t h = 0; h < t.heads; ++h)
        for (std::int64_t d = 0; d < t.shape.head_dim; ++d)
          logical[static_cast<std::size_t>(b * t.batch_stride + x * t.seq_stride +
                                           h * t.head_stride + d)] = 1;
  for (std::size_t i = 0; i < t.storage.size(); ++i)
    if (!logical[i] && !(t.storage[i] == value)) return false;
  return true;
}

// One backward problem in storage type T: padded inputs, the fast forward's (out, lse) for them,
// a random d_out, and exact double copies for the reference.
template <class T>
struct Problem {
  Config config;
  Shape shape;
  std::int64_t pad;
  Tensor<T> q, k, v, out, d_out;
  std::vector<da::lse_type_t<T>> lse;
  Tensor<double> qd, kd, vd, outd, d_outd;

  Problem(const Config& c, const Shape& s, std::uint64_t seed, std::int64_t pad_ = 0)
      : config(c),
        shape(s),
        pad(pad_),
        q(s, s.num_heads, pad_, pad_),
        k(s, s.num_kv_heads, pad_ + 1, pad_),
        v(s, s.num_kv_heads, pad_, pad_ + 2),
        out(s, s.num_heads, pad_, 0),
        d_out(s, s.num_heads, 0, pad_ + 1),
        lse(dt::lse_size(s)),
        qd(s, s.num_heads),
        kd(s, s.num_kv_heads),
        vd(s, s.num_kv_heads),
        outd(s, s.num_heads),
        d_outd(s, s.num_heads) {
    q.fill_random(seed);
    k.fill_random(seed + 1);
    v.fill_random(seed + 2);
    d_out.fill_random(seed + 3);
    da::forward<T>(config, shape, {q.view(), k.view(), v.view()}, {out.view(), lse.data()},
                   CpuOptions{2});
    copy_to_double(q, qd);
    copy_to_double(k, kd);
    copy_to_double(v, vd);
    copy_to_double(out, outd);
    copy_to_double(d_out, d_outd);
  }
};

template <class T>
struct Gradients {
  Tensor<T> d_q, d_k, d_v;
  Gradients(const Shape& s, std::int64_t pad)
      : d_q(s, s.num_heads, pad + 2, pad),
        d_k(s, s.num_kv_heads, pad, pad + 1),
        d_v(s, s.num_kv_heads, pad + 1, pad + 3) {
    for (Tensor<T>* t : {&d_q, &d_k, &d_v}) t->fill(sentinel_value<T>);
  }
};

template <class T>
Gradients<T> run_fast(const Problem<T>& p, const CpuOptions& options = {}) {
  Gradients<T> g(p.shape, p.pad);
  da::backward<T>(p.config, p.shape, {p.q.view(), p.k.view(), p.v.view()},
                  {p.out.view(), p.lse.data()}, p.d_out.view(),
                  {g.d_q.view(), g.d_k.view(), g.d_v.view()}, options);
  return g;
}

template <class T>
Gradients<double> run_reference(const Problem<T>& p) {
  Gradients<double> g(p.shape, 0);
  std::vector<double> lse(p.lse.begin(), p.lse.end());
  da::reference::backward<double>(p.config, p.shape, {p.qd.view(), p.kd.view(), p.vd.view()},
                                  {p.outd.view(), lse.data()}, p.d_outd.view(),
                                  {g.d_q.view(), g.d_k.view(), g.d_v.view()});
  return g;
}

template <class A>
double max_abs(const Tensor<A>& t) {
  double worst = 0.0;
  for (std::int64_t b = 0; b < t.shape.batch; ++b)
    for (std::int64_t x = 0; x < t.shape.seq_len; ++x)
      for (std::int64_t h = 0; h < t.heads; ++h)
        for (std::int64_t d = 0; d < t.shape.head_dim; ++d)
          worst = std::max(worst, std::abs(static_cast<double>(t.at(b, x, h, d))));
  return worst;
}

double tolerance_for(double) { return 1e-10; }
double tolerance_for(float) { return 1e-4; }
// Narrow storage: O (read for D = dO·O) and each gradient are stored rounded, with unit roundoff
// u = 2^-8 (bfloat16) or 2^-11 (half); everything else accumulates in float. The tolerance is 4u
// of the largest gradient; the worst case measured over these tests is 0.8u (bfloat16) and 0.6u
// (half), i.e. the rounding of the stored gradient itself plus a little from O.
double tolerance_for(Eigen::bfloat16) { return 4.0 / 256.0; }
double tolerance_for(Eigen::half) { return 4.0 / 2048.0; }

// The largest entry of the three gradients: the scale errors are measured against. (One
// gradient alone can be exactly zero, e.g. dQ and dK when every row attends only itself, and
// then its own rounding residue has nothing to be relative to.)
double gradient_magnitude(const Gradients<double>& g) {
  return std::max({max_abs(g.d_q), max_abs(g.d_k), max_abs(g.d_v)});
}

// Each gradient against the reference, relative to the largest gradient; padding untouched.
template <class T>
void expect_matches_reference(const Problem<T>& p, const CpuOptions& options = {}) {
  SCOPED_TRACE(dt::describe(p.config, p.shape));
  const Gradients<T> got = run_fast(p, options);
  const Gradients<double> want = run_reference(p);
  const char* names[3] = {"d_q", "d_k", "d_v"};
  const Tensor<T>* gots[3] = {&got.d_q, &got.d_k, &got.d_v};
  const Tensor<double>* wants[3] = {&want.d_q, &want.d_k, &want.d_v};
  const double tolerance = tolerance_for(T{}) * gradient_magnitude(want);
  for (int i = 0; i < 3; ++i) {
    EXPECT_LE(dt::max_abs_diff(*gots[i], *wants[i]), tolerance) << names[i];
    EXPECT_TRUE(padding_holds(*gots[i], sentinel_value<T>)) << names[i] << ": padding was written";
  }
}

template <class T>
void expect_matches_reference(const Config& config, const Shape& shape, std::uint64_t seed,
                              std::int64_t pad = 0, const CpuOptions& options = {}) {
  expect_matches_reference(Problem<T>(config, shape, seed, pad), options);
}

// --- Against the reference ---------------------------------------------------------------------

TEST(CpuBackward, EveryRuleMixingAndMaskOnAwkwardShapes) {
  // N a multiple of no w, r dividing no w, H a multiple of neither G nor any r, short last
  // segments, a segment longer than a tile.
  for (OffsetRule rule : {OffsetRule::modular, OffsetRule::blocked, OffsetRule::partitioned})
    for (Mixing mixing : {Mixing::softmax, Mixing::mean})
      for (bool causal : {false, true}) {
        const Config config = make_config({7, 45, 301}, {3, 4, 7}, causal, rule, mixing);
        expect_matches_reference<double>(config, Shape{1, 333, 5, 5, 4}, 12, 1);
        expect_matches_reference<float>(config, Shape{1, 333, 5, 5, 4}, 13, 0);
      }
}

TEST(CpuBackward, GroupedQueryAttention) {
  for (OffsetRule rule : {OffsetRule::modular, OffsetRule::blocked, OffsetRule::partitioned})
    for (Mixing mixing : {Mixing::softmax, Mixing::mean})
      for (bool causal : {false, true}) {
        const Config config = make_config({24, 50}, {2, 3}, causal, rule, mixing);
        expect_matches_reference<double>(config, Shape{2, 80, 6, 2, 5}, 14, 2);
        expect_matches_reference<float>(config, Shape{1, 80, 6, 3, 5}, 15, 1);
      }
}

TEST(CpuBackward, PartitionedWithHeadsNotAMultipleOfBranches) {
  for (Mixing mixing : {Mixing::softmax, Mixing::mean})
    for (bool causal : {false, true}) {
      const Config config =
          make_config({16, 40, 100}, {1, 3, 5}, causal, OffsetRule::partitioned, mixing);
      expect_matches_reference<double>(config, Shape{1, 130, 5, 5, 6}, 16);
      expect_matches_reference<double>(config, Shape{2, 130, 7, 1, 6}, 17, 1);
    }
}

TEST(CpuBackward, SegmentsAtLeastTheSequence) {
  for (Mixing mixing : {Mixing::softmax, Mixing::mean})
    for (bool causal : {false, true}) {
      const Config config =
          make_config({100, 300, 900}, {1, 2, 3}, causal, OffsetRule::modular, mixing);
      expect_matches_reference<double>(config, Shape{1, 300, 3, 3, 8}, 18);
      expect_matches_reference<float>(config, Shape{2, 300, 3, 1, 8}, 19, 1);
    }
}

// Mean mixing where a head's rows are selected by one branch only: the backward takes that
// head's LSE and D from the forward instead of recomputing them (docs/semantics.md "Gradient of
// the mean mixing"). Every head so (partitioned, G = 1), and a mix of such heads with heads
// that several branches select (the others' statistics recomputed, one set per branch).
TEST(CpuBackward, MeanWithTheForwardsStatistics) {
  for (bool causal : {false, true}) {
    // partitioned: N a multiple of no w, H a multiple of no G, GQA, a tile-crossing block.
    const Config partitioned =
        make_config({7, 45, 301}, {3, 4, 7}, causal, OffsetRule::partitioned, Mixing::mean);
    expect_matches_reference<double>(partitioned, Shape{1, 333, 5, 5, 4}, 40, 1);
    expect_matches_reference<float>(partitioned, Shape{2, 333, 5, 5, 6}, 41);
    expect_matches_reference<double>(partitioned, Shape{2, 211, 8, 2, 5}, 42, 2);
    expect_matches_reference<float>(partitioned, Shape{1, 211, 7, 7, 64}, 43, 1);
    expect_matches_reference<Eigen::bfloat16>(partitioned, Shape{1, 333, 5, 1, 8}, 44);
    expect_matches_reference<Eigen::half>(partitioned, Shape{1, 333, 4, 2, 8}, 45, 1);
    // G = 1 under modular: O = O_1 / 1, LSE = LSE_1.
    const Config single = make_config({50}, {3}, causal, OffsetRule::modular, Mixing::mean);
    expect_matches_reference<double>(single, Shape{1, 173, 4, 2, 7}, 46, 1);
    expect_matches_reference<float>(single, Shape{2, 173, 4, 4, 8}, 47);
    expect_matches_reference<Eigen::bfloat16>(single, Shape{1, 173, 4, 1, 8}, 48);
    // N < w: under modular, heads 10, 11 have offset 10, 11 in branch 0, beyond its only
    // segment, so branch 1 alone selects their rows; heads 0-9 have rows in both branches.
    const Config mixed = make_config({20, 10}, {12, 1}, causal, OffsetRule::modular, Mixing::mean);
    expect_matches_reference<double>(mixed, Shape{2, 10, 12, 4, 5}, 49, 1);
    expect_matches_reference<float>(mixed, Shape{1, 10, 12, 12, 6}, 50);
    expect_matches_reference<Eigen::half>(mixed, Shape{1, 10, 12, 3, 8}, 51);
    // Heads 10, 11 select no row in either branch (empty rows); the rest in both.
    const Config none = make_config({20, 16}, {12, 12}, causal, OffsetRule::modular, Mixing::mean);
    expect_matches_reference<double>(none, Shape{1, 10, 12, 6, 5}, 52, 1);
    expect_matches_reference<float>(none, Shape{1, 10, 12, 2, 5}, 53);
  }
}

TEST(CpuBackward, LongBlocksCrossManyTiles) {
  // Blocks of several query and key tiles in both passes, and windows that cut blocks.
  for (bool causal : {false, true}) {
    expect_matches_reference<double>(make_config({600}, {1}, causal), Shape{1, 560, 1, 1, 8}, 20);
    expect_matches_reference<float>(make_config({1000, 300}, {2, 1}, causal),
                                    Shape{1, 620, 2, 1, 5}, 21);
  }
}

TEST(CpuBackward, WideHeads) {
  for (std::int64_t dim : {64, 128})
    for (Mixing mixing : {Mixing::softmax, Mixing::mean}) {
      const Config config = make_config({64, 200}, {1, 3}, true, OffsetRule::modular, mixing);
      expect_matches_reference<double>(config, Shape{1, 260, 2, 1, dim}, 22, 1);
      expect_matches_reference<float>(config, Shape{1, 260, 2, 2, dim}, 23);
    }
}

TEST(CpuBackward, PaperConfigAtSmallN) {
  for (bool causal : {false, true}) {
    const Config config = make_config({2048, 4096, 8192, 16384, 32768}, {1, 2, 4, 6, 12}, causal);
    expect_matches_reference<double>(config, Shape{1, 150, 12, 12, 4}, 24);
    expect_matches_reference<float>(config, Shape{1, 150, 12, 4, 8}, 25);
  }
}

TEST(CpuBackward, RepeatedBranchAndCustomScale) {
  for (Mixing mixing : {Mixing::softmax, Mixing::mean}) {
    Config config = make_config({20, 20, 33}, {3, 3, 2}, true, OffsetRule::blocked, mixing);
    config.scale = 0.3;
    expect_matches_reference<double>(config, Shape{1, 90, 4, 2, 5}, 26, 1);
  }
}

TEST(CpuBackward, RandomProblems) {
  std::mt19937_64 engine(2027);
  dt::RandomConfigLimits limits;
  limits.max_batch = 2;
  limits.max_seq_len = 90;
  limits.max_segment = 40;
  limits.max_head_dim = 6;
  int cases = 0;
  for (int round = 0; round < 3; ++round)
    for (OffsetRule rule : {OffsetRule::modular, OffsetRule::blocked, OffsetRule::partitioned})
      for (bool causal : {false, true})
        for (Mixing mixing : {Mixing::softmax, Mixing::mean}) {
          dt::Problem p = dt::random_problem(engine, rule, causal, limits);
          p.config.mixing = mixing;
          if (round == 2) p.config.scale = 0.4;
          const CpuOptions options{1 + cases % 3};
          expect_matches_reference<double>(
              p.config, p.shape, 100 + static_cast<std::uint64_t>(cases), cases % 2, options);
          expect_matches_reference<float>(
              p.config, p.shape, 200 + static_cast<std::uint64_t>(cases), cases % 3, options);
          ++cases;
        }
}

TEST(CpuBackward, BroadcastInputsWithZeroStrides) {
  const Shape shape{2, 50, 3, 3, 4};
  const Config config = make_config({16, 30}, {1, 3}, true);
  std::vector<double> q_data(3 * 4), kv_data(4), out_data(2 * 50 * 3 * 4), d_out_data(3 * 4);
  std::mt19937_64 engine(27);
  std::normal_distribution<double> normal;
  for (double& value : q_data) value = normal(engine);
  for (double& value : kv_data) value = normal(engine);
  for (double& value : d_out_data) value = normal(engine);
  const da::View<const double> q{q_data.data(), 0, 0, 4}, kv{kv_data.data(), 0, 0, 0},
      d_out{d_out_data.data(), 0, 0, 4};
  const da::View<double> out = da::contiguous_view(out_data.data(), shape, 3);
  std::vector<double> lse(dt::lse_size(shape));
  da::forward<double>(config, shape, {q, kv, kv}, {out, lse.data()});
  Tensor<double> dq(shape, 3), dk(shape, 3), dv(shape, 3), rq(shape, 3), rk(shape, 3), rv(shape, 3);
  da::backward<double>(config, shape, {q, kv, kv}, {out, lse.data()}, d_out,
                       {dq.view(), dk.view(), dv.view()}, CpuOptions{2});
  da::reference::backward<double>(config, shape, {q, kv, kv}, {out, lse.data()}, d_out,
                                  {rq.view(), rk.view(), rv.view()});
  const double tolerance = 1e-10 * std::max({max_abs(rq), max_abs(rk), max_abs(rv)});
  EXPECT_LE(dt::max_abs_diff(dq, rq), tolerance);
  EXPECT_LE(dt::max_abs_diff(dk, rk), tolerance);
  EXPECT_LE(dt::max_abs_diff(dv, rv), tolerance);
}

TEST(CpuBackward, EmptyRowsAndUnattendedKeysAreZero) {
  // One branch with r = 4 (modular, 1 head): rows 1-3 of every 4 attend nothing and are attended
  // by nothing. Partitioned: each head misses every branch but its own.
  for (Mixing mixing : {Mixing::softmax, Mixing::mean}) {
    const Problem<double> p(make_config({40}, {4}, false, OffsetRule::modular, mixing),
                            Shape{1, 40, 1, 1, 3}, 28);
    const Gradients<double> g = run_fast(p);
    for (std::int64_t x = 0; x < 40; ++x)
      for (std::int64_t d = 0; d < 3; ++d) {
        const bool selected = x % 4 == 0;
        EXPECT_EQ(g.d_q.at(0, x, 0, d) == 0.0, !selected) << x;
        EXPECT_EQ(g.d_k.at(0, x, 0, d) == 0.0, !selected) << x;
        EXPECT_EQ(g.d_v.at(0, x, 0, d) == 0.0, !selected) << x;
      }
    expect_matches_reference(p);
    const Config partitioned = make_config({12, 30}, {2, 3}, true, OffsetRule::partitioned, mixing);
    const Problem<float> f(partitioned, Shape{1, 61, 3, 1, 4}, 29, 1);
    const Gradients<float> fg = run_fast(f);
    for (const Tensor<float>* t : {&fg.d_q, &fg.d_k, &fg.d_v})
      for (std::int64_t x = 0; x < 61; ++x)
        for (std::int64_t h = 0; h < t->heads; ++h)
          for (std::int64_t d = 0; d < 4; ++d) ASSERT_TRUE(std::isfinite(t->at(0, x, h, d)));
    expect_matches_reference(f);
  }
}

TEST(CpuBackward, Bfloat16AndHalfStorage) {
  for (Mixing mixing : {Mixing::softmax, Mixing::mean}) {
    const Config config = make_config({32, 64}, {1, 2}, true, OffsetRule::modular, mixing);
    expect_matches_reference<Eigen::bfloat16>(config, Shape{1, 100, 4, 2, 8}, 30, 1);
    expect_matches_reference<Eigen::half>(config, Shape{1, 90, 2, 2, 8}, 31);
    expect_matches_reference<Eigen::bfloat16>(config, Shape{1, 130, 2, 1, 64}, 32);
    expect_matches_reference<Eigen::half>(config, Shape{1, 130, 2, 1, 64}, 33, 1);
  }
}

// --- The block primitive on its own ---------------------------------------------------------

TEST(CpuAttendGrad, AllThreeGradientsInOneCallEqualTheReference) {
  // One dense branch is one block: the primitive over every row, with the forward's statistics,
  // is the whole gradient. Strided rows (every other position of a padded tensor) and the fused
  // mode that the driver does not use.
  for (bool causal : {false, true}) {
    const Shape shape{1, 300, 1, 1, 7};
    const Problem<double> p(make_config({300}, {1}, causal), shape, 34, 2);
    const Gradients<double> want = run_reference(p);
    std::vector<double> delta(300);
    for (std::int64_t x = 0; x < 300; ++x) {
      double sum = 0.0;
      for (std::int64_t d = 0; d < 7; ++d) sum += p.d_out.at(0, x, 0, d) * p.out.at(0, x, 0, d);
      delta[static_cast<std::size_t>(x)] = sum;
    }
    std::vector<double> dq(300 * 7, 0.0), dk(300 * 8, 0.0), dv(300 * 9, 0.0);
    const da::Progression all{0, 1, 300};
    auto rows = [&](const Tensor<double>& t) {
      return da::cpu::StridedRows<double>{t.storage.data(), t.seq_stride, all};
    };
    da::cpu::AttendBackwardWorkspace<double> workspace(7);
    da::cpu::attend_backward(
        workspace, rows(p.q), rows(p.k), rows(p.v), rows(p.d_out), p.lse.data(), delta.data(), 7,
        1.0 / std::sqrt(7.0), 1.0, causal, da::cpu::GradientRows<double>{dq.data(), 7},
        da::cpu::GradientRows<double>{dk.data(), 8}, da::cpu::GradientRows<double>{dv.data(), 9});
    double worst = 0.0;
    for (std::int64_t x = 0; x < 300; ++x)
      for (std::int64_t d = 0; d < 7; ++d) {
        worst = std::max(
            worst, std::abs(dq[static_cast<std::size_t>(x * 7 + d)] - want.d_q.at(0, x, 0, d)));
        worst = std::max(
            worst, std::abs(dk[static_cast<std::size_t>(x * 8 + d)] - want.d_k.at(0, x, 0, d)));
        worst = std::max(
            worst, std::abs(dv[static_cast<std::size_t>(x * 9 + d)] - want.d_v.at(0, x, 0, d)));
      }
    EXPECT_LE(worst, 1e-11);
    EXPECT_EQ(dk[7], 0.0);  // between rows: untouched
  }
}

// --- Determinism (docs/semantics.md "Guarantees of the gradient", docs/semantics.md "Guarantees" (item 11)) ---------------------------------------------

template <class T>
void expect_bitwise_equal(const Gradients<T>& a, const Gradients<T>& b) {
  EXPECT_TRUE(dt::bitwise_equal(a.d_q, b.d_q));
  EXPECT_TRUE(dt::bitwise_equal(a.d_k, b.d_k));
  EXPECT_TRUE(dt::bitwise_equal(a.d_v, b.d_v));
}

TEST(CpuBackward, BitwiseIdenticalForAnyThreadCount) {
  // Several windows per head and blocks of several tiles, so threads really share the work.
  for (Mixing mixing : {Mixing::softmax, Mixing::mean})
    for (bool causal : {false, true}) {
      const Config config =
          make_config({64, 300, 600}, {1, 2, 4}, causal, OffsetRule::modular, mixing);
      const Problem<float> p(config, Shape{2, 600, 4, 2, 8}, 35, 1);
      const Gradients<float> one = run_fast(p, CpuOptions{1});
      for (int threads : {2, 3, 7}) expect_bitwise_equal(one, run_fast(p, CpuOptions{threads}));
      expect_bitwise_equal(one, run_fast(p, CpuOptions{1}));
      expect_bitwise_equal(one, run_fast(p, CpuOptions{7}));
    }
}

TEST(CpuBackward, MeanWithTheForwardsStatisticsBitwiseIdenticalForAnyThreadCount) {
  // partitioned + mean (every head's statistics from the forward), H a multiple of no G, GQA;
  // and a mix of heads with forward and recomputed statistics (N < w, see above).
  for (bool causal : {false, true}) {
    const Config partitioned =
        make_config({64, 300, 600}, {1, 2, 4}, causal, OffsetRule::partitioned, Mixing::mean);
    const Problem<float> p(partitioned, Shape{2, 600, 5, 5, 8}, 54, 1);
    const Gradients<float> one = run_fast(p, CpuOptions{1});
    for (int threads : {2, 3, 7}) expect_bitwise_equal(one, run_fast(p, CpuOptions{threads}));
    const Problem<double> g(partitioned, Shape{1, 600, 6, 2, 8}, 55);
    const Gradients<double> g_one = run_fast(g, CpuOptions{1});
    for (int threads : {2, 5}) expect_bitwise_equal(g_one, run_fast(g, CpuOptions{threads}));
    const Problem<Eigen::bfloat16> n(partitioned, Shape{1, 600, 4, 2, 8}, 56);
    const Gradients<Eigen::bfloat16> n_one = run_fast(n, CpuOptions{1});
    for (int threads : {2, 3}) expect_bitwise_equal(n_one, run_fast(n, CpuOptions{threads}));
    const Config mixed = make_config({20, 10}, {12, 1}, causal, OffsetRule::modular, Mixing::mean);
    const Problem<float> m(mixed, Shape{3, 10, 12, 4, 8}, 57);
    const Gradients<float> m_one = run_fast(m, CpuOptions{1});
    for (int threads : {2, 3, 7}) expect_bitwise_equal(m_one, run_fast(m, CpuOptions{threads}));
  }
}

TEST(CpuBackward, NarrowStorageBitwiseIdenticalForAnyThreadCount) {
  // bfloat16 and half take the window schedule (float accumulators, dQ in its own pass).
  for (Mixing mixing : {Mixing::softmax, Mixing::mean}) {
    const Config config = make_config({64, 300, 600}, {1, 2, 4}, true, OffsetRule::modular, mixing);
    const Problem<Eigen::bfloat16> p(config, Shape{1, 600, 4, 2, 8}, 38, 1);
    const Gradients<Eigen::bfloat16> one = run_fast(p, CpuOptions{1});
    for (int threads : {2, 3, 7}) expect_bitwise_equal(one, run_fast(p, CpuOptions{threads}));
    const Problem<Eigen::half> h(config, Shape{1, 600, 2, 2, 8}, 39);
    const Gradients<Eigen::half> half_one = run_fast(h, CpuOptions{1});
    expect_bitwise_equal(half_one, run_fast(h, CpuOptions{3}));
  }
}

// --- Each instruction-set path, forced ----------------------------------------------------------

// When DILATED_ATTENTION_CPU_ISA names a path this machine cannot run, every test is skipped
// (CTest reruns this file per path: cpu_backward_test.isa.<name>, SKIP_REGULAR_EXPRESSION).
const ::testing::Environment* const forced_isa_environment =
    ::testing::AddGlobalTestEnvironment(new da::testing::ForcedIsaEnvironment("cpu_backward_test"));

class CpuBackwardIsa : public da::testing::ForcedIsaTest {};

TEST_P(CpuBackwardIsa, AwkwardShapesMatchReference) {
  // Head widths that are no multiple of any register tile (40, 72), padded and strided views, N
  // a multiple of no w, r dividing no w, every offset rule, both mixings, causal or not.
  da::testing::for_each_awkward_case([&](const Config& config, std::int64_t dim, int cases) {
    expect_matches_reference<float>(config, Shape{1, 333, 5, 5, dim}, 300 + cases, 1 + cases % 3,
                                    options(1 + cases % 2));
    expect_matches_reference<double>(config, Shape{1, 150, 3, 3, dim}, 320 + cases, cases % 2,
                                     options(2));
  });
}

TEST_P(CpuBackwardIsa, LongBlocksWideHeadsAndNarrowStorage) {
  // Blocks of several query and key tiles (a tile is at most 128 rows), heads of 64 and 128,
  // bfloat16 and half widened into float tiles.
  for (bool causal : {false, true}) {
    const Mixing mixing = causal ? Mixing::mean : Mixing::softmax;
    const Config config = make_config({300, 150}, {1, 2}, causal, OffsetRule::modular, mixing);
    expect_matches_reference<float>(config, Shape{1, 330, 1, 1, 128}, 340, 0, options());
    expect_matches_reference<float>(config, Shape{1, 331, 2, 1, 64}, 341, 1, options(3));
    expect_matches_reference<Eigen::bfloat16>(config, Shape{1, 200, 1, 1, 40}, 342, 1, options(2));
    expect_matches_reference<Eigen::half>(config, Shape{1, 200, 2, 1, 72}, 343, 0, options(2));
  }
}

TEST_P(CpuBackwardIsa, BitwiseIdenticalForAnyThreadCount) {
  const Config config =
      make_config({64, 300, 700}, {1, 2, 4}, true, OffsetRule::modular, Mixing::mean);
  const Problem<float> p(config, Shape{2, 700, 2, 1, 40}, 344, 1);
  const Gradients<float> one = run_fast(p, options(1));
  for (int threads : {2, 3, 7}) expect_bitwise_equal(one, run_fast(p, options(threads)));
  const Problem<Eigen::bfloat16> b(config, Shape{1, 700, 2, 1, 40}, 345);
  const Gradients<Eigen::bfloat16> narrow = run_fast(b, options(1));
  expect_bitwise_equal(narrow, run_fast(b, options(3)));
}

TEST_P(CpuBackwardIsa, EnvironmentVariableSelectsThePath) {
  const Problem<float> p(make_config({64, 128}, {1, 2}), Shape{1, 200, 2, 2, 40}, 346);
  const Gradients<float> forced = run_fast(p, options(2));
  const Gradients<float> from_environment =
      da::testing::with_isa_variable(GetParam(), [&] { return run_fast(p, CpuOptions{2}); });
  expect_bitwise_equal(forced, from_environment);
}

INSTANTIATE_TEST_SUITE_P(Isa, CpuBackwardIsa, da::testing::every_isa(), da::testing::isa_name);

TEST(CpuBackward, PathsAgreeToRounding) {
  // Different kernels round differently; each stays within float rounding of the others.
  const Problem<float> p(make_config({100, 500}, {1, 3}, true), Shape{1, 500, 2, 2, 72}, 347);
  const Gradients<float> generic = run_fast(p, CpuOptions{2, da::CpuIsa::generic});
  const double magnitude = gradient_magnitude(run_reference(p));
  for (da::CpuIsa isa : {da::CpuIsa::avx2, da::CpuIsa::avx512, da::CpuIsa::neon}) {
    if (!da::cpu::isa_supported(isa)) continue;
    const Gradients<float> other = run_fast(p, CpuOptions{2, isa});
    EXPECT_LE(dt::max_abs_diff(generic.d_q, other.d_q), 1e-5 * magnitude) << da::to_string(isa);
    EXPECT_LE(dt::max_abs_diff(generic.d_k, other.d_k), 1e-5 * magnitude) << da::to_string(isa);
    EXPECT_LE(dt::max_abs_diff(generic.d_v, other.d_v), 1e-5 * magnitude) << da::to_string(isa);
  }
}

TEST(CpuBackward, UnsupportedForcedPathIsRejectedWithGradientsUntouched) {
  const Problem<float> p(make_config({8}, {2}), Shape{1, 20, 2, 2, 4}, 348);
  for (da::CpuIsa isa :
       {da::CpuIsa::generic, da::CpuIsa::avx2, da::CpuIsa::avx512, da::CpuIsa::neon})
    if (!da::cpu::isa_supported(isa)) {
      Gradients<float> g(p.shape, 0);
      EXPECT_THROW(
          da::backward<float>(p.config, p.shape, {p.q.view(), p.k.view(), p.v.view()},
                              {p.out.view(), p.lse.data()}, p.d_out.view(),
                              {g.d_q.view(), g.d_k.view(), g.d_v.view()}, CpuOptions{1, isa}),
          std::invalid_argument)
          << da::to_string(isa);
      for (const Tensor<float>* t : {&g.d_q, &g.d_k, &g.d_v})
        for (float value : t->storage) ASSERT_EQ(value, sentinel_value<float>);
    }
  Gradients<float> g(p.shape, 0);
  EXPECT_THROW(da::backward<float>(p.config, p.shape, {p.q.view(), p.k.view(), p.v.view()},
                                   {p.out.view(), p.lse.data()}, p.d_out.view(),
                                   {g.d_q.view(), g.d_k.view(), g.d_v.view()},
                                   CpuOptions{1, static_cast<da::CpuIsa>(99)}),
               std::invalid_argument);
}

// --- A small stack --------------------------------------------------------------------------

struct StackCall {
  std::function<void()> body;
  static void* run(void* self) {
    static_cast<StackCall*>(self)->body();
    return nullptr;
  }
};

// Runs `body` on a thread whose stack is `bytes` long.
void run_with_stack(std::size_t bytes, std::function<void()> body) {
  StackCall call{std::move(body)};
  pthread_attr_t attributes;
  ASSERT_EQ(pthread_attr_init(&attributes), 0);
  ASSERT_EQ(pthread_attr_setstacksize(&attributes, bytes), 0);
  pthread_t thread;
  ASSERT_EQ(pthread_create(&thread, &attributes, &StackCall::run, &call), 0);
  ASSERT_EQ(pthread_join(thread, nullptr), 0);
  pthread_attr_destroy(&attributes);
}

TEST(CpuBackward, RunsOnAThreadWith128KiBStack) {
  // The widest tiles (D = 128; double, float and bfloat16, i.e. both schedules); one thread, so
  // all work runs on the small stack.
  for (Mixing mixing : {Mixing::softmax, Mixing::mean}) {
    const Config config = make_config({64, 300}, {1, 2}, false, OffsetRule::modular, mixing);
    const Problem<double> pd(config, Shape{1, 300, 2, 1, 128}, 36);
    const Problem<float> pf(config, Shape{1, 300, 2, 1, 128}, 37);
    const Gradients<double> want_d = run_fast(pd, CpuOptions{1});
    const Gradients<float> want_f = run_fast(pf, CpuOptions{1});
    Gradients<double> got_d(pd.shape, 0);
    Gradients<float> got_f(pf.shape, 0);
    run_with_stack(128 * 1024, [&] {
      da::backward<double>(pd.config, pd.shape, {pd.q.view(), pd.k.view(), pd.v.view()},
                           {pd.out.view(), pd.lse.data()}, pd.d_out.view(),
                           {got_d.d_q.view(), got_d.d_k.view(), got_d.d_v.view()}, CpuOptions{1});
      da::backward<float>(pf.config, pf.shape, {pf.q.view(), pf.k.view(), pf.v.view()},
                          {pf.out.view(), pf.lse.data()}, pf.d_out.view(),
                          {got_f.d_q.view(), got_f.d_k.view(), got_f.d_v.view()}, CpuOptions{1});
    });
    expect_bitwise_equal(want_d, got_d);
    expect_bitwise_equal(want_f, got_f);
    // The window schedule of narrow storage too.
    const Problem<Eigen::bfloat16> pb(config, Shape{1, 300, 2, 1, 128}, 38);
    const Gradients<Eigen::bfloat16> want_b = run_fast(pb, CpuOptions{1});
    Gradients<Eigen::bfloat16> got_b(pb.shape, 0);
    run_with_stack(128 * 1024, [&] {
      da::backward<Eigen::bfloat16>(pb.config, pb.shape, {pb.q.view(), pb.k.view(), pb.v.view()},
                                    {pb.out.view(), pb.lse.data()}, pb.d_out.view(),
                                    {got_b.d_q.view(), got_b.d_k.view(), got_b.d_v.view()},
                                    CpuOptions{1});
    });
    expect_bitwise_equal(want_b, got_b);
  }
}

// --- Bad input (docs/semantics.md "Bad input", docs/semantics.md "Inputs and bad input of the backward") ---------------------------------------------------

// A valid float problem whose gradients hold a sentinel; each test breaks one thing.
struct Bad {
  Config config = make_config({6, 4}, {2, 3});
  Shape shape{2, 10, 4, 2, 3};
  dt::Inputs<float> in = dt::random_inputs<float>(shape, 40);
  Tensor<float> out_tensor{shape, shape.num_heads};
  Tensor<float> d_out_tensor = dt::random_tensor<float>(shape, shape.num_heads, 41);
  std::vector<float> lse_storage = std::vector<float>(dt::lse_size(shape));
  Tensor<float> dq_tensor{shape, shape.num_heads}, dk_tensor{shape, shape.num_kv_heads},
      dv_tensor{shape, shape.num_kv_heads};
  da::View<const float> q = in.q.view(), k = in.k.view(), v = in.v.view();
  da::View<const float> out = out_tensor.view(), d_out = d_out_tensor.view();
  const float* lse = lse_storage.data();
  da::View<float> d_q = dq_tensor.view(), d_k = dk_tensor.view(), d_v = dv_tensor.view();
  CpuOptions options{2};

  Bad() {
    da::forward<float>(config, shape, {q, k, v}, {out_tensor.view(), lse_storage.data()});
    for (Tensor<float>* t : {&dq_tensor, &dk_tensor, &dv_tensor}) t->fill(sentinel_value<float>);
  }
  void backward() const {
    da::backward<float>(config, shape, {q, k, v}, {out, lse}, d_out, {d_q, d_k, d_v}, options);
  }
  bool untouched() const {
    for (const Tensor<float>* t : {&dq_tensor, &dk_tensor, &dv_tensor})
      for (const float value : t->storage)
        if (!(value == sentinel_value<float>)) return false;
    return true;
  }
};

void expect_rejected(const Bad& p, const std::vector<std::string>& parts) {
  try {
    p.backward();
    ADD_FAILURE() << "no exception was thrown";
  } catch (const std::invalid_argument& error) {
    for (const std::string& part : parts) EXPECT_THAT(error.what(), HasSubstr(part));
  } catch (const std::exception& error) {
    ADD_FAILURE() << "wrong exception type: " << error.what();
  }
  EXPECT_TRUE(p.untouched()) << "a gradient was written before the error";
}

TEST(CpuBackwardRejects, ValidProblemPasses) {
  Bad p;
  EXPECT_NO_THROW(p.backward());
  EXPECT_FALSE(p.untouched());
}

TEST(CpuBackwardRejects, EmptyBranchList) {
  Bad p;
  p.config = make_config({}, {});
  expect_rejected(p, {"config.segment_lengths is empty"});
}

TEST(CpuBackwardRejects, MismatchedBranchLists) {
  Bad p;
  p.config.dilation_rates = {2};
  expect_rejected(p, {"config.dilation_rates has 1 entries"});
}

TEST(CpuBackwardRejects, NonPositiveSegmentLength) {
  Bad p;
  p.config.segment_lengths = {0, 4};
  expect_rejected(p, {"config.segment_lengths[0] = 0"});
}

TEST(CpuBackwardRejects, NonPositiveDilationRate) {
  Bad p;
  p.config.dilation_rates = {2, -1};
  expect_rejected(p, {"config.dilation_rates[1] = -1"});
}

TEST(CpuBackwardRejects, RateAboveSegmentLength) {
  Bad p;
  p.config.dilation_rates = {7, 1};
  expect_rejected(p, {"config.dilation_rates[0] = 7", "r <= w"});
}

TEST(CpuBackwardRejects, NonFiniteScale) {
  Bad p;
  p.config.scale = std::numeric_limits<double>::quiet_NaN();
  expect_rejected(p, {"config.scale"});
}

TEST(CpuBackwardRejects, NegativeScale) {
  Bad p;
  p.config.scale = -1.0;
  expect_rejected(p, {"config.scale = -1"});
}

TEST(CpuBackwardRejects, UnknownEnumerators) {
  Bad p;
  p.config.offsets = static_cast<OffsetRule>(9);
  expect_rejected(p, {"config.offsets = 9"});
  Bad m;
  m.config.mixing = static_cast<Mixing>(5);
  expect_rejected(m, {"config.mixing = 5"});
}

TEST(CpuBackwardRejects, NonPositiveShapeFields) {
  for (std::int64_t Shape::*member : {&Shape::batch, &Shape::seq_len, &Shape::num_heads,
                                      &Shape::num_kv_heads, &Shape::head_dim}) {
    Bad p;
    p.shape.*member = 0;
    expect_rejected(p, {"must be positive"});
  }
}

TEST(CpuBackwardRejects, HeadsNotMultipleOfKvHeads) {
  Bad p;
  p.shape.num_kv_heads = 3;
  expect_rejected(p, {"num_heads % num_kv_heads"});
}

TEST(CpuBackwardRejects, PartitionedWithFewerHeadsThanBranches) {
  Bad p;
  p.config = make_config({4, 6, 8}, {1, 2, 3}, false, OffsetRule::partitioned);
  p.shape.num_heads = 2;
  p.shape.num_kv_heads = 2;
  expect_rejected(p, {"partitioned"});
}

TEST(CpuBackwardRejects, SizeBeyondIndexRange) {
  Bad p;
  p.shape = {std::int64_t{1} << 22, std::int64_t{1} << 22, std::int64_t{1} << 12, 1,
             std::int64_t{1} << 8};
  expect_rejected(p, {"2^62"});
}

TEST(CpuBackwardRejects, NullData) {
  for (const std::string name : {"q", "k", "v", "out", "d_out", "d_q", "d_k", "d_v"}) {
    SCOPED_TRACE(name);
    Bad p;
    if (name == "q") p.q.data = nullptr;
    if (name == "k") p.k.data = nullptr;
    if (name == "v") p.v.data = nullptr;
    if (name == "out") p.out.data = nullptr;
    if (name == "d_out") p.d_out.data = nullptr;
    if (name == "d_q") p.d_q.data = nullptr;
    if (name == "d_k") p.d_k.data = nullptr;
    if (name == "d_v") p.d_v.data = nullptr;
    expect_rejected(p, {name + ".data is null"});
  }
}

TEST(CpuBackwardRejects, NullLse) {
  Bad p;
  p.lse = nullptr;
  expect_rejected(p, {"lse is null"});
}

TEST(CpuBackwardRejects, NullDOut) {
  Bad p;
  p.d_out.data = nullptr;
  expect_rejected(p, {"d_out.data is null"});
}

TEST(CpuBackwardRejects, NegativeStrides) {
  Bad p;
  p.k.seq_stride = -p.k.seq_stride;
  p.k.data += p.in.k.seq_stride * (p.shape.seq_len - 1);
  expect_rejected(p, {"k strides", "non-negative"});
  Bad g;
  g.d_q.head_stride = -g.d_q.head_stride;
  g.d_q.data += g.dq_tensor.head_stride;
  expect_rejected(g, {"d_q strides", "non-negative"});
}

TEST(CpuBackwardRejects, StridesBeyondAddressRange) {
  Bad p;
  p.d_out.batch_stride = std::int64_t{1} << 62;
  expect_rejected(p, {"d_out strides", "2^62"});
}

TEST(CpuBackwardRejects, GradientElementsThatShareMemory) {
  for (const std::string name : {"d_q", "d_k", "d_v"}) {
    SCOPED_TRACE(name);
    Bad p;
    da::View<float>& view = name == "d_q" ? p.d_q : name == "d_k" ? p.d_k : p.d_v;
    view.head_stride = 0;
    expect_rejected(p, {name + " strides", "share memory"});
  }
}

// Moves input `input` into an arena large enough to also hold gradient `gradient`, and points
// the gradient one element into it: the two ranges intersect, and no other input is near.
void expect_overlap_rejected(const std::string& gradient) {
  for (const std::string input : {"q", "k", "v", "out", "lse", "d_out"}) {
    SCOPED_TRACE(gradient + " over " + input);
    Bad p;
    std::vector<float> arena(p.in.q.storage.size() * 4, 0.0f);
    auto move = [&](da::View<const float>& view, const std::vector<float>& data) {
      std::copy(data.begin(), data.end(), arena.begin());
      view.data = arena.data();
    };
    if (input == "q") move(p.q, p.in.q.storage);
    if (input == "k") move(p.k, p.in.k.storage);
    if (input == "v") move(p.v, p.in.v.storage);
    if (input == "out") move(p.out, p.out_tensor.storage);
    if (input == "d_out") move(p.d_out, p.d_out_tensor.storage);
    if (input == "lse") {
      std::copy(p.lse_storage.begin(), p.lse_storage.end(), arena.begin());
      p.lse = arena.data();
    }
    da::View<float>& view = gradient == "d_q" ? p.d_q : gradient == "d_k" ? p.d_k : p.d_v;
    view.data = arena.data() + 1;
    const std::vector<float> before = arena;
    expect_rejected(p, {gradient + " overlaps " + input, "must not share memory"});
    EXPECT_EQ(arena, before) << "the input was written";
  }
}

TEST(CpuBackwardRejects, DqOverlapsAnInput) { expect_overlap_rejected("d_q"); }
TEST(CpuBackwardRejects, DkOverlapsAnInput) { expect_overlap_rejected("d_k"); }
TEST(CpuBackwardRejects, DvOverlapsAnInput) { expect_overlap_rejected("d_v"); }

TEST(CpuBackwardRejects, GradientsOverlapEachOther) {
  {
    Bad p;
    p.d_k.data = p.d_q.data + 5;
    expect_rejected(p, {"d_k overlaps d_q"});
  }
  {
    Bad p;
    p.d_v.data = p.d_q.data + 2;
    expect_rejected(p, {"d_v overlaps d_q"});
  }
  {
    Bad p;
    p.d_v.data = p.d_k.data;
    expect_rejected(p, {"d_v overlaps d_k"});
  }
}

TEST(CpuBackwardRejects, NegativeThreadCount) {
  Bad p;
  p.options.num_threads = -3;
  expect_rejected(p, {"num_threads = -3"});
}

TEST(CpuBackwardRejects, MalformedThreadCountInEnvironment) {
  Bad p;
  p.options.num_threads = 0;
  ::setenv("DILATED_ATTENTION_NUM_THREADS", "many", 1);
  expect_rejected(p, {"DILATED_ATTENTION_NUM_THREADS"});
  ::unsetenv("DILATED_ATTENTION_NUM_THREADS");
}

}  // namespace
