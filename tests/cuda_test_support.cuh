#pragma once
// Support for the CUDA tests: device detection (GPU tests skip with a message when there is no
// device), owning device buffers, the naive implementation computed in the storage type (the
// yardstick of SPEC §6.10) and the one routine that runs a case on the GPU and checks it against
// the fp64 reference.

#include <dilated_attention/cuda.cuh>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

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

#define DILATED_ATTENTION_REQUIRE_DEVICE()                                    \
  do {                                                                        \
    const std::string why = ::dilated_attention::testing::why_no_device();    \
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

template <class T>
double to_double(T value) {
  return static_cast<double>(static_cast<float>(value));
}
template <>
inline double to_double<double>(double value) {
  return value;
}

template <class T>
T from_double(double value) {
  return T(static_cast<float>(value));
}

// SPEC §2 computed naively with every intermediate rounded to the storage type T (scores, the
// running max, exponentials, sums, products, the output): "a naive implementation computed in
// the same storage type". Arithmetic on T is emulated as float arithmetic rounded back to T,
// which is exact rounding for half and bfloat16. LSE is computed the same way.
template <class T>
void naive_in_storage_type(const Config& config, const Shape& shape, const Tensor<T>& q,
                           const Tensor<T>& k, const Tensor<T>& v, Tensor<T>& out,
                           std::vector<double>& lse) {
  const Pattern pattern(config, shape);
  auto round = [](double x) { return to_double(from_double<T>(x)); };
  const double scale = round(resolved_scale(config, shape));
  const std::int64_t n = shape.seq_len, dim = shape.head_dim, branches = pattern.num_branches();
  const double inf = std::numeric_limits<double>::infinity();
  lse.assign(static_cast<std::size_t>(shape.batch * shape.num_heads * n), -inf);
  std::vector<double> o(static_cast<std::size_t>(dim)), row(static_cast<std::size_t>(dim));
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t h = 0; h < shape.num_heads; ++h) {
      const std::int64_t kvh = pattern.kv_head(h);
      for (std::int64_t x = 0; x < n; ++x) {
        // One softmax over a list of (key, weight) groups: all branches at once (softmax
        // mixing) or one branch at a time (mean mixing).
        auto attend = [&](const std::vector<Progression>& key_sets, std::vector<double>& result,
                          double& result_lse) {
          double max_score = -inf;
          std::vector<double> scores;
          for (const Progression& keys : key_sets)
            for (std::int64_t j = 0; j < keys.count; ++j) {
              double dot = 0.0;
              for (std::int64_t d = 0; d < dim; ++d)
                dot = round(dot + round(to_double(q.at(b, x, h, d)) *
                                        to_double(k.at(b, keys.at(j), kvh, d))));
              const double s = round(dot * scale);
              scores.push_back(s);
              max_score = std::max(max_score, s);
            }
          std::fill(result.begin(), result.end(), 0.0);
          if (scores.empty()) {
            result_lse = -inf;
            return;
          }
          double sum = 0.0;
          std::size_t at = 0;
          for (const Progression& keys : key_sets)
            for (std::int64_t j = 0; j < keys.count; ++j, ++at) {
              const double p = round(std::exp(round(scores[at] - max_score)));
              sum = round(sum + p);
              for (std::int64_t d = 0; d < dim; ++d)
                result[static_cast<std::size_t>(d)] =
                    round(result[static_cast<std::size_t>(d)] +
                          round(p * to_double(v.at(b, keys.at(j), kvh, d))));
            }
          for (double& value : result) value = round(value / sum);
          result_lse = round(max_score + round(std::log(sum)));
        };
        std::vector<Progression> all;
        for (std::int64_t i = 0; i < branches; ++i) {
          const Progression keys = pattern.keys(i, h, x);
          if (!keys.empty()) all.push_back(keys);
        }
        double row_lse = -inf;
        attend(all, row, row_lse);  // softmax mixing, and the LSE of both mixings
        if (config.mixing == Mixing::mean) {
          std::fill(row.begin(), row.end(), 0.0);
          for (const Progression& keys : all) {
            double branch_lse = 0.0;
            attend({keys}, o, branch_lse);
            for (std::int64_t d = 0; d < dim; ++d)
              row[static_cast<std::size_t>(d)] =
                  round(row[static_cast<std::size_t>(d)] +
                        round(o[static_cast<std::size_t>(d)] / static_cast<double>(branches)));
          }
        }
        for (std::int64_t d = 0; d < dim; ++d)
          out.at(b, x, h, d) = from_double<T>(row[static_cast<std::size_t>(d)]);
        lse[static_cast<std::size_t>((b * shape.num_heads + h) * n + x)] = row_lse;
      }
    }
}

// A test case: config, shape and layout padding (pad 0: dense; a pad that is not a multiple of
// 8 elements forces the element-wise copy path; a multiple of 8 keeps 16-byte transfers).
struct Case {
  std::string name;
  Config config;
  Shape shape;
  std::int64_t pad = 0, seq_pad = 0;
};

inline std::string describe(const Case& c) {
  std::string text = c.name + " [B" + std::to_string(c.shape.batch) + " N" +
                     std::to_string(c.shape.seq_len) + " H" + std::to_string(c.shape.num_heads) +
                     " Hkv" + std::to_string(c.shape.num_kv_heads) + " D" +
                     std::to_string(c.shape.head_dim) + "] w,r =";
  for (std::size_t i = 0; i < c.config.segment_lengths.size(); ++i)
    text += " (" + std::to_string(c.config.segment_lengths[i]) + "," +
            std::to_string(c.config.dilation_rates[i]) + ")";
  text += std::string(c.config.causal ? " causal " : " ") + to_string(c.config.offsets) + " " +
          to_string(c.config.mixing) + " pad " + std::to_string(c.pad);
  return text;
}

inline Config make_config(std::vector<std::int64_t> w, std::vector<std::int64_t> r,
                          bool causal = false, OffsetRule offsets = OffsetRule::modular,
                          Mixing mixing = Mixing::softmax) {
  Config config;
  config.segment_lengths = std::move(w);
  config.dilation_rates = std::move(r);
  config.causal = causal;
  config.offsets = offsets;
  config.mixing = mixing;
  return config;
}

// The result of one GPU run, downloaded.
template <class T>
struct GpuResult {
  Tensor<T> out;
  std::vector<float> lse;
};

// Runs cuda::forward on device copies of q, k, v. The output and LSE buffers are poisoned with
// NaN first, so an element the kernel forgets to write cannot pass.
template <class T>
GpuResult<T> run_on_gpu(const Config& config, const Shape& shape, const Tensor<T>& q,
                        const Tensor<T>& k, const Tensor<T>& v, std::int64_t pad,
                        std::int64_t seq_pad) {
  DeviceBuffer<T> dq(q.storage.size()), dk(k.storage.size()), dv(v.storage.size());
  dq.upload(q.storage);
  dk.upload(k.storage);
  dv.upload(v.storage);
  GpuResult<T> result;
  result.out = Tensor<T>(shape, shape.num_heads, pad, seq_pad);
  result.out.fill(T(std::numeric_limits<float>::quiet_NaN()));
  DeviceBuffer<T> dout(result.out.storage.size());
  dout.upload(result.out.storage);
  const auto lse_count = static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len);
  result.lse.assign(lse_count, std::numeric_limits<float>::quiet_NaN());
  DeviceBuffer<float> dlse(lse_count);
  dlse.upload(result.lse);
  auto device_view = [](const Tensor<T>& host, T* data) {
    return View<T>{data, host.batch_stride, host.seq_stride, host.head_stride};
  };
  cuda::forward<T>(config, shape, device_view(q, dq.data()), device_view(k, dk.data()),
                   device_view(v, dv.data()), device_view(result.out, dout.data()), dlse.data(),
                   nullptr);
  cuda::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize after forward");
  dout.download(result.out.storage);
  dlse.download(result.lse);
  return result;
}

template <class T>
struct DeviceTestInputs {
  Tensor<T> q, k, v;
};

template <class T>
DeviceTestInputs<T> random_device_test_inputs(const Shape& shape, std::int64_t pad, std::int64_t seq_pad,
                        std::uint64_t seed) {
  DeviceTestInputs<T> in{Tensor<T>(shape, shape.num_heads, pad, seq_pad),
               Tensor<T>(shape, shape.num_kv_heads, pad, seq_pad),
               Tensor<T>(shape, shape.num_kv_heads, pad, seq_pad)};
  in.q.fill_random(seed);
  in.k.fill_random(seed + 1);
  in.v.fill_random(seed + 2);
  return in;
}

template <class T>
Tensor<double> widen(const Tensor<T>& t) {
  Tensor<double> wide(t.shape, t.heads);
  for (std::int64_t b = 0; b < t.shape.batch; ++b)
    for (std::int64_t x = 0; x < t.shape.seq_len; ++x)
      for (std::int64_t h = 0; h < t.heads; ++h)
        for (std::int64_t d = 0; d < t.shape.head_dim; ++d)
          wide.at(b, x, h, d) = to_double(t.at(b, x, h, d));
  return wide;
}

// SPEC §6.10 for 16-bit types: max error against the fp64 reference at most twice the naive
// storage-type implementation's, with a floor of 1e-6 for cases where the naive result happens
// to be exact (a block of one key returns v itself). For float (no naive yardstick in the SPEC)
// the same rule with a floor of 2e-5. Both documented in docs/cuda.md.
template <class T>
void check_against_reference(const Case& c, std::uint64_t seed) {
  SCOPED_TRACE(describe(c));
  const DeviceTestInputs<T> in = random_device_test_inputs<T>(c.shape, c.pad, c.seq_pad, seed);
  const GpuResult<T> gpu = run_on_gpu(c.config, c.shape, in.q, in.k, in.v, c.pad, c.seq_pad);

  // The oracle runs on the inputs widened exactly to double.
  const Tensor<double> q = widen(in.q), k = widen(in.k), v = widen(in.v);
  Tensor<double> expected(c.shape, c.shape.num_heads);
  std::vector<double> expected_lse(gpu.lse.size());
  reference::forward<double>(c.config, c.shape, q.view(), k.view(), v.view(), expected.view(),
                             expected_lse.data());

  Tensor<T> naive(c.shape, c.shape.num_heads);
  std::vector<double> naive_lse;
  naive_in_storage_type(c.config, c.shape, in.q, in.k, in.v, naive, naive_lse);

  const double floor = std::is_same_v<T, float> ? 2e-5 : 1e-6;
  const double naive_error = max_abs_diff(naive, expected);
  const double gpu_error = max_abs_diff(gpu.out, expected);
  EXPECT_LE(gpu_error, std::max(2.0 * naive_error, floor))
      << "output: gpu error " << gpu_error << ", naive " << naive_error;
  const double naive_lse_error = max_lse_diff(naive_lse, expected_lse);
  const double gpu_lse_error = max_lse_diff(gpu.lse, expected_lse);
  EXPECT_LE(gpu_lse_error, std::max(2.0 * naive_lse_error, floor))
      << "lse: gpu error " << gpu_lse_error << ", naive " << naive_lse_error;

  // Layout padding of the output is never written (it still holds the NaN poison).
  std::size_t touched_padding = 0;
  for (std::int64_t b = 0; b < c.shape.batch; ++b)
    for (std::int64_t x = 0; x < c.shape.seq_len; ++x)
      for (std::int64_t h = 0; h < c.shape.num_heads; ++h)
        for (std::int64_t d = c.shape.head_dim; d < gpu.out.head_stride; ++d)
          if (!std::isnan(to_double(gpu.out.at(b, x, h, d)))) ++touched_padding;
  EXPECT_EQ(touched_padding, 0u) << "the kernel wrote into the output view's padding";
}

// The cases every dtype runs: each rule of SPEC §2-3 and each oracle of §6 that a single device
// can check, on awkward sizes (N not a multiple of the window or of w, r not dividing w, H not
// a multiple of G or r, several key tiles per block, several segments per window).
inline std::vector<Case> correctness_cases(std::int64_t head_dim) {
  const auto shape = [head_dim](std::int64_t b, std::int64_t n, std::int64_t h, std::int64_t hkv) {
    return Shape{b, n, h, hkv, head_dim};
  };
  using R = OffsetRule;
  using M = Mixing;
  std::vector<Case> cases = {
      {"dense (w >= N, r = 1)", make_config({512}, {1}), shape(2, 150, 2, 2)},
      {"dense causal", make_config({512}, {1}, true), shape(1, 200, 2, 2)},
      {"block diagonal", make_config({48}, {1}), shape(1, 150, 2, 2)},
      {"one dilated branch, r not dividing w", make_config({40}, {3}), shape(1, 130, 4, 4)},
      {"one dilated branch causal", make_config({100}, {3}, true), shape(1, 230, 3, 3)},
      {"several key tiles per block", make_config({512}, {2}), shape(1, 700, 2, 2)},
      {"several segments per window", make_config({5, 13}, {2, 3}, true), shape(1, 90, 3, 3)},
      {"three branches modular softmax", make_config({20, 50, 120}, {1, 3, 7}), shape(1, 200, 5, 5)},
      {"three branches causal", make_config({20, 50, 120}, {1, 3, 7}, true), shape(1, 200, 5, 5)},
      {"blocked softmax", make_config({16, 64}, {2, 4}, false, R::blocked), shape(1, 160, 5, 5)},
      {"blocked mean causal", make_config({16, 64}, {2, 4}, true, R::blocked, M::mean),
       shape(1, 160, 5, 5)},
      {"modular mean", make_config({32, 96, 160}, {1, 2, 5}, false, R::modular, M::mean),
       shape(1, 170, 4, 4)},
      {"partitioned mean (dilated-attention-pytorch)",
       make_config({32, 64, 128}, {1, 2, 4}, false, R::partitioned, M::mean), shape(2, 128, 5, 5)},
      {"partitioned softmax causal",
       make_config({32, 64, 128}, {1, 2, 4}, true, R::partitioned, M::softmax), shape(1, 150, 4, 4)},
      {"GQA 6:2", make_config({64, 128}, {1, 2}, true), shape(1, 140, 6, 2)},
      {"GQA 6:3 blocked mean", make_config({64, 128}, {2, 2}, false, R::blocked, M::mean),
       shape(1, 140, 6, 3)},
      {"branch listed twice", make_config({64, 64}, {2, 2}), shape(1, 100, 2, 2)},
      {"paper config (scaled N)",
       make_config({2048, 4096, 8192, 16384, 32768}, {1, 2, 4, 6, 12}), shape(1, 260, 12, 12)},
      {"single position", make_config({4, 8}, {1, 2}, true), shape(2, 1, 2, 1)},
      {"r = w", make_config({7}, {7}), shape(1, 50, 8, 8)},
  };
  // Strided layouts: an odd pad forces the element-wise path, a pad of 8 keeps 16-byte copies.
  Case odd{"odd padding (element-wise copies)", make_config({40, 96}, {1, 3}, true),
           shape(2, 120, 3, 3), 1, 3};
  Case even{"aligned padding (cp.async)", make_config({40, 96}, {1, 3}, true), shape(2, 120, 3, 3),
            8, 8};
  cases.push_back(odd);
  cases.push_back(even);
  return cases;
}

// Runs the same inputs twice: out and LSE must be bitwise equal (SPEC §6.11).
template <class T>
void check_deterministic(const Case& c, std::uint64_t seed) {
  SCOPED_TRACE(describe(c));
  const DeviceTestInputs<T> in = random_device_test_inputs<T>(c.shape, c.pad, c.seq_pad, seed);
  const GpuResult<T> first = run_on_gpu(c.config, c.shape, in.q, in.k, in.v, c.pad, c.seq_pad);
  const GpuResult<T> second = run_on_gpu(c.config, c.shape, in.q, in.k, in.v, c.pad, c.seq_pad);
  EXPECT_EQ(0, std::memcmp(first.out.storage.data(), second.out.storage.data(),
                           first.out.storage.size() * sizeof(T)));
  EXPECT_EQ(0, std::memcmp(first.lse.data(), second.lse.data(), first.lse.size() * sizeof(float)));
}

// Causal outputs of the first n rows do not depend on anything after them (SPEC §2, §6.6):
// the first `prefix` rows computed with seq_len = prefix and with the full length agree bitwise.
template <class T>
void check_causal_prefix(const Case& c, std::int64_t prefix, std::uint64_t seed) {
  SCOPED_TRACE(describe(c));
  const DeviceTestInputs<T> in = random_device_test_inputs<T>(c.shape, 0, 0, seed);
  const GpuResult<T> full = run_on_gpu(c.config, c.shape, in.q, in.k, in.v, 0, 0);
  Shape short_shape = c.shape;
  short_shape.seq_len = prefix;
  auto cut = [&](const Tensor<T>& t) {
    Tensor<T> head(short_shape, t.heads);
    for (std::int64_t b = 0; b < short_shape.batch; ++b)
      for (std::int64_t x = 0; x < prefix; ++x)
        for (std::int64_t h = 0; h < t.heads; ++h)
          for (std::int64_t d = 0; d < short_shape.head_dim; ++d) head.at(b, x, h, d) = t.at(b, x, h, d);
    return head;
  };
  const GpuResult<T> part = run_on_gpu(c.config, short_shape, cut(in.q), cut(in.k), cut(in.v), 0, 0);
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
