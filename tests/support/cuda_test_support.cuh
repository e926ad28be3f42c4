#pragma once
// Support for the CUDA tests: device detection (GPU tests skip with a message when there is no
// device), owning device buffers, and the routines that run a case on the GPU and check it with
// the oracles of cuda_test_oracles.hpp.

#include <dilated_attention/cuda.cuh>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "support/cuda_test_oracles.hpp"
#include "support/tensors.hpp"

namespace dilated_attention::testing {

// Empty when a device is usable; otherwise why not (for GTEST_SKIP).
inline std::string why_no_device() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess)
    return std::string("no CUDA device: cudaGetDeviceCount failed: ") + cudaGetErrorString(status);
  if (count == 0) return "no CUDA device: cudaGetDeviceCount returned 0";
  return {};
}

#define DILATED_ATTENTION_REQUIRE_DEVICE()                                      \
  do {                                                                          \
    const std::string why = ::dilated_attention::testing::why_no_device();      \
    if (!why.empty()) GTEST_SKIP() << why << " (this GPU test needs a device)"; \
  } while (0)

template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t count) : count_(count) {
    cuda::check(cudaMalloc(&data_, std::max<std::size_t>(count, 1) * sizeof(T)), "cudaMalloc");
  }
  ~DeviceBuffer() { cudaFree(data_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* data() const { return static_cast<T*>(data_); }
  void upload(const std::vector<T>& host) {
    cuda::check(cudaMemcpy(data_, host.data(), count_ * sizeof(T), cudaMemcpyHostToDevice),
                "cudaMemcpy H2D");
  }
  void download(std::vector<T>& host) const {
    host.resize(count_);
    cuda::check(cudaMemcpy(host.data(), data_, count_ * sizeof(T), cudaMemcpyDeviceToHost),
                "cudaMemcpy D2H");
  }

 private:
  void* data_ = nullptr;
  std::size_t count_;
};

// Runs cuda::forward on device copies of q, k, v. The output and LSE buffers are poisoned with
// NaN first, so an element the kernel forgets to write cannot pass.
template <class T>
KernelResult<T> run_on_gpu(const Config& config, const Shape& shape, const Tensor<T>& q,
                           const Tensor<T>& k, const Tensor<T>& v, std::int64_t pad,
                           std::int64_t seq_pad) {
  DeviceBuffer<T> dq(q.storage.size()), dk(k.storage.size()), dv(v.storage.size());
  dq.upload(q.storage);
  dk.upload(k.storage);
  dv.upload(v.storage);
  KernelResult<T> result = poisoned_result<T>(shape, pad, seq_pad);
  DeviceBuffer<T> dout(result.out.storage.size());
  dout.upload(result.out.storage);
  DeviceBuffer<float> dlse(result.lse.size());
  dlse.upload(result.lse);
  auto device_view = [](const Tensor<T>& host, T* data) {
    return View<T>{data, host.batch_stride, host.seq_stride, host.head_stride};
  };
  cuda::forward<T>(
      config, shape,
      {device_view(q, dq.data()), device_view(k, dk.data()), device_view(v, dv.data())},
      {device_view(result.out, dout.data()), dlse.data()});
  cuda::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize after forward");
  dout.download(result.out.storage);
  dlse.download(result.lse);
  return result;
}

// Runs a case on the GPU with seeded inputs and checks it (check_result).
template <class T>
void check_against_reference(const Case& c, std::uint64_t seed) {
  SCOPED_TRACE(describe(c));
  const DeviceTestInputs<T> in = random_device_test_inputs<T>(c.shape, c.pad, c.seq_pad, seed);
  check_result(c, in, run_on_gpu(c.config, c.shape, in.q, in.k, in.v, c.pad, c.seq_pad));
}

// Runs the same inputs twice: out and LSE must be bitwise equal (docs/semantics.md "Guarantees" (item 11)).
template <class T>
void check_deterministic(const Case& c, std::uint64_t seed) {
  SCOPED_TRACE(describe(c));
  const DeviceTestInputs<T> in = random_device_test_inputs<T>(c.shape, c.pad, c.seq_pad, seed);
  const KernelResult<T> first = run_on_gpu(c.config, c.shape, in.q, in.k, in.v, c.pad, c.seq_pad);
  const KernelResult<T> second = run_on_gpu(c.config, c.shape, in.q, in.k, in.v, c.pad, c.seq_pad);
  EXPECT_EQ(0, std::memcmp(first.out.storage.data(), second.out.storage.data(),
                           first.out.storage.size() * sizeof(T)));
  EXPECT_EQ(0, std::memcmp(first.lse.data(), second.lse.data(), first.lse.size() * sizeof(float)));
}

// Causal outputs of the first n rows do not depend on anything after them (docs/semantics.md "The forward", docs/semantics.md "Guarantees" (item 6)):
// the first `prefix` rows computed with seq_len = prefix and with the full length agree bitwise.
template <class T>
void check_causal_prefix(const Case& c, std::int64_t prefix, std::uint64_t seed) {
  SCOPED_TRACE(describe(c));
  const DeviceTestInputs<T> in = random_device_test_inputs<T>(c.shape, 0, 0, seed);
  const KernelResult<T> full = run_on_gpu(c.config, c.shape, in.q, in.k, in.v, 0, 0);
  Shape short_shape = c.shape;
  short_shape.seq_len = prefix;
  auto cut = [&](const Tensor<T>& t) {
    Tensor<T> head(short_shape, t.heads);
    for (std::int64_t b = 0; b < short_shape.batch; ++b)
      for (std::int64_t x = 0; x < prefix; ++x)
        for (std::int64_t h = 0; h < t.heads; ++h)
          for (std::int64_t d = 0; d < short_shape.head_dim; ++d)
            head.at(b, x, h, d) = t.at(b, x, h, d);
    return head;
  };
  const KernelResult<T> part =
      run_on_gpu(c.config, short_shape, cut(in.q), cut(in.k), cut(in.v), 0, 0);
  std::size_t differing = 0;
  for (std::int64_t b = 0; b < short_shape.batch; ++b)
    for (std::int64_t x = 0; x < prefix; ++x)
      for (std::int64_t h = 0; h < short_shape.num_heads; ++h)
        for (std::int64_t d = 0; d < short_shape.head_dim; ++d) {
          const T a = full.out.at(b, x, h, d), z = part.out.at(b, x, h, d);
          if (std::memcmp(&a, &z, sizeof(T)) != 0) ++differing;
        }
  EXPECT_EQ(differing, 0u);
}

// Fake, distinct, non-overlapping device addresses for argument tests: validate() only does
// arithmetic on them, and every test that uses them expects an exception before any launch.
template <class T>
struct FakeTensors {
  Shape shape;
  View<T> q, k, v, out;
  float* lse;
  explicit FakeTensors(const Shape& s) : shape(s) {
    const std::uintptr_t span = 1u << 28;
    auto at = [&](int i) { return reinterpret_cast<T*>(std::uintptr_t{1} << 32 | (span * i)); };
    q = contiguous_view(at(0), s, s.num_heads);
    k = contiguous_view(at(1), s, s.num_kv_heads);
    v = contiguous_view(at(2), s, s.num_kv_heads);
    out = contiguous_view(at(3), s, s.num_heads);
    lse = reinterpret_cast<float*>(at(4));
  }
};

}  // namespace dilated_attention::testing
