// The inference forms on the CPU (docs/semantics.md "Inference forms"): queries at an offset
// (decode loop, chunked prefill, the non-causal offset form), paged K/V, the variable-length and
// padded batches, their backward, and one test per bad input. Each form is checked against what
// it promises: bitwise the rows of the CPU forward over each sequence where the semantics says
// bitwise, the fp64 reference within the forward's tolerance otherwise.

#include <dilated_attention/dilated_attention.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <numeric>
#include <random>
#include <string>
#include <vector>

// Counts every operator new of the process, so that the test can say what a decode step
// allocates (the library's scratch is std::vector / aligned operator new).
namespace {
std::atomic<long> allocations{0};
}
void* operator new(std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace {

namespace da = dilated_attention;
using da::Config;
using da::CpuOptions;
using da::HeadShape;
using da::Mixing;
using da::OffsetRule;
using da::QueryRange;
using da::Sequences;
using da::Shape;
using da::View;

std::vector<float> random_values(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> data(n);
  for (float& x : data) x = uniform(rng);
  return data;
}

// [B, N, heads, D] contiguous.
View<const float> view_of(const std::vector<float>& data, std::int64_t n, std::int64_t heads,
                          std::int64_t dim) {
  return View<const float>{data.data(), n * heads * dim, heads * dim, dim,
                           static_cast<std::int64_t>(data.size())};
}
View<float> view_of(std::vector<float>& data, std::int64_t n, std::int64_t heads,
                    std::int64_t dim) {
  return View<float>{data.data(), n * heads * dim, heads * dim, dim,
                     static_cast<std::int64_t>(data.size())};
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

Config make_config(std::vector<std::int64_t> w, std::vector<std::int64_t> r, bool causal,
                   OffsetRule rule, Mixing mixing) {
  Config c;
  c.segment_lengths = std::move(w);
  c.dilation_rates = std::move(r);
  c.causal = causal;
  c.offsets = rule;
  c.mixing = mixing;
  return c;
}

std::string name(const Config& c) {
  return std::string(da::to_string(c.offsets)) + "/" + da::to_string(c.mixing) +
         (c.causal ? "/causal" : "/full");
}

const OffsetRule rules[] = {OffsetRule::modular, OffsetRule::blocked, OffsetRule::partitioned};
const Mixing mixings[] = {Mixing::softmax, Mixing::mean};

// The ordinary CPU forward over [B, n, H, D] contiguous inputs.
struct Full {
  std::vector<float> out, lse;
};
Full full_forward(const Config& config, const Shape& shape, const std::vector<float>& q,
                  const std::vector<float>& k, const std::vector<float>& v, int threads = 0) {
  Full f{
      std::vector<float>(q.size()),
      std::vector<float>(static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len))};
  const std::int64_t n = shape.seq_len, dim = shape.head_dim;
  da::forward<float>(config, shape,
                     {view_of(q, n, shape.num_heads, dim), view_of(k, n, shape.num_kv_heads, dim),
                      view_of(v, n, shape.num_kv_heads, dim)},
                     {view_of(f.out, n, shape.num_heads, dim), f.lse.data()}, CpuOptions{threads});
  return f;
}

// --- Decode loop: generating row by row reproduces the full causal forward -------------------
//
// The decode path has its own one-row kernel (cpu/inference.hpp), so its rows equal the
// forward's within rounding (float: 2e-6 here), and are bitwise the same for every thread count.

TEST(CpuInferenceDecode, LoopReproducesTheCausalForward) {
  const std::int64_t N = 1000, B = 2, H = 6, Hkv = 2, D = 16;
  const Shape shape{B, N, H, Hkv, D};
  const auto q = random_values(static_cast<std::size_t>(B * N * H * D), 1);
  const auto k = random_values(static_cast<std::size_t>(B * N * Hkv * D), 2);
  const auto v = random_values(static_cast<std::size_t>(B * N * Hkv * D), 3);
  for (OffsetRule rule : rules)
    for (Mixing mixing : mixings) {
      // Segments 100, 333, 1000 (no multiple of one another, 1000 % 333 = 1), rates 1, 3, 7.
      const Config config = make_config({100, 333, 1000}, {1, 3, 7}, true, rule, mixing);
      SCOPED_TRACE(name(config));
      const Full full = full_forward(config, shape, q, k, v);
      da::cpu::DecodeWorkspace<float> workspace;
      std::vector<float> out(static_cast<std::size_t>(B * H * D)),
          lse(static_cast<std::size_t>(B * H));
      std::vector<float> out3(out.size()), lse3(lse.size());
      long thread_mismatches = 0;
      double worst_out = 0, worst_lse = 0;
      for (std::int64_t t = 0; t < N; ++t) {
        const Shape step{B, t + 1, H, Hkv, D};
        const View<const float> q_row{q.data() + t * H * D, N * H * D, H * D, D, -1};
        for (int threads : {1, 3})
          da::forward<float>(config, step, QueryRange{t, 1},
                             {q_row, view_of(k, N, Hkv, D), view_of(v, N, Hkv, D)},
                             {View<float>{(threads == 1 ? out : out3).data(), H * D, H * D, D, -1},
                              (threads == 1 ? lse : lse3).data()},
                             CpuOptions{threads}, &workspace);
        thread_mismatches += std::memcmp(out.data(), out3.data(), out.size() * sizeof(float)) != 0;
        thread_mismatches += std::memcmp(lse.data(), lse3.data(), lse.size() * sizeof(float)) != 0;
        for (std::int64_t b = 0; b < B; ++b)
          for (std::int64_t h = 0; h < H; ++h) {
            const float expected_lse = full.lse[static_cast<std::size_t>((b * H + h) * N + t)];
            const float got_lse = lse[static_cast<std::size_t>(b * H + h)];
            if (std::isinf(expected_lse) || std::isinf(got_lse))
              worst_lse = std::max(worst_lse, expected_lse == got_lse ? 0.0 : 1e30);
            else
              worst_lse =
                  std::max(worst_lse, static_cast<double>(std::abs(got_lse - expected_lse)));
            for (std::int64_t d = 0; d < D; ++d)
              worst_out = std::max(
                  worst_out,
                  static_cast<double>(
                      std::abs(out[static_cast<std::size_t>((b * H + h) * D + d)] -
                               full.out[static_cast<std::size_t>(((b * N + t) * H + h) * D + d)])));
          }
      }
      EXPECT_EQ(thread_mismatches, 0);
      EXPECT_LT(worst_out, 2e-6);
      EXPECT_LT(worst_lse, 2e-6);
    }
}

// Blocks of more than decode_key_piece keys: the row is merged from pieces -- within rounding of
// the forward and of the fp64 reference, bitwise the same for every thread count.
TEST(CpuInferenceDecode, LongBlocksSplitDeterministically) {
  const std::int64_t N = 2600, H = 2, Hkv = 1, D = 64;  // D = 64: the fixed-size kernel
  const Shape shape{1, N, H, Hkv, D};
  const auto q = random_values(static_cast<std::size_t>(N * H * D), 4);
  const auto k = random_values(static_cast<std::size_t>(N * Hkv * D), 5);
  const auto v = random_values(static_cast<std::size_t>(N * Hkv * D), 6);
  for (bool causal : {true, false}) {
    const Config config =
        make_config({2600, 512}, {1, 2}, causal, OffsetRule::modular, Mixing::softmax);
    const Full full = full_forward(config, shape, q, k, v);
    std::vector<double> qd(q.begin(), q.end()), kd(k.begin(), k.end()), vd(v.begin(), v.end());
    std::vector<double> ref(qd.size()), ref_lse(static_cast<std::size_t>(H * N));
    da::reference::forward<double>(config, shape,
                                   {View<const double>{qd.data(), N * H * D, H * D, D},
                                    View<const double>{kd.data(), N * Hkv * D, Hkv * D, D},
                                    View<const double>{vd.data(), N * Hkv * D, Hkv * D, D}},
                                   {View<double>{ref.data(), N * H * D, H * D, D}, ref_lse.data()});
    const std::int64_t t = causal ? N - 1 : 1234;
    std::vector<float> first;
    for (int threads : {1, 2, 5}) {
      std::vector<float> out(static_cast<std::size_t>(H * D)), lse(static_cast<std::size_t>(H));
      da::forward<float>(config, shape, QueryRange{t, 1},
                         {View<const float>{q.data() + t * H * D, N * H * D, H * D, D, -1},
                          view_of(k, N, Hkv, D), view_of(v, N, Hkv, D)},
                         {View<float>{out.data(), H * D, H * D, D, -1}, lse.data()},
                         CpuOptions{threads});
      if (first.empty()) first = out;
      EXPECT_EQ(0, std::memcmp(first.data(), out.data(), out.size() * sizeof(float)));
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t d = 0; d < D; ++d) {
          const std::size_t at = static_cast<std::size_t>((t * H + h) * D + d);
          EXPECT_NEAR(out[static_cast<std::size_t>(h * D + d)], full.out[at], 2e-6);
          EXPECT_NEAR(out[static_cast<std::size_t>(h * D + d)], ref[at], 1e-5);
        }
    }
  }
}

// A decode step with a reserved workspace on one thread allocates nothing.
TEST(CpuInferenceDecode, OneThreadStepAllocatesNothing) {
  const std::int64_t N = 3000, B = 3, H = 4, Hkv = 2, D = 128;
  const Config config =
      make_config({512, 2048, 4096}, {1, 2, 4}, true, OffsetRule::modular, Mixing::softmax);
  const auto q = random_values(static_cast<std::size_t>(B * H * D), 7);
  const auto k = random_values(static_cast<std::size_t>(B * N * Hkv * D), 8);
  const auto v = random_values(static_cast<std::size_t>(B * N * Hkv * D), 9);
  std::vector<float> out(q.size()), lse(static_cast<std::size_t>(B * H));
  da::cpu::DecodeWorkspace<float> workspace;
  workspace.reserve(config, HeadShape{H, Hkv, D}, B * H, 1);
  const Shape shape{B, N, H, Hkv, D};
  auto step = [&] {
    da::forward<float>(config, shape, QueryRange{N - 1, 1},
                       {View<const float>{q.data(), H * D, H * D, D}, view_of(k, N, Hkv, D),
                        view_of(v, N, Hkv, D)},
                       {View<float>{out.data(), H * D, H * D, D}, lse.data()}, CpuOptions{1},
                       &workspace);
  };
  step();
  const long before = allocations.load();
  step();
  EXPECT_EQ(allocations.load() - before, 0);
}

// --- Chunked prefill and the non-causal offset form -----------------------------------------

TEST(CpuInferencePrefill, UnevenChunksAreTheForwardsRowsBitwise) {
  const std::int64_t N = 1000, B = 2, H = 4, Hkv = 2, D = 16;
  const Shape shape{B, N, H, Hkv, D};
  const auto q = random_values(static_cast<std::size_t>(B * N * H * D), 10);
  const auto k = random_values(static_cast<std::size_t>(B * N * Hkv * D), 11);
  const auto v = random_values(static_cast<std::size_t>(B * N * Hkv * D), 12);
  const std::int64_t chunks[] = {1, 7, 300, 2, 1, 689};  // sums to N
  for (OffsetRule rule : rules)
    for (Mixing mixing : mixings)
      for (bool causal : {true, false}) {
        const Config config = make_config({100, 333, 1000}, {1, 3, 7}, causal, rule, mixing);
        SCOPED_TRACE(name(config));
        const Full full = full_forward(config, shape, q, k, v);
        std::int64_t begin = 0;
        for (std::int64_t count : chunks) {
          // causal: the keys of the prefix so far; non-causal: the whole sequence.
          const std::int64_t kv_len = causal ? begin + count : N;
          std::vector<float> out(static_cast<std::size_t>(B * count * H * D), -7.0f),
              lse(static_cast<std::size_t>(B * H * count));
          da::forward<float>(config, Shape{B, kv_len, H, Hkv, D}, QueryRange{begin, count},
                             {View<const float>{q.data() + begin * H * D, N * H * D, H * D, D, -1},
                              view_of(k, N, Hkv, D), view_of(v, N, Hkv, D)},
                             {view_of(out, count, H, D), lse.data()}, CpuOptions{3});
          // A chunk of several rows is the forward's own computation: bitwise. A chunk of one
          // row takes the decode path: within rounding.
          long mismatches = 0;
          double worst = 0;
          for (std::int64_t b = 0; b < B; ++b)
            for (std::int64_t j = 0; j < count; ++j)
              for (std::int64_t h = 0; h < H; ++h) {
                const float a = lse[static_cast<std::size_t>((b * H + h) * count + j)],
                            e = full.lse[static_cast<std::size_t>((b * H + h) * N + begin + j)];
                mismatches += !same_bits(a, e);
                worst = std::max(worst, a == e ? 0.0 : static_cast<double>(std::abs(a - e)));
                for (std::int64_t d = 0; d < D; ++d) {
                  const float
                      o = out[static_cast<std::size_t>(((b * count + j) * H + h) * D + d)],
                      f = full.out[static_cast<std::size_t>(((b * N + begin + j) * H + h) * D + d)];
                  mismatches += !same_bits(o, f);
                  worst = std::max(worst, static_cast<double>(std::abs(o - f)));
                }
              }
          if (count > 1)
            EXPECT_EQ(mismatches, 0) << "chunk at " << begin << " of " << count;
          else
            EXPECT_LT(worst, 2e-6) << "chunk at " << begin << " of " << count;
          begin += count;
        }
      }
}

// --- Variable-length and padded batches ------------------------------------------------------

struct Batch {
  std::vector<std::int64_t> lengths, offsets;
  std::vector<float> q, k, v;  // packed
};

Batch random_batch(std::int64_t H, std::int64_t Hkv, std::int64_t D, std::uint64_t seed) {
  Batch batch;
  batch.lengths = {1, 97, 334, 5, 1, 260};  // 1 twice; 97, 334, 5, 260: multiples of no segment
  batch.offsets.assign(1, 0);
  for (std::int64_t n : batch.lengths) batch.offsets.push_back(batch.offsets.back() + n);
  const std::int64_t total = batch.offsets.back();
  batch.q = random_values(static_cast<std::size_t>(total * H * D), seed);
  batch.k = random_values(static_cast<std::size_t>(total * Hkv * D), seed + 1);
  batch.v = random_values(static_cast<std::size_t>(total * Hkv * D), seed + 2);
  return batch;
}

TEST(CpuInferenceVarlen, EachSequenceIsItsOwnSequenceBitwise) {
  const std::int64_t H = 6, Hkv = 3, D = 16;
  const Batch batch = random_batch(H, Hkv, D, 20);
  const std::int64_t total = batch.offsets.back(),
                     B = static_cast<std::int64_t>(batch.lengths.size());
  const Sequences sequences{B, batch.offsets.data(), batch.offsets.data(), nullptr, nullptr};
  for (OffsetRule rule : rules)
    for (Mixing mixing : mixings)
      for (bool causal : {true, false}) {
        const Config config = make_config({64, 100, 333}, {1, 2, 5}, causal, rule, mixing);
        SCOPED_TRACE(name(config));
        std::vector<float> out(batch.q.size(), -7.0f), lse(static_cast<std::size_t>(H * total));
        da::forward<float>(config, HeadShape{H, Hkv, D}, sequences,
                           {view_of(batch.q, total, H, D), view_of(batch.k, total, Hkv, D),
                            view_of(batch.v, total, Hkv, D)},
                           {view_of(out, total, H, D), lse.data()}, CpuOptions{2});
        long mismatches = 0;
        for (std::int64_t b = 0; b < B; ++b) {
          const std::int64_t n = batch.lengths[static_cast<std::size_t>(b)],
                             o = batch.offsets[static_cast<std::size_t>(b)];
          auto part = [&](const std::vector<float>& all, std::int64_t heads) {
            return std::vector<float>(all.begin() + o * heads * D,
                                      all.begin() + (o + n) * heads * D);
          };
          const Full alone = full_forward(config, Shape{1, n, H, Hkv, D}, part(batch.q, H),
                                          part(batch.k, Hkv), part(batch.v, Hkv));
          for (std::int64_t x = 0; x < n; ++x)
            for (std::int64_t h = 0; h < H; ++h) {
              mismatches += !same_bits(lse[static_cast<std::size_t>(h * total + o + x)],
                                       alone.lse[static_cast<std::size_t>(h * n + x)]);
              for (std::int64_t d = 0; d < D; ++d)
                mismatches += !same_bits(out[static_cast<std::size_t>(((o + x) * H + h) * D + d)],
                                         alone.out[static_cast<std::size_t>((x * H + h) * D + d)]);
            }
        }
        EXPECT_EQ(mismatches, 0);
      }
}

// The varlen forward against the fp64 reference over each sequence (the ground truth).
TEST(CpuInferenceVarlen, MatchesTheReference) {
  const std::int64_t H = 4, Hkv = 2, D = 16;
  const Batch batch = random_batch(H, Hkv, D, 30);
  const std::int64_t total = batch.offsets.back(),
                     B = static_cast<std::int64_t>(batch.lengths.size());
  const Sequences sequences{B, batch.offsets.data(), batch.offsets.data(), nullptr, nullptr};
  const Config config =
      make_config({64, 100, 333}, {1, 2, 5}, true, OffsetRule::modular, Mixing::softmax);
  std::vector<float> out(batch.q.size()), lse(static_cast<std::size_t>(H * total));
  da::forward<float>(config, HeadShape{H, Hkv, D}, sequences,
                     {view_of(batch.q, total, H, D), view_of(batch.k, total, Hkv, D),
                      view_of(batch.v, total, Hkv, D)},
                     {view_of(out, total, H, D), lse.data()});
  double worst = 0.0;
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t n = batch.lengths[static_cast<std::size_t>(b)],
                       o = batch.offsets[static_cast<std::size_t>(b)];
    std::vector<double> qd(batch.q.begin() + o * H * D, batch.q.begin() + (o + n) * H * D),
        kd(batch.k.begin() + o * Hkv * D, batch.k.begin() + (o + n) * Hkv * D),
        vd(batch.v.begin() + o * Hkv * D, batch.v.begin() + (o + n) * Hkv * D), ref(qd.size());
    const Shape shape{1, n, H, Hkv, D};
    da::reference::forward<double>(config, shape,
                                   {View<const double>{qd.data(), n * H * D, H * D, D},
                                    View<const double>{kd.data(), n * Hkv * D, Hkv * D, D},
                                    View<const double>{vd.data(), n * Hkv * D, Hkv * D, D}},
                                   {View<double>{ref.data(), n * H * D, H * D, D}, nullptr});
    for (std::size_t i = 0; i < ref.size(); ++i)
      worst = std::max(worst, std::abs(ref[i] - out[static_cast<std::size_t>(o * H * D) + i]));
  }
  EXPECT_LT(worst, 1e-5);
}

// Padded batch: the same rows as the varlen batch, bitwise; rows past a length O = 0, LSE = -inf;
// the inputs there (NaN) are never read.
TEST(CpuInferencePadded, EqualsVarlenAndIgnoresPadding) {
  const std::int64_t H = 4, Hkv = 2, D = 16;
  const Batch batch = random_batch(H, Hkv, D, 40);
  const std::int64_t total = batch.offsets.back(),
                     B = static_cast<std::int64_t>(batch.lengths.size());
  const std::int64_t N = *std::max_element(batch.lengths.begin(), batch.lengths.end()) + 3;
  const Sequences sequences{B, batch.offsets.data(), batch.offsets.data(), nullptr, nullptr};
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> q(static_cast<std::size_t>(B * N * H * D), nan),
      k(static_cast<std::size_t>(B * N * Hkv * D), nan), v(k.size(), nan);
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t n = batch.lengths[static_cast<std::size_t>(b)],
                       o = batch.offsets[static_cast<std::size_t>(b)];
    std::copy_n(batch.q.begin() + o * H * D, n * H * D, q.begin() + b * N * H * D);
    std::copy_n(batch.k.begin() + o * Hkv * D, n * Hkv * D, k.begin() + b * N * Hkv * D);
    std::copy_n(batch.v.begin() + o * Hkv * D, n * Hkv * D, v.begin() + b * N * Hkv * D);
  }
  for (Mixing mixing : mixings)
    for (bool causal : {true, false}) {
      const Config config =
          make_config({64, 100, 333}, {1, 2, 5}, causal, OffsetRule::blocked, mixing);
      SCOPED_TRACE(name(config));
      std::vector<float> packed(batch.q.size()), packed_lse(static_cast<std::size_t>(H * total));
      da::forward<float>(config, HeadShape{H, Hkv, D}, sequences,
                         {view_of(batch.q, total, H, D), view_of(batch.k, total, Hkv, D),
                          view_of(batch.v, total, Hkv, D)},
                         {view_of(packed, total, H, D), packed_lse.data()});
      std::vector<float> out(q.size(), -7.0f), lse(static_cast<std::size_t>(B * H * N), -7.0f);
      da::forward<float>(config, Shape{B, N, H, Hkv, D}, da::ValidLengths{batch.lengths.data()},
                         {view_of(q, N, H, D), view_of(k, N, Hkv, D), view_of(v, N, Hkv, D)},
                         {view_of(out, N, H, D), lse.data()}, CpuOptions{3});
      long mismatches = 0;
      for (std::int64_t b = 0; b < B; ++b) {
        const std::int64_t n = batch.lengths[static_cast<std::size_t>(b)],
                           o = batch.offsets[static_cast<std::size_t>(b)];
        for (std::int64_t x = 0; x < N; ++x)
          for (std::int64_t h = 0; h < H; ++h) {
            const float l = lse[static_cast<std::size_t>((b * H + h) * N + x)];
            if (x >= n) {
              mismatches += !(l == -std::numeric_limits<float>::infinity());
              for (std::int64_t d = 0; d < D; ++d)
                mismatches +=
                    !same_bits(out[static_cast<std::size_t>(((b * N + x) * H + h) * D + d)], 0.0f);
              continue;
            }
            mismatches += !same_bits(l, packed_lse[static_cast<std::size_t>(h * total + o + x)]);
            for (std::int64_t d = 0; d < D; ++d)
              mismatches += !same_bits(out[static_cast<std::size_t>(((b * N + x) * H + h) * D + d)],
                                       packed[static_cast<std::size_t>(((o + x) * H + h) * D + d)]);
          }
      }
      EXPECT_EQ(mismatches, 0);
    }
}

// --- Paged K/V ---------------------------------------------------------------------------------

// A varlen batch's K/V copied into shuffled pages ([num_pages, page_size, Hkv, D]): decode and
// prefill give bitwise the contiguous call's result, for page sizes 1, 16 and 256.
TEST(CpuInferencePaged, EqualsContiguousForEveryPageSize) {
  const std::int64_t H = 4, Hkv = 2, D = 16;
  const Batch batch = random_batch(H, Hkv, D, 50);
  const std::int64_t B = static_cast<std::int64_t>(batch.lengths.size());
  const Config config =
      make_config({64, 100, 333}, {1, 2, 5}, true, OffsetRule::modular, Mixing::mean);
  for (std::int64_t page_size : {1, 16, 256}) {
    SCOPED_TRACE("page_size " + std::to_string(page_size));
    std::int64_t max_pages = 0, num_pages = 0;
    for (std::int64_t n : batch.lengths) {
      max_pages = std::max(max_pages, (n + page_size - 1) / page_size);
      num_pages += (n + page_size - 1) / page_size;
    }
    num_pages += 3;  // pages no sequence uses
    std::vector<std::int32_t> order(static_cast<std::size_t>(num_pages));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), std::mt19937(static_cast<unsigned>(page_size)));
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> pk(static_cast<std::size_t>(num_pages * page_size * Hkv * D), nan),
        pv(pk.size(), nan);
    std::vector<std::int32_t> table(static_cast<std::size_t>(B * max_pages), -1);
    std::size_t used = 0;
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int64_t n = batch.lengths[static_cast<std::size_t>(b)],
                         o = batch.offsets[static_cast<std::size_t>(b)];
      for (std::int64_t j = 0; j * page_size < n; ++j)
        table[static_cast<std::size_t>(b * max_pages + j)] = order[used++];
      for (std::int64_t y = 0; y < n; ++y) {
        const std::int64_t page = table[static_cast<std::size_t>(b * max_pages + y / page_size)];
        const std::int64_t at = (page * page_size + y % page_size) * Hkv * D;
        std::copy_n(batch.k.begin() + (o + y) * Hkv * D, Hkv * D, pk.begin() + at);
        std::copy_n(batch.v.begin() + (o + y) * Hkv * D, Hkv * D, pv.begin() + at);
      }
    }
    const da::PagedKeyValues<float> paged{pk.data(), pv.data(),           num_pages,
                                          page_size, page_size * Hkv * D, Hkv * D,
                                          D,         table.data(),        max_pages};
    // Decode (one query per sequence, its last row) and prefill (every row).
    for (bool decode : {true, false}) {
      std::vector<std::int64_t> q_offsets(1, 0);
      for (std::int64_t n : batch.lengths) q_offsets.push_back(q_offsets.back() + (decode ? 1 : n));
      const std::int64_t total_q = q_offsets.back(), total_k = batch.offsets.back();
      std::vector<float> q(static_cast<std::size_t>(total_q * H * D));
      for (std::int64_t b = 0; b < B; ++b) {
        const std::int64_t n = batch.lengths[static_cast<std::size_t>(b)],
                           o = batch.offsets[static_cast<std::size_t>(b)];
        const std::int64_t first = decode ? o + n - 1 : o;
        std::copy_n(batch.q.begin() + first * H * D, (decode ? 1 : n) * H * D,
                    q.begin() + q_offsets[static_cast<std::size_t>(b)] * H * D);
      }
      const Sequences contiguous{B, q_offsets.data(), batch.offsets.data(), nullptr, nullptr};
      const Sequences in_pages{B, q_offsets.data(), nullptr, batch.lengths.data(), nullptr};
      std::vector<float> expected(q.size()), expected_lse(static_cast<std::size_t>(H * total_q));
      da::forward<float>(config, HeadShape{H, Hkv, D}, contiguous,
                         {view_of(q, total_q, H, D), view_of(batch.k, total_k, Hkv, D),
                          view_of(batch.v, total_k, Hkv, D)},
                         {view_of(expected, total_q, H, D), expected_lse.data()});
      if (decode && page_size == 1) {
        // A decode batch of different cache lengths: each row is its sequence's last row of the
        // forward over that sequence alone, within rounding.
        double worst = 0;
        for (std::int64_t b = 0; b < B; ++b) {
          const std::int64_t n = batch.lengths[static_cast<std::size_t>(b)],
                             o = batch.offsets[static_cast<std::size_t>(b)];
          auto part = [&](const std::vector<float>& all, std::int64_t heads) {
            return std::vector<float>(all.begin() + o * heads * D,
                                      all.begin() + (o + n) * heads * D);
          };
          const Full alone = full_forward(config, Shape{1, n, H, Hkv, D}, part(batch.q, H),
                                          part(batch.k, Hkv), part(batch.v, Hkv));
          for (std::int64_t e = 0; e < H * D; ++e)
            worst = std::max(worst, static_cast<double>(std::abs(
                                        expected[static_cast<std::size_t>(b * H * D + e)] -
                                        alone.out[static_cast<std::size_t>((n - 1) * H * D + e)])));
        }
        EXPECT_LT(worst, 2e-6);
      }
      std::vector<float> out(q.size(), -7.0f), lse(expected_lse.size(), -7.0f);
      da::forward<float>(config, HeadShape{H, Hkv, D}, in_pages, view_of(q, total_q, H, D), paged,
                         {view_of(out, total_q, H, D), lse.data()}, CpuOptions{2});
      EXPECT_EQ(0, std::memcmp(out.data(), expected.data(), out.size() * sizeof(float))) << decode;
      EXPECT_EQ(0, std::memcmp(lse.data(), expected_lse.data(), lse.size() * sizeof(float)))
          << decode;
    }
  }
}

// --- Backward ----------------------------------------------------------------------------------

struct Grads {
  std::vector<float> d_q, d_k, d_v;
};

// The ordinary CPU backward of a whole [1, n] sequence.
Grads full_backward(const Config& config, const Shape& shape, const std::vector<float>& q,
                    const std::vector<float>& k, const std::vector<float>& v,
                    const std::vector<float>& d_out) {
  const Full f = full_forward(config, shape, q, k, v);
  const std::int64_t n = shape.seq_len, H = shape.num_heads, G = shape.num_kv_heads,
                     D = shape.head_dim;
  Grads g{std::vector<float>(q.size()), std::vector<float>(k.size()), std::vector<float>(v.size())};
  da::backward<float>(config, shape,
                      {view_of(q, n, H, D), view_of(k, n, G, D), view_of(v, n, G, D)},
                      {view_of(f.out, n, H, D), f.lse.data()}, view_of(d_out, n, H, D),
                      {view_of(g.d_q, n, H, D), view_of(g.d_k, n, G, D), view_of(g.d_v, n, G, D)});
  return g;
}

struct ReferenceGrads {
  std::vector<double> d_q, d_k, d_v;
};

// docs/semantics.md "The gradient" in fp64 (reference::forward, then reference::backward) of a
// whole [1, n] sequence of float inputs.
ReferenceGrads reference_backward(const Config& config, const Shape& shape,
                                  const std::vector<float>& q, const std::vector<float>& k,
                                  const std::vector<float>& v, const std::vector<float>& d_out) {
  const std::int64_t H = shape.num_heads, G = shape.num_kv_heads, D = shape.head_dim;
  std::vector<double> qd(q.begin(), q.end()), kd(k.begin(), k.end()), vd(v.begin(), v.end()),
      dod(d_out.begin(), d_out.end()), od(q.size()),
      ld(static_cast<std::size_t>(H * shape.seq_len));
  ReferenceGrads g{std::vector<double>(q.size()), std::vector<double>(k.size()),
                   std::vector<double>(v.size())};
  const da::Inputs<double> din{View<const double>{qd.data(), 0, H * D, D},
                               View<const double>{kd.data(), 0, G * D, D},
                               View<const double>{vd.data(), 0, G * D, D}};
  da::reference::forward<double>(config, shape, din,
                                 {View<double>{od.data(), 0, H * D, D}, ld.data()});
  da::reference::backward<double>(
      config, shape, din, {View<const double>{od.data(), 0, H * D, D}, ld.data()},
      View<const double>{dod.data(), 0, H * D, D},
      {View<double>{g.d_q.data(), 0, H * D, D}, View<double>{g.d_k.data(), 0, G * D, D},
       View<double>{g.d_v.data(), 0, G * D, D}});
  return g;
}

TEST(CpuInferenceBackward, VarlenIsEachSequencesBackwardAndPaddedEqualsIt) {
  const std::int64_t H = 4, Hkv = 2, D = 16;
  const Batch batch = random_batch(H, Hkv, D, 60);
  const std::int64_t total = batch.offsets.back(),
                     B = static_cast<std::int64_t>(batch.lengths.size());
  const std::int64_t N = 340;
  const Sequences sequences{B, batch.offsets.data(), batch.offsets.data(), nullptr, nullptr};
  const auto d_out = random_values(batch.q.size(), 61);
  for (Mixing mixing : mixings) {
    const Config config =
        make_config({64, 100, 333}, {1, 2, 5}, true, OffsetRule::partitioned, mixing);
    SCOPED_TRACE(name(config));
    const HeadShape heads{H, Hkv, D};
    std::vector<float> out(batch.q.size()), lse(static_cast<std::size_t>(H * total));
    const da::Inputs<float> in{view_of(batch.q, total, H, D), view_of(batch.k, total, Hkv, D),
                               view_of(batch.v, total, Hkv, D)};
    da::forward<float>(config, heads, sequences, in, {view_of(out, total, H, D), lse.data()});
    Grads g{std::vector<float>(batch.q.size(), -7.0f), std::vector<float>(batch.k.size(), -7.0f),
            std::vector<float>(batch.v.size(), -7.0f)};
    da::backward<float>(config, heads, sequences, in, {view_of(out, total, H, D), lse.data()},
                        view_of(d_out, total, H, D),
                        {view_of(g.d_q, total, H, D), view_of(g.d_k, total, Hkv, D),
                         view_of(g.d_v, total, Hkv, D)});
    // Padded layout of the same data and gradients.
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> pq(static_cast<std::size_t>(B * N * H * D), nan),
        pk(static_cast<std::size_t>(B * N * Hkv * D), nan), pv(pk.size(), nan), pdo(pq.size(), nan);
    long mismatches = 0;
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int64_t n = batch.lengths[static_cast<std::size_t>(b)],
                         o = batch.offsets[static_cast<std::size_t>(b)];
      auto part = [&](const std::vector<float>& all, std::int64_t heads_) {
        return std::vector<float>(all.begin() + o * heads_ * D, all.begin() + (o + n) * heads_ * D);
      };
      const Grads alone = full_backward(config, Shape{1, n, H, Hkv, D}, part(batch.q, H),
                                        part(batch.k, Hkv), part(batch.v, Hkv), part(d_out, H));
      mismatches += part(g.d_q, H) != alone.d_q;
      mismatches += part(g.d_k, Hkv) != alone.d_k;
      mismatches += part(g.d_v, Hkv) != alone.d_v;
      std::copy_n(batch.q.begin() + o * H * D, n * H * D, pq.begin() + b * N * H * D);
      std::copy_n(d_out.begin() + o * H * D, n * H * D, pdo.begin() + b * N * H * D);
      std::copy_n(batch.k.begin() + o * Hkv * D, n * Hkv * D, pk.begin() + b * N * Hkv * D);
      std::copy_n(batch.v.begin() + o * Hkv * D, n * Hkv * D, pv.begin() + b * N * Hkv * D);
    }
    EXPECT_EQ(mismatches, 0);
    const Shape shape{B, N, H, Hkv, D};
    const da::ValidLengths valid{batch.lengths.data()};
    const da::Inputs<float> pin{view_of(pq, N, H, D), view_of(pk, N, Hkv, D),
                                view_of(pv, N, Hkv, D)};
    std::vector<float> pout(pq.size()), plse(static_cast<std::size_t>(B * H * N));
    da::forward<float>(config, shape, valid, pin, {view_of(pout, N, H, D), plse.data()});
    Grads p{std::vector<float>(pq.size(), -7.0f), std::vector<float>(pk.size(), -7.0f),
            std::vector<float>(pk.size(), -7.0f)};
    da::backward<float>(
        config, shape, valid, pin, {view_of(pout, N, H, D), plse.data()}, view_of(pdo, N, H, D),
        {view_of(p.d_q, N, H, D), view_of(p.d_k, N, Hkv, D), view_of(p.d_v, N, Hkv, D)});
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int64_t n = batch.lengths[static_cast<std::size_t>(b)],
                         o = batch.offsets[static_cast<std::size_t>(b)];
      for (std::int64_t x = 0; x < N; ++x) {
        for (std::int64_t e = 0; e < H * D; ++e)
          mismatches +=
              !same_bits(p.d_q[static_cast<std::size_t>((b * N + x) * H * D + e)],
                         x < n ? g.d_q[static_cast<std::size_t>((o + x) * H * D + e)] : 0.0f);
        for (std::int64_t e = 0; e < Hkv * D; ++e) {
          mismatches +=
              !same_bits(p.d_k[static_cast<std::size_t>((b * N + x) * Hkv * D + e)],
                         x < n ? g.d_k[static_cast<std::size_t>((o + x) * Hkv * D + e)] : 0.0f);
          mismatches +=
              !same_bits(p.d_v[static_cast<std::size_t>((b * N + x) * Hkv * D + e)],
                         x < n ? g.d_v[static_cast<std::size_t>((o + x) * Hkv * D + e)] : 0.0f);
        }
      }
    }
    EXPECT_EQ(mismatches, 0);
  }
}

// Chunked prefill's backward: d_q of each chunk is the full backward's rows, and the chunks' d_k,
// d_v sum to the full backward's (within float rounding); also against the fp64 reference.
TEST(CpuInferenceBackward, ChunksSumToTheFullGradient) {
  const std::int64_t N = 400, H = 4, Hkv = 2, D = 16;
  const Shape shape{1, N, H, Hkv, D};
  const auto q = random_values(static_cast<std::size_t>(N * H * D), 70);
  const auto k = random_values(static_cast<std::size_t>(N * Hkv * D), 71);
  const auto v = random_values(static_cast<std::size_t>(N * Hkv * D), 72);
  const auto d_out = random_values(q.size(), 73);
  const std::int64_t chunks[] = {3, 150, 1, 246};
  for (bool causal : {true, false})
    for (Mixing mixing : mixings) {
      const Config config =
          make_config({64, 100, 400}, {1, 3, 7}, causal, OffsetRule::modular, mixing);
      SCOPED_TRACE(name(config));
      const Grads full = full_backward(config, shape, q, k, v, d_out);
      const ReferenceGrads ref = reference_backward(config, shape, q, k, v, d_out);
      const std::vector<double>&dqd = ref.d_q, &dkd = ref.d_k, &dvd = ref.d_v;
      std::vector<float> d_k_sum(k.size(), 0.0f), d_v_sum(k.size(), 0.0f);
      std::int64_t begin = 0;
      double worst_q = 0, worst_kv = 0, worst_ref = 0;
      for (std::int64_t count : chunks) {
        const QueryRange range{begin, count};
        const View<const float> q_rows{q.data() + begin * H * D, 0, H * D, D, -1};
        const View<const float> do_rows{d_out.data() + begin * H * D, 0, H * D, D, -1};
        const da::Inputs<float> in{q_rows, view_of(k, N, Hkv, D), view_of(v, N, Hkv, D)};
        std::vector<float> out(static_cast<std::size_t>(count * H * D)),
            lse(static_cast<std::size_t>(H * count));
        da::forward<float>(config, shape, range, in, {view_of(out, count, H, D), lse.data()});
        std::vector<float> d_q(out.size(), -7.0f), d_k(k.size(), -7.0f), d_v(k.size(), -7.0f);
        da::backward<float>(
            config, shape, range, in, {view_of(out, count, H, D), lse.data()}, do_rows,
            {view_of(d_q, count, H, D), view_of(d_k, N, Hkv, D), view_of(d_v, N, Hkv, D)});
        for (std::size_t i = 0; i < d_q.size(); ++i) {
          const std::size_t at = static_cast<std::size_t>(begin * H * D) + i;
          worst_q = std::max(worst_q, static_cast<double>(std::abs(d_q[i] - full.d_q[at])));
          worst_ref = std::max(worst_ref, std::abs(d_q[i] - dqd[at]));
        }
        for (std::size_t i = 0; i < d_k.size(); ++i) {
          d_k_sum[i] += d_k[i];
          d_v_sum[i] += d_v[i];
        }
        begin += count;
      }
      for (std::size_t i = 0; i < k.size(); ++i) {
        worst_kv = std::max(worst_kv, static_cast<double>(std::abs(d_k_sum[i] - full.d_k[i])));
        worst_kv = std::max(worst_kv, static_cast<double>(std::abs(d_v_sum[i] - full.d_v[i])));
        worst_ref = std::max(worst_ref, std::abs(d_k_sum[i] - dkd[i]));
        worst_ref = std::max(worst_ref, std::abs(d_v_sum[i] - dvd[i]));
      }
      EXPECT_LT(worst_q, 1e-5);
      EXPECT_LT(worst_kv, 1e-5);
      EXPECT_LT(worst_ref, 1e-4);
    }
}

// The backward of a range of rows (cpu/backward_range.hpp) costs the range's pairs; each of its
// elements is bitwise the composition's it replaced (only the sign of an exact zero could differ):
// the ordinary backward over the first n positions (n = begin + count causal, else N) fed the
// range's q, O, dO and LSE and zeros on every other row. Checked for every offset rule and
// mixing (mean with recomputed statistics: rates 1, 3, 7 under modular give heads rows in
// several branches), GQA, causal and not, ranges that start and end inside query tiles of long
// blocks (w = 400, r = 1: 400-row blocks), a decode row; float and double (fused path) and
// bfloat16 (narrow path); bitwise the same on 1 and 3 threads.
template <class T>
void check_range_against_composition(const Config& config, std::int64_t N, std::int64_t H,
                                     std::int64_t Hkv, std::int64_t D, std::int64_t begin,
                                     std::int64_t count, long& mismatches) {
  using L = da::lse_type_t<T>;
  auto convert = [](const std::vector<float>& from) {
    std::vector<T> to(from.size());
    for (std::size_t i = 0; i < from.size(); ++i) to[i] = static_cast<T>(from[i]);
    return to;
  };
  const std::vector<T> q = convert(random_values(static_cast<std::size_t>(N * H * D), 80));
  const std::vector<T> k = convert(random_values(static_cast<std::size_t>(N * Hkv * D), 81));
  const std::vector<T> v = convert(random_values(static_cast<std::size_t>(N * Hkv * D), 82));
  const std::vector<T> d_out = convert(random_values(q.size(), 83));
  auto view = [&](const T* data, std::int64_t heads) {
    return View<const T>{data, 0, heads * D, D, -1};
  };
  auto mut = [&](std::vector<T>& data, std::int64_t heads) {
    return View<T>{data.data(), 0, heads * D, D, static_cast<std::int64_t>(data.size())};
  };
  const Shape shape{1, N, H, Hkv, D};
  const QueryRange range{begin, count};
  const std::size_t rows = static_cast<std::size_t>(count * H * D);
  std::vector<T> out(rows);
  std::vector<L> lse(static_cast<std::size_t>(H * count));
  const da::Inputs<T> in{view(q.data() + begin * H * D, H), view(k.data(), Hkv),
                         view(v.data(), Hkv)};
  da::forward<T>(config, shape, range, in, {mut(out, H), lse.data()});
  std::vector<T> d_q[2], d_k[2], d_v[2];
  for (int t = 0; t < 2; ++t) {
    d_q[t].assign(rows, T(-7.0f));
    d_k[t].assign(k.size(), T(-7.0f));
    d_v[t].assign(k.size(), T(-7.0f));
    da::backward<T>(config, shape, range, in, {view(out.data(), H), lse.data()},
                    view(d_out.data() + begin * H * D, H),
                    {mut(d_q[t], H), mut(d_k[t], Hkv), mut(d_v[t], Hkv)},
                    CpuOptions{t == 0 ? 1 : 3});
  }
  for (const auto* pair : {&d_q, &d_k, &d_v})
    mismatches +=
        std::memcmp((*pair)[0].data(), (*pair)[1].data(), (*pair)[0].size() * sizeof(T)) != 0;
  // The composition: prefix-sized buffers, zero outside the range.
  const std::int64_t n = config.causal ? begin + count : N;
  std::vector<T> qf(static_cast<std::size_t>(n * H * D), T(0)), of(qf.size(), T(0)),
      dof(qf.size(), T(0)), dqf(qf.size()), dkf(static_cast<std::size_t>(n * Hkv * D)),
      dvf(dkf.size());
  std::vector<L> lf(static_cast<std::size_t>(H * n), L(0));
  std::copy_n(q.begin() + begin * H * D, rows, qf.begin() + begin * H * D);
  std::copy_n(out.begin(), rows, of.begin() + begin * H * D);
  std::copy_n(d_out.begin() + begin * H * D, rows, dof.begin() + begin * H * D);
  for (std::int64_t h = 0; h < H; ++h)
    std::copy_n(lse.begin() + h * count, count, lf.begin() + h * n + begin);
  da::backward<T>(config, Shape{1, n, H, Hkv, D},
                  {view(qf.data(), H), view(k.data(), Hkv), view(v.data(), Hkv)},
                  {view(of.data(), H), lf.data()}, view(dof.data(), H),
                  {mut(dqf, H), mut(dkf, Hkv), mut(dvf, Hkv)});
  // Bitwise: == plus the sign of zero, which the tested data never makes differ.
  auto equal = [](T a, T b) { return std::memcmp(&a, &b, sizeof(T)) == 0; };
  for (std::size_t i = 0; i < rows; ++i)
    mismatches += !equal(d_q[0][i], dqf[static_cast<std::size_t>(begin * H * D) + i]);
  for (std::size_t i = 0; i < k.size(); ++i) {
    const bool inside = i < dkf.size();
    mismatches += !equal(d_k[0][i], inside ? dkf[i] : T(0));
    mismatches += !equal(d_v[0][i], inside ? dvf[i] : T(0));
  }
}

TEST(CpuInferenceBackward, RangeEqualsTheZeroFilledComposition) {
  const std::int64_t N = 430, H = 4, D = 16;
  // (begin, count): inside tiles of the 400-row blocks, a range crossing a segment start, a
  // decode row, the last rows, the first rows (non-causal: not the whole sequence).
  const std::pair<std::int64_t, std::int64_t> ranges[] = {
      {150, 190}, {390, 25}, {429, 1}, {37, 1}, {0, 77}};
  for (OffsetRule rule : rules)
    for (Mixing mixing : mixings)
      for (bool causal : {true, false}) {
        // Without and with GQA, each in half of the (mixing, causal) cases of every rule.
        const std::int64_t Hkv = causal == (mixing == Mixing::softmax) ? 4 : 2;
        const Config config = make_config({64, 400, 130}, {1, 1, 7}, causal, rule, mixing);
        SCOPED_TRACE(name(config) + " Hkv " + std::to_string(Hkv));
        long mismatches = 0;
        for (const auto& [begin, count] : ranges)
          check_range_against_composition<float>(config, N, H, Hkv, D, begin, count, mismatches);
        EXPECT_EQ(mismatches, 0);
      }
  for (Mixing mixing : mixings) {
    const Config config = make_config({64, 400, 130}, {1, 1, 7}, true, OffsetRule::modular, mixing);
    SCOPED_TRACE(name(config) + " double, bfloat16");
    long mismatches = 0;
    for (const auto& [begin, count] : ranges) {
      check_range_against_composition<double>(config, N, H, 2, D, begin, count, mismatches);
      check_range_against_composition<Eigen::bfloat16>(config, N, H, 2, D, begin, count,
                                                       mismatches);
    }
    check_range_against_composition<Eigen::half>(
        make_config({64, 400, 130}, {1, 1, 7}, false, OffsetRule::blocked, mixing), N, H, 2, D, 150,
        190, mismatches);
    EXPECT_EQ(mismatches, 0);
  }
}

// A decode row's backward (QueryRange{N - 1, 1}): d_q is the full backward's last row, and d_k,
// d_v are the fp64 reference's for a d_out that is zero on every other row.
TEST(CpuInferenceBackward, DecodeRowMatchesTheReference) {
  const std::int64_t N = 300, H = 4, Hkv = 2, D = 16;
  const Shape shape{1, N, H, Hkv, D};
  const auto q = random_values(static_cast<std::size_t>(N * H * D), 74);
  const auto k = random_values(static_cast<std::size_t>(N * Hkv * D), 75);
  const auto v = random_values(static_cast<std::size_t>(N * Hkv * D), 76);
  auto d_out = random_values(q.size(), 77);
  std::fill(d_out.begin(), d_out.end() - H * D, 0.0f);
  for (Mixing mixing : mixings) {
    const Config config = make_config({64, 100, 300}, {1, 3, 7}, true, OffsetRule::modular, mixing);
    SCOPED_TRACE(name(config));
    const ReferenceGrads ref = reference_backward(config, shape, q, k, v, d_out);
    const std::vector<double>&dqd = ref.d_q, &dkd = ref.d_k, &dvd = ref.d_v;
    const QueryRange range{N - 1, 1};
    const da::Inputs<float> in{View<const float>{q.data() + (N - 1) * H * D, 0, H * D, D, H * D},
                               view_of(k, N, Hkv, D), view_of(v, N, Hkv, D)};
    std::vector<float> out(static_cast<std::size_t>(H * D)), lse(static_cast<std::size_t>(H));
    da::forward<float>(config, shape, range, in, {view_of(out, 1, H, D), lse.data()});
    std::vector<float> d_q(out.size(), -7.0f), d_k(k.size(), -7.0f), d_v(k.size(), -7.0f);
    da::backward<float>(config, shape, range, in, {view_of(out, 1, H, D), lse.data()},
                        View<const float>{d_out.data() + (N - 1) * H * D, 0, H * D, D, H * D},
                        {view_of(d_q, 1, H, D), view_of(d_k, N, Hkv, D), view_of(d_v, N, Hkv, D)});
    double worst = 0;
    for (std::int64_t e = 0; e < H * D; ++e)
      worst = std::max(worst, std::abs(d_q[static_cast<std::size_t>(e)] -
                                       dqd[static_cast<std::size_t>((N - 1) * H * D + e)]));
    for (std::size_t i = 0; i < k.size(); ++i) {
      worst = std::max(worst, std::abs(d_k[i] - dkd[i]));
      worst = std::max(worst, std::abs(d_v[i] - dvd[i]));
    }
    EXPECT_LT(worst, 2e-5);
  }
}

// Varlen sequences whose query rows are not all of their rows take the row-restricted path:
// each sequence's gradient is bitwise that of QueryRange on the sequence alone.
TEST(CpuInferenceBackward, VarlenQueryTailsAreTheirRangesBackwardBitwise) {
  const std::int64_t H = 4, Hkv = 2, D = 16;
  const Batch batch = random_batch(H, Hkv, D, 62);
  const std::int64_t B = static_cast<std::int64_t>(batch.lengths.size());
  const std::int64_t total_k = batch.offsets.back();
  std::vector<std::int64_t> q_offsets(1, 0);
  for (std::int64_t b = 0; b < B; ++b)  // 1, 30, 100, 2, 0 (none), 45 query rows: their last
    q_offsets.push_back(q_offsets.back() +
                        std::min<std::int64_t>(batch.lengths[static_cast<std::size_t>(b)],
                                               std::int64_t{1 + (b * 37) % 101} * (b != 4)));
  const std::int64_t total_q = q_offsets.back();
  std::vector<float> q(static_cast<std::size_t>(total_q * H * D));
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t rows =
        q_offsets[static_cast<std::size_t>(b + 1)] - q_offsets[static_cast<std::size_t>(b)];
    const std::int64_t first = batch.offsets[static_cast<std::size_t>(b + 1)] - rows;
    std::copy_n(batch.q.begin() + first * H * D, rows * H * D,
                q.begin() + q_offsets[static_cast<std::size_t>(b)] * H * D);
  }
  const auto d_out = random_values(q.size(), 63);
  const Sequences sequences{B, q_offsets.data(), batch.offsets.data(), nullptr, nullptr};
  for (bool causal : {true, false})
    for (Mixing mixing : mixings) {
      const Config config =
          make_config({64, 100, 333}, {1, 2, 5}, causal, OffsetRule::modular, mixing);
      SCOPED_TRACE(name(config));
      const HeadShape heads{H, Hkv, D};
      const da::Inputs<float> in{view_of(q, total_q, H, D), view_of(batch.k, total_k, Hkv, D),
                                 view_of(batch.v, total_k, Hkv, D)};
      std::vector<float> out(q.size()), lse(static_cast<std::size_t>(H * total_q));
      da::forward<float>(config, heads, sequences, in, {view_of(out, total_q, H, D), lse.data()});
      Grads g{std::vector<float>(q.size(), -7.0f), std::vector<float>(batch.k.size(), -7.0f),
              std::vector<float>(batch.k.size(), -7.0f)};
      da::backward<float>(config, heads, sequences, in, {view_of(out, total_q, H, D), lse.data()},
                          view_of(d_out, total_q, H, D),
                          {view_of(g.d_q, total_q, H, D), view_of(g.d_k, total_k, Hkv, D),
                           view_of(g.d_v, total_k, Hkv, D)});
      long mismatches = 0;
      for (std::int64_t b = 0; b < B; ++b) {
        const std::int64_t n = batch.lengths[static_cast<std::size_t>(b)],
                           o = batch.offsets[static_cast<std::size_t>(b)],
                           q0 = q_offsets[static_cast<std::size_t>(b)],
                           rows = q_offsets[static_cast<std::size_t>(b + 1)] - q0;
        std::vector<float> d_q(static_cast<std::size_t>(rows * H * D)),
            d_k(static_cast<std::size_t>(n * Hkv * D), 0.0f), d_v(d_k.size(), 0.0f);
        if (rows > 0) {
          std::vector<float> lse_b(static_cast<std::size_t>(H * rows));
          for (std::int64_t h = 0; h < H; ++h)
            std::copy_n(lse.begin() + h * total_q + q0, rows, lse_b.begin() + h * rows);
          const View<const float> k_b{batch.k.data() + o * Hkv * D, 0, Hkv * D, D, -1},
              v_b{batch.v.data() + o * Hkv * D, 0, Hkv * D, D, -1};
          da::backward<float>(
              config, Shape{1, n, H, Hkv, D}, QueryRange{n - rows, rows},
              {View<const float>{q.data() + q0 * H * D, 0, H * D, D, -1}, k_b, v_b},
              {View<const float>{out.data() + q0 * H * D, 0, H * D, D, -1}, lse_b.data()},
              View<const float>{d_out.data() + q0 * H * D, 0, H * D, D, -1},
              {view_of(d_q, rows, H, D), view_of(d_k, n, Hkv, D), view_of(d_v, n, Hkv, D)});
        }
        auto differs = [](const std::vector<float>& alone, const float* packed) {  // may be empty
          return !alone.empty() &&
                 std::memcmp(alone.data(), packed, alone.size() * sizeof(float)) != 0;
        };
        mismatches += differs(d_q, g.d_q.data() + q0 * H * D);
        mismatches += differs(d_k, g.d_k.data() + o * Hkv * D);
        mismatches += differs(d_v, g.d_v.data() + o * Hkv * D);
      }
      EXPECT_EQ(mismatches, 0);
    }
}

// Chunked prefill's backward in bfloat16 (the narrow path): the chunks' d_q are the full
// bfloat16 backward's rows and their d_k, d_v sum to its d_k, d_v, within bfloat16 rounding.
TEST(CpuInferenceBackward, Bfloat16ChunksSumToTheFullGradient) {
  using T = Eigen::bfloat16;
  const std::int64_t N = 400, H = 4, Hkv = 2, D = 16;
  const Shape shape{1, N, H, Hkv, D};
  auto convert = [](const std::vector<float>& from) {
    std::vector<T> to(from.size());
    for (std::size_t i = 0; i < from.size(); ++i) to[i] = static_cast<T>(from[i]);
    return to;
  };
  const auto q = convert(random_values(static_cast<std::size_t>(N * H * D), 70));
  const auto k = convert(random_values(static_cast<std::size_t>(N * Hkv * D), 71));
  const auto v = convert(random_values(static_cast<std::size_t>(N * Hkv * D), 72));
  const auto d_out = convert(random_values(q.size(), 73));
  auto view = [&](const T* data, std::int64_t heads) {
    return View<const T>{data, 0, heads * D, D, -1};
  };
  auto mut = [&](std::vector<T>& data, std::int64_t heads) {
    return View<T>{data.data(), 0, heads * D, D, static_cast<std::int64_t>(data.size())};
  };
  const std::int64_t chunks[] = {3, 150, 1, 246};
  for (bool causal : {true, false}) {
    const Config config =
        make_config({64, 100, 400}, {1, 3, 7}, causal, OffsetRule::modular, Mixing::mean);
    SCOPED_TRACE(name(config));
    std::vector<T> out(q.size()), fq(q.size()), fk(k.size()), fv(k.size());
    std::vector<float> lse(static_cast<std::size_t>(H * N));
    const da::Inputs<T> all{view(q.data(), H), view(k.data(), Hkv), view(v.data(), Hkv)};
    da::forward<T>(config, shape, all, {mut(out, H), lse.data()});
    da::backward<T>(config, shape, all, {view(out.data(), H), lse.data()}, view(d_out.data(), H),
                    {mut(fq, H), mut(fk, Hkv), mut(fv, Hkv)});
    std::vector<double> d_k_sum(k.size(), 0.0), d_v_sum(k.size(), 0.0);
    double worst_q = 0, worst_kv = 0;
    std::int64_t begin = 0;
    for (std::int64_t count : chunks) {
      const QueryRange range{begin, count};
      const da::Inputs<T> in{view(q.data() + begin * H * D, H), view(k.data(), Hkv),
                             view(v.data(), Hkv)};
      std::vector<T> c_out(static_cast<std::size_t>(count * H * D));
      std::vector<float> c_lse(static_cast<std::size_t>(H * count));
      da::forward<T>(config, shape, range, in, {mut(c_out, H), c_lse.data()});
      std::vector<T> d_q(c_out.size()), d_k(k.size()), d_v(k.size());
      da::backward<T>(config, shape, range, in, {view(c_out.data(), H), c_lse.data()},
                      view(d_out.data() + begin * H * D, H),
                      {mut(d_q, H), mut(d_k, Hkv), mut(d_v, Hkv)});
      for (std::size_t i = 0; i < d_q.size(); ++i)
        worst_q = std::max(worst_q, std::abs(static_cast<double>(d_q[i]) -
                                             static_cast<double>(fq[begin * H * D + i])));
      for (std::size_t i = 0; i < k.size(); ++i) {
        d_k_sum[i] += static_cast<double>(d_k[i]);
        d_v_sum[i] += static_cast<double>(d_v[i]);
      }
      begin += count;
    }
    for (std::size_t i = 0; i < k.size(); ++i) {
      worst_kv = std::max(worst_kv, std::abs(d_k_sum[i] - static_cast<double>(fk[i])));
      worst_kv = std::max(worst_kv, std::abs(d_v_sum[i] - static_cast<double>(fv[i])));
    }
    // Each chunk's gradients are rounded to bfloat16 (8 bits) on their own: |d_k| <= ~2 here.
    EXPECT_LT(worst_q, 2.0 / 256);
    EXPECT_LT(worst_kv, 4 * 2.0 / 256);
  }
}

// --- Other storage types: double, bfloat16, half ------------------------------------------------

// A varlen batch in storage T: prefill rows bitwise the forward over each sequence alone, and a
// decode step (the last row of every sequence) within T's rounding of those rows.
template <class T>
void check_storage_type(double tolerance) {
  using L = da::lse_type_t<T>;
  const std::int64_t H = 4, Hkv = 2, D = 16;
  const Batch batch = random_batch(H, Hkv, D, 90);
  const std::int64_t total = batch.offsets.back(),
                     B = static_cast<std::int64_t>(batch.lengths.size());
  auto convert = [](const std::vector<float>& from) {
    std::vector<T> to(from.size());
    for (std::size_t i = 0; i < from.size(); ++i) to[i] = static_cast<T>(from[i]);
    return to;
  };
  const std::vector<T> q = convert(batch.q), k = convert(batch.k), v = convert(batch.v);
  auto view = [&](const std::vector<T>& data, std::int64_t heads) {
    return View<const T>{data.data(), 0, heads * D, D, static_cast<std::int64_t>(data.size())};
  };
  const Config config =
      make_config({64, 100, 333}, {1, 2, 5}, true, OffsetRule::modular, Mixing::softmax);
  const Sequences sequences{B, batch.offsets.data(), batch.offsets.data(), nullptr, nullptr};
  std::vector<T> out(q.size());
  std::vector<L> lse(static_cast<std::size_t>(H * total));
  da::forward<T>(config, HeadShape{H, Hkv, D}, sequences, {view(q, H), view(k, Hkv), view(v, Hkv)},
                 {View<T>{out.data(), 0, H * D, D}, lse.data()});
  std::vector<std::int64_t> q_offsets(1, 0);
  for (std::int64_t b = 0; b < B; ++b) q_offsets.push_back(b + 1);
  std::vector<T> q_last(static_cast<std::size_t>(B * H * D)), out_last(q_last.size());
  for (std::int64_t b = 0; b < B; ++b)
    std::copy_n(q.begin() + (batch.offsets[static_cast<std::size_t>(b + 1)] - 1) * H * D, H * D,
                q_last.begin() + b * H * D);
  da::forward<T>(config, HeadShape{H, Hkv, D},
                 Sequences{B, q_offsets.data(), batch.offsets.data(), nullptr, nullptr},
                 {view(q_last, H), view(k, Hkv), view(v, Hkv)},
                 {View<T>{out_last.data(), 0, H * D, D}});
  long mismatches = 0;
  double worst = 0;
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t n = batch.lengths[static_cast<std::size_t>(b)],
                       o = batch.offsets[static_cast<std::size_t>(b)];
    const Shape shape{1, n, H, Hkv, D};
    std::vector<T> alone(static_cast<std::size_t>(n * H * D));
    std::vector<L> alone_lse(static_cast<std::size_t>(H * n));
    da::forward<T>(config, shape,
                   {View<const T>{q.data() + o * H * D, 0, H * D, D},
                    View<const T>{k.data() + o * Hkv * D, 0, Hkv * D, D},
                    View<const T>{v.data() + o * Hkv * D, 0, Hkv * D, D}},
                   {View<T>{alone.data(), 0, H * D, D}, alone_lse.data()});
    mismatches += std::memcmp(alone.data(), out.data() + o * H * D, alone.size() * sizeof(T)) != 0;
    for (std::int64_t h = 0; h < H; ++h)
      mismatches += std::memcmp(alone_lse.data() + h * n, lse.data() + h * total + o,
                                static_cast<std::size_t>(n) * sizeof(L)) != 0;
    for (std::int64_t e = 0; e < H * D; ++e)
      worst = std::max(
          worst,
          std::abs(static_cast<double>(out_last[static_cast<std::size_t>(b * H * D + e)]) -
                   static_cast<double>(alone[static_cast<std::size_t>((n - 1) * H * D + e)])));
  }
  EXPECT_EQ(mismatches, 0);
  EXPECT_LT(worst, tolerance);
}

TEST(CpuInferenceTypes, DoubleBfloat16Half) {
  check_storage_type<double>(1e-12);
  check_storage_type<Eigen::bfloat16>(2.0 / 256);  // two units of bfloat16 rounding at |O| <= 1
  check_storage_type<Eigen::half>(2.0 / 2048);
}

// A decode step on bfloat16 / half K, V and q at head_dim 64 and 128 (the widened fixed-size
// kernel) is bitwise the float step on the same values widened (every bfloat16 and half is a
// float), its output rounded to T: the half-width step reads its rows at their own width and
// converts them exactly, nothing else. Values uniform in [-2, 2), rounded to T.
template <class T>
void check_half_width_decode() {
  for (const std::int64_t D : {64, 128}) {
    const std::int64_t N = 1500, H = 4, Hkv = 2, t = N - 1;
    const Shape shape{1, N, H, Hkv, D};
    auto values = [](std::size_t n, std::uint64_t seed) {
      std::vector<float> x = random_values(n, seed);
      for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<float>(static_cast<T>(x[i] * 2.0f));
      return x;
    };
    const auto qf = values(static_cast<std::size_t>(H * D), 61);
    const auto kf = values(static_cast<std::size_t>(N * Hkv * D), 62);
    const auto vf = values(static_cast<std::size_t>(N * Hkv * D), 63);
    auto narrow = [](const std::vector<float>& x) {
      std::vector<T> y(x.size());
      for (std::size_t i = 0; i < x.size(); ++i) y[i] = static_cast<T>(x[i]);
      return y;
    };
    const std::vector<T> q = narrow(qf), k = narrow(kf), v = narrow(vf);
    for (const Mixing mixing : mixings) {
      const Config config =
          make_config({512, 1024, 2048}, {1, 2, 4}, true, OffsetRule::modular, mixing);
      std::vector<float> out_f(static_cast<std::size_t>(H * D)), lse_f(static_cast<std::size_t>(H));
      da::forward<float>(config, shape, QueryRange{t, 1},
                         {View<const float>{qf.data(), 0, H * D, D, -1}, view_of(kf, N, Hkv, D),
                          view_of(vf, N, Hkv, D)},
                         {View<float>{out_f.data(), 0, H * D, D, -1}, lse_f.data()});
      std::vector<T> out(out_f.size());
      std::vector<float> lse(lse_f.size());
      da::forward<T>(config, shape, QueryRange{t, 1},
                     {View<const T>{q.data(), 0, H * D, D, -1},
                      View<const T>{k.data(), N * Hkv * D, Hkv * D, D, -1},
                      View<const T>{v.data(), N * Hkv * D, Hkv * D, D, -1}},
                     {View<T>{out.data(), 0, H * D, D, -1}, lse.data()});
      long mismatches = 0;
      for (std::size_t i = 0; i < out.size(); ++i)
        mismatches +=
            !same_bits(static_cast<float>(out[i]), static_cast<float>(static_cast<T>(out_f[i])));
      for (std::size_t h = 0; h < lse.size(); ++h) mismatches += !same_bits(lse[h], lse_f[h]);
      EXPECT_EQ(mismatches, 0) << "D = " << D << ", " << name(config);
    }
  }
}

TEST(CpuInferenceTypes, HalfWidthDecodeIsTheFloatDecodeOfItsValues) {
  check_half_width_decode<Eigen::bfloat16>();
  check_half_width_decode<Eigen::half>();
}

// --- The README's "Inference" snippet, verbatim between the markers -----------------------------

TEST(CpuInferenceReadme, DecodeLoopExample) {
  namespace da = dilated_attention;
  // clang-format off
  // README: inference begin
  da::Config config;
  config.segment_lengths = {512, 1024, 2048};
  config.dilation_rates = {1, 2, 4};
  config.causal = true;
  const std::int64_t H = 8, Hkv = 2, D = 64, max_len = 1100, prompt = 1000;
  std::vector<float> k_cache(max_len * Hkv * D), v_cache(k_cache.size());  // [1, max_len, Hkv, D]
  std::vector<float> q_prompt(prompt * H * D), out_prompt(q_prompt.size());
  // ... fill q_prompt and rows [0, prompt) of the caches from the model ...

  // Prefill: the prompt's rows at positions [0, prompt) against its first `prompt` keys.
  const da::Shape prefill{1, prompt, H, Hkv, D};
  const auto cache_k = da::View<const float>{k_cache.data(), 0, Hkv * D, D};
  const auto cache_v = da::View<const float>{v_cache.data(), 0, Hkv * D, D};
  da::forward<float>(config, prefill, da::QueryRange{0, prompt},
                     {da::View<const float>{q_prompt.data(), 0, H * D, D}, cache_k, cache_v},
                     {da::View<float>{out_prompt.data(), 0, H * D, D}});

  // Decode: one row per step at position t against the t + 1 cached keys. The workspace is
  // reused, so a one-thread step allocates nothing.
  da::cpu::DecodeWorkspace<float> workspace;
  std::vector<float> q_step(H * D), out_step(H * D);
  for (std::int64_t t = prompt; t < max_len; ++t) {
    // ... write row t of k_cache and v_cache and the query q_step of token t ...
    da::forward<float>(config, da::Shape{1, t + 1, H, Hkv, D}, da::QueryRange{t, 1},
                       {da::View<const float>{q_step.data(), 0, H * D, D}, cache_k, cache_v},
                       {da::View<float>{out_step.data(), 0, H * D, D}}, da::CpuOptions{1},
                       &workspace);
  }
  // README: inference end
  // clang-format on
  EXPECT_TRUE(std::all_of(out_step.begin(), out_step.end(), [](float x) { return x == 0.0f; }));
}

// --- Bad input: each rejected, naming the member, before any write -------------------------------

template <class Call>
void expect_rejected(const char* what, std::vector<float>& out, const Call& call) {
  std::fill(out.begin(), out.end(), -7.0f);
  try {
    call();
    ADD_FAILURE() << "accepted: " << what;
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
  }
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float x) { return x == -7.0f; })) << what;
}

TEST(CpuInferenceBadInput, EachIsRejectedBeforeAnyWrite) {
  const std::int64_t N = 64, H = 4, Hkv = 2, D = 8;
  const Config config = make_config({16, 32}, {1, 2}, true, OffsetRule::modular, Mixing::softmax);
  const auto q = random_values(static_cast<std::size_t>(2 * N * H * D), 80);
  const auto k = random_values(static_cast<std::size_t>(2 * N * Hkv * D), 81);
  const auto v = random_values(k.size(), 82);
  std::vector<float> out(q.size()), lse(static_cast<std::size_t>(2 * H * N));
  const HeadShape heads{H, Hkv, D};
  const Shape shape{2, N, H, Hkv, D};
  const da::Inputs<float> in{view_of(q, N, H, D), view_of(k, N, Hkv, D), view_of(v, N, Hkv, D)};
  const da::Outputs<float> outs{view_of(out, N, H, D), lse.data()};

  // Queries at an offset.
  expect_rejected("query_range.begin + query_range.count", out, [&] {
    da::forward<float>(config, shape, QueryRange{60, 5}, in, outs);
  });
  expect_rejected("query_range.count = 0", out, [&] {
    da::forward<float>(config, shape, QueryRange{3, 0}, in, outs);
  });
  expect_rejected("query_range.begin = -1", out, [&] {
    da::forward<float>(config, shape, QueryRange{-1, 1}, in, outs);
  });
  expect_rejected("out overlaps q", out, [&] {
    da::forward<float>(config, shape, QueryRange{0, 4},
                       {View<const float>{out.data(), N * H * D, H * D, D}, in.k, in.v}, outs);
  });
  expect_rejected("q reaches element", out, [&] {
    da::forward<float>(config, Shape{2, N, H, Hkv, D}, QueryRange{0, 4},
                       {View<const float>{q.data(), N * H * D, H * D, D, 100}, in.k, in.v}, outs);
  });

  // Varlen.
  std::vector<std::int64_t> offsets = {0, 10, 30, 64}, bad = {0, 10, 7, 64},
                            nonzero = {1, 10, 30, 64};
  auto varlen = [&](const Sequences& s) {
    return [&, s] {
      da::forward<float>(config, heads, s,
                         {view_of(q, 128, H, D), view_of(k, 128, Hkv, D), view_of(v, 128, Hkv, D)},
                         {view_of(out, 128, H, D), lse.data()});
    };
  };
  expect_rejected("sequences.query_offsets[2] = 7 is less than sequences.query_offsets[1] = 10",
                  out, varlen(Sequences{3, bad.data(), offsets.data(), nullptr, nullptr}));
  expect_rejected("sequences.kv_offsets[2] = 7 is less than", out,
                  varlen(Sequences{3, offsets.data(), bad.data(), nullptr, nullptr}));
  expect_rejected("sequences.query_offsets[0] = 1", out,
                  varlen(Sequences{3, nonzero.data(), offsets.data(), nullptr, nullptr}));
  expect_rejected("sequences.count = 0: the batch is empty", out,
                  varlen(Sequences{0, offsets.data(), offsets.data(), nullptr, nullptr}));
  expect_rejected("sequences.kv_offsets is null", out,
                  varlen(Sequences{3, offsets.data(), nullptr, nullptr, nullptr}));
  std::vector<std::int64_t> begins = {0, 15, 0};
  expect_rejected("exceeds its kv_length", out,
                  varlen(Sequences{3, offsets.data(), offsets.data(), nullptr, begins.data()}));
  std::vector<std::int64_t> more_q = {0, 10, 40, 64};
  expect_rejected("sequence 1: query_begin + query_count", out,
                  varlen(Sequences{3, more_q.data(), offsets.data(), nullptr, nullptr}));
  std::vector<std::int64_t> too_long = {0, 10, 30, 400};
  expect_rejected("q reaches element", out,
                  varlen(Sequences{3, too_long.data(), too_long.data(), nullptr, nullptr}));

  // Paged.
  const std::int64_t page_size = 16, num_pages = 8;
  std::vector<float> pages(static_cast<std::size_t>(num_pages * page_size * Hkv * D), 0.5f);
  std::vector<std::int32_t> table = {0, 1, 2, 3, 4, 5, 99, 7};
  std::vector<std::int64_t> q_offsets = {0, 1, 2}, lengths = {64, 64};
  const da::PagedKeyValues<float> paged{pages.data(),
                                        pages.data(),
                                        num_pages,
                                        page_size,
                                        page_size * Hkv * D,
                                        Hkv * D,
                                        D,
                                        table.data(),
                                        4};
  auto paged_call = [&](const da::PagedKeyValues<float>& p, const Sequences& s) {
    return [&, p, s] {
      da::forward<float>(config, heads, s, view_of(q, 2, H, D), p,
                         {view_of(out, 2, H, D), lse.data()});
    };
  };
  const Sequences decode{2, q_offsets.data(), nullptr, lengths.data(), nullptr};
  expect_rejected("paged.page_table[1 * 4 + 2] = 99 is not a page (paged.num_pages = 8)", out,
                  paged_call(paged, decode));
  da::PagedKeyValues<float> zero_page = paged;
  zero_page.page_size = 0;
  expect_rejected("paged.page_size = 0", out, paged_call(zero_page, decode));
  da::PagedKeyValues<float> short_stride = paged;
  short_stride.page_table_stride = 3;
  expect_rejected("paged.page_table_stride = 3", out, paged_call(short_stride, decode));
  expect_rejected("sequences.kv_lengths is null", out,
                  paged_call(paged, Sequences{2, q_offsets.data(), nullptr, nullptr, nullptr}));
  std::vector<std::int32_t> good_table = {0, 1, 2, 3, 4, 5, 6, 7};
  da::PagedKeyValues<float> good = paged;
  good.page_table = good_table.data();
  expect_rejected("out overlaps paged.k", out, [&] {
    da::forward<float>(config, heads, decode, view_of(q, 2, H, D), good,
                       {View<float>{pages.data(), 0, H * D, D}, nullptr});
  });

  // Padded.
  std::vector<std::int64_t> valid = {70, 3}, negative = {3, -1};
  expect_rejected("valid_lengths.lengths[0] = 70 exceeds shape.seq_len = 64", out, [&] {
    da::forward<float>(config, shape, da::ValidLengths{valid.data()}, in, outs);
  });
  expect_rejected("valid_lengths.lengths[1] = -1", out, [&] {
    da::forward<float>(config, shape, da::ValidLengths{negative.data()}, in, outs);
  });
  expect_rejected("valid_lengths.lengths is null", out,
                  [&] { da::forward<float>(config, shape, da::ValidLengths{nullptr}, in, outs); });

  // Backward: a missing LSE, gradients overlapping an input.
  std::vector<float> d_q(q.size()), d_k(k.size()), d_v(k.size());
  const da::Gradients<float> grads{view_of(d_q, N, H, D), view_of(d_k, N, Hkv, D),
                                   view_of(d_v, N, Hkv, D)};
  expect_rejected("lse is null", d_q, [&] {
    da::backward<float>(config, shape, QueryRange{0, 4}, in, {view_of(out, N, H, D), nullptr},
                        view_of(q, N, H, D), grads);
  });
  expect_rejected("d_k overlaps k", d_q, [&] {
    da::backward<float>(
        config, shape, QueryRange{0, 4}, in, {view_of(out, N, H, D), lse.data()},
        view_of(q, N, H, D),
        {grads.d_q, View<float>{const_cast<float*>(k.data()), N * Hkv * D, Hkv * D, D}, grads.d_v});
  });
  expect_rejected("valid_lengths.lengths[0] = 70", d_q, [&] {
    da::backward<float>(config, shape, da::ValidLengths{valid.data()}, in,
                        {view_of(out, N, H, D), lse.data()}, view_of(q, N, H, D), grads);
  });
  expect_rejected("sequences.query_offsets[2] = 7", d_q, [&] {
    da::backward<float>(
        config, heads, Sequences{3, bad.data(), offsets.data(), nullptr, nullptr},
        {view_of(q, 128, H, D), view_of(k, 128, Hkv, D), view_of(v, 128, Hkv, D)},
        {view_of(out, 128, H, D), lse.data()}, view_of(q, 128, H, D),
        {view_of(d_q, 128, H, D), view_of(d_k, 128, Hkv, D), view_of(d_v, 128, Hkv, D)});
  });
}

}  // namespace
