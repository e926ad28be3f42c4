// The CPU backward benchmark of the main job (benchmarks/run_comparison.sh), forward and backward
// timed in one binary on the same inputs so that their ratio comes from one run:
//
//   forward/D:d/N:n     dilated_attention::forward (out and lse), as in cpu_forward_benchmark
//   backward/D:d/N:n    dilated_attention::backward given that forward's out and lse
//   fma_peak/<isa>/threads:t   the measured FMA peak (cpu_benchmark_support.hpp), the yardstick
//                              benchmarks/plot_results.py gives each useful GFLOP/s a share of
//
// Counters: useful_flops (forward: Pattern::useful_flops(); backward: 2.5 times that, the
// FlashAttention-2 convention of five products per pair against the forward's two), the
// tensors' bytes, the heap the timed calls allocated beyond them (for backward: beyond
// q, k, v, out, lse, d_out and the three gradients), and for backward the largest error of the
// gradients on sampled rows against docs/semantics.md "The gradient" evaluated in double (relative to the
// largest sampled entry of each gradient). A wrong gradient fails the benchmark: the run is
// marked with an error and the program exits with status 4.
//
// Flags of our own (after Google Benchmark's --benchmark_* flags); --help lists them.

#include "cpu_benchmark_support.hpp"

#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace dilated_attention;
namespace bench = dilated_attention::bench;

struct Options : bench::AttentionOptions {
  int repetitions = 1;
  int sample_rows = 8;  // query rows per (batch, head) whose dQ is checked (plus boundaries)
  int key_rows = 4;     // key rows per (batch, kv head) whose dK, dV are checked (plus boundaries)
  double tolerance = 1e-3;  // largest relative gradient error accepted
  std::uint64_t seed = 20261122;
};

Options options;
bool failed = false;

const char* const usage_text = R"(cpu_backward_benchmark [--benchmark_* flags] [options]

Options (defaults are the LongNet config of docs/performance.md):
  --seq_lens=16384,65536        sequence lengths N
)" DA_BENCH_ATTENTION_USAGE R"(  --repetitions=1               repetitions (median reported)
  --sample_rows=8               hashed query rows per (batch, head) whose dQ is checked, plus the
                                ends and segment boundaries; 0 skips the gradient check
  --key_rows=4                  the same for the dK, dV rows of each (batch, kv head)
  --tolerance=1e-3              largest relative gradient error accepted (else exit status 4)
  --seed=20261122               input seed
)";

// Our own --key=value flags, beyond those of bench::AttentionOptions; false when `key` is not ours.
bool parse_option(const std::string& key, const std::string& value) {
  if (key == "causal")
    options.causal = value == "true" || value == "1";
  else if (key == "repetitions")
    options.repetitions = std::stoi(value);
  else if (key == "sample_rows")
    options.sample_rows = std::stoi(value);
  else if (key == "key_rows")
    options.key_rows = std::stoi(value);
  else if (key == "tolerance")
    options.tolerance = std::stod(value);
  else if (key == "seed")
    options.seed = std::stoull(value);
  else
    return false;
  return true;
}

int kernel_threads() {
  if (const char* text = std::getenv("DILATED_ATTENTION_NUM_THREADS"); text != nullptr && *text)
    if (const long value = std::strtol(text, nullptr, 10); value > 0)
      return static_cast<int>(value);
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

Config main_config() { return options.config(); }

// Inputs, the forward's result and d_out of one (N, D), made once for both benchmarks.
struct Problem {
  Shape shape;
  std::vector<float> q, k, v, out, d_out, lse;
  View<const float> view(const std::vector<float>& t, std::int64_t heads) const {
    return contiguous_view<const float>(t.data(), shape, heads);
  }
};

const Problem& problem_for(std::int64_t n, std::int64_t dim) {
  static std::unique_ptr<Problem> cached;
  if (cached && cached->shape.seq_len == n && cached->shape.head_dim == dim) return *cached;
  cached.reset();
  auto p = std::make_unique<Problem>();
  const std::int64_t kv_heads = options.resolved_kv_heads();
  p->shape = Shape{options.batch, n, options.heads, kv_heads, dim};
  const auto q_size = static_cast<std::size_t>(options.batch * n * options.heads * dim);
  const auto kv_size = static_cast<std::size_t>(options.batch * n * kv_heads * dim);
  p->q.resize(q_size);
  p->k.resize(kv_size);
  p->v.resize(kv_size);
  p->out.resize(q_size);
  p->d_out.resize(q_size);
  p->lse.resize(static_cast<std::size_t>(options.batch * options.heads * n));
  bench::fill_uniform(p->q, options.seed * 3 + 0);
  bench::fill_uniform(p->k, options.seed * 3 + 1);
  bench::fill_uniform(p->v, options.seed * 3 + 2);
  bench::fill_uniform(p->d_out, options.seed * 3 + 3);
  forward<float>(main_config(), p->shape,
                 {p->view(p->q, options.heads), p->view(p->k, kv_heads), p->view(p->v, kv_heads)},
                 {contiguous_view<float>(p->out.data(), p->shape, options.heads), p->lse.data()});
  cached = std::move(p);
  return *cached;
}

// ---------------------------------------------------------------------------------------------
// docs/semantics.md "The gradient" for sampled rows, in double.

struct RowStats {
  double lse, delta;  // the LSE a branch (mean) or the union (softmax) is normalised with; D
};

const float* row_of(const std::vector<float>& t, const Shape& s, std::int64_t heads, std::int64_t b,
                    std::int64_t x, std::int64_t h) {
  return t.data() + ((b * s.seq_len + x) * heads + h) * s.head_dim;
}

double dot(const float* a, const float* b, std::int64_t n) {
  double sum = 0.0;
  for (std::int64_t d = 0; d < n; ++d) sum += static_cast<double>(a[d]) * static_cast<double>(b[d]);
  return sum;
}

// Branch i's own statistics of query x (mean mixing): LSE_i(x) and D_i = (dO / G)·O_i, in double.
RowStats branch_stats(const Pattern& pattern, const Problem& p, std::int64_t b, std::int64_t h,
                      std::int64_t i, std::int64_t x) {
  const Shape& s = p.shape;
  const double scale = resolved_scale(pattern.config(), s);
  const std::int64_t kvh = pattern.kv_head(h);
  const Progression keys = pattern.keys(i, h, x);
  const float* qx = row_of(p.q, s, s.num_heads, b, x, h);
  const float* gx = row_of(p.d_out, s, s.num_heads, b, x, h);
  std::vector<double> scores(static_cast<std::size_t>(keys.count));
  double max = -INFINITY;
  for (std::int64_t j = 0; j < keys.count; ++j) {
    scores[static_cast<std::size_t>(j)] =
        scale * dot(qx, row_of(p.k, s, s.num_kv_heads, b, keys.at(j), kvh), s.head_dim);
    max = std::max(max, scores[static_cast<std::size_t>(j)]);
  }
  double sum = 0.0, weighted = 0.0;
  for (std::int64_t j = 0; j < keys.count; ++j) {
    const double e = std::exp(scores[static_cast<std::size_t>(j)] - max);
    sum += e;
    weighted += e * dot(gx, row_of(p.v, s, s.num_kv_heads, b, keys.at(j), kvh), s.head_dim);
  }
  const double g = static_cast<double>(pattern.num_branches());
  return {max + std::log(sum), weighted / sum / g};
}

// The union's statistics of query x (softmax mixing) from the forward's out and lse: the
// backward is defined given them (docs/semantics.md "Inputs and bad input of the backward"), and they are checked against docs/semantics.md "The forward" by
// cpu_forward_benchmark.
RowStats union_stats(const Problem& p, std::int64_t b, std::int64_t h, std::int64_t x) {
  const Shape& s = p.shape;
  return {
      static_cast<double>(p.lse[static_cast<std::size_t>((b * s.num_heads + h) * s.seq_len + x)]),
      dot(row_of(p.d_out, s, s.num_heads, b, x, h), row_of(p.out, s, s.num_heads, b, x, h),
          s.head_dim)};
}

RowStats stats_of(const Pattern& pattern, const Problem& p, std::int64_t b, std::int64_t h,
                  std::int64_t i, std::int64_t x) {
  return pattern.config().mixing == Mixing::mean ? branch_stats(pattern, p, b, h, i, x)
                                                 : union_stats(p, b, h, x);
}

// Adds the terms of the pair (x, y) of branch i to the sampled gradients.
struct PairTerms {
  double p, ds;  // P and dS / scale
};
PairTerms pair_terms(const Pattern& pattern, const Problem& p, std::int64_t b, std::int64_t h,
                     std::int64_t x, std::int64_t y, const RowStats& stats) {
  const Shape& s = p.shape;
  const double scale = resolved_scale(pattern.config(), s);
  const double weight = pattern.config().mixing == Mixing::mean
                            ? 1.0 / static_cast<double>(pattern.num_branches())
                            : 1.0;
  const std::int64_t kvh = pattern.kv_head(h);
  const double score = scale * dot(row_of(p.q, s, s.num_heads, b, x, h),
                                   row_of(p.k, s, s.num_kv_heads, b, y, kvh), s.head_dim);
  const double prob = std::exp(score - stats.lse);
  const double dp = weight * dot(row_of(p.d_out, s, s.num_heads, b, x, h),
                                 row_of(p.v, s, s.num_kv_heads, b, y, kvh), s.head_dim);
  return {prob, prob * (dp - stats.delta)};
}

struct GradientError {
  double dq = 0.0, dk = 0.0, dv = 0.0;  // max |got - want| / max |want| over the sampled rows
};

GradientError gradient_error(const Problem& p, const std::vector<float>& dq,
                             const std::vector<float>& dk, const std::vector<float>& dv) {
  const Config config = main_config();
  const Pattern pattern(config, p.shape);
  const Shape& s = p.shape;
  const std::int64_t dim = s.head_dim, group = s.num_heads / s.num_kv_heads;
  const double scale = resolved_scale(config, s);
  double worst[3] = {0, 0, 0}, largest[3] = {0, 0, 0};
  auto compare = [&](int which, const float* got, const std::vector<double>& want) {
    for (std::int64_t d = 0; d < dim; ++d) {
      worst[which] = std::max(
          worst[which], std::abs(static_cast<double>(got[d]) - want[static_cast<std::size_t>(d)]));
      largest[which] = std::max(largest[which], std::abs(want[static_cast<std::size_t>(d)]));
    }
  };
  std::vector<double> gq(static_cast<std::size_t>(dim)), gk(static_cast<std::size_t>(dim)),
      gv(static_cast<std::size_t>(dim));
  for (std::int64_t b = 0; b < s.batch; ++b) {
    for (std::int64_t h = 0; h < s.num_heads; ++h)
      for (std::int64_t x :
           bench::sample_rows(config, s.seq_len, options.sample_rows,
                              options.seed + static_cast<std::uint64_t>(b * s.num_heads + h))) {
        std::fill(gq.begin(), gq.end(), 0.0);
        for (std::int64_t i = 0; i < pattern.num_branches(); ++i) {
          const Progression keys = pattern.keys(i, h, x);
          if (keys.empty()) continue;
          const RowStats stats = stats_of(pattern, p, b, h, i, x);
          for (std::int64_t j = 0; j < keys.count; ++j) {
            const PairTerms t = pair_terms(pattern, p, b, h, x, keys.at(j), stats);
            const float* ky = row_of(p.k, s, s.num_kv_heads, b, keys.at(j), pattern.kv_head(h));
            for (std::int64_t d = 0; d < dim; ++d)
              gq[static_cast<std::size_t>(d)] += scale * t.ds * ky[d];
          }
        }
        compare(0, row_of(dq, s, s.num_heads, b, x, h), gq);
      }
    for (std::int64_t g = 0; g < s.num_kv_heads; ++g)
      for (std::int64_t y : bench::sample_rows(
               config, s.seq_len, options.key_rows,
               options.seed + 7777 + static_cast<std::uint64_t>(b * s.num_kv_heads + g))) {
        std::fill(gk.begin(), gk.end(), 0.0);
        std::fill(gv.begin(), gv.end(), 0.0);
        for (std::int64_t h = g * group; h < (g + 1) * group; ++h)
          for (std::int64_t i = 0; i < pattern.num_branches(); ++i) {
            const std::int64_t offset = pattern.offset(i, h);
            const BranchGeometry geometry = pattern.branch(i);
            if (offset < 0 || !geometry.selected(y, offset)) continue;
            const Progression block = geometry.rows(geometry.segment_of(y), offset);
            const double weight = config.mixing == Mixing::mean
                                      ? 1.0 / static_cast<double>(pattern.num_branches())
                                      : 1.0;
            for (std::int64_t j = 0; j < block.count; ++j) {
              const std::int64_t x = block.at(j);
              if (config.causal && x < y) continue;
              const PairTerms t =
                  pair_terms(pattern, p, b, h, x, y, stats_of(pattern, p, b, h, i, x));
              const float* qx = row_of(p.q, s, s.num_heads, b, x, h);
              const float* gx = row_of(p.d_out, s, s.num_heads, b, x, h);
              for (std::int64_t d = 0; d < dim; ++d) {
                gk[static_cast<std::size_t>(d)] += scale * t.ds * qx[d];
                gv[static_cast<std::size_t>(d)] += weight * t.p * gx[d];
              }
            }
          }
        compare(1, row_of(dk, s, s.num_kv_heads, b, y, g), gk);
        compare(2, row_of(dv, s, s.num_kv_heads, b, y, g), gv);
      }
  }
  auto relative = [&](int i) { return largest[i] > 0 ? worst[i] / largest[i] : worst[i]; };
  return {relative(0), relative(1), relative(2)};
}

// ---------------------------------------------------------------------------------------------

void common_counters(benchmark::State& state, const Problem& p, double flops, double tensor_bytes,
                     std::int64_t heap_peak, std::int64_t rss_at_reset) {
  state.counters["useful_GFLOPs"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["useful_flops"] = flops;
  state.counters["worker_threads"] = kernel_threads();
  state.counters["N"] = static_cast<double>(p.shape.seq_len);
  state.counters["D"] = static_cast<double>(p.shape.head_dim);
  bench::memory_counters(state, tensor_bytes, heap_peak, rss_at_reset,
                         bench::resident_peak_bytes());
}

void BM_Forward(benchmark::State& state, std::int64_t n, std::int64_t dim) {
  const Problem& p = problem_for(n, dim);
  const Config config = main_config();
  const Shape& s = p.shape;
  std::vector<float> out(p.out.size()), lse(p.lse.size());
  const std::int64_t rss_at_reset = bench::reset_resident_peak();
  bench::heap::reset_peak();
  for (auto _ : state) {
    forward<float>(
        config, s,
        {p.view(p.q, s.num_heads), p.view(p.k, s.num_kv_heads), p.view(p.v, s.num_kv_heads)},
        {contiguous_view<float>(out.data(), s, s.num_heads), lse.data()});
    benchmark::ClobberMemory();
  }
  const std::int64_t heap_peak = bench::heap::peak_since_reset();
  const double bytes = static_cast<double>(
      (p.q.size() + p.k.size() + p.v.size() + out.size() + lse.size()) * sizeof(float));
  common_counters(state, p, Pattern(config, s).useful_flops(), bytes, heap_peak, rss_at_reset);
}

void BM_Backward(benchmark::State& state, std::int64_t n, std::int64_t dim) {
  const Problem& p = problem_for(n, dim);
  const Config config = main_config();
  const Shape& s = p.shape;
  std::vector<float> dq(p.q.size()), dk(p.k.size()), dv(p.v.size());
  const std::int64_t rss_at_reset = bench::reset_resident_peak();
  bench::heap::reset_peak();
  for (auto _ : state) {
    backward<float>(
        config, s,
        {p.view(p.q, s.num_heads), p.view(p.k, s.num_kv_heads), p.view(p.v, s.num_kv_heads)},
        {p.view(p.out, s.num_heads), p.lse.data()}, p.view(p.d_out, s.num_heads),
        {contiguous_view<float>(dq.data(), s, s.num_heads),
         contiguous_view<float>(dk.data(), s, s.num_kv_heads),
         contiguous_view<float>(dv.data(), s, s.num_kv_heads)});
    benchmark::ClobberMemory();
  }
  const std::int64_t heap_peak = bench::heap::peak_since_reset();
  const double bytes =
      static_cast<double>((p.q.size() + p.k.size() + p.v.size() + p.out.size() + p.lse.size() +
                           p.d_out.size() + dq.size() + dk.size() + dv.size()) *
                          sizeof(float));
  common_counters(state, p, 2.5 * Pattern(config, s).useful_flops(), bytes, heap_peak,
                  rss_at_reset);
  if (options.sample_rows > 0) {
    const GradientError error = gradient_error(p, dq, dk, dv);
    state.counters["max_rel_err_dq"] = error.dq;
    state.counters["max_rel_err_dk"] = error.dk;
    state.counters["max_rel_err_dv"] = error.dv;
    const double worst = std::max({error.dq, error.dk, error.dv});
    if (!(worst <= options.tolerance)) {
      failed = true;
      state.SkipWithError(
          "gradient differs from docs/semantics.md \"The gradient\" on sampled rows");
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (bench::wants_help(argc, argv)) {
    std::fputs(usage_text, stdout);
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  if (const int status =
          bench::parse_command_line(argc, argv, "cpu_backward_benchmark", parse_option, options))
    return status;
  std::string kernel_isa;
  try {
    kernel_isa = bench::select_isa(options.isa);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "cpu_backward_benchmark: %s\n", error.what());
    return 2;
  }
  benchmark::AddCustomContext("implementation", "dilated_attention::forward / backward");
  benchmark::AddCustomContext("kernel_isa", kernel_isa);
  benchmark::AddCustomContext("best_isa", to_string(dilated_attention::cpu::best_isa()));
  benchmark::AddCustomContext("config", options.describe());
  benchmark::AddCustomContext("kernel_threads", std::to_string(kernel_threads()));
  benchmark::AddCustomContext("heap_counter",
                              bench::heap::available() ? "malloc interposition" : "unavailable");
#if defined(__VERSION__)
  benchmark::AddCustomContext("compiler", __VERSION__);
#endif
  if (options.fma_peak) bench::register_fma_peaks(kernel_threads(), options.repetitions);
  for (std::int64_t dim : options.head_dims)
    for (std::int64_t n : options.seq_lens) {
      const std::string suffix = "/D:" + std::to_string(dim) + "/N:" + std::to_string(n);
      benchmark::RegisterBenchmark(("forward" + suffix).c_str(), BM_Forward, n, dim)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime()
          ->MeasureProcessCPUTime()
          ->Repetitions(options.repetitions)
          ->Iterations(1);
      benchmark::RegisterBenchmark(("backward" + suffix).c_str(), BM_Backward, n, dim)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime()
          ->MeasureProcessCPUTime()
          ->Repetitions(options.repetitions)
          ->Iterations(1);
    }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (failed) {
    std::fprintf(stderr, "cpu_backward_benchmark: a gradient check failed (see the error above)\n");
    return 4;
  }
  return 0;
}
