#pragma once
// Which global rows a rank's views hold (Options::layout).
//
// - contiguous: rank p of P holds [p*L, (p+1)*L), L = N/P.
// - zigzag: the sequence is cut into 2P chunks of C = N/(2P) rows; rank p holds chunk p, then
//   chunk 2P-1-p, in that order in its views (local rows 0..C-1 and C..2C-1), as Megatron's
//   context parallelism does. Causal work per rank is then balanced: inside any segment of w
//   rows, a chunk at position j of the w/C chunks does work proportional to 2j + 1, and its
//   partner chunk sits at position w/C - 1 - j whenever 2P*C = N is a multiple of w, so every
//   rank's pair sums to the same w/C. Needs N % (2P) == 0.
//
// Every other part of the ring (schedule, back end) sees a rank's rows only through rank_chunks:
// each chunk is a contiguous global range with its first local row.

#include <cstdint>
#include <vector>

#include "../../config.hpp"

namespace dilated_attention::ring {

enum class Layout { contiguous = 0, zigzag = 1 };

inline const char* to_string(Layout layout) {
  return layout == Layout::zigzag ? "zigzag" : "contiguous";
}

// Global rows [begin, end) held at local rows [local, local + end - begin).
struct Chunk {
  std::int64_t begin, end, local;
  std::int64_t length() const { return end - begin; }
  bool contains(std::int64_t x) const { return x >= begin && x < end; }
};

// Rejects a layout the partition cannot hold (docs/semantics.md "Bad input" style: names the parameter).
inline void validate_layout(Layout layout, std::int64_t seq_len, std::int64_t num_ranks) {
  if (layout != Layout::contiguous && layout != Layout::zigzag)
    dilated_attention::detail::reject("options.layout = ", static_cast<int>(layout),
                                      " is not a layout");
  if (layout == Layout::zigzag && num_ranks > 0 && seq_len % (2 * num_ranks) != 0)
    dilated_attention::detail::reject("shape.seq_len = ", seq_len,
                                      " is not a multiple of 2 * num_ranks = ", 2 * num_ranks,
                                      ": the zigzag layout cuts N into 2P equal chunks");
}

// The local row of global position x among `chunks` (-1 when no chunk holds it). A schedule's
// progression never crosses a chunk bound, so its rows are local_row(first) + j * stride.
inline std::int64_t local_row(const std::vector<Chunk>& chunks, std::int64_t x) {
  for (const Chunk& chunk : chunks)
    if (chunk.contains(x)) return chunk.local + (x - chunk.begin);
  return -1;
}

// The chunks rank `rank` holds, in local order.
inline std::vector<Chunk> rank_chunks(Layout layout, std::int64_t seq_len, std::int64_t num_ranks,
                                      std::int64_t rank) {
  if (layout == Layout::zigzag) {
    const std::int64_t c = seq_len / (2 * num_ranks);
    const std::int64_t partner = 2 * num_ranks - 1 - rank;
    return {{rank * c, (rank + 1) * c, 0}, {partner * c, (partner + 1) * c, c}};
  }
  const std::int64_t length = seq_len / num_ranks;
  return {{rank * length, (rank + 1) * length, 0}};
}

}  // namespace dilated_attention::ring
