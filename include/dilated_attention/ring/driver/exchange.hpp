#pragma once
// What the ring's forward (ring/driver/forward.hpp) and backward (ring/driver/backward.hpp) drivers share:
// - CallSchedule: one rank's plans for one call (every step, branch and offset, from the pattern
//   cache), the order in which steps are posted and computed, the blocks a (batch, head) computes
//   at a step, and the layout of a step's message, which sender and receiver derive alike;
// - Transfers: the owner of every posted transfer and its buffer. On any exit a transfer has
//   either been waited for or is handed to Transport::abandon together with its buffer, so no
//   buffer is freed while MPI or NCCL may still touch it and the transport serves the next call;
// - ProgressTicker: drives the transport between compute blocks, from the calling thread only.
//
// A step's K/V message is the concatenation, over branch, offset, unit, kv head and batch, of the
// K rows then the V rows of the unit's progression ("pieces"). In a backward the dK/dV partials
// of the received pieces travel back in the same layout. No header travels: both sides know
// every byte count in advance.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../config.hpp"
#include "../../pattern.hpp"
#include "layout.hpp"
#include "options.hpp"
#include "pattern_cache.hpp"
#include "schedule.hpp"
#include "../transport/transport.hpp"

namespace dilated_attention::ring::detail {

// Whether a back end runs its work asynchronously on a device stream (ring/cuda/forward_backend.cuh:
// `static constexpr bool stream_ordered = true`, with queue(), flush_packs(), synchronize() and
// retire(std::shared_ptr<Buffer>)); see ring/driver/forward.hpp.
template <class Backend, class = void>
struct is_stream_ordered : std::false_type {};
template <class Backend>
struct is_stream_ordered<Backend, std::void_t<decltype(Backend::stream_ordered)>>
    : std::bool_constant<Backend::stream_ordered> {};

// One piece of a step's message: K then V rows of one unit of (branch, offset), kv head, batch.
struct Piece {
  std::int64_t branch, offset, kv_head, batch;
  std::size_t unit;
  Progression rows;
  std::size_t element_offset;  // where its K rows start; V rows follow
};

// The kv heads read by the query heads in `heads`, ascending and distinct.
inline std::vector<std::int64_t> kv_heads_of(const Progression& heads, std::int64_t group) {
  std::vector<std::int64_t> result;
  for (std::int64_t j = 0; j < heads.count; ++j) {
    const std::int64_t g = heads.at(j) / group;
    if (result.empty() || result.back() != g) result.push_back(g);
  }
  return result;
}

class CallSchedule {
 public:
  CallSchedule(const Config& config, const Shape& global, std::int64_t num_ranks, std::int64_t rank,
               PatternCache& cache, Layout layout)
      : pattern_(config, global),
        num_ranks_(num_ranks),
        rank_(rank),
        plans_(step_plans(config, global, num_ranks, rank, cache, layout)) {
    const std::int64_t group = global.num_heads / global.num_kv_heads;
    kv_heads_.resize(static_cast<std::size_t>(pattern_.num_branches()));
    for (std::int64_t i = 0; i < pattern_.num_branches(); ++i)
      for (std::int64_t o = 0; o < pattern_.branch(i).r; ++o)
        kv_heads_[static_cast<std::size_t>(i)].push_back(
            kv_heads_of(pattern_.heads_with_offset(i, o), group));
  }

  const Pattern& pattern() const { return pattern_; }
  std::int64_t num_ranks() const { return num_ranks_; }

  // Null for an offset no query head uses.
  const StepPlan* plan(std::int64_t t, std::int64_t i, std::int64_t o) const {
    return plans_[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)]
                 [static_cast<std::size_t>(o)]
                     .get();
  }

  // The one peer of step t in each direction (every plan of a step agrees on it).
  int peer(std::int64_t t, bool outgoing) const {
    return static_cast<int>(outgoing ? (rank_ + t) % num_ranks_
                                     : (rank_ - t + num_ranks_) % num_ranks_);
  }

  // Steps 1..P-1, nearest ring distance first (a segment's sub-ring is a band of nearby ranks,
  // and both directions of one distance go out together). Both passes use this fixed order.
  std::vector<std::int64_t> step_order() const {
    std::vector<std::int64_t> order;
    for (std::int64_t t = 1; t < num_ranks_; ++t) order.push_back(t);
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
      return std::min(a, num_ranks_ - a) < std::min(b, num_ranks_ - b);
    });
    return order;
  }

  // The message of step t, outgoing (this rank's send_rows) or incoming (the received units).
  // `elements` is its length in K/V elements (2 * rows * head_dim per piece).
  std::vector<Piece> pieces(std::int64_t t, bool outgoing, std::size_t& elements) const {
    const Shape& shape = pattern_.shape();
    std::vector<Piece> result;
    elements = 0;
    for (std::int64_t i = 0; i < pattern_.num_branches(); ++i)
      for (std::int64_t o = 0; o < pattern_.branch(i).r; ++o) {
        const StepPlan* step = plan(t, i, o);
        if (step == nullptr || !(outgoing ? step->sends() : step->receives())) continue;
        const std::vector<Progression>& units = outgoing ? step->send_rows : step->recv_rows;
        for (std::size_t u = 0; u < units.size(); ++u)
          for (const std::int64_t g :
               kv_heads_[static_cast<std::size_t>(i)][static_cast<std::size_t>(o)])
            for (std::int64_t b = 0; b < shape.batch; ++b) {
              result.push_back({i, o, g, b, u, units[u], elements});
              elements += static_cast<std::size_t>(2 * units[u].count * shape.head_dim);
            }
      }
    return result;
  }

  // Block computations of step t over every (batch, query head).
  std::int64_t block_count(std::int64_t t) const {
    std::int64_t blocks = 0;
    for (std::int64_t i = 0; i < pattern_.num_branches(); ++i)
      for (std::int64_t o = 0; o < pattern_.branch(i).r; ++o)
        if (const StepPlan* step = plan(t, i, o))
          blocks += static_cast<std::int64_t>(step->blocks.size()) *
                    pattern_.heads_with_offset(i, o).count * pattern_.shape().batch;
    return blocks;
  }

  // visit(branch, block, piece) for every block query head h of batch b computes at step t, in
  // the fixed order (branch, block). piece is where the block's keys sit in the received message
  // (`incoming`, the step's incoming pieces), or null at step 0 (the keys are the rank's own).
  template <class Visit>
  void for_each_block(std::int64_t t, std::int64_t b, std::int64_t h,
                      const std::vector<Piece>* incoming, Visit&& visit) const {
    const std::int64_t g = pattern_.kv_head(h);
    for (std::int64_t i = 0; i < pattern_.num_branches(); ++i) {
      const std::int64_t o = pattern_.offset(i, h);
      if (o < 0) continue;
      const StepPlan& step = *plan(t, i, o);
      if (incoming == nullptr) {
        for (const BlockPair& block : step.blocks)
          visit(i, block, static_cast<const Piece*>(nullptr));
        continue;
      }
      if (!step.receives()) continue;
      for (std::size_t j = 0; j < step.blocks.size(); ++j)
        for (const Piece& piece : *incoming)
          if (piece.branch == i && piece.offset == o && piece.kv_head == g && piece.batch == b &&
              piece.unit == step.block_unit[j]) {
            visit(i, step.blocks[j], &piece);
            break;
          }
    }
  }

 private:
  Pattern pattern_;
  std::int64_t num_ranks_, rank_;
  std::vector<std::vector<std::vector<std::shared_ptr<const StepPlan>>>> plans_;
  std::vector<std::vector<std::vector<std::int64_t>>> kv_heads_;  // [branch][offset]
};

// Owns buffers and the transfers posted on them. A transfer is "open" from posting until wait()
// returned; the destructor abandons every open one together with its buffer.
template <class Buffer>
class Transfers {
 public:
  using Id = std::size_t;
  Transfers(Transport& transport, Stats& stats) : transport_(transport), stats_(stats) {}
  Transfers(const Transfers&) = delete;
  Transfers& operator=(const Transfers&) = delete;
  ~Transfers() {
    for (Entry& entry : entries_)
      if (entry.open) transport_.abandon(entry.ticket, std::move(entry.buffer));
  }

  Id add(Buffer buffer) {
    entries_.push_back({std::make_shared<Buffer>(std::move(buffer)), 0, false});
    return entries_.size() - 1;
  }
  Buffer& buffer(Id id) { return *entries_.at(id).buffer; }

  // `data` points into buffer(id) (the transport reads or writes it until wait returns).
  void post_send(Id id, int peer, int tag, const void* data, std::size_t bytes) {
    Entry& entry = entries_.at(id);
    entry.ticket = transport_.post_send(peer, tag, data, bytes);
    entry.open = true;
  }
  void post_recv(Id id, int peer, int tag, void* data, std::size_t bytes) {
    Entry& entry = entries_.at(id);
    entry.ticket = transport_.post_recv(peer, tag, data, bytes);
    entry.open = true;
  }
  void wait(Id id) {
    Entry& entry = entries_.at(id);
    const auto start = std::chrono::steady_clock::now();
    transport_.wait(entry.ticket);
    entry.open = false;
    stats_.wait_seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  // Device ordering (Transport::enqueue_wait): later work on `queue` runs after the transfer;
  // true when the transport can, and then the transfer stays open until wait().
  bool enqueue_wait(Id id, void* queue) {
    const auto start = std::chrono::steady_clock::now();
    const bool ordered = transport_.enqueue_wait(entries_.at(id).ticket, queue);
    stats_.wait_seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return ordered;
  }
  bool is_open(Id id) const { return entries_.at(id).open; }
  // Frees the buffer of a transfer that was waited for (or never posted).
  void release(Id id) { take(id).reset(); }
  // Hands over the buffer of a transfer that was waited for (a device back end retires it).
  std::shared_ptr<Buffer> take(Id id) {
    Entry& entry = entries_.at(id);
    if (entry.open) throw std::logic_error("dilated_attention::ring: buffer released while posted");
    return std::move(entry.buffer);
  }

 private:
  struct Entry {
    std::shared_ptr<Buffer> buffer;
    Transport::Ticket ticket;
    bool open;
  };
  Transport& transport_;
  Stats& stats_;
  std::vector<Entry> entries_;
};

// One step's K/V exchange: the received pieces and the ids of its buffers in a Transfers.
struct RowExchange {
  std::vector<Piece> incoming;
  std::size_t send_elements = 0, recv_elements = 0;
  std::size_t send = 0, recv = 0;
  bool sending() const { return send_elements > 0; }
  bool receiving() const { return recv_elements > 0; }
};

// Packs and posts step t's K/V rows (tag 0: one message per ordered pair of ranks per call, so
// one tag serves every step) and posts the receive of the peer's, counting both in `stats`.
template <class Backend>
void post_rows(std::int64_t t, const CallSchedule& schedule, Backend& backend,
               Transfers<typename Backend::Buffer>& transfers, Transport& transport, Stats& stats,
               RowExchange& step) {
  const std::vector<Piece> outgoing = schedule.pieces(t, true, step.send_elements);
  step.incoming = schedule.pieces(t, false, step.recv_elements);
  const std::size_t send_bytes = step.send_elements * Backend::element_size();
  const std::size_t recv_bytes = step.recv_elements * Backend::element_size();
  if (step.sending()) {
    step.send = transfers.add(backend.make_buffer(step.send_elements));
    for (const Piece& piece : outgoing) {
      backend.pack(transfers.buffer(step.send), piece.element_offset, piece.batch, piece.kv_head,
                   piece.rows);
      stats.bytes_sent_per_branch[static_cast<std::size_t>(piece.branch)] +=
          static_cast<std::int64_t>(2 * piece.rows.count * schedule.pattern().shape().head_dim *
                                    Backend::element_size());
    }
  }
  if (step.receiving()) step.recv = transfers.add(backend.make_buffer(step.recv_elements));
  if constexpr (is_stream_ordered<Backend>::value) {
    // The step's packing kernels run now; its send reads the buffer only after them, and its
    // receive writes its buffer only after the buffer's stream-ordered allocation (a
    // cudaMallocAsync may hand out memory that work queued earlier on the stream still reads).
    backend.flush_packs();
    if (step.sending() || step.receiving()) {
      const bool ordered = transport.order_sends_after(backend.queue());
      if (step.sending() && !ordered) backend.synchronize();
    }
  }
  transport.begin_group();
  if (step.receiving())
    transfers.post_recv(step.recv, schedule.peer(t, false), 0,
                        Backend::bytes(transfers.buffer(step.recv)), recv_bytes);
  if (step.sending())
    transfers.post_send(step.send, schedule.peer(t, true), 0,
                        Backend::bytes(transfers.buffer(step.send)), send_bytes);
  transport.end_group();
  stats.bytes_sent += static_cast<std::int64_t>(send_bytes);
  stats.bytes_received += static_cast<std::int64_t>(recv_bytes);
  (step.sending() ? stats.sends_posted : stats.sends_skipped) += 1;
  (step.receiving() ? stats.recvs_posted : stats.recvs_skipped) += 1;
}

// Between blocks, on the calling thread only (MPI is called from one thread): drive the
// transport. An error is kept and raised after the compute phase (rethrow), never inside a worker
// loop. Worker threads call it too and return at once.
class ProgressTicker {
 public:
  ProgressTicker(Transport& transport, bool enabled, Stats& stats)
      : transport_(transport),
        enabled_(enabled),
        stats_(stats),
        caller_(std::this_thread::get_id()) {}
  void operator()() {
    // The thread check comes first: only the calling thread ever reads or writes error_.
    if (!enabled_ || std::this_thread::get_id() != caller_ || error_) return;
    try {
      transport_.progress();
      ++stats_.progress_calls;
    } catch (...) {
      error_ = std::current_exception();
    }
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  Transport& transport_;
  bool enabled_;
  Stats& stats_;
  std::thread::id caller_;
  std::exception_ptr error_;
};

}  // namespace dilated_attention::ring::detail
