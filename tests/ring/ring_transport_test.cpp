// The in-process transport: ordered delivery per (peer, tag), exact sizes, no hang when a rank
// fails, and a ring forward with all ranks running at once (also run under ThreadSanitizer).

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "support/ring_support.hpp"

namespace da = dilated_attention;
namespace ring = dilated_attention::ring;

namespace {

TEST(RingInProcessTransport, DeliversInOrderPerPeerAndTag) {
  std::vector<std::vector<int>> received(3);
  ring::run_in_process(3, [&](ring::Transport& t) {
    const int me = t.rank(), next = (me + 1) % 3, prev = (me + 2) % 3;
    std::vector<int> in(8, -1);
    std::vector<int> out_a = {me, 1}, out_b = {me, 2}, out_c = {me, 3, 3, 3};
    // Receives are posted before the matching sends exist; tag 6 is sent after tag 5 but
    // received first.
    const auto r7 = t.post_recv(prev, 6, in.data() + 4, 4 * sizeof(int));
    const auto r5a = t.post_recv(prev, 5, in.data(), 2 * sizeof(int));
    const auto r5b = t.post_recv(prev, 5, in.data() + 2, 2 * sizeof(int));
    t.wait(t.post_send(next, 5, out_a.data(), 2 * sizeof(int)));
    t.wait(t.post_send(next, 5, out_b.data(), 2 * sizeof(int)));
    t.wait(t.post_send(next, 6, out_c.data(), 4 * sizeof(int)));
    t.wait(r7);
    t.wait(r5b);  // waiting out of order still matches in posting order
    t.wait(r5a);
    received[static_cast<std::size_t>(me)] = in;
  });
  for (int me = 0; me < 3; ++me) {
    const int prev = (me + 2) % 3;
    EXPECT_EQ(received[static_cast<std::size_t>(me)],
              (std::vector<int>{prev, 1, prev, 2, prev, 3, 3, 3}));
  }
}

TEST(RingInProcessTransport, SizeMismatchIsAnErrorNotATruncation) {
  EXPECT_THROW(ring::run_in_process(2,
                                    [](ring::Transport& t) {
                                      std::vector<char> buffer(16);
                                      if (t.rank() == 0)
                                        t.wait(t.post_send(1, 0, buffer.data(), 16));
                                      else
                                        t.wait(t.post_recv(0, 0, buffer.data(), 8));
                                    }),
               std::runtime_error);
}

TEST(RingInProcessTransport, AFailingRankDoesNotHangTheOthers) {
  try {
    ring::run_in_process(4, [](ring::Transport& t) {
      if (t.rank() == 2) throw std::invalid_argument("rank 2 gave up");
      std::vector<char> buffer(4);
      t.wait(t.post_recv(2, 0, buffer.data(), 4));  // would wait forever without abort
    });
    FAIL() << "expected an exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()), "rank 2 gave up");  // the cause, not the knock-on aborts
  }
}

TEST(RingInProcessTransport, RejectsUnknownPeersAndTickets) {
  ring::InProcessWorld world(2);
  ring::InProcessTransport t(world, 0);
  char byte = 0;
  EXPECT_THROW(t.post_send(2, 0, &byte, 1), std::invalid_argument);
  EXPECT_THROW(t.post_recv(-1, 0, &byte, 1), std::invalid_argument);
  EXPECT_THROW(t.wait(42), std::logic_error);
}

// Four ranks and two compute threads each, all at once: the ring result is still the reference.
TEST(RingInProcessTransport, ConcurrentRingForward) {
  da::Config config;
  config.segment_lengths = {8, 20};
  config.dilation_rates = {2, 3};
  config.causal = true;
  const da::Shape shape{2, 24, 3, 3, 4};
  da::testing::Tensor<double> q(shape, 3), k(shape, 3), v(shape, 3), expected(shape, 3);
  q.fill_random(1);
  k.fill_random(2);
  v.fill_random(3);
  da::reference::forward<double>(config, shape, {q.view(), k.view(), v.view()}, {expected.view()});
  ring::PatternCache cache;
  const auto run = da::testing::run_ring_in_process<double>(config, shape, q, k, v, 4, &cache, 2);
  EXPECT_LE(da::testing::max_abs_diff(run.out, expected), 1e-12);
}

}  // namespace
