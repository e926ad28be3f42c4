#pragma once
// How the CPU kernel uses threads: how many (CpuOptions, the DILATED_ATTENTION_NUM_THREADS
// environment variable, or every hardware thread), and a runner that hands independent work
// units to std::threads. std::thread rather than OpenMP so that nothing extra is needed by a
// consumer and ThreadSanitizer sees every synchronisation.
//
// Determinism does not depend on the schedule: a unit's result is computed by one thread from
// the inputs alone, in a fixed order, so which thread takes which unit (first come, first
// served, for load balance) changes timing only, never a bit of the output.

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace dilated_attention {

// Options of the CPU kernel. num_threads = 0 selects the DILATED_ATTENTION_NUM_THREADS
// environment variable when it is set, else std::thread::hardware_concurrency().
struct CpuOptions {
  int num_threads = 0;
};

namespace cpu {

// The thread count an entry point will use; throws std::invalid_argument on a negative count
// or a malformed environment variable (before any output is written).
inline int resolve_num_threads(const CpuOptions& options) {
  if (options.num_threads < 0)
    throw std::invalid_argument(
        "dilated_attention: CpuOptions.num_threads = " + std::to_string(options.num_threads) +
        ": must be positive, or 0 for the default");
  if (options.num_threads > 0) return options.num_threads;
  if (const char* text = std::getenv("DILATED_ATTENTION_NUM_THREADS"); text != nullptr && *text) {
    char* end = nullptr;
    errno = 0;
    const long value = std::strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < 0 || value > 1 << 20)
      throw std::invalid_argument(
          std::string("dilated_attention: DILATED_ATTENTION_NUM_THREADS = '") + text +
          "': must be a non-negative integer (0 for every core)");
    if (value > 0) return static_cast<int>(value);
  }
  const unsigned hardware = std::thread::hardware_concurrency();
  return hardware > 0 ? static_cast<int>(hardware) : 1;
}

namespace detail {

// Eigen parallelises large products with OpenMP when the consumer compiles with -fopenmp; our
// threads already cover every core, so each of them asks OpenMP for a team of one while it
// works and restores the caller's setting after.
class SingleThreadedProducts {
 public:
#if defined(_OPENMP)
  SingleThreadedProducts() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~SingleThreadedProducts() { omp_set_num_threads(saved_); }

 private:
  int saved_;
#else
  SingleThreadedProducts() = default;
#endif
 public:
  SingleThreadedProducts(const SingleThreadedProducts&) = delete;
  SingleThreadedProducts& operator=(const SingleThreadedProducts&) = delete;
};

}  // namespace detail

// Runs worker(next) on `num_threads` threads (the caller's among them), where next() hands out
// the unit indices 0 .. num_units-1, each exactly once, and returns -1 when none is left. Each
// worker owns its scratch. The first exception a worker throws is rethrown here after every
// thread has joined.
template <class Worker>
void run_units(std::int64_t num_units, int num_threads, const Worker& worker) {
  if (num_units <= 0) return;
  const std::int64_t threads =
      std::max<std::int64_t>(1, std::min<std::int64_t>(num_threads, num_units));
  std::atomic<std::int64_t> counter{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto next = [&]() -> std::int64_t {
    if (failed.load(std::memory_order_relaxed)) return -1;
    const std::int64_t unit = counter.fetch_add(1, std::memory_order_relaxed);
    return unit < num_units ? unit : -1;
  };
  auto body = [&]() {
    try {
      const detail::SingleThreadedProducts single_threaded_products;
      static_cast<void>(single_threaded_products);
      worker(next);
    } catch (...) {
      const std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      failed.store(true, std::memory_order_relaxed);
    }
  };
  std::vector<std::thread> helpers;
  helpers.reserve(static_cast<std::size_t>(threads - 1));
  try {
    for (std::int64_t t = 1; t < threads; ++t) helpers.emplace_back(body);
  } catch (...) {
    // Could not start a thread: the ones running and this one still finish every unit.
  }
  body();
  for (std::thread& helper : helpers) helper.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace cpu
}  // namespace dilated_attention
