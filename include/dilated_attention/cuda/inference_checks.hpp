#pragma once
// The argument checks of the CUDA inference forms (cuda/inference.cuh; docs/cuda.md "Inference
// forms"), in plain C++ so that they run, and are tested, without a GPU. Every check reads only
// host memory: the Sequences arrays, the page table and the valid lengths of a CUDA call are HOST
// arrays (docs/cuda.md says why), the tensors are device pointers whose addresses and strides
// are only compared, never dereferenced. Messages name the member, as validate() does.
//
// These are the CUDA side's own copy of the checks; when the shared, device-agnostic validation
// of the Sequences / PagedKeyValues descriptions lands (the CPU forms use it too), these
// functions forward to it and keep their names.

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../config.hpp"
#include "../sequences.hpp"

namespace dilated_attention::cuda::checks {

using dilated_attention::detail::reject;

// The heads of a call without a seq_len of its own: the rules of validate(config, shape) with
// a stand-in length (the longest sequence, at least 1).
inline void check_heads(const Config& config, const HeadShape& heads, std::int64_t longest) {
  validate(config, Shape{1, std::max<std::int64_t>(longest, 1), heads.num_heads, heads.num_kv_heads,
                         heads.head_dim});
}

// [lo, hi] of the bytes a view over `rows` rows of one batch element can touch (rows > 0).
template <class T>
dilated_attention::detail::ByteRange rows_range(const View<T>& view, std::int64_t rows,
                                                std::int64_t heads, std::int64_t head_dim,
                                                std::int64_t batch = 1) {
  return dilated_attention::detail::byte_range(view, Shape{batch, rows, heads, heads, head_dim},
                                               heads);
}

inline dilated_attention::detail::ByteRange float_range(const float* data, std::int64_t count) {
  const auto lo = reinterpret_cast<std::uintptr_t>(data);
  return {lo, lo + static_cast<std::uintptr_t>(count) * sizeof(float) - 1};
}

// out and lse (lse_count floats, may be null) must not share memory with one another or with
// any of the inputs.
inline void check_disjoint(const dilated_attention::detail::ByteRange& out, const float* lse,
                           std::int64_t lse_count,
                           const dilated_attention::detail::ByteRange (&inputs)[3],
                           const char* const (&names)[3]) {
  for (int i = 0; i < 3; ++i)
    if (out.overlaps(inputs[i]))
      reject("out overlaps ", names[i],
             ": the output must not share memory with an input (the address ranges intersect)");
  if (lse == nullptr || lse_count <= 0) return;
  const auto lse_bytes = float_range(lse, lse_count);
  if (lse_bytes.overlaps(out)) reject("lse overlaps out: the two outputs must not share memory");
  for (int i = 0; i < 3; ++i)
    if (lse_bytes.overlaps(inputs[i]))
      reject("lse overlaps ", names[i], ": an output must not share memory with an input");
}

// Form 1: `range` of the rows of a forward over shape.seq_len (= kv_len) positions; q and out
// hold range.count rows, k and v shape.seq_len.
template <class T>
void check_query_range(const Config& config, const Shape& shape, const QueryRange& range,
                       const View<const T>& q, const View<const T>& k, const View<const T>& v,
                       const View<T>& out, const float* lse) {
  validate(config, shape);
  if (range.begin < 0) reject("range.begin = ", range.begin, ": must be non-negative");
  if (range.count <= 0) reject("range.count = ", range.count, ": must be positive");
  if (range.begin > shape.seq_len - range.count)
    reject("range.begin + range.count = ", range.begin, " + ", range.count,
           " exceeds shape.seq_len = ", shape.seq_len,
           ": the query rows must lie among the kv_len positions");
  const Shape rows{shape.batch, range.count, shape.num_heads, shape.num_kv_heads, shape.head_dim};
  dilated_attention::detail::check_view("q", q, rows, shape.num_heads, false);
  dilated_attention::detail::check_view("k", k, shape, shape.num_kv_heads, false);
  dilated_attention::detail::check_view("v", v, shape, shape.num_kv_heads, false);
  dilated_attention::detail::check_view("out", out, rows, shape.num_heads, true);
  const dilated_attention::detail::ByteRange inputs[3] = {
      dilated_attention::detail::byte_range(q, rows, shape.num_heads),
      dilated_attention::detail::byte_range(k, shape, shape.num_kv_heads),
      dilated_attention::detail::byte_range(v, shape, shape.num_kv_heads)};
  check_disjoint(dilated_attention::detail::byte_range(out, rows, shape.num_heads), lse,
                 shape.batch * shape.num_heads * range.count, inputs, {"q", "k", "v"});
}

// A Sequences description: packed K/V (kv_offsets, no kv_lengths) or paged (kv_lengths, no
// kv_offsets). Returns the longest kv length.
inline std::int64_t check_sequences(const Sequences& s, bool paged) {
  if (s.count <= 0) reject("sequences.count = ", s.count, ": must be positive");
  if (s.query_offsets == nullptr)
    reject("sequences.query_offsets is null: it needs sequences.count + 1 = ", s.count + 1,
           " entries");
  if (paged) {
    if (s.kv_lengths == nullptr)
      reject("sequences.kv_lengths is null: with paged K/V it gives each sequence's length");
    if (s.kv_offsets != nullptr)
      reject(
          "sequences.kv_offsets is set with paged K/V: the keys' positions come from the "
          "page table, the lengths from sequences.kv_lengths (set kv_offsets to null)");
  } else {
    if (s.kv_offsets == nullptr)
      reject("sequences.kv_offsets is null: packed K/V need sequences.count + 1 = ", s.count + 1,
             " entries (cu_seqlens_k)");
    if (s.kv_lengths != nullptr)
      reject(
          "sequences.kv_lengths is set with packed K/V: the lengths come from "
          "sequences.kv_offsets (set kv_lengths to null)");
  }
  if (s.query_offsets[0] != 0)
    reject("sequences.query_offsets[0] = ", s.query_offsets[0], ": must be 0");
  if (!paged && s.kv_offsets[0] != 0)
    reject("sequences.kv_offsets[0] = ", s.kv_offsets[0], ": must be 0");
  std::int64_t longest = 0;
  for (std::int64_t b = 0; b < s.count; ++b) {
    if (s.query_offsets[b + 1] < s.query_offsets[b])
      reject("sequences.query_offsets[", b + 1, "] = ", s.query_offsets[b + 1],
             " is less than sequences.query_offsets[", b, "] = ", s.query_offsets[b],
             ": offsets must not decrease");
    if (!paged && s.kv_offsets[b + 1] < s.kv_offsets[b])
      reject("sequences.kv_offsets[", b + 1, "] = ", s.kv_offsets[b + 1],
             " is less than sequences.kv_offsets[", b, "] = ", s.kv_offsets[b],
             ": offsets must not decrease");
    if (paged && s.kv_lengths[b] < 0)
      reject("sequences.kv_lengths[", b, "] = ", s.kv_lengths[b], ": must be non-negative");
    const std::int64_t kv = s.kv_length(b), count = s.query_count(b);
    if (s.query_begins != nullptr) {
      if (s.query_begins[b] < 0)
        reject("sequences.query_begins[", b, "] = ", s.query_begins[b], ": must be non-negative");
      if (s.query_begins[b] > kv - count)
        reject("sequences.query_begins[", b, "] + query count = ", s.query_begins[b], " + ", count,
               " exceeds the kv length ", kv, " of sequence ", b,
               ": its query rows must lie among its positions");
    } else if (count > kv) {
      reject("sequences.query_offsets give sequence ", b, " ", count,
             " query rows but its kv length is ", kv, ": a sequence has at most kv_length queries");
    }
    longest = std::max(longest, kv);
  }
  return longest;
}

// Form 2: packed q/out [total_q, H, D], k/v [total_k, Hkv, D] (views with batch dimension 1).
template <class T>
void check_varlen(const Config& config, const HeadShape& heads, const Sequences& s,
                  const View<const T>& q, const View<const T>& k, const View<const T>& v,
                  const View<T>& out, const float* lse) {
  const std::int64_t longest = check_sequences(s, false);
  check_heads(config, heads, longest);
  const std::int64_t total_q = s.query_offsets[s.count], total_k = s.kv_offsets[s.count];
  const auto shape_of = [&](std::int64_t rows, std::int64_t h) {
    return Shape{1, std::max<std::int64_t>(rows, 1), h, heads.num_kv_heads, heads.head_dim};
  };
  // Views over no rows are never read: only their pointers must be there.
  if (total_q > 0) {
    dilated_attention::detail::check_view("q", q, shape_of(total_q, heads.num_heads),
                                          heads.num_heads, false);
    dilated_attention::detail::check_view("out", out, shape_of(total_q, heads.num_heads),
                                          heads.num_heads, true);
  }
  if (total_k > 0) {
    dilated_attention::detail::check_view("k", k, shape_of(total_k, heads.num_kv_heads),
                                          heads.num_kv_heads, false);
    dilated_attention::detail::check_view("v", v, shape_of(total_k, heads.num_kv_heads),
                                          heads.num_kv_heads, false);
  }
  if (total_q <= 0 || total_k <= 0) return;
  const dilated_attention::detail::ByteRange inputs[3] = {
      rows_range(q, total_q, heads.num_heads, heads.head_dim),
      rows_range(k, total_k, heads.num_kv_heads, heads.head_dim),
      rows_range(v, total_k, heads.num_kv_heads, heads.head_dim)};
  check_disjoint(rows_range(out, total_q, heads.num_heads, heads.head_dim), lse,
                 heads.num_heads * total_q, inputs, {"q", "k", "v"});
}

// The bytes the pages of one of paged.k / paged.v span.
template <class T>
dilated_attention::detail::ByteRange pages_range(const T* data, const PagedKeyValues<T>& paged,
                                                 const HeadShape& heads) {
  const std::int64_t last = (paged.num_pages - 1) * paged.page_stride +
                            (paged.page_size - 1) * paged.row_stride +
                            (heads.num_kv_heads - 1) * paged.head_stride + heads.head_dim - 1;
  const auto lo = reinterpret_cast<std::uintptr_t>(data);
  return {lo, lo + static_cast<std::uintptr_t>(last + 1) * sizeof(T) - 1};
}

// Form 3: packed q/out [total_q, H, D] and the pages of `paged`; sequences.kv_lengths give the
// lengths. Every page-table entry a sequence uses (its first ceil(kv_length / page_size)) must
// name a page; the others are never read.
template <class T>
void check_paged(const Config& config, const HeadShape& heads, const Sequences& s,
                 const View<const T>& q, const PagedKeyValues<T>& paged, const View<T>& out,
                 const float* lse) {
  const std::int64_t longest = check_sequences(s, true);
  check_heads(config, heads, longest);
  if (paged.k == nullptr) reject("paged.k is null: the key pages must point to memory");
  if (paged.v == nullptr) reject("paged.v is null: the value pages must point to memory");
  if (paged.num_pages <= 0) reject("paged.num_pages = ", paged.num_pages, ": must be positive");
  if (paged.page_size <= 0)
    reject("paged.page_size = ", paged.page_size, ": must be positive (any size >= 1)");
  if (paged.page_stride < 0 || paged.row_stride < 0 || paged.head_stride < 0)
    reject("paged strides (page ", paged.page_stride, ", row ", paged.row_stride, ", head ",
           paged.head_stride, ") must be non-negative");
  const double span =
      (static_cast<double>(paged.num_pages) * static_cast<double>(paged.page_stride) +
       static_cast<double>(paged.page_size) * static_cast<double>(paged.row_stride) +
       static_cast<double>(heads.num_kv_heads) * static_cast<double>(paged.head_stride)) *
      sizeof(T);
  if (span > 0x1p62)
    reject("paged strides (page ", paged.page_stride, ", row ", paged.row_stride, ", head ",
           paged.head_stride, ") span more than 2^62 bytes: they cannot be addressed");
  if (paged.page_table == nullptr)
    reject("paged.page_table is null: each sequence needs its pages");
  const std::int64_t most_pages = (longest + paged.page_size - 1) / paged.page_size;
  if (paged.page_table_stride < most_pages)
    reject("paged.page_table_stride = ", paged.page_table_stride, " is less than the ", most_pages,
           " pages of the longest sequence (kv length ", longest, ", paged.page_size ",
           paged.page_size, ")");
  for (std::int64_t b = 0; b < s.count; ++b) {
    const std::int64_t pages = (s.kv_lengths[b] + paged.page_size - 1) / paged.page_size;
    for (std::int64_t j = 0; j < pages; ++j) {
      const std::int64_t at = b * paged.page_table_stride + j;
      const std::int32_t page = paged.page_table[at];
      if (page < 0 || page >= paged.num_pages)
        reject("paged.page_table[", at, "] = ", page, " (sequence ", b, ", page ", j,
               ") is not a page (num_pages = ", paged.num_pages, ")");
    }
  }
  const std::int64_t total_q = s.query_offsets[s.count];
  if (total_q <= 0) return;
  const Shape rows{1, total_q, heads.num_heads, heads.num_kv_heads, heads.head_dim};
  dilated_attention::detail::check_view("q", q, rows, heads.num_heads, false);
  dilated_attention::detail::check_view("out", out, rows, heads.num_heads, true);
  const dilated_attention::detail::ByteRange inputs[3] = {
      rows_range(q, total_q, heads.num_heads, heads.head_dim), pages_range(paged.k, paged, heads),
      pages_range(paged.v, paged, heads)};
  check_disjoint(rows_range(out, total_q, heads.num_heads, heads.head_dim), lse,
                 heads.num_heads * total_q, inputs, {"q", "paged.k", "paged.v"});
}

// Form 4: the usual [B, N, H, D] call with lengths.lengths[b] <= N valid rows per element.
template <class T>
void check_padded(const Config& config, const Shape& shape, const ValidLengths& lengths,
                  const View<const T>& q, const View<const T>& k, const View<const T>& v,
                  const View<T>& out, const float* lse) {
  validate(config, shape, q, k, v, out, lse);
  if (lengths.lengths == nullptr)
    reject("lengths.lengths is null: it needs shape.batch = ", shape.batch, " entries");
  for (std::int64_t b = 0; b < shape.batch; ++b)
    if (lengths.lengths[b] < 0 || lengths.lengths[b] > shape.seq_len)
      reject("lengths.lengths[", b, "] = ", lengths.lengths[b],
             ": must lie in [0, shape.seq_len = ", shape.seq_len, "]");
}

}  // namespace dilated_attention::cuda::checks
