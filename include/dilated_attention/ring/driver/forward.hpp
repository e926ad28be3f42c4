#pragma once
// The ring driver: rank p of P computes its shard's rows of the single-device forward, fetching
// from other ranks only the K/V rows its queries attend to. Generic over the compute back end
// (ring/cpu/forward_backend.hpp on the CPU; a CUDA back end provides the same members on device memory)
// and over the transport (ring/transport/transport.hpp, ring/mpi.hpp, ring/nccl.cuh). This header needs
// neither Eigen nor CUDA, so nvcc translation units include it as they are; the CPU entry point
// ring::forward is in ring/cpu/forward.hpp.
//
// Per forward:
//   1. the ranks agree (ring/driver/agreement.hpp): every rank validates, then one small all_gather;
//   2. fetch the StepPlan of every (step, branch, offset) from the pattern cache;
//   3. post every non-empty exchange at once (Options::post_early; nearest peers first), compute
//      the local blocks, then each step's blocks as its rows arrive, calling the transport's
//      progress() between blocks (Options::drive_progress) so transfers move during compute;
//   4. a second all_gather of the ranks' verdicts, then mix the partials into O and LSE.
// Exception safety: every posted transfer is owned by detail::Transfers (ring/driver/exchange.hpp),
// which on any exit has either waited for it or hands it to Transport::abandon with its buffer,
// so no buffer is freed while MPI or NCCL may still touch it, and the transport serves the next
// call. The message layout is exchange.hpp's; no header travels.
// A back end whose buffers live in device memory (ring/cuda/forward_backend.cuh) declares
// `stream_ordered` (exchange.hpp): its pack and attend_merge calls only record work, launched per
// step on one stream; the driver then orders transfers on that stream (Transport::
// order_sends_after in post_rows, Transport::enqueue_wait before a step's blocks) instead of
// blocking the host per step, waits for the still-open receives at the end of the call, and
// hands finished buffers to the back end's retire() (freed after its stream) instead of freeing
// them under kernels that may still read them. The CPU back end keeps the plain path.

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../../config.hpp"
#include "../../pattern.hpp"
#include "exchange.hpp"
#include "options.hpp"
#include "pattern_cache.hpp"
#include "../transport/transport.hpp"

namespace dilated_attention::ring {

// Runs the ring on an existing back end. Pattern, plans and layouts are host-side; the back end
// owns every tensor buffer. Call only after validation (ring::forward does it).
template <class Backend>
Stats run_ring_forward(const Config& config, const Shape& global, Transport& transport,
                       Backend& backend, PatternCache& cache, const CommonOptions& options = {}) {
  using Buffer = typename Backend::Buffer;
  const detail::CallSchedule schedule(config, global, transport.size(), transport.rank(), cache,
                                      options.layout);
  const Pattern& pattern = schedule.pattern();
  const std::int64_t num_ranks = transport.size();
  const bool mean = config.mixing == Mixing::mean;
  constexpr bool stream_ordered = detail::is_stream_ordered<Backend>::value;

  Stats stats;
  stats.bytes_sent_per_branch.assign(static_cast<std::size_t>(pattern.num_branches()), 0);
  detail::Transfers<Buffer> transfers(transport, stats);
  detail::ProgressTicker tick(transport, options.drive_progress, stats);

  // Each step's buffers live in `transfers`, which abandons them on any exit.
  std::vector<detail::RowExchange> steps(static_cast<std::size_t>(num_ranks));
  const auto post = [&](std::int64_t t) {
    detail::post_rows(t, schedule, backend, transfers, transport, stats,
                      steps[static_cast<std::size_t>(t)]);
  };

  // Every block of step t, for every (batch, query head), merged into the back end's
  // accumulators (one per branch for mean mixing), in the schedule's fixed order.
  const auto compute = [&](std::int64_t t) {
    const detail::RowExchange* step = t == 0 ? nullptr : &steps[static_cast<std::size_t>(t)];
    if (step != nullptr && !step->receiving()) return;
    const std::int64_t blocks = schedule.block_count(t);
    if (blocks == 0) return;
    stats.blocks_computed += blocks;
    const Buffer* received = step == nullptr ? nullptr : &transfers.buffer(step->recv);
    backend.for_each_head([&](std::int64_t b, std::int64_t h, typename Backend::Workspace& ws) {
      const std::int64_t g = pattern.kv_head(h);
      schedule.for_each_block(
          t, b, h, step == nullptr ? nullptr : &step->incoming,
          [&](std::int64_t i, const BlockPair& block, const detail::Piece* piece) {
            backend.attend_merge(ws, mean ? i : 0, b, h, g, block.queries, block.keys,
                                 piece ? received : nullptr, piece ? piece->element_offset : 0);
            tick();
          });
    });
    tick.rethrow();
  };
  // Step t's rows must be in place before its blocks run: on a device stream the stream waits
  // (the receive stays open until close_receive), otherwise the host does.
  const auto finish_receive = [&](std::int64_t t) {
    const detail::RowExchange& step = steps[static_cast<std::size_t>(t)];
    if (!step.receiving()) return;
    if constexpr (stream_ordered) {
      if (transfers.enqueue_wait(step.recv, backend.queue())) return;
    }
    transfers.wait(step.recv);
  };
  // A buffer no transfer uses any more: freed, or (device) retired until the stream is done.
  const auto release = [&](std::size_t id) {
    if constexpr (stream_ordered)
      backend.retire(transfers.take(id));
    else
      transfers.release(id);
  };
  const auto close_receive = [&](std::int64_t t) {
    const detail::RowExchange& step = steps[static_cast<std::size_t>(t)];
    if (!step.receiving()) return;
    if (transfers.is_open(step.recv)) transfers.wait(step.recv);
    release(step.recv);
  };
  const auto compute_and_release = [&](std::int64_t t) {
    compute(t);
    const detail::RowExchange& step = steps[static_cast<std::size_t>(t)];
    if (step.receiving() && !transfers.is_open(step.recv)) release(step.recv);
  };
  const auto finish_send = [&](std::int64_t t) {
    const detail::RowExchange& step = steps[static_cast<std::size_t>(t)];
    if (!step.sending()) return;
    transfers.wait(step.send);
    release(step.send);
  };

  const std::vector<std::int64_t> order = schedule.step_order();
  if (options.post_early) {
    // Every exchange at once; then the local blocks, then each step as its rows arrive, in that
    // same fixed order (deterministic merges).
    for (const std::int64_t t : order) post(t);
    compute(0);
    for (const std::int64_t t : order) {
      finish_receive(t);
      compute_and_release(t);
    }
    for (const std::int64_t t : order) {
      close_receive(t);
      finish_send(t);
    }
  } else {
    // One step ahead, in step order (the first version).
    if (num_ranks > 1) post(1);
    compute(0);
    for (std::int64_t t = 1; t < num_ranks; ++t) {
      finish_receive(t);
      if (t + 1 < num_ranks) post(t + 1);
      compute_and_release(t);
      close_receive(t);
      finish_send(t);
    }
  }
  return stats;
}

}  // namespace dilated_attention::ring
