// What a downstream program writes against the package, built by the consumer projects (after
// `cmake --install` + find_package, and through add_subdirectory / FetchContent). It checks two
// properties of docs/semantics.md "Guarantees" that need no test framework, so that a broken include path, a missing
// dependency or a wrong link interface shows up as a failing exit code:
//   1. one branch with w >= N and r = 1 is dense softmax attention (computed inline here);
//   2. several branches: LSE = ln sum_i exp(LSE_i) of the single-branch runs.
// When the CPU kernel header is installed too, its float result is compared with the reference.

#include <dilated_attention/reference.hpp>
// CONSUMER_REFERENCE_ONLY: a quick build without Eigen, for the cheaper consumer variants.
#if !defined(CONSUMER_REFERENCE_ONLY) && __has_include(<dilated_attention/dilated_attention.hpp>)
#include <dilated_attention/dilated_attention.hpp>
#define CONSUMER_HAS_CPU_KERNEL 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

namespace da = dilated_attention;

namespace {

int failures = 0;

void expect(bool ok, const char* what, double value) {
  std::printf("%s %-58s %.3g\n", ok ? "ok  " : "FAIL", what, value);
  if (!ok) ++failures;
}

std::vector<double> random_tensor(std::int64_t elements, std::uint64_t seed) {
  std::mt19937_64 engine(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> data(static_cast<std::size_t>(elements));
  for (double& x : data) x = normal(engine);
  return data;
}

struct Result {
  std::vector<double> out, lse;
};

Result run_reference(const da::Config& config, const da::Shape& shape, const std::vector<double>& q,
                     const std::vector<double>& k, const std::vector<double>& v) {
  Result r{
      std::vector<double>(q.size()),
      std::vector<double>(static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len))};
  da::reference::forward(
      config, shape,
      {da::contiguous_view(q.data(), shape, shape.num_heads),
       da::contiguous_view(k.data(), shape, shape.num_kv_heads),
       da::contiguous_view(v.data(), shape, shape.num_kv_heads)},
      da::Outputs{da::contiguous_view(r.out.data(), shape, shape.num_heads), r.lse.data()});
  return r;
}

// Dense softmax attention written out here, independently of the library.
void check_dense(bool causal) {
  const da::Shape shape{2, 13, 2, 2, 8};
  const std::int64_t n = shape.seq_len, h_count = shape.num_heads, d_count = shape.head_dim;
  const auto elements = shape.batch * n * h_count * d_count;
  const auto q = random_tensor(elements, 1), k = random_tensor(elements, 2),
             v = random_tensor(elements, 3);
  da::Config config;
  config.segment_lengths = {16};  // w >= N
  config.dilation_rates = {1};
  config.causal = causal;
  const Result r = run_reference(config, shape, q, k, v);

  const double scale = 1.0 / std::sqrt(static_cast<double>(d_count));
  double worst_out = 0.0, worst_lse = 0.0;
  auto at = [&](std::int64_t b, std::int64_t x, std::int64_t h) {
    return static_cast<std::size_t>(((b * n + x) * h_count + h) * d_count);
  };
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t h = 0; h < h_count; ++h)
      for (std::int64_t x = 0; x < n; ++x) {
        const std::int64_t keys = causal ? x + 1 : n;
        std::vector<double> s(static_cast<std::size_t>(keys));
        for (std::int64_t y = 0; y < keys; ++y) {
          double dot = 0.0;
          for (std::int64_t d = 0; d < d_count; ++d) dot += q[at(b, x, h) + d] * k[at(b, y, h) + d];
          s[static_cast<std::size_t>(y)] = scale * dot;
        }
        const double m = *std::max_element(s.begin(), s.end());
        double sum = 0.0;
        for (double& e : s) sum += (e = std::exp(e - m));
        const double lse = m + std::log(sum);
        worst_lse = std::max(
            worst_lse, std::abs(lse - r.lse[static_cast<std::size_t>((b * h_count + h) * n + x)]));
        for (std::int64_t d = 0; d < d_count; ++d) {
          double o = 0.0;
          for (std::int64_t y = 0; y < keys; ++y)
            o += s[static_cast<std::size_t>(y)] / sum * v[at(b, y, h) + d];
          worst_out = std::max(worst_out, std::abs(o - r.out[at(b, x, h) + d]));
        }
      }
  expect(worst_out < 1e-12, causal ? "dense causal: max |O - O_dense|" : "dense: max |O - O_dense|",
         worst_out);
  expect(worst_lse < 1e-12,
         causal ? "dense causal: max |LSE - LSE_dense|" : "dense: max |LSE - LSE_dense|",
         worst_lse);
}

// N = 23 is a multiple of no w; r = 3 does not divide w = 8; 6 query heads share 3 K/V heads.
void check_branch_merge() {
  const da::Shape shape{1, 23, 6, 3, 4};
  const auto q = random_tensor(shape.seq_len * shape.num_heads * shape.head_dim, 4);
  const auto k = random_tensor(shape.seq_len * shape.num_kv_heads * shape.head_dim, 5);
  const auto v = random_tensor(shape.seq_len * shape.num_kv_heads * shape.head_dim, 6);
  const std::vector<std::int64_t> w = {4, 8, 16}, rates = {1, 3, 4};

  da::Config all;
  all.segment_lengths = w;
  all.dilation_rates = rates;
  const Result merged = run_reference(all, shape, q, k, v);

  std::vector<Result> single;
  for (std::size_t i = 0; i < w.size(); ++i) {
    da::Config one;
    one.segment_lengths = {w[i]};
    one.dilation_rates = {rates[i]};
    single.push_back(run_reference(one, shape, q, k, v));
  }
  double worst = 0.0;
  bool finite = true;
  for (std::size_t j = 0; j < merged.lse.size(); ++j) {
    double sum = 0.0;
    for (const Result& r : single) sum += std::exp(r.lse[j]);  // exp(-inf) = 0 for unselected rows
    const double expected = sum > 0.0 ? std::log(sum) : -std::numeric_limits<double>::infinity();
    if (std::isinf(expected) || std::isinf(merged.lse[j]))
      worst = std::max(worst, expected == merged.lse[j] ? 0.0 : 1.0);
    else
      worst = std::max(worst, std::abs(expected - merged.lse[j]));
  }
  for (double o : merged.out) finite = finite && std::isfinite(o);
  expect(finite, "3 branches: every output is finite", 0.0);
  expect(worst < 1e-12, "3 branches: max |LSE - ln sum_i exp(LSE_i)|", worst);
}

#ifdef CONSUMER_HAS_CPU_KERNEL
void check_cpu_kernel() {
  const da::Shape shape{1, 37, 4, 2, 16};
  da::Config config;
  config.segment_lengths = {8, 16, 32};
  config.dilation_rates = {1, 2, 4};
  config.causal = true;
  const auto q = random_tensor(shape.seq_len * shape.num_heads * shape.head_dim, 7);
  const auto k = random_tensor(shape.seq_len * shape.num_kv_heads * shape.head_dim, 8);
  const auto v = random_tensor(shape.seq_len * shape.num_kv_heads * shape.head_dim, 9);
  const Result expected = run_reference(config, shape, q, k, v);

  const std::vector<float> qf(q.begin(), q.end()), kf(k.begin(), k.end()), vf(v.begin(), v.end());
  std::vector<float> out(qf.size()), lse(expected.lse.size());
  da::forward(config, shape,
              {da::contiguous_view(qf.data(), shape, shape.num_heads),
               da::contiguous_view(kf.data(), shape, shape.num_kv_heads),
               da::contiguous_view(vf.data(), shape, shape.num_kv_heads)},
              da::Outputs{da::contiguous_view(out.data(), shape, shape.num_heads), lse.data()});
  double worst = 0.0;
  for (std::size_t j = 0; j < out.size(); ++j)
    worst = std::max(worst, std::abs(static_cast<double>(out[j]) - expected.out[j]));
  expect(worst < 1e-4, "cpu forward<float> vs reference: max |dO|", worst);
}
#endif

}  // namespace

int main() {
  check_dense(false);
  check_dense(true);
  check_branch_merge();
#ifdef CONSUMER_HAS_CPU_KERNEL
  check_cpu_kernel();
#else
  std::printf(
      "skip the CPU kernel (reference only, or <dilated_attention/dilated_attention.hpp> "
      "absent)\n");
#endif
  std::printf("%s\n", failures == 0 ? "consumer: all checks passed" : "consumer: FAILED");
  return failures == 0 ? 0 : 1;
}
