#pragma once
// The contract's types (docs/semantics.md "Entry points") and the one routine that rejects bad input (docs/semantics.md "Bad input").
// Every entry point -- reference, CPU, CUDA, ring -- calls validate() before it touches output,
// so the rules and their messages live here and nowhere else.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace dilated_attention {

// Which dilation offset a query head uses in each branch (docs/semantics.md "Which offset a head uses").
enum class OffsetRule { modular, blocked, partitioned };

// How the branches of one query row are combined (docs/semantics.md "The forward").
enum class Mixing { softmax, mean };

struct Config {
  std::vector<std::int64_t> segment_lengths;  // w_i
  std::vector<std::int64_t> dilation_rates;   // r_i
  bool causal = false;
  OffsetRule offsets = OffsetRule::modular;
  Mixing mixing = Mixing::softmax;
  double scale = 0.0;  // 0 selects 1/sqrt(head_dim)
};

struct Shape {
  std::int64_t batch, seq_len, num_heads, num_kv_heads, head_dim;
};

// A strided window on a [batch, seq, heads, head_dim] tensor; strides count elements and
// head_dim always has stride 1. An aggregate on purpose: `View<T>{ptr, bs, ss, hs}`.
// `extent` is optional: the number of elements of the buffer at and after `data`. When it is
// given (>= 0), validate() checks that the highest element the view can touch lies inside the
// buffer (docs/semantics.md "Bad input"); -1, what the four-value spelling leaves, means unknown and
// unchecked, as a raw pointer must be. checked_view() and contiguous_view(std::vector&) set it.
template <class T>
struct View {
  T* data;
  std::int64_t batch_stride, seq_stride, head_stride;
  std::int64_t extent = -1;

  // A mutable view converts to a read-only one (extent included), never the other way round.
  template <class U = T, std::enable_if_t<!std::is_const_v<U>, int> = 0>
  operator View<const U>() const {
    return View<const U>{data, batch_stride, seq_stride, head_stride, extent};
  }
};

// A view that knows its buffer holds `count` elements from `data` on: validate() bounds-checks it.
template <class T>
View<T> checked_view(T* data, std::int64_t count, std::int64_t batch_stride,
                     std::int64_t seq_stride, std::int64_t head_stride) {
  return View<T>{data, batch_stride, seq_stride, head_stride, count};
}

// The dense row-major layout [batch, seq_len, heads, head_dim].
template <class T>
View<T> contiguous_view(T* data, const Shape& shape, std::int64_t heads) {
  return View<T>{data, shape.seq_len * heads * shape.head_dim, heads * shape.head_dim,
                 shape.head_dim};
}

// The same layout over a whole vector, checked against its size. Not from a temporary vector,
// whose memory would be gone before the call.
template <class T, class A>
View<T> contiguous_view(std::vector<T, A>& buffer, const Shape& shape, std::int64_t heads) {
  return checked_view(buffer.data(), static_cast<std::int64_t>(buffer.size()),
                      shape.seq_len * heads * shape.head_dim, heads * shape.head_dim, shape.head_dim);
}
template <class T, class A>
View<const T> contiguous_view(const std::vector<T, A>& buffer, const Shape& shape,
                              std::int64_t heads) {
  return checked_view(buffer.data(), static_cast<std::int64_t>(buffer.size()),
                      shape.seq_len * heads * shape.head_dim, heads * shape.head_dim, shape.head_dim);
}
template <class T, class A>
void contiguous_view(std::vector<T, A>&&, const Shape&, std::int64_t) = delete;

// The LSE element type of docs/semantics.md "Entry points": double for double storage, float for everything else.
template <class T>
using lse_type_t = std::conditional_t<std::is_same_v<std::remove_cv_t<T>, double>, double, float>;

inline const char* to_string(OffsetRule rule) {
  switch (rule) {
    case OffsetRule::modular: return "modular";
    case OffsetRule::blocked: return "blocked";
    case OffsetRule::partitioned: return "partitioned";
  }
  return "unknown";
}

inline const char* to_string(Mixing mixing) {
  switch (mixing) {
    case Mixing::softmax: return "softmax";
    case Mixing::mean: return "mean";
  }
  return "unknown";
}

// 1/sqrt(head_dim) unless the config sets a scale. Call after validate().
inline double resolved_scale(const Config& config, const Shape& shape) {
  return config.scale == 0.0 ? 1.0 / std::sqrt(static_cast<double>(shape.head_dim))
                             : config.scale;
}

namespace detail {

// Blocks template deduction, so that entry points deduce T from `out` alone and q, k, v accept
// mutable views too (they convert).
template <class T>
struct identity {
  using type = T;
};
template <class T>
using identity_t = typename identity<T>::type;

template <class... Parts>
[[noreturn]] void reject(const Parts&... parts) {
  std::ostringstream message;
  message << "dilated_attention: ";
  (message << ... << parts);
  throw std::invalid_argument(message.str());
}

// The bytes a view can touch: [lowest, highest] address over its batch x seq x heads x head_dim
// extent. Strides are validated non-negative first, so the first element is the lowest.
struct ByteRange {
  std::uintptr_t lo, hi;  // inclusive
  bool overlaps(const ByteRange& other) const { return lo <= other.hi && other.lo <= hi; }
};

template <class T>
ByteRange byte_range(const View<T>& view, const Shape& shape, std::int64_t heads) {
  const std::int64_t last = (shape.batch - 1) * view.batch_stride +
                            (shape.seq_len - 1) * view.seq_stride +
                            (heads - 1) * view.head_stride + (shape.head_dim - 1);
  const auto lo = reinterpret_cast<std::uintptr_t>(view.data);
  return {lo, lo + static_cast<std::uintptr_t>(last + 1) * sizeof(T) - 1};
}

// A view may broadcast (stride 0) when read; an output view must give every element its own
// address, or threads would race on it. The test sorts the dimensions by stride and asks each
// stride to clear the whole extent of the dimensions inside it.
inline bool self_overlapping(std::int64_t head_dim, std::int64_t heads, std::int64_t head_stride,
                             std::int64_t seq_len, std::int64_t seq_stride, std::int64_t batch,
                             std::int64_t batch_stride) {
  struct Dim {
    std::int64_t size, stride;
  };
  Dim dims[3] = {{heads, head_stride}, {seq_len, seq_stride}, {batch, batch_stride}};
  // Insertion sort by stride; dimensions of size 1 never collide and are skipped below.
  for (int i = 1; i < 3; ++i)
    for (int j = i; j > 0 && dims[j].stride < dims[j - 1].stride; --j) std::swap(dims[j], dims[j - 1]);
  std::int64_t extent = head_dim;  // elements spanned by the dimensions inside this one
  for (const Dim& dim : dims) {
    if (dim.size == 1) continue;
    if (dim.stride < extent) return true;
    extent = dim.stride * (dim.size - 1) + extent;
  }
  return false;
}

template <class T>
void check_view(const char* name, const View<T>& view, const Shape& shape, std::int64_t heads,
                bool is_output) {
  if (view.data == nullptr) reject(name, ".data is null: every tensor must point to memory");
  if (view.batch_stride < 0 || view.seq_stride < 0 || view.head_stride < 0)
    reject(name, " strides (batch ", view.batch_stride, ", seq ", view.seq_stride, ", head ",
           view.head_stride, ") must be non-negative");
  // Strides so large that the view's span overflows int64 byte arithmetic describe no real
  // memory; reject them here, before any offset is computed from them.
  const double span_bytes =
      (static_cast<double>(shape.batch - 1) * static_cast<double>(view.batch_stride) +
       static_cast<double>(shape.seq_len - 1) * static_cast<double>(view.seq_stride) +
       static_cast<double>(heads - 1) * static_cast<double>(view.head_stride) +
       static_cast<double>(shape.head_dim)) *
      static_cast<double>(sizeof(T));
  if (span_bytes > 0x1p62)
    reject(name, " strides (batch ", view.batch_stride, ", seq ", view.seq_stride, ", head ",
           view.head_stride, ") span ", span_bytes, " bytes for shape [", shape.batch, ", ",
           shape.seq_len, ", ", heads, ", ", shape.head_dim,
           "]: more than 2^62 bytes cannot be addressed");
  // The highest element the view can touch (strides non-negative, so the last one) must lie
  // inside the buffer when the view says how long that is.
  if (view.extent < -1)
    reject(name, ".extent = ", view.extent, ": must be -1 (unknown) or the buffer's element count");
  const std::int64_t highest = (shape.batch - 1) * view.batch_stride +
                               (shape.seq_len - 1) * view.seq_stride +
                               (heads - 1) * view.head_stride + (shape.head_dim - 1);
  if (view.extent >= 0 && highest >= view.extent)
    reject(name, " reaches element ", highest, " (shape [", shape.batch, ", ", shape.seq_len, ", ",
           heads, ", ", shape.head_dim, "], strides ", view.batch_stride, ", ", view.seq_stride,
           ", ", view.head_stride, ") but its buffer holds ", view.extent,
           " elements (", name, ".extent): the view does not fit its buffer");
  if (is_output && self_overlapping(shape.head_dim, heads, view.head_stride, shape.seq_len,
                                    view.seq_stride, shape.batch, view.batch_stride))
    reject(name, " strides (batch ", view.batch_stride, ", seq ", view.seq_stride, ", head ",
           view.head_stride, ") make output elements share memory for shape [", shape.batch, ", ",
           shape.seq_len, ", ", heads, ", ", shape.head_dim, "]: each output element needs its own");
}

}  // namespace detail

// The config rules alone (docs/semantics.md "Bad input"), for code that has no shape yet.
inline void validate_config(const Config& config) {
  using detail::reject;
  const auto& w = config.segment_lengths;
  const auto& r = config.dilation_rates;
  if (w.empty()) reject("config.segment_lengths is empty: at least one branch (w, r) is required");
  if (r.size() != w.size())
    reject("config.dilation_rates has ", r.size(), " entries but config.segment_lengths has ",
           w.size(), ": each branch needs one segment length and one dilation rate");
  for (std::size_t i = 0; i < w.size(); ++i) {
    if (w[i] <= 0)
      reject("config.segment_lengths[", i, "] = ", w[i], ": segment lengths must be positive");
    if (r[i] <= 0)
      reject("config.dilation_rates[", i, "] = ", r[i], ": dilation rates must be positive");
    if (r[i] > w[i])
      reject("config.dilation_rates[", i, "] = ", r[i], " exceeds config.segment_lengths[", i,
             "] = ", w[i], ": each branch needs 1 <= r <= w");
  }
  if (!std::isfinite(config.scale) || config.scale < 0.0)
    reject("config.scale = ", config.scale,
           ": the scale must be finite and non-negative (0 selects 1/sqrt(head_dim))");
  switch (config.offsets) {
    case OffsetRule::modular:
    case OffsetRule::blocked:
    case OffsetRule::partitioned: break;
    default: reject("config.offsets = ", static_cast<int>(config.offsets), ": not an OffsetRule");
  }
  switch (config.mixing) {
    case Mixing::softmax:
    case Mixing::mean: break;
    default: reject("config.mixing = ", static_cast<int>(config.mixing), ": not a Mixing");
  }
}

// Config and shape together: everything that does not depend on where the data lives.
inline void validate(const Config& config, const Shape& shape) {
  using detail::reject;
  validate_config(config);
  if (shape.batch <= 0) reject("shape.batch = ", shape.batch, ": must be positive");
  if (shape.seq_len <= 0) reject("shape.seq_len = ", shape.seq_len, ": must be positive");
  if (shape.num_heads <= 0) reject("shape.num_heads = ", shape.num_heads, ": must be positive");
  if (shape.num_kv_heads <= 0)
    reject("shape.num_kv_heads = ", shape.num_kv_heads, ": must be positive");
  if (shape.head_dim <= 0) reject("shape.head_dim = ", shape.head_dim, ": must be positive");
  if (shape.num_heads % shape.num_kv_heads != 0)
    reject("shape.num_heads = ", shape.num_heads, " is not a multiple of shape.num_kv_heads = ",
           shape.num_kv_heads, ": grouped-query attention needs num_heads % num_kv_heads == 0");
  const auto branches = static_cast<std::int64_t>(config.segment_lengths.size());
  if (config.offsets == OffsetRule::partitioned && shape.num_heads < branches)
    reject("shape.num_heads = ", shape.num_heads, " is less than the ", branches,
           " branches: OffsetRule::partitioned gives each branch at least one head");
  // Index arithmetic is done in int64; refuse sizes whose products could overflow it.
  const double elements = static_cast<double>(shape.batch) * static_cast<double>(shape.seq_len) *
                          static_cast<double>(std::max(shape.num_heads, shape.num_kv_heads)) *
                          static_cast<double>(shape.head_dim);
  if (elements > 0x1p62)
    reject("shape [", shape.batch, ", ", shape.seq_len, ", ", shape.num_heads, ", ",
           shape.head_dim, "] has ", elements, " elements: more than 2^62 cannot be indexed");
}

// Everything an entry point receives (docs/semantics.md "Bad input"). Raises std::invalid_argument before any output
// is written. `lse` may be null; when given it is [batch, num_heads, seq_len], contiguous.
template <class T, class L>
void validate(const Config& config, const Shape& shape, const View<const T>& q,
              const View<const T>& k, const View<const T>& v, const View<T>& out, const L* lse) {
  using detail::reject;
  validate(config, shape);
  detail::check_view("q", q, shape, shape.num_heads, false);
  detail::check_view("k", k, shape, shape.num_kv_heads, false);
  detail::check_view("v", v, shape, shape.num_kv_heads, false);
  detail::check_view("out", out, shape, shape.num_heads, true);
  const detail::ByteRange out_bytes = detail::byte_range(out, shape, shape.num_heads);
  const detail::ByteRange inputs[3] = {detail::byte_range(q, shape, shape.num_heads),
                                       detail::byte_range(k, shape, shape.num_kv_heads),
                                       detail::byte_range(v, shape, shape.num_kv_heads)};
  const char* names[3] = {"q", "k", "v"};
  for (int i = 0; i < 3; ++i)
    if (out_bytes.overlaps(inputs[i]))
      reject("out overlaps ", names[i],
             ": the output must not share memory with an input (the address ranges intersect)");
  if (lse != nullptr) {
    const auto lo = reinterpret_cast<std::uintptr_t>(lse);
    const std::uintptr_t count =
        static_cast<std::uintptr_t>(shape.batch * shape.num_heads * shape.seq_len);
    const detail::ByteRange lse_bytes{lo, lo + count * sizeof(L) - 1};
    if (lse_bytes.overlaps(out_bytes))
      reject("lse overlaps out: the two outputs must not share memory");
    for (int i = 0; i < 3; ++i)
      if (lse_bytes.overlaps(inputs[i]))
        reject("lse overlaps ", names[i], ": an output must not share memory with an input");
  }
}

// Everything backward receives (docs/semantics.md "Inputs and bad input of the backward"): the forward's rules for q, k, v, then
// `out`, `lse` and `d_out` as further inputs, and d_q, d_k, d_v as outputs that must not share
// memory with any input or with each other. Raises std::invalid_argument before any gradient is
// written.
template <class T, class L>
void validate_backward(const Config& config, const Shape& shape, const View<const T>& q,
                       const View<const T>& k, const View<const T>& v, const View<const T>& out,
                       const L* lse, const View<const T>& d_out, const View<T>& d_q,
                       const View<T>& d_k, const View<T>& d_v) {
  using detail::reject;
  validate(config, shape);
  detail::check_view("q", q, shape, shape.num_heads, false);
  detail::check_view("k", k, shape, shape.num_kv_heads, false);
  detail::check_view("v", v, shape, shape.num_kv_heads, false);
  detail::check_view("out", out, shape, shape.num_heads, false);
  if (lse == nullptr)
    reject("lse is null: backward needs the [batch, num_heads, seq_len] LSE that forward returned");
  detail::check_view("d_out", d_out, shape, shape.num_heads, false);
  detail::check_view("d_q", d_q, shape, shape.num_heads, true);
  detail::check_view("d_k", d_k, shape, shape.num_kv_heads, true);
  detail::check_view("d_v", d_v, shape, shape.num_kv_heads, true);

  const auto lse_lo = reinterpret_cast<std::uintptr_t>(lse);
  const auto lse_count = static_cast<std::uintptr_t>(shape.batch * shape.num_heads * shape.seq_len);
  const char* input_names[6] = {"q", "k", "v", "out", "lse", "d_out"};
  const detail::ByteRange inputs[6] = {
      detail::byte_range(q, shape, shape.num_heads),
      detail::byte_range(k, shape, shape.num_kv_heads),
      detail::byte_range(v, shape, shape.num_kv_heads),
      detail::byte_range(out, shape, shape.num_heads),
      {lse_lo, lse_lo + lse_count * sizeof(L) - 1},
      detail::byte_range(d_out, shape, shape.num_heads)};
  const char* output_names[3] = {"d_q", "d_k", "d_v"};
  const detail::ByteRange outputs[3] = {detail::byte_range(d_q, shape, shape.num_heads),
                                        detail::byte_range(d_k, shape, shape.num_kv_heads),
                                        detail::byte_range(d_v, shape, shape.num_kv_heads)};
  for (int o = 0; o < 3; ++o) {
    for (int i = 0; i < 6; ++i)
      if (outputs[o].overlaps(inputs[i]))
        reject(output_names[o], " overlaps ", input_names[i],
               ": a gradient must not share memory with an input (the address ranges intersect)");
    for (int other = 0; other < o; ++other)
      if (outputs[o].overlaps(outputs[other]))
        reject(output_names[o], " overlaps ", output_names[other],
               ": the three gradients must not share memory with each other");
  }
}

}  // namespace dilated_attention
