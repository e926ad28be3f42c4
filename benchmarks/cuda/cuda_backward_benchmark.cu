// GPU backward benchmarks (cuda::backward), Google Benchmark with manual time from CUDA events.
// Reports useful TFLOP/s of the backward by the usual convention, 2.5x the forward's useful FLOPs
// (Pattern::useful_flops(): 4 * head_dim per attended pair; backward: dV, dP, dS.K, dS^T.Q and the
// recomputed S, 10 * head_dim per pair) and milliseconds per call. Compare with PyTorch SDPA's
// backward (benchmarks/peers/cuda_sdpa_and_peer.py --sdpa-backward) on the dense shape.
//
// Without a device every case reports "no CUDA device: ..." and nothing is timed.

#include <dilated_attention/cuda.cuh>

#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>

#include "cuda_benchmark_support.cuh"

namespace {

namespace da = dilated_attention;
namespace bench = dilated_attention::bench;
using Bf16 = __nv_bfloat16;

template <class T>
void run(benchmark::State& state, const da::Config& config, const da::Shape& shape) {
  if (bench::skip_without_device(state)) return;
  const std::int64_t q_count = shape.batch * shape.seq_len * shape.num_heads * shape.head_dim;
  const std::int64_t kv_count = shape.batch * shape.seq_len * shape.num_kv_heads * shape.head_dim;
  bench::DeviceTensor<T> q(q_count, 1), k(kv_count, 2), v(kv_count, 3), out(q_count),
      d_out(q_count, 4), d_q(q_count), d_k(kv_count), d_v(kv_count);
  bench::DeviceTensor<float> lse(shape.batch * shape.num_heads * shape.seq_len);
  const std::size_t workspace_bytes = da::cuda::backward_workspace_size(config, shape);
  bench::DeviceTensor<unsigned char> workspace(static_cast<std::int64_t>(workspace_bytes));
  auto in = [&](const bench::DeviceTensor<T>& m, std::int64_t heads) {
    return da::contiguous_view<const T>(m.data, shape, heads);
  };
  auto grad = [&](bench::DeviceTensor<T>& m, std::int64_t heads) {
    return da::contiguous_view(m.data, shape, heads);
  };
  const std::int64_t h = shape.num_heads, hkv = shape.num_kv_heads;
  da::cuda::forward<T>(config, shape, {in(q, h), in(k, hkv), in(v, hkv)}, {grad(out, h), lse.data});
  const double per_call = bench::time_calls(state, [&] {
    da::cuda::backward<T>(config, shape, {in(q, h), in(k, hkv), in(v, hkv)}, {in(out, h), lse.data},
                          in(d_out, h), {grad(d_q, h), grad(d_k, hkv), grad(d_v, hkv)},
                          {nullptr, workspace.data, workspace_bytes});
  });
  const double flops = 2.5 * da::Pattern(config, shape).useful_flops();
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
