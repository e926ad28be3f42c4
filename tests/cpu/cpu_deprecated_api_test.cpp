// The positional spellings of the CPU entry points and of the oracle (deprecated in 0.1.0, removed
// in 0.2.0) forward to the grouped ones: each old call gives bitwise the result of the new call.
// That they are deprecated at all is checked at build time by tests/deprecated/ (the
// deprecation_check tests), which compile each old spelling with -Werror=deprecated-declarations.

#include <dilated_attention/dilated_attention.hpp>

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "support/random_config.hpp"
#include "support/tensors.hpp"

#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

namespace da = dilated_attention;
namespace dt = dilated_attention::testing;

namespace {

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <class T>
struct Problem {
  da::Config config = dt::make_config({16, 32}, {1, 2}, /*causal=*/true);
  da::Shape shape{2, 48, 4, 2, 16};
  dt::Tensor<T> q{shape, shape.num_heads, 1}, k{shape, shape.num_kv_heads},
      v{shape, shape.num_kv_heads}, d_out{shape, shape.num_heads};
  std::vector<da::lse_type_t<T>> lse = std::vector<da::lse_type_t<T>>(
      static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len));

  Problem() {
    q.fill_random(1);
    k.fill_random(2);
    v.fill_random(3);
    d_out.fill_random(4);
  }
  da::Inputs<T> inputs() const { return {q.view(), k.view(), v.view()}; }
};

template <class T>
struct Result {
  dt::Tensor<T> out, d_q, d_k, d_v;
  std::vector<da::lse_type_t<T>> lse;
  explicit Result(const Problem<T>& p)
      : out(p.shape, p.shape.num_heads),
        d_q(p.shape, p.shape.num_heads),
        d_k(p.shape, p.shape.num_kv_heads),
        d_v(p.shape, p.shape.num_kv_heads),
        lse(p.lse.size(), da::lse_type_t<T>(7)) {}
  da::Gradients<T> gradients() { return {d_q.view(), d_k.view(), d_v.view()}; }
};

template <class T>
void expect_same(const Result<T>& a, const Result<T>& b) {
  EXPECT_TRUE(same_bits(a.out.storage, b.out.storage));
  EXPECT_TRUE(same_bits(a.lse, b.lse));
  EXPECT_TRUE(same_bits(a.d_q.storage, b.d_q.storage));
  EXPECT_TRUE(same_bits(a.d_k.storage, b.d_k.storage));
  EXPECT_TRUE(same_bits(a.d_v.storage, b.d_v.storage));
}

template <class T>
void check_cpu() {
  Problem<T> p;
  const da::CpuOptions options{2};
  Result<T> fresh(p), old(p), old_default(p);
  da::forward<T>(p.config, p.shape, p.inputs(), {fresh.out.view(), fresh.lse.data()}, options);
  da::forward<T>(p.config, p.shape, p.q.view(), p.k.view(), p.v.view(), old.out.view(),
                 old.lse.data(), options);
  da::forward<T>(p.config, p.shape, p.q.view(), p.k.view(), p.v.view(), old_default.out.view(),
                 old_default.lse.data());
  const da::Outputs<const T> forward_outputs{fresh.out.view(), fresh.lse.data()};
  da::backward<T>(p.config, p.shape, p.inputs(), forward_outputs, p.d_out.view(), fresh.gradients(),
                  options);
  da::backward<T>(p.config, p.shape, p.q.view(), p.k.view(), p.v.view(), fresh.out.view(),
                  fresh.lse.data(), p.d_out.view(), old.d_q.view(), old.d_k.view(), old.d_v.view(),
                  options);
  da::backward<T>(p.config, p.shape, p.q.view(), p.k.view(), p.v.view(), fresh.out.view(),
                  fresh.lse.data(), p.d_out.view(), old_default.d_q.view(), old_default.d_k.view(),
                  old_default.d_v.view());
  expect_same(fresh, old);
  expect_same(fresh, old_default);
  // Without an LSE: the old default argument.
  Result<T> no_lse_new(p), no_lse_old(p);
  da::forward<T>(p.config, p.shape, p.inputs(), {no_lse_new.out.view()});
  da::forward<T>(p.config, p.shape, p.q.view(), p.k.view(), p.v.view(), no_lse_old.out.view());
  EXPECT_TRUE(same_bits(no_lse_new.out.storage, no_lse_old.out.storage));
}

template <class T>
void check_reference() {
  Problem<T> p;
  Result<T> fresh(p), old(p);
  da::reference::forward<T>(p.config, p.shape, p.inputs(), {fresh.out.view(), fresh.lse.data()});
  da::reference::forward<T>(p.config, p.shape, p.q.view(), p.k.view(), p.v.view(), old.out.view(),
                            old.lse.data());
  da::reference::backward<T>(p.config, p.shape, p.inputs(), {fresh.out.view(), fresh.lse.data()},
                             p.d_out.view(), fresh.gradients());
  da::reference::backward<T>(p.config, p.shape, p.q.view(), p.k.view(), p.v.view(),
                             fresh.out.view(), fresh.lse.data(), p.d_out.view(), old.d_q.view(),
                             old.d_k.view(), old.d_v.view());
  expect_same(fresh, old);
  Result<T> no_lse_new(p), no_lse_old(p);
  da::reference::forward<T>(p.config, p.shape, p.inputs(), {no_lse_new.out.view()});
  da::reference::forward<T>(p.config, p.shape, p.q.view(), p.k.view(), p.v.view(),
                            no_lse_old.out.view());
  EXPECT_TRUE(same_bits(no_lse_new.out.storage, no_lse_old.out.storage));
}

TEST(CpuDeprecatedApi, FloatMatchesGroupedCall) { check_cpu<float>(); }
TEST(CpuDeprecatedApi, DoubleMatchesGroupedCall) { check_cpu<double>(); }
TEST(CpuDeprecatedApi, BFloat16MatchesGroupedCall) { check_cpu<Eigen::bfloat16>(); }
TEST(ReferenceDeprecatedApi, DoubleMatchesGroupedCall) { check_reference<double>(); }
TEST(ReferenceDeprecatedApi, FloatMatchesGroupedCall) { check_reference<float>(); }

// The old spellings still validate first: a bad argument raises std::invalid_argument.
TEST(CpuDeprecatedApi, StillRejectsBadInput) {
  Problem<float> p;
  Result<float> r(p);
  EXPECT_THROW(da::forward<float>(p.config, p.shape, p.q.view(), p.k.view(), p.v.view(),
                                  r.out.view(), r.lse.data(), da::CpuOptions{-1}),
               std::invalid_argument);
  EXPECT_THROW(
      da::forward<float>(p.config, p.shape, p.inputs(), {r.out.view()}, da::CpuOptions{-1}),
      std::invalid_argument);
}

}  // namespace
