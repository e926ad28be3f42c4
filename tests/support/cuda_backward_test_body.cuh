// The body of the CUDA backward tests, included once per storage type by
// cuda_backward_{half,bfloat16,float}_test.cu. Before including, define the type `Storage` and
// the macro DILATED_ATTENTION_SUITE(name). Argument tests run everywhere (validate_backward and
// the plan reject bad input before any CUDA call); GPU tests skip with "no CUDA device: ..."
// without a device. The same cases and bound as the host emulation (cuda_backward_oracles.hpp).

#include <gtest/gtest.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "support/cuda_backward_oracles.hpp"
#include "support/cuda_test_support.cuh"

namespace {

namespace da = dilated_attention;
namespace dt = dilated_attention::testing;
using T = Storage;

template <class Call>
void expect_invalid(Call&& call, const char* fragment) {
  try {
    call();
    ADD_FAILURE() << "no exception (expected one mentioning \"" << fragment << "\")";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find(fragment), std::string::npos) << error.what();
  } catch (const std::exception& error) {
    ADD_FAILURE() << "expected std::invalid_argument, got: " << error.what();
  }
}

// Fake, distinct device addresses (never dereferenced: every call here throws first, or fails
// in the CUDA runtime on a machine without a device).
struct FakeBackward {
  da::Shape shape;
  da::View<const T> q, k, v, out, d_out;
  da::View<T> d_q, d_k, d_v;
  const float* lse;
  void* workspace;
  std::size_t workspace_bytes;
  FakeBackward(const da::Shape& s, const da::Config& config) : shape(s) {
    const std::uintptr_t span = 1u << 28;
    auto at = [&](int i) { return reinterpret_cast<T*>(std::uintptr_t{1} << 32 | (span * i)); };
    q = da::contiguous_view<const T>(at(0), s, s.num_heads);
    k = da::contiguous_view<const T>(at(1), s, s.num_kv_heads);
    v = da::contiguous_view<const T>(at(2), s, s.num_kv_heads);
    out = da::contiguous_view<const T>(at(3), s, s.num_heads);
    d_out = da::contiguous_view<const T>(at(4), s, s.num_heads);
    d_q = da::contiguous_view(at(5), s, s.num_heads);
    d_k = da::contiguous_view(at(6), s, s.num_kv_heads);
    d_v = da::contiguous_view(at(7), s, s.num_kv_heads);
    lse = reinterpret_cast<const float*>(at(8));
    workspace = at(9);
    workspace_bytes = da::cuda::backward_workspace_size(config, s);
  }
};

void call_backward(const da::Config& config, const FakeBackward& t) {
  da::cuda::backward<T>(config, t.shape, {t.q, t.k, t.v}, {t.out, t.lse}, t.d_out,
                        {t.d_q, t.d_k, t.d_v}, {nullptr, t.workspace, t.workspace_bytes});
}

TEST(DILATED_ATTENTION_SUITE(Arguments), RejectsBadInputBeforeAnyDeviceWork) {
  const da::Config config =
      dt::make_config({32, 64}, {1, 2}, true, da::OffsetRule::modular, da::Mixing::mean);
  const da::Shape shape{2, 100, 4, 2, 64};
  {
    FakeBackward t(shape, config);
    t.lse = nullptr;
    expect_invalid([&] { call_backward(config, t); }, "lse is null");
  }
  {
    FakeBackward t(shape, config);
    t.d_q.data = const_cast<T*>(t.q.data);
    expect_invalid([&] { call_backward(config, t); }, "d_q");
  }
  {  // No workspace: the call would allocate one, but only after every check of its arguments.
    FakeBackward t(shape, config);
    t.workspace = nullptr;
    t.workspace_bytes = 0;
    t.lse = nullptr;
    expect_invalid([&] { call_backward(config, t); }, "lse is null");
  }
  {
    FakeBackward t(shape, config);
    t.workspace = nullptr;
    t.d_q.data = reinterpret_cast<T*>(reinterpret_cast<std::uintptr_t>(t.d_q.data) + 1);
    expect_invalid([&] { call_backward(config, t); }, "d_q.data");
  }
  {
    FakeBackward t(shape, config);
    t.workspace_bytes -= 1;
    expect_invalid([&] { call_backward(config, t); }, "workspace_bytes");
  }
  {
    FakeBackward t(shape, config);
    t.workspace = static_cast<char*>(t.workspace) + 16;
    expect_invalid([&] { call_backward(config, t); }, "not aligned to 256 bytes");
  }
  {
    FakeBackward t(shape, config);
    t.workspace = const_cast<T*>(t.d_k.data);
    expect_invalid([&] { call_backward(config, t); }, "workspace overlaps d_k");
  }
  {
    const da::Shape wide{1, 64, 2, 2, 80};
    FakeBackward t(wide, config);
    expect_invalid([&] { call_backward(config, t); }, "head_dim = 80");
  }
  expect_invalid([&] { call_backward(dt::make_config({32}, {33}), FakeBackward(shape, config)); },
                 "dilation_rates[0] = 33");
}

TEST(DILATED_ATTENTION_SUITE(Arguments), WorkspaceSizeFollowsTheMixing) {
  const da::Shape shape{2, 100, 4, 2, 64};
  const auto softmax = dt::make_config({32, 64, 96}, {1, 2, 3});
  auto mean = softmax;
  mean.mixing = da::Mixing::mean;
  EXPECT_EQ(da::cuda::backward_workspace_size(softmax, shape), 3328u);   // 800 floats, to 256 B
  EXPECT_EQ(da::cuda::backward_workspace_size(mean, shape), 2 * 9728u);  // 3 x 800 floats, twice
}

TEST(DILATED_ATTENTION_SUITE(Errors), CudaFailureBecomesRuntimeError) {
  if (dt::why_no_device().empty())
    GTEST_SKIP() << "a device is present; this test checks the error path on machines without one";
  const da::Config config = dt::make_config({32}, {1});
  try {
    call_backward(config, FakeBackward({1, 64, 2, 2, 64}, config));
    ADD_FAILURE() << "no exception without a device";
  } catch (const std::runtime_error& error) {
    EXPECT_NE(std::string(error.what()).find("dilated_attention::cuda"), std::string::npos)
        << error.what();
  }
}

// Runs cuda::backward on device copies; gradients poisoned with NaN first, workspace too.
dt::BackwardResult<T> run_backward_on_gpu(const dt::Case& c, const dt::BackwardInputs<T>& in,
                                          cudaStream_t stream = nullptr) {
  auto upload = [](const dt::Tensor<T>& host) {
    auto buffer = std::make_unique<dt::DeviceBuffer<T>>(host.storage.size());
    buffer->upload(host.storage);
    return buffer;
  };
  auto view = [](const dt::Tensor<T>& host, T* data) {
    return da::View<T>{data, host.batch_stride, host.seq_stride, host.head_stride};
  };
  const auto q = upload(in.q), k = upload(in.k), v = upload(in.v), out = upload(in.out),
             d_out = upload(in.d_out);
  dt::DeviceBuffer<float> lse(in.lse.size());
  lse.upload(in.lse);
  dt::BackwardResult<T> result = dt::poisoned_gradients<T>(c.shape, c.pad, c.seq_pad);
  const auto d_q = upload(result.d_q), d_k = upload(result.d_k), d_v = upload(result.d_v);
  const std::size_t bytes = da::cuda::backward_workspace_size(c.config, c.shape);
  dt::DeviceBuffer<unsigned char> workspace(bytes);
  da::cuda::check(cudaMemset(workspace.data(), 0xFF, bytes), "cudaMemset");
  da::cuda::backward<T>(
      c.config, c.shape, {view(in.q, q->data()), view(in.k, k->data()), view(in.v, v->data())},
      {view(in.out, out->data()), lse.data()}, view(in.d_out, d_out->data()),
      {view(result.d_q, d_q->data()), view(result.d_k, d_k->data()), view(result.d_v, d_v->data())},
      {stream, workspace.data(), bytes});
  da::cuda::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize after backward");
  d_q->download(result.d_q.storage);
  d_k->download(result.d_k.storage);
  d_v->download(result.d_v.storage);
  return result;
}

TEST(DILATED_ATTENTION_SUITE(Gpu), MatchesReferenceEveryCaseHeadDim64) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  std::uint64_t seed = 100;
  for (const dt::Case& c : dt::backward_cases(64)) {
    SCOPED_TRACE(dt::describe(c));
    const auto in = dt::random_backward_inputs<T>(c.shape, c.pad, c.seq_pad, c.config, seed++);
    dt::check_backward_result(c, in, run_backward_on_gpu(c, in));
  }
}

TEST(DILATED_ATTENTION_SUITE(Gpu), MatchesReferenceEveryCaseOtherHeadDims) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  std::uint64_t seed = 200;
  for (std::int64_t head_dim : {32, 96, 128})
    for (const dt::Case& c : dt::backward_cases(head_dim)) {
      SCOPED_TRACE(dt::describe(c));
      const auto in = dt::random_backward_inputs<T>(c.shape, c.pad, c.seq_pad, c.config, seed++);
      dt::check_backward_result(c, in, run_backward_on_gpu(c, in));
    }
}

TEST(DILATED_ATTENTION_SUITE(Gpu), LargerShapeAndNonDefaultStream) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  const dt::Case c{
      "longer", dt::make_config({128, 256, 512}, {1, 2, 4}, true), {1, 700, 4, 2, 128}};
  const auto in = dt::random_backward_inputs<T>(c.shape, 0, 0, c.config, 300);
  cudaStream_t stream;
  da::cuda::check(cudaStreamCreate(&stream), "cudaStreamCreate");
  dt::check_backward_result(c, in, run_backward_on_gpu(c, in, stream));
  da::cuda::check(cudaStreamDestroy(stream), "cudaStreamDestroy");
}

TEST(DILATED_ATTENTION_SUITE(Gpu), BitwiseDeterministic) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  std::uint64_t seed = 400;
  for (const dt::Case& c : dt::backward_cases(64)) {
    SCOPED_TRACE(dt::describe(c));
    const auto in = dt::random_backward_inputs<T>(c.shape, c.pad, c.seq_pad, c.config, seed++);
    const auto first = run_backward_on_gpu(c, in), second = run_backward_on_gpu(c, in);
    EXPECT_TRUE(dt::bitwise_equal(first.d_q, second.d_q));
    EXPECT_TRUE(dt::bitwise_equal(first.d_k, second.d_k));
    EXPECT_TRUE(dt::bitwise_equal(first.d_v, second.d_v));
  }
}

}  // namespace
