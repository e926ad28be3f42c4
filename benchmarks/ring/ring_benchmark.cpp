// Ring forward and backward over MPI (CPU ranks) against the single-process forward on the same
// total problem. Run through benchmarks/ring/ring_benchmark.sh, which launches P = 1, 2, 4. Prints, per
// branch, the bytes each rank sent next to the closed-form count and to what a ring of whole
// shards would send, and the wall time (slowest rank, best of the repeats); then the same for the
// ring backward (the K/V rows out and the dK/dV partials back, which must equal them).
//
// Usage: mpiexec -n P ring_benchmark [N H D causal repeats overlap]   defaults: 16384 8 64 1 3 1
// overlap = 1: every exchange posted up front and MPI progress driven between compute blocks
// (the default Options); 0: one step ahead and no progress calls (the first version). Both print
// each rank's time blocked in Transport::wait (Stats::wait_seconds) for the best repeat.
// Branches: LongNet's doubling segments and rates, w = 2048 * 2^i, r = 2^i, up to w = N.

#include <mpi.h>

#include <dilated_attention/dilated_attention.hpp>
#include <dilated_attention/ring.hpp>
#include <dilated_attention/ring/mpi.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace da = dilated_attention;

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int wrong = 0;  // this rank saw a wrong result: every rank then exits non-zero
  {
    da::ring::MpiTransport transport(MPI_COMM_WORLD);
    const int rank = transport.rank(), num_ranks = transport.size();
    const std::int64_t n = argc > 1 ? std::atoll(argv[1]) : 16384;
    const std::int64_t heads = argc > 2 ? std::atoll(argv[2]) : 8;
    const std::int64_t dim = argc > 3 ? std::atoll(argv[3]) : 64;
    const bool causal = argc > 4 ? std::atoi(argv[4]) != 0 : true;
    const int repeats = argc > 5 ? std::atoi(argv[5]) : 3;
    const bool overlap = argc > 6 ? std::atoi(argv[6]) != 0 : true;
    da::ring::Options ring_options;
    ring_options.post_early = overlap;
    ring_options.drive_progress = overlap;

    da::Config config;
    config.causal = causal;
    for (std::int64_t w = 2048, r = 1; w <= n; w *= 2, r *= 2) {
      config.segment_lengths.push_back(w);
      config.dilation_rates.push_back(r);
    }
    const da::Shape global{1, n, heads, heads, dim};
    const std::int64_t length = n / num_ranks;
    da::Shape local = global;
    local.seq_len = length;

    // Each rank generates only its shard (rank-seeded); the single-process run generates all.
    const std::size_t shard_elements = static_cast<std::size_t>(length * heads * dim);
    std::vector<float> q(shard_elements), k(shard_elements), v(shard_elements), out(shard_elements);
    std::vector<float> lse(static_cast<std::size_t>(heads * length));
    std::mt19937 engine(static_cast<unsigned>(1234 + rank));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (auto* tensor : {&q, &k, &v})
      for (float& x : *tensor) x = normal(engine);

    da::ring::Stats stats, best_stats;
    double best = 1e300;
    for (int repeat = 0; repeat < repeats; ++repeat) {
      MPI_Barrier(MPI_COMM_WORLD);
      const double start = MPI_Wtime();
      stats = da::ring::forward<float>(config, global, transport,
                                       {da::contiguous_view<const float>(q.data(), local, heads),
                                        da::contiguous_view<const float>(k.data(), local, heads),
                                        da::contiguous_view<const float>(v.data(), local, heads)},
                                       {da::contiguous_view(out.data(), local, heads), lse.data()},
                                       ring_options);
      const double mine = MPI_Wtime() - start;
      double slowest = 0.0;
      MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
      if (slowest < best) best_stats = stats;
      best = std::min(best, slowest);
    }

    // Closed form (MHA, modular offsets, r | H, r | L, w a multiple of L or dividing it): per
    // branch and per peer sharing a segment (a later one when causal), 2 (K and V) x H x L / r
    // rows of D floats; a ring of whole shards sends 2 x H x L x D floats to each of P - 1 peers.
    if (rank == 0)
      std::printf(
          "P=%d N=%lld H=%lld D=%lld causal=%d branches=%zu overlap=%d best of %d: %.3f s\n",
          num_ranks, static_cast<long long>(n), static_cast<long long>(heads),
          static_cast<long long>(dim), causal ? 1 : 0, config.segment_lengths.size(),
          overlap ? 1 : 0, repeats, best);
    for (int p = 0; p < num_ranks; ++p) {
      MPI_Barrier(MPI_COMM_WORLD);
      if (p == rank)
        std::printf("  rank %d blocked in waits %.3f s (best repeat), progress calls %lld\n", rank,
                    best_stats.wait_seconds, static_cast<long long>(best_stats.progress_calls));
      std::fflush(stdout);
    }
    for (int p = 0; p < num_ranks; ++p) {
      MPI_Barrier(MPI_COMM_WORLD);
      if (p != rank) continue;
      long long total = 0, analytical_total = 0, whole_total = 0;
      for (std::size_t i = 0; i < config.segment_lengths.size(); ++i) {
        const std::int64_t w = config.segment_lengths[i], r = config.dilation_rates[i];
        const std::int64_t per_segment = std::max<std::int64_t>(w / length, 1);
        const std::int64_t first = (rank / per_segment) * per_segment;
        const std::int64_t peers = causal ? first + per_segment - 1 - rank : per_segment - 1;
        const long long analytical =
            static_cast<long long>(peers * 2 * heads * (length / r) * dim * 4);
        const long long whole =
            static_cast<long long>((num_ranks - 1) * 2 * heads * length * dim * 4);
        const long long sent = static_cast<long long>(stats.bytes_sent_per_branch[i]);
        std::printf(
            "  rank %d branch (w=%lld, r=%lld): sent %lld B, analytical %lld B, whole-shard ring "
            "%lld B%s\n",
            rank, static_cast<long long>(w), static_cast<long long>(r), sent, analytical, whole,
            sent == analytical ? "" : "  <-- differs");
        total += sent;
        analytical_total += analytical;
        whole_total += whole;
      }
      std::printf(
          "  rank %d total: sent %lld B (%.2f MiB), analytical %lld B, whole-shard ring %lld B "
          "(%.2f MiB); "
          "received %lld B; sends %lld posted %lld skipped\n",
          rank, total, total / 1048576.0, analytical_total, whole_total, whole_total / 1048576.0,
          static_cast<long long>(stats.bytes_received), static_cast<long long>(stats.sends_posted),
          static_cast<long long>(stats.sends_skipped));
      std::fflush(stdout);
    }

    // The ring backward of the same problem, from the last forward's O and LSE.
    {
      std::vector<float> d_out(shard_elements), d_q(shard_elements), d_k(shard_elements),
          d_v(shard_elements);
      for (float& x : d_out) x = normal(engine);
      da::ring::Stats backward_stats, best_backward_stats;
      double best_backward = 1e300;
      for (int repeat = 0; repeat < repeats; ++repeat) {
        MPI_Barrier(MPI_COMM_WORLD);
        const double start = MPI_Wtime();
        backward_stats = da::ring::backward<float>(
            config, global, transport,
            {da::contiguous_view<const float>(q.data(), local, heads),
             da::contiguous_view<const float>(k.data(), local, heads),
             da::contiguous_view<const float>(v.data(), local, heads)},
            {da::contiguous_view<const float>(out.data(), local, heads), lse.data()},
            da::contiguous_view<const float>(d_out.data(), local, heads),
            {da::contiguous_view(d_q.data(), local, heads),
             da::contiguous_view(d_k.data(), local, heads),
             da::contiguous_view(d_v.data(), local, heads)},
            ring_options);
        const double mine = MPI_Wtime() - start;
        double slowest = 0.0;
        MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        if (slowest < best_backward) best_backward_stats = backward_stats;
        best_backward = std::min(best_backward, slowest);
      }
      if (rank == 0)
        std::printf("backward P=%d best of %d: %.3f s (%.2fx the forward)\n", num_ranks, repeats,
                    best_backward, best_backward / best);
      for (int p = 0; p < num_ranks; ++p) {
        MPI_Barrier(MPI_COMM_WORLD);
        if (p == rank)
          std::printf(
              "  rank %d backward: blocked in waits %.3f s, progress calls %lld, K/V out %lld B, "
              "dK/dV partials back %lld B (%s the K/V out), partials sent %lld B\n",
              rank, best_backward_stats.wait_seconds,
              static_cast<long long>(best_backward_stats.progress_calls),
              static_cast<long long>(backward_stats.bytes_sent),
              static_cast<long long>(backward_stats.gradient_bytes_received),
              backward_stats.gradient_bytes_received == backward_stats.bytes_sent
                  ? "equal to"
                  : "DIFFERENT FROM",
              static_cast<long long>(backward_stats.gradient_bytes_sent));
        std::fflush(stdout);
      }
      // A figure of a wrong run is no figure: the partials back must be exactly the rows sent
      // (float: the accumulator is the storage type), and every output finite.
      if (backward_stats.gradient_bytes_received != backward_stats.bytes_sent) wrong = 1;
      for (const std::vector<float>* tensor : {&out, &d_q, &d_k, &d_v})
        for (const float x : *tensor)
          if (!std::isfinite(x)) wrong = 1;
    }

    // The single-process forward of the same total problem, once per launch, on rank 0.
    if (rank == 0 && num_ranks == 1) {
      for (const int threads : {1, 2}) {
        da::CpuOptions options;
        options.num_threads = threads;
        double single_best = 1e300;
        for (int repeat = 0; repeat < repeats; ++repeat) {
          const double start = MPI_Wtime();
          da::forward<float>(config, global,
                             {da::contiguous_view<const float>(q.data(), global, heads),
                              da::contiguous_view<const float>(k.data(), global, heads),
                              da::contiguous_view<const float>(v.data(), global, heads)},
                             {da::contiguous_view(out.data(), global, heads), lse.data()}, options);
          single_best = std::min(single_best, MPI_Wtime() - start);
        }
        std::printf("single-process dilated_attention::forward, %d thread(s), best of %d: %.3f s\n",
                    threads, repeats, single_best);
        std::vector<float> d_out(out.size()), d_q(out.size()), d_k(out.size()), d_v(out.size());
        std::mt19937 gradient_engine(99);
        for (float& x : d_out) x = normal(gradient_engine);
        double backward_best = 1e300;
        for (int repeat = 0; repeat < repeats; ++repeat) {
          const double start = MPI_Wtime();
          da::backward<float>(
              config, global,
              {da::contiguous_view<const float>(q.data(), global, heads),
               da::contiguous_view<const float>(k.data(), global, heads),
               da::contiguous_view<const float>(v.data(), global, heads)},
              {da::contiguous_view<const float>(out.data(), global, heads), lse.data()},
              da::contiguous_view<const float>(d_out.data(), global, heads),
              {da::contiguous_view(d_q.data(), global, heads),
               da::contiguous_view(d_k.data(), global, heads),
               da::contiguous_view(d_v.data(), global, heads)},
              options);
          backward_best = std::min(backward_best, MPI_Wtime() - start);
        }
        std::printf(
            "single-process dilated_attention::backward, %d thread(s), best of %d: %.3f s\n",
            threads, repeats, backward_best);
      }
    }
  }
  int any_wrong = 0;
  MPI_Allreduce(&wrong, &any_wrong, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (any_wrong != 0)
    std::fprintf(stderr, "ring_benchmark: a rank saw a wrong result (see above)\n");
  MPI_Finalize();
  return any_wrong == 0 ? 0 : 1;
}
