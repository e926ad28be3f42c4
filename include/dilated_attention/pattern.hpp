#pragma once
// The index algebra of dilated attention (docs/semantics.md "The forward"-3), in one place: segments, offsets of heads,
// the rows a (branch, segment, offset) selects, the keys of a query, and the exact useful-FLOP
// count. Kernels and the ring schedule ask this header; none of them re-derives the math.
//
// The lower half is free functions over plain integers, marked host+device so that the CUDA
// kernel runs the very same arithmetic; the upper half (class Pattern) is a host-side view that
// binds them to a validated Config and Shape.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "config.hpp"
#include "host_device.hpp"

namespace dilated_attention {

// An arithmetic progression of positions (rows or heads): first, first + stride, ...
// Every set this header hands out is one: the rows of a block, the keys of a query, the heads
// that share an offset.
struct Progression {
  std::int64_t first = 0, stride = 1, count = 0;

  DILATED_ATTENTION_HOST_DEVICE std::int64_t at(std::int64_t j) const { return first + j * stride; }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t last() const { return at(count - 1); }
  DILATED_ATTENTION_HOST_DEVICE bool empty() const { return count <= 0; }
  DILATED_ATTENTION_HOST_DEVICE bool contains(std::int64_t x) const {
    return count > 0 && x >= first && (x - first) % stride == 0 && (x - first) / stride < count;
  }
  // Position j of x, for x in the progression.
  DILATED_ATTENTION_HOST_DEVICE std::int64_t index_of(std::int64_t x) const {
    return (x - first) / stride;
  }
  // How many elements are <= x.
  DILATED_ATTENTION_HOST_DEVICE std::int64_t count_up_to(std::int64_t x) const {
    if (count <= 0 || x < first) return 0;
    const std::int64_t n = (x - first) / stride + 1;
    return n < count ? n : count;
  }
  // The first `n` elements.
  DILATED_ATTENTION_HOST_DEVICE Progression prefix(std::int64_t n) const {
    return {first, stride, n < count ? (n > 0 ? n : 0) : count};
  }
  // Elements j in [begin, end).
  DILATED_ATTENTION_HOST_DEVICE Progression slice(std::int64_t begin, std::int64_t end) const {
    begin = begin < 0 ? 0 : begin;
    end = end > count ? count : end;
    return {at(begin), stride, end > begin ? end - begin : 0};
  }
  // The elements that lie in the half-open interval [lo, hi).
  DILATED_ATTENTION_HOST_DEVICE Progression within(std::int64_t lo, std::int64_t hi) const {
    const std::int64_t begin = count_up_to(lo - 1);
    const std::int64_t end = count_up_to(hi - 1);
    return slice(begin, end);
  }
};

DILATED_ATTENTION_HOST_DEVICE bool operator==(const Progression& a, const Progression& b) {
  if (a.count != b.count) return false;
  if (a.count == 0) return true;
  return a.first == b.first && (a.count == 1 || a.stride == b.stride);
}
DILATED_ATTENTION_HOST_DEVICE bool operator!=(const Progression& a, const Progression& b) {
  return !(a == b);
}

// One branch (w, r) laid over a sequence of n positions. Segments start at 0; the last one may be
// short; there are no padded positions.
struct BranchGeometry {
  std::int64_t w, r, n;

  DILATED_ATTENTION_HOST_DEVICE std::int64_t num_segments() const { return (n + w - 1) / w; }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t segment_of(std::int64_t x) const { return x / w; }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t segment_begin(std::int64_t s) const { return s * w; }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t segment_length(std::int64_t s) const {
    const std::int64_t rest = n - s * w;
    return rest < w ? rest : w;
  }
  // rho(x): the in-segment index.
  DILATED_ATTENTION_HOST_DEVICE std::int64_t in_segment(std::int64_t x) const { return x % w; }
  // The rows of segment s whose in-segment index is offset (mod r): one block's rows.
  DILATED_ATTENTION_HOST_DEVICE Progression rows(std::int64_t s, std::int64_t offset) const {
    const std::int64_t length = segment_length(s);
    if (offset < 0 || offset >= length) return {segment_begin(s), r, 0};
    return {segment_begin(s) + offset, r, (length - offset + r - 1) / r};
  }
  DILATED_ATTENTION_HOST_DEVICE bool selected(std::int64_t x, std::int64_t offset) const {
    return offset >= 0 && in_segment(x) % r == offset;
  }
  // K_i(x, h) for a head with this offset: empty unless x is selected; then the selected rows of
  // x's segment, cut after x when causal.
  DILATED_ATTENTION_HOST_DEVICE Progression keys(std::int64_t x, std::int64_t offset,
                                                 bool causal) const {
    if (!selected(x, offset)) return {x, r, 0};
    const Progression block = rows(segment_of(x), offset);
    return causal ? block.prefix(block.index_of(x) + 1) : block;
  }
};

// First head of partition group g when H heads are split into G contiguous groups, the first
// H mod G of them one head larger (docs/semantics.md "Which offset a head uses", partitioned).
DILATED_ATTENTION_HOST_DEVICE std::int64_t partition_begin(std::int64_t g, std::int64_t num_heads,
                                                           std::int64_t num_groups) {
  const std::int64_t base = num_heads / num_groups, extra = num_heads % num_groups;
  return g * base + (g < extra ? g : extra);
}

// The partition group that head h belongs to.
DILATED_ATTENTION_HOST_DEVICE std::int64_t partition_of(std::int64_t head, std::int64_t num_heads,
                                                        std::int64_t num_groups) {
  const std::int64_t base = num_heads / num_groups, extra = num_heads % num_groups;
  const std::int64_t big = extra * (base + 1);  // heads covered by the larger groups
  return head < big ? head / (base + 1) : extra + (head - big) / base;
}

// o_i(h) of docs/semantics.md "Which offset a head uses", or -1 when head h does not run branch i (partitioned only).
DILATED_ATTENTION_HOST_DEVICE std::int64_t head_offset(OffsetRule rule, std::int64_t branch,
                                                       std::int64_t num_branches,
                                                       std::int64_t rate, std::int64_t head,
                                                       std::int64_t num_heads) {
  switch (rule) {
    case OffsetRule::modular: return head % rate;
    case OffsetRule::blocked: {
      const std::int64_t per_offset = (num_heads + rate - 1) / rate;
      return head / per_offset;
    }
    case OffsetRule::partitioned:
      return partition_of(head, num_heads, num_branches) == branch ? branch % rate : -1;
  }
  return -1;
}

// The query heads whose offset in branch i is `offset`: always a progression.
DILATED_ATTENTION_HOST_DEVICE Progression heads_with_offset(OffsetRule rule, std::int64_t branch,
                                                            std::int64_t num_branches,
                                                            std::int64_t rate, std::int64_t offset,
                                                            std::int64_t num_heads) {
  switch (rule) {
    case OffsetRule::modular:
      return {offset, rate, offset < num_heads ? (num_heads - offset + rate - 1) / rate : 0};
    case OffsetRule::blocked: {
      const std::int64_t per_offset = (num_heads + rate - 1) / rate;
      const std::int64_t begin = offset * per_offset;
      const std::int64_t end = begin + per_offset < num_heads ? begin + per_offset : num_heads;
      return {begin, 1, end > begin ? end - begin : 0};
    }
    case OffsetRule::partitioned: {
      if (offset != branch % rate) return {0, 1, 0};
      const std::int64_t begin = partition_begin(branch, num_heads, num_branches);
      return {begin, 1, partition_begin(branch + 1, num_heads, num_branches) - begin};
    }
  }
  return {0, 1, 0};
}

// Query-key pairs of a block of n rows: all of them, or the lower triangle with its diagonal.
DILATED_ATTENTION_HOST_DEVICE std::int64_t block_pairs(std::int64_t n, bool causal) {
  return causal ? n * (n + 1) / 2 : n * n;
}

// The rows one (branch, segment, offset) attend among, and the query heads that use them.
struct Block {
  std::int64_t branch, segment, offset;
  Progression rows;   // positions in the sequence
  Progression heads;  // query heads
};

// The host-side pattern of a validated (Config, Shape).
class Pattern {
 public:
  Pattern(const Config& config, const Shape& shape) : config_(config), shape_(shape) {
    validate(config_, shape_);
  }

  const Config& config() const { return config_; }
  const Shape& shape() const { return shape_; }
  std::int64_t num_branches() const {
    return static_cast<std::int64_t>(config_.segment_lengths.size());
  }
  BranchGeometry branch(std::int64_t i) const {
    return {config_.segment_lengths[static_cast<std::size_t>(i)],
            config_.dilation_rates[static_cast<std::size_t>(i)], shape_.seq_len};
  }
  // o_i(h), or -1 when head h does not run branch i.
  std::int64_t offset(std::int64_t i, std::int64_t head) const {
    return head_offset(config_.offsets, i, num_branches(), branch(i).r, head, shape_.num_heads);
  }
  Progression heads_with_offset(std::int64_t i, std::int64_t offset) const {
    return dilated_attention::heads_with_offset(config_.offsets, i, num_branches(), branch(i).r,
                                                offset, shape_.num_heads);
  }
  // Whether branch i selects any row for head `head`: the head runs the branch and its offset
  // falls inside the first segment (the longest; only the last one may be short).
  bool selects_any(std::int64_t i, std::int64_t head) const {
    const std::int64_t o = offset(i, head);
    return o >= 0 && !branch(i).rows(0, o).empty();
  }
  // The only branch that selects rows for `head`; -1 when none does, -2 when several do. Under
  // one such branch every row of the head has at most one partial, so its mixed O and LSE are
  // that branch's (divided by G for mean): docs/semantics.md "Gradient of the mean mixing".
  std::int64_t sole_branch(std::int64_t head) const {
    std::int64_t sole = -1;
    for (std::int64_t i = 0; i < num_branches(); ++i)
      if (selects_any(i, head)) {
        if (sole >= 0) return -2;
        sole = i;
      }
    return sole;
  }
  // Mean mixing's statistics for `head`: the branch whose LSE and D = dO·O are the forward's own
  // (its sole branch, or 0 when no branch selects rows), or -1 where several branches select
  // rows and each one's are recomputed (docs/semantics.md "Gradient of the mean mixing").
  std::int64_t mean_statistics_branch(std::int64_t head) const {
    const std::int64_t sole = sole_branch(head);
    return sole == -2 ? -1 : std::max<std::int64_t>(sole, 0);
  }
  // Whether mean mixing recomputes any head's per-branch statistics (some head has rows in
  // several branches); when not, every backward reads the forward's LSE and dO·O as softmax does.
  bool mean_recomputes_statistics() const {
    for (std::int64_t h = 0; h < shape_.num_heads; ++h)
      if (sole_branch(h) == -2) return true;
    return false;
  }
  // The key/value head that query head h reads (grouped-query attention).
  std::int64_t kv_head(std::int64_t head) const {
    return head / (shape_.num_heads / shape_.num_kv_heads);
  }
  // K_i(x, h).
  Progression keys(std::int64_t i, std::int64_t head, std::int64_t x) const {
    return branch(i).keys(x, offset(i, head), config_.causal);
  }
  // C_h(x, y): in how many branches query x of head h attends key y.
  std::int64_t multiplicity(std::int64_t head, std::int64_t x, std::int64_t y) const {
    std::int64_t c = 0;
    for (std::int64_t i = 0; i < num_branches(); ++i) c += keys(i, head, x).contains(y) ? 1 : 0;
    return c;
  }

  // Every block with at least one row and one head, branch by branch, segment by segment,
  // offset by offset. A kernel iterates these; their rows never straddle a segment.
  std::vector<Block> blocks() const {
    std::vector<Block> result;
    for (std::int64_t i = 0; i < num_branches(); ++i) {
      const BranchGeometry geometry = branch(i);
      for (std::int64_t s = 0; s < geometry.num_segments(); ++s)
        for (std::int64_t o = 0; o < geometry.r; ++o) {
          const Progression rows = geometry.rows(s, o), heads = heads_with_offset(i, o);
          if (!rows.empty() && !heads.empty()) result.push_back({i, s, o, rows, heads});
        }
    }
    return result;
  }

  // visit(branch, block, inside) for every block query head `head` takes part in -- branch i's
  // rows of one segment with the head's offset -- that has rows in [lo, hi), with those rows
  // (`inside`), branch by branch, segments in order: the loop of every window-based kernel.
  template <class Visit>
  void for_each_block_in(std::int64_t head, std::int64_t lo, std::int64_t hi, Visit&& visit) const {
    for (std::int64_t i = 0; i < num_branches(); ++i) {
      const std::int64_t o = offset(i, head);
      if (o < 0) continue;  // partitioned: this head does not run branch i
      const BranchGeometry geometry = branch(i);
      for (std::int64_t s = geometry.segment_of(lo); s <= geometry.segment_of(hi - 1); ++s) {
        const Progression block = geometry.rows(s, o);
        const Progression inside = block.within(lo, hi);
        if (!inside.empty()) visit(i, block, inside);
      }
    }
  }

  // Attended (query, key) pairs over all batches, heads and branches; a pair that two branches
  // both attend counts twice, since both are computed.
  std::int64_t attended_pairs() const {
    std::int64_t pairs = 0;
    for (const Block& block : blocks())
      pairs += block.heads.count * block_pairs(block.rows.count, config_.causal);
    return pairs * shape_.batch;
  }

  // The useful floating-point work: 4 * head_dim per attended pair (2 for q.k, 2 for p*v).
  double useful_flops() const {
    return 4.0 * static_cast<double>(shape_.head_dim) * static_cast<double>(attended_pairs());
  }

 private:
  Config config_;
  Shape shape_;
};

}  // namespace dilated_attention
