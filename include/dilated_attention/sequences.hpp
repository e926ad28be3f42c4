#pragma once
// What the inference forms add to a call (docs/semantics.md "Inference forms"): queries at an
// offset of their sequence (decode, chunked prefill), batches of sequences of different lengths
// (packed back to back, or padded), and keys/values kept in fixed-size pages. Every form computes
// rows of the ordinary forward over each sequence on its own: the library has no padded or
// phantom keys, so a causal row at position x depends on nothing after x and each form is exact.
//
// These are descriptions only (plain aggregates over caller memory, like View); the entry points
// that take them validate them (std::invalid_argument naming the member, before any write).

#include <cstdint>

#include "config.hpp"

namespace dilated_attention {

// `count` query rows at positions [begin, begin + count) of a sequence whose keys are its first
// shape.seq_len (= kv_len) positions; begin + count <= kv_len. The queries and outputs then hold
// `count` rows ([B, count, H, D]; LSE [B, H, count]) while K and V hold kv_len. Decode is
// {kv_len - 1, 1}; one chunk of a chunked prefill is {chunk_begin, chunk_rows}.
struct QueryRange {
  std::int64_t begin = 0;
  std::int64_t count = 0;
};

// The heads of a call whose sequence lengths come from a Sequences description.
struct HeadShape {
  std::int64_t num_heads, num_kv_heads, head_dim;
};

// B sequences of different lengths in one call (FlashAttention's varlen form). Sequence b has
// kv_length(b) positions and query_count(b) query rows at positions [query_begin(b),
// query_begin(b) + query_count(b)), which must end at or before kv_length(b).
//
//   query_offsets  B + 1 non-decreasing entries from 0 (cu_seqlens_q): sequence b's query rows
//                  are rows [query_offsets[b], query_offsets[b + 1]) of q and out, which are
//                  [total_q, H, D] (a View whose batch dimension is 1); LSE is [H, total_q].
//   kv_offsets     B + 1 non-decreasing entries from 0 (cu_seqlens_k): sequence b's keys are rows
//                  [kv_offsets[b], kv_offsets[b + 1]) of packed k and v ([total_k, Hkv, D]).
//                  Null when K/V are paged (then kv_lengths gives each sequence's length).
//   kv_lengths     B entries (cache_seqlens): the keys of each sequence when K/V are paged, or,
//                  with packed K/V, null.
//   query_begins   B entries: the position of each sequence's first query row; null means
//                  kv_length(b) - query_count(b), i.e. the queries are the sequence's last rows
//                  (prefill when the counts are equal, decode when query_count is 1).
//
// Each sequence is its own sequence: its segments start at its first position.
struct Sequences {
  std::int64_t count = 0;
  const std::int64_t* query_offsets = nullptr;
  const std::int64_t* kv_offsets = nullptr;
  const std::int64_t* kv_lengths = nullptr;
  const std::int64_t* query_begins = nullptr;

  std::int64_t query_count(std::int64_t b) const { return query_offsets[b + 1] - query_offsets[b]; }
  std::int64_t kv_length(std::int64_t b) const {
    return kv_offsets != nullptr ? kv_offsets[b + 1] - kv_offsets[b] : kv_lengths[b];
  }
  std::int64_t query_begin(std::int64_t b) const {
    return query_begins != nullptr ? query_begins[b] : kv_length(b) - query_count(b);
  }
  std::int64_t total_queries() const { return query_offsets[count]; }
};

// Keys and values in fixed-size pages (vLLM's and FlashAttention's block_table layout): row j of
// page p for kv head h is k + p * page_stride + j * row_stride + h * head_stride (likewise v);
// [num_pages, page_size, Hkv, D] contiguous is page_stride = page_size * Hkv * D, row_stride =
// Hkv * D, head_stride = D. Position y of sequence b lives on page
// page_table[b * page_table_stride + y / page_size], row y % page_size. Any page size >= 1;
// pages may be shared between sequences and appear in any order.
template <class T>
struct PagedKeyValues {
  const T* k = nullptr;
  const T* v = nullptr;
  std::int64_t num_pages = 0, page_size = 0;
  std::int64_t page_stride = 0, row_stride = 0, head_stride = 0;
  const std::int32_t* page_table = nullptr;
  std::int64_t page_table_stride = 0;
};

// A padded batch: the usual [B, N, H, D] tensors with lengths[b] <= N valid rows per element.
// Rows at or past a length are neither queries nor keys: their O is 0 and their LSE -inf, and
// the inputs there are never read.
struct ValidLengths {
  const std::int64_t* lengths = nullptr;
};

}  // namespace dilated_attention
