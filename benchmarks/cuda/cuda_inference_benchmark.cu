// GPU benchmarks of the inference forms (cuda/inference.cuh; docs/cuda.md "Inference forms"),
// Google Benchmark with manual time from CUDA events around one cuda::forward call (which
// includes its stream-ordered table upload, allocation and free).
//
//   (a) decode step (QueryRange {kv_len - 1, 1}, split-KV path): LongNet branches
//       w = 2048, 4096, 8192, r = 1, 2, 4, H = 16, Hkv = 16 or 4, D = 128, bf16, batch 1 .. 64,
//       kv_len 8k and 64k. Decode is bound by reading K/V: reports the K/V bytes its keys occupy
//       per second (kv_GB/s; each attended key row of K and V counted once per query head).
//   (b) paged decode (Sequences + PagedKeyValues, pages shuffled), page sizes 16 and 256.
//   (c) varlen prefill (the row kernel: fp32 SIMT for every type), 8 sequences of mixed length,
//       useful TFLOP/s as in cuda_forward_benchmark.cu; and (c') the same tokens as one ordinary
//       forward call per sequence on the tensor-core kernel, for the price of the SIMT path.
//
// Without a device every case reports "no CUDA device: ..." and nothing is timed.

#include <dilated_attention/cuda.cuh>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "cuda_benchmark_support.cuh"

namespace {

namespace da = dilated_attention;
namespace bench = dilated_attention::bench;
using bench::DeviceTensor;
using bench::time_calls;
using Bf16 = __nv_bfloat16;

da::Config longnet(bool causal = true) {
  da::Config config;
  config.segment_lengths = {2048, 4096, 8192};
  config.dilation_rates = {1, 2, 4};
  config.causal = causal;
  return config;
}

// Keys that the decode row x = kv_len - 1 attends, summed over the query heads.
std::int64_t decode_keys(const da::Config& config, std::int64_t kv_len, std::int64_t heads) {
  const da::Pattern pattern(config, da::Shape{1, kv_len, heads, heads, 128});
  std::int64_t keys = 0;
  for (std::int64_t h = 0; h < heads; ++h)
    for (std::int64_t i = 0; i < pattern.num_branches(); ++i)
      keys += pattern.keys(i, h, kv_len - 1).count;
  return keys;
}

void report_decode(benchmark::State& state, double seconds, const da::Config& config,
                   std::int64_t batch, std::int64_t kv_len, std::int64_t heads, std::int64_t d) {
  const double bytes = 2.0 * static_cast<double>(decode_keys(config, kv_len, heads)) *
                       static_cast<double>(batch * d) * sizeof(Bf16);
  state.counters["us"] = seconds * 1e6;
  state.counters["kv_GB/s"] = bytes / seconds * 1e-9;
  state.counters["B"] = static_cast<double>(batch);
  state.counters["kv_len"] = static_cast<double>(kv_len);
}

// (a) args: batch, kv_len, kv_heads.
void BM_DecodeStep(benchmark::State& state) {
  if (bench::skip_without_device(state)) return;
  const std::int64_t batch = state.range(0), kv = state.range(1), hkv = state.range(2);
  const std::int64_t h = 16, d = 128;
  const da::Config config = longnet();
  const da::Shape shape{batch, kv, h, hkv, d};
  const da::Shape rows{batch, 1, h, hkv, d};
  DeviceTensor<Bf16> q(batch * h * d, 1), k(batch * kv * hkv * d, 2), v(batch * kv * hkv * d, 3),
      out(batch * h * d);
  DeviceTensor<float> lse(batch * h);
  const da::Inputs<Bf16> in{da::contiguous_view<const Bf16>(q.data, rows, h),
                            da::contiguous_view<const Bf16>(k.data, shape, hkv),
                            da::contiguous_view<const Bf16>(v.data, shape, hkv)};
  const da::Outputs<Bf16> o{da::contiguous_view(out.data, rows, h), lse.data};
  const double seconds = time_calls(state, [&] {
    da::cuda::forward<Bf16>(config, shape, da::QueryRange{kv - 1, 1}, in, o);
  });
  bench::label_with_device(state);
  report_decode(state, seconds, config, batch, kv, h, d);
}
BENCHMARK(BM_DecodeStep)
    ->ArgNames({"B", "kv_len", "Hkv"})
    ->ArgsProduct({{1, 16, 64}, {8192, 65536}, {16, 4}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

// (b) args: batch, kv_len, page_size. Pages in a shuffled order, host page table.
void BM_PagedDecodeStep(benchmark::State& state) {
  if (bench::skip_without_device(state)) return;
  const std::int64_t batch = state.range(0), kv = state.range(1), page_size = state.range(2);
  const std::int64_t h = 16, hkv = 4, d = 128;
  const da::Config config = longnet();
  const std::int64_t per_sequence = (kv + page_size - 1) / page_size,
                     num_pages = per_sequence * batch;
  DeviceTensor<Bf16> q(batch * h * d, 1), k(num_pages * page_size * hkv * d, 2),
      v(num_pages * page_size * hkv * d, 3), out(batch * h * d);
  DeviceTensor<float> lse(batch * h);
  std::vector<std::int32_t> table(static_cast<std::size_t>(num_pages));
  std::iota(table.begin(), table.end(), 0);
  std::mt19937_64 engine(7);
  std::shuffle(table.begin(), table.end(), engine);
  std::vector<std::int64_t> query_offsets(static_cast<std::size_t>(batch + 1)),
      lengths(static_cast<std::size_t>(batch), kv);
  std::iota(query_offsets.begin(), query_offsets.end(), 0);
  da::Sequences s;
  s.count = batch;
  s.query_offsets = query_offsets.data();
  s.kv_lengths = lengths.data();
  da::PagedKeyValues<Bf16> paged;
  paged.k = k.data;
  paged.v = v.data;
  paged.num_pages = num_pages;
  paged.page_size = page_size;
  paged.row_stride = hkv * d;
  paged.page_stride = page_size * hkv * d;
  paged.head_stride = d;
  paged.page_table = table.data();
  paged.page_table_stride = per_sequence;
  const da::View<const Bf16> qv{q.data, 0, h * d, d};
  const da::Outputs<Bf16> o{da::View<Bf16>{out.data, 0, h * d, d}, lse.data};
  const double seconds = time_calls(state, [&] {
    da::cuda::forward<Bf16>(config, da::HeadShape{h, hkv, d}, s, qv, paged, o);
  });
  bench::label_with_device(state);
  report_decode(state, seconds, config, batch, kv, h, d);
}
BENCHMARK(BM_PagedDecodeStep)
    ->ArgNames({"B", "kv_len", "page"})
    ->ArgsProduct({{16, 64}, {65536}, {16, 256}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

// The mixed lengths of the varlen cases: 8 sequences, 8192 .. 1000 tokens (54,176 in all).
const std::vector<std::int64_t> varlen_lengths = {8192, 16384, 1000, 4096, 12000, 2500, 6000, 4004};

double varlen_flops(const da::Config& config, std::int64_t h, std::int64_t d) {
  double flops = 0.0;
  for (const std::int64_t n : varlen_lengths)
    flops += da::Pattern(config, {1, n, h, h, d}).useful_flops();
  return flops;
}

// (c) args: causal. Varlen prefill of varlen_lengths, H = Hkv = 16, D = 128, bf16.
void BM_VarlenPrefill(benchmark::State& state) {
  if (bench::skip_without_device(state)) return;
  const std::int64_t h = 16, d = 128;
  const da::Config config = longnet(state.range(0) != 0);
  std::vector<std::int64_t> offsets = {0};
  for (const std::int64_t n : varlen_lengths) offsets.push_back(offsets.back() + n);
  const std::int64_t total = offsets.back();
  DeviceTensor<Bf16> q(total * h * d, 1), k(total * h * d, 2), v(total * h * d, 3),
      out(total * h * d);
  DeviceTensor<float> lse(total * h);
  da::Sequences s;
  s.count = static_cast<std::int64_t>(varlen_lengths.size());
  s.query_offsets = offsets.data();
  s.kv_offsets = offsets.data();
  const da::Inputs<Bf16> in{da::View<const Bf16>{q.data, 0, h * d, d},
                            da::View<const Bf16>{k.data, 0, h * d, d},
                            da::View<const Bf16>{v.data, 0, h * d, d}};
  const da::Outputs<Bf16> o{da::View<Bf16>{out.data, 0, h * d, d}, lse.data};
  const double seconds = time_calls(state, [&] {
    da::cuda::forward<Bf16>(config, da::HeadShape{h, h, d}, s, in, o);
  });
  bench::label_with_device(state);
  state.counters["ms"] = seconds * 1e3;
  state.counters["useful_TFLOP/s"] = varlen_flops(config, h, d) / seconds * 1e-12;
  state.counters["tokens"] = static_cast<double>(total);
}
BENCHMARK(BM_VarlenPrefill)
    ->ArgNames({"causal"})
    ->Arg(0)
    ->Arg(1)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

// (c') the same tokens, one ordinary (tensor-core) forward per sequence.
void BM_VarlenAsSeparateForwards(benchmark::State& state) {
  if (bench::skip_without_device(state)) return;
  const std::int64_t h = 16, d = 128;
  const da::Config config = longnet(state.range(0) != 0);
  std::int64_t total = 0;
  for (const std::int64_t n : varlen_lengths) total += n;
  DeviceTensor<Bf16> q(total * h * d, 1), k(total * h * d, 2), v(total * h * d, 3),
      out(total * h * d);
  DeviceTensor<float> lse(total * h);
  const double seconds = time_calls(state, [&] {
    std::int64_t at = 0;
    for (const std::int64_t n : varlen_lengths) {
      const da::Shape shape{1, n, h, h, d};
      const std::int64_t offset = at * h * d;
      da::cuda::forward<Bf16>(
          config, shape,
          {da::contiguous_view<const Bf16>(q.data + offset, shape, h),
           da::contiguous_view<const Bf16>(k.data + offset, shape, h),
           da::contiguous_view<const Bf16>(v.data + offset, shape, h)},
          {da::contiguous_view(out.data + offset, shape, h), lse.data + at * h});
      at += n;
    }
  });
  bench::label_with_device(state);
  state.counters["ms"] = seconds * 1e3;
  state.counters["useful_TFLOP/s"] = varlen_flops(config, h, d) / seconds * 1e-12;
}
BENCHMARK(BM_VarlenAsSeparateForwards)
    ->ArgNames({"causal"})
    ->Arg(0)
    ->Arg(1)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
