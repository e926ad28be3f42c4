// GPU backward benchmarks (cuda::backward), Google Benchmark with manual time from CUDA events.
// Reports useful TFLOP/s of the backward by the usual convention, 2.5x the forward's useful FLOPs
// (Pattern::useful_flops(): 4 * head_dim per attended pair; backward: dV, dP, dS.K, dS^T.Q and the
// recomputed S, 10 * head_dim per pair) and milliseconds per call. Compare with PyTorch SDPA's
// backward (benchmarks/peers/cuda_sdpa_and_peer.py --sdpa-backward) on the dense shape.
//
// Without a device every case reports "no CUDA device: ..." and nothing is timed.

#include <dilated_attention/cuda.cuh>

#include <benchmark/benchmark.h>

#include <cstdint>
#include <string>

namespace {

namespace da = dilated_attention;
using Bf16 = __nv_bfloat16;

std::string why_no_device() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) return std::string("no CUDA device: ") + cudaGetErrorString(status);
  if (count == 0) return "no CUDA device: cudaGetDeviceCount returned 0";
  return {};
}

template <class T>
__global__ void fill_random(T* data, std::int64_t count, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + static_cast<std::uint64_t>(i);
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    x ^= x >> 31;
    data[i] = T((static_cast<float>(x >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * 1.7320508f);
  }
}

struct DeviceMemory {
  void* data = nullptr;
  explicit DeviceMemory(std::size_t bytes) {
    da::cuda::check(cudaMalloc(&data, bytes), "cudaMalloc");
  }
  ~DeviceMemory() { cudaFree(data); }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
};

template <class T>
void run(benchmark::State& state, const da::Config& config, const da::Shape& shape) {
  if (const std::string why = why_no_device(); !why.empty()) {
    state.SkipWithError(why.c_str());
    return;
  }
  const std::int64_t q_count = shape.batch * shape.seq_len * shape.num_heads * shape.head_dim;
  const std::int64_t kv_count = shape.batch * shape.seq_len * shape.num_kv_heads * shape.head_dim;
  DeviceMemory q(q_count * sizeof(T)), k(kv_count * sizeof(T)), v(kv_count * sizeof(T)),
      out(q_count * sizeof(T)), d_out(q_count * sizeof(T)), d_q(q_count * sizeof(T)),
      d_k(kv_count * sizeof(T)), d_v(kv_count * sizeof(T)),
      lse(shape.batch * shape.num_heads * shape.seq_len * sizeof(float));
  const std::size_t workspace_bytes = da::cuda::backward_workspace_size(config, shape);
  DeviceMemory workspace(workspace_bytes);
  fill_random<<<1024, 256>>>(static_cast<T*>(q.data), q_count, 1);
  fill_random<<<1024, 256>>>(static_cast<T*>(k.data), kv_count, 2);
  fill_random<<<1024, 256>>>(static_cast<T*>(v.data), kv_count, 3);
  fill_random<<<1024, 256>>>(static_cast<T*>(d_out.data), q_count, 4);
  da::cuda::check(cudaGetLastError(), "fill_random");
  auto in = [&](const DeviceMemory& m, std::int64_t heads) {
    return da::contiguous_view<const T>(static_cast<const T*>(m.data), shape, heads);
  };
  auto grad = [&](DeviceMemory& m, std::int64_t heads) {
    return da::contiguous_view(static_cast<T*>(m.data), shape, heads);
  };
  const std::int64_t h = shape.num_heads, hkv = shape.num_kv_heads;
  da::cuda::forward<T>(config, shape, {in(q, h), in(k, hkv), in(v, hkv)},
                       {grad(out, h), static_cast<float*>(lse.data)});
  auto call = [&] {
    da::cuda::backward<T>(config, shape, {in(q, h), in(k, hkv), in(v, hkv)},
                          {in(out, h), static_cast<const float*>(lse.data)}, in(d_out, h),
                          {grad(d_q, h), grad(d_k, hkv), grad(d_v, hkv)},
                          {nullptr, workspace.data, workspace_bytes});
  };
  call();  // warm-up
  da::cuda::check(cudaDeviceSynchronize(), "warm-up");
  cudaEvent_t start, stop;
  da::cuda::check(cudaEventCreate(&start), "cudaEventCreate");
  da::cuda::check(cudaEventCreate(&stop), "cudaEventCreate");
  double total_seconds = 0.0;
  for (auto _ : state) {
    da::cuda::check(cudaEventRecord(start), "cudaEventRecord");
    call();
    da::cuda::check(cudaEventRecord(stop), "cudaEventRecord");
    da::cuda::check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0.f;
    da::cuda::check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    state.SetIterationTime(ms * 1e-3);
    total_seconds += ms * 1e-3;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  const double flops = 2.5 * da::Pattern(config, shape).useful_flops();
  const double per_call = total_seconds / static_cast<double>(state.iterations());
  state.counters["useful_TFLOP/s"] = flops / per_call * 1e-12;
  state.counters["ms"] = per_call * 1e3;
  state.counters["N"] = static_cast<double>(shape.seq_len);
  state.counters["D"] = static_cast<double>(shape.head_dim);
}

// Dense (one branch w = N), bf16: args seq_len, head_dim, causal.
void BM_BackwardDense(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = state.range(1);
  da::Config config;
  config.segment_lengths = {n};
  config.dilation_rates = {1};
  config.causal = state.range(2) != 0;
  run<Bf16>(state, config, {16384 / n, n, 2048 / d, 2048 / d, d});
}
BENCHMARK(BM_BackwardDense)
    ->ArgNames({"N", "D", "causal"})
    ->Args({4096, 128, 0})
    ->Args({4096, 128, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

// LongNet (w = 2048, 4096, 8192; r = 1, 2, 4), bf16, N = 16384, H = 16, D = 128; softmax and
// mean mixing (mean recomputes each branch's O_i and LSE_i). args: causal, mean.
void BM_BackwardLongNet(benchmark::State& state) {
  da::Config config;
  config.segment_lengths = {2048, 4096, 8192};
  config.dilation_rates = {1, 2, 4};
  config.causal = state.range(0) != 0;
  config.mixing = state.range(1) != 0 ? da::Mixing::mean : da::Mixing::softmax;
  run<Bf16>(state, config, {1, 16384, 16, 16, 128});
}
BENCHMARK(BM_BackwardLongNet)
    ->ArgNames({"causal", "mean"})
    ->Args({0, 0})
    ->Args({1, 0})
    ->Args({0, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
