// reference::backward against central finite differences of reference::forward, in double
// (docs/semantics.md "Guarantees of the gradient"): for L = sum(d_out ∘ O), each element of dQ, dK, dV must equal
// (L(t + eps) - L(t - eps)) / (2 eps) to 1e-6 of the largest gradient. Cases cover every offset
// rule x mixing x causal, GQA, H not a multiple of G, r not dividing w, N a multiple of no
// segment, w >= N, B > 1, empty rows, and random problems. Then one test per bad input of
// docs/semantics.md "Inputs and bad input of the backward", each checking that no gradient was written.

#include <dilated_attention/reference.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "support/random_config.hpp"
#include "support/tensors.hpp"

namespace da = dilated_attention;
namespace dt = dilated_attention::testing;
using ::testing::HasSubstr;

namespace {

struct Gradients {
  dt::Tensor<double> q, k, v;
};

// L(q, k, v) = sum over logical elements of d_out ∘ O.
double loss(const da::Config& config, const da::Shape& shape, const dt::Inputs<double>& in,
            const dt::Tensor<double>& d_out) {
  dt::Tensor<double> out(shape, shape.num_heads);
  da::reference::forward(config, shape, {in.q.view(), in.k.view(), in.v.view()},
                         da::Outputs{out.view()});
  double sum = 0.0;
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t x = 0; x < shape.seq_len; ++x)
      for (std::int64_t h = 0; h < shape.num_heads; ++h)
        for (std::int64_t d = 0; d < shape.head_dim; ++d)
          sum += d_out.at(b, x, h, d) * out.at(b, x, h, d);
  return sum;
}

// Central differences of L with respect to every logical element of `tensor` (one of in.q, k, v).
dt::Tensor<double> numerical_gradient(const da::Config& config, const da::Shape& shape,
                                      dt::Inputs<double>& in, dt::Tensor<double>& tensor,
                                      const dt::Tensor<double>& d_out) {
  constexpr double eps = 1e-5;
  dt::Tensor<double> gradient(shape, tensor.heads);
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t x = 0; x < shape.seq_len; ++x)
      for (std::int64_t h = 0; h < tensor.heads; ++h)
        for (std::int64_t d = 0; d < shape.head_dim; ++d) {
          double& element = tensor.at(b, x, h, d);
          const double saved = element;
          element = saved + eps;
          const double up = loss(config, shape, in, d_out);
          element = saved - eps;
          const double down = loss(config, shape, in, d_out);
          element = saved;
          gradient.at(b, x, h, d) = (up - down) / (2 * eps);
        }
  return gradient;
}

double max_abs(const dt::Tensor<double>& t) {
  double worst = 0.0;
  for (std::int64_t b = 0; b < t.shape.batch; ++b)
    for (std::int64_t x = 0; x < t.shape.seq_len; ++x)
      for (std::int64_t h = 0; h < t.heads; ++h)
        for (std::int64_t d = 0; d < t.shape.head_dim; ++d)
          worst = std::max(worst, std::abs(t.at(b, x, h, d)));
  return worst;
}

// Checks reference::backward against finite differences; gradient outputs are pre-filled with
// a sentinel so that an element the backward forgot to overwrite shows up.
void check_against_finite_differences(const da::Config& config, const da::Shape& shape,
                                      std::uint64_t seed) {
  SCOPED_TRACE(dt::describe(config, shape));
  dt::Inputs<double> in = dt::random_inputs<double>(shape, seed);
  const dt::Tensor<double> d_out = dt::random_tensor<double>(shape, shape.num_heads, seed + 7);
  dt::Tensor<double> out(shape, shape.num_heads);
  std::vector<double> lse(dt::lse_size(shape));
  da::reference::forward(config, shape, {in.q.view(), in.k.view(), in.v.view()},
                         da::Outputs{out.view(), lse.data()});

  Gradients analytic{dt::Tensor<double>(shape, shape.num_heads, 1),
                     dt::Tensor<double>(shape, shape.num_kv_heads, 2),
                     dt::Tensor<double>(shape, shape.num_kv_heads, 0, 3)};
  for (dt::Tensor<double>* t : {&analytic.q, &analytic.k, &analytic.v}) t->fill(-777.0);
  da::reference::backward<double>(config, shape, {in.q.view(), in.k.view(), in.v.view()},
                                  {out.view(), lse.data()}, d_out.view(),
                                  {analytic.q.view(), analytic.k.view(), analytic.v.view()});

  const dt::Tensor<double> numeric_q = numerical_gradient(config, shape, in, in.q, d_out);
  const dt::Tensor<double> numeric_k = numerical_gradient(config, shape, in, in.k, d_out);
  const dt::Tensor<double> numeric_v = numerical_gradient(config, shape, in, in.v, d_out);
  const double scale =
      std::max({max_abs(numeric_q), max_abs(numeric_k), max_abs(numeric_v), 1e-300});
  EXPECT_LE(dt::max_abs_diff(analytic.q, numeric_q) / scale, 1e-6) << "dQ";
  EXPECT_LE(dt::max_abs_diff(analytic.k, numeric_k) / scale, 1e-6) << "dK";
  EXPECT_LE(dt::max_abs_diff(analytic.v, numeric_v) / scale, 1e-6) << "dV";
  // Padding of the gradient outputs is never written.
  EXPECT_EQ(analytic.q.storage.back(), -777.0);
  EXPECT_EQ(analytic.k.storage.back(), -777.0);
  EXPECT_EQ(analytic.v.storage.back(), -777.0);
}

struct Case {
  da::OffsetRule rule;
  da::Mixing mixing;
  bool causal;
};

class ReferenceBackward : public ::testing::TestWithParam<Case> {};

// Branches (5, 1), (7, 3), (16, 4) over N = 13: 13 is a multiple of no w, 3 does not divide 7,
// w = 16 >= N; H = 5 is a multiple of neither G = 3 nor the rates; B = 2.
TEST_P(ReferenceBackward, AwkwardShapeMatchesFiniteDifferences) {
  const Case c = GetParam();
  const da::Config config = dt::make_config({5, 7, 16}, {1, 3, 4}, c.causal, c.rule, c.mixing);
  check_against_finite_differences(config, da::Shape{2, 13, 5, 5, 3}, 11);
}

// Grouped-query attention: three query heads per K/V head, so dK, dV sum over the group.
TEST_P(ReferenceBackward, GroupedQueryMatchesFiniteDifferences) {
  const Case c = GetParam();
  const da::Config config = dt::make_config({4, 9}, {2, 3}, c.causal, c.rule, c.mixing);
  check_against_finite_differences(config, da::Shape{1, 11, 6, 2, 4}, 23);
}

// A branch listed twice: multiplicity 2 on every pair it attends, which the gradient must carry.
TEST_P(ReferenceBackward, RepeatedBranchMatchesFiniteDifferences) {
  const Case c = GetParam();
  const da::Config config = dt::make_config({6, 6, 3}, {2, 2, 1}, c.causal, c.rule, c.mixing);
  check_against_finite_differences(config, da::Shape{1, 10, 3, 1, 2}, 31);
}

TEST_P(ReferenceBackward, RandomProblemsMatchFiniteDifferences) {
  const Case c = GetParam();
  std::mt19937_64 engine(1000 + static_cast<int>(c.rule) * 10 + static_cast<int>(c.mixing) * 2 +
                         (c.causal ? 1 : 0));
  dt::RandomConfigLimits limits;
  limits.max_seq_len = 14;
  limits.max_segment = 9;
  limits.max_heads = 5;
  limits.max_head_dim = 3;
  limits.max_batch = 2;
  for (int trial = 0; trial < 4; ++trial) {
    dt::Problem p = dt::random_problem(engine, c.rule, c.causal, limits);
    p.config.mixing = c.mixing;
    if (trial == 3) p.config.scale = 0.37;  // an explicit scale enters dQ and dK
    check_against_finite_differences(p.config, p.shape, 100 + static_cast<std::uint64_t>(trial));
  }
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  return std::string(da::to_string(info.param.rule)) + "_" + da::to_string(info.param.mixing) +
         (info.param.causal ? "_causal" : "_full");
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (const da::OffsetRule rule :
       {da::OffsetRule::modular, da::OffsetRule::blocked, da::OffsetRule::partitioned})
    for (const da::Mixing mixing : {da::Mixing::softmax, da::Mixing::mean})
      for (const bool causal : {false, true}) cases.push_back({rule, mixing, causal});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(EveryRuleMixingAndMask, ReferenceBackward,
                         ::testing::ValuesIn(all_cases()), case_name);

// Rows that no branch selects (partitioned heads outside their offset) give zero gradients, and
// keys that no query attends get dK = dV = 0: finite, never NaN, and overwritten.
TEST(ReferenceBackwardEdges, EmptyRowsAndUnattendedKeysAreZero) {
  const da::Config config =
      dt::make_config({8, 8}, {4, 2}, false, da::OffsetRule::partitioned, da::Mixing::softmax);
  const da::Shape shape{1, 8, 2, 2, 2};
  dt::Inputs<double> in = dt::random_inputs<double>(shape, 5);
  const dt::Tensor<double> d_out = dt::random_tensor<double>(shape, shape.num_heads, 9);
  dt::Tensor<double> out(shape, shape.num_heads);
  std::vector<double> lse(dt::lse_size(shape));
  da::reference::forward(config, shape, {in.q.view(), in.k.view(), in.v.view()},
                         da::Outputs{out.view(), lse.data()});
  dt::Tensor<double> dq(shape, 2), dk(shape, 2), dv(shape, 2);
  for (dt::Tensor<double>* t : {&dq, &dk, &dv}) t->fill(std::nan(""));
  da::reference::backward<double>(config, shape, {in.q.view(), in.k.view(), in.v.view()},
                                  {out.view(), lse.data()}, d_out.view(),
                                  {dq.view(), dk.view(), dv.view()});
  // Head 0 runs branch 0 with offset 0 (rate 4): rows 0 and 4 only. Head 1 runs branch 1 with
  // offset 1 (rate 2): rows 1, 3, 5, 7.
  for (std::int64_t x = 0; x < 8; ++x)
    for (std::int64_t d = 0; d < 2; ++d) {
      const bool head0_row = x % 4 == 0, head1_row = x % 2 == 1;
      EXPECT_EQ(dq.at(0, x, 0, d) == 0.0, !head0_row) << "x " << x;
      EXPECT_EQ(dq.at(0, x, 1, d) == 0.0, !head1_row) << "x " << x;
      EXPECT_EQ(dv.at(0, x, 0, d) == 0.0, !head0_row) << "x " << x;
      EXPECT_EQ(dv.at(0, x, 1, d) == 0.0, !head1_row) << "x " << x;
      EXPECT_FALSE(std::isnan(dk.at(0, x, 0, d)));
    }
}

// The gradient of a float problem is the double gradient rounded once.
TEST(ReferenceBackwardEdges, FloatStorageIsTheDoubleGradientRounded) {
  const da::Config config = dt::make_config({6, 12}, {1, 3}, true);
  const da::Shape shape{1, 12, 3, 3, 4};
  const dt::Inputs<double> in = dt::random_inputs<double>(shape, 3);
  const dt::Tensor<double> d_out = dt::random_tensor<double>(shape, 3, 4);
  dt::Inputs<float> in_f{dt::Tensor<float>(shape, 3), dt::Tensor<float>(shape, 3),
                         dt::Tensor<float>(shape, 3)};
  dt::Tensor<float> d_out_f(shape, 3);
  for (std::size_t i = 0; i < in.q.storage.size(); ++i) {
    in_f.q.storage[i] = static_cast<float>(in.q.storage[i]);
    in_f.k.storage[i] = static_cast<float>(in.k.storage[i]);
    in_f.v.storage[i] = static_cast<float>(in.v.storage[i]);
    d_out_f.storage[i] = static_cast<float>(d_out.storage[i]);
  }
  dt::Inputs<double> rounded{dt::Tensor<double>(shape, 3), dt::Tensor<double>(shape, 3),
                             dt::Tensor<double>(shape, 3)};
  dt::Tensor<double> d_out_rounded(shape, 3);
  for (std::size_t i = 0; i < in.q.storage.size(); ++i) {
    rounded.q.storage[i] = in_f.q.storage[i];
    rounded.k.storage[i] = in_f.k.storage[i];
    rounded.v.storage[i] = in_f.v.storage[i];
    d_out_rounded.storage[i] = d_out_f.storage[i];
  }
  dt::Tensor<double> out(shape, 3), dq(shape, 3), dk(shape, 3), dv(shape, 3);
  std::vector<double> lse(dt::lse_size(shape));
  da::reference::forward(config, shape, {rounded.q.view(), rounded.k.view(), rounded.v.view()},
                         da::Outputs{out.view(), lse.data()});
  da::reference::backward<double>(
      config, shape, {rounded.q.view(), rounded.k.view(), rounded.v.view()},
      {out.view(), lse.data()}, d_out_rounded.view(), {dq.view(), dk.view(), dv.view()});
  dt::Tensor<float> out_f(shape, 3), dq_f(shape, 3), dk_f(shape, 3), dv_f(shape, 3);
  std::vector<float> lse_f(dt::lse_size(shape));
  da::reference::forward(config, shape, {in_f.q.view(), in_f.k.view(), in_f.v.view()},
                         da::Outputs{out_f.view(), lse_f.data()});
  da::reference::backward<float>(config, shape, {in_f.q.view(), in_f.k.view(), in_f.v.view()},
                                 {out_f.view(), lse_f.data()}, d_out_f.view(),
                                 {dq_f.view(), dk_f.view(), dv_f.view()});
  for (std::size_t i = 0; i < dq.storage.size(); ++i) {
    EXPECT_EQ(dq_f.storage[i], static_cast<float>(dq.storage[i]));
    EXPECT_EQ(dk_f.storage[i], static_cast<float>(dk.storage[i]));
    EXPECT_EQ(dv_f.storage[i], static_cast<float>(dv.storage[i]));
  }
}

// --- Bad input (docs/semantics.md "Inputs and bad input of the backward") -------------------------------------------------------

constexpr double sentinel_value = 4321.25;

// A valid backward problem whose gradient outputs hold a sentinel; each test breaks one thing.
struct BackwardProblem {
  da::Config config = dt::make_config({6, 4}, {2, 3});
  da::Shape shape{2, 10, 4, 2, 3};
  dt::Inputs<double> in = dt::random_inputs<double>(shape, 7);
  dt::Tensor<double> out_tensor{shape, shape.num_heads};
  dt::Tensor<double> d_out_tensor = dt::random_tensor<double>(shape, shape.num_heads, 8);
  // Room after the LSE, so that a gradient pointed at it overlaps the LSE and nothing else
  // (the gradients are larger than the LSE); the call reads only the first lse_size elements.
  std::vector<double> lse_storage = std::vector<double>(dt::lse_size(shape) + 1024);
  dt::Tensor<double> dq_tensor{shape, shape.num_heads}, dk_tensor{shape, shape.num_kv_heads},
      dv_tensor{shape, shape.num_kv_heads};
  da::View<const double> q = in.q.view(), k = in.k.view(), v = in.v.view();
  da::View<const double> out = out_tensor.view(), d_out = d_out_tensor.view();
  const double* lse = lse_storage.data();
  da::View<double> d_q = dq_tensor.view(), d_k = dk_tensor.view(), d_v = dv_tensor.view();

  BackwardProblem() {
    da::reference::forward(config, shape, {q, k, v},
                           da::Outputs{out_tensor.view(), lse_storage.data()});
    for (dt::Tensor<double>* t : {&dq_tensor, &dk_tensor, &dv_tensor}) t->fill(sentinel_value);
  }
  void backward() const {
    da::reference::backward<double>(config, shape, {q, k, v}, {out, lse}, d_out, {d_q, d_k, d_v});
  }
  bool gradients_untouched() const {
    for (const dt::Tensor<double>* t : {&dq_tensor, &dk_tensor, &dv_tensor})
      for (const double value : t->storage)
        if (!(value == sentinel_value)) return false;
    return true;
  }
};

void expect_rejected(const BackwardProblem& p, const std::vector<std::string>& parts) {
  try {
    p.backward();
    ADD_FAILURE() << "no exception was thrown";
  } catch (const std::invalid_argument& error) {
    EXPECT_THAT(error.what(), HasSubstr("dilated_attention: "));
    for (const std::string& part : parts) EXPECT_THAT(error.what(), HasSubstr(part));
  } catch (const std::exception& error) {
    ADD_FAILURE() << "wrong exception type: " << error.what();
  }
  EXPECT_TRUE(p.gradients_untouched()) << "a gradient was written before the error";
}

TEST(ReferenceBackwardRejects, ValidProblemPasses) {
  BackwardProblem p;
  EXPECT_NO_THROW(p.backward());
  EXPECT_FALSE(p.gradients_untouched());
}

TEST(ReferenceBackwardRejects, ForwardRulesStillApply) {
  BackwardProblem p;
  p.config.dilation_rates = {7, 1};
  expect_rejected(p, {"config.dilation_rates[0] = 7", "r <= w"});
}

TEST(ReferenceBackwardRejects, NullLse) {
  BackwardProblem p;
  p.lse = nullptr;
  expect_rejected(p, {"lse is null"});
}

TEST(ReferenceBackwardRejects, NullDOut) {
  BackwardProblem p;
  p.d_out.data = nullptr;
  expect_rejected(p, {"d_out.data is null"});
}

TEST(ReferenceBackwardRejects, NullOut) {
  BackwardProblem p;
  p.out.data = nullptr;
  expect_rejected(p, {"out.data is null"});
}

TEST(ReferenceBackwardRejects, NullGradientOutput) {
  BackwardProblem p;
  p.d_k.data = nullptr;
  expect_rejected(p, {"d_k.data is null"});
}

TEST(ReferenceBackwardRejects, SelfOverlappingGradient) {
  BackwardProblem p;
  p.d_v.seq_stride = 1;
  expect_rejected(p, {"d_v strides", "share memory"});
}

TEST(ReferenceBackwardRejects, GradientOverlapsEachInput) {
  struct Overlap {
    const char* gradient;
    const char* input;
  };
  for (const Overlap o : {Overlap{"d_q", "q"}, Overlap{"d_k", "k"}, Overlap{"d_v", "v"},
                          Overlap{"d_q", "out"}, Overlap{"d_k", "d_out"}, Overlap{"d_v", "lse"}}) {
    SCOPED_TRACE(std::string(o.gradient) + " over " + o.input);
    BackwardProblem p;
    const std::string input = o.input, gradient = o.gradient;
    // Point the gradient at the input's memory (a cast the caller might get wrong).
    double* target = input == "q"       ? const_cast<double*>(p.q.data)
                     : input == "k"     ? const_cast<double*>(p.k.data)
                     : input == "v"     ? const_cast<double*>(p.v.data)
                     : input == "out"   ? const_cast<double*>(p.out.data)
                     : input == "d_out" ? const_cast<double*>(p.d_out.data)
                                        : const_cast<double*>(p.lse);
    da::View<double>& view = gradient == "d_q" ? p.d_q : gradient == "d_k" ? p.d_k : p.d_v;
    // Keep the input's first element intact: the check happens before anything is written.
    view.data = target;
    expect_rejected(p, {gradient + " overlaps " + input, "must not share memory"});
  }
}

TEST(ReferenceBackwardRejects, GradientsOverlapEachOther) {
  {
    BackwardProblem p;
    p.d_k.data = p.d_q.data + 5;
    expect_rejected(p, {"d_k overlaps d_q"});
  }
  {
    BackwardProblem p;
    p.d_v.data = p.d_k.data;
    expect_rejected(p, {"d_v overlaps d_k"});
  }
}

}  // namespace
