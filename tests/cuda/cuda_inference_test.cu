// The inference forms of cuda::forward (cuda/inference.cuh) on a GPU: the cases of
// cuda_inference_cases.hpp (the ones the host emulation runs) through the real entry points,
// with device buffers, the stream-ordered table upload and the real launches. The GPU cases skip
// with "no CUDA device: ..." without a device; the bad-input cases run everywhere, since every
// argument is validated on the host before any CUDA call.

#include <gtest/gtest.h>

#include <cstring>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "support/cuda_inference_cases.hpp"
#include "support/cuda_test_support.cuh"

namespace {

namespace da = dilated_attention;
namespace dc = dilated_attention::cuda;
namespace dt = dilated_attention::testing;
namespace di = dilated_attention::testing::inference;

template <class T>
std::unique_ptr<dt::DeviceBuffer<T>> upload(const std::vector<T>& host) {
  auto buffer = std::make_unique<dt::DeviceBuffer<T>>(host.size());
  buffer->upload(host);
  return buffer;
}

template <class T>
da::View<T> packed_view(T* data, std::int64_t heads, std::int64_t d) {
  return da::View<T>{data, 0, heads * d, d};
}

// The Backend of cuda_inference_cases.hpp on the GPU: upload, cuda::forward on a stream of its
// own, synchronise, download.
struct GpuBackend {
  cudaStream_t stream = nullptr;
  GpuBackend() { dc::check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream"); }
  ~GpuBackend() { cudaStreamDestroy(stream); }
  dc::Options options() const {
    dc::Options o;
    o.stream = stream;
    return o;
  }
  template <class T>
  void finish(dt::DeviceBuffer<T>& out, std::vector<T>& host_out, dt::DeviceBuffer<float>& lse,
              std::vector<float>& host_lse) {
    dc::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize after forward");
    out.download(host_out);
    lse.download(host_lse);
  }

  template <class T>
  void query_range(const da::Config& config, const da::Shape& shape, const da::QueryRange& range,
                   const std::vector<T>& q, const std::vector<T>& k, const std::vector<T>& v,
                   std::vector<T>& out, std::vector<float>& lse) {
    auto dq = upload(q), dk = upload(k), dv = upload(v), dout = upload(out);
    auto dlse = upload(lse);
    const da::Shape rows{shape.batch, range.count, shape.num_heads, shape.num_kv_heads,
                         shape.head_dim};
    dc::forward<T>(
        config, shape, range,
        {da::contiguous_view(static_cast<const T*>(dq->data()), rows, shape.num_heads),
         da::contiguous_view(static_cast<const T*>(dk->data()), shape, shape.num_kv_heads),
         da::contiguous_view(static_cast<const T*>(dv->data()), shape, shape.num_kv_heads)},
        {da::contiguous_view(dout->data(), rows, shape.num_heads), dlse->data()}, options());
    finish(*dout, out, *dlse, lse);
  }
  template <class T>
  void varlen(const da::Config& config, const da::HeadShape& heads, const da::Sequences& s,
              const std::vector<T>& q, const std::vector<T>& k, const std::vector<T>& v,
              std::vector<T>& out, std::vector<float>& lse) {
    auto dq = upload(q), dk = upload(k), dv = upload(v), dout = upload(out);
    auto dlse = upload(lse);
    dc::forward<T>(config, heads, s,
                   {packed_view<const T>(dq->data(), heads.num_heads, heads.head_dim),
                    packed_view<const T>(dk->data(), heads.num_kv_heads, heads.head_dim),
                    packed_view<const T>(dv->data(), heads.num_kv_heads, heads.head_dim)},
                   {packed_view(dout->data(), heads.num_heads, heads.head_dim), dlse->data()},
                   options());
    finish(*dout, out, *dlse, lse);
  }
  template <class T>
  void paged(const da::Config& config, const da::HeadShape& heads, const da::Sequences& s,
             const std::vector<T>& q, const std::vector<T>& k, const std::vector<T>& v,
             std::int64_t num_pages, std::int64_t page_size, const std::vector<std::int32_t>& table,
             std::int64_t table_stride, std::vector<T>& out, std::vector<float>& lse) {
    auto dq = upload(q), dk = upload(k), dv = upload(v), dout = upload(out);
    auto dlse = upload(lse);
    da::PagedKeyValues<T> paged;
    paged.k = dk->data();
    paged.v = dv->data();
    paged.num_pages = num_pages;
    paged.page_size = page_size;
    paged.row_stride = heads.num_kv_heads * heads.head_dim;
    paged.page_stride = page_size * paged.row_stride;
    paged.head_stride = heads.head_dim;
    paged.page_table = table.data();  // host
    paged.page_table_stride = table_stride;
    dc::forward<T>(
        config, heads, s, packed_view<const T>(dq->data(), heads.num_heads, heads.head_dim), paged,
        {packed_view(dout->data(), heads.num_heads, heads.head_dim), dlse->data()}, options());
    finish(*dout, out, *dlse, lse);
  }
  template <class T>
  void padded(const da::Config& config, const da::Shape& shape, const da::ValidLengths& lengths,
              const std::vector<T>& q, const std::vector<T>& k, const std::vector<T>& v,
              std::vector<T>& out, std::vector<float>& lse) {
    auto dq = upload(q), dk = upload(k), dv = upload(v), dout = upload(out);
    auto dlse = upload(lse);
    dc::forward<T>(
        config, shape, lengths,
        {da::contiguous_view(static_cast<const T*>(dq->data()), shape, shape.num_heads),
         da::contiguous_view(static_cast<const T*>(dk->data()), shape, shape.num_kv_heads),
         da::contiguous_view(static_cast<const T*>(dv->data()), shape, shape.num_kv_heads)},
        {da::contiguous_view(dout->data(), shape, shape.num_heads), dlse->data()}, options());
    finish(*dout, out, *dlse, lse);
  }
};

using R = da::OffsetRule;
using M = da::Mixing;

TEST(CudaInference, DecodeLoopEveryRuleAndMixing) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  GpuBackend backend;
  std::uint64_t seed = 100;
  for (const R rule : {R::modular, R::blocked, R::partitioned})
    for (const M mixing : {M::softmax, M::mean})
      for (const bool causal : {true, false}) {
        const da::Config config = di::inference_config(rule, mixing, causal);
        SCOPED_TRACE(di::describe_config(config));
        di::decode_loop<float>(backend, config, {6, 2, 32}, 200, {0, 1, 49, 50, 97, 149, 199},
                               seed);
        di::decode_loop<__half>(backend, config, {6, 2, 64}, 200, {0, 95, 199}, seed + 1);
        di::decode_loop<__nv_bfloat16>(backend, config, {6, 3, 128}, 200, {50, 150}, seed + 2);
        seed += 7;
      }
}

TEST(CudaInference, ChunkedPrefillUnevenChunks) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  GpuBackend backend;
  const std::vector<std::int64_t> cuts = {0, 37, 50, 51, 131, 200};
  const di::Heads heads{4, 2, 64};
  di::chunked_prefill<float>(backend, di::inference_config(R::modular, M::softmax, true), heads,
                             200, cuts, 400);
  di::chunked_prefill<__half>(backend, di::inference_config(R::blocked, M::mean, false), heads, 200,
                              cuts, 410);
  di::chunked_prefill<__nv_bfloat16>(
      backend, di::inference_config(R::partitioned, M::softmax, true), {3, 3, 96}, 200, cuts, 420);
}

TEST(CudaInference, VarlenPagedPaddedAgree) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  GpuBackend backend;
  const di::Heads heads{6, 2, 64};
  const da::Config config = di::inference_config(R::modular, M::softmax, true);
  for (const bool is_decode : {true, false}) {
    const di::Batch batch = is_decode ? di::Batch{{200, 37, 1, 143}, {1, 1, 1, 1}}
                                      : di::Batch{{200, 37, 1, 143}, {200, 37, 1, 143}};
    const auto data = di::random_batch<__half>(heads, batch, 500);
    std::vector<std::int64_t> offsets;
    di::packed_queries(data, batch, heads, offsets);
    const auto varlen = di::run_varlen<__half>(backend, config, heads, data, batch);
    di::check_packed<__half>(config, heads, data, batch, offsets, varlen);
    for (const std::int64_t page_size : {1, 16, 256}) {
      SCOPED_TRACE("page size " + std::to_string(page_size));
      const auto paged = di::run_paged<__half>(backend, config, heads, data, batch, page_size, 7);
      EXPECT_TRUE(dt::bitwise_equal(paged.out, varlen.out));
      EXPECT_TRUE(dt::bitwise_equal(paged.lse, varlen.lse));
    }
    if (!is_decode) {
      const auto padded =
          di::run_padded<__half>(backend, config, heads, data, batch.kv_lengths, 200);
      const std::int64_t total_q = offsets.back();
      std::size_t mismatches = 0;
      for (std::size_t b = 0; b < data.size(); ++b)
        for (std::int64_t x = 0; x < 200; ++x)
          for (std::int64_t h = 0; h < heads.h; ++h) {
            const auto at = static_cast<std::size_t>(
                ((static_cast<std::int64_t>(b) * 200 + x) * heads.h + h) * heads.d);
            const float got_lse = padded.lse[static_cast<std::size_t>(
                (static_cast<std::int64_t>(b) * heads.h + h) * 200 + x)];
            if (x < batch.kv_lengths[b]) {
              const std::int64_t row = offsets[b] + x;
              if (std::memcmp(&padded.out[at],
                              &varlen.out[static_cast<std::size_t>((row * heads.h + h) * heads.d)],
                              sizeof(__half) * static_cast<std::size_t>(heads.d)) != 0 ||
                  got_lse != varlen.lse[static_cast<std::size_t>(h * total_q + row)])
                ++mismatches;
            } else {
              for (std::int64_t d = 0; d < heads.d; ++d)
                if (dt::to_double(padded.out[at + static_cast<std::size_t>(d)]) != 0.0)
                  ++mismatches;
              if (!(got_lse == -std::numeric_limits<float>::infinity())) ++mismatches;
            }
          }
      EXPECT_EQ(mismatches, 0u);
    }
  }
}

TEST(CudaInference, DeterministicAcrossRuns) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  GpuBackend backend;
  const di::Heads heads{4, 2, 128};
  const da::Config config =
      da::testing::make_config({512, 1024, 2048}, {1, 2, 4}, true);  // 2 pieces per branch
  const di::Batch decode{{1200, 333}, {1, 1}};
  const auto data = di::random_batch<__nv_bfloat16>(heads, decode, 900);
  const auto first = di::run_varlen<__nv_bfloat16>(backend, config, heads, data, decode);
  const auto second = di::run_varlen<__nv_bfloat16>(backend, config, heads, data, decode);
  EXPECT_TRUE(dt::bitwise_equal(first.out, second.out));
  EXPECT_TRUE(dt::bitwise_equal(first.lse, second.lse));
  std::vector<std::int64_t> offsets;
  di::packed_queries(data, decode, heads, offsets);
  di::check_packed<__nv_bfloat16>(config, heads, data, decode, offsets, first);
}

// ---- Bad input: rejected on the host before any CUDA call (no device needed) -----------------

template <class Call>
void expect_invalid(Call&& call, std::initializer_list<const char*> fragments) {
  try {
    call();
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& e) {
    for (const char* fragment : fragments)
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

// Distinct fake device addresses: only compared, never dereferenced.
template <class T>
T* fake(int i) {
  return reinterpret_cast<T*>(std::uintptr_t{1} << 32 |
                              (std::uintptr_t{1} << 28) * static_cast<unsigned>(i));
}

TEST(CudaInference, BadInputIsRejectedBeforeAnyCudaCall) {
  const da::Config config = di::inference_config(R::modular, M::softmax, true);
  const da::HeadShape heads{4, 2, 64};
  const auto pv = [&](int i, std::int64_t h) {
    return packed_view<const __half>(fake<__half>(i), h, 64);
  };
  const da::Outputs<__half> out{packed_view(fake<__half>(3), 4, 64), fake<float>(4)};
  const std::int64_t decreasing[] = {0, 7, 5};
  const std::int64_t kv[] = {0, 7, 12};
  da::Sequences s;
  s.count = 2;
  s.query_offsets = decreasing;
  s.kv_offsets = kv;
  expect_invalid(
      [&] {
        dc::forward<__half>(config, heads, s, {pv(0, 4), pv(1, 2), pv(2, 2)}, out);
      },
      {"sequences.query_offsets[2] = 5 is less than sequences.query_offsets[1] = 7",
       "offsets must not decrease"});
  const std::int64_t offsets[] = {0, 1, 2};
  s.query_offsets = offsets;
  s.kv_offsets = nullptr;
  expect_invalid(
      [&] {
        dc::forward<__half>(config, heads, s, {pv(0, 4), pv(1, 2), pv(2, 2)}, out);
      },
      {"sequences.kv_offsets is null"});
  // Paged: an entry past the pages.
  const std::int64_t lengths[] = {5, 40};
  s.kv_lengths = lengths;
  const std::int32_t table[] = {0, 1, 2, 3, 99, 5};
  da::PagedKeyValues<__half> paged;
  paged.k = fake<__half>(1);
  paged.v = fake<__half>(2);
  paged.num_pages = 64;
  paged.page_size = 16;
  paged.row_stride = 2 * 64;
  paged.page_stride = 16 * 2 * 64;
  paged.head_stride = 64;
  paged.page_table = table;
  paged.page_table_stride = 3;
  expect_invalid([&] { dc::forward<__half>(config, heads, s, pv(0, 4), paged, out); },
                 {"paged.page_table[1 * 3 + 1] = 99", "is not a page (paged.num_pages = 64)"});
  paged.page_size = 0;
  expect_invalid([&] { dc::forward<__half>(config, heads, s, pv(0, 4), paged, out); },
                 {"paged.page_size = 0"});
  // Query range past kv_len, unsupported head_dim.
  const da::Shape shape{1, 10, 4, 2, 64};
  const da::Shape rows{1, 2, 4, 2, 64};
  const da::Inputs<__half> in{
      da::contiguous_view(static_cast<const __half*>(fake<__half>(0)), rows, 4),
      da::contiguous_view(static_cast<const __half*>(fake<__half>(1)), shape, 2),
      da::contiguous_view(static_cast<const __half*>(fake<__half>(2)), shape, 2)};
  const da::Outputs<__half> rows_out{da::contiguous_view(fake<__half>(3), rows, 4), fake<float>(4)};
  expect_invalid(
      [&] {
        dc::forward<__half>(config, shape, da::QueryRange{9, 2}, in, rows_out);
      },
      {"query_range.begin + query_range.count = 9 + 2 = 11 exceeds shape.seq_len = 10"});
  const da::Shape odd{1, 10, 4, 2, 48};
  const da::Shape odd_rows{1, 1, 4, 2, 48};
  const da::Inputs<__half> odd_in{
      da::contiguous_view(static_cast<const __half*>(fake<__half>(0)), odd_rows, 4),
      da::contiguous_view(static_cast<const __half*>(fake<__half>(1)), odd, 2),
      da::contiguous_view(static_cast<const __half*>(fake<__half>(2)), odd, 2)};
  expect_invalid(
      [&] {
        dc::forward<__half>(config, odd, da::QueryRange{9, 1}, odd_in,
                            {da::contiguous_view(fake<__half>(3), odd_rows, 4), fake<float>(4)});
      },
      {"shape.head_dim = 48", "supports head_dim in {32, 64, 96, 128}"});
  // Padded: a length past N.
  const std::int64_t too_long[] = {11};
  const da::Inputs<__half> full{
      da::contiguous_view(static_cast<const __half*>(fake<__half>(0)), shape, 4),
      da::contiguous_view(static_cast<const __half*>(fake<__half>(1)), shape, 2),
      da::contiguous_view(static_cast<const __half*>(fake<__half>(2)), shape, 2)};
  expect_invalid(
      [&] {
        dc::forward<__half>(config, shape, da::ValidLengths{too_long}, full,
                            {da::contiguous_view(fake<__half>(3), shape, 4), fake<float>(4)});
      },
      {"valid_lengths.lengths[0] = 11 exceeds shape.seq_len = 10"});
}

}  // namespace
