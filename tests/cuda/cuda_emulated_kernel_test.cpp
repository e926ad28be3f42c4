// The CUDA forward kernels' own source, run on the host by tests/support/cuda_host_emulation.hpp (fibers
// for threads, PTX-defined ldmatrix / mma.sync fragment layouts), against the fp64 reference with
// docs/semantics.md "Guarantees" (item 10)'s bound. No GPU and no nvcc needed: this executes the kernels' index math, masking,
// online softmax across tiles and branches, mean mixing, epilogue and fragment bookkeeping on
// every machine, CI included. What it cannot check -- real cp.async ordering, races, speed --
// is left to the GPU tests and compute-sanitizer (docs/cuda.md).

#include "support/cuda_host_emulation.hpp"  // first: it defines the CUDA names the kernels use

#include <dilated_attention/cuda/launch_plan.hpp>
#include <dilated_attention/cuda/simt_kernel.cuh>
#include <dilated_attention/cuda/tensor_core_kernel.cuh>

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "support/cuda_test_oracles.hpp"

namespace {

namespace da = dilated_attention;
namespace dc = dilated_attention::cuda;
namespace dt = dilated_attention::testing;

using Kernel = void (*)(dc::ForwardParams);

template <class T>
Kernel kernel_for(std::int64_t head_dim) {
  constexpr bool simt = std::is_same_v<T, float>;
  switch (head_dim) {
    case 32:
      return simt ? Kernel{&dc::device::simt_forward_kernel<float, 32>}
                  : Kernel{&dc::device::tensor_core_forward_kernel<T, 32>};
    case 64:
      return simt ? Kernel{&dc::device::simt_forward_kernel<float, 64>}
                  : Kernel{&dc::device::tensor_core_forward_kernel<T, 64>};
    case 96:
      return simt ? Kernel{&dc::device::simt_forward_kernel<float, 96>}
                  : Kernel{&dc::device::tensor_core_forward_kernel<T, 96>};
    default:
      return simt ? Kernel{&dc::device::simt_forward_kernel<float, 128>}
                  : Kernel{&dc::device::tensor_core_forward_kernel<T, 128>};
  }
}

// forward<T> as cuda/forward.cuh does it (validate, plan, launch), with the emulated launch.
template <class T>
dt::KernelResult<T> run_emulated(const dt::Case& c, const dt::DeviceTestInputs<T>& in) {
  dt::KernelResult<T> result = dt::poisoned_result<T>(c.shape, c.pad, c.seq_pad);
  const auto q = in.q.view(), k = in.k.view(), v = in.v.view();
  const auto out = result.out.view();
  da::validate(c.config, c.shape, q, k, v, out, result.lse.data());
  const dc::KernelKind kind =
      std::is_same_v<T, float> ? dc::KernelKind::simt : dc::KernelKind::tensor_core;
  const dc::LaunchPlan plan =
      dc::make_launch_plan<T>(c.config, c.shape, q, k, v, out, result.lse.data(), kind);
  unsigned char* shared = kind == dc::KernelKind::simt
                              ? reinterpret_cast<unsigned char*>(dc::device::simt_query_rows)
                              : dc::device::shared_raw;
  EXPECT_LE(plan.shared_bytes, sizeof(dc::device::shared_raw));
  const Kernel kernel = kernel_for<T>(c.shape.head_dim);
  const emulation::ReadableScope readable{std::pair{in.q.storage.data(), in.q.storage.size()},
                                          std::pair{in.k.storage.data(), in.k.storage.size()},
                                          std::pair{in.v.storage.data(), in.v.storage.size()}};
  emulation::launch(static_cast<unsigned>(plan.blocks), static_cast<unsigned>(plan.threads), shared,
                    plan.shared_bytes, [&] { kernel(plan.params); });
  return result;
}

template <class T>
void check_emulated(const dt::Case& c, std::uint64_t seed) {
  SCOPED_TRACE(dt::describe(c));
  const auto in = dt::random_device_test_inputs<T>(c.shape, c.pad, c.seq_pad, seed);
  dt::check_result(c, in, run_emulated<T>(c, in));
}

// Cases of cuda_test_oracles.hpp small enough for the emulation (each emulated block costs
// milliseconds), covering every rule, both mixings, causal, GQA, several tiles per block, several
// segments per window, both copy paths.
std::vector<dt::Case> emulated_cases(std::int64_t head_dim) {
  const std::vector<dt::Case> all = dt::correctness_cases(head_dim);
  std::vector<dt::Case> chosen;
  for (const dt::Case& c : all) {
    const std::int64_t blocks = (c.shape.seq_len + 63) / 64 * c.shape.num_heads * c.shape.batch;
    if (blocks <= 24) chosen.push_back(c);
  }
  return chosen;
}

// Cases i, i + step, i + 2 step, ... of the emulated selection.
template <class T>
void check_every(std::int64_t head_dim, std::size_t first, std::size_t step, std::uint64_t seed) {
  const std::vector<dt::Case> cases = emulated_cases(head_dim);
  for (std::size_t i = first; i < cases.size(); i += step) check_emulated<T>(cases[i], seed++);
}

TEST(CudaEmulatedKernel, CaseSelectionCoversTheRules) {
  const auto cases = emulated_cases(64);
  std::string names;
  for (const auto& c : cases) names += c.name + "; ";
  for (const char* needed :
       {"dense causal", "several key tiles", "several segments per window", "three branches causal",
        "blocked mean", "partitioned mean", "GQA 6:2", "odd padding", "aligned padding",
        "strided windows R = 2", "strided windows R = 4"})
    EXPECT_NE(names.find(needed), std::string::npos) << needed << " not emulated: " << names;
}

// The two 16-bit types run the same code but for the element type, so they share the cases:
// half takes the even ones, bfloat16 the odd ones (the emulation costs ~50 ms per block).
TEST(CudaEmulatedKernel, TensorCoreHalfMatchesReference) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  check_every<__half>(64, 0, 2, 1000);
}

TEST(CudaEmulatedKernel, TensorCoreBfloat16MatchesReference) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  check_every<__nv_bfloat16>(64, 1, 2, 2000);
}

TEST(CudaEmulatedKernel, TensorCoreOtherHeadDims) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  check_every<__half>(32, 8, 100, 3000);           // three branches causal
  check_every<__nv_bfloat16>(96, 10, 100, 3100);   // blocked mean causal
  check_every<__half>(128, 14, 100, 3200);         // GQA 6:2
  check_every<__nv_bfloat16>(128, 22, 100, 3300);  // strided windows R = 4
}

// The query windows of K residues and the packed slices (R = 12, 6, 3; cuda/query_window.hpp):
// every case for both 16-bit types at head_dim 64, and two per head_dim (one per type) at 32, 96
// and 128.
std::vector<dt::Case> packed_slice_cases(std::int64_t head_dim) {
  std::vector<dt::Case> chosen;
  for (const dt::Case& c : dt::correctness_cases(head_dim))
    if (c.name.rfind("packed slices", 0) == 0) chosen.push_back(c);
  return chosen;
}

TEST(CudaEmulatedKernel, PackedSlicesEveryTypeAndHeadDim) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  ASSERT_EQ(packed_slice_cases(64).size(), 4u);
  std::uint64_t seed = 5000;
  for (const dt::Case& c : packed_slice_cases(64)) {
    check_emulated<__half>(c, seed++);
    check_emulated<__nv_bfloat16>(c, seed++);
  }
  check_emulated<__half>(packed_slice_cases(32)[0], seed++);
  check_emulated<__nv_bfloat16>(packed_slice_cases(32)[3], seed++);
  check_emulated<__half>(packed_slice_cases(96)[1], seed++);
  check_emulated<__nv_bfloat16>(packed_slice_cases(96)[2], seed++);
  check_emulated<__half>(packed_slice_cases(128)[3], seed++);
  check_emulated<__nv_bfloat16>(packed_slice_cases(128)[0], seed++);
}

// The fp32 kernel emulates one warp per row (many shuffles per key chunk): a few small cases.
TEST(CudaEmulatedKernel, SimtFloatMatchesReference) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  check_every<float>(64, 6, 100, 4000);    // several segments per window
  check_every<float>(64, 16, 100, 4100);   // branch listed twice
  check_every<float>(32, 10, 100, 4200);   // blocked mean causal
  check_every<float>(128, 17, 100, 4300);  // single position
}

}  // namespace
