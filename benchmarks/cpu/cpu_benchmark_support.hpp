#pragma once
// What the CPU benchmarks share: which forward they time, the attention options of their command
// line, seeded inputs that fill fast in parallel, the measured FMA peak every benchmark reports
// beside its useful GFLOP/s, the two memory probes (live heap, resident high-water mark) and their
// counters, and the sampled-row oracle that checks a long run against docs/semantics.md "The
// forward" without paying for the O(N * w) reference.

#include <dilated_attention/config.hpp>
#include <dilated_attention/cpu/kernels/isa.hpp>
#include <dilated_attention/pattern.hpp>
#include <dilated_attention/reference.hpp>

#include <benchmark/benchmark.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <set>
#include <string>
#include <thread>
#include <vector>

// The timed implementation. The fast kernel when its header is present, the fp64 reference
// otherwise (or when DA_BENCH_USE_REFERENCE is defined), so the harness builds before the kernel
// lands and the JSON says which one was measured.
#if !defined(DA_BENCH_USE_REFERENCE) && __has_include(<dilated_attention/dilated_attention.hpp>)
#include <dilated_attention/dilated_attention.hpp>
#define DA_BENCH_IMPLEMENTATION "dilated_attention::forward"
#define DA_BENCH_TIMES_REFERENCE 0
#else
#define DA_BENCH_IMPLEMENTATION "dilated_attention::reference::forward"
#define DA_BENCH_TIMES_REFERENCE 1
#endif

namespace dilated_attention::bench {

template <class T>
void timed_forward(const Config& config, const Shape& shape, View<const T> q, View<const T> k,
                   View<const T> v, View<T> out, lse_type_t<T>* lse) {
#if DA_BENCH_TIMES_REFERENCE
  reference::forward<T>(config, shape, {q, k, v}, {out, lse});
#else
  dilated_attention::forward<T>(config, shape, {q, k, v}, {out, lse});
#endif
}

// ---------------------------------------------------------------------------------------------
// The command line both benchmarks share: the attention being timed. Each benchmark derives its
// own Options from AttentionOptions and parses `--causal` itself (the forward's is strict).

// "2048,4096,8192" -> {2048, 4096, 8192}; an empty list is an error.
inline std::vector<std::int64_t> parse_list(const std::string& text) {
  std::vector<std::int64_t> values;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) values.push_back(std::stoll(item));
  if (values.empty()) throw std::invalid_argument("empty list: " + text);
  return values;
}

inline std::string join(const std::vector<std::int64_t>& values) {
  std::string text;
  for (std::size_t i = 0; i < values.size(); ++i)
    text += (i ? "," : "") + std::to_string(values[i]);
  return text;
}

// Their lines of --help, spliced into each benchmark's usage text (a macro, so that the text
// stays one string literal).
#define DA_BENCH_ATTENTION_USAGE                                                             \
  "  --head_dims=64                head dims D (e.g. 64,128)\n"                              \
  "  --batch=1 --heads=8           batch B and query heads H\n"                              \
  "  --kv_heads=H                  key/value heads (grouped-query attention when < H)\n"     \
  "  --segments=2048,4096,8192     segment lengths w_i\n"                                    \
  "  --dilations=1,2,4             dilation rates r_i\n"                                     \
  "  --causal=false                causal masking\n"                                         \
  "  --offsets=modular             modular | blocked | partitioned\n"                        \
  "  --mixing=softmax              softmax | mean\n"                                         \
  "  --isa=                        kernel instruction set: generic | avx2 | avx512 | neon\n" \
  "                                (default: the library's choice; sets\n"                   \
  "                                DILATED_ATTENTION_CPU_ISA)\n"                             \
  "  --fma_peak=true               false skips the FMA-loop peak benchmarks\n"

struct AttentionOptions {
  std::vector<std::int64_t> seq_lens = {16384, 65536};
  std::vector<std::int64_t> head_dims = {64};
  std::int64_t batch = 1, heads = 8, kv_heads = 0;  // 0: same as heads
  std::vector<std::int64_t> segments = {2048, 4096, 8192};
  std::vector<std::int64_t> dilations = {1, 2, 4};
  bool causal = false;
  OffsetRule offsets = OffsetRule::modular;
  Mixing mixing = Mixing::softmax;
  std::string isa;  // empty: the library's choice
  bool fma_peak = true;

  std::int64_t resolved_kv_heads() const { return kv_heads > 0 ? kv_heads : heads; }

  Config config() const {
    Config result;
    result.segment_lengths = segments;
    result.dilation_rates = dilations;
    result.causal = causal;
    result.offsets = offsets;
    result.mixing = mixing;
    return result;
  }

  // The "config" context line of the JSON.
  std::string describe() const {
    return "B=" + std::to_string(batch) + " H=" + std::to_string(heads) +
           " Hkv=" + std::to_string(resolved_kv_heads()) + " w=" + join(segments) +
           " r=" + join(dilations) + " causal=" + (causal ? "true" : "false") +
           " offsets=" + to_string(offsets) + " mixing=" + to_string(mixing) + " dtype=float";
  }
};

inline bool parse_bool(const std::string& text) {
  if (text == "1" || text == "true" || text == "yes" || text == "on") return true;
  if (text == "0" || text == "false" || text == "no" || text == "off") return false;
  throw std::invalid_argument("not a boolean: " + text);
}

// Returns false when `key` is not one of the shared options (--causal included: see above).
inline bool parse_attention_option(AttentionOptions& options, const std::string& key,
                                   const std::string& value) {
  if (key == "isa")
    options.isa = value;
  else if (key == "fma_peak")
    options.fma_peak = parse_bool(value);
  else if (key == "seq_lens")
    options.seq_lens = parse_list(value);
  else if (key == "head_dims")
    options.head_dims = parse_list(value);
  else if (key == "batch")
    options.batch = std::stoll(value);
  else if (key == "heads")
    options.heads = std::stoll(value);
  else if (key == "kv_heads")
    options.kv_heads = std::stoll(value);
  else if (key == "segments")
    options.segments = parse_list(value);
  else if (key == "dilations")
    options.dilations = parse_list(value);
  else if (key == "offsets") {
    if (value == "modular")
      options.offsets = OffsetRule::modular;
    else if (value == "blocked")
      options.offsets = OffsetRule::blocked;
    else if (value == "partitioned")
      options.offsets = OffsetRule::partitioned;
    else
      throw std::invalid_argument("--offsets must be modular, blocked or partitioned");
  } else if (key == "mixing") {
    if (value == "softmax")
      options.mixing = Mixing::softmax;
    else if (value == "mean")
      options.mixing = Mixing::mean;
    else
      throw std::invalid_argument("--mixing must be softmax or mean");
  } else
    return false;
  return true;
}

inline bool wants_help(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") return true;
  return false;
}

// Our flags (those Google Benchmark left in argv), each `--key=value`: the shared ones here, the
// rest through the benchmark's `parse_option(key, value)` (false: not one of its keys); then every
// (N, D) validated, so that a bad config is rejected here with the library's own message rather
// than inside a benchmark. Returns 0, or 2 after a message on stderr naming `program`.
template <class ParseOption>
int parse_command_line(int argc, char** argv, const char* program, const ParseOption& parse_option,
                       AttentionOptions& options) {
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      const std::size_t eq = arg.find('=');
      bool known = false;
      if (arg.rfind("--", 0) == 0 && eq != std::string::npos) {
        const std::string key = arg.substr(2, eq - 2), value = arg.substr(eq + 1);
        known = parse_attention_option(options, key, value) || parse_option(key, value);
      }
      if (!known) {
        std::fprintf(stderr, "%s: unknown argument '%s' (see --help)\n", program, argv[i]);
        return 2;
      }
    }
    for (std::int64_t dim : options.head_dims)
      for (std::int64_t n : options.seq_lens)
        validate(options.config(),
                 Shape{options.batch, n, options.heads, options.resolved_kv_heads(), dim});
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s: %s\n", program, error.what());
    return 2;
  }
  return 0;
}

// --isa: forces the kernels' instruction set through DILATED_ATTENTION_CPU_ISA (so that every
// library call of the process runs it) and returns the one the kernels will run; throws
// std::invalid_argument for a name this CPU or build cannot run.
inline std::string select_isa(const std::string& isa) {
  if (!isa.empty()) ::setenv("DILATED_ATTENTION_CPU_ISA", isa.c_str(), 1);
  return to_string(cpu::resolve_isa(CpuIsa::automatic));
}

// ---------------------------------------------------------------------------------------------
// The measured peak: the yardstick every CPU benchmark reports its useful GFLOP/s against (issue
// 22). 12 independent FMA chains of the widest vectors of one instruction set per thread (FMA
// latency 4 x 2 pipes needs 8 in flight), long enough to time, on t threads at once: at t = 1 the
// per-core peak, at the kernel's thread count what the same threads can do together. Target
// attributes, so that a baseline build (no -march) measures the same peak as the native one.
// benchmarks/plot_results.py divides each useful GFLOP/s by the fma_peak row of the run's
// kernel_isa at the run's worker_threads, per wall second and per CPU second.

template <class Body>
void run_on_threads(int threads, const Body& body) {
  std::vector<std::thread> workers;
  for (int t = 1; t < threads; ++t) workers.emplace_back(body, t);
  body(0);
  for (std::thread& worker : workers) worker.join();
}

inline constexpr std::int64_t fma_iterations = 1 << 24;

#if defined(__x86_64__)
// One instruction set's vector operations for fma_loop. GCC inlines an intrinsic only into a
// function compiled for its instruction set, so each operation carries the target attribute and
// takes its vectors by reference (by value, an untargeted caller would change the vector ABI);
// fma_loop<Isa> is untargeted and runs only inlined into a `flatten` function of Isa's target,
// which inlines everything into one loop of 12 independent FMAs an iteration.
struct Avx2Vectors {
  using V = __m256;
  static constexpr int lanes = 8;
  __attribute__((target("avx2,fma"))) static void set(V& v, float x) { v = _mm256_set1_ps(x); }
  __attribute__((target("avx2,fma"))) static void add(V& a, const V& b) { a = _mm256_add_ps(a, b); }
  __attribute__((target("avx2,fma"))) static void fmadd(V& a, const V& b, const V& c) {
    a = _mm256_fmadd_ps(a, b, c);
  }
};

struct Avx512Vectors {
  using V = __m512;
  static constexpr int lanes = 16;
  __attribute__((target("avx512f"))) static void set(V& v, float x) { v = _mm512_set1_ps(x); }
  __attribute__((target("avx512f"))) static void add(V& a, const V& b) { a = _mm512_add_ps(a, b); }
  __attribute__((target("avx512f"))) static void fmadd(V& a, const V& b, const V& c) {
    a = _mm512_fmadd_ps(a, b, c);
  }
};

// 12 accumulators: enough independent chains to cover the FMA latency times the FMA ports.
template <class Isa>
double fma_loop(std::int64_t iterations) {
  typename Isa::V acc[12], m, add;
  for (int i = 0; i < 12; ++i) Isa::set(acc[i], static_cast<float>(i));
  Isa::set(m, 0.9999999f);
  Isa::set(add, 1e-7f);
  for (std::int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) Isa::fmadd(acc[i], m, add);
  }
  for (int i = 1; i < 12; ++i) Isa::add(acc[0], acc[i]);
  float lanes[Isa::lanes];
  std::memcpy(lanes, &acc[0], sizeof lanes);
  benchmark::DoNotOptimize(lanes[0]);
  return static_cast<double>(iterations) * 12 * Isa::lanes * 2;
}

__attribute__((target("avx2,fma"), flatten)) inline double fma_loop_avx2(std::int64_t iterations) {
  return fma_loop<Avx2Vectors>(iterations);
}

__attribute__((target("avx512f"), flatten)) inline double fma_loop_avx512(std::int64_t iterations) {
  return fma_loop<Avx512Vectors>(iterations);
}
#endif

// Progress: a line on stderr as each benchmark starts (Google Benchmark may enter one several
// times; the console table prints as each ends), so a minutes-long run is visibly under way.
inline void announce(const std::string& name) {
  static std::set<std::string> announced;
  if (!announced.insert(name).second) return;
  std::fprintf(stderr, "  ... running %s\n", name.c_str());
  std::fflush(stderr);
}

inline void BM_FmaPeak(benchmark::State& state, const std::string& name, CpuIsa isa, int threads) {
  announce(name);
  double flops = 0.0;
  for (auto _ : state) {
    std::vector<double> done(static_cast<std::size_t>(threads));
    run_on_threads(threads, [&](int t) {
#if defined(__x86_64__)
      done[static_cast<std::size_t>(t)] =
          isa == CpuIsa::avx512 ? fma_loop_avx512(fma_iterations) : fma_loop_avx2(fma_iterations);
#else
      static_cast<void>(isa);
      done[static_cast<std::size_t>(t)] = 0.0;
#endif
    });
    flops = 0.0;
    for (double f : done) flops += f;
  }
  state.counters["GFLOPs"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["worker_threads"] = threads;
}

// fma_peak/<isa>/threads:t for every x86 instruction set this CPU runs (avx2, avx512), at t = 1
// and t = `threads` (the kernel's count). Nothing elsewhere: the NEON path has no peak loop yet.
inline void register_fma_peaks(int threads, int repetitions) {
#if defined(__x86_64__)
  for (const CpuIsa isa : {CpuIsa::avx2, CpuIsa::avx512}) {
    if (!cpu::isa_supported(isa)) continue;
    for (const int t : {1, threads}) {
      const std::string name =
          std::string("fma_peak/") + to_string(isa) + "/threads:" + std::to_string(t);
      benchmark::RegisterBenchmark(name.c_str(), BM_FmaPeak, name, isa, t)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime()
          ->MeasureProcessCPUTime()
          ->Repetitions(repetitions);
      if (threads == 1) break;
    }
  }
#else
  static_cast<void>(threads), static_cast<void>(repetitions);
#endif
}

// ---------------------------------------------------------------------------------------------
// Inputs. Element i of a tensor is a function of (seed, i) alone, so the fill can be split over
// threads and still give the same tensor; uniform on [-sqrt 3, sqrt 3) has unit variance.

inline std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

template <class T>
void fill_uniform(std::vector<T>& data, std::uint64_t seed) {
  const std::size_t n = data.size();
  const unsigned workers = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < workers; ++t)
    threads.emplace_back([&, t] {
      const std::size_t begin = n * t / workers, end = n * (t + 1) / workers;
      const std::uint64_t base = splitmix64(seed);
      for (std::size_t i = begin; i < end; ++i) {
        const double unit =
            static_cast<double>(splitmix64(base ^ (i * 0xD1B54A32D192ED03ull)) >> 11) *
            0x1p-53;  // [0, 1)
        data[i] = static_cast<T>((2.0 * unit - 1.0) * 1.7320508075688772);
      }
    });
  for (std::thread& thread : threads) thread.join();
}

// ---------------------------------------------------------------------------------------------
// Memory probes.
//
// Heap: benchmarks/cpu/cpu_heap_counter.cpp interposes malloc and friends (glibc, no sanitizer) and
// keeps the live byte count and its high-water mark. `heap_peak_since_reset()` is the largest
// number of bytes that were live at once above what was live at the reset: exactly the heap the
// measured calls needed on top of the caller's tensors (the kernel's scratch, std::thread state,
// Eigen temporaries). It is -1 when the counter is not compiled in.
namespace heap {
bool available();
void reset_peak();
std::int64_t peak_since_reset();
}  // namespace heap

// Resident memory: Linux lets a process reset its own VmHWM (write "5" to /proc/self/clear_refs).
// The delta VmHWM - VmRSS(at reset) counts pages that became resident during the calls: heap,
// thread stacks, anything mmapped. It undercounts memory that was already resident and is
// reused (freed heap that malloc kept), so the heap counter is the primary figure.
inline std::int64_t proc_status_kib(const char* field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  const std::size_t length = std::strlen(field);
  while (std::getline(status, line))
    if (line.compare(0, length, field) == 0 && line.size() > length && line[length] == ':')
      return std::stoll(line.substr(length + 1));
  return -1;
}

// Returns VmRSS in bytes at the reset, or -1 when the kernel refuses.
inline std::int64_t reset_resident_peak() {
  std::FILE* file = std::fopen("/proc/self/clear_refs", "w");
  if (file == nullptr) return -1;
  const bool ok = std::fputs("5", file) >= 0;
  if (std::fclose(file) != 0 || !ok) return -1;
  const std::int64_t rss = proc_status_kib("VmRSS");
  return rss < 0 ? -1 : rss * 1024;
}

inline std::int64_t resident_peak_bytes() {
  const std::int64_t hwm = proc_status_kib("VmHWM");
  return hwm < 0 ? -1 : hwm * 1024;
}

constexpr double mib = 1024.0 * 1024.0;

// The memory counters of a run: its tensors, and when the probes could tell, the heap above them
// (and tensors + heap) and the resident high-water delta. `State` is benchmark::State.
template <class State>
void memory_counters(State& state, double tensor_bytes, std::int64_t heap_peak,
                     std::int64_t rss_at_reset, std::int64_t rss_peak) {
  state.counters["tensors_MiB"] = tensor_bytes / mib;
  if (heap_peak >= 0) {
    state.counters["heap_peak_MiB"] = static_cast<double>(heap_peak) / mib;
    state.counters["peak_MiB"] = (tensor_bytes + static_cast<double>(heap_peak)) / mib;
  }
  if (rss_at_reset >= 0 && rss_peak >= 0)
    state.counters["rss_peak_delta_MiB"] = static_cast<double>(rss_peak - rss_at_reset) / mib;
}

// ---------------------------------------------------------------------------------------------
// The sampled-row oracle: docs/semantics.md "The forward" for one (batch, head, query) in double, built from
// Pattern::keys exactly as the section reads. Softmax mixing sums exp(s) once per branch that
// gives the key (so a key that two branches give counts twice: the multiplicity C); mean mixing
// averages the per-branch softmax outputs over all G branches. O(G * w * D) per row.

struct RowResult {
  std::vector<double> out;
  double lse;
};

template <class T>
RowResult reference_row(const Pattern& pattern, const Shape& shape, View<const T> q,
                        View<const T> k, View<const T> v, std::int64_t b, std::int64_t h,
                        std::int64_t x) {
  const Config& config = pattern.config();
  const double scale = resolved_scale(config, shape);
  const std::int64_t dim = shape.head_dim, kvh = pattern.kv_head(h);
  const double inf = std::numeric_limits<double>::infinity();
  const T* qx = q.data + b * q.batch_stride + x * q.seq_stride + h * q.head_stride;
  const T* k_head = k.data + b * k.batch_stride + kvh * k.head_stride;
  const T* v_head = v.data + b * v.batch_stride + kvh * v.head_stride;
  auto score = [&](std::int64_t y) {
    double sum = 0.0;
    const T* ky = k_head + y * k.seq_stride;
    for (std::int64_t d = 0; d < dim; ++d)
      sum += static_cast<double>(qx[d]) * static_cast<double>(ky[d]);
    return scale * sum;
  };

  struct BranchPartial {
    std::vector<double> acc;  // sum_y exp(s - max) v_y
    double max = -std::numeric_limits<double>::infinity(), sum = 0.0;
  };
  std::vector<BranchPartial> partials;
  for (std::int64_t i = 0; i < pattern.num_branches(); ++i) {
    const Progression keys = pattern.keys(i, h, x);
    BranchPartial partial;
    partial.acc.assign(static_cast<std::size_t>(dim), 0.0);
    if (!keys.empty()) {
      std::vector<double> scores(static_cast<std::size_t>(keys.count));
      for (std::int64_t j = 0; j < keys.count; ++j) {
        scores[static_cast<std::size_t>(j)] = score(keys.at(j));
        partial.max = std::max(partial.max, scores[static_cast<std::size_t>(j)]);
      }
      for (std::int64_t j = 0; j < keys.count; ++j) {
        const double p = std::exp(scores[static_cast<std::size_t>(j)] - partial.max);
        partial.sum += p;
        const T* vy = v_head + keys.at(j) * v.seq_stride;
        for (std::int64_t d = 0; d < dim; ++d)
          partial.acc[static_cast<std::size_t>(d)] += p * static_cast<double>(vy[d]);
      }
    }
    partials.push_back(std::move(partial));
  }

  RowResult result{std::vector<double>(static_cast<std::size_t>(dim), 0.0), -inf};
  double max = -inf;
  for (const BranchPartial& p : partials)
    if (p.sum > 0.0) max = std::max(max, p.max);
  if (max == -inf) return result;  // no branch gives this row a key: O = 0, LSE = -inf
  double total = 0.0;
  for (const BranchPartial& p : partials)
    if (p.sum > 0.0) total += p.sum * std::exp(p.max - max);
  result.lse = max + std::log(total);
  const double branches = static_cast<double>(pattern.num_branches());
  for (const BranchPartial& p : partials) {
    if (p.sum == 0.0) continue;
    const double weight = config.mixing == Mixing::softmax
                              ? std::exp(p.max - max) / total  // share of the union's softmax
                              : 1.0 / (p.sum * branches);      // own softmax, averaged over G
    for (std::int64_t d = 0; d < dim; ++d)
      result.out[static_cast<std::size_t>(d)] += weight * p.acc[static_cast<std::size_t>(d)];
  }
  return result;
}

// Rows worth checking in a head: the ends, both sides of every branch's first segment boundary,
// the start of every branch's last segment, and `count` more spread by a seeded hash.
inline std::vector<std::int64_t> sample_rows(const Config& config, std::int64_t n, int count,
                                             std::uint64_t seed) {
  std::vector<std::int64_t> rows = {0, n - 1};
  for (std::int64_t w : config.segment_lengths)
    for (std::int64_t x : {w - 1, w, w + 1, ((n - 1) / w) * w}) rows.push_back(x);
  for (int i = 0; i < count; ++i)
    rows.push_back(static_cast<std::int64_t>(
        splitmix64(seed * 0x9E3779B97F4A7C15ull + static_cast<std::uint64_t>(i)) %
        static_cast<std::uint64_t>(n)));
  rows.erase(
      std::remove_if(rows.begin(), rows.end(), [n](std::int64_t x) { return x < 0 || x >= n; }),
      rows.end());
  std::sort(rows.begin(), rows.end());
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  return rows;
}

struct SampledError {
  double out = 0.0;  // max |O - O_ref| over the sampled rows
  double lse = 0.0;  // max |LSE - LSE_ref| over sampled rows whose reference LSE is finite
  std::int64_t rows = 0;
  bool lse_mismatch_infinite = false;  // one side -inf and the other not
};

template <class T>
SampledError sampled_error(const Config& config, const Shape& shape, View<const T> q,
                           View<const T> k, View<const T> v, View<const T> out,
                           const lse_type_t<T>* lse, int rows_per_head, std::uint64_t seed) {
  const Pattern pattern(config, shape);
  SampledError error;
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t h = 0; h < shape.num_heads; ++h)
      for (std::int64_t x :
           sample_rows(config, shape.seq_len, rows_per_head,
                       seed + static_cast<std::uint64_t>(b * shape.num_heads + h))) {
        const RowResult expected = reference_row<T>(pattern, shape, q, k, v, b, h, x);
        const T* got = out.data + b * out.batch_stride + x * out.seq_stride + h * out.head_stride;
        for (std::int64_t d = 0; d < shape.head_dim; ++d)
          error.out = std::max(error.out, std::abs(static_cast<double>(got[d]) -
                                                   expected.out[static_cast<std::size_t>(d)]));
        if (lse != nullptr) {
          const double got_lse =
              static_cast<double>(lse[(b * shape.num_heads + h) * shape.seq_len + x]);
          if (std::isinf(expected.lse) || std::isinf(got_lse)) {
            if (got_lse != expected.lse) error.lse_mismatch_infinite = true;
          } else {
            error.lse = std::max(error.lse, std::abs(got_lse - expected.lse));
          }
        }
        ++error.rows;
      }
  return error;
}

}  // namespace dilated_attention::bench
