#pragma once
// PyTorch bindings of the inference forms (docs/torch.md "Inference forms"; the math is
// docs/semantics.md "Inference forms"): queries at an offset (QueryRange), variable-length packed
// batches (Sequences with cu_seqlens), a KV cache with per-sequence lengths, contiguous or paged
// (Sequences + PagedKeyValues with a block_table), and padded batches (ValidLengths). Inline
// functions on at::Tensor, like <dilated_attention/torch.hpp>, whose conventions they keep:
// config as plain arguments, (out, lse) returned, tensors read in place when stride(-1) == 1, the
// library's std::invalid_argument as ValueError with its message unchanged. Registered by
// <dilated_attention/torch_registration.hpp>.
//
// Index tensors (cu_seqlens_*, query_begins, lengths, cache_seqlens, block_table) are int32 or
// int64, on the cpu or on q's device. The library reads them on the host, so they are copied to
// host int64 (int32 for block_table) first: a few bytes, no copy at all for host tensors of that
// dtype, but a device-to-host copy (which waits for the stream) for device tensors.
//
// The library's messages name its own members (sequences.query_offsets, paged.page_table, ...);
// each op lists which of its arguments those are (translating_errors appends them), e.g.
// "[sequences.query_offsets is cu_seqlens_q]", so the caller finds the argument by its name.

#include <initializer_list>

#include "torch.hpp"

namespace dilated_attention::torch_ops {

inline constexpr std::initializer_list<ArgumentName> varlen_names = {
    {"query_offsets", "cu_seqlens_q"},
    {"kv_offsets", "cu_seqlens_k"},
    {"sequences.count", "cu_seqlens_q.size(0) - 1"},
};

inline constexpr std::initializer_list<ArgumentName> padded_names = {
    {"valid_lengths.lengths", "lengths"},
    {"shape.seq_len", "q.size(1)"},
};

inline constexpr std::initializer_list<ArgumentName> query_range_names = {
    {"query_range.begin", "query_begin"},
    {"query_range.count", "q.size(1)"},
    {"shape.seq_len", "k.size(1)"},
};

inline constexpr std::initializer_list<ArgumentName> kvcache_names = {
    {"kv_lengths", "cache_seqlens"},
    {"paged.page_table", "block_table"},
    {"paged.num_pages", "k_cache.size(0)"},
    {"paged.page_size", "k_cache.size(1)"},
};

// ---- argument checks (metadata only: they run on meta and fake tensors too) --------------------

inline void check_packed_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_inputs(q, k, v, 3, "[total, heads, head_dim] (packed sequences)");
  check_same_kv(k, v);
  check_shapes(q.sym_size(2) == k.sym_size(2), "q", q, "k", k, "head_dim must agree");
}

// An index argument: 1-D (2-D for block_table), int32 or int64, on the cpu or on q's device.
inline void check_index(const char* name, const at::Tensor& t, const at::Tensor& q,
                        std::int64_t rank = 1) {
  TORCH_CHECK_VALUE(t.defined(), "dilated_attention: ", name, " is undefined");
  TORCH_CHECK_VALUE(t.dim() == rank, "dilated_attention: ", name, " has ", t.dim(),
                    " dimensions: expected ", rank);
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
                    "dilated_attention: ", name, " has dtype ", t.scalar_type(),
                    ": expected int32 or int64");
  TORCH_CHECK_VALUE(t.is_cpu() || t.device() == q.device(), "dilated_attention: ", name, " is on ",
                    t.device(), " but q is on ", q.device(),
                    ": index tensors must be on the cpu or on q's device");
}

inline void check_count(const char* name, const at::Tensor& t, const c10::SymInt& expected,
                        const char* what) {
  TORCH_CHECK_VALUE(t.sym_size(0) == expected, "dilated_attention: ", name, " has ", t.sym_size(0),
                    " entries: expected ", expected, " (", what, ")");
}

// The forward's lse as the backward gets it: contiguous, of lse_dtype, of the given sizes.
inline void check_lse(const at::Tensor& lse, const at::Tensor& q, at::IntArrayRef sizes,
                      const char* layout) {
  TORCH_CHECK_VALUE(lse.defined(), "dilated_attention: lse is undefined");
  check_lse_type(lse, q);
  TORCH_CHECK_VALUE(lse.sizes() == sizes, "dilated_attention: lse has shape ", lse.sizes(),
                    ": expected ", sizes, ", ", layout, " (what forward returns)");
  check_lse_contiguous(lse, layout);
}

// out and grad_out of a backward: checked as q is, and of q's shape.
inline void check_like_q(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                         std::int64_t rank, const char* layout) {
  check_tensor("out", out, q, rank, layout);
  check_shapes(out.sizes() == q.sizes(), "out", out, "q", q);
  check_tensor("grad_out", grad_out, q, rank, layout);
  check_shapes(grad_out.sizes() == q.sizes(), "grad_out", grad_out, "q", q);
}

// ---- host copies of the index tensors and the library's descriptions ---------------------------

inline at::Tensor host_int64(const at::Tensor& t) { return t.to(at::kCPU, at::kLong).contiguous(); }

inline const std::int64_t* int64_data(const at::Tensor& host) {
  return host.const_data_ptr<std::int64_t>();
}

// A Sequences description over host copies that it keeps alive.
struct HostSequences {
  at::Tensor query_offsets, kv_offsets, kv_lengths, query_begins;
  Sequences sequences;
};

// ---- variable-length packed batches (flash_attn_varlen_func) -----------------------------------

inline void check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                         const std::optional<at::Tensor>& query_begins) {
  check_packed_inputs(q, k, v);
  check_index("cu_seqlens_q", cu_seqlens_q, q);
  check_index("cu_seqlens_k", cu_seqlens_k, q);
  TORCH_CHECK_VALUE(cu_seqlens_q.sym_size(0) >= 2, "dilated_attention: cu_seqlens_q has ",
                    cu_seqlens_q.sym_size(0), " entries: expected batch + 1 >= 2");
  check_count("cu_seqlens_k", cu_seqlens_k, cu_seqlens_q.sym_size(0), "batch + 1, as cu_seqlens_q");
  if (query_begins.has_value()) {
    check_index("query_begins", *query_begins, q);
    check_count("query_begins", *query_begins, cu_seqlens_q.sym_size(0) - 1, "one per sequence");
  }
}

// Reads the offsets (host copies) and checks that they cover q and k exactly; the rest of the
// rules (increasing, from 0, queries among the keys) are the library's.
inline HostSequences varlen_sequences(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& cu_seqlens_q,
                                      const at::Tensor& cu_seqlens_k,
                                      const std::optional<at::Tensor>& query_begins) {
  HostSequences host;
  host.query_offsets = host_int64(cu_seqlens_q);
  host.kv_offsets = host_int64(cu_seqlens_k);
  const std::int64_t count = cu_seqlens_q.size(0) - 1;
  const std::int64_t total_q = int64_data(host.query_offsets)[count],
                     total_k = int64_data(host.kv_offsets)[count];
  TORCH_CHECK_VALUE(total_q == q.size(0), "dilated_attention: cu_seqlens_q[-1] = ", total_q,
                    " but q has ", q.size(0),
                    " rows: the last offset must be the number of packed query rows");
  TORCH_CHECK_VALUE(total_k == k.size(0), "dilated_attention: cu_seqlens_k[-1] = ", total_k,
                    " but k has ", k.size(0),
                    " rows: the last offset must be the number of packed key rows");
  host.sequences.count = count;
  host.sequences.query_offsets = int64_data(host.query_offsets);
  host.sequences.kv_offsets = int64_data(host.kv_offsets);
  if (query_begins.has_value()) {
    host.query_begins = host_int64(*query_begins);
    host.sequences.query_begins = int64_data(host.query_begins);
  }
  return host;
}

inline HeadShape packed_heads(const at::Tensor& q, const at::Tensor& k) {
  return HeadShape{q.size(1), k.size(1), q.size(2)};
}

inline std::tuple<at::Tensor, at::Tensor> forward_varlen_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& query_begins,
    const OpConfig& op, std::int64_t num_threads) {
  check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, query_begins);
  const Config config = make_config(op);
  CpuOptions options;
  options.num_threads = resolve_threads(num_threads);
  const HostSequences host = varlen_sequences(q, k, cu_seqlens_q, cu_seqlens_k, query_begins);
  const HeadShape heads = packed_heads(q, k);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({heads.num_heads, q.size(0)}, lse_options(q));
  call_cpu(q, varlen_names, [&](auto tag) {
    using T = decltype(tag);
    dilated_attention::forward<T>(config, heads, host.sequences, inputs_of<T>(q, k, v),
                                  outputs_of<T>(out, lse), options);
  });
  return {out, lse};
}

inline std::tuple<at::Tensor, at::Tensor> forward_varlen_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& query_begins,
    const OpConfig& op, std::int64_t num_threads) {
  check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, query_begins);
  check_config(op, num_threads);
  const auto sizes = q.sym_sizes();
  return {at::empty_symint(sizes, q.options()),
          at::empty_symint({sizes[1], sizes[0]}, lse_options(q))};
}

inline void check_varlen_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                  const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
                                  const at::Tensor& cu_seqlens_k,
                                  const std::optional<at::Tensor>& query_begins) {
  check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, query_begins);
  check_like_q(grad_out, q, out, 3, "[total_q, heads, head_dim]");
  check_lse(lse, q, {q.size(1), q.size(0)}, "[heads, total_q]");
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_varlen_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& query_begins,
    const OpConfig& op, std::int64_t num_threads) {
  check_varlen_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, query_begins);
  const Config config = make_config(op);
  CpuOptions options;
  options.num_threads = resolve_threads(num_threads);
  const HostSequences host = varlen_sequences(q, k, cu_seqlens_q, cu_seqlens_k, query_begins);
  at::Tensor d_q, d_k, d_v;
  std::tie(d_q, d_k, d_v) = empty_gradients(q, k, v);
  call_cpu(q, varlen_names, [&](auto tag) {
    using T = decltype(tag);
    dilated_attention::backward<T>(config, packed_heads(q, k), host.sequences,
                                   inputs_of<T>(q, k, v), outputs_of<const T>(out, lse),
                                   const_view_of<T>(grad_out), gradients_of<T>(d_q, d_k, d_v),
                                   options);
  });
  return {d_q, d_k, d_v};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_varlen_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& query_begins,
    const OpConfig& op, std::int64_t num_threads) {
  check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, query_begins);
  check_tensor("out", out, q, 3, "[total_q, heads, head_dim]");
  check_tensor("grad_out", grad_out, q, 3, "[total_q, heads, head_dim]");
  check_config(op, num_threads);
  (void)lse;
  return empty_gradients(q, k, v);
}

// ---- padded batches with valid lengths ---------------------------------------------------------

inline at::Tensor padded_lengths(const at::Tensor& q, const at::Tensor& lengths) {
  check_index("lengths", lengths, q);
  check_count("lengths", lengths, q.size(0), "one per batch element");
  return host_int64(lengths);
}

inline std::tuple<at::Tensor, at::Tensor> forward_padded_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
    const OpConfig& op, std::int64_t num_threads) {
  check_inputs(q, k, v);
  const Config config = make_config(op);
  const Shape shape = shape_of(q, k, v);
  CpuOptions options;
  options.num_threads = resolve_threads(num_threads);
  const at::Tensor host = padded_lengths(q, lengths);
  at::Tensor out, lse;
  std::tie(out, lse) = empty_outputs(q, shape);
  call_cpu(q, padded_names, [&](auto tag) {
    using T = decltype(tag);
    dilated_attention::forward<T>(config, shape, ValidLengths{int64_data(host)},
                                  inputs_of<T>(q, k, v), outputs_of<T>(out, lse), options);
  });
  return {out, lse};
}

inline std::tuple<at::Tensor, at::Tensor> forward_padded_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
    const OpConfig& op, std::int64_t num_threads) {
  check_index("lengths", lengths, q);
  return forward_meta(q, k, v, op, num_threads);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_padded_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& lengths, const OpConfig& op,
    std::int64_t num_threads) {
  check_backward(grad_out, q, k, v, out, lse);
  const Config config = make_config(op);
  const Shape shape = shape_of(q, k, v);
  check_backward_shapes(shape, grad_out, q, out, lse);
  CpuOptions options;
  options.num_threads = resolve_threads(num_threads);
  const at::Tensor host = padded_lengths(q, lengths);
  at::Tensor d_q, d_k, d_v;
  std::tie(d_q, d_k, d_v) = empty_gradients(q, k, v);
  call_cpu(q, padded_names, [&](auto tag) {
    using T = decltype(tag);
    dilated_attention::backward<T>(config, shape, ValidLengths{int64_data(host)},
                                   inputs_of<T>(q, k, v), outputs_of<const T>(out, lse),
                                   const_view_of<T>(grad_out), gradients_of<T>(d_q, d_k, d_v),
                                   options);
  });
  return {d_q, d_k, d_v};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_padded_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& lengths, const OpConfig& op,
    std::int64_t num_threads) {
  check_index("lengths", lengths, q);
  return backward_meta(grad_out, q, k, v, out, lse, op, num_threads);
}

// ---- queries at an offset: decode, chunked prefill ---------------------------------------------

// q [B, count, H, D] at positions [query_begin, query_begin + count) of k, v [B, kv_len, Hkv, D].
inline Shape query_range_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_inputs(q, k, v);
  check_same_kv(k, v);
  check_shapes(q.size(0) == k.size(0) && q.size(3) == k.size(3), "q", q, "k", k,
               "batch and head_dim must agree (q has the range's rows, k all kv_len)");
  return Shape{q.size(0), k.size(1), q.size(2), k.size(2), q.size(3)};
}

inline std::tuple<at::Tensor, at::Tensor> forward_query_range_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::int64_t query_begin,
    const OpConfig& op, std::int64_t num_threads) {
  const Shape shape = query_range_shape(q, k, v);
  const Config config = make_config(op);
  CpuOptions options;
  options.num_threads = resolve_threads(num_threads);
  const QueryRange range{query_begin, q.size(1)};
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({shape.batch, shape.num_heads, range.count}, lse_options(q));
  call_cpu(q, query_range_names, [&](auto tag) {
    using T = decltype(tag);
    dilated_attention::forward<T>(config, shape, range, inputs_of<T>(q, k, v),
                                  outputs_of<T>(out, lse), options);
  });
  return {out, lse};
}

// The shapes of forward's: out like q, lse [batch, heads, count].
inline std::tuple<at::Tensor, at::Tensor> forward_query_range_meta(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::int64_t query_begin,
    const OpConfig& op, std::int64_t num_threads) {
  (void)query_begin;
  return forward_meta(q, k, v, op, num_threads);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_query_range_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, std::int64_t query_begin, const OpConfig& op,
    std::int64_t num_threads) {
  const Shape shape = query_range_shape(q, k, v);
  check_like_q(grad_out, q, out, 4, "[batch, count, heads, head_dim]");
  check_lse(lse, q, {q.size(0), q.size(2), q.size(1)}, "[batch, heads, count]");
  const Config config = make_config(op);
  CpuOptions options;
  options.num_threads = resolve_threads(num_threads);
  at::Tensor d_q, d_k, d_v;
  std::tie(d_q, d_k, d_v) = empty_gradients(q, k, v);
  call_cpu(q, query_range_names, [&](auto tag) {
    using T = decltype(tag);
    dilated_attention::backward<T>(config, shape, QueryRange{query_begin, q.size(1)},
                                   inputs_of<T>(q, k, v), outputs_of<const T>(out, lse),
                                   const_view_of<T>(grad_out), gradients_of<T>(d_q, d_k, d_v),
                                   options);
  });
  return {d_q, d_k, d_v};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_query_range_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, std::int64_t query_begin, const OpConfig& op,
    std::int64_t num_threads) {
  check_inputs(q, k, v);
  check_tensor("out", out, q);
  check_tensor("grad_out", grad_out, q);
  check_config(op, num_threads);
  (void)lse, (void)query_begin;
  return empty_gradients(q, k, v);
}

// ---- KV cache, contiguous or paged (flash_attn_with_kvcache) -----------------------------------

// q [B, Sq, H, D]: the last Sq positions of each sequence, whose cache_seqlens[b] keys are rows
// of k_cache, v_cache: [B, cache_len, Hkv, D], or pages [num_pages, page_size, Hkv, D] that
// block_table [B, max_pages] lists. A contiguous cache is described as B pages of cache_len rows
// (page b of sequence b), so both take the library's paged form without copying the cache.
inline void check_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& cache_seqlens,
                          const std::optional<at::Tensor>& block_table) {
  check_tensor("q", q, q);
  const char* layout = block_table.has_value() ? "[num_pages, page_size, kv_heads, head_dim]"
                                               : "[batch, cache_len, kv_heads, head_dim]";
  check_tensor("k_cache", k_cache, q, 4, layout);
  check_tensor("v_cache", v_cache, q, 4, layout);
  check_shapes(k_cache.sym_sizes() == v_cache.sym_sizes(), "k_cache", k_cache, "v_cache", v_cache,
               "they must have the same shape");
  check_shapes(q.sym_size(3) == k_cache.sym_size(3), "q", q, "k_cache", k_cache,
               "head_dim must agree");
  check_index("cache_seqlens", cache_seqlens, q);
  check_count("cache_seqlens", cache_seqlens, q.sym_size(0), "one per sequence");
  if (block_table.has_value()) {
    check_index("block_table", *block_table, q, 2);
    check_count("block_table", *block_table, q.sym_size(0), "rows: one per sequence");
  } else {
    TORCH_CHECK_VALUE(k_cache.sym_size(0) == q.sym_size(0), "dilated_attention: k_cache has batch ",
                      k_cache.sym_size(0), " but q has ", q.sym_size(0),
                      " (without block_table the cache is [batch, cache_len, kv_heads, head_dim])");
  }
}

// The library's description of the cache: host lengths and page table, the pages' strides.
struct HostCache {
  HostSequences host;
  at::Tensor page_table;  // host int32 [B, pages per sequence], contiguous
  std::int64_t num_pages = 0, page_size = 0, page_stride = 0, row_stride = 0, head_stride = 0;
};

inline HostCache kvcache_description(const at::Tensor& q, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                     const std::optional<at::Tensor>& block_table) {
  // One set of strides describes the pages of k and v (PagedKeyValues).
  TORCH_CHECK_VALUE(k_cache.strides() == v_cache.strides(),
                    "dilated_attention: v_cache has strides ", v_cache.strides(),
                    " but k_cache has ", k_cache.strides(),
                    ": the two caches must have one layout (e.g. both contiguous)");
  const std::int64_t batch = q.size(0), rows = q.size(1);
  HostCache cache;
  cache.host.kv_lengths = host_int64(cache_seqlens);
  cache.host.query_offsets = at::arange(0, (batch + 1) * rows, std::max<std::int64_t>(rows, 1),
                                        at::TensorOptions().dtype(at::kLong));
  if (rows == 0) cache.host.query_offsets = at::zeros({batch + 1}, at::kLong);
  cache.host.sequences.count = batch;
  cache.host.sequences.query_offsets = int64_data(cache.host.query_offsets);
  cache.host.sequences.kv_lengths = int64_data(cache.host.kv_lengths);
  cache.num_pages = k_cache.size(0);
  cache.page_size = k_cache.size(1);
  cache.page_stride = k_cache.stride(0);
  cache.row_stride = k_cache.stride(1);
  cache.head_stride = k_cache.stride(2);
  const std::int64_t* lengths = int64_data(cache.host.kv_lengths);
  for (std::int64_t b = 0; b < batch; ++b)  // negative lengths: the library's message
    TORCH_CHECK_VALUE(lengths[b] < 0 || lengths[b] >= rows, "dilated_attention: cache_seqlens[", b,
                      "] = ", lengths[b], " is less than q.size(1) = ", rows,
                      ": the queries are the last q.size(1) positions of each sequence");
  if (block_table.has_value()) {
    cache.page_table = block_table->to(at::kCPU, at::kInt).contiguous();
    const std::int64_t columns = block_table->size(1);
    for (std::int64_t b = 0; b < batch; ++b) {
      const std::int64_t pages = (lengths[b] + cache.page_size - 1) / cache.page_size;
      TORCH_CHECK_VALUE(pages <= columns, "dilated_attention: cache_seqlens[", b,
                        "] = ", lengths[b], " needs ", pages, " pages of ", cache.page_size,
                        " rows but block_table has ", columns, " columns");
    }
  } else {
    cache.page_table = at::arange(batch, at::TensorOptions().dtype(at::kInt));
    for (std::int64_t b = 0; b < batch; ++b)
      TORCH_CHECK_VALUE(lengths[b] <= cache.page_size, "dilated_attention: cache_seqlens[", b,
                        "] = ", lengths[b], " exceeds k_cache.size(1) = ", cache.page_size,
                        " (the cache's rows per sequence)");
  }
  return cache;
}

template <class T>
PagedKeyValues<T> paged_of(const HostCache& cache, const at::Tensor& k_cache,
                           const at::Tensor& v_cache) {
  PagedKeyValues<T> paged;
  paged.k = static_cast<const T*>(k_cache.const_data_ptr());
  paged.v = static_cast<const T*>(v_cache.const_data_ptr());
  paged.num_pages = cache.num_pages;
  paged.page_size = cache.page_size;
  paged.page_stride = cache.page_stride;
  paged.row_stride = cache.row_stride;
  paged.head_stride = cache.head_stride;
  paged.page_table = cache.page_table.const_data_ptr<std::int32_t>();
  paged.page_table_stride = cache.page_table.dim() == 2 ? cache.page_table.size(1) : 1;
  return paged;
}

// The library's paged LSE is [H, B * Sq]; the op returns [B, H, Sq] (flash_attn_with_kvcache's
// softmax_lse), a copy of B * H * Sq values.
inline at::Tensor kvcache_lse(const at::Tensor& packed, std::int64_t batch, std::int64_t rows) {
  return packed.view({packed.size(0), batch, rows}).permute({1, 0, 2}).contiguous();
}

inline std::tuple<at::Tensor, at::Tensor> forward_kvcache_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
    const OpConfig& op, std::int64_t num_threads) {
  check_kvcache(q, k_cache, v_cache, cache_seqlens, block_table);
  const Config config = make_config(op);
  CpuOptions options;
  options.num_threads = resolve_threads(num_threads);
  const HostCache cache = kvcache_description(q, k_cache, v_cache, cache_seqlens, block_table);
  const std::int64_t batch = q.size(0), rows = q.size(1);
  const HeadShape heads{q.size(2), k_cache.size(2), q.size(3)};
  // q's rows of all sequences, packed: a view when q's strides allow it (a copy otherwise).
  const at::Tensor packed_q = q.reshape({batch * rows, heads.num_heads, heads.head_dim});
  at::Tensor out = at::empty({batch * rows, heads.num_heads, heads.head_dim}, q.options());
  at::Tensor lse = at::empty({heads.num_heads, batch * rows}, lse_options(q));
  call_cpu(q, kvcache_names, [&](auto tag) {
    using T = decltype(tag);
    dilated_attention::forward<T>(config, heads, cache.host.sequences, const_view_of<T>(packed_q),
                                  paged_of<T>(cache, k_cache, v_cache), outputs_of<T>(out, lse),
                                  options);
  });
  return {out.view(q.sizes()), kvcache_lse(lse, batch, rows)};
}

inline std::tuple<at::Tensor, at::Tensor> forward_kvcache_meta(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
    const OpConfig& op, std::int64_t num_threads) {
  check_kvcache(q, k_cache, v_cache, cache_seqlens, block_table);
  check_config(op, num_threads);
  return empty_outputs_meta(q);
}

#if defined(DILATED_ATTENTION_TORCH_CUDA)

// The library's CUDA inference forms are forward-only (cuda/inference.cuh) and read the index
// arrays on the host: the device index tensors are copied to the host first (synchronising).

inline std::tuple<at::Tensor, at::Tensor> forward_varlen_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& query_begins,
    const OpConfig& op, std::int64_t num_threads) {
  check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, query_begins);
  resolve_threads(num_threads);
  const Config config = make_config(op);
  const c10::cuda::CUDAGuard guard(q.device());
  const HostSequences host = varlen_sequences(q, k, cu_seqlens_q, cu_seqlens_k, query_begins);
  const HeadShape heads = packed_heads(q, k);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({heads.num_heads, q.size(0)}, lse_options(q));
  call_cuda(q, varlen_names, [&](auto tag, const cuda::Options& options) {
    using T = decltype(tag);
    dilated_attention::cuda::forward<T>(config, heads, host.sequences, inputs_of<T>(q, k, v),
                                        outputs_of<T>(out, lse), options);
  });
  return {out, lse};
}

inline std::tuple<at::Tensor, at::Tensor> forward_padded_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
    const OpConfig& op, std::int64_t num_threads) {
  check_inputs(q, k, v);
  resolve_threads(num_threads);
  const Config config = make_config(op);
  const Shape shape = shape_of(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor host = padded_lengths(q, lengths);
  at::Tensor out, lse;
  std::tie(out, lse) = empty_outputs(q, shape);
  call_cuda(q, padded_names, [&](auto tag, const cuda::Options& options) {
    using T = decltype(tag);
    dilated_attention::cuda::forward<T>(config, shape, ValidLengths{int64_data(host)},
                                        inputs_of<T>(q, k, v), outputs_of<T>(out, lse), options);
  });
  return {out, lse};
}

inline std::tuple<at::Tensor, at::Tensor> forward_query_range_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::int64_t query_begin,
    const OpConfig& op, std::int64_t num_threads) {
  const Shape shape = query_range_shape(q, k, v);
  resolve_threads(num_threads);
  const Config config = make_config(op);
  const c10::cuda::CUDAGuard guard(q.device());
  const QueryRange range{query_begin, q.size(1)};
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({shape.batch, shape.num_heads, range.count}, lse_options(q));
  call_cuda(q, query_range_names, [&](auto tag, const cuda::Options& options) {
    using T = decltype(tag);
    dilated_attention::cuda::forward<T>(config, shape, range, inputs_of<T>(q, k, v),
                                        outputs_of<T>(out, lse), options);
  });
  return {out, lse};
}

inline std::tuple<at::Tensor, at::Tensor> forward_kvcache_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
    const OpConfig& op, std::int64_t num_threads) {
  check_kvcache(q, k_cache, v_cache, cache_seqlens, block_table);
  resolve_threads(num_threads);
  const Config config = make_config(op);
  const c10::cuda::CUDAGuard guard(q.device());
  const HostCache cache = kvcache_description(q, k_cache, v_cache, cache_seqlens, block_table);
  const std::int64_t batch = q.size(0), rows = q.size(1);
  const HeadShape heads{q.size(2), k_cache.size(2), q.size(3)};
  const at::Tensor packed_q = q.reshape({batch * rows, heads.num_heads, heads.head_dim});
  at::Tensor out = at::empty({batch * rows, heads.num_heads, heads.head_dim}, q.options());
  at::Tensor lse = at::empty({heads.num_heads, batch * rows}, lse_options(q));
  call_cuda(q, kvcache_names, [&](auto tag, const cuda::Options& options) {
    using T = decltype(tag);
    dilated_attention::cuda::forward<T>(
        config, heads, cache.host.sequences, const_view_of<T>(packed_q),
        paged_of<T>(cache, k_cache, v_cache), outputs_of<T>(out, lse), options);
  });
  return {out.view(q.sizes()), kvcache_lse(lse, batch, rows)};
}

// The backward operators on cuda: the library has no CUDA backward of these forms yet.
[[noreturn]] inline void no_cuda_backward(const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "dilated_attention::", op,
                              ": no cuda kernel (the library's CUDA inference forms are "
                              "forward-only); compute this gradient on the cpu");
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_varlen_cuda(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const OpConfig&, std::int64_t) {
  no_cuda_backward("backward_varlen");
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_padded_cuda(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const OpConfig&, std::int64_t) {
  no_cuda_backward("backward_padded");
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_query_range_cuda(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, std::int64_t, const OpConfig&, std::int64_t) {
  no_cuda_backward("backward_query_range");
}

#endif  // DILATED_ATTENTION_TORCH_CUDA

}  // namespace dilated_attention::torch_ops
