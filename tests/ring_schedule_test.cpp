// The ring schedule: sender and receiver agree, local branches never communicate, causal rings
// only send forward, and bad partitions are rejected before any output is written.

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "ring_support.hpp"

namespace da = dilated_attention;
namespace ring = dilated_attention::ring;
using da::testing::Tensor;

namespace {

TEST(RingSchedule, SenderAndReceiverAgreeOnEveryStep) {
  for (const bool causal : {false, true})
    for (std::int64_t num_ranks = 1; num_ranks <= 4; ++num_ranks)
      for (const std::int64_t w : {3, 4, 6, 7, 12, 13, 24, 30})
        for (std::int64_t r = 1; r <= std::min<std::int64_t>(w, 4); ++r)
          for (std::int64_t o = 0; o < r; ++o)
            for (std::int64_t t = 1; t < num_ranks; ++t)
              for (std::int64_t p = 0; p < num_ranks; ++p) {
                const ring::StepPlan sender = ring::make_step_plan({24, num_ranks, p, w, r, o, causal, t});
                const std::int64_t dest = (p + t) % num_ranks;
                const ring::StepPlan receiver = ring::make_step_plan({24, num_ranks, dest, w, r, o, causal, t});
                ASSERT_EQ(sender.sends(), receiver.receives());
                if (!sender.sends()) continue;
                EXPECT_EQ(sender.send_peer, dest);
                EXPECT_EQ(receiver.recv_peer, p);
                ASSERT_EQ(receiver.blocks.size(), 1u);
                EXPECT_EQ(sender.send_rows, receiver.blocks.front().keys);
                if (causal) {
                  EXPECT_GT(dest, p);  // causal rings never send backwards
                }
              }
}

// Step 0 covers every selected row of the shard exactly once, as queries and as keys.
TEST(RingSchedule, LocalStepCoversTheShard) {
  for (std::int64_t num_ranks = 1; num_ranks <= 4; ++num_ranks)
    for (const std::int64_t w : {2, 5, 6, 9, 24, 40})
      for (std::int64_t r = 1; r <= std::min<std::int64_t>(w, 3); ++r)
        for (std::int64_t o = 0; o < r; ++o)
          for (std::int64_t p = 0; p < num_ranks; ++p) {
            const ring::StepPlan plan = ring::make_step_plan({24, num_ranks, p, w, r, o, false, 0});
            const da::BranchGeometry g{w, r, 24};
            std::vector<int> seen(24, 0);
            for (const ring::BlockPair& block : plan.blocks) {
              EXPECT_EQ(block.queries, block.keys);
              for (std::int64_t j = 0; j < block.queries.count; ++j) ++seen[static_cast<std::size_t>(block.queries.at(j))];
            }
            const ring::Shard shard = ring::shard_of(24, num_ranks, p);
            for (std::int64_t x = 0; x < 24; ++x)
              EXPECT_EQ(seen[static_cast<std::size_t>(x)], x >= shard.begin && x < shard.end && g.selected(x, o) ? 1 : 0);
            EXPECT_FALSE(plan.sends());
            EXPECT_FALSE(plan.receives());
          }
}

Tensor<double> random_tensor(const da::Shape& shape, std::int64_t heads, std::uint64_t seed) {
  Tensor<double> t(shape, heads);
  t.fill_random(seed);
  return t;
}

// Segments that fit inside a shard (w divides N/P): no transport call at all.
TEST(RingSchedule, LocalBranchesNeverCommunicate) {
  da::Config config;
  config.segment_lengths = {2, 3, 6};
  config.dilation_rates = {1, 2, 3};
  const da::Shape shape{1, 24, 3, 3, 4};
  const auto q = random_tensor(shape, 3, 1), k = random_tensor(shape, 3, 2), v = random_tensor(shape, 3, 3);
  for (const bool causal : {false, true}) {
    config.causal = causal;
    const auto run = da::testing::run_ring_in_process<double>(config, shape, q, k, v, 4);
    for (int p = 0; p < 4; ++p) {
      EXPECT_EQ(run.transport_sends[static_cast<std::size_t>(p)], 0);
      EXPECT_EQ(run.transport_recvs[static_cast<std::size_t>(p)], 0);
      EXPECT_EQ(run.stats[static_cast<std::size_t>(p)].sends_skipped, 3);
      EXPECT_EQ(run.stats[static_cast<std::size_t>(p)].recvs_skipped, 3);
      EXPECT_EQ(run.stats[static_cast<std::size_t>(p)].bytes_sent, 0);
    }
  }
}

// One segment over everything, causal: rank p sends to the P-1-p later ranks and receives from the
// p earlier ones; the other steps are skipped without a transport call. Non-causal: all P-1.
TEST(RingSchedule, CausalRingSendsOnlyForward) {
  da::Config config;
  config.segment_lengths = {24};
  config.dilation_rates = {2};
  const da::Shape shape{1, 24, 2, 2, 4};
  const auto q = random_tensor(shape, 2, 1), k = random_tensor(shape, 2, 2), v = random_tensor(shape, 2, 3);
  for (const bool causal : {false, true}) {
    config.causal = causal;
    const auto run = da::testing::run_ring_in_process<double>(config, shape, q, k, v, 4);
    for (int p = 0; p < 4; ++p) {
      SCOPED_TRACE("rank " + std::to_string(p) + (causal ? " causal" : " full"));
      EXPECT_EQ(run.transport_sends[static_cast<std::size_t>(p)], causal ? 3 - p : 3);
      EXPECT_EQ(run.transport_recvs[static_cast<std::size_t>(p)], causal ? p : 3);
      EXPECT_EQ(run.stats[static_cast<std::size_t>(p)].sends_skipped, causal ? p : 0);
      EXPECT_EQ(run.stats[static_cast<std::size_t>(p)].recvs_skipped, causal ? 3 - p : 0);
      // Closed form: 6 own rows, 3 per offset (r = 2); each kv head has one offset (MHA,
      // modular), so 3 rows x 2 kv heads x (K and V) x 4 dims x 8 bytes per peer.
      EXPECT_EQ(run.stats[static_cast<std::size_t>(p)].bytes_sent,
                run.transport_sends[static_cast<std::size_t>(p)] * 3 * 2 * 2 * 4 * 8);
    }
  }
}

// Only the ranks a segment spans talk: with w = 12 and P = 4, ranks {0, 1} and {2, 3} form two
// sub-rings and never exchange across.
TEST(RingSchedule, SubRingsOfASegment) {
  da::Config config;
  config.segment_lengths = {12};
  config.dilation_rates = {1};
  const da::Shape shape{1, 24, 1, 1, 4};
  const auto q = random_tensor(shape, 1, 1), k = random_tensor(shape, 1, 2), v = random_tensor(shape, 1, 3);
  for (std::int64_t p = 0; p < 4; ++p)
    for (std::int64_t t = 1; t < 4; ++t) {
      const ring::StepPlan plan = ring::make_step_plan({24, 4, p, 12, 1, 0, false, t});
      if (plan.sends()) {
        EXPECT_EQ(plan.send_peer / 2, p / 2);
      }
      if (plan.receives()) {
        EXPECT_EQ(plan.recv_peer / 2, p / 2);
      }
      EXPECT_EQ(plan.sends(), t == 1 || t == 3 ? ((p + t) % 4) / 2 == p / 2 : false);
    }
  const auto run = da::testing::run_ring_in_process<double>(config, shape, q, k, v, 4);
  for (int p = 0; p < 4; ++p) EXPECT_EQ(run.transport_sends[static_cast<std::size_t>(p)], 1);
}

TEST(RingSchedule, RejectsBadPartitions) {
  const auto message_of = [](auto&& call) {
    try {
      call();
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no exception");
  };
  EXPECT_NE(message_of([] { ring::validate_partition(24, 5, 0); }).find("num_ranks = 5"), std::string::npos);
  EXPECT_NE(message_of([] { ring::validate_partition(24, 0, 0); }).find("num_ranks = 0"), std::string::npos);
  EXPECT_NE(message_of([] { ring::validate_partition(24, 4, 4); }).find("rank = 4"), std::string::npos);
  EXPECT_NE(message_of([] { ring::validate_partition(24, 4, -1); }).find("rank = -1"), std::string::npos);
  EXPECT_NE(message_of([] { ring::make_step_plan({24, 4, 0, 6, 2, 2, false, 1}); }).find("offset = 2"), std::string::npos);
  EXPECT_NE(message_of([] { ring::make_step_plan({24, 4, 0, 6, 2, 0, false, 4}); }).find("step = 4"), std::string::npos);
  EXPECT_NE(message_of([] { da::ring::InProcessWorld world(0); }).find("num_ranks = 0"), std::string::npos);
  EXPECT_NE(message_of([] {
              da::ring::InProcessWorld world(2);
              da::ring::InProcessTransport transport(world, 2);
            }).find("rank = 2"),
            std::string::npos);
}

// N % P != 0 and bad views are rejected on every rank before any output is written.
TEST(RingSchedule, ForwardValidatesBeforeWriting) {
  da::Config config;
  config.segment_lengths = {8};
  config.dilation_rates = {2};
  const da::Shape shape{1, 10, 2, 2, 4};
  Tensor<double> q(shape, 2), k(shape, 2), v(shape, 2), out(shape, 2);
  out.fill(5.0);
  std::vector<std::string> messages(4);
  EXPECT_THROW(da::ring::run_in_process(4, [&](da::ring::Transport& transport) {
                 try {
                   da::ring::forward<double>(config, shape, transport, q.view(), k.view(), v.view(), out.view());
                 } catch (const std::invalid_argument& e) {
                   messages[static_cast<std::size_t>(transport.rank())] = e.what();
                   throw;
                 }
               }),
               std::invalid_argument);
  for (const std::string& message : messages) {
    EXPECT_NE(message.find("shape.seq_len = 10"), std::string::npos) << message;
    EXPECT_NE(message.find("num_ranks = 4"), std::string::npos) << message;
  }
  // A null query view on a valid partition names q.
  const da::Shape even{1, 8, 2, 2, 4};
  Tensor<double> q8(even, 2), k8(even, 2), v8(even, 2), out8(even, 2);
  out8.fill(5.0);
  EXPECT_THROW(da::ring::run_in_process(2, [&](da::ring::Transport& transport) {
                 da::View<const double> null_q{nullptr, 0, 0, 0};
                 da::ring::forward<double>(config, even, transport, null_q, k8.view(), v8.view(), out8.view());
               }),
               std::invalid_argument);
  // A config error names the config field.
  da::Config bad = config;
  bad.dilation_rates = {9};
  EXPECT_THROW(da::ring::run_in_process(2, [&](da::ring::Transport& transport) {
                 da::ring::forward<double>(bad, even, transport, q8.view(), k8.view(), v8.view(), out8.view());
               }),
               std::invalid_argument);
  for (const double value : out.storage) EXPECT_EQ(value, 5.0);
  for (const double value : out8.storage) EXPECT_EQ(value, 5.0);
}

}  // namespace
