// The thread runner of the CPU kernel: every unit exactly once, whatever the thread count;
// a worker's exception reaches the caller; the thread count resolves as documented, and by
// default respects the affinity mask and the cgroup CPU quota (v2 cpu.max, v1 CFS quota).

#include <dilated_attention/cpu/threads.hpp>

#include <gtest/gtest.h>

#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
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
      while (now > seen && !most.compare_exchange_weak(seen, now)) {}
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

TEST(CpuThreads, QuotaInCpus) {
  using dilated_attention::cpu::detail::cpus_from_quota;
  EXPECT_EQ(cpus_from_quota(200000, 100000), 2);
  EXPECT_EQ(cpus_from_quota(150000, 100000), 2);  // a fraction rounds up
  EXPECT_EQ(cpus_from_quota(50000, 100000), 1);
  EXPECT_EQ(cpus_from_quota(-1, 100000), 0);  // unlimited
  EXPECT_EQ(cpus_from_quota(100000, 0), 0);
}

// A fake cgroup file system under a fresh temporary directory.
class FakeCgroup : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (std::filesystem::temp_directory_path() / "da_cgroup_XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    root_ = pattern;
  }
  void TearDown() override { std::filesystem::remove_all(root_); }
  void write(const std::string& relative, const std::string& text) const {
    const std::filesystem::path path = root_ / relative;
    std::filesystem::create_directories(path.parent_path());
    std::ofstream(path) << text;
  }
  int limit() const {
    return dilated_attention::cpu::detail::cgroup_cpu_limit((root_ / "fs").string(),
                                                            (root_ / "self").string());
  }
  std::filesystem::path root_;
};

TEST_F(FakeCgroup, V2CpuMaxOfTheProcessAndItsAncestors) {
  write("self", "0::/\n");
  write("fs/cpu.max", "max 100000\n");
  EXPECT_EQ(limit(), 0);
  write("fs/cpu.max", "250000 100000\n");
  EXPECT_EQ(limit(), 3);
  write("self", "0::/a/b\n");
  write("fs/cpu.max", "max 100000\n");
  write("fs/a/b/cpu.max", "max 100000\n");
  write("fs/a/cpu.max", "400000 100000\n");
  EXPECT_EQ(limit(), 4);  // the parent's quota binds its children
  write("fs/a/b/cpu.max", "100000 100000\n");
  EXPECT_EQ(limit(), 1);  // the tightest wins
}

TEST_F(FakeCgroup, V1CfsQuota) {
  write("self", "5:cpuacct,cpu:/job\n4:memory:/job\n");
  write("fs/cpuacct,cpu/job/cpu.cfs_quota_us", "300000\n");
  write("fs/cpuacct,cpu/job/cpu.cfs_period_us", "100000\n");
  EXPECT_EQ(limit(), 3);
  write("fs/cpuacct,cpu/job/cpu.cfs_quota_us", "-1\n");
  EXPECT_EQ(limit(), 0);
  write("fs/cpu/cpu.cfs_quota_us", "200000\n");  // a container sees its own group at the root
  write("fs/cpu/cpu.cfs_period_us", "100000\n");
  EXPECT_EQ(limit(), 2);
}

TEST_F(FakeCgroup, NoCgroupFilesMeanNoLimit) {
  EXPECT_EQ(limit(), 0);
  write("self", "garbage\n0::/x\n");
  write("fs/cpu.max", "not a number\n");
  EXPECT_EQ(limit(), 0);
}

TEST(CpuThreads, DefaultRespectsTheAffinityMask) {
  const int all = dilated_attention::cpu::default_num_threads();
  EXPECT_GE(all, 1);
  EXPECT_LE(all, static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  // A thread pinned to one CPU sees one CPU (sched_getaffinity(0) is per thread on Linux).
  int pinned = 0;
  std::thread([&] {
    cpu_set_t set;
    CPU_ZERO(&set);
    ASSERT_EQ(sched_getaffinity(0, sizeof(set), &set), 0);
    int first = 0;
    while (!CPU_ISSET(first, &set)) ++first;
    CPU_ZERO(&set);
    CPU_SET(first, &set);
    ASSERT_EQ(sched_setaffinity(0, sizeof(set), &set), 0);
    pinned = dilated_attention::cpu::default_num_threads();
  }).join();
  EXPECT_EQ(pinned, 1);
  ::unsetenv("DILATED_ATTENTION_NUM_THREADS");
  EXPECT_EQ(dilated_attention::cpu::resolve_num_threads(CpuOptions{}), all);
}

}  // namespace
