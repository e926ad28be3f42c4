// The inference forms' kernels (cuda/inference_kernel.cuh) run on the host by the CUDA emulation
// (tests/support/cuda_host_emulation.hpp: fibers for threads, warp collectives as barriers),
// through the very plans that cuda::forward makes (cuda/inference_plan.hpp), against the fp64
// reference over each sequence (cuda_inference_cases.hpp). What this does not run: the
// stream-ordered upload of the table and the launches themselves (cuda/inference.cuh), which the
// GPU test does (cuda_inference_test.cu).

#include "support/cuda_host_emulation.hpp"  // first: it defines the CUDA names the kernels use

#include <dilated_attention/cuda/inference_kernel.cuh>
#include <dilated_attention/cuda/inference_plan.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "support/cuda_inference_cases.hpp"

namespace {

namespace da = dilated_attention;
namespace dc = dilated_attention::cuda;
namespace dt = dilated_attention::testing;
namespace di = dilated_attention::testing::inference;

using Kernel = void (*)(dc::InferenceParams);

template <class T>
struct Kernels {
  Kernel row, piece, merge;
};

template <class T>
Kernels<T> kernels_for(std::int64_t head_dim) {
  switch (head_dim) {
    case 32:
      return {&dc::device::inference_row_kernel<T, 32>, &dc::device::decode_piece_kernel<T, 32>,
              &dc::device::decode_merge_kernel<T, 32>};
    case 64:
      return {&dc::device::inference_row_kernel<T, 64>, &dc::device::decode_piece_kernel<T, 64>,
              &dc::device::decode_merge_kernel<T, 64>};
    case 96:
      return {&dc::device::inference_row_kernel<T, 96>, &dc::device::decode_piece_kernel<T, 96>,
              &dc::device::decode_merge_kernel<T, 96>};
    default:
      return {&dc::device::inference_row_kernel<T, 128>, &dc::device::decode_piece_kernel<T, 128>,
              &dc::device::decode_merge_kernel<T, 128>};
  }
}

// What run_inference (cuda/inference.cuh) does, on the host: the table and the partials in host
// memory (the partials poisoned with NaN, so that a merge reading a piece never written fails),
// the piece and merge kernels or the row kernel, emulated.
struct EmulatedRun {
  bool split = false;
  std::int64_t pieces = 0;
};

template <class T>
EmulatedRun run_emulated(dc::InferencePlan plan) {
  EmulatedRun run{plan.split, plan.params.pieces};
  if (plan.empty()) return run;
  const std::int64_t d = plan.params.head_dim;
  std::vector<float> partial_o(
      plan.partial_floats / static_cast<std::size_t>(d + 1) * static_cast<std::size_t>(d),
      std::numeric_limits<float>::quiet_NaN());
  std::vector<float> partial_lse(plan.partial_floats / static_cast<std::size_t>(d + 1),
                                 std::numeric_limits<float>::quiet_NaN());
  plan.params.table = plan.table.values.data();
  plan.params.partial_o = partial_o.data();
  plan.params.partial_lse = partial_lse.data();
  EXPECT_LE(plan.shared_bytes, sizeof(dc::device::simt_query_rows));
  auto* const shared = reinterpret_cast<unsigned char*>(dc::device::simt_query_rows);
  const Kernels<T> k = kernels_for<T>(d);
  const auto threads = static_cast<unsigned>(plan.threads);
  if (plan.split) {
    emulation::launch(static_cast<unsigned>(plan.piece_blocks), threads, shared, plan.shared_bytes,
                      [&] { k.piece(plan.params); });
    emulation::launch(static_cast<unsigned>(plan.row_blocks), threads, shared, 0,
                      [&] { k.merge(plan.params); });
  } else {
    emulation::launch(static_cast<unsigned>(plan.row_blocks), threads, shared, plan.shared_bytes,
                      [&] { k.row(plan.params); });
  }
  return run;
}

template <class T>
da::View<T> packed_view(T* data, std::int64_t heads, std::int64_t d) {
  return da::View<T>{data, 0, heads * d, d};
}

// The Backend of cuda_inference_cases.hpp: each form's plan (validation included) run emulated.
// piece_keys: the split-KV piece size (small here, so that a branch's keys span several pieces).
struct EmulatedBackend {
  std::int64_t piece_keys = dc::decode_piece_keys;
  EmulatedRun last;

  template <class T>
  void query_range(const da::Config& config, const da::Shape& shape, const da::QueryRange& range,
                   const std::vector<T>& q, const std::vector<T>& k, const std::vector<T>& v,
                   std::vector<T>& out, std::vector<float>& lse) {
    const da::Shape rows{shape.batch, range.count, shape.num_heads, shape.num_kv_heads,
                         shape.head_dim};
    const da::Inputs<T> in{da::contiguous_view(q, rows, shape.num_heads),
                           da::contiguous_view(k, shape, shape.num_kv_heads),
                           da::contiguous_view(v, shape, shape.num_kv_heads)};
    const da::Outputs<T> o{da::contiguous_view(out, rows, shape.num_heads), lse.data()};
    last = run_emulated<T>(dc::plan_query_range<T>(config, shape, range, in, o, piece_keys));
  }
  template <class T>
  void varlen(const da::Config& config, const da::HeadShape& heads, const da::Sequences& s,
              const std::vector<T>& q, const std::vector<T>& k, const std::vector<T>& v,
              std::vector<T>& out, std::vector<float>& lse) {
    const da::Inputs<T> in{packed_view(q.data(), heads.num_heads, heads.head_dim),
                           packed_view(k.data(), heads.num_kv_heads, heads.head_dim),
                           packed_view(v.data(), heads.num_kv_heads, heads.head_dim)};
    const da::Outputs<T> o{packed_view(out.data(), heads.num_heads, heads.head_dim), lse.data()};
    last = run_emulated<T>(dc::plan_varlen<T>(config, heads, s, in, o, piece_keys));
  }
  template <class T>
  void paged(const da::Config& config, const da::HeadShape& heads, const da::Sequences& s,
             const std::vector<T>& q, const std::vector<T>& k, const std::vector<T>& v,
             std::int64_t num_pages, std::int64_t page_size, const std::vector<std::int32_t>& table,
             std::int64_t table_stride, std::vector<T>& out, std::vector<float>& lse) {
    da::PagedKeyValues<T> paged;
    paged.k = k.data();
    paged.v = v.data();
    paged.num_pages = num_pages;
    paged.page_size = page_size;
    paged.row_stride = heads.num_kv_heads * heads.head_dim;
    paged.page_stride = page_size * paged.row_stride;
    paged.head_stride = heads.head_dim;
    paged.page_table = table.data();
    paged.page_table_stride = table_stride;
    const da::Outputs<T> o{packed_view(out.data(), heads.num_heads, heads.head_dim), lse.data()};
    last = run_emulated<T>(dc::plan_paged<T>(config, heads, s,
                                             packed_view(q.data(), heads.num_heads, heads.head_dim),
                                             paged, o, piece_keys));
  }
  template <class T>
  void padded(const da::Config& config, const da::Shape& shape, const da::ValidLengths& lengths,
              const std::vector<T>& q, const std::vector<T>& k, const std::vector<T>& v,
              std::vector<T>& out, std::vector<float>& lse) {
    const da::Inputs<T> in{da::contiguous_view(q, shape, shape.num_heads),
                           da::contiguous_view(k, shape, shape.num_kv_heads),
                           da::contiguous_view(v, shape, shape.num_kv_heads)};
    const da::Outputs<T> o{da::contiguous_view(out, shape, shape.num_heads), lse.data()};
    last = run_emulated<T>(dc::plan_padded<T>(config, shape, lengths, in, o));
  }
};

using R = da::OffsetRule;
using M = da::Mixing;

const di::Heads gqa{6, 2, 32};

// The decode loop over N = 200 for every rule, both mixings, causal or not (GQA 6:2): steps at
// and around the segment boundaries 50, 96, 150, and the first and last positions. Pieces of 8
// keys, so every branch's keys span several pieces (up to 25).
TEST(CudaInferenceEmulated, DecodeLoopEveryRuleAndMixing) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  EmulatedBackend backend;
  backend.piece_keys = 8;
  std::uint64_t seed = 100;
  for (const R rule : {R::modular, R::blocked, R::partitioned})
    for (const M mixing : {M::softmax, M::mean})
      for (const bool causal : {true, false}) {
        const da::Config config = di::inference_config(rule, mixing, causal);
        SCOPED_TRACE(di::describe_config(config));
        di::decode_loop<float>(backend, config, gqa, 200, {0, 1, 49, 50, 97, 149, 199}, seed);
        EXPECT_TRUE(backend.last.split) << "count = 1 must take the split-KV path";
        seed += 7;
      }
}

// The default piece size (256 keys: one piece per branch here) and the 16-bit types.
TEST(CudaInferenceEmulated, DecodeDefaultPiecesHalfBfloat16) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  EmulatedBackend backend;
  const da::Config config = di::inference_config(R::modular, M::softmax, true);
  di::decode_loop<__half>(backend, config, gqa, 200, {0, 95, 96, 199}, 300);
  EXPECT_EQ(backend.last.pieces, 3);
  const da::Config mean = di::inference_config(R::blocked, M::mean, false);
  di::decode_loop<__nv_bfloat16>(backend, mean, gqa, 200, {0, 50, 150, 199}, 310);
}

// Head dims 64 and 128 (the warp's lanes hold 2 and 4 output elements).
TEST(CudaInferenceEmulated, DecodeOtherHeadDims) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  EmulatedBackend backend;
  backend.piece_keys = 16;
  const da::Config config = di::inference_config(R::modular, M::softmax, true);
  di::decode_loop<__half>(backend, config, {4, 4, 64}, 200, {60, 199}, 320);
  di::decode_loop<float>(backend, config, {2, 1, 128}, 200, {10, 150}, 330);
}

// Chunked prefill with uneven chunks (the row kernel: count > 1), causal and not, each type.
TEST(CudaInferenceEmulated, ChunkedPrefillUnevenChunks) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  EmulatedBackend backend;
  const std::vector<std::int64_t> cuts = {0, 37, 50, 51, 131, 200};
  const di::Heads heads{4, 2, 32};
  di::chunked_prefill<float>(backend, di::inference_config(R::modular, M::softmax, true), heads,
                             200, cuts, 400);
  EXPECT_FALSE(backend.last.split);
  di::chunked_prefill<__half>(backend, di::inference_config(R::blocked, M::mean, false), heads, 200,
                              cuts, 410);
  di::chunked_prefill<__nv_bfloat16>(
      backend, di::inference_config(R::partitioned, M::softmax, true), {3, 3, 32}, 200, cuts, 420);
}

// Varlen against each sequence alone: lengths 1, 37, 200, 143 (multiples of no segment) and an
// empty sequence, prefill (the row kernel) and decode (split-KV); the packed rows are bitwise
// the rows of each sequence run alone through form 1 when both take the same kernel path.
TEST(CudaInferenceEmulated, VarlenMatchesEachSequenceAlone) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  EmulatedBackend backend;
  backend.piece_keys = 16;
  const di::Heads heads{4, 2, 32};
  const da::Config config = di::inference_config(R::modular, M::softmax, true);
  const di::Batch prefill{{1, 37, 0, 143, 60}, {1, 37, 0, 143, 60}};
  const di::Batch decode{{1, 37, 0, 200, 143}, {1, 1, 0, 1, 1}};
  for (const bool is_decode : {false, true}) {
    const di::Batch& batch = is_decode ? decode : prefill;
    const auto data = di::random_batch<float>(heads, batch, 500);
    std::vector<std::int64_t> offsets;
    di::packed_queries(data, batch, heads, offsets);
    const auto packed = di::run_varlen<float>(backend, config, heads, data, batch);
    EXPECT_EQ(backend.last.split, is_decode);
    di::check_packed<float>(config, heads, data, batch, offsets, packed);
    // Each non-empty sequence alone (QueryRange over its own kv_len).
    const std::int64_t total_q = offsets.back();
    for (std::size_t b = 0; b < data.size(); ++b) {
      const std::int64_t kv = batch.kv_lengths[b], count = batch.query_counts[b];
      if (count == 0) continue;
      SCOPED_TRACE("sequence " + std::to_string(b));
      di::Errors alone;
      std::vector<di::Expected> expected = {di::expected_forward(config, heads, data[b], kv)};
      alone.add_forward(expected[0]);
      std::vector<float> out, lse;
      di::check_query_range<float>(backend, config, heads, {data[b]}, kv, kv - count, count, alone,
                                   expected, &out, &lse);
      alone.expect_within<float>();
      // Bitwise where both took the same path (alone, count 1 is split-KV; packed, only when
      // every sequence has one query row).
      if ((count == 1) != is_decode) continue;
      for (std::int64_t i = 0; i < count; ++i)
        for (std::int64_t h = 0; h < heads.h; ++h) {
          const std::int64_t row = offsets[b] + i;
          EXPECT_EQ(
              std::memcmp(&packed.out[static_cast<std::size_t>((row * heads.h + h) * heads.d)],
                          &out[static_cast<std::size_t>((i * heads.h + h) * heads.d)],
                          sizeof(float) * static_cast<std::size_t>(heads.d)),
              0)
              << "row " << i << " head " << h;
          EXPECT_EQ(packed.lse[static_cast<std::size_t>(h * total_q + row)],
                    lse[static_cast<std::size_t>(h * count + i)]);
        }
    }
  }
}

// Sequences::query_begins: chunks in the middle of their sequences (chunked prefill of a
// batch), non-causal so that the rows see keys after them, packed and paged agreeing bitwise.
TEST(CudaInferenceEmulated, VarlenAndPagedWithQueryBegins) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  EmulatedBackend backend;
  const di::Heads heads{4, 4, 32};
  const da::Config config = di::inference_config(R::blocked, M::softmax, false);
  const di::Batch batch{{200, 37, 120}, {31, 1, 0}, {40, 36, 5}};
  const auto data = di::random_batch<float>(heads, batch, 650);
  std::vector<std::int64_t> offsets;
  di::packed_queries(data, batch, heads, offsets);
  const auto varlen = di::run_varlen<float>(backend, config, heads, data, batch);
  EXPECT_FALSE(backend.last.split);
  di::check_packed<float>(config, heads, data, batch, offsets, varlen);
  const auto paged = di::run_paged<float>(backend, config, heads, data, batch, 16, 651);
  EXPECT_TRUE(dt::bitwise_equal(paged.out, varlen.out));
  EXPECT_TRUE(dt::bitwise_equal(paged.lse, varlen.lse));
  // One row per sequence: the split-KV path, anywhere in the sequence.
  const di::Batch decode{{200, 37, 120}, {1, 1, 1}, {13, 36, 100}};
  const auto rows = di::random_batch<float>(heads, decode, 660);
  di::packed_queries(rows, decode, heads, offsets);
  const auto split = di::run_varlen<float>(backend, config, heads, rows, decode);
  EXPECT_TRUE(backend.last.split);
  di::check_packed<float>(config, heads, rows, decode, offsets, split);
}

// Paged K/V with page sizes 1, 16 and 256, pages shuffled (and a wider page table than needed),
// decode (split-KV) and multi-row queries (row kernel), bitwise equal to the varlen form.
TEST(CudaInferenceEmulated, PagedMatchesVarlenEveryPageSize) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  EmulatedBackend backend;
  backend.piece_keys = 16;
  const di::Heads heads{6, 2, 32};
  const da::Config config = di::inference_config(R::blocked, M::softmax, true);
  const di::Batch decode{{200, 37, 1}, {1, 1, 1}};
  const di::Batch rows{{200, 37, 1}, {5, 37, 1}};
  std::uint64_t seed = 600;
  for (const bool is_decode : {true, false}) {
    const di::Batch& batch = is_decode ? decode : rows;
    const auto data = di::random_batch<__half>(heads, batch, seed);
    std::vector<std::int64_t> offsets;
    di::packed_queries(data, batch, heads, offsets);
    const auto varlen = di::run_varlen<__half>(backend, config, heads, data, batch);
    for (const std::int64_t page_size : {1, 16, 256}) {
      SCOPED_TRACE("page size " + std::to_string(page_size));
      const auto paged =
          di::run_paged<__half>(backend, config, heads, data, batch, page_size, seed + page_size);
      EXPECT_EQ(backend.last.split, is_decode);
      di::check_packed<__half>(config, heads, data, batch, offsets, paged);
      EXPECT_TRUE(dt::bitwise_equal(paged.out, varlen.out));
      EXPECT_TRUE(dt::bitwise_equal(paged.lse, varlen.lse));
    }
    seed += 50;
  }
}

// Pages shared between sequences (a common prefix, as a prefix cache gives): sequence 1 is the
// first 100 positions of sequence 0 and its page-table row names sequence 0's first 7 pages
// (the 7th only partly its own). Pages are laid out in reverse order.
TEST(CudaInferenceEmulated, PagedSequencesSharePages) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  EmulatedBackend backend;
  backend.piece_keys = 16;
  const di::Heads heads{4, 2, 32};
  const da::Config config = di::inference_config(R::modular, M::mean, true);
  const auto whole = di::random_sequence<float>(heads, 200, 1200);
  const std::vector<di::SequenceData<float>> data = {whole, whole};
  for (const bool is_decode : {true, false}) {
    const di::Batch batch =
        is_decode ? di::Batch{{200, 100}, {1, 1}} : di::Batch{{200, 100}, {7, 100}};
    std::vector<std::int64_t> offsets;
    const std::vector<float> q = di::packed_queries(data, batch, heads, offsets);
    const std::int64_t page_size = 16, num_pages = 13, row = heads.hkv * heads.d;
    std::vector<float> k(static_cast<std::size_t>(num_pages * page_size * row)), v(k.size());
    for (std::int64_t y = 0; y < 200; ++y)
      for (std::int64_t h = 0; h < heads.hkv; ++h)
        for (std::int64_t d = 0; d < heads.d; ++d) {
          const std::int64_t page = 12 - y / page_size;
          const auto at =
              static_cast<std::size_t>((page * page_size + y % page_size) * row + h * heads.d + d);
          k[at] = whole.k.at(0, y, h, d);
          v[at] = whole.v.at(0, y, h, d);
        }
    std::vector<std::int32_t> table(2 * 13, -1);
    for (int j = 0; j < 13; ++j) table[static_cast<std::size_t>(j)] = 12 - j;
    for (int j = 0; j < 7; ++j) table[static_cast<std::size_t>(13 + j)] = 12 - j;
    const std::int64_t total_q = offsets.back();
    di::PackedResult<float> result{
        std::vector<float>(static_cast<std::size_t>(total_q * heads.h * heads.d)),
        std::vector<float>(static_cast<std::size_t>(total_q * heads.h))};
    da::Sequences s;
    s.count = 2;
    s.query_offsets = offsets.data();
    s.kv_lengths = batch.kv_lengths.data();
    backend.paged(config, da::HeadShape{heads.h, heads.hkv, heads.d}, s, q, k, v, num_pages,
                  page_size, table, 13, result.out, result.lse);
    EXPECT_EQ(backend.last.split, is_decode);
    di::check_packed<float>(config, heads, data, batch, offsets, result);
  }
}

// Padded: rows past a length are O = 0, LSE = -inf; valid rows bitwise the varlen form's.
TEST(CudaInferenceEmulated, PaddedMatchesVarlen) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  EmulatedBackend backend;
  const di::Heads heads{3, 1, 32};
  const da::Config config = di::inference_config(R::modular, M::mean, false);
  const std::vector<std::int64_t> lengths = {120, 37, 0};
  const std::int64_t n = 120;
  const di::Batch batch{lengths, lengths};
  const auto data = di::random_batch<__nv_bfloat16>(heads, batch, 700);
  std::vector<std::int64_t> offsets;
  di::packed_queries(data, batch, heads, offsets);
  const auto varlen = di::run_varlen<__nv_bfloat16>(backend, config, heads, data, batch);
  di::check_packed<__nv_bfloat16>(config, heads, data, batch, offsets, varlen);
  const auto padded = di::run_padded<__nv_bfloat16>(backend, config, heads, data, lengths, n);
  const std::int64_t total_q = offsets.back();
  std::size_t mismatches = 0, not_empty = 0;
  for (std::size_t b = 0; b < lengths.size(); ++b)
    for (std::int64_t x = 0; x < n; ++x)
      for (std::int64_t h = 0; h < heads.h; ++h) {
        const auto* got = &padded.out[static_cast<std::size_t>(
            ((static_cast<std::int64_t>(b) * n + x) * heads.h + h) * heads.d)];
        const float got_lse = padded.lse[static_cast<std::size_t>(
            (static_cast<std::int64_t>(b) * heads.h + h) * n + x)];
        if (x < lengths[b]) {
          const std::int64_t row = offsets[b] + x;
          if (std::memcmp(got, &varlen.out[static_cast<std::size_t>((row * heads.h + h) * heads.d)],
                          sizeof(*got) * static_cast<std::size_t>(heads.d)) != 0 ||
              got_lse != varlen.lse[static_cast<std::size_t>(h * total_q + row)])
            ++mismatches;
        } else {
          for (std::int64_t d = 0; d < heads.d; ++d)
            if (dt::to_double(got[d]) != 0.0) ++not_empty;
          if (!(got_lse == -std::numeric_limits<float>::infinity())) ++not_empty;
        }
      }
  EXPECT_EQ(mismatches, 0u);
  EXPECT_EQ(not_empty, 0u);
}

// Two runs of each path are bitwise equal (fixed piece order, fixed shuffle trees, no atomics).
TEST(CudaInferenceEmulated, DeterministicAcrossRuns) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  EmulatedBackend backend;
  backend.piece_keys = 8;
  const di::Heads heads{4, 2, 32};
  const da::Config config = di::inference_config(R::partitioned, M::softmax, false);
  const di::Batch decode{{200, 77}, {1, 1}};
  const di::Batch rows{{200, 77}, {9, 77}};
  for (const di::Batch& batch : {decode, rows}) {
    const auto data = di::random_batch<float>(heads, batch, 800);
    const auto first = di::run_varlen<float>(backend, config, heads, data, batch);
    const auto second = di::run_varlen<float>(backend, config, heads, data, batch);
    EXPECT_TRUE(dt::bitwise_equal(first.out, second.out));
    EXPECT_TRUE(dt::bitwise_equal(first.lse, second.lse));
    const auto paged1 = di::run_paged<float>(backend, config, heads, data, batch, 16, 9);
    const auto paged2 = di::run_paged<float>(backend, config, heads, data, batch, 16, 9);
    EXPECT_TRUE(dt::bitwise_equal(paged1.out, paged2.out));
  }
}

// Strided views (padding after each head and each row, different for q, k/v and out) and a
// null LSE give the same outputs, bitwise, as the contiguous run, on both paths.
template <class T>
void check_strided_and_null_lse(std::int64_t begin, std::int64_t count, std::uint64_t seed) {
  const di::Heads heads{4, 2, 32};
  const da::Config config = di::inference_config(R::modular, M::mean, true);
  const da::Shape shape{2, 150, heads.h, heads.hkv, heads.d};
  const da::Shape rows{2, count, heads.h, heads.hkv, heads.d};
  const auto q = dt::random_tensor<T>(rows, heads.h, seed, 3, 5);
  const auto k = dt::random_tensor<T>(shape, heads.hkv, seed + 1, 8, 0);
  const auto v = dt::random_tensor<T>(shape, heads.hkv, seed + 2, 1, 7);
  dt::Tensor<T> strided(rows, heads.h, 5, 2), dense(rows, heads.h), no_lse(rows, heads.h);
  strided.fill(di::nan_value<T>());
  dense.fill(di::nan_value<T>());
  no_lse.fill(di::nan_value<T>());
  std::vector<float> lse_strided(static_cast<std::size_t>(2 * heads.h * count)),
      lse_dense(lse_strided.size());
  const da::QueryRange range{begin, count};
  run_emulated<T>(dc::plan_query_range<T>(config, shape, range, {q.view(), k.view(), v.view()},
                                          {strided.view(), lse_strided.data()}, 8));
  // The same inputs copied contiguous.
  dt::Tensor<T> qc(rows, heads.h), kc(shape, heads.hkv), vc(shape, heads.hkv);
  for (std::int64_t b = 0; b < 2; ++b) {
    for (std::int64_t x = 0; x < count; ++x)
      for (std::int64_t h = 0; h < heads.h; ++h)
        for (std::int64_t d = 0; d < heads.d; ++d) qc.at(b, x, h, d) = q.at(b, x, h, d);
    for (std::int64_t x = 0; x < 150; ++x)
      for (std::int64_t h = 0; h < heads.hkv; ++h)
        for (std::int64_t d = 0; d < heads.d; ++d) {
          kc.at(b, x, h, d) = k.at(b, x, h, d);
          vc.at(b, x, h, d) = v.at(b, x, h, d);
        }
  }
  const EmulatedRun run = run_emulated<T>(
      dc::plan_query_range<T>(config, shape, range, {qc.view(), kc.view(), vc.view()},
                              {dense.view(), lse_dense.data()}, 8));
  EXPECT_EQ(run.split, count == 1);
  run_emulated<T>(dc::plan_query_range<T>(config, shape, range, {qc.view(), kc.view(), vc.view()},
                                          {no_lse.view(), nullptr}, 8));
  EXPECT_TRUE(dt::bitwise_equal(strided, dense));
  EXPECT_TRUE(dt::bitwise_equal(no_lse, dense));
  EXPECT_TRUE(dt::bitwise_equal(lse_strided, lse_dense));
  // The output's padding is never written.
  std::size_t touched = 0;
  for (const T& value : strided.storage) touched += std::isnan(dt::to_double(value)) ? 0 : 1;
  EXPECT_EQ(touched, static_cast<std::size_t>(2 * count * heads.h * heads.d));
}

TEST(CudaInferenceEmulated, StridedViewsAndNullLse) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  check_strided_and_null_lse<__half>(149, 1, 900);  // split-KV
  check_strided_and_null_lse<float>(60, 30, 910);   // row kernel
}

// ---- The plan and its checks (no kernels run) -------------------------------------------------

template <class F>
std::string message_of(F&& call) {
  try {
    call();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "(no exception)";
}

TEST(CudaInferencePlan, PiecesFollowTheBranches) {
  // Blocks of at most ceil(min(w, longest) / r) keys: 50, 32, 40 keys -> 7, 4, 5 pieces of 8.
  const da::Config config = di::inference_config(R::modular, M::softmax, true);
  const da::Shape shape{1, 200, 1, 1, 32};
  std::vector<float> qv(32), kv(200 * 32), vv(200 * 32), ov(32);
  const da::Shape rows{1, 1, 1, 1, 32};
  const da::Inputs<float> in2{da::contiguous_view(qv, rows, 1), da::contiguous_view(kv, shape, 1),
                              da::contiguous_view(vv, shape, 1)};
  const da::Outputs<float> o2{da::contiguous_view(ov, rows, 1), nullptr};
  const dc::InferencePlan plan = dc::plan_query_range<float>(config, shape, {199, 1}, in2, o2, 8);
  EXPECT_TRUE(plan.split);
  EXPECT_EQ(plan.params.pieces, 7 + 4 + 5);
  EXPECT_EQ(plan.params.piece_base[1], 7);
  EXPECT_EQ(plan.params.piece_base[2], 11);
  EXPECT_EQ(plan.params.piece_branch(10), 1);
  EXPECT_EQ(plan.params.piece_branch(11), 2);
}

TEST(CudaInferencePlan, TooManyPiecesTakeTheRowKernel) {
  // A dense branch over 2^25 keys: 2^17 pieces of 256 per row, past max_decode_pieces.
  da::Config config = da::testing::make_config({std::int64_t{1} << 26}, {1}, true);
  const std::int64_t n = std::int64_t{1} << 25;
  const std::int64_t offsets[] = {0, 1}, kv[] = {0, n};
  da::Sequences s;
  s.count = 1;
  s.query_offsets = offsets;
  s.kv_offsets = kv;
  // Addresses only compared, never dereferenced (no kernel runs).
  const auto at = [](int i) {
    return reinterpret_cast<float*>(std::uintptr_t{1} << 40 |
                                    (std::uintptr_t{1} << 36) * static_cast<unsigned>(i));
  };
  const da::Inputs<float> in{packed_view<const float>(at(0), 1, 32),
                             packed_view<const float>(at(1), 1, 32),
                             packed_view<const float>(at(2), 1, 32)};
  const da::Outputs<float> o{packed_view(at(3), 1, 32), nullptr};
  const dc::InferencePlan plan = dc::plan_varlen<float>(config, {1, 1, 32}, s, in, o);
  EXPECT_FALSE(plan.split);
  EXPECT_EQ(plan.partial_floats, 0u);
  config.segment_lengths = {std::int64_t{1} << 20};  // 4096 pieces: split
  EXPECT_TRUE(dc::plan_varlen<float>(config, {1, 1, 32}, s, in, o).split);
}

TEST(CudaInferencePlan, SequenceOfSkipsEmptySequences) {
  dc::InferenceParams p{};
  // row_first = {0, 3, 3, 3, 7}: sequences 1 and 2 own no rows.
  std::vector<std::int64_t> table = {0, 3, 3, 3, 7};
  table.resize(7 * 4 + 1, 0);
  p.table = table.data();
  p.sequences = 4;
  EXPECT_EQ(p.sequence_of(0), 0);
  EXPECT_EQ(p.sequence_of(2), 0);
  EXPECT_EQ(p.sequence_of(3), 3);
  EXPECT_EQ(p.sequence_of(6), 3);
}

TEST(CudaInferencePlan, BadSequencesNameTheMember) {
  const da::Config config = di::inference_config(R::modular, M::softmax, true);
  std::vector<float> q(64 * 4 * 32), k(q.size()), v(q.size()), out(q.size()), lse(4 * 64);
  const da::HeadShape heads{4, 2, 32};
  const da::Inputs<float> in{packed_view(q.data(), 4, 32), packed_view(k.data(), 2, 32),
                             packed_view(v.data(), 2, 32)};
  const da::Outputs<float> o{packed_view(out.data(), 4, 32), lse.data()};
  const std::int64_t bad_q[] = {0, 7, 5, 9};
  const std::int64_t kv[] = {0, 7, 12, 20};
  da::Sequences s;
  s.count = 3;
  s.query_offsets = bad_q;
  s.kv_offsets = kv;
  EXPECT_NE(message_of([&] { dc::plan_varlen<float>(config, heads, s, in, o); })
                .find("sequences.query_offsets[2] = 5 is less than sequences.query_offsets[1] = 7: "
                      "offsets must not decrease"),
            std::string::npos);
  const std::int64_t too_many[] = {0, 7, 14, 20};  // sequence 1: 7 queries, 5 keys
  s.query_offsets = too_many;
  EXPECT_NE(message_of([&] {
              dc::plan_varlen<float>(config, heads, s, in, o);
            }).find("sequence 1: query_begin + query_count = -2 + 7 = 5 exceeds its kv_length = 5"),
            std::string::npos);
  const std::int64_t lengths[] = {7, 5, 8};
  s.kv_lengths = lengths;
  EXPECT_NE(message_of([&] {
              dc::plan_varlen<float>(config, heads, s, in, o);
            }).find("sequences.kv_lengths is not null: with packed keys and values"),
            std::string::npos);
}

TEST(CudaInferencePlan, BadPageTableNamesTheEntry) {
  const da::Config config = di::inference_config(R::modular, M::softmax, true);
  const da::HeadShape heads{2, 1, 32};
  std::vector<float> q(2 * 2 * 32), out(q.size()), lse(4), pages(64 * 4 * 32);
  const std::int64_t offsets[] = {0, 1, 2};
  const std::int64_t lengths[] = {8, 12};
  da::Sequences s;
  s.count = 2;
  s.query_offsets = offsets;
  s.kv_lengths = lengths;
  const std::int32_t table[] = {0, 1, 63, 2, 99, 5};  // page size 4: sequence 1 uses 3 entries
  da::PagedKeyValues<float> paged;
  paged.k = pages.data();
  paged.v = pages.data();
  paged.num_pages = 64;
  paged.page_size = 4;
  paged.row_stride = 32;
  paged.page_stride = 4 * 32;
  paged.head_stride = 32;
  paged.page_table = table;
  paged.page_table_stride = 3;
  const da::Outputs<float> o{packed_view(out.data(), 2, 32), lse.data()};
  const auto qv = packed_view<const float>(q.data(), 2, 32);
  EXPECT_NE(message_of([&] {
              dc::plan_paged<float>(config, heads, s, qv, paged, o);
            }).find("paged.page_table[1 * 3 + 1] = 99 is not a page (paged.num_pages = 64)"),
            std::string::npos);
  paged.page_table_stride = 2;
  EXPECT_NE(message_of([&] {
              dc::plan_paged<float>(config, heads, s, qv, paged, o);
            }).find("paged.page_table_stride = 2 is less than the 3 pages"),
            std::string::npos);
}

TEST(CudaInferencePlan, BadQueryRangeAndLengths) {
  const da::Config config = di::inference_config(R::modular, M::softmax, true);
  const da::Shape shape{1, 10, 2, 1, 32};
  std::vector<float> q(10 * 2 * 32), k(10 * 32), v(k.size()), out(q.size()), lse(20);
  const da::Shape rows{1, 4, 2, 1, 32};
  const da::Inputs<float> in{da::contiguous_view(q, rows, 2), da::contiguous_view(k, shape, 1),
                             da::contiguous_view(v, shape, 1)};
  const da::Outputs<float> o{da::contiguous_view(out, rows, 2), lse.data()};
  EXPECT_NE(
      message_of([&] {
        dc::plan_query_range<float>(config, shape, {7, 4}, in, o);
      }).find("query_range.begin + query_range.count = 7 + 4 = 11 exceeds shape.seq_len = 10"),
      std::string::npos);
  const da::Inputs<float> full{da::contiguous_view(q, shape, 2), da::contiguous_view(k, shape, 1),
                               da::contiguous_view(v, shape, 1)};
  const da::Outputs<float> full_out{da::contiguous_view(out, shape, 2), lse.data()};
  const std::int64_t lengths[] = {11};
  EXPECT_NE(message_of([&] {
              dc::plan_padded<float>(config, shape, {lengths}, full, full_out);
            }).find("valid_lengths.lengths[0] = 11 exceeds shape.seq_len = 10"),
            std::string::npos);
  EXPECT_NE(message_of([&] {
              dc::plan_padded<float>(config, shape, {nullptr}, full, full_out);
            }).find("valid_lengths.lengths is null"),
            std::string::npos);
}

}  // namespace
