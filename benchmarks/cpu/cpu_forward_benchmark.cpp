// The CPU forward benchmarks behind the README's main job (benchmarks/run_comparison.sh):
//
//   fma_peak/<isa>/threads:t   an FMA loop (12 independent accumulators of the widest vectors
//                              of <isa>) on t threads: the measured peak, per core at t = 1.
//   sgemm/...                  Eigen SGEMM of a large square product, split over the same number
//                              of threads the kernel uses: the machine's achievable FLOP rate.
//   sgemm_openblas/...         the same product by OpenBLAS (cblas_sgemm, one OpenBLAS thread per
//                              worker): a second, stronger yardstick. Benchmark-only dependency.
//   sgemm_attention_shaped/... the two Eigen products of one attention block (Q K^T, then P V) at
//                              the kernel's block size: what plain matrix products reach at
//                              these thin shapes.
//   dense/D:d/N:n              the same kernel with one branch w = N, r = 1 (dense attention).
//   dilated/D:d/N:n            the kernel on the configured branches.
//   dense_<storage>/..., dilated_<storage>/...
//                              the same with --storage=bfloat16 or half: q, k, v, out in that
//                              storage (the kernel widens to float; its LSE is float).
//
// The kernel runs the instruction set --isa names (default: the best this CPU runs; the JSON
// context says which). A run whose sampled-row error against fp64 exceeds its budget (1e-5 for
// float storage) is marked as an error and the binary exits with status 1, so no broken kernel
// can publish a speed.
//
// Each attention benchmark reports counters: useful GFLOP/s (exact count from
// Pattern::useful_flops(): 4 * head_dim per attended pair, causal halves), the tensors' bytes,
// the peak heap above them during the timed calls, the resident high-water delta, and the max
// error against docs/semantics.md "The forward" on sampled rows. Ratios between benchmarks (to SGEMM, to dense, time(4N)
// / time(N)) are taken from one run's JSON by benchmarks/plot_results.py.
//
// Flags of our own (after Google Benchmark's --benchmark_* flags); --help lists them.

#include "cpu_benchmark_support.hpp"

#include <benchmark/benchmark.h>

#include <Eigen/Core>

#if defined(DA_BENCH_OPENBLAS)
#include <cblas.h>
extern "C" void openblas_set_num_threads(int);
extern "C" char* openblas_get_corename(void);
#endif

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

using namespace dilated_attention;
namespace bench = dilated_attention::bench;

struct Options : bench::AttentionOptions {
  std::int64_t dense_max_seq_len = 16384;
  std::int64_t sgemm_size = 2048;
  int sgemm_threads = 0;  // 0: hardware concurrency
  int repetitions = 1;
  int dense_repetitions = 1;
  std::int64_t repeat_max_seq_len = 65536;  // dilated runs above this N run once
  int sample_rows = 16;
  bool dilated = true;
  double max_error = -1.0;  // < 0: the storage type's own budget (max_error_for)
  std::string storage = "float";
  std::uint64_t seed = 20261122;
};

bool error_budget_exceeded = false;

Options options;

const char* const usage_text =
    R"(cpu_forward_benchmark [--benchmark_* flags] [options]

Options (defaults are the LongNet config of docs/performance.md):
  --seq_lens=16384,65536        sequence lengths N of the attention benchmarks
)" DA_BENCH_ATTENTION_USAGE
    R"(  --dense_max_seq_len=16384     dense attention (w = N, r = 1) only for N up to this (it is O(N^2));
                                0 skips dense
  --dilated=true                false skips the dilated benchmarks
  --sgemm_size=2048             M = N = K of the reference SGEMM; 0 skips the SGEMMs
  --sgemm_threads=0             threads for the SGEMMs (0: the kernel's default, i.e.
                                DILATED_ATTENTION_NUM_THREADS if set, else all hardware threads)
  --repetitions=1               repetitions of the SGEMM and dilated benchmarks (median reported)
  --repeat_max_seq_len=65536    dilated benchmarks at larger N run once, whatever --repetitions
  --dense_repetitions=1         repetitions of the dense benchmarks
  --sample_rows=16              hashed rows per (batch, head) checked against docs/semantics.md "The forward" (plus the
                                ends and segment boundaries); 0 skips the check
  --seed=20261122               input seed
  --storage=float               storage of q, k, v and out: float | bfloat16 | half (the
                                inputs are the float inputs rounded once; the kernel computes in
                                float either way; the LSE is float)
  --max_error=                  a run whose sampled-row error (O or LSE) against fp64 exceeds
                                this fails (error in the JSON, exit status 1). Default by
                                storage: 1e-5 (float); 5e-3 (bfloat16) and 1e-3 (half), the
                                rounding of an output of magnitude up to sqrt 3 to 8 and 11
                                significant bits
)";

// Our own --key=value flags, beyond those of bench::AttentionOptions; false when `key` is not ours.
bool parse_option(const std::string& key, const std::string& value) {
  if (key == "causal")
    options.causal = bench::parse_bool(value);
  else if (key == "dense_max_seq_len")
    options.dense_max_seq_len = std::stoll(value);
  else if (key == "dilated")
    options.dilated = bench::parse_bool(value);
  else if (key == "sgemm_size")
    options.sgemm_size = std::stoll(value);
  else if (key == "sgemm_threads")
    options.sgemm_threads = std::stoi(value);
  else if (key == "repetitions")
    options.repetitions = std::stoi(value);
  else if (key == "dense_repetitions")
    options.dense_repetitions = std::stoi(value);
  else if (key == "repeat_max_seq_len")
    options.repeat_max_seq_len = std::stoll(value);
  else if (key == "sample_rows")
    options.sample_rows = std::stoi(value);
  else if (key == "seed")
    options.seed = std::stoull(value);
  else if (key == "max_error")
    options.max_error = std::stod(value);
  else if (key == "storage") {
    if (value != "float" && value != "bfloat16" && value != "half")
      throw std::invalid_argument("--storage must be float, bfloat16 or half, not " + value);
    options.storage = value;
  } else
    return false;
  return true;
}

// The kernel's own default: DILATED_ATTENTION_NUM_THREADS when set and positive, else every
// hardware thread. Process CPU time / (real time * this) says what share of those cores a run
// actually got.
int kernel_threads() { return dilated_attention::cpu::resolve_num_threads(CpuOptions{}); }

// The SGEMMs use the kernel's count unless told otherwise, so the ratio compares like with like.
int sgemm_threads() { return options.sgemm_threads > 0 ? options.sgemm_threads : kernel_threads(); }

// ---------------------------------------------------------------------------------------------
// SGEMM: C = A B with the columns of C split over threads, Eigen single-threaded inside each, so
// the thread count is ours and not Eigen's (it is only multi-threaded under OpenMP).

using bench::announce;
using bench::run_on_threads;

void BM_Sgemm(benchmark::State& state, const std::string& name) {
  const Eigen::Index n = static_cast<Eigen::Index>(options.sgemm_size);
  const int threads = sgemm_threads();
  announce(name);
  Eigen::MatrixXf a = Eigen::MatrixXf::Random(n, n), b = Eigen::MatrixXf::Random(n, n);
  Eigen::MatrixXf c = Eigen::MatrixXf::Zero(n, n);
  const int eigen_threads = Eigen::nbThreads();
  Eigen::setNbThreads(1);
  for (auto _ : state) {
    run_on_threads(threads, [&](int t) {
      const Eigen::Index begin = n * t / threads, end = n * (t + 1) / threads;
      c.middleCols(begin, end - begin).noalias() = a * b.middleCols(begin, end - begin);
    });
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  Eigen::setNbThreads(eigen_threads);
  const double flops =
      2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n);
  state.counters["GFLOPs"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["worker_threads"] = threads;
}

#if defined(DA_BENCH_OPENBLAS)
// The same product by OpenBLAS, columns of C split over our threads, OpenBLAS single-threaded in
// each (column-major, like Eigen's default).
void BM_SgemmOpenBlas(benchmark::State& state, const std::string& name) {
  const Eigen::Index n = static_cast<Eigen::Index>(options.sgemm_size);
  const int threads = sgemm_threads();
  announce(name);
  Eigen::MatrixXf a = Eigen::MatrixXf::Random(n, n), b = Eigen::MatrixXf::Random(n, n);
  Eigen::MatrixXf c = Eigen::MatrixXf::Zero(n, n);
  openblas_set_num_threads(1);
  for (auto _ : state) {
    run_on_threads(threads, [&](int t) {
      const Eigen::Index begin = n * t / threads, end = n * (t + 1) / threads;
      const int m = static_cast<int>(n), cols = static_cast<int>(end - begin);
      cblas_sgemm(CblasColMajor, CblasNoTrans, CblasNoTrans, m, cols, m, 1.0f, a.data(), m,
                  b.data() + begin * n, m, 0.0f, c.data() + begin * n, m);
    });
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  // Spot check against Eigen, so a misconfigured call cannot publish a speed.
  const float want = a.row(7).dot(b.col(n - 3)), got = c(7, n - 3);
  if (std::abs(want - got) > 1e-3f * (1.0f + std::abs(want)))
    state.SkipWithError("OpenBLAS result differs from Eigen's");
  const double flops =
      2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n);
  state.counters["GFLOPs"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["worker_threads"] = threads;
}
#endif

// One attention block's products without the softmax: S = Q K^T (rows x rows), O = S V, one
// block per thread. `rows` is the kernel's block length w / r.
void BM_SgemmAttentionShaped(benchmark::State& state, const std::string& name, Eigen::Index rows,
                             Eigen::Index dim) {
  const int threads = sgemm_threads();
  announce(name);
  using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  struct Work {
    RowMajor q, k, v, s, o;
  };
  std::vector<Work> work(static_cast<std::size_t>(threads));
  for (Work& w : work) {
    w.q = RowMajor::Random(rows, dim);
    w.k = RowMajor::Random(rows, dim);
    w.v = RowMajor::Random(rows, dim);
    w.s = RowMajor::Zero(rows, rows);
    w.o = RowMajor::Zero(rows, dim);
  }
  const int eigen_threads = Eigen::nbThreads();
  Eigen::setNbThreads(1);
  for (auto _ : state) {
    run_on_threads(threads, [&](int t) {
      Work& w = work[static_cast<std::size_t>(t)];
      w.s.noalias() = w.q * w.k.transpose();
      w.o.noalias() = w.s * w.v;
    });
    benchmark::ClobberMemory();
  }
  Eigen::setNbThreads(eigen_threads);
  const double flops = 4.0 * static_cast<double>(rows) * static_cast<double>(rows) *
                       static_cast<double>(dim) * threads;
  state.counters["GFLOPs"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["worker_threads"] = threads;
}

// ---------------------------------------------------------------------------------------------
// Attention benchmarks. Inputs of one (N, D) are made once and kept while consecutive
// benchmarks (dense, then dilated, their repetitions) use them.

double max_error_for(const std::string& storage) {
  if (options.max_error >= 0.0) return options.max_error;
  return storage == "bfloat16" ? 5e-3 : storage == "half" ? 1e-3 : 1e-5;
}

template <class T>
struct Inputs {
  Shape shape;
  std::vector<T> q, k, v;
};

// The inputs in storage T: the same draws as the float run's, each rounded once to T.
template <class T>
const Inputs<T>& inputs_for(std::int64_t n, std::int64_t dim) {
  static std::unique_ptr<Inputs<T>> cached;
  const std::int64_t kv_heads = options.resolved_kv_heads();
  if (cached && cached->shape.seq_len == n && cached->shape.head_dim == dim) return *cached;
  cached.reset();  // release the previous size first: N = 262144 inputs are GiBs
  auto made = std::make_unique<Inputs<T>>();
  made->shape = Shape{options.batch, n, options.heads, kv_heads, dim};
  const auto q_size = static_cast<std::size_t>(options.batch * n * options.heads * dim);
  const auto kv_size = static_cast<std::size_t>(options.batch * n * kv_heads * dim);
  made->q.resize(q_size);
  made->k.resize(kv_size);
  made->v.resize(kv_size);
  bench::fill_uniform(made->q, options.seed * 3 + 0);
  bench::fill_uniform(made->k, options.seed * 3 + 1);
  bench::fill_uniform(made->v, options.seed * 3 + 2);
  cached = std::move(made);
  return *cached;
}

Config main_config() { return options.config(); }

Config dense_config(std::int64_t n) {
  Config config = main_config();
  config.segment_lengths = {n};
  config.dilation_rates = {1};
  return config;
}

template <class T>
void BM_Attention(benchmark::State& state, const std::string& name, bool dense, std::int64_t n,
                  std::int64_t dim) {
  announce(name);
  const Inputs<T>& in = inputs_for<T>(n, dim);
  const Shape& shape = in.shape;
  const Config config = dense ? dense_config(n) : main_config();
  const Pattern pattern(config, shape);

  std::vector<T> out(in.q.size(), T(0));
  std::vector<lse_type_t<T>> lse(static_cast<std::size_t>(shape.batch * shape.num_heads * n));
  const View<const T> q = contiguous_view<const T>(in.q.data(), shape, shape.num_heads);
  const View<const T> k = contiguous_view<const T>(in.k.data(), shape, shape.num_kv_heads);
  const View<const T> v = contiguous_view<const T>(in.v.data(), shape, shape.num_kv_heads);
  const View<T> o = contiguous_view<T>(out.data(), shape, shape.num_heads);

  const std::int64_t rss_at_reset = bench::reset_resident_peak();
  bench::heap::reset_peak();
  for (auto _ : state) {
    bench::timed_forward<T>(config, shape, q, k, v, o, lse.data());
    benchmark::ClobberMemory();
  }
  const std::int64_t heap_peak = bench::heap::peak_since_reset();
  const std::int64_t rss_peak = bench::resident_peak_bytes();

  const double tensor_bytes =
      static_cast<double>((in.q.size() + in.k.size() + in.v.size() + out.size()) * sizeof(T) +
                          lse.size() * sizeof(lse_type_t<T>));
  const double flops = pattern.useful_flops();
  state.counters["useful_GFLOPs"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["useful_flops"] = flops;
  state.counters["worker_threads"] = kernel_threads();
  state.counters["N"] = static_cast<double>(n);
  state.counters["D"] = static_cast<double>(dim);
  state.counters["budget_MiB"] = tensor_bytes / bench::mib + 64.0;
  bench::memory_counters(state, tensor_bytes, heap_peak, rss_at_reset, rss_peak);

  if (options.sample_rows > 0) {
    const bench::SampledError error = bench::sampled_error<T>(config, shape, q, k, v, o, lse.data(),
                                                              options.sample_rows, options.seed);
    state.counters["max_err_out"] = error.out;
    state.counters["max_err_lse"] = error.lse_mismatch_infinite ? INFINITY : error.lse;
    state.counters["sampled_rows"] = static_cast<double>(error.rows);
    const double budget = max_error_for(options.storage);
    state.counters["max_error_budget"] = budget;
    if (!(error.out <= budget) || !(error.lse <= budget) || error.lse_mismatch_infinite) {
      error_budget_exceeded = true;
      char message[160];
      std::snprintf(message, sizeof message,
                    "sampled-row error against fp64 above %g: O %g, LSE %g%s", budget, error.out,
                    error.lse, error.lse_mismatch_infinite ? " (infinite mismatch)" : "");
      state.SkipWithError(message);
    }
  }
}

// The sampled-row oracle must agree with reference::forward wherever both can run; checked on
// a small problem with every feature the oracle handles before any figure is reported.
void check_sampled_oracle() {
  double worst = 0.0;
  for (const Mixing mixing : {Mixing::softmax, Mixing::mean})
    for (const OffsetRule rule :
         {OffsetRule::modular, OffsetRule::blocked, OffsetRule::partitioned})
      for (const bool causal : {false, true}) {
        const Shape shape{2, 301, 4, 2, 8};
        Config config;
        config.segment_lengths = {64, 100, 64};
        config.dilation_rates = {1, 3, 2};
        config.causal = causal;
        config.offsets = rule;
        config.mixing = mixing;
        const auto size = static_cast<std::size_t>(shape.batch * shape.seq_len * shape.num_heads *
                                                   shape.head_dim);
        const auto kv_size = size / 2;
        std::vector<double> q(size), k(kv_size), v(kv_size), out(size);
        std::vector<double> lse(
            static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len));
        bench::fill_uniform(q, 1);
        bench::fill_uniform(k, 2);
        bench::fill_uniform(v, 3);
        const auto qv = contiguous_view<const double>(q.data(), shape, 4);
        const auto kv = contiguous_view<const double>(k.data(), shape, 2);
        const auto vv = contiguous_view<const double>(v.data(), shape, 2);
        reference::forward<double>(config, shape, {qv, kv, vv},
                                   {contiguous_view<double>(out.data(), shape, 4), lse.data()});
        const Pattern pattern(config, shape);
        for (std::int64_t b = 0; b < shape.batch; ++b)
          for (std::int64_t h = 0; h < shape.num_heads; ++h)
            for (std::int64_t x = 0; x < shape.seq_len; ++x) {
              const bench::RowResult row =
                  bench::reference_row<double>(pattern, shape, qv, kv, vv, b, h, x);
              const double ref_lse =
                  lse[static_cast<std::size_t>((b * shape.num_heads + h) * shape.seq_len + x)];
              if (std::isinf(ref_lse) || std::isinf(row.lse)) {
                if (ref_lse != row.lse) worst = INFINITY;
              } else {
                worst = std::max(worst, std::abs(ref_lse - row.lse));
              }
              for (std::int64_t d = 0; d < shape.head_dim; ++d)
                worst = std::max(
                    worst,
                    std::abs(
                        row.out[static_cast<std::size_t>(d)] -
                        out[static_cast<std::size_t>(((b * shape.seq_len + x) * 4 + h) * 8 + d)]));
            }
      }
  if (!(worst < 1e-12)) {
    std::fprintf(stderr,
                 "cpu_forward_benchmark: the sampled-row oracle disagrees with reference::forward "
                 "by %g; refusing to report errors against it\n",
                 worst);
    std::exit(3);
  }
}

void register_benchmarks() {
  const int threads = sgemm_threads();
  if (options.fma_peak) bench::register_fma_peaks(threads, options.repetitions);
  if (options.sgemm_size > 0) {
    const std::string n = std::to_string(options.sgemm_size);
    const std::string name =
        "sgemm/M:" + n + "/N:" + n + "/K:" + n + "/threads:" + std::to_string(threads);
    benchmark::RegisterBenchmark(name.c_str(), BM_Sgemm, name)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        ->MeasureProcessCPUTime()
        ->Repetitions(options.repetitions);
#if defined(DA_BENCH_OPENBLAS)
    const std::string blas_name =
        "sgemm_openblas/M:" + n + "/N:" + n + "/K:" + n + "/threads:" + std::to_string(threads);
    benchmark::RegisterBenchmark(blas_name.c_str(), BM_SgemmOpenBlas, blas_name)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        ->MeasureProcessCPUTime()
        ->Repetitions(options.repetitions);
#endif
    // The kernel's block length is w / r; the most common one in the config stands for it.
    std::map<std::int64_t, int> lengths;
    for (std::size_t i = 0; i < options.segments.size(); ++i)
      ++lengths[(options.segments[i] + options.dilations[i] - 1) / options.dilations[i]];
    std::int64_t rows = 0;
    int best = 0;
    for (const auto& [length, count] : lengths)
      if (count > best) rows = length, best = count;
    for (std::int64_t dim : options.head_dims) {
      const std::string shaped_name = "sgemm_attention_shaped/rows:" + std::to_string(rows) +
                                      "/D:" + std::to_string(dim) +
                                      "/threads:" + std::to_string(threads);
      benchmark::RegisterBenchmark(shaped_name.c_str(), BM_SgemmAttentionShaped, shaped_name,
                                   static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(dim))
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime()
          ->MeasureProcessCPUTime()
          ->Repetitions(options.repetitions);
    }
  }
  // A non-float storage is named in the benchmark (dilated_bfloat16/...), so that float rows
  // and half-width rows of different runs never share a name.
  const auto attention = options.storage == "bfloat16" ? BM_Attention<Eigen::bfloat16>
                         : options.storage == "half"   ? BM_Attention<Eigen::half>
                                                       : BM_Attention<float>;
  const std::string tag = options.storage == "float" ? "" : "_" + options.storage;
  for (std::int64_t dim : options.head_dims)
    for (std::int64_t n : options.seq_lens) {
      const std::string suffix = tag + "/D:" + std::to_string(dim) + "/N:" + std::to_string(n);
      if (n <= options.dense_max_seq_len)
        benchmark::RegisterBenchmark(("dense" + suffix).c_str(), attention, "dense" + suffix, true,
                                     n, dim)
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime()
            ->MeasureProcessCPUTime()
            ->Repetitions(options.dense_repetitions);
      if (options.dilated)
        benchmark::RegisterBenchmark(("dilated" + suffix).c_str(), attention, "dilated" + suffix,
                                     false, n, dim)
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime()
            ->MeasureProcessCPUTime()
            ->Repetitions(n <= options.repeat_max_seq_len ? options.repetitions : 1);
    }
}

}  // namespace

int main(int argc, char** argv) {
  if (bench::wants_help(argc, argv)) {
    std::fputs(usage_text, stdout);
    std::puts("\nGoogle Benchmark flags:");
    benchmark::PrintDefaultHelp();
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  if (const int status =
          bench::parse_command_line(argc, argv, "cpu_forward_benchmark", parse_option, options))
    return status;
  check_sampled_oracle();
  std::string kernel_isa;
  try {
    kernel_isa = bench::select_isa(options.isa);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "cpu_forward_benchmark: %s\n", error.what());
    return 2;
  }
  std::fprintf(stderr, "cpu_forward_benchmark: kernel isa %s (best here: %s), %d threads\n",
               kernel_isa.c_str(), to_string(dilated_attention::cpu::best_isa()), kernel_threads());

  benchmark::AddCustomContext("implementation", DA_BENCH_IMPLEMENTATION);
  benchmark::AddCustomContext("config", options.describe());
  benchmark::AddCustomContext("sgemm_threads", std::to_string(sgemm_threads()));
  benchmark::AddCustomContext("kernel_threads", std::to_string(kernel_threads()));
  benchmark::AddCustomContext("kernel_isa", kernel_isa);
  benchmark::AddCustomContext("storage", options.storage);
  benchmark::AddCustomContext("best_isa", to_string(dilated_attention::cpu::best_isa()));
#if defined(DA_BENCH_OPENBLAS)
  benchmark::AddCustomContext("openblas_core", openblas_get_corename());
#endif
#if defined(DA_BENCH_NATIVE_BUILD)
  benchmark::AddCustomContext("build_flags", "-march=native");
#else
  benchmark::AddCustomContext("build_flags", "baseline (no -march)");
#endif
  benchmark::AddCustomContext("heap_counter",
                              bench::heap::available() ? "malloc interposition" : "unavailable");
  benchmark::AddCustomContext("eigen_version", std::to_string(EIGEN_WORLD_VERSION) + "." +
                                                   std::to_string(EIGEN_MAJOR_VERSION) + "." +
                                                   std::to_string(EIGEN_MINOR_VERSION));
#if defined(__VERSION__)
  benchmark::AddCustomContext("compiler", __VERSION__);
#endif
#if defined(NDEBUG)
  benchmark::AddCustomContext("assertions", "off (NDEBUG)");
#else
  benchmark::AddCustomContext("assertions",
                              "on: not a release build, figures are not representative");
#endif
  register_benchmarks();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (error_budget_exceeded) {
    std::fprintf(stderr,
                 "cpu_forward_benchmark: FAILED: a run's sampled-row error against fp64 "
                 "exceeded %g (marked as an error in the output)\n",
                 max_error_for(options.storage));
    return 1;
  }
  return 0;
}
