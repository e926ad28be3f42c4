#pragma once
// The bad-input rules of the inference forms (docs/semantics.md "Inference forms"), shared by
// every device: plain C++ over the descriptions of sequences.hpp and the views of config.hpp.
// Each function raises std::invalid_argument naming the member before the caller writes any
// output, exactly as validate() does for the ordinary forward.

#include <cstdint>
#include <limits>
#include <vector>

#include "config.hpp"
#include "sequences.hpp"

namespace dilated_attention {

namespace detail {

// One named address range of a call, for the overlap rules.
struct NamedBytes {
  const char* name;
  ByteRange bytes;
};

template <class L>
NamedBytes lse_bytes(const char* name, const L* lse, std::int64_t count) {
  const auto lo = reinterpret_cast<std::uintptr_t>(lse);
  return {name, {lo, lo + static_cast<std::uintptr_t>(count) * sizeof(L) - 1}};
}

// Every output disjoint from every input and from the other outputs.
inline void check_disjoint(const NamedBytes* inputs, int num_inputs, const NamedBytes* outputs,
                           int num_outputs) {
  for (int o = 0; o < num_outputs; ++o) {
    for (int i = 0; i < num_inputs; ++i)
      if (outputs[o].bytes.overlaps(inputs[i].bytes))
        reject(outputs[o].name, " overlaps ", inputs[i].name,
               ": an output must not share memory with an input (the address ranges intersect)");
    for (int other = 0; other < o; ++other)
      if (outputs[o].bytes.overlaps(outputs[other].bytes))
        reject(outputs[o].name, " overlaps ", outputs[other].name,
               ": the outputs must not share memory with each other");
  }
}

inline Shape rows_shape(const Shape& shape, std::int64_t rows) {
  return {shape.batch, rows, shape.num_heads, shape.num_kv_heads, shape.head_dim};
}

inline Shape packed_shape(const HeadShape& heads, std::int64_t rows) {
  return {1, rows, heads.num_heads, heads.num_kv_heads, heads.head_dim};
}

inline void check_query_range(const Shape& shape, const QueryRange& range) {
  if (range.begin < 0) reject("query_range.begin = ", range.begin, ": must be non-negative");
  if (range.count <= 0)
    reject("query_range.count = ", range.count, ": at least one query row is required");
  if (range.begin > shape.seq_len - range.count)
    reject("query_range.begin + query_range.count = ", range.begin, " + ", range.count, " = ",
           range.begin + range.count, " exceeds shape.seq_len = ", shape.seq_len,
           " (kv_len): the queries must lie among the keys");
}

// The sequence rules; `paged` says which key description is expected. Returns the longest
// kv_length (the pattern rules are checked against it by the caller).
inline std::int64_t check_sequences(const Sequences& s, bool paged) {
  if (s.count <= 0) reject("sequences.count = ", s.count, ": the batch is empty");
  if (s.query_offsets == nullptr)
    reject("sequences.query_offsets is null: B + 1 row offsets of the packed queries are required");
  if (s.query_offsets[0] != 0)
    reject("sequences.query_offsets[0] = ", s.query_offsets[0], ": the first offset must be 0");
  for (std::int64_t b = 0; b < s.count; ++b)
    if (s.query_offsets[b + 1] < s.query_offsets[b])
      reject("sequences.query_offsets[", b + 1, "] = ", s.query_offsets[b + 1],
             " is less than sequences.query_offsets[", b, "] = ", s.query_offsets[b],
             ": offsets must not decrease");
  if (paged) {
    if (s.kv_offsets != nullptr)
      reject(
          "sequences.kv_offsets is not null: paged keys and values take sequences.kv_lengths "
          "(the pages say where the rows are)");
    if (s.kv_lengths == nullptr)
      reject("sequences.kv_lengths is null: paged keys and values need each sequence's length");
  } else {
    if (s.kv_offsets == nullptr)
      reject("sequences.kv_offsets is null: packed keys and values need B + 1 row offsets");
    if (s.kv_lengths != nullptr)
      reject(
          "sequences.kv_lengths is not null: with packed keys and values the lengths come from "
          "sequences.kv_offsets (set one of the two)");
    if (s.kv_offsets[0] != 0)
      reject("sequences.kv_offsets[0] = ", s.kv_offsets[0], ": the first offset must be 0");
    for (std::int64_t b = 0; b < s.count; ++b)
      if (s.kv_offsets[b + 1] < s.kv_offsets[b])
        reject("sequences.kv_offsets[", b + 1, "] = ", s.kv_offsets[b + 1],
               " is less than sequences.kv_offsets[", b, "] = ", s.kv_offsets[b],
               ": offsets must not decrease");
  }
  std::int64_t longest = 0;
  for (std::int64_t b = 0; b < s.count; ++b) {
    const std::int64_t length = s.kv_length(b), queries = s.query_count(b);
    if (length < 0)
      reject("sequences.kv_lengths[", b, "] = ", length, ": lengths must be non-negative");
    if (s.query_begins != nullptr && s.query_begins[b] < 0)
      reject("sequences.query_begins[", b, "] = ", s.query_begins[b], ": must be non-negative");
    const std::int64_t begin = s.query_begin(b);
    if (begin < 0 || begin > length - queries)
      reject("sequence ", b, ": query_begin + query_count = ", begin, " + ", queries, " = ",
             begin + queries, " exceeds its kv_length = ", length,
             " (sequences.query_offsets / query_begins / kv_", paged ? "lengths" : "offsets",
             "): the queries must lie among the keys");
    longest = std::max(longest, length);
  }
  if (s.total_queries() <= 0)
    reject("sequences.query_offsets[", s.count, "] = 0: the batch has no query rows");
  return longest;
}

}  // namespace detail

// Queries at an offset (decode, chunked prefill): q, out [B, count, H, D]; k, v [B, kv_len, Hkv,
// D] with kv_len = shape.seq_len; lse (optional) [B, H, count].
template <class T, class L>
void validate_query_range(const Config& config, const Shape& shape, const QueryRange& range,
                          const View<const T>& q, const View<const T>& k, const View<const T>& v,
                          const View<T>& out, const L* lse) {
  validate(config, shape);
  detail::check_query_range(shape, range);
  const Shape rows = detail::rows_shape(shape, range.count);
  detail::check_view("q", q, rows, shape.num_heads, false);
  detail::check_view("k", k, shape, shape.num_kv_heads, false);
  detail::check_view("v", v, shape, shape.num_kv_heads, false);
  detail::check_view("out", out, rows, shape.num_heads, true);
  const detail::NamedBytes inputs[3] = {{"q", detail::byte_range(q, rows, shape.num_heads)},
                                        {"k", detail::byte_range(k, shape, shape.num_kv_heads)},
                                        {"v", detail::byte_range(v, shape, shape.num_kv_heads)}};
  detail::NamedBytes outputs[2] = {{"out", detail::byte_range(out, rows, shape.num_heads)}, {}};
  if (lse != nullptr)
    outputs[1] = detail::lse_bytes("lse", lse, shape.batch * shape.num_heads * range.count);
  detail::check_disjoint(inputs, 3, outputs, lse != nullptr ? 2 : 1);
}

// Its backward: d_out, d_q like q; d_k, d_v like k; the forward's out and lse (not null).
template <class T, class L>
void validate_query_range_backward(const Config& config, const Shape& shape,
                                   const QueryRange& range, const View<const T>& q,
                                   const View<const T>& k, const View<const T>& v,
                                   const View<const T>& out, const L* lse,
                                   const View<const T>& d_out, const View<T>& d_q,
                                   const View<T>& d_k, const View<T>& d_v) {
  validate(config, shape);
  detail::check_query_range(shape, range);
  const Shape rows = detail::rows_shape(shape, range.count);
  const std::int64_t H = shape.num_heads, G = shape.num_kv_heads;
  detail::check_view("q", q, rows, H, false);
  detail::check_view("k", k, shape, G, false);
  detail::check_view("v", v, shape, G, false);
  detail::check_view("out", out, rows, H, false);
  if (lse == nullptr)
    detail::reject(
        "lse is null: backward needs the [batch, num_heads, count] LSE that forward returned");
  detail::check_view("d_out", d_out, rows, H, false);
  detail::check_view("d_q", d_q, rows, H, true);
  detail::check_view("d_k", d_k, shape, G, true);
  detail::check_view("d_v", d_v, shape, G, true);
  const detail::NamedBytes inputs[6] = {
      {"q", detail::byte_range(q, rows, H)},
      {"k", detail::byte_range(k, shape, G)},
      {"v", detail::byte_range(v, shape, G)},
      {"out", detail::byte_range(out, rows, H)},
      detail::lse_bytes("lse", lse, shape.batch * H * range.count),
      {"d_out", detail::byte_range(d_out, rows, H)}};
  const detail::NamedBytes outputs[3] = {{"d_q", detail::byte_range(d_q, rows, H)},
                                         {"d_k", detail::byte_range(d_k, shape, G)},
                                         {"d_v", detail::byte_range(d_v, shape, G)}};
  detail::check_disjoint(inputs, 6, outputs, 3);
}

namespace detail {

// The head rules (GQA, partitioned) against the longest sequence, and the packed views.
inline Shape check_heads(const Config& config, const HeadShape& heads, std::int64_t longest) {
  const Shape shape{1, std::max<std::int64_t>(longest, 1), heads.num_heads, heads.num_kv_heads,
                    heads.head_dim};
  validate(config, shape);
  return shape;
}

template <class T>
void check_packed(const char* name, const View<T>& view, const HeadShape& heads, std::int64_t rows,
                  std::int64_t num_heads, bool is_output) {
  // A packed tensor has no batch dimension: [total, heads, D] as a view of batch 1.
  check_view(name, view, packed_shape(heads, rows), num_heads, is_output);
}

}  // namespace detail

// Variable-length batch with packed K/V: q, out [total_q, H, D]; k, v [total_k, Hkv, D] (views
// of batch 1, batch_stride unused); lse (optional) [H, total_q].
template <class T, class L>
void validate_sequences(const Config& config, const HeadShape& heads, const Sequences& sequences,
                        const View<const T>& q, const View<const T>& k, const View<const T>& v,
                        const View<T>& out, const L* lse) {
  const std::int64_t longest = detail::check_sequences(sequences, false);
  detail::check_heads(config, heads, longest);
  const std::int64_t total_q = sequences.total_queries(),
                     total_k = std::max<std::int64_t>(sequences.kv_offsets[sequences.count], 1);
  const Shape qs = detail::packed_shape(heads, total_q), ks = detail::packed_shape(heads, total_k);
  detail::check_packed("q", q, heads, total_q, heads.num_heads, false);
  detail::check_packed("k", k, heads, total_k, heads.num_kv_heads, false);
  detail::check_packed("v", v, heads, total_k, heads.num_kv_heads, false);
  detail::check_packed("out", out, heads, total_q, heads.num_heads, true);
  const detail::NamedBytes inputs[3] = {{"q", detail::byte_range(q, qs, heads.num_heads)},
                                        {"k", detail::byte_range(k, ks, heads.num_kv_heads)},
                                        {"v", detail::byte_range(v, ks, heads.num_kv_heads)}};
  detail::NamedBytes outputs[2] = {{"out", detail::byte_range(out, qs, heads.num_heads)}, {}};
  if (lse != nullptr) outputs[1] = detail::lse_bytes("lse", lse, heads.num_heads * total_q);
  detail::check_disjoint(inputs, 3, outputs, lse != nullptr ? 2 : 1);
}

// Its backward: packed d_out, d_q like q; d_k, d_v like k; out and lse (not null) as returned.
template <class T, class L>
void validate_sequences_backward(const Config& config, const HeadShape& heads,
                                 const Sequences& sequences, const View<const T>& q,
                                 const View<const T>& k, const View<const T>& v,
                                 const View<const T>& out, const L* lse, const View<const T>& d_out,
                                 const View<T>& d_q, const View<T>& d_k, const View<T>& d_v) {
  const std::int64_t longest = detail::check_sequences(sequences, false);
  detail::check_heads(config, heads, longest);
  const std::int64_t total_q = sequences.total_queries(),
                     total_k = std::max<std::int64_t>(sequences.kv_offsets[sequences.count], 1);
  const std::int64_t H = heads.num_heads, G = heads.num_kv_heads;
  const Shape qs = detail::packed_shape(heads, total_q), ks = detail::packed_shape(heads, total_k);
  detail::check_packed("q", q, heads, total_q, H, false);
  detail::check_packed("k", k, heads, total_k, G, false);
  detail::check_packed("v", v, heads, total_k, G, false);
  detail::check_packed("out", out, heads, total_q, H, false);
  if (lse == nullptr)
    detail::reject(
        "lse is null: backward needs the [num_heads, total_q] LSE that forward returned");
  detail::check_packed("d_out", d_out, heads, total_q, H, false);
  detail::check_packed("d_q", d_q, heads, total_q, H, true);
  detail::check_packed("d_k", d_k, heads, total_k, G, true);
  detail::check_packed("d_v", d_v, heads, total_k, G, true);
  const detail::NamedBytes inputs[6] = {
      {"q", detail::byte_range(q, qs, H)},        {"k", detail::byte_range(k, ks, G)},
      {"v", detail::byte_range(v, ks, G)},        {"out", detail::byte_range(out, qs, H)},
      detail::lse_bytes("lse", lse, H * total_q), {"d_out", detail::byte_range(d_out, qs, H)}};
  const detail::NamedBytes outputs[3] = {{"d_q", detail::byte_range(d_q, qs, H)},
                                         {"d_k", detail::byte_range(d_k, ks, G)},
                                         {"d_v", detail::byte_range(d_v, ks, G)}};
  detail::check_disjoint(inputs, 6, outputs, 3);
}

// Paged K/V: q, out [total_q, H, D]; the pages and page table of `paged`; lse [H, total_q].
template <class T, class L>
void validate_paged(const Config& config, const HeadShape& heads, const Sequences& sequences,
                    const View<const T>& q, const PagedKeyValues<T>& paged, const View<T>& out,
                    const L* lse) {
  using detail::reject;
  const std::int64_t longest = detail::check_sequences(sequences, true);
  detail::check_heads(config, heads, longest);
  if (paged.k == nullptr) reject("paged.k is null: every tensor must point to memory");
  if (paged.v == nullptr) reject("paged.v is null: every tensor must point to memory");
  if (paged.num_pages <= 0) reject("paged.num_pages = ", paged.num_pages, ": must be positive");
  if (paged.page_size <= 0) reject("paged.page_size = ", paged.page_size, ": must be positive");
  if (paged.page_stride < 0 || paged.row_stride < 0 || paged.head_stride < 0)
    reject("paged strides (page ", paged.page_stride, ", row ", paged.row_stride, ", head ",
           paged.head_stride, ") must be non-negative");
  const double span = (static_cast<double>(paged.num_pages - 1) * paged.page_stride +
                       static_cast<double>(paged.page_size - 1) * paged.row_stride +
                       static_cast<double>(heads.num_kv_heads - 1) * paged.head_stride +
                       static_cast<double>(heads.head_dim)) *
                      static_cast<double>(sizeof(T));
  if (span > 0x1p62)
    reject("paged strides span ", span, " bytes: more than 2^62 bytes cannot be addressed");
  if (paged.page_table == nullptr) reject("paged.page_table is null: a page table is required");
  const std::int64_t pages_needed = (longest + paged.page_size - 1) / paged.page_size;
  if (sequences.count > 1 && paged.page_table_stride < pages_needed)
    reject("paged.page_table_stride = ", paged.page_table_stride, " is less than the ",
           pages_needed, " pages of the longest sequence (", longest,
           " rows, paged.page_size = ", paged.page_size, ")");
  for (std::int64_t b = 0; b < sequences.count; ++b) {
    const std::int64_t pages = (sequences.kv_length(b) + paged.page_size - 1) / paged.page_size;
    for (std::int64_t j = 0; j < pages; ++j) {
      const std::int64_t page = paged.page_table[b * paged.page_table_stride + j];
      if (page < 0 || page >= paged.num_pages)
        reject("paged.page_table[", b, " * ", paged.page_table_stride, " + ", j, "] = ", page,
               " is not a page (paged.num_pages = ", paged.num_pages, ")");
    }
  }
  const std::int64_t total_q = sequences.total_queries();
  const Shape qs = detail::packed_shape(heads, total_q);
  detail::check_packed("q", q, heads, total_q, heads.num_heads, false);
  detail::check_packed("out", out, heads, total_q, heads.num_heads, true);
  const std::int64_t last = (paged.num_pages - 1) * paged.page_stride +
                            (paged.page_size - 1) * paged.row_stride +
                            (heads.num_kv_heads - 1) * paged.head_stride + heads.head_dim;
  auto pages_bytes = [&](const char* name, const T* base) {
    const auto lo = reinterpret_cast<std::uintptr_t>(base);
    return detail::NamedBytes{name, {lo, lo + static_cast<std::uintptr_t>(last) * sizeof(T) - 1}};
  };
  const auto table_lo = reinterpret_cast<std::uintptr_t>(paged.page_table);
  const std::int64_t table_entries =
      (sequences.count - 1) * paged.page_table_stride + std::max<std::int64_t>(pages_needed, 1);
  const detail::NamedBytes inputs[4] = {
      {"q", detail::byte_range(q, qs, heads.num_heads)},
      pages_bytes("paged.k", paged.k),
      pages_bytes("paged.v", paged.v),
      {"paged.page_table",
       {table_lo,
        table_lo + static_cast<std::uintptr_t>(table_entries) * sizeof(std::int32_t) - 1}}};
  detail::NamedBytes outputs[2] = {{"out", detail::byte_range(out, qs, heads.num_heads)}, {}};
  if (lse != nullptr) outputs[1] = detail::lse_bytes("lse", lse, heads.num_heads * total_q);
  detail::check_disjoint(inputs, 4, outputs, lse != nullptr ? 2 : 1);
}

inline void check_valid_lengths(const Shape& shape, const ValidLengths& valid) {
  if (valid.lengths == nullptr)
    detail::reject("valid_lengths.lengths is null: one length per batch element is required");
  for (std::int64_t b = 0; b < shape.batch; ++b) {
    if (valid.lengths[b] < 0)
      detail::reject("valid_lengths.lengths[", b, "] = ", valid.lengths[b],
                     ": lengths must be non-negative");
    if (valid.lengths[b] > shape.seq_len)
      detail::reject("valid_lengths.lengths[", b, "] = ", valid.lengths[b],
                     " exceeds shape.seq_len = ", shape.seq_len);
  }
}

// Padded batch: the ordinary forward's rules plus the lengths.
template <class T, class L>
void validate_valid_lengths(const Config& config, const Shape& shape, const ValidLengths& valid,
                            const View<const T>& q, const View<const T>& k, const View<const T>& v,
                            const View<T>& out, const L* lse) {
  validate(config, shape, q, k, v, out, lse);
  check_valid_lengths(shape, valid);
}

template <class T, class L>
void validate_valid_lengths_backward(const Config& config, const Shape& shape,
                                     const ValidLengths& valid, const View<const T>& q,
                                     const View<const T>& k, const View<const T>& v,
                                     const View<const T>& out, const L* lse,
                                     const View<const T>& d_out, const View<T>& d_q,
                                     const View<T>& d_k, const View<T>& d_v) {
  validate_backward(config, shape, q, k, v, out, lse, d_out, d_q, d_k, d_v);
  check_valid_lengths(shape, valid);
}

}  // namespace dilated_attention
