// Unit tests of include/dilated_attention/merge.hpp: negative_infinity, log_add_exp,
// merge_weights (MergeWeights) and OnlineSoftmax, in float and double, each checked against a
// direct fp64 softmax over the union of the keys (written here, independently of the library).

#include <dilated_attention/merge.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <random>
#include <vector>

namespace {

using dilated_attention::log_add_exp;
using dilated_attention::merge_weights;
using dilated_attention::MergeWeights;
using dilated_attention::negative_infinity;
using dilated_attention::OnlineSoftmax;

constexpr int dim = 5;
const double positive_infinity = std::numeric_limits<double>::infinity();

// A set of keys: one score and one value row each. A multiset: a key may appear twice.
struct Keys {
  std::vector<double> scores;
  std::vector<std::vector<double>> values;
  void add(double score, std::vector<double> value) {
    scores.push_back(score);
    values.push_back(std::move(value));
  }
  void append(const Keys& other) {
    for (std::size_t i = 0; i < other.scores.size(); ++i) add(other.scores[i], other.values[i]);
  }
};

// A partial in accumulator type Acc.
template <class Acc>
struct Partial {
  std::vector<Acc> o = std::vector<Acc>(dim, Acc(0));
  Acc lse = negative_infinity<Acc>();
};

// The direct fp64 softmax over a key multiset: lse = ln sum exp(s), o = sum softmax(s) v. Empty:
// o = 0, lse = -inf.
struct Direct {
  std::vector<double> o = std::vector<double>(dim, 0.0);
  double lse = -positive_infinity;
};
Direct direct(const Keys& keys) {
  Direct result;
  if (keys.scores.empty()) return result;
  const double max = *std::max_element(keys.scores.begin(), keys.scores.end());
  double sum = 0;
  for (double s : keys.scores) sum += std::exp(s - max);
  result.lse = max + std::log(sum);
  for (std::size_t i = 0; i < keys.scores.size(); ++i)
    for (int d = 0; d < dim; ++d)
      result.o[d] += std::exp(keys.scores[i] - result.lse) * keys.values[i][d];
  return result;
}

template <class Acc>
Partial<Acc> to_partial(const Direct& d) {
  Partial<Acc> p;
  for (int i = 0; i < dim; ++i) p.o[i] = static_cast<Acc>(d.o[i]);
  p.lse = static_cast<Acc>(d.lse);
  return p;
}

// The merge that every kernel performs: o = wa * o_a + wb * o_b, lse = merged lse.
template <class Acc>
Partial<Acc> merge(const Partial<Acc>& a, const Partial<Acc>& b) {
  const MergeWeights<Acc> w = merge_weights(a.lse, b.lse);
  Partial<Acc> result;
  for (int i = 0; i < dim; ++i) result.o[i] = w.a * a.o[i] + w.b * b.o[i];
  result.lse = w.lse;
  return result;
}

Keys random_keys(std::mt19937_64& engine, int count, double centre, double spread) {
  std::uniform_real_distribution<double> score(centre - spread, centre + spread), value(-2, 2);
  Keys keys;
  for (int i = 0; i < count; ++i) {
    std::vector<double> v(dim);
    for (double& x : v) x = value(engine);
    keys.add(score(engine), v);
  }
  return keys;
}

template <class Acc>
class Merge : public ::testing::Test {
 protected:
  // Relative tolerance for a value of magnitude `scale`: a few ulps of Acc, and for the lse (and
  // the weights computed from it) the rounding of an lse of that magnitude.
  static double tolerance(double scale = 1.0) {
    return 4 * std::numeric_limits<Acc>::epsilon() * (1.0 + std::abs(scale));
  }
  template <class P>
  static void expect_near(const P& actual, const Direct& expected, double lse_scale,
                          const char* what) {
    SCOPED_TRACE(what);
    if (std::isinf(expected.lse)) {
      EXPECT_EQ(actual.lse, static_cast<Acc>(expected.lse));
    } else {
      EXPECT_NEAR(static_cast<double>(actual.lse), expected.lse, tolerance(lse_scale));
    }
    for (int d = 0; d < dim; ++d) {
      EXPECT_FALSE(std::isnan(static_cast<double>(actual.o[d])));
      EXPECT_NEAR(static_cast<double>(actual.o[d]), expected.o[d], 4 * tolerance(lse_scale))
          << "d = " << d;
    }
  }
};
using AccTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Merge, AccTypes);

TYPED_TEST(Merge, NegativeInfinity) {
  using Acc = TypeParam;
  EXPECT_EQ(negative_infinity<Acc>(), -std::numeric_limits<Acc>::infinity());
  EXPECT_TRUE(std::isinf(negative_infinity<Acc>()));
  EXPECT_LT(negative_infinity<Acc>(), std::numeric_limits<Acc>::lowest());
}

TYPED_TEST(Merge, LogAddExpMatchesDirect) {
  using Acc = TypeParam;
  std::mt19937_64 engine(1);
  std::uniform_real_distribution<double> value(-30, 30);
  for (int trial = 0; trial < 200; ++trial) {
    const Acc a = static_cast<Acc>(value(engine)), b = static_cast<Acc>(value(engine));
    const double expected = std::log(std::exp(double(a)) + std::exp(double(b)));
    EXPECT_NEAR(double(log_add_exp(a, b)), expected, this->tolerance(expected)) << a << " " << b;
    EXPECT_EQ(log_add_exp(a, b), log_add_exp(b, a)) << "log_add_exp must be symmetric";
    EXPECT_GE(log_add_exp(a, b), std::max(a, b));
  }
}

TYPED_TEST(Merge, LogAddExpEdgeCases) {
  using Acc = TypeParam;
  const Acc inf = std::numeric_limits<Acc>::infinity(), ninf = negative_infinity<Acc>();
  EXPECT_EQ(log_add_exp(ninf, ninf), ninf);
  for (Acc x : {Acc(0), Acc(-3.5), Acc(7.25), Acc(1e4), Acc(-1e4), std::numeric_limits<Acc>::max(),
                std::numeric_limits<Acc>::lowest(), std::numeric_limits<Acc>::denorm_min()}) {
    EXPECT_EQ(log_add_exp(ninf, x), x) << "-inf is the identity, exactly: " << x;
    EXPECT_EQ(log_add_exp(x, ninf), x) << x;
    EXPECT_EQ(log_add_exp(inf, x), inf) << x;
    EXPECT_EQ(log_add_exp(x, inf), inf) << x;
  }
  EXPECT_EQ(log_add_exp(inf, ninf), inf);
  EXPECT_EQ(log_add_exp(ninf, inf), inf);
  // Equal arguments: x + ln 2, at any magnitude (no overflow at exp(1e4)).
  for (Acc x : {Acc(0), Acc(-1e4), Acc(1e4), Acc(88.5), Acc(709.5)})
    EXPECT_NEAR(double(log_add_exp(x, x)), double(x) + std::log(2.0), this->tolerance(x)) << x;
  // Far apart: the smaller one vanishes, exactly.
  EXPECT_EQ(log_add_exp(Acc(0), Acc(-1e4)), Acc(0));
  EXPECT_EQ(log_add_exp(Acc(1e4), Acc(-1e4)), Acc(1e4));
  // Finite arguments whose exp overflows Acc.
  const Acc big = std::numeric_limits<Acc>::max() / 2;
  EXPECT_TRUE(std::isfinite(log_add_exp(big, big)));
  // NaN with a finite argument propagates, on either side.
  const Acc nan = std::numeric_limits<Acc>::quiet_NaN();
  EXPECT_TRUE(std::isnan(log_add_exp(nan, Acc(1))));
  EXPECT_TRUE(std::isnan(log_add_exp(Acc(1), nan)));
  EXPECT_TRUE(std::isnan(log_add_exp(ninf, nan)));
}

// A NaN partial must not vanish when merged with an empty one (-inf), on either side: the fuzzer
// found log_add_exp(NaN, -inf) returning -inf, which made such a row look empty.
TYPED_TEST(Merge, NanAgainstEmptyPropagates) {
  using Acc = TypeParam;
  const Acc nan = std::numeric_limits<Acc>::quiet_NaN(), ninf = negative_infinity<Acc>();
  EXPECT_TRUE(std::isnan(log_add_exp(nan, ninf)));
  EXPECT_TRUE(std::isnan(log_add_exp(ninf, nan)));
  EXPECT_TRUE(std::isnan(merge_weights(nan, ninf).lse));
  EXPECT_TRUE(std::isnan(merge_weights(ninf, nan).lse));
}

TYPED_TEST(Merge, TwoPartialsEqualTheUnion) {
  using Acc = TypeParam;
  std::mt19937_64 engine(2);
  for (int trial = 0; trial < 100; ++trial) {
    const double centre = trial % 3 == 0 ? 0.0 : (trial % 3 == 1 ? 50.0 : -50.0);
    const Keys a = random_keys(engine, 1 + trial % 7, centre, 8.0);
    const Keys b = random_keys(engine, 1 + trial % 5, centre + (trial % 11) - 5.0, 8.0);
    Keys all = a;
    all.append(b);
    const Partial<Acc> merged = merge(to_partial<Acc>(direct(a)), to_partial<Acc>(direct(b)));
    this->expect_near(merged, direct(all), direct(all).lse, "a + b");
  }
}

TYPED_TEST(Merge, MultisetUnionCountsASharedKeyTwice) {
  using Acc = TypeParam;
  Keys a, b;
  a.add(1.0, {1, 0, 0, 0, 0});
  b.add(1.0, {1, 0, 0, 0, 0});  // the same key in both partials: weight 2 in the union
  b.add(2.0, {0, 1, 0, 0, 0});
  Keys all = a;
  all.append(b);
  const Partial<Acc> merged = merge(to_partial<Acc>(direct(a)), to_partial<Acc>(direct(b)));
  this->expect_near(merged, direct(all), direct(all).lse, "shared key");
  EXPECT_NEAR(double(merged.lse), std::log(2 * std::exp(1.0) + std::exp(2.0)), this->tolerance(3));
}

TYPED_TEST(Merge, EmptyPartialIsTheIdentity) {
  using Acc = TypeParam;
  std::mt19937_64 engine(3);
  const Partial<Acc> empty;
  const MergeWeights<Acc> none = merge_weights(empty.lse, empty.lse);
  EXPECT_EQ(none.a, Acc(0));
  EXPECT_EQ(none.b, Acc(0));
  EXPECT_EQ(none.lse, negative_infinity<Acc>());
  const Partial<Acc> both = merge(empty, empty);
  for (Acc x : both.o) EXPECT_EQ(x, Acc(0));
  EXPECT_EQ(both.lse, negative_infinity<Acc>());

  for (double centre : {0.0, 80.0, -80.0, 1e4, -1e4}) {
    const Partial<Acc> p = to_partial<Acc>(direct(random_keys(engine, 4, centre, 3.0)));
    for (const Partial<Acc>& merged : {merge(empty, p), merge(p, empty)}) {
      EXPECT_EQ(merged.lse, p.lse) << centre;  // exact: log1p(exp(-inf)) = 0
      for (int d = 0; d < dim; ++d) EXPECT_EQ(merged.o[d], p.o[d]) << centre;
    }
    const MergeWeights<Acc> left = merge_weights(empty.lse, p.lse),
                            right = merge_weights(p.lse, empty.lse);
    EXPECT_EQ(left.a, Acc(0));
    EXPECT_EQ(left.b, Acc(1));
    EXPECT_EQ(right.a, Acc(1));
    EXPECT_EQ(right.b, Acc(0));
  }
}

TYPED_TEST(Merge, CommutativeExactlyAndAssociativeToRounding) {
  using Acc = TypeParam;
  std::mt19937_64 engine(4);
  for (int trial = 0; trial < 100; ++trial) {
    const double centre = (trial % 5 - 2) * 40.0;
    const Keys ka = random_keys(engine, 3, centre, 10), kb = random_keys(engine, 2, centre + 4, 10),
               kc = random_keys(engine, 4, centre - 4, 10);
    const Partial<Acc> a = to_partial<Acc>(direct(ka)), b = to_partial<Acc>(direct(kb)),
                       c = to_partial<Acc>(direct(kc));
    const Partial<Acc> ab = merge(a, b), ba = merge(b, a);
    EXPECT_EQ(ab.lse, ba.lse);
    for (int d = 0; d < dim; ++d) EXPECT_EQ(ab.o[d], ba.o[d]);
    const MergeWeights<Acc> wab = merge_weights(a.lse, b.lse), wba = merge_weights(b.lse, a.lse);
    EXPECT_EQ(wab.a, wba.b);
    EXPECT_EQ(wab.b, wba.a);
    EXPECT_NEAR(double(wab.a) + double(wab.b), 1.0, this->tolerance(wab.lse));

    const Partial<Acc> left = merge(merge(a, b), c), right = merge(a, merge(b, c)),
                       other = merge(merge(c, a), b);
    Keys all = ka;
    all.append(kb);
    all.append(kc);
    const Direct expected = direct(all);
    this->expect_near(left, expected, expected.lse, "(a+b)+c");
    this->expect_near(right, expected, expected.lse, "a+(b+c)");
    this->expect_near(other, expected, expected.lse, "(c+a)+b");
  }
}

TYPED_TEST(Merge, LargeLseDoesNotOverflow) {
  using Acc = TypeParam;
  for (double big : {1e4, -1e4}) {
    for (double gap : {0.0, 0.5, 30.0, 2e4}) {
      Keys a, b;
      a.add(big, {1, 2, 3, 4, 5});
      b.add(big - gap, {-1, 0, 1, 0, -1});
      Keys all = a;
      all.append(b);
      const Partial<Acc> merged = merge(to_partial<Acc>(direct(a)), to_partial<Acc>(direct(b)));
      EXPECT_TRUE(std::isfinite(merged.lse)) << big << " " << gap;
      this->expect_near(merged, direct(all), big, "large lse");
      // The two-sided case: the partial with lse ~ +1e4 against one with lse ~ -1e4.
      const MergeWeights<Acc> w = merge_weights(Acc(big), Acc(-big));
      EXPECT_TRUE(std::isfinite(w.a) && std::isfinite(w.b) && std::isfinite(w.lse));
      EXPECT_EQ(w.lse, Acc(std::abs(big)));
    }
  }
}

// Folds the keys tile by tile through OnlineSoftmax as a kernel does and returns (o, lse).
template <class Acc>
Partial<Acc> online(const Keys& keys, std::size_t tile) {
  OnlineSoftmax<Acc> state;
  std::vector<Acc> accumulator(dim, Acc(0));
  for (std::size_t start = 0; start < keys.scores.size(); start += tile) {
    const std::size_t end = std::min(keys.scores.size(), start + tile);
    Acc tile_max = negative_infinity<Acc>();
    for (std::size_t i = start; i < end; ++i) tile_max = std::max(tile_max, Acc(keys.scores[i]));
    const Acc factor = state.rescale(tile_max);
    for (Acc& x : accumulator) x *= factor;
    for (std::size_t i = start; i < end; ++i) {
      const Acc p = std::exp(Acc(keys.scores[i]) - state.max);
      state.sum += p;
      for (int d = 0; d < dim; ++d) accumulator[d] += p * Acc(keys.values[i][d]);
    }
  }
  Partial<Acc> result;
  for (int d = 0; d < dim; ++d) result.o[d] = accumulator[d] * state.inverse_sum();
  result.lse = state.lse();
  return result;
}

TYPED_TEST(Merge, OnlineSoftmaxEqualsDirect) {
  using Acc = TypeParam;
  std::mt19937_64 engine(5);
  for (int trial = 0; trial < 60; ++trial) {
    const double centre = trial % 3 == 0 ? 0.0 : (trial % 3 == 1 ? 1e4 : -1e4);
    // Rising scores make the max move on (almost) every tile; random ones sometimes.
    Keys keys = random_keys(engine, 1 + trial % 13, centre, 20.0);
    if (trial % 2 == 0) std::sort(keys.scores.begin(), keys.scores.end());
    for (std::size_t tile : {1u, 3u, 64u}) {
      const Partial<Acc> result = online<Acc>(keys, tile);
      this->expect_near(result, direct(keys), std::abs(centre) + 20.0, "online");
    }
  }
}

TYPED_TEST(Merge, OnlineSoftmaxStates) {
  using Acc = TypeParam;
  OnlineSoftmax<Acc> state;
  EXPECT_TRUE(state.empty());
  EXPECT_EQ(state.lse(), negative_infinity<Acc>());
  EXPECT_EQ(state.inverse_sum(), Acc(0));
  // The first tile: the accumulator (nothing yet) is multiplied by 0, never by exp(-inf + x).
  EXPECT_EQ(state.rescale(Acc(3)), Acc(0));
  EXPECT_EQ(state.max, Acc(3));
  EXPECT_EQ(state.sum, Acc(0));
  EXPECT_TRUE(state.empty());  // no key folded in yet
  state.sum += Acc(1);         // exp(3 - 3)
  EXPECT_FALSE(state.empty());
  EXPECT_EQ(state.lse(), Acc(3));
  EXPECT_EQ(state.inverse_sum(), Acc(1));
  // A tile whose max does not exceed the running max: factor 1, nothing moves.
  EXPECT_EQ(state.rescale(Acc(2)), Acc(1));
  EXPECT_EQ(state.rescale(Acc(3)), Acc(1));
  EXPECT_EQ(state.rescale(negative_infinity<Acc>()), Acc(1));
  EXPECT_EQ(state.max, Acc(3));
  EXPECT_EQ(state.sum, Acc(1));
  // A larger max rescales the sum by exp(old - new).
  const Acc factor = state.rescale(Acc(5));
  EXPECT_NEAR(double(factor), std::exp(-2.0), this->tolerance());
  EXPECT_EQ(state.max, Acc(5));
  EXPECT_EQ(state.sum, factor);
  // A jump of 1e4 underflows the old sum to 0 without NaN.
  const Acc tiny = state.rescale(Acc(1e4));
  EXPECT_EQ(tiny, Acc(0));
  EXPECT_EQ(state.sum, Acc(0));
  EXPECT_TRUE(state.empty());
  EXPECT_EQ(state.lse(), negative_infinity<Acc>());
}

}  // namespace
