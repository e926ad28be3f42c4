// The ring forward equals the single-device forward (docs/semantics.md "Guarantees" (item 9)) for P = 1..4, with segments below,
// equal to, above and not a multiple of the shard length, causal and not, every offset rule, both
// mixings, MHA and GQA; and every rank sends exactly the rows its peers' queries attend to.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include <dilated_attention/dilated_attention.hpp>

#include "support/ring_support.hpp"
#include "support/random_config.hpp"

namespace da = dilated_attention;
using da::testing::Tensor;

namespace {

using da::testing::needed_bytes;

// The most offsets of one branch that the query heads reading one kv head use.
std::int64_t offsets_per_kv_head(const da::Pattern& pattern, std::int64_t i) {
  std::int64_t most = 0;
  for (std::int64_t g = 0; g < pattern.shape().num_kv_heads; ++g) {
    std::vector<std::int64_t> offsets;
    for (std::int64_t h = 0; h < pattern.shape().num_heads; ++h)
      if (pattern.kv_head(h) == g && pattern.offset(i, h) >= 0)
        offsets.push_back(pattern.offset(i, h));
    std::sort(offsets.begin(), offsets.end());
    most =
        std::max<std::int64_t>(most, std::unique(offsets.begin(), offsets.end()) - offsets.begin());
  }
  return most;
}

using Param = da::testing::RingSweepParam;

class RingForward : public ::testing::TestWithParam<Param> {};

TEST_P(RingForward, EqualsSingleDeviceAndSendsOnlyNeededRows) {
  const auto [set, rule, mixing, causal, gqa] = GetParam();
  const da::testing::RingBranches& branches =
      da::testing::ring_branch_sets()[static_cast<std::size_t>(set)];
  da::Config config;
  config.segment_lengths = branches.w;
  config.dilation_rates = branches.r;
  config.causal = causal;
  config.offsets = rule;
  config.mixing = mixing;
  const da::Shape shape{2, 24, 4, gqa ? 2 : 4, 8};
  // Padded layouts, so the ring honours view strides.
  Tensor<double> q(shape, shape.num_heads, 1, 3), k(shape, shape.num_kv_heads, 2),
      v(shape, shape.num_kv_heads, 0, 5), expected(shape, shape.num_heads);
  q.fill_random(11 + static_cast<std::uint64_t>(set));
  k.fill_random(23);
  v.fill_random(37);
  std::vector<double> expected_lse(
      static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len));
  da::reference::forward<double>(config, shape, {q.view(), k.view(), v.view()},
                                 {expected.view(), expected_lse.data()});
  const da::Pattern pattern(config, shape);

  for (int num_ranks = 1; num_ranks <= 4; ++num_ranks) {
    SCOPED_TRACE("P = " + std::to_string(num_ranks));
    const auto run = da::testing::run_ring_in_process<double>(config, shape, q, k, v, num_ranks);
    EXPECT_LE(da::testing::max_abs_diff(run.out, expected), 1e-12);
    EXPECT_LE(da::testing::max_lse_diff(run.lse, expected_lse), 1e-12);

    std::vector<std::vector<bool>> talks;
    const auto needed = needed_bytes(pattern, num_ranks, sizeof(double), &talks);
    const std::int64_t length = shape.seq_len / num_ranks;
    for (int p = 0; p < num_ranks; ++p) {
      SCOPED_TRACE("rank " + std::to_string(p));
      const da::ring::Stats& stats = run.stats[static_cast<std::size_t>(p)];
      std::int64_t total = 0, peers = 0;
      for (std::int64_t i = 0; i < pattern.num_branches(); ++i) {
        const std::int64_t sent = stats.bytes_sent_per_branch[static_cast<std::size_t>(i)];
        EXPECT_EQ(sent, needed[static_cast<std::size_t>(p)][static_cast<std::size_t>(i)])
            << "branch " << i;
        total += sent;
        // At most 1/r of a ring of whole shards for this branch (per offset a kv head's readers
        // use), rounding each peer's rows up.
        const std::int64_t r = pattern.branch(i).r;
        const std::int64_t whole_rows_per_peer = length;
        const std::int64_t bound = (num_ranks - 1) * shape.batch * shape.num_kv_heads * 2 *
                                   shape.head_dim * static_cast<std::int64_t>(sizeof(double)) *
                                   ((whole_rows_per_peer + r - 1) / r) *
                                   offsets_per_kv_head(pattern, i);
        EXPECT_LE(sent, bound) << "branch " << i;
        if (!gqa) {
          const std::int64_t whole = (num_ranks - 1) * shape.batch * length * shape.num_kv_heads *
                                     2 * shape.head_dim * static_cast<std::int64_t>(sizeof(double));
          const std::int64_t rounding = (num_ranks - 1) * shape.batch * shape.num_kv_heads * 2 *
                                        shape.head_dim * static_cast<std::int64_t>(sizeof(double));
          EXPECT_LE(sent * r, whole + r * rounding) << "branch " << i;
        }
      }
      for (int q2 = 0; q2 < num_ranks; ++q2)
        peers += talks[static_cast<std::size_t>(p)][static_cast<std::size_t>(q2)] ? 1 : 0;
      EXPECT_EQ(stats.bytes_sent, total);
      EXPECT_EQ(run.transport_bytes[static_cast<std::size_t>(p)], total);
      // Skipped steps make no transport call: one send per peer that needs rows, no more.
      EXPECT_EQ(run.transport_sends[static_cast<std::size_t>(p)], peers);
      EXPECT_EQ(stats.sends_posted, peers);
      EXPECT_EQ(stats.sends_posted + stats.sends_skipped, num_ranks - 1);
      EXPECT_EQ(stats.recvs_posted + stats.recvs_skipped, num_ranks - 1);
      EXPECT_EQ(run.transport_recvs[static_cast<std::size_t>(p)], stats.recvs_posted);
    }
  }

  // The zigzag layout (chunks p and 2P-1-p of 2P): the same result, for every P with 2P | 24.
  for (int num_ranks : {1, 2, 3, 4, 6}) {
    SCOPED_TRACE("zigzag P = " + std::to_string(num_ranks));
    const auto run = da::testing::run_ring_in_process<double>(config, shape, q, k, v, num_ranks,
                                                              nullptr, 1, da::ring::Layout::zigzag);
    EXPECT_LE(da::testing::max_abs_diff(run.out, expected), 1e-12);
    EXPECT_LE(da::testing::max_lse_diff(run.lse, expected_lse), 1e-12);
  }
}

// Zigzag at every P = 1..8 (N = 1680 = lcm(2, 4, ..., 16)), LongNet-like branches below, across
// and beyond the chunks, every rule, both mixings, causal and not, GQA: equal to the
// single-device forward.
TEST(RingForward, ZigzagEqualsSingleDeviceForEveryPUpTo8) {
  const da::Shape shape{1, 1680, 4, 2, 4};
  Tensor<double> q(shape, 4), k(shape, 2), v(shape, 2), expected(shape, 4);
  q.fill_random(71);
  k.fill_random(72);
  v.fill_random(73);
  // Each rule and each mixing once, causal twice (the sweep above covers every combination at
  // N = 24); kept small so the test stays quick in Debug and under ThreadSanitizer.
  struct Combo {
    da::OffsetRule rule;
    da::Mixing mixing;
    bool causal;
  };
  for (const Combo& combo : {Combo{da::OffsetRule::modular, da::Mixing::softmax, true},
                             Combo{da::OffsetRule::blocked, da::Mixing::mean, true},
                             Combo{da::OffsetRule::partitioned, da::Mixing::softmax, false}}) {
    const da::OffsetRule rule = combo.rule;
    const da::Mixing mixing = combo.mixing;
    const bool causal = combo.causal;
    da::Config config;
    config.segment_lengths = {60, 280, 1680};
    config.dilation_rates = {1, 2, 4};
    config.offsets = rule;
    config.mixing = mixing;
    config.causal = causal;
    std::vector<double> expected_lse(static_cast<std::size_t>(4 * 1680));  // heads x N
    da::forward<double>(config, shape, {q.view(), k.view(), v.view()},
                        {expected.view(), expected_lse.data()});
    for (int num_ranks = 1; num_ranks <= 8; ++num_ranks) {
      SCOPED_TRACE(std::string(da::to_string(rule)) + " " + da::to_string(mixing) +
                   (causal ? " causal" : "") + " P = " + std::to_string(num_ranks));
      const auto run = da::testing::run_ring_in_process<double>(
          config, shape, q, k, v, num_ranks, nullptr, 1, da::ring::Layout::zigzag);
      EXPECT_LE(da::testing::max_abs_diff(run.out, expected), 1e-12);
      EXPECT_LE(da::testing::max_lse_diff(run.lse, expected_lse), 1e-12);
    }
  }
}

// Zigzag at the P the N = 24 sweep cannot reach (5, 7, 8; N = 560 = lcm(10, 14, 16)), every rule,
// mixing, causal and not, MHA and GQA.
class RingForwardZigzag : public ::testing::TestWithParam<da::testing::RingComboParam> {};

TEST_P(RingForwardZigzag, EqualsSingleDeviceAtP5P7P8) {
  const auto [rule, mixing, causal, gqa] = GetParam();
  const da::Config config = da::testing::ring_zigzag_config(rule, mixing, causal);
  const da::Shape shape{1, 560, 4, gqa ? 2 : 4, 4};
  Tensor<double> q(shape, 4), k(shape, shape.num_kv_heads), v(shape, shape.num_kv_heads),
      expected(shape, 4);
  q.fill_random(81);
  k.fill_random(82);
  v.fill_random(83);
  std::vector<double> expected_lse(static_cast<std::size_t>(4 * 560));
  da::forward<double>(config, shape, {q.view(), k.view(), v.view()},
                      {expected.view(), expected_lse.data()});
  for (int num_ranks : {5, 7, 8}) {
    SCOPED_TRACE("zigzag P = " + std::to_string(num_ranks));
    const auto run = da::testing::run_ring_in_process<double>(config, shape, q, k, v, num_ranks,
                                                              nullptr, 1, da::ring::Layout::zigzag);
    EXPECT_LE(da::testing::max_abs_diff(run.out, expected), 1e-12);
    EXPECT_LE(da::testing::max_lse_diff(run.lse, expected_lse), 1e-12);
  }
}

INSTANTIATE_TEST_SUITE_P(EveryCombination, RingForwardZigzag, da::testing::ring_combo_values());

INSTANTIATE_TEST_SUITE_P(Sweep, RingForward, da::testing::ring_sweep_values(),
                         da::testing::ring_sweep_name);

// Float storage, a longer sequence and several compute threads: still the reference, and
// bitwise the same for any thread count (docs/semantics.md "Guarantees" (item 11)).
TEST(RingForward, FloatStorageAndThreadCountInvariance) {
  da::Config config;
  config.segment_lengths = {16, 40, 96};
  config.dilation_rates = {1, 2, 4};
  config.causal = true;
  const da::Shape shape{1, 96, 6, 3, 16};
  Tensor<float> q(shape, 6), k(shape, 3), v(shape, 3), expected(shape, 6);
  q.fill_random(5);
  k.fill_random(6);
  v.fill_random(7);
  std::vector<float> expected_lse(static_cast<std::size_t>(6 * 96));
  da::reference::forward<float>(config, shape, {q.view(), k.view(), v.view()},
                                {expected.view(), expected_lse.data()});
  for (int num_ranks : {2, 3, 4}) {
    SCOPED_TRACE("P = " + std::to_string(num_ranks));
    const auto one =
        da::testing::run_ring_in_process<float>(config, shape, q, k, v, num_ranks, nullptr, 1);
    const auto three =
        da::testing::run_ring_in_process<float>(config, shape, q, k, v, num_ranks, nullptr, 3);
    EXPECT_LE(da::testing::max_abs_diff(one.out, expected), 2e-5);
    EXPECT_LE(da::testing::max_lse_diff(one.lse, expected_lse), 2e-5);
    EXPECT_EQ(one.out.storage, three.out.storage);
    EXPECT_EQ(one.lse, three.lse);
  }
}

// A malformed DILATED_ATTENTION_CPU_ISA raises std::invalid_argument on the ranks (resolved on
// the calling thread, never inside a compute worker, where it would terminate the process).
TEST(RingForward, BadInstructionSetVariableRaises) {
  const da::Config config = da::testing::make_config({8, 16}, {1, 2});
  const da::Shape shape{1, 32, 2, 2, 8};
  Tensor<float> q(shape, 2), k(shape, 2), v(shape, 2);
  q.fill_random(1);
  k.fill_random(2);
  v.fill_random(3);
  const char* saved = std::getenv("DILATED_ATTENTION_CPU_ISA");
  const std::string restore = saved ? saved : "";
  ::setenv("DILATED_ATTENTION_CPU_ISA", "no-such-isa", 1);
  EXPECT_THROW(da::testing::run_ring_in_process<float>(config, shape, q, k, v, 2, nullptr, 2),
               std::exception);
  if (saved)
    ::setenv("DILATED_ATTENTION_CPU_ISA", restore.c_str(), 1);
  else
    ::unsetenv("DILATED_ATTENTION_CPU_ISA");
  // The same ranks work again once the variable is sane.
  EXPECT_NO_THROW(da::testing::run_ring_in_process<float>(config, shape, q, k, v, 2, nullptr, 2));
}

// options.device.num_threads means what CpuOptions::num_threads means on one device: 0 is the
// default (the environment variable, else the CPUs this process may use) and gives the same
// bits as one thread; a negative count is refused on that rank, naming the ring's field.
TEST(RingForward, DeviceThreadCountHasTheSingleDeviceMeaning) {
  const da::Config config = da::testing::make_config({8, 16}, {1, 2});
  const da::Shape shape{1, 32, 2, 2, 8};
  Tensor<float> q(shape, 2), k(shape, 2), v(shape, 2);
  q.fill_random(1);
  k.fill_random(2);
  v.fill_random(3);
  const auto one = da::testing::run_ring_in_process<float>(config, shape, q, k, v, 2, nullptr, 1);
  const auto automatic =
      da::testing::run_ring_in_process<float>(config, shape, q, k, v, 2, nullptr, 0);
  EXPECT_EQ(one.out.storage, automatic.out.storage);
  try {
    da::testing::run_ring_in_process<float>(config, shape, q, k, v, 2, nullptr, -1);
    ADD_FAILURE() << "options.device.num_threads = -1 was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("options.device.num_threads"), std::string::npos)
        << e.what();
  }
}

// The ring can fail: a corrupted received row changes the answer (guards against a test that
// compares the reference with itself).
TEST(RingForward, CorruptedTransferIsDetected) {
  class Corrupting final : public da::ring::TransportAdapter {
   public:
    explicit Corrupting(da::ring::Transport& inner) : TransportAdapter(inner) {}
    Ticket post_send(int peer, int tag, const void* data, std::size_t bytes) override {
      std::vector<unsigned char> copy(static_cast<const unsigned char*>(data),
                                      static_cast<const unsigned char*>(data) + bytes);
      if (bytes >= sizeof(double)) {
        double first;
        std::memcpy(&first, copy.data(), sizeof first);
        first += 1.0;
        std::memcpy(copy.data(), &first, sizeof first);
      }
      return TransportAdapter::post_send(peer, tag, copy.data(), bytes);
    }
  };
  da::Config config;
  config.segment_lengths = {24};
  config.dilation_rates = {1};
  const da::Shape shape{1, 24, 2, 2, 4};
  Tensor<double> q(shape, 2), k(shape, 2), v(shape, 2), expected(shape, 2), out(shape, 2);
  q.fill_random(1);
  k.fill_random(2);
  v.fill_random(3);
  da::reference::forward<double>(config, shape, {q.view(), k.view(), v.view()}, {expected.view()});
  da::ring::run_in_process(2, [&](da::ring::Transport& inner) {
    Corrupting transport(inner);
    const std::int64_t begin = transport.rank() * 12;
    da::ring::forward<double>(
        config, shape, transport,
        {da::testing::shard_view(q.view(), begin), da::testing::shard_view(k.view(), begin),
         da::testing::shard_view(v.view(), begin)},
        {da::testing::shard_view(out.view(), begin)});
  });
  EXPECT_GT(da::testing::max_abs_diff(out, expected), 1e-6);
}

}  // namespace

namespace {

// Against the fast single-process CPU forward on a longer sequence (the reference is too slow
// here): N = 384, shards of 96..384, branches below, across and beyond a shard.
TEST(RingForward, EqualsCpuForwardOnALongerSequence) {
  da::Config config;
  config.segment_lengths = {32, 80, 192, 512};
  config.dilation_rates = {1, 2, 3, 8};
  const da::Shape shape{1, 384, 4, 2, 16};
  Tensor<float> q(shape, 4), k(shape, 2), v(shape, 2), expected(shape, 4);
  q.fill_random(41);
  k.fill_random(42);
  v.fill_random(43);
  for (const bool causal : {false, true}) {
    config.causal = causal;
    std::vector<float> expected_lse(static_cast<std::size_t>(4 * 384));
    da::forward<float>(config, shape, {q.view(), k.view(), v.view()},
                       {expected.view(), expected_lse.data()});
    for (int num_ranks : {1, 2, 3, 4}) {
      SCOPED_TRACE("P = " + std::to_string(num_ranks) + (causal ? " causal" : ""));
      const auto run = da::testing::run_ring_in_process<float>(config, shape, q, k, v, num_ranks);
      EXPECT_LE(da::testing::max_abs_diff(run.out, expected), 1e-5);
      EXPECT_LE(da::testing::max_lse_diff(run.lse, expected_lse), 1e-5);
    }
  }
}

}  // namespace
