#pragma once
// How the CPU kernel uses threads: how many (CpuOptions, the DILATED_ATTENTION_NUM_THREADS
// environment variable, or the CPUs this process may actually use: its affinity mask and its
// cgroup's CPU quota), and a runner that hands independent work units to std::threads.
// std::thread rather than OpenMP so that nothing extra is needed by a
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
#include <fstream>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__linux__)
#include <sched.h>
#endif

#include "kernels/isa.hpp"

namespace dilated_attention {

// Options of the CPU kernel. num_threads = 0 selects the DILATED_ATTENTION_NUM_THREADS
// environment variable when it is set, else default_num_threads(). isa = automatic selects the
// DILATED_ATTENTION_CPU_ISA environment variable when set, else the best the CPU runs
// (kernels/isa.hpp).
struct CpuOptions {
  int num_threads = 0;
  CpuIsa isa = CpuIsa::automatic;
};

namespace cpu {

namespace detail {

// CPUs from a CFS quota: ceil(quota / period), at least 1; 0 when unlimited (quota < 0) or
// malformed.
inline int cpus_from_quota(long long quota, long long period) {
  if (quota <= 0 || period <= 0) return 0;
  return static_cast<int>(std::max(1LL, (quota + period - 1) / period));
}

// The CPU limit a cgroup directory sets: cgroup v2 `cpu.max` ("max 100000" or "150000 100000"),
// else cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`; 0 when none.
inline int cgroup_directory_limit(const std::string& directory) {
  if (std::ifstream max_file(directory + "/cpu.max"); max_file) {
    std::string quota;
    long long period = 0;
    if (!(max_file >> quota >> period) || quota == "max") return 0;
    try {
      return cpus_from_quota(std::stoll(quota), period);
    } catch (const std::exception&) {
      return 0;
    }
  }
  std::ifstream quota_file(directory + "/cpu.cfs_quota_us"),
      period_file(directory + "/cpu.cfs_period_us");
  long long quota = 0, period = 0;
  if (quota_file >> quota && period_file >> period) return cpus_from_quota(quota, period);
  return 0;
}

// The tightest CPU quota on this process's cgroup and its ancestors, read from `root` (the
// cgroup file system) and `self` (the process's /proc/self/cgroup); 0 when none. A container
// usually mounts its own cgroup at the root, so the root itself is always checked too.
inline int cgroup_cpu_limit(const std::string& root = "/sys/fs/cgroup",
                            const std::string& self = "/proc/self/cgroup") {
  int limit = 0;
  auto tighten = [&](int cpus) {
    if (cpus > 0 && (limit == 0 || cpus < limit)) limit = cpus;
  };
  auto walk_up = [&](const std::string& base, std::string path) {
    for (;;) {
      tighten(cgroup_directory_limit(base + path));
      const std::size_t slash = path.find_last_of('/');
      if (path.empty() || slash == std::string::npos) break;
      path.erase(slash);
    }
  };
  std::ifstream lines(self);
  std::string line;
  while (std::getline(lines, line)) {  // "id:controllers:path"
    const std::size_t first = line.find(':'), second = line.find(':', first + 1);
    if (first == std::string::npos || second == std::string::npos) continue;
    const std::string controllers = line.substr(first + 1, second - first - 1);
    std::string path = line.substr(second + 1);
    if (path == "/") path.clear();
    if (controllers.empty()) {
      walk_up(root, path);  // v2 unified hierarchy
    } else if (("," + controllers + ",").find(",cpu,") != std::string::npos) {
      walk_up(root + "/cpu", path);  // v1 cpu controller
      walk_up(root + "/" + controllers, path);
    }
  }
  tighten(cgroup_directory_limit(root));
  tighten(cgroup_directory_limit(root + "/cpu"));
  return limit;
}

// CPUs in this process's affinity mask; 0 when unknown.
inline int affinity_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
#endif
  return 0;
}

}  // namespace detail

// The thread count when nothing asks for one: the CPUs this process may run on (affinity mask,
// else hardware_concurrency()), capped by its cgroup's CPU quota (a container given 2 CPUs of a
// 64-core host gets 2 threads, not 64 that the quota would throttle in turn).
inline int default_num_threads() {
  int cpus = detail::affinity_cpus();
  if (cpus <= 0) cpus = static_cast<int>(std::thread::hardware_concurrency());
  if (cpus <= 0) cpus = 1;
  const int quota = detail::cgroup_cpu_limit();
  return quota > 0 ? std::min(cpus, quota) : cpus;
}

// The thread count an entry point will use; throws std::invalid_argument on a negative count
// or a malformed environment variable (before any output is written).
inline int resolve_num_threads(const CpuOptions& options) {
  if (options.num_threads < 0)
    throw std::invalid_argument(
        "dilated_attention: options.num_threads = " + std::to_string(options.num_threads) +
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
  return default_num_threads();
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
