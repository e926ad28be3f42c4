// Fault safety of the ring on in-process ranks (the same scenarios run over MPI in
// ring_mpi_test): a rank with a different config, shape or bad input, one that calls the other
// operation, or one that fails in the middle of a forward or a backward, makes every rank raise
// within seconds, no output is written, and the same transports then run a consistent call
// exactly. Also: a transfer that never completes raises
// TransferTimeout, and the transport still works afterwards.

#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "support/ring_faults.hpp"
#include "support/ring_support.hpp"

namespace da = dilated_attention;
namespace ring = dilated_attention::ring;
using da::testing::Fault;
using da::testing::Outcome;

namespace {

const da::testing::FaultProblem& problem() {
  static const da::testing::FaultProblem instance;
  return instance;
}

// Runs `fault` on rank `faulty` of P in-process ranks (two compute threads each: a failure inside
// the compute phase must not strand a worker), then a consistent call on the same transports;
// every rank must see what judge() asks for.
void expect_every_rank_raises_then_recovers(int num_ranks, Fault fault, int faulty,
                                            da::testing::Call call) {
  std::vector<Outcome> failed(static_cast<std::size_t>(num_ranks)),
      after(static_cast<std::size_t>(num_ranks));
  ring::run_in_process(num_ranks, [&](ring::Transport& transport) {
    const auto p = static_cast<std::size_t>(transport.rank());
    ring::Options options;
    options.device.num_threads = 2;
    failed[p] = da::testing::run_fault_call(problem(), transport, fault, faulty, options, call);
    after[p] = da::testing::run_fault_call(problem(), transport, Fault::none, faulty, {}, call);
  });
  for (int p = 0; p < num_ranks; ++p) {
    SCOPED_TRACE("rank " + std::to_string(p));
    EXPECT_EQ(da::testing::judge(failed[static_cast<std::size_t>(p)], fault, faulty, p), "");
    EXPECT_EQ(da::testing::judge(after[static_cast<std::size_t>(p)], Fault::none, faulty, p), "");
  }
}

class RingFaults
    : public ::testing::TestWithParam<std::tuple<int /*ranks*/, Fault, int /*faulty*/>> {};

TEST_P(RingFaults, EveryRankRaisesThenTheTransportServesAConsistentCall) {
  const auto [num_ranks, fault, faulty_choice] = GetParam();
  expect_every_rank_raises_then_recovers(num_ranks, fault,
                                         faulty_choice < 0 ? num_ranks - 1 : faulty_choice,
                                         da::testing::Call::forward);
}

std::string name(const ::testing::TestParamInfo<std::tuple<int, Fault, int>>& info) {
  const int faulty = std::get<2>(info.param);
  return "P" + std::to_string(std::get<0>(info.param)) + "_" +
         da::testing::fault_name(std::get<1>(info.param)) + "_on_" +
         (faulty < 0 ? std::string("last") : "rank" + std::to_string(faulty));
}

INSTANTIATE_TEST_SUITE_P(
    Mismatches, RingFaults,
    ::testing::Combine(::testing::Values(2, 3, 4),
                       ::testing::Values(Fault::causal, Fault::segments, Fault::head_dim,
                                         Fault::null_q, Fault::throw_mid_forward,
                                         Fault::throw_at_first_post, Fault::throw_in_progress),
                       ::testing::Values(-1)),
    name);
INSTANTIATE_TEST_SUITE_P(OnRankZero, RingFaults,
                         ::testing::Combine(::testing::Values(2, 3),
                                            ::testing::Values(Fault::null_q,
                                                              Fault::throw_mid_forward),
                                            ::testing::Values(0)),
                         name);

// The same for ring::backward: its own bad inputs (a null lse), a rank that calls forward while
// the others call backward, and exceptions in either direction's transfers. (A mismatch is judged
// against rank 0's record, so the odd rank out is never rank 0 in the mismatch cases.)
class RingBackwardFaults
    : public ::testing::TestWithParam<std::tuple<int /*ranks*/, Fault, int /*faulty*/>> {};

TEST_P(RingBackwardFaults, EveryRankRaisesThenTheTransportServesAConsistentCall) {
  const auto [num_ranks, fault, faulty_choice] = GetParam();
  expect_every_rank_raises_then_recovers(num_ranks, fault,
                                         faulty_choice < 0 ? num_ranks - 1 : faulty_choice,
                                         da::testing::Call::backward);
}

INSTANTIATE_TEST_SUITE_P(
    Mismatches, RingBackwardFaults,
    ::testing::Combine(::testing::Values(2, 3, 4),
                       ::testing::Values(Fault::causal, Fault::segments, Fault::head_dim,
                                         Fault::null_q, Fault::null_lse, Fault::other_operation,
                                         Fault::throw_mid_forward, Fault::throw_at_first_post,
                                         Fault::throw_in_progress,
                                         Fault::throw_returning_gradients),
                       ::testing::Values(-1)),
    name);
INSTANTIATE_TEST_SUITE_P(OnRankZero, RingBackwardFaults,
                         ::testing::Combine(::testing::Values(2, 3),
                                            ::testing::Values(Fault::null_lse,
                                                              Fault::throw_mid_forward,
                                                              Fault::throw_returning_gradients),
                                            ::testing::Values(0)),
                         name);

// The mismatch is caught before any K/V row moves: no transfer is posted on any rank.
TEST(RingAgreement, NothingMovesBeforeTheRanksAgree) {
  std::vector<std::int64_t> posted(3, -1);
  ring::run_in_process(3, [&](ring::Transport& inner) {
    da::testing::CountingTransport transport(inner);
    da::testing::run_fault_call(problem(), transport, Fault::causal, 2);
    posted[static_cast<std::size_t>(inner.rank())] = transport.sends + transport.recvs;
  });
  EXPECT_EQ(posted, (std::vector<std::int64_t>{0, 0, 0}));
}

// Rank 1 posts its sends 1.5 s late; rank 0 gives up on its receive at the 200 ms timeout, every
// rank raises, and a consistent call afterwards is exact.
class SlowTransport final : public ring::TransportAdapter {
 public:
  SlowTransport(ring::Transport& inner, bool slow) : TransportAdapter(inner), slow_(slow) {}
  Ticket post_send(int peer, int tag, const void* data, std::size_t bytes) override {
    if (slow_) std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    slow_ = false;
    return TransportAdapter::post_send(peer, tag, data, bytes);
  }

 private:
  bool slow_;
};

TEST(RingTimeout, ATransferThatNeverCompletesRaisesOnEveryRank) {
  std::vector<std::string> first(2), second(2);
  std::vector<double> seconds(2);
  std::vector<Outcome> after(2);
  ring::run_in_process(2, [&](ring::Transport& inner) {
    const auto p = static_cast<std::size_t>(inner.rank());
    SlowTransport transport(inner, p == 1);
    ring::Options options;
    options.timeout = std::chrono::milliseconds(200);
    const auto start = std::chrono::steady_clock::now();
    const Outcome outcome =
        da::testing::run_fault_call(problem(), transport, Fault::none, 0, options);
    seconds[p] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    first[p] = outcome.message;
    after[p] = da::testing::run_fault_call(problem(), inner, Fault::none, 0);
  });
  EXPECT_NE(first[0].find("options.timeout"), std::string::npos) << first[0];
  EXPECT_FALSE(first[1].empty());  // a timeout of its own (the others left) or rank 0's failure
  EXPECT_LT(seconds[0], 1.4);      // rank 0 did not wait for rank 1's late send
  for (int p = 0; p < 2; ++p)
    EXPECT_EQ(da::testing::judge(after[static_cast<std::size_t>(p)], Fault::none, 0, p), "");
}

}  // namespace
