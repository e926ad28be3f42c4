// GPU forward benchmarks, Google Benchmark with manual time from CUDA events.
// Every case reports useful TFLOP/s (Pattern::useful_flops(): 4 * head_dim per attended
// query-key pair, a pair that two branches attend counted twice) and milliseconds per call.
//
//   (a) dense-equivalent: one branch w = N, r = 1, bf16, D = 64 and 128, B * N = 16384 tokens,
//       H * D = 2048, N = 2k .. 16k, causal and not -- compare with torch SDPA (flash backend) on
//       the same GPU: benchmarks/peers/cuda_sdpa_and_peer.py --sdpa.
//   (b) LongNet: w = 2048, 4096, 8192; r = 1, 2, 4; N = 65536, H = 16, D = 128, bf16, modular
//       softmax (the paper's mixing), causal and not. Target: >= 250 useful TFLOP/s on H100.
//   (c) the dilated-attention-pytorch preset (partitioned + mean) at the sizes the peer script
//       runs, for its timing table.
//
// Without a device every case reports an error "no CUDA device: ..." and nothing is timed.
// Inputs are random (never zeros: they hide unwritten outputs and can run faster), filled on
// the device; the output is not checked here -- the tests do that.

#include <dilated_attention/cuda.cuh>

#include <benchmark/benchmark.h>

#include <cstdint>
#include <string>
#include <vector>

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

// Uniform on [-sqrt 3, sqrt 3) from a hash of (seed, index): unit variance, reproducible.
template <class T>
__global__ void fill_random(T* data, std::int64_t count, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + static_cast<std::uint64_t>(i);
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    x ^= x >> 31;
    const float unit = static_cast<float>(x >> 40) * (1.0f / 16777216.0f);
    data[i] = T((unit * 2.0f - 1.0f) * 1.7320508f);
  }
}

template <class T>
struct DeviceTensor {
  T* data = nullptr;
  std::int64_t count = 0;
  explicit DeviceTensor(std::int64_t n) : count(n) {
    da::cuda::check(cudaMalloc(&data, static_cast<std::size_t>(n) * sizeof(T)), "cudaMalloc");
  }
  ~DeviceTensor() { cudaFree(data); }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;
};

// Times cuda::forward<T> on one config and shape.
template <class T>
void run(benchmark::State& state, const da::Config& config, const da::Shape& shape) {
  if (const std::string why = why_no_device(); !why.empty()) {
    state.SkipWithError(why.c_str());
    return;
  }
  const std::int64_t q_count = shape.batch * shape.seq_len * shape.num_heads * shape.head_dim;
  const std::int64_t kv_count = shape.batch * shape.seq_len * shape.num_kv_heads * shape.head_dim;
  DeviceTensor<T> q(q_count), k(kv_count), v(kv_count), out(q_count);
  DeviceTensor<float> lse(shape.batch * shape.num_heads * shape.seq_len);
  fill_random<<<1024, 256>>>(q.data, q_count, 1);
  fill_random<<<1024, 256>>>(k.data, kv_count, 2);
  fill_random<<<1024, 256>>>(v.data, kv_count, 3);
  da::cuda::check(cudaGetLastError(), "fill_random");

  const auto qv = da::contiguous_view<const T>(q.data, shape, shape.num_heads);
  const auto kv = da::contiguous_view<const T>(k.data, shape, shape.num_kv_heads);
  const auto vv = da::contiguous_view<const T>(v.data, shape, shape.num_kv_heads);
  const auto ov = da::contiguous_view(out.data, shape, shape.num_heads);
  cudaEvent_t start, stop;
  da::cuda::check(cudaEventCreate(&start), "cudaEventCreate");
  da::cuda::check(cudaEventCreate(&stop), "cudaEventCreate");
  // Warm-up: module load and the shared-memory attribute stay out of the timings.
  da::cuda::forward<T>(config, shape, {qv, kv, vv}, {ov, lse.data});
  da::cuda::check(cudaDeviceSynchronize(), "warm-up");

  double total_seconds = 0.0;
  for (auto _ : state) {
    da::cuda::check(cudaEventRecord(start), "cudaEventRecord");
    da::cuda::forward<T>(config, shape, {qv, kv, vv}, {ov, lse.data});
    da::cuda::check(cudaEventRecord(stop), "cudaEventRecord");
    da::cuda::check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0.f;
    da::cuda::check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    state.SetIterationTime(ms * 1e-3);
    total_seconds += ms * 1e-3;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);

  const double flops = da::Pattern(config, shape).useful_flops();
  const double per_call = total_seconds / static_cast<double>(state.iterations());
  state.counters["useful_TFLOP/s"] = flops / per_call * 1e-12;
  state.counters["ms"] = per_call * 1e3;
  state.counters["N"] = static_cast<double>(shape.seq_len);
  state.counters["D"] = static_cast<double>(shape.head_dim);
  cudaDeviceProp props{};
  int device = 0;
  if (cudaGetDevice(&device) == cudaSuccess &&
      cudaGetDeviceProperties(&props, device) == cudaSuccess)
    state.SetLabel(props.name);
}

da::Config one_branch(std::int64_t w, std::int64_t r, bool causal) {
  da::Config config;
  config.segment_lengths = {w};
  config.dilation_rates = {r};
  config.causal = causal;
  return config;
}

// (a) args: seq_len, head_dim, causal.
void BM_DenseEquivalent(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = state.range(1);
  const bool causal = state.range(2) != 0;
  const da::Shape shape{16384 / n, n, 2048 / d, 2048 / d, d};
  run<Bf16>(state, one_branch(n, 1, causal), shape);
}
BENCHMARK(BM_DenseEquivalent)
    ->ArgNames({"N", "D", "causal"})
    ->ArgsProduct({{2048, 4096, 8192, 16384}, {64, 128}, {0, 1}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

// (b) args: causal.
void BM_LongNet(benchmark::State& state) {
  da::Config config;
  config.segment_lengths = {2048, 4096, 8192};
  config.dilation_rates = {1, 2, 4};
  config.causal = state.range(0) != 0;
  run<Bf16>(state, config, {1, 65536, 16, 16, 128});
}
BENCHMARK(BM_LongNet)
    ->ArgNames({"causal"})
    ->Arg(0)
    ->Arg(1)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

// (b') each LongNet branch alone, to see where the time goes (alone, a branch of rate r runs
// with windows of stride R = r: full query tiles; see docs/cuda.md).
void BM_LongNetBranch(benchmark::State& state) {
  run<Bf16>(state, one_branch(state.range(0), state.range(1), false), {1, 65536, 16, 16, 128});
}
BENCHMARK(BM_LongNetBranch)
    ->ArgNames({"w", "r"})
    ->Args({2048, 1})
    ->Args({4096, 2})
    ->Args({8192, 4})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

// (c) the dilated-attention-pytorch preset: partitioned offsets, mean mixing. args: seq_len.
void BM_PartitionedMean(benchmark::State& state) {
  da::Config config;
  config.segment_lengths = {2048, 4096, 8192};
  config.dilation_rates = {1, 2, 4};
  config.offsets = da::OffsetRule::partitioned;
  config.mixing = da::Mixing::mean;
  run<Bf16>(state, config, {1, state.range(0), 12, 12, 64});
}
BENCHMARK(BM_PartitionedMean)
    ->ArgNames({"N"})
    ->Arg(8192)
    ->Arg(32768)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
