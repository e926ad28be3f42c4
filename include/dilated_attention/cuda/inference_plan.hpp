#pragma once
// The launch plan of the CUDA inference forms (cuda/inference.cuh, docs/cuda.md "Inference
// forms"), in plain C++ so that the host emulation tests run it without a GPU.
//
// Every form is turned into the same thing: a list of sequences, each with
//   rows       output rows it owns (in a flattened row order: row_first(b) .. row_first(b+1)),
//   valid      how many of them are queries (the padded form's rows past a length are not:
//              their O is 0 and their LSE -inf),
//   local      the index of its first row along the seq dimension of q / out / lse,
//   q_begin    the position of its first query row in the sequence,
//   kv_len     its keys (the forward runs over kv_len positions: segments start at position 0),
//   kv_first   the row of its first key in packed K/V, or (paged) the first of its page-list entries,
// and the tensors' strides. The table of these int64 values (SequenceTable) is built on the host
// from the host arrays the call was given, and uploaded once per call (inference.cuh); the
// kernels (inference_kernel.cuh) find a row's sequence by binary search in row_first.
//
// Row addressing: row i of sequence b, head h of q is q + b * q_batch + (local(b) + i) * q_seq +
// h * q_head (out likewise; LSE at b * lse_batch + h * lse_head + local(b) + i). Key y of
// sequence b is k + b * k_batch + (kv_first(b) + y) * k_seq + kvh * k_head when packed, or
// k + page * page_stride + (y % page_size) * k_seq + kvh * k_head with page =
// pages[kv_first(b) + y / page_size] when paged: no gathered copy of the pages is made.
//
// Decode (every sequence has at most one query row) takes the split-KV path: the keys of each
// (row, head) are cut into fixed pieces -- by branch, then `piece_keys` keys of the branch's
// block at a time (a constant, never derived from the device) -- each computed by its own warp
// into a partial (o, lse); a second kernel merges a row's partials in the fixed piece order.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../arguments.hpp"
#include "../config.hpp"
#include "../sequences.hpp"
#include "../host_device.hpp"
#include "../pattern.hpp"
#include "../validate_sequences.hpp"
#include "launch_checks.hpp"
#include "launch_plan.hpp"

namespace dilated_attention::cuda {

// Keys per piece of the split-KV decode path: fixed, so results do not depend on the device.
inline constexpr std::int64_t decode_piece_keys = 256;
// The most split-KV pieces per (row, head); beyond, decode runs on the row kernel.
inline constexpr std::int64_t max_decode_pieces = 1 << 16;
// Warps per block of the inference kernels (one (row, head) or one piece per warp).
inline constexpr int inference_warps = 4;

// The per-sequence table, struct of arrays in one int64 buffer: row_first [B + 1], then local,
// valid, q_begin, kv_len, kv_first [B each], then the page list (paged form).
struct SequenceTable {
  std::int64_t count = 0;
  std::vector<std::int64_t> values;  // 7 B + 1 + pages entries
};

struct InferenceParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // or null
  std::int64_t q_batch, q_seq, q_head;
  std::int64_t k_batch, k_seq, k_head;
  std::int64_t v_batch, v_seq, v_head;
  std::int64_t o_batch, o_seq, o_head;
  std::int64_t lse_batch, lse_head;
  std::int64_t sequences, rows;  // rows: all output rows of all sequences
  std::int64_t heads, kv_heads, head_dim;
  int num_branches;
  BranchParams branches[max_branches];
  OffsetRule offsets;
  Mixing mixing;
  bool causal;
  bool paged;
  std::int64_t page_size, page_stride;
  float scale_log2;
  const std::int64_t* table;  // SequenceTable::values, in device memory (host in the emulation)
  // Split-KV decode: pieces per (row, head), the first piece of each branch, keys per piece, and
  // the partials: o [rows * heads * pieces][head_dim], lse [rows * heads * pieces] (natural log).
  int pieces;
  int piece_base[max_branches + 1];
  std::int64_t piece_keys;
  float* partial_o;
  float* partial_lse;

  DILATED_ATTENTION_HOST_DEVICE std::int64_t row_first(std::int64_t b) const { return table[b]; }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t local(std::int64_t b) const {
    return table[sequences + 1 + b];
  }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t valid(std::int64_t b) const {
    return table[2 * sequences + 1 + b];
  }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t q_begin(std::int64_t b) const {
    return table[3 * sequences + 1 + b];
  }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t kv_len(std::int64_t b) const {
    return table[4 * sequences + 1 + b];
  }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t kv_first(std::int64_t b) const {
    return table[5 * sequences + 1 + b];
  }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t page(std::int64_t entry) const {
    return table[7 * sequences + 1 + entry];
  }
  // The sequence that owns flattened row `row`: the last b with row_first(b) <= row (so that
  // sequences without rows are skipped).
  DILATED_ATTENTION_HOST_DEVICE std::int64_t sequence_of(std::int64_t row) const {
    std::int64_t lo = 0, hi = sequences;  // row_first(lo) <= row < row_first(hi)
    while (hi - lo > 1) {
      const std::int64_t mid = lo + (hi - lo) / 2;
      if (row_first(mid) <= row)
        lo = mid;
      else
        hi = mid;
    }
    return lo;
  }
  DILATED_ATTENTION_HOST_DEVICE BranchGeometry branch(int i, std::int64_t n) const {
    return {branches[i].w, branches[i].r, n};
  }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t offset(int i, std::int64_t head) const {
    return head_offset(offsets, i, num_branches, branches[i].r, head, heads);
  }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t kv_head(std::int64_t head) const {
    return head / (heads / kv_heads);
  }
  // Element offset of key row y of sequence b (without the head), for K (k_*) or V (v_*).
  DILATED_ATTENTION_HOST_DEVICE std::int64_t key_row(std::int64_t b, std::int64_t y,
                                                     std::int64_t batch_stride,
                                                     std::int64_t seq_stride) const {
    if (paged) {
      const std::int64_t entry = kv_first(b) + y / page_size;
      return page(entry) * page_stride + (y % page_size) * seq_stride;
    }
    return b * batch_stride + (kv_first(b) + y) * seq_stride;
  }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t q_row(std::int64_t b, std::int64_t i,
                                                   std::int64_t head) const {
    return b * q_batch + (local(b) + i) * q_seq + head * q_head;
  }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t out_row(std::int64_t b, std::int64_t i,
                                                     std::int64_t head) const {
    return b * o_batch + (local(b) + i) * o_seq + head * o_head;
  }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t lse_at(std::int64_t b, std::int64_t i,
                                                    std::int64_t head) const {
    return b * lse_batch + head * lse_head + local(b) + i;
  }
  // The branch of piece `piece` (piece_base[i] <= piece < piece_base[i + 1]).
  DILATED_ATTENTION_HOST_DEVICE int piece_branch(int piece) const {
    int i = 0;
    while (i + 1 < num_branches && piece_base[i + 1] <= piece) ++i;
    return i;
  }
};

// The keys of chunk `chunk` of a branch's key set: piece_keys of them at a time, in order.
DILATED_ATTENTION_HOST_DEVICE Progression piece_slice(const Progression& keys, std::int64_t chunk,
                                                      std::int64_t piece_keys) {
  return keys.slice(chunk * piece_keys, chunk * piece_keys + piece_keys);
}
// How many pieces a branch's key set of `count` keys needs.
DILATED_ATTENTION_HOST_DEVICE std::int64_t piece_count(std::int64_t count,
                                                       std::int64_t piece_keys) {
  return (count + piece_keys - 1) / piece_keys;
}

// One sequence as the plan sees it.
struct SequenceRecord {
  std::int64_t rows, valid, local, q_begin, kv_len, kv_first;
};

// What the plan needs besides the sequences: the tensors and their strides.
struct InferenceTensors {
  const void *q, *k, *v;
  void* out;
  float* lse;
  std::int64_t q_batch, q_seq, q_head;
  std::int64_t k_batch, k_seq, k_head;
  std::int64_t v_batch, v_seq, v_head;
  std::int64_t o_batch, o_seq, o_head;
  std::int64_t lse_batch, lse_head;
  bool paged = false;
  std::int64_t page_size = 1, page_stride = 0;
};

struct InferencePlan {
  InferenceParams params;
  SequenceTable table;
  bool split = false;             // split-KV decode (piece + merge kernels) or the row kernel
  std::int64_t items = 0;         // (row, head) pairs
  std::int64_t row_blocks = 0;    // grid of the row kernel, or of the merge kernel
  std::int64_t piece_blocks = 0;  // grid of the piece kernel
  int threads = 32 * inference_warps;
  std::size_t shared_bytes = 0;    // dynamic shared memory of the row and piece kernels
  std::size_t partial_floats = 0;  // o and lse partials of the split path
  bool empty() const { return items == 0; }
};

namespace detail {
inline std::int64_t capped_blocks(std::int64_t warps) {
  const std::int64_t wanted = (warps + inference_warps - 1) / inference_warps;
  return wanted < (std::int64_t{1} << 30) ? wanted : (std::int64_t{1} << 30);
}
}  // namespace detail

// Back end limits of the inference kernels: the compiled head dims and the branch cap, i.e. the
// head_dim and branch rules of check_backend_limits (launch_plan.hpp). Its grid rule is the
// forward kernel's, not these kernels': a stand-in shape of one row keeps it out of the way.
// The device-agnostic rules (validate_sequences.hpp) have run before.
inline void check_inference_limits(const Config& config, std::int64_t head_dim) {
  check_backend_limits(config, Shape{1, 1, 1, 1, head_dim});
}

// The plan from the sequences (validated) and the tensors. `pages`: the page list of the paged
// form (each sequence's entries from its kv_first on), empty otherwise. `split`: whether the
// split-KV decode path runs (only when no sequence has more than one query row).
template <class T>
InferencePlan make_inference_plan(const Config& config, std::int64_t num_heads,
                                  std::int64_t num_kv_heads, std::int64_t head_dim,
                                  const std::vector<SequenceRecord>& sequences,
                                  const std::vector<std::int64_t>& pages, const InferenceTensors& t,
                                  bool split, std::int64_t piece_keys = decode_piece_keys) {
  check_inference_limits(config, head_dim);
  const char* element = "every tensor element must be aligned to its type";
  check_alignment(t.q, alignof(T), "q.data", element);
  check_alignment(t.k, alignof(T), "k.data", element);
  check_alignment(t.v, alignof(T), "v.data", element);
  check_alignment(t.out, alignof(T), "out.data", element);
  if (t.lse != nullptr) check_alignment(t.lse, alignof(float), "lse", "lse is an array of float");
  if (piece_keys <= 0)
    dilated_attention::detail::reject("piece_keys = ", piece_keys, ": must be positive");

  InferencePlan plan{};
  const auto count = static_cast<std::int64_t>(sequences.size());
  SequenceTable& table = plan.table;
  table.count = count;
  table.values.assign(static_cast<std::size_t>(7 * count + 1), 0);
  std::int64_t rows = 0, longest = 0, most_queries = 0;
  for (std::int64_t b = 0; b < count; ++b) {
    const SequenceRecord& s = sequences[static_cast<std::size_t>(b)];
    const auto at = [&](int field) { return static_cast<std::size_t>(field * count + 1 + b); };
    table.values[static_cast<std::size_t>(b)] = rows;
    table.values[at(1)] = s.local;
    table.values[at(2)] = s.valid;
    table.values[at(3)] = s.q_begin;
    table.values[at(4)] = s.kv_len;
    table.values[at(5)] = s.kv_first;
    rows += s.rows;
    longest = std::max(longest, s.kv_len);
    most_queries = std::max(most_queries, s.valid);
  }
  table.values[static_cast<std::size_t>(count)] = rows;
  table.values.insert(table.values.end(), pages.begin(), pages.end());

  InferenceParams& p = plan.params;
  p.q = t.q, p.k = t.k, p.v = t.v, p.out = t.out, p.lse = t.lse;
  p.q_batch = t.q_batch, p.q_seq = t.q_seq, p.q_head = t.q_head;
  p.k_batch = t.k_batch, p.k_seq = t.k_seq, p.k_head = t.k_head;
  p.v_batch = t.v_batch, p.v_seq = t.v_seq, p.v_head = t.v_head;
  p.o_batch = t.o_batch, p.o_seq = t.o_seq, p.o_head = t.o_head;
  p.lse_batch = t.lse_batch, p.lse_head = t.lse_head;
  p.sequences = count, p.rows = rows;
  p.heads = num_heads, p.kv_heads = num_kv_heads, p.head_dim = head_dim;
  p.num_branches = static_cast<int>(config.segment_lengths.size());
  for (int i = 0; i < p.num_branches; ++i)
    p.branches[i] = {config.segment_lengths[static_cast<std::size_t>(i)],
                     config.dilation_rates[static_cast<std::size_t>(i)]};
  p.offsets = config.offsets;
  p.mixing = config.mixing;
  p.causal = config.causal;
  p.paged = t.paged;
  p.page_size = t.page_size, p.page_stride = t.page_stride;
  const double scale =
      config.scale == 0.0 ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : config.scale;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.table = nullptr;  // bound by the caller once the table is where the kernels read it
  p.piece_keys = piece_keys;

  plan.items = rows * num_heads;
  plan.shared_bytes = static_cast<std::size_t>(head_dim) * inference_warps * sizeof(float);
  // Pieces per (row, head): each branch's block has at most ceil(min(w, longest) / r) keys.
  // More than max_decode_pieces per row (a dense branch over more than 16M keys) would overflow
  // the kernels' int piece index: such calls take the row kernel instead.
  std::int64_t base[max_branches + 1] = {0};
  for (int i = 0; i < p.num_branches; ++i) {
    const std::int64_t w = p.branches[i].w, r = p.branches[i].r;
    const std::int64_t block_keys = (std::min(w, std::max<std::int64_t>(longest, 1)) + r - 1) / r;
    base[i + 1] = base[i] + piece_count(block_keys, piece_keys);
  }
  const bool few_pieces = base[p.num_branches] <= max_decode_pieces;
  for (int i = 0; i <= p.num_branches; ++i)
    p.piece_base[i] = few_pieces ? static_cast<int>(base[i]) : 0;
  p.pieces = p.piece_base[p.num_branches];
  plan.split = split && most_queries <= 1 && few_pieces;
  if (plan.split) {
    plan.piece_blocks = detail::capped_blocks(plan.items * p.pieces);
    plan.partial_floats =
        static_cast<std::size_t>(plan.items * p.pieces) * static_cast<std::size_t>(head_dim + 1);
  }
  plan.row_blocks = detail::capped_blocks(plan.items);
  return plan;
}

// The four forms: each validates its arguments with the shared, device-agnostic rules of
// validate_sequences.hpp (the ones the CPU forms use; LSE is float), before anything else, then
// describes its sequences and tensors and makes the plan, which adds the CUDA back end's own
// checks (check_inference_limits, check_alignment). cuda::forward (inference.cuh) runs the
// plan; the host emulation tests run the same plans on the CPU.

// Form 1: rows [range.begin, range.begin + range.count) of the forward over shape.seq_len.
template <class T>
InferencePlan plan_query_range(const Config& config, const Shape& shape, const QueryRange& range,
                               const Inputs<T>& in, const Outputs<T>& out,
                               std::int64_t piece_keys = decode_piece_keys) {
  validate_query_range<T>(config, shape, range, in.q, in.k, in.v, out.out, out.lse);
  std::vector<SequenceRecord> sequences(static_cast<std::size_t>(shape.batch));
  for (auto& s : sequences) s = {range.count, range.count, 0, range.begin, shape.seq_len, 0};
  InferenceTensors t{in.q.data,
                     in.k.data,
                     in.v.data,
                     out.out.data,
                     out.lse,
                     in.q.batch_stride,
                     in.q.seq_stride,
                     in.q.head_stride,
                     in.k.batch_stride,
                     in.k.seq_stride,
                     in.k.head_stride,
                     in.v.batch_stride,
                     in.v.seq_stride,
                     in.v.head_stride,
                     out.out.batch_stride,
                     out.out.seq_stride,
                     out.out.head_stride,
                     shape.num_heads * range.count,
                     range.count};
  return make_inference_plan<T>(config, shape.num_heads, shape.num_kv_heads, shape.head_dim,
                                sequences, {}, t, range.count == 1, piece_keys);
}

namespace detail {
inline std::vector<SequenceRecord> packed_records(const Sequences& s) {
  std::vector<SequenceRecord> records(static_cast<std::size_t>(s.count));
  for (std::int64_t b = 0; b < s.count; ++b)
    records[static_cast<std::size_t>(b)] = {
        s.query_count(b), s.query_count(b), s.query_offsets[b],
        s.query_begin(b), s.kv_length(b),   s.kv_offsets != nullptr ? s.kv_offsets[b] : 0};
  return records;
}
}  // namespace detail

// Form 2: varlen, packed q/out [total_q, H, D] and k/v [total_k, Hkv, D].
template <class T>
InferencePlan plan_varlen(const Config& config, const HeadShape& heads, const Sequences& s,
                          const Inputs<T>& in, const Outputs<T>& out,
                          std::int64_t piece_keys = decode_piece_keys) {
  validate_sequences<T>(config, heads, s, in.q, in.k, in.v, out.out, out.lse);
  const std::vector<SequenceRecord> records = detail::packed_records(s);
  InferenceTensors t{in.q.data,
                     in.k.data,
                     in.v.data,
                     out.out.data,
                     out.lse,
                     0,
                     in.q.seq_stride,
                     in.q.head_stride,
                     0,
                     in.k.seq_stride,
                     in.k.head_stride,
                     0,
                     in.v.seq_stride,
                     in.v.head_stride,
                     0,
                     out.out.seq_stride,
                     out.out.head_stride,
                     0,
                     s.total_queries()};
  return make_inference_plan<T>(config, heads.num_heads, heads.num_kv_heads, heads.head_dim,
                                records, {}, t, true, piece_keys);
}

// Form 3: packed q/out [total_q, H, D], K/V in pages; sequences.kv_lengths give the lengths.
template <class T>
InferencePlan plan_paged(const Config& config, const HeadShape& heads, const Sequences& s,
                         const View<const T>& q, const PagedKeyValues<T>& paged,
                         const Outputs<T>& out, std::int64_t piece_keys = decode_piece_keys) {
  validate_paged<T>(config, heads, s, q, paged, out.out, out.lse);
  std::vector<SequenceRecord> records = detail::packed_records(s);
  std::vector<std::int64_t> pages;
  for (std::int64_t b = 0; b < s.count; ++b) {
    records[static_cast<std::size_t>(b)].kv_first = static_cast<std::int64_t>(pages.size());
    const std::int64_t used = (s.kv_lengths[b] + paged.page_size - 1) / paged.page_size;
    for (std::int64_t j = 0; j < used; ++j)
      pages.push_back(paged.page_table[b * paged.page_table_stride + j]);
  }
  InferenceTensors t{q.data,
                     paged.k,
                     paged.v,
                     out.out.data,
                     out.lse,
                     0,
                     q.seq_stride,
                     q.head_stride,
                     0,
                     paged.row_stride,
                     paged.head_stride,
                     0,
                     paged.row_stride,
                     paged.head_stride,
                     0,
                     out.out.seq_stride,
                     out.out.head_stride,
                     0,
                     s.total_queries(),
                     true,
                     paged.page_size,
                     paged.page_stride};
  return make_inference_plan<T>(config, heads.num_heads, heads.num_kv_heads, heads.head_dim,
                                records, pages, t, true, piece_keys);
}

// Form 4: padded [B, N, H, D] with lengths.lengths[b] valid rows (O 0, LSE -inf past them).
template <class T>
InferencePlan plan_padded(const Config& config, const Shape& shape, const ValidLengths& lengths,
                          const Inputs<T>& in, const Outputs<T>& out) {
  validate_valid_lengths<T>(config, shape, lengths, in.q, in.k, in.v, out.out, out.lse);
  std::vector<SequenceRecord> records(static_cast<std::size_t>(shape.batch));
  for (std::int64_t b = 0; b < shape.batch; ++b)
    records[static_cast<std::size_t>(b)] = {
        shape.seq_len, lengths.lengths[b], 0, 0, lengths.lengths[b], 0};
  InferenceTensors t{in.q.data,
                     in.k.data,
                     in.v.data,
                     out.out.data,
                     out.lse,
                     in.q.batch_stride,
                     in.q.seq_stride,
                     in.q.head_stride,
                     in.k.batch_stride,
                     in.k.seq_stride,
                     in.k.head_stride,
                     in.v.batch_stride,
                     in.v.seq_stride,
                     in.v.head_stride,
                     out.out.batch_stride,
                     out.out.seq_stride,
                     out.out.head_stride,
                     shape.num_heads * shape.seq_len,
                     shape.seq_len};
  return make_inference_plan<T>(config, shape.num_heads, shape.num_kv_heads, shape.head_dim,
                                records, {}, t, false);
}

}  // namespace dilated_attention::cuda
