#pragma once
// The in-process transport: every rank is a std::thread of one process and messages go through
// per-rank mailboxes (ring/transport/transport.hpp states what every transport guarantees).
//
// Calls and tags. A rank's n-th call (begin_call) has epoch n on every rank, and a message's
// channel is (sender, epoch * 8 + tag), so a message left behind by a failed call can never be
// read by a later one; begin_call also drops whatever earlier calls left in the rank's mailbox.
// Failure notices are per epoch too. kill() is different: it marks the whole world dead (a
// rank's thread ended with an exception outside any call) and wakes every waiting rank.

#include <chrono>
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

#include "transport.hpp"

namespace dilated_attention::ring {

class InProcessWorld {
 public:
  using Clock = std::chrono::steady_clock;

  explicit InProcessWorld(int num_ranks) : mailboxes_(static_cast<std::size_t>(num_ranks)) {
    if (num_ranks <= 0)
      throw std::invalid_argument("dilated_attention: num_ranks = " + std::to_string(num_ranks) +
                                  ": an in-process ring needs at least one rank");
  }
  int size() const { return static_cast<int>(mailboxes_.size()); }

  void deliver(int to, int from, std::int64_t tag, const void* data, std::size_t bytes) {
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

  // Blocks until message number `sequence` of channel (from, tag) is in rank `to`'s mailbox and
  // copies it out. Numbering a channel's messages makes receives match in posting order even
  // when they are waited for in another order (as MPI does). Gives up at `deadline`, when the
  // world is dead, or when a rank posted a failure notice for `epoch`.
  void collect(int to, int from, std::int64_t tag, std::int64_t epoch, std::int64_t sequence,
               void* data, std::size_t bytes, Clock::time_point deadline) {
    Mailbox& box = mailboxes_.at(static_cast<std::size_t>(to));
    std::unique_lock<std::mutex> lock(box.mutex);
    Channel& channel = box.channels[{from, tag}];
    const bool ready = box.ready.wait_until(lock, deadline, [&] {
      return channel.arrived.count(sequence) != 0 || box.killed || box.notices.count(epoch) != 0;
    });
    const auto found = channel.arrived.find(sequence);
    if (found == channel.arrived.end()) {
      if (box.killed)
        throw std::runtime_error("dilated_attention: in-process ring aborted: another rank failed");
      const auto notice = box.notices.find(epoch);
      if (notice != box.notices.end())
        throw PeerFailure(notice->second.first, notice->second.second);
      (void)ready;
      throw TransferTimeout("dilated_attention: rank " + std::to_string(to) +
                            ": a receive from rank " + std::to_string(from) +
                            " did not complete within options.timeout");
    }
    std::vector<unsigned char> message = std::move(found->second);
    channel.arrived.erase(found);
    lock.unlock();
    if (message.size() != bytes)
      throw std::runtime_error("dilated_attention: rank " + std::to_string(to) + " expected " +
                               std::to_string(bytes) + " bytes from rank " + std::to_string(from) +
                               " but " + std::to_string(message.size()) + " arrived");
    if (bytes != 0) std::memcpy(data, message.data(), bytes);
  }

  // Returns when rank `to` may go on waiting in call `epoch`; otherwise throws what collect()
  // would: the world is dead, or a rank posted a failure notice for `epoch` (PeerFailure). For
  // transports that wait on something other than this mailbox (ring/transport/loopback.cuh).
  void check_failures(int to, std::int64_t epoch) {
    Mailbox& box = mailboxes_.at(static_cast<std::size_t>(to));
    std::lock_guard<std::mutex> lock(box.mutex);
    if (box.killed)
      throw std::runtime_error("dilated_attention: in-process ring aborted: another rank failed");
    const auto notice = box.notices.find(epoch);
    if (notice != box.notices.end()) throw PeerFailure(notice->second.first, notice->second.second);
  }

  // Drops what calls before `epoch` left in rank `to`'s mailbox (tags are epoch * 8 + tag).
  void purge_before(int to, std::int64_t epoch) {
    Mailbox& box = mailboxes_.at(static_cast<std::size_t>(to));
    std::lock_guard<std::mutex> lock(box.mutex);
    for (auto it = box.channels.begin(); it != box.channels.end();)
      it = it->first.second < epoch * 8 ? box.channels.erase(it) : std::next(it);
    for (auto it = box.notices.begin(); it != box.notices.end();)
      it = it->first < epoch ? box.notices.erase(it) : std::next(it);
  }

  // Rank `from` gave up on call `epoch`: every other rank's waits in that call raise.
  void notify(std::int64_t epoch, int from, const std::string& reason) {
    for (int to = 0; to < size(); ++to) {
      if (to == from) continue;
      Mailbox& box = mailboxes_[static_cast<std::size_t>(to)];
      {
        std::lock_guard<std::mutex> lock(box.mutex);
        box.notices.emplace(epoch, std::make_pair(from, reason));  // the first notice wins
      }
      box.ready.notify_all();
    }
  }

  // Collective number `sequence`: every rank deposits its record, each gets all of them.
  void gather(int rank, std::int64_t sequence, const void* mine, void* all, std::size_t bytes,
              Clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(gather_mutex_);
    Gathering& g = gatherings_[sequence];
    if (g.records.empty()) g.records.resize(mailboxes_.size());
    g.records[static_cast<std::size_t>(rank)].assign(
        static_cast<const unsigned char*>(mine), static_cast<const unsigned char*>(mine) + bytes);
    ++g.arrived;
    gathered_.notify_all();
    const bool complete =
        gathered_.wait_until(lock, deadline, [&] { return g.arrived == size() || gather_killed_; });
    if (!complete || g.arrived != size()) {
      // Leave the record for the late ranks; this rank's call has failed.
      if (gather_killed_)
        throw std::runtime_error("dilated_attention: in-process ring aborted: another rank failed");
      throw TransferTimeout("dilated_attention: rank " + std::to_string(rank) +
                            ": the ranks' agreement did not complete within options.timeout");
    }
    for (std::size_t p = 0; p < g.records.size(); ++p) {
      if (g.records[p].size() != bytes)
        throw std::runtime_error("dilated_attention: ranks gathered records of different sizes");
      std::memcpy(static_cast<unsigned char*>(all) + p * bytes, g.records[p].data(), bytes);
    }
    if (++g.departed == size()) gatherings_.erase(sequence);
  }

  // A rank's thread ended with an exception: wake every waiting rank with an error.
  void kill() {
    for (Mailbox& box : mailboxes_) {
      {
        std::lock_guard<std::mutex> lock(box.mutex);
        box.killed = true;
      }
      box.ready.notify_all();
    }
    {
      std::lock_guard<std::mutex> lock(gather_mutex_);
      gather_killed_ = true;
    }
    gathered_.notify_all();
  }

 private:
  struct Channel {  // the messages of one (sender, tag) pair, numbered in sending order
    std::int64_t sent = 0;
    std::map<std::int64_t, std::vector<unsigned char>> arrived;
  };
  struct Mailbox {
    std::mutex mutex;
    std::condition_variable ready;
    std::map<std::pair<int, std::int64_t>, Channel> channels;     // by (sender, epoch * 8 + tag)
    std::map<std::int64_t, std::pair<int, std::string>> notices;  // by epoch: (rank, reason)
    bool killed = false;
  };
  struct Gathering {
    std::vector<std::vector<unsigned char>> records;
    int arrived = 0, departed = 0;
  };
  std::vector<Mailbox> mailboxes_;
  std::mutex gather_mutex_;
  std::condition_variable gathered_;
  std::map<std::int64_t, Gathering> gatherings_;
  bool gather_killed_ = false;
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
    world_.deliver(peer, rank_, wire_tag(tag), data, bytes);
    return completed_;
  }
  Ticket post_recv(int peer, int tag, void* data, std::size_t bytes) override {
    check_peer(peer);
    const Ticket ticket = next_++;
    const std::int64_t sequence = posted_[{peer, wire_tag(tag)}]++;
    pending_.emplace(ticket, Receive{peer, wire_tag(tag), sequence, data, bytes});
    return ticket;
  }
  void wait(Ticket ticket) override {
    if (ticket == completed_) return;
    const auto found = pending_.find(ticket);
    if (found == pending_.end())
      throw std::logic_error("dilated_attention: wait on an unknown or finished ticket");
    const Receive receive = found->second;
    world_.collect(rank_, receive.peer, receive.tag, epoch_, receive.sequence, receive.data,
                   receive.bytes, InProcessWorld::Clock::now() + timeout_);
    pending_.erase(ticket);  // only now: a wait that threw leaves the ticket for abandon
  }
  // Sends completed when posted; a receive is simply forgotten (its message, should it still
  // arrive, is dropped by the next begin_call).
  void abandon(Ticket ticket, std::shared_ptr<void>) noexcept override { pending_.erase(ticket); }

  void begin_call(Duration timeout) override {
    timeout_ = timeout;
    ++epoch_;
    pending_.clear();
    posted_.clear();
    world_.purge_before(rank_, epoch_);
  }
  void end_call() noexcept override {}
  void all_gather(const void* mine, void* all, std::size_t bytes) override {
    world_.gather(rank_, gathers_++, mine, all, bytes, InProcessWorld::Clock::now() + timeout_);
  }
  void notify_failure(const std::string& reason) noexcept override {
    try {
      world_.notify(epoch_, rank_, reason);
    } catch (...) {  // best effort: a failure to notify leaves the others to their timeout
    }
  }

 private:
  struct Receive {
    int peer;
    std::int64_t tag;
    std::int64_t sequence;  // which message of the (peer, tag) channel this receive matches
    void* data;
    std::size_t bytes;
  };
  std::int64_t wire_tag(int tag) const {
    if (tag < 0 || tag > 6)
      throw std::invalid_argument("dilated_attention: tag = " + std::to_string(tag) +
                                  " is outside 0..6");
    return epoch_ * 8 + tag;
  }
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
  std::int64_t epoch_ = 0, gathers_ = 0;
  Duration timeout_ = std::chrono::minutes(5);
  std::unordered_map<Ticket, Receive> pending_;
  std::map<std::pair<int, std::int64_t>, std::int64_t> posted_;  // receives per (peer, tag)
};

namespace detail {

// Rethrows the first real error of a ring run (by rank order): a rank's own failure rather than
// the knock-on errors it caused elsewhere (PeerFailure, "aborted"), else the first error at all.
inline void rethrow_first_cause(const std::vector<std::exception_ptr>& errors) {
  for (const auto& error : errors)
    if (error) {
      try {
        std::rethrow_exception(error);
      } catch (const PeerFailure&) {
        continue;
      } catch (const std::runtime_error& e) {
        if (std::string(e.what()).find("aborted") != std::string::npos) continue;
        throw;
      }
    }
  for (const auto& error : errors)
    if (error) std::rethrow_exception(error);
}

}  // namespace detail

// Runs body(transport) on num_ranks threads, one per rank, and rethrows the first exception (by
// rank order) after all have finished. A rank whose body throws kills the world so that no
// other rank waits forever for its messages.
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
        world.kill();
      }
    });
  for (std::thread& thread : threads) thread.join();
  detail::rethrow_first_cause(errors);
}

}  // namespace dilated_attention::ring
