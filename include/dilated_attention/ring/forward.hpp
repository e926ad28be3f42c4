#pragma once
// The ring driver: rank p of P computes its shard's rows of the single-device forward, fetching
// from other ranks only the K/V rows its queries attend to. Generic over the compute back end
// (ring/cpu_backend.hpp on the CPU; a CUDA back end provides the same members on device memory)
// and over the transport (ring/transport.hpp, ring/mpi.hpp, ring/nccl.cuh). This header needs
// neither Eigen nor CUDA, so nvcc translation units include it as they are; the CPU entry point
// ring::forward is in ring/cpu_forward.hpp.
//
// Per forward:
//   1. the ranks agree (ring/agreement.hpp): every rank validates, then one small all_gather;
//   2. fetch the StepPlan of every (step, branch, offset) from the pattern cache;
//   3. post every non-empty exchange at once (Options::post_early; nearest peers first), compute
//      the local blocks, then each step's blocks as its rows arrive, calling the transport's
//      progress() between blocks (Options::drive_progress) so transfers move during compute;
//   4. a second all_gather of the ranks' verdicts, then mix the partials into O and LSE.
// A back end whose buffers live in device memory (ring/cuda_backend.cuh) says so with
// `static constexpr bool stream_ordered = true` and provides queue(), flush_packs(), synchronize()
// and retire(Buffer&&): its pack and attend_merge calls only record work, which it launches per
// step on one stream; the driver then orders transfers on that stream (Transport::
// order_sends_after, enqueue_wait) instead of blocking the host per step, and hands finished
// buffers to retire() (freed at the end of the call, after the stream) instead of freeing them
// under kernels that may still read them. The CPU back end keeps the plain path.
// Exception safety: every posted transfer is owned by a guard that, on any exit, either has
// waited for it or hands it to Transport::abandon with its buffer, so no buffer is freed while
// MPI or NCCL may still touch it, and the transport serves the next call.
// A step's message is the concatenation, over branch, offset, kv head and batch, of the K rows
// then the V rows of the plan's progression. Sender and receiver derive the same layout from the
// same plans, so no header travels and the byte counts are known in advance.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../pattern.hpp"
#include "pattern_cache.hpp"
#include "schedule.hpp"
#include "agreement.hpp"
#include "layout.hpp"
#include "transport.hpp"

namespace dilated_attention::ring {

struct Options {
  PatternCache* cache = nullptr;  // nullptr: default_pattern_cache()
  int num_threads = 1;  // compute threads of this rank (ranks are often threads already)
  // The longest a rank blocks on one transfer or on the agreement before it raises
  // TransferTimeout (docs/ring.md, "Failures": what the other ranks see).
  Transport::Duration timeout = std::chrono::minutes(5);
  // Overlap. post_early: post every non-empty exchange before computing anything (false: one
  // step ahead, in step order, as the first version did). drive_progress: call the transport's
  // progress() between compute blocks. Both only change timing, never the result.
  bool post_early = true;
  bool drive_progress = true;
  // Which global rows this rank's views hold (ring/layout.hpp). Every rank must pass the same.
  Layout layout = Layout::contiguous;
};

// What one rank did in one forward; the tests check these against closed-form counts.
struct Stats {
  std::int64_t bytes_sent = 0, bytes_received = 0;
  std::vector<std::int64_t> bytes_sent_per_branch;  // one entry per branch
  std::int64_t sends_posted = 0, recvs_posted = 0;  // over steps 1..P-1
  std::int64_t sends_skipped = 0, recvs_skipped = 0;
  std::int64_t blocks_computed = 0;  // attend() calls
  double wait_seconds = 0;           // time blocked in Transport::wait
  std::int64_t progress_calls = 0;   // Transport::progress() calls between blocks
};

namespace detail {

// One piece of a step's message: K then V rows of one unit of (branch, offset), kv head, batch.
struct Piece {
  std::int64_t branch, offset, kv_head, batch;
  std::size_t unit;
  Progression rows;
  std::size_t element_offset;  // where its K rows start; V rows follow
};

// Whether Backend runs its work asynchronously on a device stream (see the header comment).
template <class Backend, class = void>
struct is_stream_ordered : std::false_type {};
template <class Backend>
struct is_stream_ordered<Backend, std::void_t<decltype(Backend::stream_ordered)>>
    : std::bool_constant<Backend::stream_ordered> {};

// The kv heads read by the query heads in `heads`, ascending and distinct.
inline std::vector<std::int64_t> kv_heads_of(const Progression& heads, std::int64_t group) {
  std::vector<std::int64_t> result;
  for (std::int64_t j = 0; j < heads.count; ++j) {
    const std::int64_t g = heads.at(j) / group;
    if (result.empty() || result.back() != g) result.push_back(g);
  }
  return result;
}

}  // namespace detail

// The validation every ring entry point runs first (docs/semantics.md §5), on this rank's input:
// partition, layout, config against the global shape, views against the local shape, options.
// Returns the local shape (seq_len = N / P).
template <class T, class L>
Shape validate_ring_call(const Config& config, const Shape& shape, const Transport& transport,
                         const View<const T>& q, const View<const T>& k, const View<const T>& v,
                         const View<T>& out, const L* lse, const Options& options) {
  validate_partition(shape.seq_len, transport.size(), transport.rank());
  validate_layout(options.layout, shape.seq_len, transport.size());
  validate(config, shape);
  Shape local = shape;
  local.seq_len = shape.seq_len / transport.size();
  validate(config, local, q, k, v, out, lse);
  if (options.num_threads <= 0)
    dilated_attention::detail::reject("options.num_threads = ", options.num_threads, ": must be positive");
  if (options.timeout.count() <= 0)
    dilated_attention::detail::reject("options.timeout = ", options.timeout.count(), " ms: must be positive");
  return local;
}

// Runs the ring on an existing back end. Pattern, plans and layouts are host-side; the back end
// owns every tensor buffer. Call only after validation (ring::forward does it).
template <class Backend>
Stats run_ring(const Config& config, const Shape& global, Transport& transport, Backend& backend,
               PatternCache& cache, const Options& options = {}) {
  const Pattern pattern(config, global);
  const std::int64_t num_ranks = transport.size(), rank = transport.rank();
  const std::int64_t branches = pattern.num_branches();
  const std::int64_t group = global.num_heads / global.num_kv_heads;
  const std::int64_t dim = global.head_dim;
  const bool mean = config.mixing == Mixing::mean;
  constexpr bool stream_ordered = detail::is_stream_ordered<Backend>::value;

  std::vector<std::vector<std::vector<std::int64_t>>> kv_heads(static_cast<std::size_t>(branches));
  for (std::int64_t i = 0; i < branches; ++i) {
    const BranchGeometry g = pattern.branch(i);
    for (std::int64_t o = 0; o < g.r; ++o)
      kv_heads[static_cast<std::size_t>(i)].push_back(
          detail::kv_heads_of(pattern.heads_with_offset(i, o), group));
  }
  const auto plans = step_plans(config, global, num_ranks, rank, cache, options.layout);

  Stats stats;
  stats.bytes_sent_per_branch.assign(static_cast<std::size_t>(branches), 0);

  // The message layout of step t, outgoing (send_rows) or incoming (the received block's keys).
  const auto layout = [&](std::int64_t t, bool outgoing, std::size_t& elements) {
    std::vector<detail::Piece> pieces;
    elements = 0;
    for (std::int64_t i = 0; i < branches; ++i)
      for (std::int64_t o = 0; o < pattern.branch(i).r; ++o) {
        const auto& plan = plans[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)]
                                [static_cast<std::size_t>(o)];
        if (!plan || !(outgoing ? plan->sends() : plan->receives())) continue;
        const std::vector<Progression>& units = outgoing ? plan->send_rows : plan->recv_rows;
        for (std::size_t u = 0; u < units.size(); ++u)
          for (const std::int64_t g : kv_heads[static_cast<std::size_t>(i)][static_cast<std::size_t>(o)])
            for (std::int64_t b = 0; b < global.batch; ++b) {
              pieces.push_back({i, o, g, b, u, units[u], elements});
              elements += static_cast<std::size_t>(2 * units[u].count * dim);
            }
      }
    return pieces;
  };
  // The one peer of step t in each direction (every plan of a step agrees on it).
  const auto peer = [&](std::int64_t t, bool outgoing) {
    return static_cast<int>(outgoing ? (rank + t) % num_ranks
                                     : (rank - t + num_ranks) % num_ranks);
  };

  // Every block of step t, for every (batch, query head). Received keys are found through the
  // incoming layout: the piece of (branch, offset, kv head, batch).
  const auto compute = [&](std::int64_t t, const auto* flight, const auto& tick) {
    std::int64_t blocks = 0;
    for (std::int64_t i = 0; i < branches; ++i)
      for (std::int64_t o = 0; o < pattern.branch(i).r; ++o) {
        const auto& plan = plans[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)]
                                [static_cast<std::size_t>(o)];
        if (plan) blocks += static_cast<std::int64_t>(plan->blocks.size()) *
                            pattern.heads_with_offset(i, o).count * global.batch;
      }
    if (blocks == 0) return;
    stats.blocks_computed += blocks;
    backend.for_each_head([&](std::int64_t b, std::int64_t h, typename Backend::Workspace& ws) {
      const std::int64_t g = pattern.kv_head(h);
      for (std::int64_t i = 0; i < branches; ++i) {
        const std::int64_t o = pattern.offset(i, h);
        if (o < 0) continue;
        const auto& plan = plans[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)]
                                [static_cast<std::size_t>(o)];
        const std::int64_t slot = mean ? i : 0;
        if (flight == nullptr) {
          for (const BlockPair& block : plan->blocks) {
            backend.attend_merge(ws, slot, b, h, g, block.queries, block.keys, nullptr, 0);
            tick();
          }
          continue;
        }
        if (!plan->receives()) continue;
        for (std::size_t j = 0; j < plan->blocks.size(); ++j)
          for (const detail::Piece& piece : flight->incoming)
            if (piece.branch == i && piece.offset == o && piece.kv_head == g && piece.batch == b &&
                piece.unit == plan->block_unit[j]) {
              const BlockPair& block = plan->blocks[j];
              backend.attend_merge(ws, slot, b, h, g, block.queries, block.keys, &flight->recv,
                                   piece.element_offset);
              tick();
              break;
            }
      }
    });
  };

  // One step's exchange. A ticket is "open" from posting until wait() returned; the guard
  // below abandons every open ticket, with its buffer, on any exit.
  struct InFlight {
    typename Backend::Buffer send, recv;
    std::vector<detail::Piece> incoming;
    Transport::Ticket send_ticket = 0, recv_ticket = 0;
    bool sending = false, receiving = false, send_open = false, recv_open = false;
  };
  struct Guard {
    Transport& transport;
    std::vector<InFlight>& flights;
    ~Guard() {
      for (InFlight& f : flights) {
        if (f.recv_open)
          transport.abandon(f.recv_ticket, std::make_shared<typename Backend::Buffer>(std::move(f.recv)));
        if (f.send_open)
          transport.abandon(f.send_ticket, std::make_shared<typename Backend::Buffer>(std::move(f.send)));
        f.recv_open = f.send_open = false;
      }
    }
  };
  std::vector<InFlight> flights(static_cast<std::size_t>(num_ranks));
  Guard guard{transport, flights};

  const auto post = [&](std::int64_t t, InFlight& flight) {
    std::size_t send_elements = 0, recv_elements = 0;
    const std::vector<detail::Piece> outgoing = layout(t, true, send_elements);
    flight.incoming = layout(t, false, recv_elements);
    flight.sending = send_elements > 0;
    flight.receiving = recv_elements > 0;
    if (flight.sending) {
      flight.send = backend.make_buffer(send_elements);
      for (const detail::Piece& piece : outgoing) {
        backend.pack(flight.send, piece.element_offset, piece.batch, piece.kv_head, piece.rows);
        stats.bytes_sent_per_branch[static_cast<std::size_t>(piece.branch)] +=
            static_cast<std::int64_t>(2 * piece.rows.count * dim * Backend::element_size());
      }
    }
    if (flight.receiving) flight.recv = backend.make_buffer(recv_elements);
    if constexpr (stream_ordered) {
      // The packing kernels of this step run now; sends read their buffer only after them.
      backend.flush_packs();
      if (flight.sending && !transport.order_sends_after(backend.queue())) backend.synchronize();
    }
    const std::size_t send_bytes = send_elements * Backend::element_size();
    const std::size_t recv_bytes = recv_elements * Backend::element_size();
    // One message per ordered pair of ranks per call, so one tag serves every step.
    transport.begin_group();
    if (flight.receiving) {
      flight.recv_ticket = transport.post_recv(peer(t, false), 0, Backend::bytes(flight.recv), recv_bytes);
      flight.recv_open = true;
    }
    if (flight.sending) {
      flight.send_ticket = transport.post_send(peer(t, true), 0, Backend::bytes(flight.send), send_bytes);
      flight.send_open = true;
    }
    transport.end_group();
    stats.bytes_sent += static_cast<std::int64_t>(send_bytes);
    stats.bytes_received += static_cast<std::int64_t>(recv_bytes);
    (flight.sending ? stats.sends_posted : stats.sends_skipped) += 1;
    (flight.receiving ? stats.recvs_posted : stats.recvs_skipped) += 1;
  };
  const auto wait = [&](Transport::Ticket ticket, bool& open) {
    const auto start = std::chrono::steady_clock::now();
    transport.wait(ticket);
    open = false;
    stats.wait_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  // Step t's rows must be in place before its blocks run: on a device stream the stream waits
  // (the ticket stays open until the end of the call), otherwise the host does.
  const auto arrive = [&](InFlight& flight) {
    if (!flight.receiving) return;
    if constexpr (stream_ordered) {
      const auto start = std::chrono::steady_clock::now();
      const bool ordered = transport.enqueue_wait(flight.recv_ticket, backend.queue());
      stats.wait_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (ordered) return;
    }
    wait(flight.recv_ticket, flight.recv_open);
  };
  // A buffer no transfer uses any more: freed now, or (device) when the call's stream is done.
  const auto release = [&](typename Backend::Buffer& buffer) {
    if constexpr (stream_ordered) backend.retire(std::move(buffer));
    buffer = typename Backend::Buffer();
  };

  // Between blocks, on the calling thread only (MPI is called from one thread): drive the
  // transport. An error is kept and raised after the compute phase, never inside a worker loop.
  const std::thread::id caller = std::this_thread::get_id();
  std::exception_ptr progress_error;
  const auto tick = [&] {
    // The thread check comes first: only the calling thread ever reads or writes progress_error.
    if (!options.drive_progress || std::this_thread::get_id() != caller || progress_error) return;
    try {
      transport.progress();
      ++stats.progress_calls;
    } catch (...) {
      progress_error = std::current_exception();
    }
  };
  const auto compute_step = [&](std::int64_t t, const InFlight* flight) {
    compute(t, flight, tick);
    if (progress_error) std::rethrow_exception(progress_error);
  };

  if (options.post_early) {
    // Every exchange at once, nearest ring distance first (a segment's sub-ring is a band of
    // nearby ranks, and both directions of one distance go out together); then the local blocks,
    // then each step as its rows arrive, in that same fixed order (deterministic merges).
    std::vector<std::int64_t> order;
    for (std::int64_t t = 1; t < num_ranks; ++t) order.push_back(t);
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
      return std::min(a, num_ranks - a) < std::min(b, num_ranks - b);
    });
    for (const std::int64_t t : order) post(t, flights[static_cast<std::size_t>(t)]);
    compute_step(0, nullptr);
    for (const std::int64_t t : order) {
      InFlight& flight = flights[static_cast<std::size_t>(t)];
      arrive(flight);
      compute_step(t, &flight);
      if (!flight.recv_open) release(flight.recv);
    }
    for (const std::int64_t t : order) {
      InFlight& flight = flights[static_cast<std::size_t>(t)];
      if (flight.recv_open) wait(flight.recv_ticket, flight.recv_open);
      release(flight.recv);
      if (flight.sending) wait(flight.send_ticket, flight.send_open);
      release(flight.send);
    }
  } else {
    if (num_ranks > 1) post(1, flights[1]);
    compute_step(0, nullptr);
    for (std::int64_t t = 1; t < num_ranks; ++t) {
      InFlight& flight = flights[static_cast<std::size_t>(t)];
      arrive(flight);
      if (t + 1 < num_ranks) post(t + 1, flights[static_cast<std::size_t>(t + 1)]);
      compute_step(t, &flight);
      if (flight.recv_open) wait(flight.recv_ticket, flight.recv_open);
      release(flight.recv);
      if (flight.sending) wait(flight.send_ticket, flight.send_open);
      release(flight.send);
    }
  }
  return stats;
}

}  // namespace dilated_attention::ring
