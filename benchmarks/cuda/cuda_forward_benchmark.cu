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
#include <vector>

#include "cuda_benchmark_support.cuh"

namespace {

namespace da = dilated_attention;
namespace bench = dilated_attention::bench;
using Bf16 = __nv_bfloat16;

// Times cuda::forward<T> on one config and shape.
template <class T>
void run(benchmark::State& state, const da::Config& config, const da::Shape& shape) {
  if (bench::skip_without_device(state)) return;
  const std::int64_t q_count = shape.batch * shape.seq_len * shape.num_heads * shape.head_dim;
  const std::int64_t kv_count = shape.batch * shape.seq_len * shape.num_kv_heads * shape.head_dim;
  bench::DeviceTensor<T> q(q_count, 1), k(kv_count, 2), v(kv_count, 3), out(q_count);
  bench::DeviceTensor<float> lse(shape.batch * shape.num_heads * shape.seq_len);

  const auto qv = da::contiguous_view<const T>(q.data, shape, shape.num_heads);
  const auto kv = da::contiguous_view<const T>(k.data, shape, shape.num_kv_heads);
  const auto vv = da::contiguous_view<const T>(v.data, shape, shape.num_kv_heads);
  const auto ov = da::contiguous_view(out.data, shape, shape.num_heads);
  const double per_call = bench::time_calls(state, [&] {
    da::cuda::forward<T>(config, shape, {qv, kv, vv}, {ov, lse.data});
  });

  const double flops = da::Pattern(config, shape).useful_flops();
  state.counters["useful_TFLOP/s"] = flops / per_call * 1e-12;
  state.counters["ms"] = per_call * 1e3;
  state.counters["N"] = static_cast<double>(shape.seq_len);
  state.counters["D"] = static_cast<double>(shape.head_dim);
  bench::label_with_device(state);
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
