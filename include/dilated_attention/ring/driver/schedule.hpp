#pragma once
// The ring schedule: for one rank, one branch (w, r), one offset and one step, which of its rows
// it sends and to whom, which rows it receives and from whom, which (query, key) blocks it
// computes, and whether the step is skipped. Built from pattern.hpp alone (BranchGeometry,
// Progression); nothing here re-derives segment or offset arithmetic.
//
// Layout. Rank p of P owns the contiguous shard [p*L, (p+1)*L), L = N/P, of Q, K and V, or, in
// the zigzag layout, chunks p and 2P-1-p of 2P (layout.hpp); below, "shard" means a rank's chunks.
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

#include "../../config.hpp"
#include "../../pattern.hpp"
#include "layout.hpp"

namespace dilated_attention::ring {

// Rejects a partition that the ring cannot run (docs/semantics.md "Bad input": "a ring with N % P != 0").
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
  Layout layout = Layout::contiguous;

  friend bool operator==(const StepKey& a, const StepKey& b) {
    return a.seq_len == b.seq_len && a.num_ranks == b.num_ranks && a.rank == b.rank && a.w == b.w &&
           a.r == b.r && a.offset == b.offset && a.causal == b.causal && a.step == b.step &&
           a.layout == b.layout;
  }
  friend bool operator!=(const StepKey& a, const StepKey& b) { return !(a == b); }
};

// Query rows of this rank against key rows (global positions). At step 0 the keys are the
// rank's own rows; at step t > 0 they are rows received from recv_peer.
struct BlockPair {
  Progression queries, keys;
};

// One rank's work for one (branch, offset) at one step. A message is a list of units, each the
// selected rows of one segment within one of the sender's chunks (one unit under the contiguous
// layout; up to four under zigzag). The sender's send_rows equal the receiver's recv_rows.
struct StepPlan {
  std::int64_t send_peer = -1;          // -1: nothing to send for this (branch, offset)
  std::vector<Progression> send_rows;   // own rows the peer's queries attend to, by unit
  std::int64_t recv_peer = -1;          // -1: nothing to receive
  std::vector<Progression> recv_rows;   // the units that arrive, in message order
  std::vector<BlockPair> blocks;        // step 0: local blocks; step t > 0: on received units
  std::vector<std::size_t> block_unit;  // step t > 0: the recv_rows unit of each block's keys

  bool sends() const { return send_peer >= 0; }
  bool receives() const { return recv_peer >= 0; }
};

namespace detail {

// The one segment of branch `g` that both (disjoint) ranges overlap, or -1: a shared segment must
// contain the end of the earlier range and the start of the later one.
inline std::int64_t shared_segment(const BranchGeometry& g, const Chunk& a, const Chunk& b) {
  const Chunk& early = a.begin < b.begin ? a : b;
  const Chunk& late = a.begin < b.begin ? b : a;
  const std::int64_t s = g.segment_of(early.end - 1);
  return g.segment_of(late.begin) == s ? s : -1;
}

// Keys in chunk `keys` can matter to queries in chunk `queries`: not all in the future.
inline bool causally_visible(bool causal, const Chunk& keys, const Chunk& queries) {
  return !causal || keys.begin <= queries.begin;
}

// Whether any chunk of `from` holds keys that some chunk of `to` attends in branch g (by
// segments only; the offset may still make the rows empty).
inline bool chunks_talk(const BranchGeometry& g, bool causal, const std::vector<Chunk>& from,
                        const std::vector<Chunk>& to) {
  for (const Chunk& a : from)
    for (const Chunk& b : to)
      if (causally_visible(causal, a, b) && shared_segment(g, a, b) >= 0) return true;
  return false;
}

// The units `sender` sends to `receiver` for (g, offset), and for each unit the receiver's
// blocks. Both sides call it with the same arguments, so they agree on the message.
template <class OnUnit>
void for_each_unit(const BranchGeometry& g, std::int64_t offset, bool causal,
                   const std::vector<Chunk>& sender, const std::vector<Chunk>& receiver,
                   OnUnit&& on_unit) {
  std::vector<BlockPair> blocks;
  for (const Chunk& a : sender) {
    // Only a chunk's first and last segment can reach another rank's rows.
    const std::int64_t first = g.segment_of(a.begin), last = g.segment_of(a.end - 1);
    for (std::int64_t s = first; s <= last; s = (s == last ? last + 1 : last)) {
      const Progression unit = g.rows(s, offset).within(a.begin, a.end);
      if (unit.empty()) continue;
      blocks.clear();
      for (const Chunk& b : receiver) {
        if (!causally_visible(causal, a, b) || shared_segment(g, a, b) != s) continue;
        const Progression queries = g.rows(s, offset).within(b.begin, b.end);
        if (!queries.empty()) blocks.push_back({queries, unit});
      }
      if (!blocks.empty()) on_unit(unit, blocks);
    }
  }
}

}  // namespace detail

// False when step `key.step` certainly has nothing to send, receive or compute for this branch:
// neither peer of the step shares a segment with this rank (or causality rules both halves
// out). The driver does not cache such plans, so a rank caches only the steps of its sub-rings:
// O(sum_i r_i * w_i / (N/P)) plans rather than P * sum_i r_i.
inline bool step_has_work(const StepKey& key) {
  if (key.step == 0) return true;
  const BranchGeometry g{key.w, key.r, key.seq_len};
  const auto mine = rank_chunks(key.layout, key.seq_len, key.num_ranks, key.rank);
  const std::int64_t dest = (key.rank + key.step) % key.num_ranks;
  const std::int64_t source = (key.rank - key.step + key.num_ranks) % key.num_ranks;
  return detail::chunks_talk(g, key.causal, mine,
                             rank_chunks(key.layout, key.seq_len, key.num_ranks, dest)) ||
         detail::chunks_talk(g, key.causal,
                             rank_chunks(key.layout, key.seq_len, key.num_ranks, source), mine);
}

// The plan of StepKey `key`. Pure: the same key always gives the same plan, on every rank, so the
// sender's send_rows at step t equal the receiver's recv_rows at step t, and the two sides agree
// on the message layout without exchanging any header.
inline StepPlan make_step_plan(const StepKey& key) {
  validate_partition(key.seq_len, key.num_ranks, key.rank);
  validate_layout(key.layout, key.seq_len, key.num_ranks);
  if (key.w <= 0 || key.r <= 0 || key.r > key.w)
    dilated_attention::detail::reject("branch (w = ", key.w, ", r = ", key.r,
                                      "): each branch needs 1 <= r <= w");
  if (key.offset < 0 || key.offset >= key.r)
    dilated_attention::detail::reject("offset = ", key.offset, " is outside 0..", key.r - 1);
  if (key.step < 0 || key.step >= key.num_ranks)
    dilated_attention::detail::reject("step = ", key.step, " is outside 0..", key.num_ranks - 1);

  const BranchGeometry g{key.w, key.r, key.seq_len};
  const auto mine = rank_chunks(key.layout, key.seq_len, key.num_ranks, key.rank);
  StepPlan plan;

  if (key.step == 0) {
    // Every (key chunk, query chunk) pair of this rank, per segment they share (a chunk with
    // itself shares all of its segments).
    for (const Chunk& a : mine)
      for (std::int64_t s = g.segment_of(a.begin); s <= g.segment_of(a.end - 1); ++s) {
        const Progression keys = g.rows(s, key.offset).within(a.begin, a.end);
        if (keys.empty()) continue;
        for (const Chunk& b : mine) {
          if (!detail::causally_visible(key.causal, a, b)) continue;
          if (b.begin != a.begin && detail::shared_segment(g, a, b) != s) continue;
          const Progression queries = g.rows(s, key.offset).within(b.begin, b.end);
          if (!queries.empty()) plan.blocks.push_back({queries, keys});
        }
      }
    return plan;
  }

  const std::int64_t dest = (key.rank + key.step) % key.num_ranks;
  detail::for_each_unit(g, key.offset, key.causal, mine,
                        rank_chunks(key.layout, key.seq_len, key.num_ranks, dest),
                        [&](const Progression& unit, const std::vector<BlockPair>&) {
                          plan.send_peer = dest;
                          plan.send_rows.push_back(unit);
                        });
  const std::int64_t source = (key.rank - key.step + key.num_ranks) % key.num_ranks;
  detail::for_each_unit(g, key.offset, key.causal,
                        rank_chunks(key.layout, key.seq_len, key.num_ranks, source), mine,
                        [&](const Progression& unit, const std::vector<BlockPair>& blocks) {
                          plan.recv_peer = source;
                          for (const BlockPair& block : blocks) {
                            plan.blocks.push_back(block);
                            plan.block_unit.push_back(plan.recv_rows.size());
                          }
                          plan.recv_rows.push_back(unit);
                        });
  return plan;
}

}  // namespace dilated_attention::ring
