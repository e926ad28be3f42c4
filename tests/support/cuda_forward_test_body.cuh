// The body of the CUDA forward tests, included once per storage type by
// cuda_forward_{half,bfloat16,float}_test.cu (one translation unit per type, so that the
// kernels of the three types compile in parallel). Before including, define the type `Storage`
// and the macro DILATED_ATTENTION_SUITE(name), which gives each type its own suite names.
//
// Argument tests run everywhere (no device needed: validate() and the launch plan reject bad
// input before any CUDA call). GPU tests skip with "no CUDA device: ..." when none is present.

#include <gtest/gtest.h>

#include <cstdio>
#include <stdexcept>
#include <string>

#include "support/cuda_test_support.cuh"

namespace {

namespace da = dilated_attention;
namespace dt = dilated_attention::testing;

using T = Storage;

// Whether this device grants the forward kernel of T its shared memory at this head_dim (the
// 16-bit kernel needs 117.5 KiB at head_dim 128, more than the 99 KiB of sm_86/sm_89 parts).
inline bool device_fits_forward(std::int64_t head_dim) {
  if (std::is_same_v<T, float>) return true;
  int device = 0, limit = 0;
  da::cuda::check(cudaGetDevice(&device), "cudaGetDevice");
  da::cuda::check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                  "cudaDeviceGetAttribute");
  return static_cast<std::size_t>(limit) >= da::cuda::detail::forward_shared_bytes(head_dim);
}

da::Shape small_shape(std::int64_t head_dim = 64) { return {2, 100, 4, 2, head_dim}; }

// Expects std::invalid_argument whose message contains every fragment.
template <class Call>
void expect_invalid(Call&& call, std::initializer_list<const char*> fragments) {
  try {
    call();
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    for (const char* fragment : fragments)
      EXPECT_NE(message.find(fragment), std::string::npos)
          << "message \"" << message << "\" lacks \"" << fragment << "\"";
  } catch (const std::exception& error) {
    ADD_FAILURE() << "expected std::invalid_argument, got: " << error.what();
  }
}

void call_forward(const da::Config& config, const dt::FakeTensors<T>& t) {
  da::cuda::forward<T>(config, t.shape, {t.q, t.k, t.v}, {t.out, t.lse});
}

TEST(DILATED_ATTENTION_SUITE(Arguments), RejectsBadInputBeforeAnyDeviceWork) {
  const da::Config good = dt::make_config({32, 64}, {1, 2});
  {
    dt::FakeTensors<T> t(small_shape());
    t.q.data = nullptr;
    expect_invalid([&] { call_forward(good, t); }, {"q.data is null"});
  }
  {
    dt::FakeTensors<T> t(small_shape());
    expect_invalid(
        [&] {
          call_forward(dt::make_config({32, 64}, {1, 65}), t);
        },
        {"dilation_rates[1] = 65"});
    expect_invalid([&] { call_forward(dt::make_config({32, 64}, {1}), t); }, {"dilation_rates"});
    da::Config negative = good;
    negative.scale = -1.0;
    expect_invalid([&] { call_forward(negative, t); }, {"scale"});
  }
  {
    dt::FakeTensors<T> t({1, 64, 6, 4, 64});
    expect_invalid([&] { call_forward(good, t); }, {"num_kv_heads"});
  }
  {
    dt::FakeTensors<T> t({1, 64, 1, 1, 64});
    expect_invalid(
        [&] {
          call_forward(dt::make_config({32, 64}, {1, 2}, false, da::OffsetRule::partitioned), t);
        },
        {"partitioned"});
  }
  {
    dt::FakeTensors<T> t(small_shape());
    t.out.data = const_cast<T*>(t.q.data);
    expect_invalid([&] { call_forward(good, t); }, {"out overlaps q"});
  }
  {
    dt::FakeTensors<T> t(small_shape());
    t.lse = reinterpret_cast<float*>(t.out.data);
    expect_invalid([&] { call_forward(good, t); }, {"lse overlaps out"});
  }
}

TEST(DILATED_ATTENTION_SUITE(Arguments), RejectsUnsupportedHeadDim) {
  for (std::int64_t head_dim : {8, 16, 48, 80, 160, 256}) {
    dt::FakeTensors<T> t(small_shape(head_dim));
    expect_invalid([&] { call_forward(dt::make_config({32}, {1}), t); },
                   {"head_dim = ", "{32, 64, 96, 128}"});
  }
}

TEST(DILATED_ATTENTION_SUITE(Arguments), RejectsTooManyBranches) {
  std::vector<std::int64_t> w(da::cuda::max_branches + 1, 16), r(w.size(), 1);
  dt::FakeTensors<T> t({1, 64, 20, 20, 64});
  expect_invalid([&] { call_forward(dt::make_config(w, r), t); }, {"branches", "at most 16"});
}

// Without a device the launch itself fails: the failure must surface as std::runtime_error that
// carries CUDA's error string, never as a silent no-op.
TEST(DILATED_ATTENTION_SUITE(Errors), CudaFailureBecomesRuntimeError) {
  if (dt::why_no_device().empty())
    GTEST_SKIP() << "a device is present; this test checks the error path on machines without one";
  dt::FakeTensors<T> t(small_shape());
  try {
    call_forward(dt::make_config({32}, {1}), t);
    cudaError_t status = cudaDeviceSynchronize();
    ADD_FAILURE() << "no exception; cudaDeviceSynchronize says " << cudaGetErrorString(status);
  } catch (const std::runtime_error& error) {
    EXPECT_NE(std::string(error.what()).find("dilated_attention::cuda"), std::string::npos)
        << error.what();
  }
}

// The yardstick of docs/semantics.md "Guarantees" (item 10) itself, on the host: the naive storage-type implementation is
// close to the fp64 reference but not exact, so "at most twice its error" is a real bound that
// an O(1) kernel bug cannot meet. Runs without a device.
TEST(DILATED_ATTENTION_SUITE(Yardstick), NaiveStorageTypeErrorIsSmallButNotZero) {
  const dt::Case c{
      "yardstick",
      dt::make_config({40, 96}, {1, 3}, true, da::OffsetRule::modular, da::Mixing::mean),
      {1, 120, 3, 3, 64}};
  const auto in = dt::random_device_test_inputs<T>(c.shape, 0, 0, 7);
  const dt::Tensor<double> q = dt::widen(in.q), k = dt::widen(in.k), v = dt::widen(in.v);
  dt::Tensor<double> expected(c.shape, 3);
  std::vector<double> expected_lse(static_cast<std::size_t>(120 * 3));
  da::reference::forward<double>(c.config, c.shape, {q.view(), k.view(), v.view()},
                                 {expected.view(), expected_lse.data()});
  dt::Tensor<T> naive(c.shape, 3);
  std::vector<double> naive_lse;
  dt::naive_in_storage_type(c.config, c.shape, in.q, in.k, in.v, naive, naive_lse);
  const double error = dt::max_abs_diff(naive, expected);
  const double lse_error = dt::max_lse_diff(naive_lse, expected_lse);
  RecordProperty("naive_error", std::to_string(error));
  std::printf("naive storage-type error: output %.3g, lse %.3g\n", error, lse_error);
  const double ceiling = std::is_same_v<T, float> ? 1e-4 : 0.25;
  EXPECT_GT(error, 0.0);
  EXPECT_LT(error, ceiling);
  EXPECT_GT(lse_error, 0.0);
  EXPECT_LT(lse_error, (std::is_same_v<T, float> ? 1e-4 : 0.5));
}

TEST(DILATED_ATTENTION_SUITE(Gpu), MatchesReferenceEveryCaseHeadDim64) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  std::uint64_t seed = 100;
  for (const dt::Case& c : dt::correctness_cases(64)) dt::check_against_reference<T>(c, seed++);
}

TEST(DILATED_ATTENTION_SUITE(Gpu), MatchesReferenceOtherHeadDims) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  std::uint64_t seed = 200;
  for (std::int64_t head_dim : {32, 96, 128}) {
    if (!device_fits_forward(head_dim)) {
      std::printf("head_dim %lld skipped: over this device's shared memory (its own test below)\n",
                  static_cast<long long>(head_dim));
      continue;
    }
    const std::vector<dt::Case> cases = dt::correctness_cases(head_dim);
    // A spread of the cases: multi-tile, multi-branch causal, mean, GQA, both paddings.
    for (std::size_t i : {1u, 5u, 8u, 12u, 14u, 20u, 21u, 22u})
      dt::check_against_reference<T>(cases.at(i), seed++);
  }
}

TEST(DILATED_ATTENTION_SUITE(Gpu), LargerShape) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  if (!device_fits_forward(128)) GTEST_SKIP() << "head_dim 128 is over this device's shared memory";
  dt::check_against_reference<T>(
      {"longer sequence", dt::make_config({256, 512, 1024}, {1, 2, 4}, true), {1, 1500, 4, 2, 128}},
      300);
}

TEST(DILATED_ATTENTION_SUITE(Gpu), BitwiseDeterministic) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  std::uint64_t seed = 400;
  for (const dt::Case& c : dt::correctness_cases(64)) dt::check_deterministic<T>(c, seed++);
}

TEST(DILATED_ATTENTION_SUITE(Gpu), CausalPrefixDoesNotDependOnLaterRows) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  dt::check_causal_prefix<T>(
      {"causal prefix", dt::make_config({48, 96, 400}, {1, 2, 3}, true), {1, 300, 3, 3, 64}}, 130,
      500);
  dt::check_causal_prefix<T>(
      {"causal prefix mean",
       dt::make_config({48, 96}, {1, 2}, true, da::OffsetRule::blocked, da::Mixing::mean),
       {2, 257, 4, 2, 128}},
      64, 501);
}

TEST(DILATED_ATTENTION_SUITE(Gpu), StreamArgumentIsHonoured) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  // The same computation on a non-default stream gives the same bits as on the default one.
  const da::Config config = dt::make_config({64, 128}, {1, 2}, true);
  const da::Shape shape{1, 200, 2, 2, 64};
  const auto in = dt::random_device_test_inputs<T>(shape, 0, 0, 600);
  const auto expected = dt::run_on_gpu(config, shape, in.q, in.k, in.v, 0, 0);
  cudaStream_t stream;
  da::cuda::check(cudaStreamCreate(&stream), "cudaStreamCreate");
  dt::DeviceBuffer<T> dq(in.q.storage.size()), dk(in.k.storage.size()), dv(in.v.storage.size()),
      dout(expected.out.storage.size());
  dq.upload(in.q.storage);
  dk.upload(in.k.storage);
  dv.upload(in.v.storage);
  da::cuda::forward<T>(config, shape,
                       {da::contiguous_view<const T>(dq.data(), shape, 2),
                        da::contiguous_view<const T>(dk.data(), shape, 2),
                        da::contiguous_view<const T>(dv.data(), shape, 2)},
                       {da::contiguous_view(dout.data(), shape, 2)}, {stream});
  da::cuda::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  da::cuda::check(cudaStreamDestroy(stream), "cudaStreamDestroy");
  std::vector<T> got;
  dout.download(got);
  EXPECT_EQ(0, std::memcmp(got.data(), expected.out.storage.data(), got.size() * sizeof(T)));
}

// Launches with an invalid configuration (more threads per block than any GPU allows): a
// non-sticky error that the caller does not check.
__global__ void never_runs() {}

TEST(DILATED_ATTENTION_SUITE(Gpu), EarlierPendingErrorIsAttributedToTheCaller) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  const da::Config config = dt::make_config({64}, {1});
  const da::Shape shape{1, 64, 2, 2, 64};
  dt::DeviceBuffer<T> buffer(4 * 64 * 2 * 64);
  const auto view = da::contiguous_view<const T>(buffer.data(), shape, 2);
  const auto out = da::contiguous_view(buffer.data() + 3 * 64 * 2 * 64, shape, 2);
  never_runs<<<1, 4096>>>();
  try {
    da::cuda::forward<T>(config, shape, {view, view, view}, {out});
    ADD_FAILURE() << "the pending error went unnoticed";
  } catch (const std::runtime_error& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("from an earlier call"), std::string::npos) << message;
    EXPECT_NE(message.find("cudaErrorInvalidConfiguration"), std::string::npos) << message;
  }
  // Still pending for the caller, and forward works once it is cleared.
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  EXPECT_NO_THROW(da::cuda::forward<T>(config, shape, {view, view, view}, {out}));
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

TEST(DILATED_ATTENTION_SUITE(Gpu), SharedMemoryLimitOfThisDeviceIsChecked) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  // head_dim 128 needs 117.5 KiB of shared memory (16-bit kernel, either mixing): runs where the
  // device allows it, else std::invalid_argument naming the limit -- never a launch failure.
  const dt::Case c{
      "head_dim 128, mean",
      dt::make_config({64, 128}, {1, 2}, false, da::OffsetRule::modular, da::Mixing::mean),
      {1, 200, 2, 2, 128}};
  if (device_fits_forward(128)) {
    dt::check_against_reference<T>(c, 700);
    dt::check_against_reference<T>(c, 701);  // second call: the granted attribute is reused
  } else {
    EXPECT_THROW(dt::check_against_reference<T>(c, 700), std::invalid_argument);
  }
}

}  // namespace
