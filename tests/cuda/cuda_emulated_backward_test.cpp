// The CUDA backward kernels' own source, run on the host by tests/support/cuda_host_emulation.hpp, against
// reference::backward (docs/semantics.md "The gradient") for every storage type and head_dim, every offset
// rule, both mixings, causal, GQA, multiplicity and strided layouts -- the same checks the GPU
// tests make (cuda_backward_test_body.cuh), on machines without a GPU.

#include "support/cuda_host_emulation.hpp"  // first: it defines the CUDA names the kernels use

#include <dilated_attention/cuda/backward_kernel.cuh>
#include <dilated_attention/cuda/backward_plan.hpp>
#include <dilated_attention/cuda/tensor_core_backward_dk_dv_kernel.cuh>
#include <dilated_attention/cuda/tensor_core_backward_dq_kernel.cuh>

#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "support/cuda_backward_oracles.hpp"

namespace {

namespace da = dilated_attention;
namespace dc = dilated_attention::cuda;
namespace dt = dilated_attention::testing;

using Kernel = void (*)(dc::BackwardParams);
struct Kernels {
  Kernel row_statistics, dq, dk_dv;
};

// The kernels cuda::backward<T> runs: tensor-core dQ and dK/dV kernels for 16-bit storage.
template <class T, int D>
Kernels kernels() {
  if constexpr (std::is_same_v<T, float>)
    return {&dc::device::backward_row_statistics_kernel<T, D>,
            &dc::device::backward_dq_kernel<T, D>, &dc::device::backward_dk_dv_kernel<T, D>};
  else
    return {&dc::device::backward_row_statistics_kernel<T, D>,
            &dc::device::tensor_core_backward_dq_kernel<T, D>,
            &dc::device::tensor_core_backward_dk_dv_kernel<T, D>};
}
template <class T>
Kernels kernels_for(std::int64_t head_dim) {
  switch (head_dim) {
    case 32: return kernels<T, 32>();
    case 64: return kernels<T, 64>();
    case 96: return kernels<T, 96>();
    default: return kernels<T, 128>();
  }
}

// A 256-byte aligned host buffer standing in for the device workspace, poisoned with NaN.
struct Workspace {
  std::unique_ptr<unsigned char[]> raw;
  void* data;
  explicit Workspace(std::size_t bytes) : raw(new unsigned char[bytes + 256]) {
    data = raw.get() + (256 - reinterpret_cast<std::uintptr_t>(raw.get()) % 256) % 256;
    std::memset(data, 0xFF, bytes);
  }
};

// cuda::backward<T> as backward.cuh does it (validate, limits, plan, three launches), with the
// emulated launches. `plant` (a test of the test) replaces D by 0.9 D after kernel 1, as a kernel
// with a 10% error in one term would.
template <class T>
dt::BackwardResult<T> run_emulated(const dt::Case& c, const dt::BackwardInputs<T>& in,
                                   bool plant = false) {
  dt::BackwardResult<T> result = dt::poisoned_gradients<T>(c.shape, c.pad, c.seq_pad);
  const da::View<const T> q = in.q.view(), k = in.k.view(), v = in.v.view(), out = in.out.view(),
                          d_out = in.d_out.view();
  const da::View<T> d_q = result.d_q.view(), d_k = result.d_k.view(), d_v = result.d_v.view();
  da::validate_backward(c.config, c.shape, q, k, v, out, in.lse.data(), d_out, d_q, d_k, d_v);
  dc::check_backend_limits(c.config, c.shape);
  const std::size_t bytes = dc::backward_workspace_size(c.config, c.shape);
  Workspace workspace(bytes);
  const dc::KernelKind kind =
      std::is_same_v<T, float> ? dc::KernelKind::simt : dc::KernelKind::tensor_core;
  const dc::BackwardPlan plan =
      dc::make_backward_plan<T>(c.config, c.shape, q, k, v, out, in.lse.data(), d_out, d_q, d_k,
                                d_v, workspace.data, bytes, kind);
  EXPECT_LE(plan.shared_bytes, sizeof(dc::device::backward_rows));
  const Kernels kernel = kernels_for<T>(c.shape.head_dim);
  auto* shared = reinterpret_cast<unsigned char*>(dc::device::backward_rows);
  const auto threads = static_cast<unsigned>(plan.threads);
  emulation::launch(static_cast<unsigned>(plan.query_blocks), threads, shared, plan.shared_bytes,
                    [&] { kernel.row_statistics(plan.params); });
  if (plant)
    for (std::int64_t row = 0; row < plan.params.rows; ++row) plan.params.delta[row] *= 0.9f;
  unsigned char* dq_shared = kind == dc::KernelKind::simt ? shared : dc::device::shared_raw;
  EXPECT_LE(plan.dq_shared_bytes, sizeof(dc::device::shared_raw));
  emulation::launch(static_cast<unsigned>(plan.dq_blocks), static_cast<unsigned>(plan.dq_threads),
                    dq_shared, plan.dq_shared_bytes, [&] { kernel.dq(plan.params); });
  EXPECT_LE(plan.dk_dv_shared_bytes, sizeof(dc::device::shared_raw));
  emulation::launch(static_cast<unsigned>(plan.dk_dv_blocks),
                    static_cast<unsigned>(plan.dk_dv_threads), dq_shared, plan.dk_dv_shared_bytes,
                    [&] { kernel.dk_dv(plan.params); });
  return result;
}

template <class T>
double check_emulated(const dt::Case& c, std::uint64_t seed) {
  SCOPED_TRACE(dt::describe(c));
  const auto in = dt::random_backward_inputs<T>(c.shape, c.pad, c.seq_pad, c.config, seed);
  return dt::check_backward_result(c, in, run_emulated<T>(c, in));
}

template <class T>
void check_cases(std::int64_t head_dim, std::size_t first, std::size_t step, std::uint64_t seed,
                 std::size_t end = 1000) {
  const std::vector<dt::Case> cases = dt::backward_cases(head_dim);
  double worst = 0.0;
  for (std::size_t i = first; i < std::min(end, cases.size()); i += step)
    worst = std::max(worst, check_emulated<T>(cases[i], seed++));
  ::testing::Test::RecordProperty("worst_error_over_bound", std::to_string(worst));
  std::printf("head_dim %lld: worst error / bound %.3g\n", static_cast<long long>(head_dim), worst);
}

// Every case at head_dim 64 for each storage type; the other head dims on a spread.
// float runs only SIMT kernels, the same for every storage type: the two long cases (there to
// exercise the tensor-core dQ kernel's tiles and windows) run for 16-bit types only, which keeps
// this executable near a minute of CPU.
TEST(CudaEmulatedBackward, FloatEveryCase) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  check_cases<float>(64, 0, 1, 100, 13);
}
TEST(CudaEmulatedBackward, HalfEveryCase) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  check_cases<__half>(64, 0, 1, 200);
}
TEST(CudaEmulatedBackward, Bfloat16EveryCase) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  check_cases<__nv_bfloat16>(64, 0, 1, 300);
}
TEST(CudaEmulatedBackward, OtherHeadDimsEveryType) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  check_cases<float>(32, 3, 4, 400);  // three branches, mean, GQA
  check_cases<__half>(96, 1, 4, 500);
  check_cases<__nv_bfloat16>(128, 2, 4, 600);
  check_cases<__half>(128, 0, 5, 700);
  check_cases<__nv_bfloat16>(32, 4, 5, 800);
  check_cases<float>(96, 6, 6, 900, 13);
  check_cases<float>(128, 9, 100, 1000);
}

// The test bites: D 10% off gives an error above the bound.
TEST(CudaEmulatedBackward, PlantedErrorFails) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  const dt::Case c = dt::backward_cases(64)[0];
  const auto in = dt::random_backward_inputs<__nv_bfloat16>(c.shape, 0, 0, c.config, 1);
  const auto result = run_emulated<__nv_bfloat16>(c, in, /*plant=*/true);
  double ratio = 0.0;
  {
    ::testing::TestPartResultArray failures;
    ::testing::ScopedFakeTestPartResultReporter quiet(
        ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ONLY_CURRENT_THREAD, &failures);
    ratio = dt::check_backward_result(c, in, result);
    EXPECT_GT(failures.size(), 0);
  }
  EXPECT_GT(ratio, 1.0);
  std::printf("planted error: error / bound %.3g\n", ratio);
}

// Bitwise reproducible: the same inputs twice give the same bits (docs/semantics.md "Guarantees of the gradient").
TEST(CudaEmulatedBackward, BitwiseDeterministic) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  const dt::Case c = dt::backward_cases(64)[10];  // GQA mean causal
  const auto in = dt::random_backward_inputs<__half>(c.shape, 0, 0, c.config, 2);
  const auto first = run_emulated<__half>(c, in), second = run_emulated<__half>(c, in);
  EXPECT_TRUE(dt::bitwise_equal(first.d_q, second.d_q));
  EXPECT_TRUE(dt::bitwise_equal(first.d_k, second.d_k));
  EXPECT_TRUE(dt::bitwise_equal(first.d_v, second.d_v));
}

}  // namespace
