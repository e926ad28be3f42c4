#pragma once
// The pattern cache: one tier, in CPU memory, shared by every forward in the process. It maps a
// StepKey (N, P, rank, branch (w, r), offset, causal, step) to that step's StepPlan, builds each
// plan once, and hands out shared, immutable plans.
//
// Why one tier and no prefetching: a plan is a handful of integers that costs microseconds to
// build; the cache exists so that a forward does no index arithmetic it has done before, not to
// hide latency. A second (GPU) tier and prefetch threads made the PyTorch original slower.
//
// Size bound: at most `capacity` plans (default 4096, a few hundred KiB), raised by reserve() to
// what the forwards in use need (the driver asks for P x its own need, and caches only steps
// with work: see step_has_work). When full, the least recently used plan is evicted (counted in
// `evictions`). Plans are handed out as
// shared_ptr<const StepPlan>, so an evicted plan stays valid for whoever still holds it.
//
// Thread safety: one mutex guards the map, the LRU list and the counters; a plan is built under
// the lock, so a key is built exactly once however many threads ask for it at the same time.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../../config.hpp"
#include "../../pattern.hpp"
#include "layout.hpp"
#include "schedule.hpp"

namespace dilated_attention::ring {

struct StepKeyHash {
  std::size_t operator()(const StepKey& key) const {
    // FNV-1a over the fields; collisions only cost a comparison.
    std::uint64_t h = 1469598103934665603ull;
    const auto mix = [&h](std::uint64_t value) {
      for (int byte = 0; byte < 8; ++byte) {
        h ^= (value >> (8 * byte)) & 0xffu;
        h *= 1099511628211ull;
      }
    };
    mix(static_cast<std::uint64_t>(key.seq_len));
    mix(static_cast<std::uint64_t>(key.num_ranks));
    mix(static_cast<std::uint64_t>(key.rank));
    mix(static_cast<std::uint64_t>(key.w));
    mix(static_cast<std::uint64_t>(key.r));
    mix(static_cast<std::uint64_t>(key.offset));
    mix(key.causal ? 1u : 0u);
    mix(static_cast<std::uint64_t>(key.step));
    mix(static_cast<std::uint64_t>(key.layout));
    return static_cast<std::size_t>(h);
  }
};

class PatternCache {
 public:
  struct Counters {
    std::int64_t hits = 0, misses = 0, evictions = 0;
    std::size_t entries = 0, capacity = 0;
  };

  static constexpr std::size_t default_capacity = 4096;

  explicit PatternCache(std::size_t capacity = default_capacity)
      : capacity_(capacity == 0 ? 1 : capacity) {}
  PatternCache(const PatternCache&) = delete;
  PatternCache& operator=(const PatternCache&) = delete;

  // The plan of `key`, built on first use. Throws std::invalid_argument for a key that no valid
  // ring has (see make_step_plan); nothing is cached then.
  std::shared_ptr<const StepPlan> plan(const StepKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = index_.find(key);
    if (found != index_.end()) {
      ++hits_;
      lru_.splice(lru_.begin(), lru_, found->second);  // most recently used to the front
      return found->second->second;
    }
    auto built = std::make_shared<const StepPlan>(make_step_plan(key));
    ++misses_;
    if (index_.size() >= capacity_) {
      index_.erase(lru_.back().first);
      lru_.pop_back();
      ++evictions_;
    }
    lru_.emplace_front(key, built);
    index_.emplace(key, lru_.begin());
    return built;
  }

  // Raises the capacity to at least `plans` (never lowers it). The driver sizes it from what a
  // forward needs times P, so that P in-process ranks sharing one cache all fit.
  void reserve(std::size_t plans) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (plans > capacity_) capacity_ = plans;
  }

  Counters counters() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return {hits_, misses_, evictions_, index_.size(), capacity_};
  }

  bool contains(const StepKey& key) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return index_.count(key) != 0;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    index_.clear();
    lru_.clear();
    hits_ = misses_ = evictions_ = 0;
  }

 private:
  using Entry = std::pair<StepKey, std::shared_ptr<const StepPlan>>;
  mutable std::mutex mutex_;
  std::size_t capacity_;
  std::list<Entry> lru_;  // front = most recently used
  std::unordered_map<StepKey, std::list<Entry>::iterator, StepKeyHash> index_;
  std::int64_t hits_ = 0, misses_ = 0, evictions_ = 0;
};

// The process-wide cache that ring::forward uses unless given another one.
inline PatternCache& default_pattern_cache() {
  static PatternCache cache;
  return cache;
}

// Every StepPlan of rank `rank` for one forward: plans[t][i][o], null where no query head uses
// offset o of branch i, a shared empty plan where the step has no work (not cached).
inline std::vector<std::vector<std::vector<std::shared_ptr<const StepPlan>>>> step_plans(
    const Config& config, const Shape& global, std::int64_t num_ranks, std::int64_t rank,
    PatternCache& cache, Layout layout = Layout::contiguous) {
  static const auto empty = std::make_shared<const StepPlan>();
  const Pattern pattern(config, global);
  const std::int64_t branches = pattern.num_branches();
  std::vector<std::vector<bool>> used(static_cast<std::size_t>(branches));
  for (std::int64_t i = 0; i < branches; ++i)
    for (std::int64_t o = 0; o < pattern.branch(i).r; ++o)
      used[static_cast<std::size_t>(i)].push_back(!pattern.heads_with_offset(i, o).empty());
  std::vector<std::vector<std::vector<std::shared_ptr<const StepPlan>>>> plans(
      static_cast<std::size_t>(num_ranks));
  std::vector<std::pair<StepKey, std::int64_t>> wanted;  // (key, branch)
  for (std::int64_t t = 0; t < num_ranks; ++t) {
    auto& step = plans[static_cast<std::size_t>(t)];
    step.resize(static_cast<std::size_t>(branches));
    for (std::int64_t i = 0; i < branches; ++i) {
      const BranchGeometry g = pattern.branch(i);
      step[static_cast<std::size_t>(i)].resize(static_cast<std::size_t>(g.r));
      for (std::int64_t o = 0; o < g.r; ++o) {
        if (!used[static_cast<std::size_t>(i)][static_cast<std::size_t>(o)]) continue;
        const StepKey key{global.seq_len, num_ranks, rank, g.w, g.r, o, config.causal, t, layout};
        if (step_has_work(key))
          wanted.emplace_back(key, i);
        else
          step[static_cast<std::size_t>(i)][static_cast<std::size_t>(o)] = empty;
      }
    }
  }
  cache.reserve(wanted.size() * static_cast<std::size_t>(num_ranks));
  for (const auto& [key, i] : wanted)
    plans[static_cast<std::size_t>(key.step)][static_cast<std::size_t>(i)]
         [static_cast<std::size_t>(key.offset)] = cache.plan(key);
  return plans;
}

}  // namespace dilated_attention::ring
