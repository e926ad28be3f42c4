// Launched as `mpiexec -n P ring_mpi_test` (P = 2, 3, 4): every rank computes the single-process
// forward and backward of the whole problem, runs the ring forward and backward over MPI on its
// shard, and compares its rows of O and LSE, and of dQ, dK and dV. Then the fault scenarios of ring_faults.hpp (a different causal flag, segment lengths
// or head_dim on one rank, a null pointer, an exception mid-forward): every rank must raise within
// seconds, and a consistent call on the same transport right after must be exact (forward and
// backward scenarios, including a rank calling forward while the others call backward and an
// exception while returning gradients). Exits non-zero
// on every rank when any rank sees a mismatch.

#include <mpi.h>

#include <dilated_attention/dilated_attention.hpp>
#include <dilated_attention/reference.hpp>
#include <dilated_attention/ring.hpp>
#include <dilated_attention/ring/mpi.hpp>

#include <cmath>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "support/random_config.hpp"
#include "support/ring_faults.hpp"
#include "support/ring_rows.hpp"
#include "support/tensors.hpp"

namespace da = dilated_attention;
using da::testing::make_config;
using da::testing::Tensor;
using Rule = da::OffsetRule;
using Mix = da::Mixing;

namespace {

struct Case {
  const char* name;
  da::Config config;
  da::Shape shape;
  da::ring::Layout layout = da::ring::Layout::contiguous;
};

// 0 when the ring's rows equal the single-process forward's (and the fp64 reference's).
int check(const Case& c, da::ring::MpiTransport& transport) {
  const da::Config& config = c.config;
  const da::Shape& s = c.shape;
  Tensor<double> q(s, s.num_heads), k(s, s.num_kv_heads), v(s, s.num_kv_heads);
  q.fill_random(101);  // the same seeds on every rank: the same global problem
  k.fill_random(202);
  v.fill_random(303);
  Tensor<double> single(s, s.num_heads), reference(s, s.num_heads), ring(s, s.num_heads);
  const std::size_t lse_size = static_cast<std::size_t>(s.batch * s.num_heads * s.seq_len);
  std::vector<double> single_lse(lse_size), reference_lse(lse_size);
  da::forward<double>(config, s, {q.view(), k.view(), v.view()},
                      {single.view(), single_lse.data()});
  da::reference::forward<double>(config, s, {q.view(), k.view(), v.view()},
                                 {reference.view(), reference_lse.data()});

  const std::int64_t length = s.seq_len / transport.size();
  const auto chunks =
      da::ring::rank_chunks(c.layout, s.seq_len, transport.size(), transport.rank());
  std::vector<double> ring_lse(static_cast<std::size_t>(s.batch * s.num_heads * length));
  da::ring::Options options;
  options.layout = c.layout;
  da::ring::Stats stats;
  if (c.layout == da::ring::Layout::contiguous) {
    const std::int64_t begin = transport.rank() * length;
    stats = da::ring::forward<double>(
        config, s, transport,
        {da::testing::shard_view(q.view(), begin), da::testing::shard_view(k.view(), begin),
         da::testing::shard_view(v.view(), begin)},
        {da::testing::shard_view(ring.view(), begin), ring_lse.data()}, options);
  } else {
    const Tensor<double> lq = da::testing::gather_rows(q, chunks, length),
                         lk = da::testing::gather_rows(k, chunks, length),
                         lv = da::testing::gather_rows(v, chunks, length);
    Tensor<double> lo = da::testing::gather_rows(ring, chunks, length);
    stats = da::ring::forward<double>(config, s, transport, {lq.view(), lk.view(), lv.view()},
                                      {lo.view(), ring_lse.data()}, options);
    da::testing::scatter_rows(lo, chunks, ring);
  }

  double worst_o = 0.0, worst_lse = 0.0, worst_reference = 0.0;
  for (const auto& chunk : chunks)
    for (std::int64_t b = 0; b < s.batch; ++b)
      for (std::int64_t h = 0; h < s.num_heads; ++h)
        for (std::int64_t gx = chunk.begin; gx < chunk.end; ++gx) {
          const std::int64_t x = chunk.local + gx - chunk.begin;
          for (std::int64_t d = 0; d < s.head_dim; ++d) {
            const double got = ring.at(b, gx, h, d);
            worst_o = std::fmax(worst_o, std::fabs(got - single.at(b, gx, h, d)));
            worst_reference =
                std::fmax(worst_reference, std::fabs(got - reference.at(b, gx, h, d)));
            if (std::isnan(got)) worst_o = INFINITY;
          }
          const double got = ring_lse[static_cast<std::size_t>((b * s.num_heads + h) * length + x)];
          const double want =
              single_lse[static_cast<std::size_t>((b * s.num_heads + h) * s.seq_len + gx)];
          const double diff = std::isinf(got) || std::isinf(want) ? (got == want ? 0.0 : INFINITY)
                                                                  : std::fabs(got - want);
          worst_lse = std::fmax(worst_lse, diff);
        }
  // Every byte sent is received by someone.
  long long moved[2] = {static_cast<long long>(stats.bytes_sent),
                        static_cast<long long>(stats.bytes_received)};
  long long totals[2] = {0, 0};
  MPI_Allreduce(moved, totals, 2, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
  const bool ok =
      worst_o <= 1e-12 && worst_lse <= 1e-12 && worst_reference <= 1e-12 && totals[0] == totals[1];
  std::printf("rank %d/%d %-22s max|dO| %.2e max|dLSE| %.2e vs reference %.2e sent %lld B %s\n",
              transport.rank(), transport.size(), c.name, worst_o, worst_lse, worst_reference,
              static_cast<long long>(stats.bytes_sent), ok ? "ok" : "MISMATCH");
  return ok ? 0 : 1;
}

// 0 when the ring backward's rows of dQ, dK and dV equal the single-process backward's (and the
// fp64 reference's) and every gradient byte sent back is received.
int check_backward(const Case& c, da::ring::MpiTransport& transport) {
  const da::Config& config = c.config;
  const da::Shape& s = c.shape;
  Tensor<double> q(s, s.num_heads), k(s, s.num_kv_heads), v(s, s.num_kv_heads), out(s, s.num_heads),
      d_out(s, s.num_heads);
  q.fill_random(11);
  k.fill_random(22);
  v.fill_random(33);
  d_out.fill_random(44);
  std::vector<double> lse(static_cast<std::size_t>(s.batch * s.num_heads * s.seq_len));
  da::forward<double>(config, s, {q.view(), k.view(), v.view()}, {out.view(), lse.data()});
  Tensor<double> single[3] = {{s, s.num_heads}, {s, s.num_kv_heads}, {s, s.num_kv_heads}};
  Tensor<double> reference[3] = {{s, s.num_heads}, {s, s.num_kv_heads}, {s, s.num_kv_heads}};
  da::backward<double>(config, s, {q.view(), k.view(), v.view()}, {out.view(), lse.data()},
                       d_out.view(), {single[0].view(), single[1].view(), single[2].view()});
  da::reference::backward<double>(config, s, {q.view(), k.view(), v.view()},
                                  {out.view(), lse.data()}, d_out.view(),
                                  {reference[0].view(), reference[1].view(), reference[2].view()});

  const std::int64_t length = s.seq_len / transport.size();
  const auto chunks =
      da::ring::rank_chunks(c.layout, s.seq_len, transport.size(), transport.rank());
  const std::vector<double> local_lse = da::testing::gather_lse(lse, s, chunks, length);
  Tensor<double> lq = da::testing::gather_rows(q, chunks, length),
                 lk = da::testing::gather_rows(k, chunks, length),
                 lv = da::testing::gather_rows(v, chunks, length),
                 lo = da::testing::gather_rows(out, chunks, length),
                 ld = da::testing::gather_rows(d_out, chunks, length);
  da::Shape local = s;
  local.seq_len = length;
  Tensor<double> grads[3] = {
      {local, s.num_heads}, {local, s.num_kv_heads}, {local, s.num_kv_heads}};
  da::ring::Options options;
  options.layout = c.layout;
  const da::ring::Stats stats = da::ring::backward<double>(
      config, s, transport, {lq.view(), lk.view(), lv.view()}, {lo.view(), local_lse.data()},
      ld.view(), {grads[0].view(), grads[1].view(), grads[2].view()}, options);

  double worst = 0.0, worst_reference = 0.0;
  for (int n = 0; n < 3; ++n)
    for (const auto& chunk : chunks)
      for (std::int64_t b = 0; b < s.batch; ++b)
        for (std::int64_t h = 0; h < grads[n].heads; ++h)
          for (std::int64_t gx = chunk.begin; gx < chunk.end; ++gx)
            for (std::int64_t d = 0; d < s.head_dim; ++d) {
              const double got = grads[n].at(b, chunk.local + gx - chunk.begin, h, d);
              worst = std::isnan(got)
                          ? INFINITY
                          : std::fmax(worst, std::fabs(got - single[n].at(b, gx, h, d)));
              worst_reference =
                  std::fmax(worst_reference, std::fabs(got - reference[n].at(b, gx, h, d)));
            }
  long long moved[2] = {static_cast<long long>(stats.gradient_bytes_sent),
                        static_cast<long long>(stats.gradient_bytes_received)};
  long long totals[2] = {0, 0};
  MPI_Allreduce(moved, totals, 2, MPI_LONG_LONG, MPI_SUM, MPI_COMM_WORLD);
  const bool ok = worst <= 1e-12 && worst_reference <= 1e-12 && totals[0] == totals[1] &&
                  stats.gradient_bytes_received == stats.bytes_sent;
  std::printf(
      "rank %d/%d %-22s backward max|d(dQ,dK,dV)| %.2e vs reference %.2e K/V out %lld B, partials "
      "back %lld B %s\n",
      transport.rank(), transport.size(), c.name, worst, worst_reference,
      static_cast<long long>(stats.bytes_sent),
      static_cast<long long>(stats.gradient_bytes_received), ok ? "ok" : "MISMATCH");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int failures = 0;
  try {
    da::ring::MpiTransport transport(MPI_COMM_WORLD);
    // N = 48: shards of 24, 16, 12 for P = 2, 3, 4 (zigzag: chunks of 12, 8, 6).
    const std::vector<Case> cases = {
        {"below_and_above", make_config({8, 20, 48}, {1, 2, 4}), {2, 48, 4, 2, 8}},
        {"causal_not_multiple", make_config({7, 30}, {2, 3}, true), {1, 48, 4, 4, 8}},
        {"blocked_mean",
         make_config({12, 24, 64}, {2, 3, 4}, true, Rule::blocked, Mix::mean),
         {1, 48, 6, 3, 8}},
        {"partitioned_mean",
         make_config({16, 48}, {1, 2}, false, Rule::partitioned, Mix::mean),
         {1, 48, 4, 2, 8}},
        {"zigzag_causal",
         make_config({8, 20, 48}, {1, 2, 4}, true),
         {2, 48, 4, 2, 8},
         da::ring::Layout::zigzag},
        {"zigzag_blocked_mean",
         make_config({12, 24, 64}, {2, 3, 4}, false, Rule::blocked, Mix::mean),
         {1, 48, 6, 3, 8},
         da::ring::Layout::zigzag},
    };
    for (const Case& c : cases) failures += check(c, transport);
    for (const Case& c : cases) failures += check_backward(c, transport);

    namespace dt = da::testing;
    const dt::FaultProblem small, big(true);
    struct Scenario {
      dt::Fault fault;
      int faulty;
      const dt::FaultProblem* problem_ = nullptr;
      dt::Call call = dt::Call::forward;
    };
    const auto backward = dt::Call::backward;
    const int last = transport.size() - 1;
    const std::vector<Scenario> scenarios = {
        {dt::Fault::causal, last},
        {dt::Fault::segments, last},
        {dt::Fault::head_dim, last},
        {dt::Fault::null_q, last},
        {dt::Fault::null_q, 0},
        {dt::Fault::throw_mid_forward, last},
        {dt::Fault::throw_mid_forward, 0},
        {dt::Fault::throw_mid_forward, last, &big},
        {dt::Fault::throw_mid_forward, 0, &big},
        {dt::Fault::throw_at_first_post, last, &big},
        {dt::Fault::throw_at_first_post, 0, &big},
        {dt::Fault::throw_in_progress, last, &big},
        {dt::Fault::causal, last, nullptr, backward},
        {dt::Fault::null_lse, last, nullptr, backward},
        {dt::Fault::null_lse, 0, nullptr, backward},
        {dt::Fault::other_operation, last, nullptr, backward},
        {dt::Fault::throw_mid_forward, last, &big, backward},
        {dt::Fault::throw_mid_forward, 0, &big, backward},
        {dt::Fault::throw_returning_gradients, last, nullptr, backward},
        {dt::Fault::throw_returning_gradients, 0, &big, backward},
        {dt::Fault::throw_at_first_post, last, &big, backward}};
    for (const Scenario& scenario : scenarios) {
      const dt::FaultProblem& problem = scenario.problem_ != nullptr ? *scenario.problem_ : small;
      const dt::Outcome failed = dt::run_fault_call(problem, transport, scenario.fault,
                                                    scenario.faulty, {}, scenario.call);
      const dt::Outcome after = dt::run_fault_call(problem, transport, dt::Fault::none,
                                                   scenario.faulty, {}, scenario.call);
      const std::string verdict =
          dt::judge(failed, scenario.fault, scenario.faulty, transport.rank());
      const std::string verdict_after =
          dt::judge(after, dt::Fault::none, scenario.faulty, transport.rank());
      std::printf(
          "rank %d/%d %s N=%lld fault %-18s on rank %d: %s in %.3f s (%s)%s; next call max error "
          "%.2e %s\n",
          transport.rank(), transport.size(), scenario.call == backward ? "backward" : "forward",
          static_cast<long long>(problem.shape.seq_len), dt::fault_name(scenario.fault),
          scenario.faulty, dt::kind_name(failed.kind), failed.seconds, failed.message.c_str(),
          verdict.empty() ? "" : (" MISMATCH: " + verdict).c_str(), after.max_error,
          verdict_after.empty() ? "ok" : ("MISMATCH: " + verdict_after).c_str());
      failures += verdict.empty() ? 0 : 1;
      failures += verdict_after.empty() ? 0 : 1;
    }
    // Sends MPI could not cancel (a rendezvous whose receiver had given up) wait here, buffers
    // alive, until MPI completes them or the transport ends.
    std::printf("rank %d/%d transfers parked after the fault scenarios: %zu\n", transport.rank(),
                transport.size(), transport.parked());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ring_mpi_test: %s\n", e.what());
    failures += 1;
  }
  int any = 0;
  MPI_Allreduce(&failures, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any == 0 ? 0 : 1;
}
