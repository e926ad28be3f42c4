#pragma once
// The ring schedule: for one rank, one branch (w, r), one offset and one step, which of its rows
// it sends and to whom, which rows it receives and from whom, which (query, key) blocks it
// computes, and whether the step is skipped. Built from pattern.hpp alone (BranchGeometry,
// Progression); nothing here re-derives segment or offset arithmetic.
//
// Layout. Rank p of P owns the contiguous shard [p*L, (p+1)*L), L = N/P, of Q, K and V.
// Step 0 is local: every segment that overlaps the shard is attended among the shard's own rows.
// At step t = 1..P-1 rank p sends its own rows to rank (p + t) mod P and receives rows from rank
// (p - t) mod P: a direct exchange rather than a pass-it-on ring, so that what a rank sends can be
// cut to exactly what the receiver's queries attend. Two shards share at most one segment (a
// segment that overlaps both covers everything between them), so one exchange carries, per branch
// and offset, at most one progression of rows.
//
// Why this is dilation aware:
// - a segment inside one shard only ever appears at step 0 (no communication);
// - ranks exchange only when a segment spans both shards (the sub-ring of that segment);
// - only rows with in-segment index = offset (mod r) are sent, about 1/r of the overlap;
// - causal: a rank never receives from a later shard (those keys are all in the future), and
//   never sends to an earlier one; those halves of a step are skipped.

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "../config.hpp"
#include "../pattern.hpp"

namespace dilated_attention::ring {

// Rejects a partition that the ring cannot run (docs/semantics.md §5: "a ring with N % P != 0").
inline void validate_partition(std::int64_t seq_len, std::int64_t num_ranks, std::int64_t rank) {
  using dilated_attention::detail::reject;
  if (num_ranks <= 0) reject("num_ranks = ", num_ranks, ": a ring needs at least one rank");
  if (rank < 0 || rank >= num_ranks)
    reject("rank = ", rank, " is out of range: ranks are 0..", num_ranks - 1);
  if (seq_len <= 0) reject("shape.seq_len = ", seq_len, ": must be positive");
  if (seq_len % num_ranks != 0)
    reject("shape.seq_len = ", seq_len, " is not a multiple of num_ranks = ", num_ranks,
           ": each rank holds an equal contiguous shard, so N % P must be 0");
}

// Global positions [begin, end) of rank p's shard.
struct Shard {
  std::int64_t begin, end;
  std::int64_t length() const { return end - begin; }
};

inline Shard shard_of(std::int64_t seq_len, std::int64_t num_ranks, std::int64_t rank) {
  const std::int64_t length = seq_len / num_ranks;
  return {rank * length, (rank + 1) * length};
}

// Everything a step plan depends on: the cache key (pattern_cache.hpp).
struct StepKey {
  std::int64_t seq_len, num_ranks, rank;
  std::int64_t w, r, offset;
  bool causal;
  std::int64_t step;

  friend bool operator==(const StepKey& a, const StepKey& b) {
    return a.seq_len == b.seq_len && a.num_ranks == b.num_ranks && a.rank == b.rank &&
           a.w == b.w && a.r == b.r && a.offset == b.offset && a.causal == b.causal &&
           a.step == b.step;
  }
  friend bool operator!=(const StepKey& a, const StepKey& b) { return !(a == b); }
};

// Query rows of this rank against key rows (global positions). At step 0 the keys are the
// rank's own rows; at step t > 0 they are the rows received from recv_peer, in order.
struct BlockPair {
  Progression queries, keys;
};

// One rank's work for one (branch, offset) at one step.
struct StepPlan {
  std::int64_t send_peer = -1;  // -1: nothing to send for this (branch, offset): skipped
  Progression send_rows;        // own rows the peer's queries attend to
  std::int64_t recv_peer = -1;  // -1: nothing to receive: skipped
  std::vector<BlockPair> blocks;  // step 0: one per overlapping segment; step t > 0: at most one

  bool sends() const { return send_peer >= 0; }
  bool receives() const { return recv_peer >= 0; }
};

namespace detail {

// The one segment of branch `g` that both shards overlap, or -1. Shards are disjoint, so a shared
// segment must contain the end of the earlier shard and the start of the later one.
inline std::int64_t shared_segment(const BranchGeometry& g, const Shard& a, const Shard& b) {
  const Shard& early = a.begin < b.begin ? a : b;
  const Shard& late = a.begin < b.begin ? b : a;
  const std::int64_t s = g.segment_of(early.end - 1);
  return g.segment_of(late.begin) == s ? s : -1;
}

}  // namespace detail

// False when step `key.step` certainly has nothing to send, receive or compute for this branch and
// offset: the rank shares no segment with either peer of the step (or causality skips both
// halves). The driver does not cache such plans, so the cache holds, per rank, only the steps of
// its sub-rings -- O(sum_i r_i * w_i / (N/P)) plans rather than P * sum_i r_i.
inline bool step_has_work(const StepKey& key) {
  if (key.step == 0) return true;
  const BranchGeometry g{key.w, key.r, key.seq_len};
  const Shard mine = shard_of(key.seq_len, key.num_ranks, key.rank);
  const std::int64_t dest = (key.rank + key.step) % key.num_ranks;
  const std::int64_t source = (key.rank - key.step + key.num_ranks) % key.num_ranks;
  const bool sends = !(key.causal && dest < key.rank) &&
                     detail::shared_segment(g, mine, shard_of(key.seq_len, key.num_ranks, dest)) >= 0;
  const bool receives = !(key.causal && source > key.rank) &&
                        detail::shared_segment(g, mine, shard_of(key.seq_len, key.num_ranks, source)) >= 0;
  return sends || receives;
}

// The plan of StepKey `key`. Pure: the same key always gives the same plan, on every rank, so the
// sender's send_rows at step t equal the receiver's BlockPair::keys at step t, and the two sides
// agree on the message layout without exchanging any header.
inline StepPlan make_step_plan(const StepKey& key) {
  validate_partition(key.seq_len, key.num_ranks, key.rank);
  if (key.w <= 0 || key.r <= 0 || key.r > key.w)
    dilated_attention::detail::reject("branch (w = ", key.w, ", r = ", key.r,
                                      "): each branch needs 1 <= r <= w");
  if (key.offset < 0 || key.offset >= key.r)
    dilated_attention::detail::reject("offset = ", key.offset, " is outside 0..", key.r - 1);
  if (key.step < 0 || key.step >= key.num_ranks)
    dilated_attention::detail::reject("step = ", key.step, " is outside 0..", key.num_ranks - 1);

  const BranchGeometry g{key.w, key.r, key.seq_len};
  const Shard mine = shard_of(key.seq_len, key.num_ranks, key.rank);
  StepPlan plan;

  if (key.step == 0) {
    for (std::int64_t s = g.segment_of(mine.begin); s <= g.segment_of(mine.end - 1); ++s) {
      const Progression rows = g.rows(s, key.offset).within(mine.begin, mine.end);
      if (!rows.empty()) plan.blocks.push_back({rows, rows});
    }
    return plan;
  }

  // Send half: my rows that the destination's queries attend to.
  const std::int64_t dest = (key.rank + key.step) % key.num_ranks;
  if (!(key.causal && dest < key.rank)) {
    const Shard theirs = shard_of(key.seq_len, key.num_ranks, dest);
    const std::int64_t s = detail::shared_segment(g, mine, theirs);
    if (s >= 0) {
      const Progression block = g.rows(s, key.offset);
      const Progression own = block.within(mine.begin, mine.end);
      const Progression their_queries = block.within(theirs.begin, theirs.end);
      if (!own.empty() && !their_queries.empty()) {
        plan.send_peer = dest;
        plan.send_rows = own;
      }
    }
  }

  // Receive half: the source's rows that my queries attend to.
  const std::int64_t source = (key.rank - key.step + key.num_ranks) % key.num_ranks;
  if (!(key.causal && source > key.rank)) {
    const Shard theirs = shard_of(key.seq_len, key.num_ranks, source);
    const std::int64_t s = detail::shared_segment(g, mine, theirs);
    if (s >= 0) {
      const Progression block = g.rows(s, key.offset);
      const Progression keys = block.within(theirs.begin, theirs.end);
      const Progression queries = block.within(mine.begin, mine.end);
      if (!keys.empty() && !queries.empty()) {
        plan.recv_peer = source;
        plan.blocks.push_back({queries, keys});
      }
    }
  }
  return plan;
}

}  // namespace dilated_attention::ring
