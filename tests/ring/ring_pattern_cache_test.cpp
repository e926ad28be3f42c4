// The pattern cache: one entry per distinct key, hits on reuse, plans shared and immutable, the
// size bound enforced by LRU eviction, and safe concurrent use (also run under ThreadSanitizer).

#include <gtest/gtest.h>

#include <cstdio>

#include <thread>
#include <vector>

#include "support/ring_support.hpp"

namespace da = dilated_attention;
namespace ring = dilated_attention::ring;

namespace {

bool same_plan(const ring::StepPlan& a, const ring::StepPlan& b) {
  if (a.send_peer != b.send_peer || a.recv_peer != b.recv_peer || a.send_rows != b.send_rows ||
      a.recv_rows != b.recv_rows || a.block_unit != b.block_unit ||
      a.blocks.size() != b.blocks.size())
    return false;
  for (std::size_t j = 0; j < a.blocks.size(); ++j)
    if (a.blocks[j].queries != b.blocks[j].queries || a.blocks[j].keys != b.blocks[j].keys)
      return false;
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
  vary(&ring::StepKey::layout, ring::Layout::zigzag);
  for (const auto& key : keys) EXPECT_TRUE(same_plan(*cache.plan(key), ring::make_step_plan(key)));
  EXPECT_EQ(cache.counters().misses, 10);
  EXPECT_EQ(cache.counters().hits, 0);
  EXPECT_EQ(cache.counters().entries, 10u);
  for (const auto& key : keys) EXPECT_TRUE(cache.contains(key));
  const auto first = cache.plan(base);
  EXPECT_EQ(first.get(), cache.plan(base).get());  // the same shared plan, not a rebuild
  EXPECT_EQ(cache.counters().hits, 2);
  EXPECT_EQ(cache.counters().misses, 10);
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
  cache.plan({24, 4, 0, 24, 1, 0, false, 1});                    // touch step 1: now most recent
  cache.plan({24, 4, 1, 24, 1, 0, false, 0});                    // evicts step 2, not step 1
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
  // Only steps with work are cached: of 3 ranks x 3 steps x (1 + 2 offsets) = 27 keys, ranks
  // 0, 1, 2 need 6, 6 and 4 (step 0 always; a later step only towards a rank sharing a segment,
  // and causal skips receiving from later ranks). Worked out by hand from the segments
  // [0,6),[6,12),.. and [0,16),[16,24) against shards [0,8),[8,16),[16,24).
  EXPECT_EQ(after_first.misses, 16);
  EXPECT_EQ(after_first.hits, 0);
  da::testing::run_ring_in_process<double>(config, shape, q, k, v, 3, &cache);
  EXPECT_EQ(cache.counters().misses, 16);
  EXPECT_EQ(cache.counters().hits, 16);
}

// At scale: N = 2^20, P = 1024, LongNet's branches (the paper's w = 2048..32768, r = 1, 2, 4, 6,
// 12), MHA with 12 heads so every offset is used. The first version cached P x sum(r) = 25,600
// plans per rank, more than the default capacity, and a second forward got no hits. Now a rank
// caches only the steps of its sub-rings, the capacity grows to P x that, and the second forward
// is all hits, for every sampled rank, causal or not.
TEST(RingPatternCache, SecondForwardIsAllHitsAtP1024) {
  da::Config config;
  config.segment_lengths = {2048, 4096, 8192, 16384, 32768};
  config.dilation_rates = {1, 2, 4, 6, 12};
  const da::Shape shape{1, std::int64_t{1} << 20, 12, 12, 64};
  for (const bool causal : {false, true}) {
    config.causal = causal;
    ring::PatternCache cache;
    const std::vector<std::int64_t> ranks = {0, 1, 31, 32, 500, 1023};
    for (const std::int64_t rank : ranks) ring::step_plans(config, shape, 1024, rank, cache);
    const auto first = cache.counters();
    EXPECT_EQ(first.hits, 0);
    EXPECT_EQ(first.evictions, 0);
    // Per rank at most sum_i r_i * (2 * w_i / L + 1) = 2 + 10 + 36 + 198 + 780 plans (L = 1024).
    EXPECT_LE(first.misses, static_cast<std::int64_t>(ranks.size()) * (2 + 10 + 36 + 198 + 780));
    for (const std::int64_t rank : ranks) ring::step_plans(config, shape, 1024, rank, cache);
    const auto second = cache.counters();
    EXPECT_EQ(second.misses, first.misses);
    EXPECT_EQ(second.hits, first.misses);
    EXPECT_EQ(second.evictions, 0);
    std::printf("causal=%d: %lld plans for %zu ranks (%lld per rank); second pass %lld hits\n",
                causal ? 1 : 0, static_cast<long long>(first.misses), ranks.size(),
                static_cast<long long>(first.misses) / static_cast<long long>(ranks.size()),
                static_cast<long long>(second.hits - first.hits));
  }
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
          if (!same_plan(*cache.plan(key), ring::make_step_plan(key)))
            ++mismatches[static_cast<std::size_t>(id)];
        }
    });
  for (auto& thread : pool) thread.join();
  for (const int m : mismatches) EXPECT_EQ(m, 0);
  const auto counters = cache.counters();
  EXPECT_EQ(counters.misses, static_cast<std::int64_t>(keys.size()));
  EXPECT_EQ(counters.hits + counters.misses,
            threads * rounds * static_cast<std::int64_t>(keys.size()));
}

}  // namespace
