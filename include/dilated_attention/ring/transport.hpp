#pragma once
// How ranks move bytes: one small interface (post a send or a receive of a byte buffer to or from
// a peer, then wait for it), and the in-process transport, where every rank is a std::thread of
// one process and messages go through per-rank mailboxes. The MPI and NCCL transports
// (ring/mpi.hpp, ring/nccl.cuh) implement the same interface and are opt-in.
//
// Semantics every transport keeps:
// - post_send / post_recv return at once with a ticket; the buffer must stay alive (and, for a
//   send, unmodified) until wait(ticket) returns.
// - Messages between one ordered pair of ranks with the same tag arrive in posting order, and a
//   receive must name exactly the byte count that was sent (a mismatch is a schedule bug and
//   throws std::runtime_error rather than truncating).
// - Transfers posted between begin_group() and end_group() are issued together: NCCL needs that
//   so that a step's send and receive cannot wait on each other; other transports ignore it.

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

namespace dilated_attention::ring {

class Transport {
 public:
  using Ticket = std::int64_t;

  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual Ticket post_send(int peer, int tag, const void* data, std::size_t bytes) = 0;
  virtual Ticket post_recv(int peer, int tag, void* data, std::size_t bytes) = 0;
  virtual void wait(Ticket ticket) = 0;
  virtual void begin_group() {}
  virtual void end_group() {}
};

// The shared state of an in-process ring: one mailbox per rank.
class InProcessWorld {
 public:
  explicit InProcessWorld(int num_ranks) : mailboxes_(static_cast<std::size_t>(num_ranks)) {
    if (num_ranks <= 0)
      throw std::invalid_argument("dilated_attention: num_ranks = " + std::to_string(num_ranks) +
                                  ": an in-process ring needs at least one rank");
  }
  int size() const { return static_cast<int>(mailboxes_.size()); }

  void deliver(int to, int from, int tag, const void* data, std::size_t bytes) {
    Mailbox& box = mailboxes_.at(static_cast<std::size_t>(to));
    std::vector<unsigned char> message(bytes);
    if (bytes != 0) std::memcpy(message.data(), data, bytes);
    {
      std::lock_guard<std::mutex> lock(box.mutex);
      Channel& channel = box.channels[{from, tag}];
      channel.arrived.emplace(channel.sent++, std::move(message));
    }
    box.ready.notify_all();
  }

  // Blocks until message number `sequence` from `from` with `tag` is in rank `to`'s mailbox,
  // then copies it out. Numbering the messages of a (sender, tag) channel is what makes receives
  // match in posting order even when they are waited for in another order (as MPI does).
  void collect(int to, int from, int tag, std::int64_t sequence, void* data, std::size_t bytes) {
    Mailbox& box = mailboxes_.at(static_cast<std::size_t>(to));
    std::unique_lock<std::mutex> lock(box.mutex);
    Channel& channel = box.channels[{from, tag}];
    box.ready.wait(lock, [&] { return channel.arrived.count(sequence) != 0 || box.aborted; });
    const auto found = channel.arrived.find(sequence);
    if (found == channel.arrived.end())
      throw std::runtime_error("dilated_attention: in-process ring aborted: another rank failed");
    std::vector<unsigned char> message = std::move(found->second);
    channel.arrived.erase(found);
    lock.unlock();
    if (message.size() != bytes)
      throw std::runtime_error("dilated_attention: rank " + std::to_string(to) + " expected " +
                               std::to_string(bytes) + " bytes from rank " + std::to_string(from) +
                               " (tag " + std::to_string(tag) + ") but " +
                               std::to_string(message.size()) + " arrived");
    if (bytes != 0) std::memcpy(data, message.data(), bytes);
  }

  // Wakes every waiting rank with an error: used when one rank throws, so the others cannot hang.
  void abort() {
    for (Mailbox& box : mailboxes_) {
      {
        std::lock_guard<std::mutex> lock(box.mutex);
        box.aborted = true;
      }
      box.ready.notify_all();
    }
  }

 private:
  struct Channel {  // the messages of one (sender, tag) pair, numbered in sending order
    std::int64_t sent = 0;
    std::map<std::int64_t, std::vector<unsigned char>> arrived;
  };
  struct Mailbox {
    std::mutex mutex;
    std::condition_variable ready;
    std::map<std::pair<int, int>, Channel> channels;  // by (sender, tag)
    bool aborted = false;
  };
  std::vector<Mailbox> mailboxes_;
};

// One rank's end of an in-process ring. Sends are buffered (copied into the peer's mailbox when
// posted, complete at once, like an eager MPI send); receives complete in wait().
class InProcessTransport final : public Transport {
 public:
  InProcessTransport(InProcessWorld& world, int rank) : world_(world), rank_(rank) {
    if (rank < 0 || rank >= world.size())
      throw std::invalid_argument("dilated_attention: rank = " + std::to_string(rank) +
                                  " is out of range: ranks are 0.." +
                                  std::to_string(world.size() - 1));
  }
  int rank() const override { return rank_; }
  int size() const override { return world_.size(); }

  Ticket post_send(int peer, int tag, const void* data, std::size_t bytes) override {
    check_peer(peer);
    world_.deliver(peer, rank_, tag, data, bytes);
    return completed_;
  }
  Ticket post_recv(int peer, int tag, void* data, std::size_t bytes) override {
    check_peer(peer);
    const Ticket ticket = next_++;
    const std::int64_t sequence = posted_[{peer, tag}]++;
    pending_.emplace(ticket, Receive{peer, tag, sequence, data, bytes});
    return ticket;
  }
  void wait(Ticket ticket) override {
    if (ticket == completed_) return;
    const auto found = pending_.find(ticket);
    if (found == pending_.end())
      throw std::logic_error("dilated_attention: wait on an unknown or finished ticket");
    const Receive receive = found->second;
    pending_.erase(found);
    world_.collect(rank_, receive.peer, receive.tag, receive.sequence, receive.data, receive.bytes);
  }

 private:
  struct Receive {
    int peer, tag;
    std::int64_t sequence;  // which message of the (peer, tag) channel this receive matches
    void* data;
    std::size_t bytes;
  };
  void check_peer(int peer) const {
    if (peer < 0 || peer >= world_.size())
      throw std::invalid_argument("dilated_attention: peer = " + std::to_string(peer) +
                                  " is out of range: ranks are 0.." +
                                  std::to_string(world_.size() - 1));
  }
  static constexpr Ticket completed_ = -1;
  InProcessWorld& world_;
  int rank_;
  Ticket next_ = 0;
  std::unordered_map<Ticket, Receive> pending_;
  std::map<std::pair<int, int>, std::int64_t> posted_;  // receives posted per (peer, tag)
};

// Runs body(transport) on num_ranks threads, one per rank, and rethrows the first exception (by
// rank order) after all have finished. A rank that throws aborts the world so that no other rank
// waits forever for its messages.
template <class Body>
void run_in_process(int num_ranks, Body&& body) {
  InProcessWorld world(num_ranks);
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(num_ranks));
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(num_ranks));
  for (int p = 0; p < num_ranks; ++p)
    threads.emplace_back([&, p] {
      try {
        InProcessTransport transport(world, p);
        body(static_cast<Transport&>(transport));
      } catch (...) {
        errors[static_cast<std::size_t>(p)] = std::current_exception();
        world.abort();
      }
    });
  for (std::thread& thread : threads) thread.join();
  // Prefer a rank's own failure over the "another rank failed" errors it caused elsewhere.
  for (const auto& error : errors)
    if (error) {
      try {
        std::rethrow_exception(error);
      } catch (const std::runtime_error& e) {
        if (std::string(e.what()).find("aborted") != std::string::npos) continue;
        throw;
      }
    }
  for (const auto& error : errors)
    if (error) std::rethrow_exception(error);
}

}  // namespace dilated_attention::ring
