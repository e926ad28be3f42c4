// The inference forms on the CPU (docs/performance.md "Inference"): a decode step against caches of
// 16k to 1M tokens, a 2k-row chunk of a chunked prefill against the forward, and a variable-length
// batch against the padded layout. Google Benchmark; every timed output is checked against the
// fp64 definition on sampled rows, and a run whose error exceeds 1e-4 is marked as an error (the
// binary then exits 1), so a wrong kernel cannot report a figure.
//
//   Stream/copy      a STREAM-like copy (2 x bytes moved per second) on every core: the machine's
//                    memory bandwidth, measured in the same binary as the decode steps.
//   Stream/read      a pure read (a sum) of 1 GiB on every core: what a step that only reads can
//                    draw (on the Zen 3 guest 55-65 % of the copy's figure), a second yardstick.
//   Decode/...       one decode step (QueryRange{kv_len - 1, 1}) with a reused DecodeWorkspace:
//                    time, tokens/s (batch / step time), the K/V bytes the step must read (each
//                    key/value row a query head of the step attends, once per kv head: the
//                    unique bytes) and those bytes per second as a share of the same copy
//                    measured right before the row's timed loop (share_of_copy, against
//                    copy_bytes_per_second) and of Stream/copy (stream_bytes_per_second).
//   Decode_read/...  the rows a float Decode/... step at 1M tokens, batch 16 reads, read alone
//                    (same units, same order, same threads, no arithmetic): the step's roof.
//   Decode_paged/... the float step at 1M tokens, batch 16, with K/V in shuffled pages of 16 or
//                    256 positions (PagedKeyValues): the decode kernel reads through the table.
//   Decode_paged_read/...  its rows read alone through the same table (D = 64): its roof.
//   Decode_bf16/..., Decode_half/...   the same step on Eigen::bfloat16 / Eigen::half tensors:
//                    half the bytes per key/value row, read in place and widened in registers.
//                    The caches are mapped with MAP_NORESERVE and only the rows a step reads are
//                    written (the last max(w) positions of each element), so a 1M-token cache at
//                    batch 16 costs its touched rows of memory, not 128 GiB; the layout and the
//                    addresses the kernel reads are those of the full [B, kv_len, Hkv, D] cache.
//                    DA_KV_HUGE_PAGES=1 maps them with transparent huge pages (context
//                    kv_cache_pages says which).
//   Prefill/...      rows [64k - 2k, 64k) of a causal 64k-token sequence (QueryRange) and the
//                    forward over the whole 64k: useful GFLOP/s of each (exact pair counts);
//                    and the backward of the same chunk (d_q of its rows, d_k and d_v of all
//                    64k), counted at 10 * head_dim flops per pair (the fused path's products).
//   Varlen/...       a batch of 16 sequences whose lengths are drawn from a log-normal
//                    distribution (median 1024, sigma 1, clipped to [16, 8192], seed 7) packed
//                    (Sequences), padded with ValidLengths, and padded computed as a dense
//                    [B, max_len] forward (what a caller without valid lengths pays): valid tokens/s.
//
//   fma_peak/...     the measured FMA peak (cpu_benchmark_support.hpp): the yardstick of the
//                    prefill rows' useful GFLOP/s.
//
// LongNet branches throughout: w = 2048, 4096, 8192, 16384, 32768 with r = 1, 2, 4, 8, 16.

#include <dilated_attention/dilated_attention.hpp>

#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "cpu_benchmark_support.hpp"

namespace {

namespace da = dilated_attention;
namespace bench = dilated_attention::bench;
using da::Config;
using da::Shape;
using da::View;

constexpr double kMaxError = 1e-4;
bool error_budget_exceeded = false;
double stream_bytes_per_second = 0.0;

Config longnet(bool causal = true) {
  Config config;
  config.segment_lengths = {2048, 4096, 8192, 16384, 32768};
  config.dilation_rates = {1, 2, 4, 8, 16};
  config.causal = causal;
  return config;
}

int threads() { return da::cpu::default_num_threads(); }

// DA_KV_HUGE_PAGES=1 asks for transparent huge pages on the K/V caches (madvise), as an engine
// that allocates a multi-GiB cache would; the default is the kernel's 4 KiB pages.
bool kv_huge_pages() {
  const char* value = std::getenv("DA_KV_HUGE_PAGES");
  return value != nullptr && std::string(value) == "1";
}

// Anonymous memory that costs only the pages written.
template <class T>
struct Mapping {
  T* data = nullptr;
  std::size_t bytes = 0;
  explicit Mapping(std::size_t count) : bytes(count * sizeof(T)) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap failed");
    if (kv_huge_pages()) madvise(p, bytes, MADV_HUGEPAGE);
    data = static_cast<T*>(p);
  }
  ~Mapping() { munmap(data, bytes); }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
};

// Seeded values in [-sqrt(3), sqrt(3)) on elements [begin, end), on every core (rounded to T).
template <class T>
void fill(T* data, std::size_t begin, std::size_t end, std::uint64_t seed) {
  const unsigned workers = static_cast<unsigned>(threads());
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < workers; ++t)
    pool.emplace_back([=] {
      const std::size_t b = begin + (end - begin) * t / workers,
                        e = begin + (end - begin) * (t + 1) / workers;
      const std::uint64_t base = bench::splitmix64(seed);
      for (std::size_t i = b; i < e; ++i) {
        const double unit =
            static_cast<double>(bench::splitmix64(base ^ (i * 0xD1B54A32D192ED03ull)) >> 11) *
            0x1p-53;
        data[i] = static_cast<T>(static_cast<float>((2.0 * unit - 1.0) * 1.7320508075688772));
      }
    });
  for (std::thread& thread : pool) thread.join();
}

// `budget` is kMaxError for float outputs; a half-width output adds its own rounding (the
// reference is evaluated on the same rounded inputs, so that is the only other difference).
void report_error(benchmark::State& state, double error, double budget = kMaxError) {
  state.counters["max_err_out"] = error;
  if (!(error <= budget)) {
    error_budget_exceeded = true;
    state.SkipWithError(
        ("sampled-row error " + std::to_string(error) + " exceeds " + std::to_string(budget))
            .c_str());
  }
}

// ---------------------------------------------------------------------------------------------

// b = a over `count` floats, each core copying its share (memcpy: streaming stores for arrays
// this large, so the copy moves 2 x bytes: one read, one write).
void copy_on_every_core(const float* a, float* b, std::size_t count) {
  const int workers = threads();
  std::vector<std::thread> pool;
  for (int t = 0; t < workers; ++t)
    pool.emplace_back([=] {
      const std::size_t begin = count * t / workers, end = count * (t + 1) / workers;
      std::memcpy(b + begin, a + begin, (end - begin) * sizeof(float));
    });
  for (std::thread& thread : pool) thread.join();
}

// The sum of `count` floats, each core reading its share in order: the bandwidth of a pure read,
// which is what a decode step does (it writes next to nothing). 16 partial sums, so the loop is
// two vector adds per 64 bytes and the loads, not the adds, set its pace.
double read_on_every_core(const float* a, std::size_t count) {
  const int workers = threads();
  std::vector<float> sums(static_cast<std::size_t>(workers));
  std::vector<std::thread> pool;
  for (int t = 0; t < workers; ++t)
    pool.emplace_back([=, &sums] {
      const std::size_t begin = count * t / workers / 16 * 16,
                        end = t + 1 == workers ? count : count * (t + 1) / workers / 16 * 16;
      float partial[16] = {};
      for (std::size_t i = begin; i + 16 <= end; i += 16)
        for (int j = 0; j < 16; ++j) partial[j] += a[i + static_cast<std::size_t>(j)];
      float sum = 0;
      for (float value : partial) sum += value;
      sums[static_cast<std::size_t>(t)] = sum;
    });
  for (std::thread& thread : pool) thread.join();
  double total = 0;
  for (float value : sums) total += value;
  return total;
}

void BM_StreamCopy(benchmark::State& state) {
  const std::size_t count = std::size_t(1) << 28;  // 1 GiB of float per array
  std::vector<float> a(count), b(count);
  fill(a.data(), 0, count, 1);
  fill(b.data(), 0, count, 2);
  for (auto _ : state) {
    copy_on_every_core(a.data(), b.data(), count);
    benchmark::DoNotOptimize(b.data());
    benchmark::ClobberMemory();
  }
  const double bytes = 2.0 * static_cast<double>(count * sizeof(float));  // read + write
  state.counters["bytes_per_second"] =
      benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = threads();
}

void BM_StreamRead(benchmark::State& state) {
  const std::size_t count = std::size_t(1) << 28;  // 1 GiB of float
  std::vector<float> a(count);
  fill(a.data(), 0, count, 1);
  for (auto _ : state) benchmark::DoNotOptimize(read_on_every_core(a.data(), count));
  state.counters["bytes_per_second"] = benchmark::Counter(
      static_cast<double>(count * sizeof(float)), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = threads();
}

// The same copy measured beside one decode row (after its set-up, right before its timed loop):
// the median rate of 5 copies of the same 1 GiB arrays as Stream/copy. On a shared guest the
// copy drifted between 27 and 49 GB/s within half an hour (docs/performance.md "Inference"), so
// a share against the Stream/copy row, measured minutes earlier, divides by another minute's
// machine; this one pairs each step with the bandwidth of its own minute. Not smaller arrays:
// glibc's memcpy takes another path below about 384 MiB per thread and ran at 22 GB/s against
// 28-40 for 1 GiB on the Zen 3 guest, which would flatter every share.
double adjacent_copy_bytes_per_second() {
  constexpr std::size_t count = std::size_t(1) << 28;
  static std::vector<float> a, b;  // once per process: 2 GiB
  if (a.empty()) {
    a.resize(count);
    b.resize(count);
    fill(a.data(), 0, count, 1);
    fill(b.data(), 0, count, 2);
  }
  double rates[5];
  for (double& rate : rates) {
    const auto start = std::chrono::steady_clock::now();
    copy_on_every_core(a.data(), b.data(), count);
    const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
    rate = 2.0 * static_cast<double>(count * sizeof(float)) / elapsed.count();
  }
  benchmark::DoNotOptimize(b.data());
  std::sort(std::begin(rates), std::end(rates));
  return rates[2];
}

// Counters every decode row reports: tokens/s, the K/V bytes a step reads, per second, and as a
// share of the copy measured beside the row (`adjacent_copy`) and of the Stream/copy row.
void report_decode(benchmark::State& state, double bytes, std::int64_t batch,
                   double adjacent_copy) {
  state.counters["tokens_per_second"] =
      benchmark::Counter(static_cast<double>(batch), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["kv_bytes_per_step"] = bytes;
  state.counters["kv_bytes_per_second"] =
      benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["stream_bytes_per_second"] = stream_bytes_per_second;
  state.counters["copy_bytes_per_second"] = adjacent_copy;
  state.counters["share_of_copy"] =
      benchmark::Counter(bytes / adjacent_copy, benchmark::Counter::kIsIterationInvariantRate);
}

// The unique K/V bytes a decode step at row x reads: per (element, kv head, branch), the keys
// of the block any query head of the group attends (the heads that attend share one offset).
double decode_kv_bytes(const Config& config, const Shape& shape, std::int64_t x,
                       std::size_t element_bytes) {
  const da::Pattern pattern(config, shape);
  const std::int64_t group = shape.num_heads / shape.num_kv_heads;
  double keys = 0;
  for (std::int64_t g = 0; g < shape.num_kv_heads; ++g)
    for (std::int64_t i = 0; i < pattern.num_branches(); ++i) {
      std::int64_t most = 0;
      for (std::int64_t h = g * group; h < (g + 1) * group; ++h)
        most = std::max(most, pattern.keys(i, h, x).count);
      keys += static_cast<double>(most);
    }
  return keys * 2.0 * static_cast<double>(shape.head_dim * element_bytes) *
         static_cast<double>(shape.batch);
}

// The decode step's reads without its arithmetic: the kernel's units (sequence, branch, piece of
// decode_key_piece keys), handed out by the same cpu::run_units, each reading its keys' K rows
// and then their V rows position by position, the attending heads' kv slices in order, into a
// sum (16 partial sums: the loads, not the adds, set the pace), asking for the rows
// `prefetch` bytes ahead as the kernel does (without that, the kernel outran this loop by up to
// 1.3x on the strided rows). What this access pattern draws from this machine's memory: the roof
// of a decode step, where Stream/read is the roof of a sequential read. `row_of(cache, b, y)` is
// position y's [Hkv, D] row of element b.
class DecodeReads {
 public:
  DecodeReads(const Config& config, std::int64_t B, std::int64_t H, std::int64_t Hkv,
              std::int64_t D, std::int64_t x, std::int64_t prefetch = 4096)
      : dim_(D), prefetch_bytes_(prefetch) {
    const auto branches = static_cast<std::int64_t>(config.segment_lengths.size());
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t i = 0; i < branches; ++i) {
        Unit unit{b, {}, {}};
        for (std::int64_t h = 0; h < H; ++h) {
          const da::Progression keys = da::cpu::detail::decode_keys(config, H, i, h, x, x + 1);
          if (keys.empty()) continue;
          unit.keys = keys;
          if (unit.kv_read.empty() || unit.kv_read.back() != h / (H / Hkv))
            unit.kv_read.push_back(h / (H / Hkv));
        }
        if (unit.kv_read.empty()) continue;
        const std::int64_t piece = da::cpu::decode_key_piece;
        for (std::int64_t p = 0; p * piece < unit.keys.count; ++p)
          units_.push_back(Unit{b, unit.keys.slice(p * piece, (p + 1) * piece), unit.kv_read});
      }
  }

  template <class RowOf>
  float read(const float* k, const float* v, const RowOf& row_of) const {
    std::atomic<std::uint32_t> sink{0};
    da::cpu::run_units(static_cast<std::int64_t>(units_.size()), threads(), [&](const auto& next) {
      float partial[16] = {};
      for (std::int64_t u = next(); u >= 0; u = next()) {
        const Unit& unit = units_[static_cast<std::size_t>(u)];
        const auto read = static_cast<std::int64_t>(unit.kv_read.size());
        const std::int64_t row_bytes = dim_ * std::int64_t(sizeof(float));
        const std::int64_t ahead =
            std::clamp<std::int64_t>(prefetch_bytes_ / (read * row_bytes), 1, 32);
        for (const float* cache : {k, v})
          for (std::int64_t j = 0; j < unit.keys.count; ++j) {
            if (j + ahead < unit.keys.count) {
              const float* later = row_of(cache, unit.b, unit.keys.at(j + ahead));
              for (std::int64_t c : unit.kv_read)
                da::cpu::kernels::prefetch_bytes(later + c * dim_, row_bytes);
            }
            const float* at = row_of(cache, unit.b, unit.keys.at(j));
            for (std::int64_t c : unit.kv_read)
              for (std::int64_t d = 0; d + 16 <= dim_; d += 16)
                for (int l = 0; l < 16; ++l) partial[l] += at[c * dim_ + d + l];
          }
      }
      float sum = 0;
      for (float value : partial) sum += value;
      std::uint32_t bits;
      std::memcpy(&bits, &sum, sizeof bits);
      sink.fetch_xor(bits, std::memory_order_relaxed);
    });
    const std::uint32_t bits = sink.load();
    float result;
    std::memcpy(&result, &bits, sizeof result);
    return result;
  }

 private:
  struct Unit {
    std::int64_t b;
    da::Progression keys;
    std::vector<std::int64_t> kv_read;
  };
  std::int64_t dim_;
  std::int64_t prefetch_bytes_;
  std::vector<Unit> units_;
};

// ReadsOnly: Decode_read/..., the rows the step reads, read alone (DecodeReads) with the same
// counters: the step's roof.
template <class T, bool ReadsOnly = false>
void BM_Decode(benchmark::State& state) {
  const std::int64_t kv_len = state.range(0), Hkv = state.range(1), D = state.range(2),
                     B = state.range(3);
  const std::int64_t H = 8;
  const Config config = longnet();
  const Shape shape{B, kv_len, H, Hkv, D};
  const std::int64_t x = kv_len - 1;
  const std::size_t row = static_cast<std::size_t>(Hkv * D),
                    element = static_cast<std::size_t>(kv_len) * row;
  Mapping<T> k(static_cast<std::size_t>(B) * element), v(static_cast<std::size_t>(B) * element);
  const std::int64_t touched = std::min<std::int64_t>(kv_len, 32768);  // the last max(w) rows
  for (std::int64_t b = 0; b < B; ++b) {
    const std::size_t lo =
        static_cast<std::size_t>(b) * element + static_cast<std::size_t>(kv_len - touched) * row;
    fill(k.data, lo, lo + static_cast<std::size_t>(touched) * row,
         10 + static_cast<std::uint64_t>(b));
    fill(v.data, lo, lo + static_cast<std::size_t>(touched) * row,
         100 + static_cast<std::uint64_t>(b));
  }
  if constexpr (ReadsOnly) {
    const DecodeReads reads(config, B, H, Hkv, D, x);
    auto row_of = [&](const float* cache, std::int64_t b, std::int64_t y) {
      return cache + static_cast<std::size_t>(b) * element + static_cast<std::size_t>(y) * row;
    };
    benchmark::DoNotOptimize(reads.read(k.data, v.data, row_of));
    const double adjacent_copy = adjacent_copy_bytes_per_second();
    for (auto _ : state) benchmark::DoNotOptimize(reads.read(k.data, v.data, row_of));
    report_decode(state, decode_kv_bytes(config, shape, x, sizeof(T)), B, adjacent_copy);
    state.counters["kv_len"] = static_cast<double>(kv_len);
    state.counters["worker_threads"] = threads();
    return;
  }
  std::vector<T> q(static_cast<std::size_t>(B * H * D)), out(q.size());
  std::vector<float> lse(static_cast<std::size_t>(B * H));
  fill(q.data(), 0, q.size(), 3);
  const View<const T> qv{q.data(), H * D, H * D, D};
  const View<const T> kv{k.data, kv_len * Hkv * D, Hkv * D, D},
      vv{v.data, kv_len * Hkv * D, Hkv * D, D};
  const View<T> ov{out.data(), H * D, H * D, D};
  da::cpu::DecodeWorkspace<T> workspace;
  const da::CpuOptions options{threads()};
  auto step = [&] {
    da::forward<T>(config, shape, da::QueryRange{x, 1}, {qv, kv, vv}, {ov, lse.data()}, options,
                   &workspace);
  };
  step();
  const double adjacent_copy = adjacent_copy_bytes_per_second();
  for (auto _ : state) {
    step();
    benchmark::DoNotOptimize(out.data());
  }
  // Check: every head of elements 0 and B - 1 against the fp64 definition (q read as row x).
  const da::Pattern pattern(config, shape);
  const View<const T> q_at_x{q.data(), H * D, 0, D};
  double error = 0;
  for (std::int64_t b : {std::int64_t(0), B - 1})
    for (std::int64_t h = 0; h < H; ++h) {
      const bench::RowResult expected =
          bench::reference_row<T>(pattern, shape, q_at_x, kv, vv, b, h, x);
      for (std::int64_t d = 0; d < D; ++d)
        error = std::max(
            error,
            std::abs(static_cast<double>(out[static_cast<std::size_t>((b * H + h) * D + d)]) -
                     expected.out[static_cast<std::size_t>(d)]));
    }
  // |O| <= max |v| = sqrt 3 < 2: rounding O to T costs at most half an ulp of [1, 2).
  const double rounding =
      std::is_same_v<T, float> ? 0.0 : 0.5 * static_cast<double>(Eigen::NumTraits<T>::epsilon());
  report_error(state, error, kMaxError + rounding);
  report_decode(state, decode_kv_bytes(config, shape, x, sizeof(T)), B, adjacent_copy);
  state.counters["kv_len"] = static_cast<double>(kv_len);
  state.counters["worker_threads"] = threads();
}

// The same step with K/V in pages (form 3, PagedKeyValues) of `page_size` positions, the page
// table a shuffled permutation of the pool (what an engine's allocator leaves after a while), so
// consecutive pages of a sequence are anywhere in the pool. The pool is mapped like the
// contiguous caches and only the pages holding the last max(w) positions are written. Checked
// like Decode/... (elements 0 and B - 1, every head, against the fp64 definition).
// ReadsOnly: Decode_paged_read/..., the step's rows read alone through the same table
// (DecodeReads), the paged step's roof.
template <class T, bool ReadsOnly = false>
void BM_DecodePaged(benchmark::State& state) {
  const std::int64_t kv_len = state.range(0), Hkv = state.range(1), D = state.range(2),
                     B = state.range(3), page_size = state.range(4);
  const std::int64_t H = 8;
  const Config config = longnet();
  const Shape shape{B, kv_len, H, Hkv, D};
  const std::int64_t x = kv_len - 1;
  const std::size_t row = static_cast<std::size_t>(Hkv * D);
  const std::int64_t pages_per_sequence = (kv_len + page_size - 1) / page_size;
  const std::int64_t num_pages = B * pages_per_sequence;
  std::vector<std::int32_t> table(static_cast<std::size_t>(num_pages));
  for (std::size_t p = 0; p < table.size(); ++p) table[p] = static_cast<std::int32_t>(p);
  std::shuffle(table.begin(), table.end(), std::mt19937_64(static_cast<std::uint64_t>(page_size)));
  const std::size_t page_elements = static_cast<std::size_t>(page_size) * row;
  Mapping<T> k(static_cast<std::size_t>(num_pages) * page_elements),
      v(static_cast<std::size_t>(num_pages) * page_elements);
  const std::int64_t touched = std::min<std::int64_t>(kv_len, 32768);  // the last max(w) rows
  const std::int64_t first_page = (kv_len - touched) / page_size;
  // Element b's touched rows, contiguous at their positions (seeded as in BM_Decode).
  auto element = [&](std::int64_t b, Mapping<T>& ek, Mapping<T>& ev) {
    const std::size_t lo = static_cast<std::size_t>(first_page * page_size) * row;
    fill(ek.data, lo, static_cast<std::size_t>(kv_len) * row, 10 + static_cast<std::uint64_t>(b));
    fill(ev.data, lo, static_cast<std::size_t>(kv_len) * row, 100 + static_cast<std::uint64_t>(b));
  };
  for (std::int64_t b = 0; b < B; ++b) {
    Mapping<T> ek(static_cast<std::size_t>(kv_len) * row),
        ev(static_cast<std::size_t>(kv_len) * row);
    element(b, ek, ev);
    for (std::int64_t j = first_page; j < pages_per_sequence; ++j) {
      const std::size_t page =
          static_cast<std::size_t>(table[static_cast<std::size_t>(b * pages_per_sequence + j)]);
      const std::size_t from = static_cast<std::size_t>(j * page_size) * row;
      const std::size_t count =
          static_cast<std::size_t>(std::min(page_size, kv_len - j * page_size)) * row;
      std::memcpy(k.data + page * page_elements, ek.data + from, count * sizeof(T));
      std::memcpy(v.data + page * page_elements, ev.data + from, count * sizeof(T));
    }
  }
  if constexpr (ReadsOnly) {
    const DecodeReads reads(config, B, H, Hkv, D, x);
    auto row_of = [&](const float* cache, std::int64_t b, std::int64_t y) {
      const auto page = static_cast<std::size_t>(
          table[static_cast<std::size_t>(b * pages_per_sequence + y / page_size)]);
      return cache + page * page_elements + static_cast<std::size_t>(y % page_size) * row;
    };
    benchmark::DoNotOptimize(reads.read(k.data, v.data, row_of));
    const double adjacent_copy = adjacent_copy_bytes_per_second();
    for (auto _ : state) benchmark::DoNotOptimize(reads.read(k.data, v.data, row_of));
    report_decode(state, decode_kv_bytes(config, shape, x, sizeof(T)), B, adjacent_copy);
    state.counters["kv_len"] = static_cast<double>(kv_len);
    state.counters["page_size"] = static_cast<double>(page_size);
    state.counters["worker_threads"] = threads();
    return;
  }
  std::vector<T> q(static_cast<std::size_t>(B * H * D)), out(q.size());
  std::vector<float> lse(static_cast<std::size_t>(B * H));
  fill(q.data(), 0, q.size(), 3);
  std::vector<std::int64_t> q_offsets(static_cast<std::size_t>(B + 1)),
      kv_lengths(static_cast<std::size_t>(B), kv_len);
  for (std::int64_t b = 0; b <= B; ++b) q_offsets[static_cast<std::size_t>(b)] = b;
  const da::Sequences sequences{B, q_offsets.data(), nullptr, kv_lengths.data(), nullptr};
  const da::PagedKeyValues<T> paged{
      k.data,  v.data, num_pages,    page_size,         static_cast<std::int64_t>(page_elements),
      Hkv * D, D,      table.data(), pages_per_sequence};
  da::cpu::DecodeWorkspace<T> workspace;
  const da::CpuOptions options{threads()};
  auto step = [&] {
    da::forward<T>(config, da::HeadShape{H, Hkv, D}, sequences,
                   View<const T>{q.data(), 0, H * D, D}, paged,
                   {View<T>{out.data(), 0, H * D, D}, lse.data()}, options, &workspace);
  };
  step();
  const double adjacent_copy = adjacent_copy_bytes_per_second();
  for (auto _ : state) {
    step();
    benchmark::DoNotOptimize(out.data());
  }
  const da::Pattern pattern(config, shape);
  double error = 0;
  for (std::int64_t b : {std::int64_t(0), B - 1}) {
    Mapping<T> ek(static_cast<std::size_t>(kv_len) * row),
        ev(static_cast<std::size_t>(kv_len) * row);
    element(b, ek, ev);
    const View<const T> q_row{q.data() + b * H * D, 0, 0, D};
    const View<const T> kv{ek.data, 0, Hkv * D, D}, vv{ev.data, 0, Hkv * D, D};
    for (std::int64_t h = 0; h < H; ++h) {
      const bench::RowResult expected =
          bench::reference_row<T>(pattern, shape, q_row, kv, vv, 0, h, x);
      for (std::int64_t d = 0; d < D; ++d)
        error = std::max(
            error,
            std::abs(static_cast<double>(out[static_cast<std::size_t>((b * H + h) * D + d)]) -
                     expected.out[static_cast<std::size_t>(d)]));
    }
  }
  report_error(state, error);
  report_decode(state, decode_kv_bytes(config, shape, x, sizeof(T)), B, adjacent_copy);
  state.counters["kv_len"] = static_cast<double>(kv_len);
  state.counters["page_size"] = static_cast<double>(page_size);
  state.counters["worker_threads"] = threads();
}

// Useful flops of rows [x0, x1) (exact: the keys each (head, row, branch) attends).
double useful_flops(const Config& config, const Shape& shape, std::int64_t x0, std::int64_t x1) {
  const da::Pattern pattern(config, shape);
  double pairs = 0;
  for (std::int64_t h = 0; h < shape.num_heads; ++h)
    for (std::int64_t x = x0; x < x1; ++x)
      for (std::int64_t i = 0; i < pattern.num_branches(); ++i)
        pairs += static_cast<double>(pattern.keys(i, h, x).count);
  return 4.0 * static_cast<double>(shape.head_dim) * pairs * static_cast<double>(shape.batch);
}

struct PrefillData {
  static constexpr std::int64_t N = 65536, H = 8, D = 64, chunk = 2048;
  std::vector<float> q, k, v;
  PrefillData() : q(static_cast<std::size_t>(N * H * D)), k(q.size()), v(q.size()) {
    fill(q.data(), 0, q.size(), 20);
    fill(k.data(), 0, k.size(), 21);
    fill(v.data(), 0, v.size(), 22);
  }
};
PrefillData& prefill_data() {
  static PrefillData data;
  return data;
}

double sampled_rows_error(const Config& config, const Shape& shape, View<const float> q,
                          View<const float> k, View<const float> v, const float* out,
                          std::int64_t out_seq, std::int64_t x0, std::int64_t x1) {
  const da::Pattern pattern(config, shape);
  double error = 0;
  for (std::int64_t x : {x0, x0 + 1, (x0 + x1) / 2, x1 - 1})
    for (std::int64_t h : {std::int64_t(0), shape.num_heads - 1}) {
      const bench::RowResult expected =
          bench::reference_row<float>(pattern, shape, q, k, v, 0, h, x);
      for (std::int64_t d = 0; d < shape.head_dim; ++d)
        error = std::max(
            error, std::abs(static_cast<double>(out[(x - x0) * out_seq + h * shape.head_dim + d]) -
                            expected.out[static_cast<std::size_t>(d)]));
    }
  return error;
}

void BM_PrefillChunk(benchmark::State& state) {
  using P = PrefillData;
  PrefillData& data = prefill_data();
  const Config config = longnet();
  const Shape shape{1, P::N, P::H, P::H, P::D};
  const std::int64_t begin = P::N - P::chunk;
  const View<const float> q_all{data.q.data(), 0, P::H * P::D, P::D};
  const View<const float> q_rows{data.q.data() + begin * P::H * P::D, 0, P::H * P::D, P::D};
  const View<const float> k{data.k.data(), 0, P::H * P::D, P::D},
      v{data.v.data(), 0, P::H * P::D, P::D};
  std::vector<float> out(static_cast<std::size_t>(P::chunk * P::H * P::D)),
      lse(static_cast<std::size_t>(P::chunk * P::H));
  for (auto _ : state) {
    da::forward<float>(config, shape, da::QueryRange{begin, P::chunk}, {q_rows, k, v},
                       {View<float>{out.data(), 0, P::H * P::D, P::D}, lse.data()},
                       da::CpuOptions{threads()});
    benchmark::DoNotOptimize(out.data());
  }
  report_error(
      state, sampled_rows_error(config, shape, q_all, k, v, out.data(), P::H * P::D, begin, P::N));
  const double flops = useful_flops(config, shape, begin, P::N);
  state.counters["useful_GFLOPs"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["useful_flops"] = flops;
  state.counters["worker_threads"] = threads();
}

void BM_PrefillForward(benchmark::State& state) {
  using P = PrefillData;
  PrefillData& data = prefill_data();
  const Config config = longnet();
  const Shape shape{1, P::N, P::H, P::H, P::D};
  const View<const float> q{data.q.data(), 0, P::H * P::D, P::D};
  const View<const float> k{data.k.data(), 0, P::H * P::D, P::D},
      v{data.v.data(), 0, P::H * P::D, P::D};
  std::vector<float> out(data.q.size()), lse(static_cast<std::size_t>(P::N * P::H));
  for (auto _ : state) {
    da::forward<float>(config, shape, {q, k, v},
                       {View<float>{out.data(), 0, P::H * P::D, P::D}, lse.data()},
                       da::CpuOptions{threads()});
    benchmark::DoNotOptimize(out.data());
  }
  const std::int64_t begin = P::N - P::chunk;
  report_error(state, sampled_rows_error(config, shape, q, k, v, out.data() + begin * P::H * P::D,
                                         P::H * P::D, begin, P::N));
  const double flops = da::Pattern(config, shape).useful_flops();
  state.counters["useful_GFLOPs"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["useful_flops"] = flops;
  state.counters["worker_threads"] = threads();
}

// d_q of query row x, head h, in fp64 from the definition (softmax mixing: one softmax over the
// multiset of the branches' keys): scale * sum_y P_y (dO·v_y - dO·O) k_y.
std::vector<double> reference_d_q_row(const da::Pattern& pattern, const Shape& shape,
                                      View<const float> q, View<const float> k, View<const float> v,
                                      const float* d_out, std::int64_t h, std::int64_t x) {
  const double scale = da::resolved_scale(pattern.config(), shape);
  const std::int64_t dim = shape.head_dim, g = pattern.kv_head(h);
  auto row = [&](const View<const float>& view, std::int64_t y, std::int64_t head) {
    return view.data + y * view.seq_stride + head * view.head_stride;
  };
  std::vector<std::int64_t> keys;
  for (std::int64_t i = 0; i < pattern.num_branches(); ++i) {
    const da::Progression p = pattern.keys(i, h, x);
    for (std::int64_t j = 0; j < p.count; ++j) keys.push_back(p.at(j));
  }
  std::vector<double> s(keys.size()), dv(keys.size());
  double top = -1e300, sum = 0;
  for (std::size_t j = 0; j < keys.size(); ++j) {
    double dot = 0, dpv = 0;
    for (std::int64_t d = 0; d < dim; ++d) {
      dot += static_cast<double>(row(q, x, h)[d]) * row(k, keys[j], g)[d];
      dpv += static_cast<double>(d_out[d]) * row(v, keys[j], g)[d];
    }
    s[j] = scale * dot;
    dv[j] = dpv;
    top = std::max(top, s[j]);
  }
  for (double& value : s) sum += (value = std::exp(value - top));
  double delta = 0;
  for (std::size_t j = 0; j < keys.size(); ++j) delta += s[j] / sum * dv[j];
  std::vector<double> d_q(static_cast<std::size_t>(dim), 0.0);
  for (std::size_t j = 0; j < keys.size(); ++j)
    for (std::int64_t d = 0; d < dim; ++d)
      d_q[static_cast<std::size_t>(d)] +=
          scale * s[j] / sum * (dv[j] - delta) * row(k, keys[j], g)[d];
  return d_q;
}

// The backward of the same chunk (QueryRange): d_q of its rows, d_k and d_v of all 64k rows.
// Its useful work counts the chunk's pairs at 10 * head_dim flops each (the fused path's five
// products); checked on sampled d_q rows against the definition.
void BM_PrefillChunkBackward(benchmark::State& state) {
  using P = PrefillData;
  PrefillData& data = prefill_data();
  const Config config = longnet();
  const Shape shape{1, P::N, P::H, P::H, P::D};
  const std::int64_t begin = P::N - P::chunk, row = P::H * P::D;
  const View<const float> q_all{data.q.data(), 0, row, P::D};
  const View<const float> q_rows{data.q.data() + begin * row, 0, row, P::D};
  const View<const float> k{data.k.data(), 0, row, P::D}, v{data.v.data(), 0, row, P::D};
  std::vector<float> out(static_cast<std::size_t>(P::chunk * row)),
      lse(static_cast<std::size_t>(P::chunk * P::H)), d_out(out.size()), d_q(out.size()),
      d_k(data.k.size()), d_v(data.v.size());
  fill(d_out.data(), 0, d_out.size(), 23);
  da::forward<float>(config, shape, da::QueryRange{begin, P::chunk}, {q_rows, k, v},
                     {View<float>{out.data(), 0, row, P::D}, lse.data()},
                     da::CpuOptions{threads()});
  for (auto _ : state) {
    da::backward<float>(
        config, shape, da::QueryRange{begin, P::chunk}, {q_rows, k, v},
        {View<const float>{out.data(), 0, row, P::D}, lse.data()},
        View<const float>{d_out.data(), 0, row, P::D},
        {View<float>{d_q.data(), 0, row, P::D}, View<float>{d_k.data(), 0, row, P::D},
         View<float>{d_v.data(), 0, row, P::D}},
        da::CpuOptions{threads()});
    benchmark::DoNotOptimize(d_q.data());
    benchmark::DoNotOptimize(d_k.data());
  }
  const da::Pattern pattern(config, shape);
  double error = 0;
  for (std::int64_t x : {begin, begin + 1, begin + P::chunk / 2, P::N - 1})
    for (std::int64_t h : {std::int64_t(0), P::H - 1}) {
      const std::vector<double> expected = reference_d_q_row(
          pattern, shape, q_all, k, v, d_out.data() + (x - begin) * row + h * P::D, h, x);
      for (std::int64_t d = 0; d < P::D; ++d)
        error = std::max(error,
                         std::abs(d_q[static_cast<std::size_t>((x - begin) * row + h * P::D + d)] -
                                  expected[static_cast<std::size_t>(d)]));
    }
  report_error(state, error);
  const double flops = 2.5 * useful_flops(config, shape, begin, P::N);
  state.counters["useful_GFLOPs"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["useful_flops"] = flops;
  state.counters["worker_threads"] = threads();
}

// --- Varlen against padded ---------------------------------------------------------------------

struct VarlenData {
  static constexpr std::int64_t B = 16, H = 8, D = 64;
  std::vector<std::int64_t> lengths, offsets;
  std::int64_t max_len = 0, total = 0;
  std::vector<float> q, k, v, pq, pk, pv;  // packed, padded
  VarlenData() {
    std::mt19937_64 rng(7);
    std::lognormal_distribution<double> draw(std::log(1024.0), 1.0);
    offsets.push_back(0);
    for (std::int64_t b = 0; b < B; ++b) {
      const auto n = static_cast<std::int64_t>(std::clamp(std::round(draw(rng)), 16.0, 8192.0));
      lengths.push_back(n);
      offsets.push_back(offsets.back() + n);
      max_len = std::max(max_len, n);
    }
    total = offsets.back();
    const std::size_t row = static_cast<std::size_t>(H * D);
    q.resize(static_cast<std::size_t>(total) * row);
    k.resize(q.size());
    v.resize(q.size());
    fill(q.data(), 0, q.size(), 30);
    fill(k.data(), 0, k.size(), 31);
    fill(v.data(), 0, v.size(), 32);
    pq.assign(static_cast<std::size_t>(B * max_len) * row, 0.0f);
    pk.assign(pq.size(), 0.0f);
    pv.assign(pq.size(), 0.0f);
    for (std::int64_t b = 0; b < B; ++b) {
      const std::size_t from = static_cast<std::size_t>(offsets[static_cast<std::size_t>(b)]) * row,
                        to = static_cast<std::size_t>(b * max_len) * row,
                        n = static_cast<std::size_t>(lengths[static_cast<std::size_t>(b)]) * row;
      std::copy_n(q.begin() + from, n, pq.begin() + to);
      std::copy_n(k.begin() + from, n, pk.begin() + to);
      std::copy_n(v.begin() + from, n, pv.begin() + to);
    }
  }
};
VarlenData& varlen_data() {
  static VarlenData data;
  return data;
}

// 0: packed (Sequences), 1: padded with ValidLengths, 2: padded as a dense forward.
void BM_Varlen(benchmark::State& state) {
  using V = VarlenData;
  VarlenData& data = varlen_data();
  const int layout = static_cast<int>(state.range(0));
  const Config config = longnet();
  const std::int64_t row = V::H * V::D;
  std::vector<float> out(layout == 0 ? data.q.size() : data.pq.size());
  std::vector<float> lse(static_cast<std::size_t>(V::H) *
                         (layout == 0 ? static_cast<std::size_t>(data.total)
                                      : static_cast<std::size_t>(V::B * data.max_len)));
  const da::Sequences sequences{V::B, data.offsets.data(), data.offsets.data(), nullptr, nullptr};
  const Shape padded{V::B, data.max_len, V::H, V::H, V::D};
  const std::int64_t bs = data.max_len * row;
  auto run = [&] {
    if (layout == 0) {
      da::forward<float>(config, da::HeadShape{V::H, V::H, V::D}, sequences,
                         {View<const float>{data.q.data(), 0, row, V::D},
                          View<const float>{data.k.data(), 0, row, V::D},
                          View<const float>{data.v.data(), 0, row, V::D}},
                         {View<float>{out.data(), 0, row, V::D}, lse.data()},
                         da::CpuOptions{threads()});
    } else {
      const da::Inputs<float> in{View<const float>{data.pq.data(), bs, row, V::D},
                                 View<const float>{data.pk.data(), bs, row, V::D},
                                 View<const float>{data.pv.data(), bs, row, V::D}};
      const da::Outputs<float> outs{View<float>{out.data(), bs, row, V::D}, lse.data()};
      if (layout == 1)
        da::forward<float>(config, padded, da::ValidLengths{data.lengths.data()}, in, outs,
                           da::CpuOptions{threads()});
      else
        da::forward<float>(config, padded, in, outs, da::CpuOptions{threads()});
    }
  };
  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(out.data());
  }
  // Check the last rows of the longest and the shortest sequence against the definition.
  double error = 0;
  for (std::int64_t b = 0; b < V::B; ++b) {
    const std::int64_t n = data.lengths[static_cast<std::size_t>(b)],
                       o = data.offsets[static_cast<std::size_t>(b)];
    if (n != data.max_len && b != 0) continue;
    const Shape one{1, n, V::H, V::H, V::D};
    const View<const float> q{data.q.data() + o * row, 0, row, V::D},
        k{data.k.data() + o * row, 0, row, V::D}, v{data.v.data() + o * row, 0, row, V::D};
    const float* got = layout == 0 ? out.data() + o * row : out.data() + b * bs;
    error = std::max(error,
                     sampled_rows_error(config, one, q, k, v, got + (n - 2) * row, row, n - 2, n));
  }
  report_error(state, error);
  state.counters["valid_tokens_per_second"] = benchmark::Counter(
      static_cast<double>(data.total), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["valid_tokens"] = static_cast<double>(data.total);
  state.counters["padded_tokens"] = static_cast<double>(V::B * data.max_len);
  state.counters["worker_threads"] = threads();
}

void register_benchmarks() {
  benchmark::RegisterBenchmark("Stream/copy", BM_StreamCopy)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->MinTime(0.5);
  benchmark::RegisterBenchmark("Stream/read", BM_StreamRead)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->MinTime(0.5);
  bench::register_fma_peaks(threads(), 1);
  auto* decode = benchmark::RegisterBenchmark("Decode", BM_Decode<float>);
  auto* decode_bf16 = benchmark::RegisterBenchmark("Decode_bf16", BM_Decode<Eigen::bfloat16>);
  auto* decode_half = benchmark::RegisterBenchmark("Decode_half", BM_Decode<Eigen::half>);
  for (auto* b : {decode, decode_bf16, decode_half})
    b->ArgNames({"kv_len", "Hkv", "D", "batch"})
        ->UseRealTime()
        ->Unit(benchmark::kMicrosecond)
        ->MinTime(0.3);
  for (std::int64_t batch : {1, 16})
    for (std::int64_t D : {64, 128})
      for (std::int64_t Hkv : {8, 2})
        for (std::int64_t kv_len : {16384, 65536, 262144, 1048576}) {
          decode->Args({kv_len, Hkv, D, batch});
          if (Hkv == 8) {  // the half-width rows: the bytes, not the grouping, are the question
            decode_bf16->Args({kv_len, Hkv, D, batch});
            decode_half->Args({kv_len, Hkv, D, batch});
          }
        }
  auto* decode_read = benchmark::RegisterBenchmark("Decode_read", BM_Decode<float, true>);
  decode_read->ArgNames({"kv_len", "Hkv", "D", "batch"})
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond)
      ->MinTime(0.3);
  for (std::int64_t D : {64, 128})
    for (std::int64_t Hkv : {8, 2}) decode_read->Args({1048576, Hkv, D, 16});
  auto* decode_paged = benchmark::RegisterBenchmark("Decode_paged", BM_DecodePaged<float>);
  decode_paged->ArgNames({"kv_len", "Hkv", "D", "batch", "page_size"})
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond)
      ->MinTime(0.3);
  for (std::int64_t D : {64, 128})
    for (std::int64_t Hkv : {8, 2})
      for (std::int64_t page_size : {16, 256}) decode_paged->Args({1048576, Hkv, D, 16, page_size});
  auto* decode_paged_read =
      benchmark::RegisterBenchmark("Decode_paged_read", BM_DecodePaged<float, true>);
  decode_paged_read->ArgNames({"kv_len", "Hkv", "D", "batch", "page_size"})
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond)
      ->MinTime(0.3);
  for (std::int64_t Hkv : {8, 2})
    for (std::int64_t page_size : {16, 256})
      decode_paged_read->Args({1048576, Hkv, 64, 16, page_size});
  benchmark::RegisterBenchmark("Prefill/chunk_2k_at_64k", BM_PrefillChunk)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->MinTime(0.5);
  benchmark::RegisterBenchmark("Prefill/chunk_backward_2k_at_64k", BM_PrefillChunkBackward)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->MinTime(0.5);
  benchmark::RegisterBenchmark("Prefill/forward_64k", BM_PrefillForward)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->Iterations(1);
  benchmark::RegisterBenchmark("Varlen", BM_Varlen)
      ->ArgName("layout")
      ->Arg(0)
      ->Arg(1)
      ->Arg(2)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->MinTime(0.5);
}

// Runs Stream/copy first (alone) so that the decode runs can report their share of it.
class StreamFirst : public benchmark::BenchmarkReporter {
 public:
  explicit StreamFirst(benchmark::BenchmarkReporter* inner) : inner_(inner) {}
  bool ReportContext(const Context& context) override { return inner_->ReportContext(context); }
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs)
      if (run.benchmark_name().rfind("Stream/copy", 0) == 0) {
        const auto it = run.counters.find("bytes_per_second");
        if (it != run.counters.end()) stream_bytes_per_second = it->second.value;
      }
    inner_->ReportRuns(runs);
  }
  void Finalize() override { inner_->Finalize(); }

 private:
  benchmark::BenchmarkReporter* inner_;
};

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  benchmark::AddCustomContext("implementation", "dilated_attention inference forms (CPU)");
  benchmark::AddCustomContext("config", "LongNet w = 2048..32768, r = 1..16, causal, H = 8");
  benchmark::AddCustomContext("kernel_isa", to_string(da::cpu::resolve_isa(da::CpuIsa::automatic)));
  benchmark::AddCustomContext("kernel_threads", std::to_string(threads()));
  benchmark::AddCustomContext(
      "kv_cache_pages", kv_huge_pages() ? "transparent huge pages (madvise)" : "4 KiB (default)");
#if defined(NDEBUG)
  benchmark::AddCustomContext("assertions", "off (NDEBUG)");
#else
  benchmark::AddCustomContext("assertions",
                              "on: not a release build, figures are not representative");
#endif
  register_benchmarks();
  benchmark::ConsoleReporter console;
  StreamFirst reporter(&console);
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  if (error_budget_exceeded) {
    std::fprintf(stderr,
                 "cpu_inference_benchmark: FAILED: a run's sampled-row error exceeded 1e-4\n");
    return 1;
  }
  return 0;
}
