// The pattern cache: one entry per distinct key, hits on reuse, plans shared and immutable, the
// size bound enforced by LRU eviction, and safe concurrent use (also run under ThreadSanitizer).

#include <gtest/gtest.h>

#include <thread>
#include <vector>

#include "ring_support.hpp"

namespace da = dilated_attention;
namespace ring = dilated_attention::ring;

namespace {

bool same_plan(const ring::StepPlan& a, const ring::StepPlan& b) {
  if (a.send_peer != b.send_peer || a.recv_peer != b.recv_peer || a.send_rows != b.send_rows ||
      a.blocks.size() != b.blocks.size())
    return false;
  for (std::size_t j = 0; j < a.blocks.size(); ++j)
    if (a.blocks[j].queries != b.blocks[j].queries || a.blocks[j].keys != b.blocks[j].keys) return false;
  return true;
}

TEST(RingPatternCache, EveryKeyFieldMatters) {
  ring::PatternCache cache;
  const ring::StepKey base{24, 4, 1, 12, 2, 1, false, 1};
  std::vector<ring::StepKey> keys = {base};
  auto vary = [&](auto field, auto value) {
    ring::StepKey key = base;
    key.*field = value;
    keys.push_back(key);
  };
  vary(&ring::StepKey::seq_len, std::int64_t{48});
  vary(&ring::StepKey::num_ranks, std::int64_t{3});
  vary(&ring::StepKey::rank, std::int64_t{2});
  vary(&ring::StepKey::w, std::int64_t{16});
  vary(&ring::StepKey::r, std::int64_t{3});
  vary(&ring::StepKey::offset, std::int64_t{0});
  vary(&ring::StepKey::causal, true);
  vary(&ring::StepKey::step, std::int64_t{2});
  for (const auto& key : keys) EXPECT_TRUE(same_plan(*cache.plan(key), ring::make_step_plan(key)));
  EXPECT_EQ(cache.counters().misses, 9);
  EXPECT_EQ(cache.counters().hits, 0);
  EXPECT_EQ(cache.counters().entries, 9u);
  for (const auto& key : keys) EXPECT_TRUE(cache.contains(key));
  const auto first = cache.plan(base);
  EXPECT_EQ(first.get(), cache.plan(base).get());  // the same shared plan, not a rebuild
  EXPECT_EQ(cache.counters().hits, 2);
  EXPECT_EQ(cache.counters().misses, 9);
}

TEST(RingPatternCache, InvalidKeysAreNotCached) {
  ring::PatternCache cache;
  EXPECT_THROW(cache.plan({24, 5, 0, 4, 1, 0, false, 1}), std::invalid_argument);
  EXPECT_EQ(cache.counters().entries, 0u);
}

TEST(RingPatternCache, BoundedByLeastRecentlyUsedEviction) {
  ring::PatternCache cache(3);
  std::vector<std::shared_ptr<const ring::StepPlan>> held;
  for (std::int64_t t = 0; t < 4; ++t) held.push_back(cache.plan({24, 4, 0, 24, 1, 0, false, t}));
  EXPECT_EQ(cache.counters().entries, 3u);
  EXPECT_EQ(cache.counters().evictions, 1);
  EXPECT_FALSE(cache.contains({24, 4, 0, 24, 1, 0, false, 0}));  // the oldest went first
  cache.plan({24, 4, 0, 24, 1, 0, false, 1});                  // touch step 1: now most recent
  cache.plan({24, 4, 1, 24, 1, 0, false, 0});                  // evicts step 2, not step 1
  EXPECT_TRUE(cache.contains({24, 4, 0, 24, 1, 0, false, 1}));
  EXPECT_FALSE(cache.contains({24, 4, 0, 24, 1, 0, false, 2}));
  // An evicted plan stays valid for whoever holds it.
  EXPECT_TRUE(same_plan(*held[0], ring::make_step_plan({24, 4, 0, 24, 1, 0, false, 0})));
}

// A second forward with the same config finds every plan in the cache.
TEST(RingPatternCache, ForwardsReuseEveryPlan) {
  da::Config config;
  config.segment_lengths = {6, 16};
  config.dilation_rates = {1, 2};
  config.causal = true;
  const da::Shape shape{1, 24, 2, 2, 4};
  da::testing::Tensor<double> q(shape, 2), k(shape, 2), v(shape, 2);
  q.fill_random(1);
  k.fill_random(2);
  v.fill_random(3);
  ring::PatternCache cache;
  da::testing::run_ring_in_process<double>(config, shape, q, k, v, 3, &cache);
  const auto after_first = cache.counters();
  // 3 ranks x 3 steps x (1 + 2 offsets) plans.
  EXPECT_EQ(after_first.misses, 27);
  EXPECT_EQ(after_first.hits, 0);
  da::testing::run_ring_in_process<double>(config, shape, q, k, v, 3, &cache);
  EXPECT_EQ(cache.counters().misses, 27);
  EXPECT_EQ(cache.counters().hits, 27);
}

TEST(RingPatternCache, ConcurrentUseBuildsEachKeyOnce) {
  ring::PatternCache cache;
  constexpr int threads = 4, rounds = 50;
  std::vector<ring::StepKey> keys;
  for (std::int64_t p = 0; p < 4; ++p)
    for (std::int64_t t = 0; t < 4; ++t) keys.push_back({32, 4, p, 16, 2, 1, true, t});
  std::vector<int> mismatches(threads, 0);
  std::vector<std::thread> pool;
  for (int id = 0; id < threads; ++id)
    pool.emplace_back([&, id] {
      for (int round = 0; round < rounds; ++round)
        for (std::size_t j = 0; j < keys.size(); ++j) {
          const auto& key = keys[(j + static_cast<std::size_t>(id)) % keys.size()];
          if (!same_plan(*cache.plan(key), ring::make_step_plan(key))) ++mismatches[static_cast<std::size_t>(id)];
        }
    });
  for (auto& thread : pool) thread.join();
  for (const int m : mismatches) EXPECT_EQ(m, 0);
  const auto counters = cache.counters();
  EXPECT_EQ(counters.misses, static_cast<std::int64_t>(keys.size()));
  EXPECT_EQ(counters.hits + counters.misses, threads * rounds * static_cast<std::int64_t>(keys.size()));
}

}  // namespace
