// The generic driver (run_ring_forward) with an instrumented back end and transport: every exchange is
// posted before any block is computed (or, with post_early off, each one step ahead), and
// the driver needs nothing of a back end beyond the members the CPU back end provides.

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "support/ring_support.hpp"

namespace da = dilated_attention;
namespace ring = dilated_attention::ring;

namespace {

// The CPU back end, logging each compute phase.
class LoggingBackend : public ring::CpuForwardBackend<double> {
 public:
  template <class... Args>
  LoggingBackend(std::vector<std::string>& log, Args&&... args)
      : ring::CpuForwardBackend<double>(std::forward<Args>(args)...), log_(log) {}
  template <class Body>
  void for_each_head(Body&& body) {
    log_.push_back("compute");
    ring::CpuForwardBackend<double>::for_each_head(std::forward<Body>(body));
  }

 private:
  std::vector<std::string>& log_;
};

// A transport logging each posted receive with its step (the distance back to the sender).
class LoggingTransport final : public ring::TransportAdapter {
 public:
  LoggingTransport(ring::Transport& inner, std::vector<std::string>& log)
      : TransportAdapter(inner), log_(log) {}
  Ticket post_recv(int peer, int tag, void* data, std::size_t bytes) override {
    log_.push_back("post " + std::to_string((rank() - peer + size()) % size()));
    return TransportAdapter::post_recv(peer, tag, data, bytes);
  }

 private:
  std::vector<std::string>& log_;
};

// Both tests' problem: one branch (w = 24, r = 2) over N = 24 on four ranks of 6 rows, each rank
// logging its posted receives and compute phases into its own log.
class RingDriver : public ::testing::Test {
 protected:
  RingDriver() {
    config.segment_lengths = {24};
    config.dilation_rates = {2};
    q.fill_random(1);
    k.fill_random(2);
    v.fill_random(3);
    da::reference::forward<double>(config, shape, {q.view(), k.view(), v.view()},
                                   {expected.view()});
  }

  // On every rank: `drive(transport, backend)` over the rank's rows, then the rank's rows of `out`.
  template <class Drive>
  void run(Drive&& drive) {
    ring::run_in_process(4, [&](ring::Transport& inner) {
      auto& log = logs[static_cast<std::size_t>(inner.rank())];
      LoggingTransport transport(inner, log);
      const std::int64_t begin = transport.rank() * 6;
      da::Shape local = shape;
      local.seq_len = 6;
      LoggingBackend backend(log, local, begin, da::testing::shard_view(q.view(), begin),
                             da::testing::shard_view(k.view(), begin),
                             da::testing::shard_view(v.view(), begin), 0.5, false, 1, 1);
      drive(transport, backend);
      backend.finish(da::testing::shard_view(out.view(), begin), nullptr);
    });
  }

  // Every rank logged `expected_log`, and the output is the reference's.
  void expect(const std::vector<std::string>& expected_log) const {
    for (const auto& log : logs) EXPECT_EQ(log, expected_log);
    EXPECT_LE(da::testing::max_abs_diff(out, expected), 1e-12);  // scale 0.5 = 1/sqrt(4)
  }

  da::Config config;
  const da::Shape shape{1, 24, 2, 2, 4};
  da::testing::Tensor<double> q{shape, 2}, k{shape, 2}, v{shape, 2}, out{shape, 2},
      expected{shape, 2};
  std::vector<std::vector<std::string>> logs = std::vector<std::vector<std::string>>(4);
  ring::PatternCache cache;
};

TEST_F(RingDriver, PostsEveryExchangeBeforeComputingNearestFirst) {
  run([&](ring::Transport& transport, LoggingBackend& backend) {
    const ring::Stats stats = ring::run_ring_forward(config, shape, transport, backend, cache);
    EXPECT_GT(stats.progress_calls, 0);  // the transport is driven between blocks
  });
  // Distances 1 and 3 (= -1) first, then 2; the local step, then the steps in that order.
  expect({"post 1", "post 3", "post 2", "compute", "compute", "compute", "compute"});
}

TEST_F(RingDriver, OneStepAheadWhenNotPostingEarly) {
  run([&](ring::Transport& transport, LoggingBackend& backend) {
    ring::Options options;
    options.post_early = false;
    options.drive_progress = false;
    const ring::Stats stats =
        ring::run_ring_forward(config, shape, transport, backend, cache, options);
    EXPECT_EQ(stats.progress_calls, 0);
  });
  expect({"post 1", "compute", "post 2", "compute", "post 3", "compute", "compute"});
}

}  // namespace
