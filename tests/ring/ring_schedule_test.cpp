// The ring schedule: sender and receiver agree, local branches never communicate, causal rings
// only send forward, and bad partitions are rejected before any output is written.

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "support/ring_support.hpp"

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
                const ring::StepPlan sender =
                    ring::make_step_plan({24, num_ranks, p, w, r, o, causal, t});
                const std::int64_t dest = (p + t) % num_ranks;
                const ring::StepPlan receiver =
                    ring::make_step_plan({24, num_ranks, dest, w, r, o, causal, t});
                ASSERT_EQ(sender.sends(), receiver.receives());
                if (!sender.sends()) continue;
                EXPECT_EQ(sender.send_peer, dest);
                EXPECT_EQ(receiver.recv_peer, p);
                ASSERT_EQ(receiver.blocks.size(), 1u);
                EXPECT_EQ(sender.send_rows, receiver.recv_rows);
                ASSERT_EQ(sender.send_rows.size(), 1u);
                EXPECT_EQ(sender.send_rows.front(), receiver.blocks.front().keys);
                if (causal) {
                  EXPECT_GT(dest, p);  // causal rings never send backwards
                }
              }
}

// Both layouts: over all steps, the blocks of rank p cover every (query, key) pair that one of
// its query rows attends in (w, r, offset) exactly once -- same segment, both rows selected by
// the offset, key not after query when causal -- and nothing else; the sender's units are the
// receiver's, and each block's keys are rows of the unit it names.
TEST(RingSchedule, BlocksCoverEveryAttendedPairOnceInBothLayouts) {
  for (const ring::Layout layout : {ring::Layout::contiguous, ring::Layout::zigzag})
    for (const bool causal : {false, true})
      for (std::int64_t num_ranks = 1; num_ranks <= 4; ++num_ranks)
        for (const std::int64_t w : {2, 3, 5, 6, 8, 12, 13, 24, 30})
          for (std::int64_t r = 1; r <= std::min<std::int64_t>(w, 3); ++r)
            for (std::int64_t o = 0; o < r; ++o) {
              if (layout == ring::Layout::zigzag && 24 % (2 * num_ranks) != 0) continue;
              const da::BranchGeometry g{w, r, 24};
              for (std::int64_t p = 0; p < num_ranks; ++p) {
                SCOPED_TRACE(std::string(ring::to_string(layout)) +
                             " P=" + std::to_string(num_ranks) + " w=" + std::to_string(w) +
                             " r=" + std::to_string(r) + " o=" + std::to_string(o) +
                             " p=" + std::to_string(p) + (causal ? " causal" : ""));
                const auto mine = ring::rank_chunks(layout, 24, num_ranks, p);
                std::vector<std::vector<int>> seen(24, std::vector<int>(24, 0));
                for (std::int64_t t = 0; t < num_ranks; ++t) {
                  const ring::StepPlan plan =
                      ring::make_step_plan({24, num_ranks, p, w, r, o, causal, t, layout});
                  EXPECT_EQ(ring::step_has_work({24, num_ranks, p, w, r, o, causal, t, layout}) ||
                                (!plan.sends() && !plan.receives() && plan.blocks.empty()),
                            true);
                  if (t > 0) {
                    const std::int64_t dest = (p + t) % num_ranks;
                    const ring::StepPlan receiver =
                        ring::make_step_plan({24, num_ranks, dest, w, r, o, causal, t, layout});
                    EXPECT_EQ(plan.send_rows, receiver.recv_rows);
                    ASSERT_EQ(plan.block_unit.size(), plan.blocks.size());
                    for (std::size_t j = 0; j < plan.blocks.size(); ++j)
                      EXPECT_EQ(plan.blocks[j].keys, plan.recv_rows[plan.block_unit[j]]);
                  }
                  for (const ring::BlockPair& block : plan.blocks)
                    for (std::int64_t a = 0; a < block.queries.count; ++a)
                      for (std::int64_t b = 0; b < block.keys.count; ++b) {
                        const std::int64_t x = block.queries.at(a), y = block.keys.at(b);
                        if (!causal || y <= x)
                          ++seen[static_cast<std::size_t>(x)][static_cast<std::size_t>(y)];
                      }
                }
                for (std::int64_t x = 0; x < 24; ++x) {
                  bool held = false;
                  for (const ring::Chunk& c : mine) held = held || c.contains(x);
                  for (std::int64_t y = 0; y < 24; ++y) {
                    const bool attended = held && g.segment_of(x) == g.segment_of(y) &&
                                          g.selected(x, o) && g.selected(y, o) &&
                                          (!causal || y <= x);
                    ASSERT_EQ(seen[static_cast<std::size_t>(x)][static_cast<std::size_t>(y)],
                              attended ? 1 : 0)
                        << "x=" << x << " y=" << y;
                  }
                }
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
              for (std::int64_t j = 0; j < block.queries.count; ++j)
                ++seen[static_cast<std::size_t>(block.queries.at(j))];
            }
            const ring::Shard shard = ring::shard_of(24, num_ranks, p);
            for (std::int64_t x = 0; x < 24; ++x)
              EXPECT_EQ(seen[static_cast<std::size_t>(x)],
                        x >= shard.begin && x < shard.end && g.selected(x, o) ? 1 : 0);
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
  const auto q = random_tensor(shape, 3, 1), k = random_tensor(shape, 3, 2),
             v = random_tensor(shape, 3, 3);
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
  const auto q = random_tensor(shape, 2, 1), k = random_tensor(shape, 2, 2),
             v = random_tensor(shape, 2, 3);
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
  const auto q = random_tensor(shape, 1, 1), k = random_tensor(shape, 1, 2),
             v = random_tensor(shape, 1, 3);
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
  EXPECT_NE(message_of([] { ring::validate_partition(24, 5, 0); }).find("num_ranks = 5"),
            std::string::npos);
  EXPECT_NE(message_of([] { ring::validate_partition(24, 0, 0); }).find("num_ranks = 0"),
            std::string::npos);
  EXPECT_NE(message_of([] { ring::validate_partition(24, 4, 4); }).find("rank = 4"),
            std::string::npos);
  EXPECT_NE(message_of([] { ring::validate_partition(24, 4, -1); }).find("rank = -1"),
            std::string::npos);
  EXPECT_NE(message_of([] {
              ring::make_step_plan({24, 4, 0, 6, 2, 2, false, 1});
            }).find("offset = 2"),
            std::string::npos);
  EXPECT_NE(message_of([] {
              ring::make_step_plan({24, 4, 0, 6, 2, 0, false, 4});
            }).find("step = 4"),
            std::string::npos);
  EXPECT_NE(message_of([] { da::ring::InProcessWorld world(0); }).find("num_ranks = 0"),
            std::string::npos);
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
  EXPECT_THROW(da::ring::run_in_process(
                   4,
                   [&](da::ring::Transport& transport) {
                     try {
                       da::ring::forward<double>(config, shape, transport,
                                                 {q.view(), k.view(), v.view()}, {out.view()});
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
  EXPECT_THROW(da::ring::run_in_process(2,
                                        [&](da::ring::Transport& transport) {
                                          da::View<const double> null_q{nullptr, 0, 0, 0};
                                          da::ring::forward<double>(config, even, transport,
                                                                    {null_q, k8.view(), v8.view()},
                                                                    {out8.view()});
                                        }),
               std::invalid_argument);
  // A config error names the config field.
  da::Config bad = config;
  bad.dilation_rates = {9};
  EXPECT_THROW(da::ring::run_in_process(2,
                                        [&](da::ring::Transport& transport) {
                                          da::ring::forward<double>(
                                              bad, even, transport,
                                              {q8.view(), k8.view(), v8.view()}, {out8.view()});
                                        }),
               std::invalid_argument);
  for (const double value : out.storage) EXPECT_EQ(value, 5.0);
  for (const double value : out8.storage) EXPECT_EQ(value, 5.0);
}

}  // namespace

namespace {

// The schedule model of compute per rank: the (query, key) pairs of every block a rank computes,
// times the query heads using that offset, summed over branches, offsets and steps. Causal
// blocks on one chunk count the lower triangle; blocks across chunks are all before-the-query
// (the schedule never pairs a query chunk with a later key chunk).
double rank_work(const da::Config& config, const da::Shape& shape, std::int64_t num_ranks,
                 std::int64_t rank, ring::Layout layout) {
  const da::Pattern pattern(config, shape);
  const auto mine = ring::rank_chunks(layout, shape.seq_len, num_ranks, rank);
  const std::int64_t chunk = mine.front().length();
  const auto owner = [&](std::int64_t c) {
    return layout == ring::Layout::zigzag && c >= num_ranks ? 2 * num_ranks - 1 - c : c;
  };
  double work = 0;
  for (std::int64_t i = 0; i < pattern.num_branches(); ++i) {
    const da::BranchGeometry g = pattern.branch(i);
    // Steps that can carry work: 0, and the senders holding a chunk of a segment at one of this
    // rank's chunk edges (the only segments two ranks can share).
    std::vector<std::int64_t> steps = {0};
    for (const ring::Chunk& a : mine)
      for (const std::int64_t s : {g.segment_of(a.begin), g.segment_of(a.end - 1)}) {
        const std::int64_t begin = s * g.w, end = std::min(begin + g.w, shape.seq_len);
        for (std::int64_t c = begin / chunk; c <= (end - 1) / chunk; ++c)
          if (owner(c) != rank) steps.push_back((rank - owner(c) + num_ranks) % num_ranks);
      }
    std::sort(steps.begin(), steps.end());
    steps.erase(std::unique(steps.begin(), steps.end()), steps.end());
    for (std::int64_t o = 0; o < g.r; ++o) {
      const std::int64_t heads = pattern.heads_with_offset(i, o).count;
      if (heads == 0) continue;
      for (const std::int64_t t : steps) {
        const ring::StepPlan plan = ring::make_step_plan(
            {shape.seq_len, num_ranks, rank, g.w, g.r, o, config.causal, t, layout});
        for (const ring::BlockPair& block : plan.blocks) {
          const double q = static_cast<double>(block.queries.count),
                       k = static_cast<double>(block.keys.count);
          work += static_cast<double>(heads) *
                  (config.causal && block.queries == block.keys ? q * (q + 1) / 2 : q * k);
        }
      }
    }
  }
  return work;
}

// LongNet's branches as in the paper (w = 2048 .. 32768, r = 1, 2, 4, 6, 12), N = 2^20, 12 heads
// (so every offset of every branch is used): causal work is balanced within 5% by the zigzag
// layout at P = 64, 256, 1024, where contiguous shards are not. Non-causal work is balanced by
// both.
TEST(RingBalance, ZigzagBalancesCausalWorkAtScale) {
  da::Config config;
  config.segment_lengths = {2048, 4096, 8192, 16384, 32768};
  config.dilation_rates = {1, 2, 4, 6, 12};
  const da::Shape shape{1, std::int64_t{1} << 20, 12, 12, 64};
  for (const bool causal : {true, false}) {
    config.causal = causal;
    for (const std::int64_t num_ranks : {64, 256, 1024}) {
      double ratio[2] = {0, 0};
      for (const ring::Layout layout : {ring::Layout::contiguous, ring::Layout::zigzag}) {
        double most = 0, total = 0;
        for (std::int64_t p = 0; p < num_ranks; ++p) {
          const double work = rank_work(config, shape, num_ranks, p, layout);
          most = std::max(most, work);
          total += work;
        }
        ratio[static_cast<int>(layout)] = most / (total / static_cast<double>(num_ranks));
      }
      std::printf("causal=%d P=%lld max/mean work: contiguous %.3f, zigzag %.3f\n", causal ? 1 : 0,
                  static_cast<long long>(num_ranks), ratio[0], ratio[1]);
      EXPECT_LE(ratio[1], 1.05) << "P = " << num_ranks;
      if (causal && num_ranks >= 256) {
        EXPECT_GT(ratio[0], 1.05) << "P = " << num_ranks;  // the imbalance zigzag removes is real
      }
    }
  }
}

}  // namespace
