// cpu::attend, the block primitive, against a brute-force softmax over the same strided rows:
// dense and causal, strided positions with different first rows, rows that see no key, tiles
// and chunks that end mid-way, head widths that are no multiple of a vector, and both
// accumulator types; every test runs once per instruction-set path (CpuIsa) this machine runs,
// and skips the others with a message. The micro-kernels are also checked one by one against
// the generic ones, and the dispatch (forced paths, bad names) on its own.

#include <dilated_attention/cpu/attend.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using dilated_attention::CpuIsa;
using dilated_attention::Progression;
using dilated_attention::cpu::accumulator_t;
using dilated_attention::cpu::attend;
using dilated_attention::cpu::StridedRows;

// A pool of sequence rows [positions, head_dim] with a padded row stride, so that the rows
// attend reads are interleaved with data it must not read.
template <class T>
struct Rows {
  std::int64_t stride;
  std::vector<T> data;
  Rows(std::int64_t seq, std::int64_t dim, std::int64_t pad, std::uint64_t seed)
      : stride(dim + pad), data(static_cast<std::size_t>(seq * (dim + pad))) {
    std::mt19937_64 engine(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    for (T& value : data) value = static_cast<T>(normal(engine));
  }
  StridedRows<T> select(const Progression& p) const {
    return {data.data() + p.first * stride, p.stride * stride, p};
  }
};

struct Brute {
  std::vector<double> o, lse;
};

template <class T>
Brute brute_force(const Rows<T>& q, const Progression& qp, const Rows<T>& k, const Rows<T>& v,
                  const Progression& kp, std::int64_t dim, double scale, bool causal) {
  Brute result{std::vector<double>(static_cast<std::size_t>(qp.count * dim), 0.0),
               std::vector<double>(static_cast<std::size_t>(qp.count),
                                   -std::numeric_limits<double>::infinity())};
  for (std::int64_t j = 0; j < qp.count; ++j) {
    const std::int64_t x = qp.at(j);
    std::vector<double> scores;
    std::vector<std::int64_t> keys;
    for (std::int64_t i = 0; i < kp.count; ++i) {
      const std::int64_t y = kp.at(i);
      if (causal && y > x) continue;
      double dot = 0.0;
      for (std::int64_t d = 0; d < dim; ++d)
        dot += static_cast<double>(q.data[static_cast<std::size_t>(x * q.stride + d)]) *
               static_cast<double>(k.data[static_cast<std::size_t>(y * k.stride + d)]);
      scores.push_back(scale * dot);
      keys.push_back(y);
    }
    if (keys.empty()) continue;
    double max = -std::numeric_limits<double>::infinity();
    for (double s : scores) max = std::max(max, s);
    double sum = 0.0;
    for (std::size_t i = 0; i < keys.size(); ++i) {
      const double p = std::exp(scores[i] - max);
      sum += p;
      for (std::int64_t d = 0; d < dim; ++d)
        result.o[static_cast<std::size_t>(j * dim + d)] +=
            p * static_cast<double>(v.data[static_cast<std::size_t>(keys[i] * v.stride + d)]);
    }
    for (std::int64_t d = 0; d < dim; ++d) result.o[static_cast<std::size_t>(j * dim + d)] /= sum;
    result.lse[static_cast<std::size_t>(j)] = max + std::log(sum);
  }
  return result;
}

std::string isa_name(const ::testing::TestParamInfo<CpuIsa>& param) {
  return dilated_attention::to_string(param.param);
}

// The path the current test runs (set by the fixture below).
CpuIsa current_isa = CpuIsa::generic;

template <class T>
void check(const Progression& qp, const Progression& kp, std::int64_t dim, bool causal,
           double tolerance, double scale = 0.0) {
  SCOPED_TRACE(std::string("isa ") + dilated_attention::to_string(current_isa) + ", dim " +
               std::to_string(dim) + ", queries " + std::to_string(qp.count) + ", keys " +
               std::to_string(kp.count));
  const std::int64_t seq = std::max(qp.count > 0 ? qp.last() : 0, kp.count > 0 ? kp.last() : 0) + 1;
  const Rows<T> q(seq, dim, 3, 11), k(seq, dim, 1, 12), v(seq, dim, 5, 13);
  if (scale == 0.0) scale = 1.0 / std::sqrt(static_cast<double>(dim));
  using Acc = accumulator_t<T>;
  std::vector<Acc> o(static_cast<std::size_t>(qp.count * dim), Acc(7)),
      lse(static_cast<std::size_t>(qp.count), Acc(7));
  attend(q.select(qp), k.select(kp), v.select(kp), dim, static_cast<Acc>(scale), causal, o.data(),
         lse.data(), current_isa);
  const Brute want = brute_force(q, qp, k, v, kp, dim, scale, causal);
  for (std::size_t i = 0; i < o.size(); ++i)
    ASSERT_NEAR(static_cast<double>(o[i]), want.o[i], tolerance) << "element " << i;
  for (std::size_t j = 0; j < lse.size(); ++j) {
    if (std::isinf(want.lse[j])) {
      ASSERT_EQ(static_cast<double>(lse[j]), want.lse[j]) << "row " << j;
    } else {
      ASSERT_NEAR(static_cast<double>(lse[j]), want.lse[j], tolerance * (1 + std::abs(want.lse[j])))
          << "row " << j;
    }
  }
}

class CpuAttend : public ::testing::TestWithParam<CpuIsa> {
 protected:
  void SetUp() override {
    if (!dilated_attention::cpu::isa_supported(GetParam()))
      GTEST_SKIP() << dilated_attention::to_string(GetParam())
                   << " kernels: not compiled into this build or not supported by this CPU";
    current_isa = GetParam();
  }
};

TEST_P(CpuAttend, DenseMatchesBruteForce) {
  check<double>({0, 1, 37}, {0, 1, 37}, 16, false, 1e-12);
  check<float>({0, 1, 37}, {0, 1, 37}, 16, false, 2e-5);
}

TEST_P(CpuAttend, SeveralTilesAndRaggedEdges) {
  // More rows than one query tile and keys than one key tile, neither a multiple of the tile.
  check<double>({0, 1, 131}, {0, 1, 300}, 8, false, 1e-12);
  check<double>({0, 1, 131}, {0, 1, 300}, 8, true, 1e-12);
  check<float>({0, 1, 131}, {0, 1, 600}, 24, true, 2e-5);
}

TEST_P(CpuAttend, CausalStridedPositions) {
  // Queries and keys with the same dilation but different first positions; the first query
  // precedes every key, so it attends none: (0, -inf).
  check<double>({5, 3, 90}, {7, 3, 100}, 12, true, 1e-12);
  check<float>({5, 3, 90}, {7, 3, 100}, 12, true, 2e-5);
  // Different strides on the two sides (the ring's received rows need not line up).
  check<double>({2, 2, 150}, {0, 5, 70}, 4, true, 1e-12);
  check<double>({2, 2, 150}, {0, 5, 70}, 4, false, 1e-12);
}

TEST_P(CpuAttend, RowsThatSeeNoKey) {
  // Every query precedes every key: all rows empty.
  check<double>({0, 1, 10}, {20, 1, 10}, 8, true, 0.0);
  // No keys at all, causal or not.
  check<double>({0, 1, 10}, {0, 1, 0}, 8, false, 0.0);
  check<float>({0, 1, 10}, {0, 1, 0}, 8, true, 0.0);
}

TEST_P(CpuAttend, NoQueriesWritesNothing) { check<double>({0, 1, 0}, {0, 1, 10}, 8, false, 0.0); }

TEST_P(CpuAttend, SingleRowsAndExplicitScales) {
  check<double>({4, 1, 1}, {4, 1, 1}, 3, true, 1e-12);
  check<double>({0, 1, 20}, {0, 1, 20}, 5, false, 1e-12, 2.5);
  check<double>({0, 1, 20}, {0, 1, 20}, 5, true, 1e-12, -0.7);  // a negative scale still works
}

TEST_P(CpuAttend, LargeScoresDoNotOverflow) {
  // A scale that puts scores in the hundreds: the running max keeps exp in range.
  check<double>({0, 1, 70}, {0, 1, 520}, 8, false, 1e-9, 40.0);
  check<float>({0, 1, 70}, {0, 1, 520}, 8, true, 2e-3, 40.0);
}

TEST_P(CpuAttend, WideHeads) {
  check<double>({0, 1, 230}, {0, 1, 250}, 160, true, 1e-12);
  check<float>({1, 2, 150}, {0, 2, 160}, 300, false, 2e-5);
}

TEST_P(CpuAttend, HeadWidthsThatAreNoMultipleOfAVector) {
  for (std::int64_t dim : {1, 3, 40, 72, 100}) {
    check<float>({0, 1, 61}, {0, 1, 290}, dim, true, 2e-5);
    check<float>({3, 2, 30}, {1, 2, 33}, dim, false, 2e-5);
    check<double>({0, 1, 29}, {0, 1, 40}, dim, true, 1e-12);
  }
}

TEST_P(CpuAttend, TinyBlocks) {
  // 1-5 rows: less than one register strip of every path.
  for (std::int64_t rows = 1; rows <= 5; ++rows)
    for (bool causal : {false, true}) {
      check<float>({0, 1, rows}, {0, 1, rows}, 64, causal, 2e-5);
      check<float>({2, 3, rows}, {0, 4, rows}, 7, causal, 2e-5);
      check<double>({0, 1, rows}, {0, 1, rows}, 16, causal, 1e-12);
    }
}

TEST_P(CpuAttend, SeveralQueryAndKeyChunks) {
  // More rows than a query chunk and keys than a key chunk: the online softmax carries each
  // row's state across key chunks, and causal chunks stop at their longest prefix.
  using dilated_attention::cpu::key_chunk;
  using dilated_attention::cpu::query_chunk;
  check<float>({0, 1, query_chunk + 37}, {0, 1, key_chunk + 300}, 16, false, 2e-5);
  check<float>({0, 1, query_chunk + 37}, {0, 1, key_chunk + 300}, 24, true, 2e-5);
  check<double>({0, 1, query_chunk + 5}, {0, 1, 2 * key_chunk + 1}, 8, true, 1e-12);
}

TEST_P(CpuAttend, Bfloat16AndHalfStorageWidenIntoTheFloatKernels) {
  check<Eigen::bfloat16>({0, 1, 50}, {0, 1, 300}, 40, true, 2e-5);
  check<Eigen::half>({1, 2, 40}, {0, 2, 70}, 72, false, 2e-5);
}

TEST_P(CpuAttend, WorkspaceRunsTheRequestedKernels) {
  const dilated_attention::cpu::AttendWorkspace<float> workspace(64, GetParam());
  EXPECT_EQ(workspace.isa(), GetParam());
  EXPECT_EQ(workspace.tile_rows() % dilated_attention::cpu::strips_per_tile, 0);
  const dilated_attention::cpu::AttendWorkspace<double> wide(64, GetParam());
  EXPECT_EQ(wide.tile_rows(), dilated_attention::cpu::strips_per_tile *
                                  dilated_attention::cpu::kernels::Generic<double>::rows);
}

TEST(CpuAttendArguments, RejectsMismatchedKeysAndValues) {
  const Rows<double> rows(10, 4, 0, 1);
  std::vector<double> o(40), lse(10);
  EXPECT_THROW(attend(rows.select({0, 1, 10}), rows.select({0, 1, 10}), rows.select({0, 1, 9}), 4,
                      0.5, false, o.data(), lse.data()),
               std::invalid_argument);
  EXPECT_THROW(attend(rows.select({0, 1, 10}), rows.select({0, 1, 10}), rows.select({0, 1, 10}), 0,
                      0.5, false, o.data(), lse.data()),
               std::invalid_argument);
}

TEST(CpuExp, ShiftedExponentialAndSumAreAccurate) {
  // The SSE2 float routine (or Eigen's exp elsewhere) against std::exp in double, over the
  // whole range a softmax feeds it, including the clamped far tail and a ragged length.
  std::vector<float> p(1003);
  for (std::size_t i = 0; i < p.size(); ++i) p[i] = -100.0f * static_cast<float>(i) / 1000.0f;
  std::vector<float> x = p;
  const float sum = dilated_attention::cpu::detail::exp_shifted_sum(p.data(), 1003, 1.0f, 0.0f);
  double want_sum = 0.0;
  for (std::size_t i = 0; i < p.size(); ++i) {
    const double want = std::exp(static_cast<double>(x[i]));
    want_sum += want;
    if (x[i] >= -87.0f) {
      ASSERT_NEAR(p[i], want, 3e-7 * want) << "x = " << x[i];
    } else {
      ASSERT_LE(p[i], 2e-38f) << "x = " << x[i];
    }
  }
  EXPECT_NEAR(sum, want_sum, 1e-6 * want_sum);
  // Scale and shift are applied before the exponential.
  float one[5] = {2.0f, 4.0f, 6.0f, 8.0f, 10.0f};
  dilated_attention::cpu::detail::exp_shifted_sum(one, 5, 0.5f, 5.0f);
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(one[i], std::exp(i + 1.0 - 5.0), 1e-6);
  // NaN is not hidden by the clamp.
  float bad[4] = {0.0f, std::numeric_limits<float>::quiet_NaN(), -1.0f, -2.0f};
  dilated_attention::cpu::detail::exp_shifted_sum(bad, 4, 1.0f, 0.0f);
  EXPECT_TRUE(std::isnan(bad[1]));
  EXPECT_FLOAT_EQ(bad[0], 1.0f);
}

// --- The micro-kernels one by one (kernels/generic.hpp's contract), per path ------------------

class CpuKernels : public CpuAttend {};

TEST_P(CpuKernels, MultiplyMatchesTheDefinitionWithBothStridesAndAccumulate) {
  dilated_attention::cpu::kernels::with_kernels<float>(GetParam(), [](auto kernel_set) {
    using K = decltype(kernel_set);
    std::mt19937_64 engine(5);
    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    for (const std::int64_t depth : {1, 7, 64, 257}) {
      // A as rows (stride 3 * depth between rows) and as a transpose (rows adjacent).
      for (const bool transposed : {false, true}) {
        const std::int64_t a_row = transposed ? 1 : 3 * depth,
                           a_depth = transposed ? K::rows + 2 : 1;
        std::vector<float> a(static_cast<std::size_t>(K::rows * 3 * depth + depth * (K::rows + 2)));
        std::vector<float> b(static_cast<std::size_t>(depth * K::cols));
        std::vector<float> c(static_cast<std::size_t>(K::rows * (K::cols + 5)));
        for (float& x : a) x = uniform(engine);
        for (float& x : b) x = uniform(engine);
        for (float& x : c) x = uniform(engine);
        const std::vector<float> before = c;
        for (const bool accumulate : {false, true}) {
          c = before;
          K::multiply(a.data(), a_row, a_depth, b.data(), depth, c.data(), K::cols + 5, accumulate);
          for (int i = 0; i < K::rows; ++i)
            for (int j = 0; j < K::cols + 5; ++j) {
              const std::size_t at = static_cast<std::size_t>(i * (K::cols + 5) + j);
              if (j >= K::cols) {
                ASSERT_EQ(c[at], before[at]) << "wrote outside the tile";
              } else {
                double want = accumulate ? before[at] : 0.0;
                for (std::int64_t p = 0; p < depth; ++p)
                  want +=
                      static_cast<double>(a[static_cast<std::size_t>(i * a_row + p * a_depth)]) *
                      b[static_cast<std::size_t>(p * K::cols + j)];
                ASSERT_NEAR(c[at], want, 1e-6 * static_cast<double>(depth + 1))
                    << "depth " << depth << " transposed " << transposed << " (" << i << ", " << j
                    << ")";
              }
            }
        }
      }
    }
  });
}

TEST_P(CpuKernels, ExponentialIsAccurateOverTheSoftmaxRange) {
  dilated_attention::cpu::kernels::with_kernels<float>(GetParam(), [](auto kernel_set) {
    using K = decltype(kernel_set);
    for (const std::int64_t n : {1, 5, 8, 17, 31, 1003}) {
      std::vector<float> p(static_cast<std::size_t>(n));
      for (std::int64_t i = 0; i < n; ++i)
        p[static_cast<std::size_t>(i)] = -100.0f * static_cast<float>(i) / 1000.0f;
      const std::vector<float> x = p;
      const float sum = K::exp_shifted_sum(p.data(), n, 1.0f, 0.0f);
      double want_sum = 0.0;
      for (std::size_t i = 0; i < p.size(); ++i) {
        const double want = std::exp(static_cast<double>(x[i]));
        want_sum += want;
        if (x[i] >= -87.0f) {
          ASSERT_NEAR(p[i], want, 2.5e-7 * want) << "x = " << x[i];
        } else {
          ASSERT_LE(p[i], 2e-38f) << "x = " << x[i];
        }
      }
      EXPECT_NEAR(sum, want_sum, 1e-6 * want_sum);
    }
    // Scale and shift are applied before the exponential, NaN is not hidden by the clamp, and
    // nothing past n is touched.
    float row[20];
    for (int i = 0; i < 20; ++i) row[i] = 2.0f * static_cast<float>(i + 1);
    row[3] = std::numeric_limits<float>::quiet_NaN();
    K::exp_shifted_sum(row, 19, 0.5f, 20.0f);
    for (int i = 0; i < 19; ++i) {
      if (i == 3) continue;
      EXPECT_NEAR(row[i], std::exp(i + 1.0 - 20.0), 3e-7 * std::exp(i + 1.0 - 20.0)) << i;
    }
    EXPECT_TRUE(std::isnan(row[3]));
    EXPECT_EQ(row[19], 40.0f);
  });
}

TEST_P(CpuKernels, ScaledMaximum) {
  dilated_attention::cpu::kernels::with_kernels<float>(GetParam(), [](auto kernel_set) {
    using K = decltype(kernel_set);
    std::mt19937_64 engine(9);
    std::uniform_real_distribution<float> uniform(-50.0f, 50.0f);
    for (const std::int64_t n : {1, 2, 15, 16, 33, 256}) {
      std::vector<float> s(static_cast<std::size_t>(n));
      for (float& x : s) x = uniform(engine);
      for (const float scale : {0.125f, -0.7f}) {
        float want = scale * s[0];
        for (float x : s) want = std::max(want, scale * x);
        EXPECT_EQ(K::max_scaled(s.data(), n, scale), want) << "n " << n << " scale " << scale;
      }
    }
  });
}

TEST(CpuIsa, DispatchPicksTheBestPathAndHonoursForcedOnes) {
  namespace cpu = dilated_attention::cpu;
  EXPECT_TRUE(cpu::isa_supported(CpuIsa::generic));
  EXPECT_TRUE(cpu::isa_supported(cpu::best_isa()));
  ::unsetenv("DILATED_ATTENTION_CPU_ISA");
  EXPECT_EQ(cpu::resolve_isa(CpuIsa::automatic), cpu::best_isa());
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx512f")) {
    EXPECT_EQ(cpu::best_isa(), CpuIsa::avx512);
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    EXPECT_EQ(cpu::best_isa(), CpuIsa::avx2);
  }
  EXPECT_FALSE(cpu::isa_compiled(CpuIsa::neon));
  EXPECT_THROW(cpu::resolve_isa(CpuIsa::neon), std::invalid_argument);
#endif
#if defined(__aarch64__)
  EXPECT_EQ(cpu::best_isa(), CpuIsa::neon);
  EXPECT_THROW(cpu::resolve_isa(CpuIsa::avx2), std::invalid_argument);
#endif
  for (CpuIsa isa : {CpuIsa::generic, CpuIsa::avx2, CpuIsa::avx512, CpuIsa::neon}) {
    if (cpu::isa_supported(isa)) {
      EXPECT_EQ(cpu::resolve_isa(isa), isa);
      ::setenv("DILATED_ATTENTION_CPU_ISA", dilated_attention::to_string(isa), 1);
      EXPECT_EQ(cpu::resolve_isa(CpuIsa::automatic), isa);
      EXPECT_EQ(cpu::resolve_isa(CpuIsa::generic), CpuIsa::generic);  // explicit options win
    } else {
      EXPECT_THROW(cpu::resolve_isa(isa), std::invalid_argument);
      ::setenv("DILATED_ATTENTION_CPU_ISA", dilated_attention::to_string(isa), 1);
      EXPECT_THROW(cpu::resolve_isa(CpuIsa::automatic), std::invalid_argument);
    }
  }
  ::setenv("DILATED_ATTENTION_CPU_ISA", "sse9", 1);
  try {
    cpu::resolve_isa(CpuIsa::automatic);
    ADD_FAILURE() << "an unknown name was accepted";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("DILATED_ATTENTION_CPU_ISA"), std::string::npos);
  }
  ::setenv("DILATED_ATTENTION_CPU_ISA", "auto", 1);
  EXPECT_EQ(cpu::resolve_isa(CpuIsa::automatic), cpu::best_isa());
  ::unsetenv("DILATED_ATTENTION_CPU_ISA");
  EXPECT_THROW(cpu::resolve_isa(static_cast<CpuIsa>(42)), std::invalid_argument);
}

INSTANTIATE_TEST_SUITE_P(Isa, CpuKernels,
                         ::testing::Values(CpuIsa::generic, CpuIsa::avx2, CpuIsa::avx512,
                                           CpuIsa::neon),
                         isa_name);

INSTANTIATE_TEST_SUITE_P(Isa, CpuAttend,
                         ::testing::Values(CpuIsa::generic, CpuIsa::avx2, CpuIsa::avx512,
                                           CpuIsa::neon),
                         isa_name);

}  // namespace
