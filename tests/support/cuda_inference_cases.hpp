#pragma once
// The cases of the CUDA inference forms (cuda/inference.cuh), shared by the host emulation
// (cuda_inference_emulated_test.cpp: the kernels' own source on the CPU) and the GPU test
// (cuda_inference_test.cu). Both run them through a Backend with one method per form, taking
// contiguous HOST buffers (the GPU backend uploads and downloads them):
//
//   backend.query_range(config, shape, range, q, k, v, out, lse)
//   backend.varlen(config, heads, sequences, q, k, v, out, lse)
//   backend.paged(config, heads, sequences, q, k_pages, v_pages, num_pages, page_size, table,
//                 table_stride, out, lse)
//   backend.padded(config, shape, lengths, q, k, v, out, lse)
//
// The oracle is the fp64 reference::forward over each sequence's first kv_len positions (the
// forward the rows belong to), with the CUDA tolerance of cuda_test_oracles.hpp: the error of a
// kernel's rows at most twice the naive storage-type implementation's error over the same
// forward, floor 1e-6 (16-bit) or 2e-5 (float).

#include <dilated_attention/config.hpp>
#include <dilated_attention/reference.hpp>
#include <dilated_attention/sequences.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "support/cuda_test_oracles.hpp"
#include "support/random_config.hpp"
#include "support/tensors.hpp"

namespace dilated_attention::testing::inference {

struct Heads {
  std::int64_t h, hkv, d;
};

// One sequence's whole tensors (batch 1, n positions) in storage type T.
template <class T>
struct SequenceData {
  Tensor<T> q, k, v;
  std::int64_t n = 0;
};

template <class T>
SequenceData<T> random_sequence(const Heads& heads, std::int64_t n, std::uint64_t seed) {
  const Shape shape{1, std::max<std::int64_t>(n, 1), heads.h, heads.hkv, heads.d};
  SequenceData<T> data{random_tensor<T>(shape, heads.h, seed),
                       random_tensor<T>(shape, heads.hkv, seed + 1),
                       random_tensor<T>(shape, heads.hkv, seed + 2), n};
  return data;
}

// The forward over the first kv positions of a sequence: fp64 reference and the naive
// storage-type yardstick's errors against it.
struct Expected {
  Tensor<double> out;       // [1, kv, H, D]
  std::vector<double> lse;  // [H, kv]
  double naive_error = 0, naive_lse_error = 0;
  std::int64_t kv = 0;
  double at(std::int64_t x, std::int64_t h, std::int64_t d) const { return out.at(0, x, h, d); }
  double lse_at(std::int64_t x, std::int64_t h) const {
    return lse[static_cast<std::size_t>(h * kv + x)];
  }
};

template <class T>
Tensor<T> prefix(const Tensor<T>& whole, std::int64_t kv) {
  Shape shape = whole.shape;
  shape.seq_len = kv;
  Tensor<T> part(shape, whole.heads);
  for (std::int64_t x = 0; x < kv; ++x)
    for (std::int64_t h = 0; h < whole.heads; ++h)
      for (std::int64_t d = 0; d < shape.head_dim; ++d) part.at(0, x, h, d) = whole.at(0, x, h, d);
  return part;
}

template <class T>
Expected expected_forward(const Config& config, const Heads& heads, const SequenceData<T>& data,
                          std::int64_t kv) {
  Expected e;
  e.kv = kv;
  if (kv == 0) return e;
  const Shape shape{1, kv, heads.h, heads.hkv, heads.d};
  const Tensor<T> q = prefix(data.q, kv), k = prefix(data.k, kv), v = prefix(data.v, kv);
  const Tensor<double> qd = widen(q), kd = widen(k), vd = widen(v);
  e.out = Tensor<double>(shape, heads.h);
  e.lse.assign(static_cast<std::size_t>(heads.h * kv), 0.0);
  reference::forward<double>(config, shape, {qd.view(), kd.view(), vd.view()},
                             {e.out.view(), e.lse.data()});
  Tensor<T> naive(shape, heads.h);
  std::vector<double> naive_lse;
  naive_in_storage_type(config, shape, q, k, v, naive, naive_lse);
  e.naive_error = max_abs_diff(naive, e.out);
  e.naive_lse_error = max_lse_diff(naive_lse, e.lse);
  return e;
}

// Accumulates the worst error of a case's rows and of its yardstick.
struct Errors {
  double out = 0, lse = 0, naive = 0, naive_lse = 0;
  std::int64_t rows = 0;
  void add_forward(const Expected& e) {
    naive = std::max(naive, e.naive_error);
    naive_lse = std::max(naive_lse, e.naive_lse_error);
  }
  // Row x of head h (the kernel's out row `got`, D values, and its LSE) against e.
  template <class T>
  void add_row(const Expected& e, std::int64_t x, std::int64_t h, const T* got, float got_lse,
               std::int64_t d_count) {
    for (std::int64_t d = 0; d < d_count; ++d) {
      const double diff = std::abs(to_double(got[d]) - e.at(x, h, d));
      if (!(diff <= out)) out = diff;  // NaN propagates
    }
    const double want = e.lse_at(x, h), have = static_cast<double>(got_lse);
    if (std::isinf(want) || std::isinf(have)) {
      if (!(want == have)) lse = std::numeric_limits<double>::infinity();
    } else {
      const double diff = std::abs(want - have);
      if (!(diff <= lse)) lse = diff;
    }
    ++rows;
  }
  template <class T>
  void expect_within() const {
    const double floor = std::is_same_v<T, float> ? 2e-5 : 1e-6;
    EXPECT_GT(rows, 0);
    EXPECT_LE(out, std::max(2.0 * naive, floor))
        << "output: kernel error " << out << ", naive " << naive << " over " << rows << " rows";
    EXPECT_LE(lse, std::max(2.0 * naive_lse, floor))
        << "lse: kernel error " << lse << ", naive " << naive_lse;
  }
};

template <class T>
T nan_value() {
  return T(std::numeric_limits<float>::quiet_NaN());
}

// ---- Form 1: decode and chunked prefill ------------------------------------------------------

// Runs rows [begin, begin + count) over kv positions for B sequences; records the errors.
template <class T, class Backend>
void check_query_range(Backend& backend, const Config& config, const Heads& heads,
                       const std::vector<SequenceData<T>>& data, std::int64_t kv,
                       std::int64_t begin, std::int64_t count, Errors& errors,
                       const std::vector<Expected>& expected, std::vector<T>* out_copy = nullptr,
                       std::vector<float>* lse_copy = nullptr) {
  const auto batch = static_cast<std::int64_t>(data.size());
  const Shape shape{batch, kv, heads.h, heads.hkv, heads.d};
  const std::int64_t qrow = heads.h * heads.d, krow = heads.hkv * heads.d;
  std::vector<T> q(static_cast<std::size_t>(batch * count * qrow));
  std::vector<T> k(static_cast<std::size_t>(batch * kv * krow)), v(k.size());
  for (std::int64_t b = 0; b < batch; ++b) {
    const SequenceData<T>& s = data[static_cast<std::size_t>(b)];
    for (std::int64_t i = 0; i < count; ++i)
      for (std::int64_t h = 0; h < heads.h; ++h)
        for (std::int64_t d = 0; d < heads.d; ++d)
          q[static_cast<std::size_t>(((b * count + i) * heads.h + h) * heads.d + d)] =
              s.q.at(0, begin + i, h, d);
    for (std::int64_t y = 0; y < kv; ++y)
      for (std::int64_t h = 0; h < heads.hkv; ++h)
        for (std::int64_t d = 0; d < heads.d; ++d) {
          const auto at = static_cast<std::size_t>(((b * kv + y) * heads.hkv + h) * heads.d + d);
          k[at] = s.k.at(0, y, h, d);
          v[at] = s.v.at(0, y, h, d);
        }
  }
  std::vector<T> out(q.size(), nan_value<T>());
  std::vector<float> lse(static_cast<std::size_t>(batch * heads.h * count),
                         std::numeric_limits<float>::quiet_NaN());
  backend.query_range(config, shape, QueryRange{begin, count}, q, k, v, out, lse);
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t i = 0; i < count; ++i)
      for (std::int64_t h = 0; h < heads.h; ++h)
        errors.add_row(expected[static_cast<std::size_t>(b)], begin + i, h,
                       &out[static_cast<std::size_t>(((b * count + i) * heads.h + h) * heads.d)],
                       lse[static_cast<std::size_t>((b * heads.h + h) * count + i)], heads.d);
  if (out_copy) *out_copy = out;
  if (lse_copy) *lse_copy = lse;
}

// A decode loop: each step t is row t of the forward over t + 1 positions (QueryRange {t, 1}),
// for B = 2 sequences at once.
template <class T, class Backend>
void decode_loop(Backend& backend, const Config& config, const Heads& heads, std::int64_t n,
                 const std::vector<std::int64_t>& steps, std::uint64_t seed) {
  std::vector<SequenceData<T>> data = {random_sequence<T>(heads, n, seed),
                                       random_sequence<T>(heads, n, seed + 10)};
  Errors errors;
  std::vector<Expected> whole;
  for (const std::int64_t t : steps) {
    SCOPED_TRACE("decode step " + std::to_string(t));
    // Causal rows of the forward over t + 1 positions are those of the whole sequence's.
    if (!config.causal || whole.empty()) {
      std::vector<Expected> expected;
      for (const auto& s : data)
        expected.push_back(expected_forward(config, heads, s, config.causal ? n : t + 1));
      for (const auto& e : expected) errors.add_forward(e);
      if (config.causal)
        whole = std::move(expected);
      else {
        check_query_range<T>(backend, config, heads, data, t + 1, t, 1, errors, expected);
        continue;
      }
    }
    check_query_range<T>(backend, config, heads, data, t + 1, t, 1, errors, whole);
  }
  errors.expect_within<T>();
}

// Chunked prefill: chunk [c_b, c_e) of the forward; causal chunks run over their end's kv_len
// (what a prefill has when it runs), non-causal ones over the whole sequence.
template <class T, class Backend>
void chunked_prefill(Backend& backend, const Config& config, const Heads& heads, std::int64_t n,
                     const std::vector<std::int64_t>& cuts, std::uint64_t seed) {
  std::vector<SequenceData<T>> data = {random_sequence<T>(heads, n, seed)};
  Errors errors;
  std::vector<Expected> whole = {expected_forward(config, heads, data[0], n)};
  errors.add_forward(whole[0]);
  for (std::size_t c = 0; c + 1 < cuts.size(); ++c) {
    const std::int64_t begin = cuts[c], end = cuts[c + 1];
    SCOPED_TRACE("chunk [" + std::to_string(begin) + ", " + std::to_string(end) + ")");
    if (config.causal) {
      // Causal rows of the forward over `end` positions equal those over the whole sequence.
      check_query_range<T>(backend, config, heads, data, end, begin, end - begin, errors, whole);
    } else {
      check_query_range<T>(backend, config, heads, data, n, begin, end - begin, errors, whole);
    }
  }
  errors.expect_within<T>();
}

// ---- Forms 2 and 3: varlen and paged ----------------------------------------------------------

// query_begins empty: each sequence's queries are its last query_counts[b] rows (null
// Sequences::query_begins); otherwise they start at query_begins[b].
struct Batch {
  std::vector<std::int64_t> kv_lengths, query_counts, query_begins = {};
  std::int64_t begin(std::size_t b) const {
    return query_begins.empty() ? kv_lengths[b] - query_counts[b] : query_begins[b];
  }
};

template <class T>
struct PackedResult {
  std::vector<T> out;
  std::vector<float> lse;  // [H, total_q]
};

// The packed queries: for sequence b its last query_counts[b] rows.
template <class T>
std::vector<T> packed_queries(const std::vector<SequenceData<T>>& data, const Batch& batch,
                              const Heads& heads, std::vector<std::int64_t>& query_offsets) {
  query_offsets.assign(1, 0);
  std::vector<T> q;
  for (std::size_t b = 0; b < data.size(); ++b) {
    const std::int64_t count = batch.query_counts[b], first = batch.begin(b);
    for (std::int64_t i = first; i < first + count; ++i)
      for (std::int64_t h = 0; h < heads.h; ++h)
        for (std::int64_t d = 0; d < heads.d; ++d) q.push_back(data[b].q.at(0, i, h, d));
    query_offsets.push_back(query_offsets.back() + count);
  }
  if (q.empty()) q.resize(1);
  return q;
}

template <class T>
void check_packed(const Config& config, const Heads& heads,
                  const std::vector<SequenceData<T>>& data, const Batch& batch,
                  const std::vector<std::int64_t>& query_offsets, const PackedResult<T>& result) {
  Errors errors;
  const std::int64_t total_q = query_offsets.back();
  for (std::size_t b = 0; b < data.size(); ++b) {
    const std::int64_t kv = batch.kv_lengths[b], count = batch.query_counts[b];
    if (count == 0) continue;
    const Expected e = expected_forward(config, heads, data[b], kv);
    errors.add_forward(e);
    for (std::int64_t i = 0; i < count; ++i)
      for (std::int64_t h = 0; h < heads.h; ++h) {
        const std::int64_t row = query_offsets[b] + i;
        errors.add_row(e, batch.begin(b) + i, h,
                       &result.out[static_cast<std::size_t>((row * heads.h + h) * heads.d)],
                       result.lse[static_cast<std::size_t>(h * total_q + row)], heads.d);
      }
  }
  errors.expect_within<T>();
}

template <class T, class Backend>
PackedResult<T> run_varlen(Backend& backend, const Config& config, const Heads& heads,
                           const std::vector<SequenceData<T>>& data, const Batch& batch) {
  std::vector<std::int64_t> query_offsets, kv_offsets{0};
  const std::vector<T> q = packed_queries(data, batch, heads, query_offsets);
  std::vector<T> k, v;
  for (std::size_t b = 0; b < data.size(); ++b) {
    for (std::int64_t y = 0; y < batch.kv_lengths[b]; ++y)
      for (std::int64_t h = 0; h < heads.hkv; ++h)
        for (std::int64_t d = 0; d < heads.d; ++d) {
          k.push_back(data[b].k.at(0, y, h, d));
          v.push_back(data[b].v.at(0, y, h, d));
        }
    kv_offsets.push_back(kv_offsets.back() + batch.kv_lengths[b]);
  }
  if (k.empty()) k.resize(1), v.resize(1);
  const std::int64_t total_q = query_offsets.back();
  PackedResult<T> result{
      std::vector<T>(
          static_cast<std::size_t>(std::max<std::int64_t>(total_q, 1) * heads.h * heads.d),
          nan_value<T>()),
      std::vector<float>(static_cast<std::size_t>(std::max<std::int64_t>(total_q, 1) * heads.h),
                         std::numeric_limits<float>::quiet_NaN())};
  Sequences s;
  s.count = static_cast<std::int64_t>(data.size());
  s.query_offsets = query_offsets.data();
  s.kv_offsets = kv_offsets.data();
  if (!batch.query_begins.empty()) s.query_begins = batch.query_begins.data();
  backend.varlen(config, HeadShape{heads.h, heads.hkv, heads.d}, s, q, k, v, result.out,
                 result.lse);
  return result;
}

// Paged: the sequences' keys laid into pages of `page_size` rows ([num_pages, page_size, Hkv, D]
// contiguous) in a shuffled order, with one spare page never referenced (filled with NaN: reading
// it would show).
template <class T, class Backend>
PackedResult<T> run_paged(Backend& backend, const Config& config, const Heads& heads,
                          const std::vector<SequenceData<T>>& data, const Batch& batch,
                          std::int64_t page_size, std::uint64_t seed) {
  std::vector<std::int64_t> query_offsets;
  const std::vector<T> q = packed_queries(data, batch, heads, query_offsets);
  std::int64_t needed = 0, most = 0;
  for (std::size_t b = 0; b < data.size(); ++b) {
    const std::int64_t pages = (batch.kv_lengths[b] + page_size - 1) / page_size;
    needed += pages;
    most = std::max(most, pages);
  }
  const std::int64_t num_pages = needed + 1;
  std::vector<std::int32_t> order(static_cast<std::size_t>(num_pages));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 engine(seed);
  std::shuffle(order.begin(), order.end(), engine);
  const std::int64_t page_elems = page_size * heads.hkv * heads.d;
  std::vector<T> k(static_cast<std::size_t>(num_pages * page_elems), nan_value<T>()),
      v(k.size(), nan_value<T>());
  const std::int64_t stride = std::max<std::int64_t>(most, 1) + 2;  // a wider table than needed
  std::vector<std::int32_t> table(
      static_cast<std::size_t>(stride * static_cast<std::int64_t>(data.size())), -7);
  std::size_t next = 0;
  for (std::size_t b = 0; b < data.size(); ++b) {
    const std::int64_t kv = batch.kv_lengths[b];
    for (std::int64_t j = 0; j * page_size < kv; ++j) {
      const std::int32_t page = order[next++];
      table[b * static_cast<std::size_t>(stride) + static_cast<std::size_t>(j)] = page;
      for (std::int64_t r = 0; r < page_size && j * page_size + r < kv; ++r)
        for (std::int64_t h = 0; h < heads.hkv; ++h)
          for (std::int64_t d = 0; d < heads.d; ++d) {
            const auto at =
                static_cast<std::size_t>(page * page_elems + (r * heads.hkv + h) * heads.d + d);
            k[at] = data[b].k.at(0, j * page_size + r, h, d);
            v[at] = data[b].v.at(0, j * page_size + r, h, d);
          }
    }
  }
  const std::int64_t total_q = query_offsets.back();
  PackedResult<T> result{
      std::vector<T>(
          static_cast<std::size_t>(std::max<std::int64_t>(total_q, 1) * heads.h * heads.d),
          nan_value<T>()),
      std::vector<float>(static_cast<std::size_t>(std::max<std::int64_t>(total_q, 1) * heads.h),
                         std::numeric_limits<float>::quiet_NaN())};
  Sequences s;
  s.count = static_cast<std::int64_t>(data.size());
  s.query_offsets = query_offsets.data();
  s.kv_lengths = batch.kv_lengths.data();
  if (!batch.query_begins.empty()) s.query_begins = batch.query_begins.data();
  backend.paged(config, HeadShape{heads.h, heads.hkv, heads.d}, s, q, k, v, num_pages, page_size,
                table, stride, result.out, result.lse);
  return result;
}

template <class T>
std::vector<SequenceData<T>> random_batch(const Heads& heads, const Batch& batch,
                                          std::uint64_t seed) {
  std::vector<SequenceData<T>> data;
  for (std::size_t b = 0; b < batch.kv_lengths.size(); ++b)
    data.push_back(random_sequence<T>(heads, batch.kv_lengths[b], seed + 100 * b));
  return data;
}

// ---- Form 4: padded -------------------------------------------------------------------------

template <class T, class Backend>
PackedResult<T> run_padded(Backend& backend, const Config& config, const Heads& heads,
                           const std::vector<SequenceData<T>>& data,
                           const std::vector<std::int64_t>& lengths, std::int64_t n) {
  const auto batch = static_cast<std::int64_t>(data.size());
  const Shape shape{batch, n, heads.h, heads.hkv, heads.d};
  std::vector<T> q(static_cast<std::size_t>(batch * n * heads.h * heads.d), nan_value<T>());
  std::vector<T> k(static_cast<std::size_t>(batch * n * heads.hkv * heads.d), nan_value<T>()),
      v(k.size(), nan_value<T>());
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t x = 0; x < lengths[static_cast<std::size_t>(b)]; ++x) {
      for (std::int64_t h = 0; h < heads.h; ++h)
        for (std::int64_t d = 0; d < heads.d; ++d)
          q[static_cast<std::size_t>(((b * n + x) * heads.h + h) * heads.d + d)] =
              data[static_cast<std::size_t>(b)].q.at(0, x, h, d);
      for (std::int64_t h = 0; h < heads.hkv; ++h)
        for (std::int64_t d = 0; d < heads.d; ++d) {
          const auto at = static_cast<std::size_t>(((b * n + x) * heads.hkv + h) * heads.d + d);
          k[at] = data[static_cast<std::size_t>(b)].k.at(0, x, h, d);
          v[at] = data[static_cast<std::size_t>(b)].v.at(0, x, h, d);
        }
    }
  PackedResult<T> result{std::vector<T>(q.size(), nan_value<T>()),
                         std::vector<float>(static_cast<std::size_t>(batch * heads.h * n),
                                            std::numeric_limits<float>::quiet_NaN())};
  backend.padded(config, shape, ValidLengths{lengths.data()}, q, k, v, result.out, result.lse);
  return result;
}

// The configs of the cases: N = 200-ish sequences, segments {50, 96, 200} x rates {1, 3, 5},
// each offset rule, both mixings, causal or not.
inline Config inference_config(OffsetRule rule, Mixing mixing, bool causal) {
  return make_config({50, 96, 200}, {1, 3, 5}, causal, rule, mixing);
}

inline std::string describe_config(const Config& c) {
  return std::string(to_string(c.offsets)) + " " + to_string(c.mixing) +
         (c.causal ? " causal" : " non-causal");
}

}  // namespace dilated_attention::testing::inference
