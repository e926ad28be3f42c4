// The thread runner of the CPU kernel: every unit exactly once, whatever the thread count;
// a worker's exception reaches the caller; the thread count resolves as documented.

#include <dilated_attention/cpu/threads.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <thread>
#include <vector>

namespace {

using dilated_attention::CpuOptions;
using dilated_attention::cpu::run_units;

TEST(CpuThreads, EveryUnitExactlyOnce) {
  for (int threads : {1, 2, 3, 8}) {
    std::vector<std::atomic<int>> hits(1000);
    run_units(1000, threads, [&](const auto& next) {
      for (std::int64_t unit = next(); unit >= 0; unit = next())
        hits[static_cast<std::size_t>(unit)]++;
    });
    for (const auto& hit : hits) ASSERT_EQ(hit.load(), 1) << threads << " threads";
  }
  run_units(0, 4, [](const auto& next) { EXPECT_LT(next(), 0); });
}

TEST(CpuThreads, WorkersRunConcurrently) {
  // Each unit waits (up to 10 s) until another unit is in flight beside it: with 4 threads that
  // happens at once; with one thread at a time it never would.
  std::atomic<int> in_flight{0}, most{0};
  run_units(8, 4, [&](const auto& next) {
    for (std::int64_t unit = next(); unit >= 0; unit = next()) {
      const int now = ++in_flight;
      int seen = most.load();
      while (now > seen && !most.compare_exchange_weak(seen, now)) {
      }
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (most.load() < 2 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      --in_flight;
    }
  });
  EXPECT_GE(most.load(), 2);
}

TEST(CpuThreads, WorkerExceptionReachesTheCaller) {
  std::atomic<int> done{0};
  EXPECT_THROW(run_units(100, 3,
                         [&](const auto& next) {
                           for (std::int64_t unit = next(); unit >= 0; unit = next()) {
                             if (unit == 17) throw std::runtime_error("unit 17");
                             done++;
                           }
                         }),
               std::runtime_error);
  EXPECT_LT(done.load(), 100);
}

TEST(CpuThreads, ExplicitCountWins) {
  EXPECT_EQ(dilated_attention::cpu::resolve_num_threads(CpuOptions{5}), 5);
  EXPECT_THROW(dilated_attention::cpu::resolve_num_threads(CpuOptions{-1}), std::invalid_argument);
}

}  // namespace
