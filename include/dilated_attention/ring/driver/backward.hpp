#pragma once
// The ring backward driver (docs/semantics.md "The gradient"): rank p of P computes exactly its rows of dQ and
// its shard's rows of dK and dV of the single-device backward. Generic over the compute back end
// (ring/cpu/backward_backend.hpp on the CPU) and the transport; needs neither Eigen nor CUDA.
// The CPU entry point ring::backward is in ring/cpu/backward.hpp.
//
// The schedule is the forward's (ring/driver/schedule.hpp): at step t a rank receives, from rank p - t,
// the same K/V rows the forward received, and its queries meet them in the same blocks. What is
// new is the way back: the dK/dV partials of the received rows are sent back to their owner in
// the received message's layout (tag 1), and the owner adds them to its own. So the K/V rows
// travel out once and their gradients travel back once, along the dilation-aware schedule; no
// whole shard ever moves.
//
// Per backward:
//   1. the ranks agree (ring/driver/agreement.hpp), as in the forward;
//   2. post every K/V exchange (Options::post_early; nearest peers first);
//   3. row statistics. softmax: D = dO·O from the rank's own rows; the forward's LSE is global
//      already. mean: every branch's LSE_i and D_i over keys on several ranks: a statistics pass
//      over all steps' blocks, merged per row like partial outputs (one forward's work extra),
//      where the back end recomputes (recomputes_statistics(); the CPU back end only when some
//      head has rows in several branches, else mean takes softmax's statistics);
//   4. the gradient pass: half of the local blocks, then each step's blocks as its rows arrive
//      (dQ and the local dK/dV accumulate in the back end; the received rows' dK/dV go to a
//      partial buffer), each step's partials going back to their owner while the next step
//      computes, then the other half of the local blocks while the last partials travel;
//   5. each returned partial is added, in the fixed step order; a second all_gather of the
//      verdicts; the gradients are written.
// Every gradient row is summed by one thread in a fixed order (its local blocks, before or after
// the steps by a fixed split of the (batch, kv head) pairs, each step's blocks, then the returned
// partials in step order): bitwise reproducible for any thread count.
// Exception safety as in the forward: every buffer lives in a detail::Transfers.
// A stream-ordered back end (ring/cuda/backward_backend.cuh; see ring/driver/forward.hpp) gets the
// forward's hooks at the equivalent points: a step's rows and the returned partials are waited
// for on the stream (Transport::enqueue_wait) before the blocks or add_returned that read them,
// a step's partials are sent after the kernels that wrote them (Transport::order_sends_after),
// returned partials land in buffers no stream operation zeroes (make_receive_buffer), the
// returned pieces are added by one flush_returned(), and finished buffers are retired, not freed.

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

// Runs the ring backward on an existing back end. Call only after validation (ring::backward).
template <class Backend>
Stats run_ring_backward(const Config& config, const Shape& global, Transport& transport,
                        Backend& backend, PatternCache& cache, const CommonOptions& options = {}) {
  using Buffer = typename Backend::Buffer;
  using GradientBuffer = typename Backend::GradientBuffer;
  const detail::CallSchedule schedule(config, global, transport.size(), transport.rank(), cache,
                                      options.layout);
  const Pattern& pattern = schedule.pattern();
  const std::int64_t num_ranks = transport.size();
  const std::int64_t group = global.num_heads / global.num_kv_heads;
  // mean mixing with a head whose rows several branches select: each branch's LSE_i and D_i
  // are recomputed over every step's blocks (the back end decides; docs/semantics.md "Gradient
  // of the mean mixing").
  const bool recompute = backend.recomputes_statistics();
  constexpr bool stream_ordered = detail::is_stream_ordered<Backend>::value;

  Stats stats;
  stats.bytes_sent_per_branch.assign(static_cast<std::size_t>(pattern.num_branches()), 0);
  detail::Transfers<Buffer> rows(transport, stats);
  detail::Transfers<GradientBuffer> partials(transport, stats);
  detail::ProgressTicker tick(transport, options.drive_progress, stats);

  struct Step {
    detail::RowExchange exchange;
    std::size_t partial_send = 0, partial_recv = 0;  // ids in `partials`
  };
  std::vector<Step> steps(static_cast<std::size_t>(num_ranks));
  const auto post = [&](std::int64_t t) {
    detail::post_rows(t, schedule, backend, rows, transport, stats,
                      steps[static_cast<std::size_t>(t)].exchange);
  };

  // visit(workspace, branch, b, h, g, block, received buffer or null, element offset) for every
  // block of step t of the (batch, kv head) pairs [first, last), each pair on one thread, its
  // query heads in ascending order.
  const std::int64_t pairs = global.batch * global.num_kv_heads;
  const auto for_each_block = [&](std::int64_t t, const auto& visit, std::int64_t first = 0,
                                  std::int64_t last = -1) {
    if (last < 0) last = pairs;
    const detail::RowExchange* step =
        t == 0 ? nullptr : &steps[static_cast<std::size_t>(t)].exchange;
    if (first >= last || (step != nullptr && !step->receiving())) return;
    const std::int64_t blocks = schedule.block_count(t);  // over every pair: count it once
    if (blocks == 0) return;
    if (first == 0) stats.blocks_computed += blocks;
    const Buffer* received = step == nullptr ? nullptr : &rows.buffer(step->recv);
    backend.for_each_kv_head(
        first, last, [&](std::int64_t b, std::int64_t g, typename Backend::Workspace& ws) {
          for (std::int64_t h = g * group; h < (g + 1) * group; ++h)
            schedule.for_each_block(
                t, b, h, step == nullptr ? nullptr : &step->incoming,
                [&](std::int64_t i, const BlockPair& block, const detail::Piece* piece) {
                  visit(ws, i, b, h, g, block, piece ? received : nullptr,
                        piece ? piece->element_offset : 0);
                  tick();
                });
        });
    tick.rethrow();
  };
  const auto receive_rows = [&](std::int64_t t) {
    const detail::RowExchange& step = steps[static_cast<std::size_t>(t)].exchange;
    if (!step.receiving()) return;
    if constexpr (stream_ordered) {
      if (rows.enqueue_wait(step.recv, backend.queue())) return;
    }
    rows.wait(step.recv);
  };
  // A buffer no transfer uses any more: freed, or (device) retired until the stream is done;
  // a transfer still open (waited for on the stream only) is waited for first.
  const auto release = [&](auto& transfers, std::size_t id) {
    if constexpr (stream_ordered) {
      if (transfers.is_open(id)) transfers.wait(id);
      backend.retire(transfers.take(id));
    } else {
      transfers.release(id);
    }
  };

  // post_early: every exchange at once, steps computed nearest first; otherwise one step ahead in
  // step order (as the forward). Both passes visit the steps in this one order.
  std::vector<std::int64_t> order = schedule.step_order();
  if (!options.post_early)
    for (std::int64_t t = 1; t < num_ranks; ++t) order[static_cast<std::size_t>(t - 1)] = t;
  const auto begin_posting = [&] {
    if (options.post_early) {
      for (const std::int64_t t : order) post(t);
    } else if (num_ranks > 1) {
      post(1);
    }
  };
  const auto arrive = [&](std::int64_t t) {  // the rows of step t are in; post the next
    receive_rows(t);
    if (!options.post_early && t + 1 < num_ranks) post(t + 1);
  };

  // Row statistics.
  begin_posting();
  if (recompute) {
    const auto statistics = [&](auto& ws, std::int64_t i, std::int64_t b, std::int64_t h,
                                std::int64_t g, const BlockPair& block, const Buffer* received,
                                std::size_t offset) {
      backend.statistics(ws, i, b, h, g, block.queries, block.keys, received, offset);
    };
    for_each_block(0, statistics);
    for (const std::int64_t t : order) {
      arrive(t);
      for_each_block(t, statistics);
    }
  } else {
    backend.local_statistics();
  }

  // The gradient pass; each step's partials go back as soon as they are complete, and the
  // partials of this rank's own rows are received from the peer it sent them to (tag 1, one
  // message per ordered pair per call). With post_early, the local blocks of the first half of
  // the (batch, kv head) pairs run first (while rows arrive) and those of the second half last
  // (while the last partials travel): a fixed split, so the order stays deterministic.
  const auto local_gradient = [&](auto& ws, std::int64_t i, std::int64_t b, std::int64_t h,
                                  std::int64_t g, const BlockPair& block, const Buffer*,
                                  std::size_t) {
    backend.gradient(ws, i, b, h, g, block.queries, block.keys, nullptr, 0, nullptr);
  };
  const std::int64_t early_pairs = options.post_early && num_ranks > 1 ? (pairs + 1) / 2 : pairs;
  for_each_block(0, local_gradient, 0, early_pairs);
  for (const std::int64_t t : order) {
    Step& step = steps[static_cast<std::size_t>(t)];
    if (!recompute) arrive(t);
    GradientBuffer* partial = nullptr;
    if (step.exchange.receiving()) {
      step.partial_send = partials.add(backend.make_gradient_buffer(step.exchange.recv_elements));
      partial = &partials.buffer(step.partial_send);
    }
    for_each_block(t, [&](auto& ws, std::int64_t i, std::int64_t b, std::int64_t h, std::int64_t g,
                          const BlockPair& block, const Buffer* received, std::size_t offset) {
      backend.gradient(ws, i, b, h, g, block.queries, block.keys, received, offset, partial);
    });
    if (step.exchange.receiving() && !rows.is_open(step.exchange.recv))
      release(rows, step.exchange.recv);
    const std::size_t send_bytes = step.exchange.recv_elements * Backend::gradient_element_size();
    const std::size_t recv_bytes = step.exchange.send_elements * Backend::gradient_element_size();
    if (step.exchange.sending()) {
      if constexpr (stream_ordered)
        step.partial_recv = partials.add(backend.make_receive_buffer(step.exchange.send_elements));
      else
        step.partial_recv = partials.add(backend.make_gradient_buffer(step.exchange.send_elements));
    }
    if constexpr (stream_ordered) {  // the partials are sent after the kernels that wrote them,
      // received after their buffer's stream-ordered allocation
      if (step.exchange.receiving() || step.exchange.sending()) {
        const bool ordered = transport.order_sends_after(backend.queue());
        if (step.exchange.receiving() && !ordered) backend.synchronize();
      }
    }
    transport.begin_group();
    if (step.exchange.sending())
      partials.post_recv(step.partial_recv, schedule.peer(t, true), 1,
                         Backend::gradient_bytes(partials.buffer(step.partial_recv)), recv_bytes);
    if (step.exchange.receiving())
      partials.post_send(step.partial_send, schedule.peer(t, false), 1,
                         Backend::gradient_bytes(partials.buffer(step.partial_send)), send_bytes);
    transport.end_group();
    stats.gradient_bytes_sent += static_cast<std::int64_t>(send_bytes);
    stats.gradient_bytes_received += static_cast<std::int64_t>(recv_bytes);
    stats.gradient_sends += step.exchange.receiving() ? 1 : 0;
    stats.gradient_recvs += step.exchange.sending() ? 1 : 0;
  }

  for_each_block(0, local_gradient, early_pairs, pairs);

  // The returned partials of this rank's rows, in the fixed step order, then the sends.
  for (const std::int64_t t : order) {
    Step& step = steps[static_cast<std::size_t>(t)];
    if (!step.exchange.sending()) continue;
    bool on_stream = false;
    if constexpr (stream_ordered)
      on_stream = partials.enqueue_wait(step.partial_recv, backend.queue());
    if (!on_stream) partials.wait(step.partial_recv);
    std::size_t elements = 0;
    for (const detail::Piece& piece : schedule.pieces(t, true, elements))
      backend.add_returned(partials.buffer(step.partial_recv), piece.element_offset, piece.batch,
                           piece.kv_head, piece.rows);
    if constexpr (!stream_ordered) partials.release(step.partial_recv);
  }
  if constexpr (stream_ordered) {
    backend.flush_returned();  // one launch, the pieces in step order
    for (const std::int64_t t : order) {
      Step& step = steps[static_cast<std::size_t>(t)];
      if (step.exchange.sending()) release(partials, step.partial_recv);
      if (step.exchange.receiving() && rows.is_open(step.exchange.recv))
        release(rows, step.exchange.recv);
    }
  }
  for (const std::int64_t t : order) {
    Step& step = steps[static_cast<std::size_t>(t)];
    if (step.exchange.sending()) {
      rows.wait(step.exchange.send);
      release(rows, step.exchange.send);
    }
    if (step.exchange.receiving()) {
      partials.wait(step.partial_send);
      release(partials, step.partial_send);
    }
  }
  return stats;
}

}  // namespace dilated_attention::ring
