// cpu::attend, the block primitive, against a brute-force softmax over the same strided rows:
// dense and causal, strided positions with different first rows, rows that see no key, tiles
// that end mid-way, and both accumulator types.

#include <dilated_attention/cpu/attend.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace {

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

template <class T>
void check(const Progression& qp, const Progression& kp, std::int64_t dim, bool causal,
           double tolerance, double scale = 0.0) {
  const std::int64_t seq = std::max(qp.count > 0 ? qp.last() : 0, kp.count > 0 ? kp.last() : 0) + 1;
  const Rows<T> q(seq, dim, 3, 11), k(seq, dim, 1, 12), v(seq, dim, 5, 13);
  if (scale == 0.0) scale = 1.0 / std::sqrt(static_cast<double>(dim));
  using Acc = accumulator_t<T>;
  std::vector<Acc> o(static_cast<std::size_t>(qp.count * dim), Acc(7)),
      lse(static_cast<std::size_t>(qp.count), Acc(7));
  attend(q.select(qp), k.select(kp), v.select(kp), dim, static_cast<Acc>(scale), causal, o.data(),
         lse.data());
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

TEST(CpuAttend, DenseMatchesBruteForce) {
  check<double>({0, 1, 37}, {0, 1, 37}, 16, false, 1e-12);
  check<float>({0, 1, 37}, {0, 1, 37}, 16, false, 2e-5);
}

TEST(CpuAttend, SeveralTilesAndRaggedEdges) {
  // More rows than one query tile and keys than one key tile, neither a multiple of the tile.
  check<double>({0, 1, 131}, {0, 1, 300}, 8, false, 1e-12);
  check<double>({0, 1, 131}, {0, 1, 300}, 8, true, 1e-12);
  check<float>({0, 1, 131}, {0, 1, 600}, 24, true, 2e-5);
}

TEST(CpuAttend, CausalStridedPositions) {
  // Queries and keys with the same dilation but different first positions; the first query
  // precedes every key, so it attends none: (0, -inf).
  check<double>({5, 3, 90}, {7, 3, 100}, 12, true, 1e-12);
  check<float>({5, 3, 90}, {7, 3, 100}, 12, true, 2e-5);
  // Different strides on the two sides (the ring's received rows need not line up).
  check<double>({2, 2, 150}, {0, 5, 70}, 4, true, 1e-12);
  check<double>({2, 2, 150}, {0, 5, 70}, 4, false, 1e-12);
}

TEST(CpuAttend, RowsThatSeeNoKey) {
  // Every query precedes every key: all rows empty.
  check<double>({0, 1, 10}, {20, 1, 10}, 8, true, 0.0);
  // No keys at all, causal or not.
  check<double>({0, 1, 10}, {0, 1, 0}, 8, false, 0.0);
  check<float>({0, 1, 10}, {0, 1, 0}, 8, true, 0.0);
}

TEST(CpuAttend, NoQueriesWritesNothing) { check<double>({0, 1, 0}, {0, 1, 10}, 8, false, 0.0); }

TEST(CpuAttend, SingleRowsAndExplicitScales) {
  check<double>({4, 1, 1}, {4, 1, 1}, 3, true, 1e-12);
  check<double>({0, 1, 20}, {0, 1, 20}, 5, false, 1e-12, 2.5);
  check<double>({0, 1, 20}, {0, 1, 20}, 5, true, 1e-12, -0.7);  // a negative scale still works
}

TEST(CpuAttend, LargeScoresDoNotOverflow) {
  // A scale that puts scores in the hundreds: the running max keeps exp in range.
  check<double>({0, 1, 70}, {0, 1, 520}, 8, false, 1e-9, 40.0);
  check<float>({0, 1, 70}, {0, 1, 520}, 8, true, 2e-3, 40.0);
}

TEST(CpuAttend, WideHeadsUseShorterTiles) {
  // Tiles shrink so that GEMM blocks stay on the stack; the result must not notice.
  const dilated_attention::cpu::AttendWorkspace<double> wide(160);
  EXPECT_LT(wide.query_rows(), dilated_attention::cpu::query_tile);
  EXPECT_LT(wide.key_rows(), dilated_attention::cpu::key_tile);
  check<double>({0, 1, 230}, {0, 1, 250}, 160, true, 1e-12);
  check<float>({1, 2, 150}, {0, 2, 160}, 300, false, 2e-5);
}

TEST(CpuAttend, RejectsMismatchedKeysAndValues) {
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

}  // namespace
