#pragma once
// The MPI transport (opt-in: link DilatedAttention::mpi). CPU ranks in separate processes;
// MPI_Isend / MPI_Irecv of raw bytes on a private duplicate of the caller's communicator, so the
// ring's tags can never match the application's own messages.
//
// Ownership: the transport duplicates the communicator in its constructor and frees the duplicate
// in its destructor; both are collective over the communicator. MPI must be initialised before
// and finalised after the transport's lifetime, with at least MPI_THREAD_FUNNELED: only the
// thread that calls the ring touches MPI. Errors on the duplicate return instead of aborting,
// and surface as std::runtime_error.
//
// Fault safety (ring/transport/transport.hpp):
// - Tags: call number `epoch` uses wire tags (epoch mod E) * 8 + tag, E = (MPI_TAG_UB + 1) / 8
//   (at least 4096); wire tag (epoch mod E) * 8 + 7 carries failure notices, which also name their
//   epoch in full and are ignored when stale. A message a failed call leaves unmatched therefore
//   stays in MPI's queue (memory, not a wrong match) unless E calls later reuse its tag.
// - Waits poll (MPI_Test, MPI_Test on the notice receive) until the call's deadline.
// - abandon: a receive is cancelled and completed (MPI_Cancel + MPI_Wait always return for a
//   receive). A send MPI cannot cancel (Open MPI never cancels sends) is parked with its buffer
//   and tested at every later call; the destructor frees what is still parked with
//   MPI_Request_free and leaks (never frees) its buffer, so no use after free is possible.
// - all_gather is MPI_Iallgather polled to the deadline; when it times out the collective cannot
//   be cancelled, so the transport is broken: every later call throws at begin_call.

#include <mpi.h>

#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <list>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "transport.hpp"

namespace dilated_attention::ring {

class MpiTransport final : public Transport {
 public:
  using Clock = std::chrono::steady_clock;

  explicit MpiTransport(MPI_Comm communicator = MPI_COMM_WORLD) {
    check(MPI_Comm_dup(communicator, &comm_), "MPI_Comm_dup");
    check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    void* value = nullptr;
    int found = 0;
    MPI_Comm_get_attr(comm_, MPI_TAG_UB, &value, &found);
    const int tag_ub = found ? *static_cast<int*>(value) : 32767;
    epochs_ = (static_cast<std::int64_t>(tag_ub) + 1) / 8;
  }
  MpiTransport(const MpiTransport&) = delete;
  MpiTransport& operator=(const MpiTransport&) = delete;
  ~MpiTransport() override {
    for (auto& entry : pending_) release(entry.second.request, nullptr);
    pending_.clear();
    end_call();
    reap(true);
    MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  MPI_Comm communicator() const { return comm_; }

  Ticket post_send(int peer, int tag, const void* data, std::size_t bytes) override {
    Pending pending{MPI_REQUEST_NULL, bytes, false, false, 0};
    check(MPI_Isend(data, count_of(bytes), MPI_BYTE, peer, wire_tag(tag), comm_, &pending.request),
          "MPI_Isend");
    return remember(pending);
  }
  Ticket post_recv(int peer, int tag, void* data, std::size_t bytes) override {
    Pending pending{MPI_REQUEST_NULL, bytes, true, false, 0};
    check(MPI_Irecv(data, count_of(bytes), MPI_BYTE, peer, wire_tag(tag), comm_, &pending.request),
          "MPI_Irecv");
    return remember(pending);
  }

  void wait(Ticket ticket) override {
    const auto found = pending_.find(ticket);
    if (found == pending_.end())
      throw std::logic_error("dilated_attention: wait on an unknown or finished MPI ticket");
    Pending& pending = found->second;
    const Clock::time_point deadline = Clock::now() + timeout_;
    while (!pending.done) {
      MPI_Status status;
      int flag = 0;
      check(MPI_Test(&pending.request, &flag, &status), "MPI_Test");
      if (flag) {
        pending.done = true;
        if (pending.receive)
          check(MPI_Get_count(&status, MPI_BYTE, &pending.received), "MPI_Get_count");
        break;
      }
      check_notice();
      idle();
      if (Clock::now() > deadline)
        throw TransferTimeout("dilated_attention: rank " + std::to_string(rank_) + ": a " +
                              (pending.receive ? "receive" : "send") +
                              " did not complete within options.timeout");
    }
    const Pending finished = pending;
    pending_.erase(found);
    if (finished.receive && static_cast<std::size_t>(finished.received) != finished.bytes)
      throw std::runtime_error("dilated_attention: rank " + std::to_string(rank_) + " expected " +
                               std::to_string(finished.bytes) + " bytes but received " +
                               std::to_string(finished.received));
  }

  void abandon(Ticket ticket, std::shared_ptr<void> owner) noexcept override {
    const auto found = pending_.find(ticket);
    if (found == pending_.end()) return;
    if (!found->second.done) release(found->second.request, std::move(owner));
    pending_.erase(found);
  }

  // Completes whatever has arrived (MPI_Testsome), which is also what lets MPI move rendezvous
  // transfers while the caller computes.
  void progress() override {
    requests_.clear();
    tickets_.clear();
    for (auto& entry : pending_)
      if (!entry.second.done) {
        requests_.push_back(entry.second.request);
        tickets_.push_back(entry.first);
      }
    if (requests_.empty()) return;
    int completed = 0;
    indices_.resize(requests_.size());
    statuses_.resize(requests_.size());
    check(MPI_Testsome(static_cast<int>(requests_.size()), requests_.data(), &completed,
                       indices_.data(), statuses_.data()),
          "MPI_Testsome");
    if (completed == MPI_UNDEFINED) return;
    for (int j = 0; j < completed; ++j) {
      Pending& pending =
          pending_.at(tickets_[static_cast<std::size_t>(indices_[static_cast<std::size_t>(j)])]);
      pending.done = true;
      pending.request = MPI_REQUEST_NULL;
      if (pending.receive)
        check(MPI_Get_count(&statuses_[static_cast<std::size_t>(j)], MPI_BYTE, &pending.received),
              "MPI_Get_count");
    }
  }

  void begin_call(Duration timeout) override {
    if (broken_)
      throw std::runtime_error(
          "dilated_attention: this MpiTransport is unusable: an earlier "
          "agreement timed out (" +
          broken_reason_ + "); build a new one");
    timeout_ = timeout;
    ++epoch_;
    reap(false);
    check(MPI_Irecv(&notice_in_, sizeof(Notice), MPI_BYTE, MPI_ANY_SOURCE, wire_tag(7), comm_,
                    &notice_request_),
          "MPI_Irecv");
  }
  void end_call() noexcept override {
    if (notice_request_ != MPI_REQUEST_NULL) {
      MPI_Cancel(&notice_request_);
      MPI_Wait(&notice_request_, MPI_STATUS_IGNORE);
    }
  }

  // Through buffers the transport owns: should the collective time out, MPI may still write
  // them, so they are then leaked rather than freed (see the header comment).
  void all_gather(const void* mine, void* all, std::size_t bytes) override {
    auto in = std::make_unique<std::vector<unsigned char>>(
        static_cast<const unsigned char*>(mine), static_cast<const unsigned char*>(mine) + bytes);
    auto out =
        std::make_unique<std::vector<unsigned char>>(bytes * static_cast<std::size_t>(size_));
    MPI_Request request = MPI_REQUEST_NULL;
    check(MPI_Iallgather(in->data(), count_of(bytes), MPI_BYTE, out->data(), count_of(bytes),
                         MPI_BYTE, comm_, &request),
          "MPI_Iallgather");
    const Clock::time_point deadline = Clock::now() + timeout_;
    for (;;) {
      int flag = 0;
      check(MPI_Test(&request, &flag, MPI_STATUS_IGNORE), "MPI_Test");
      if (flag) break;
      idle();
      if (Clock::now() > deadline) {
        broken_ = true;
        broken_reason_ = "rank " + std::to_string(rank_) + "'s all_gather";
        in.release();  // deliberately leaked: the collective cannot be cancelled
        out.release();
        throw TransferTimeout("dilated_attention: rank " + std::to_string(rank_) +
                              ": the ranks' agreement did not complete within options.timeout; "
                              "the transport is now unusable");
      }
    }
    std::memcpy(all, out->data(), out->size());
  }

  void notify_failure(const std::string& reason) noexcept override {
    auto notice = std::make_shared<Notice>();
    notice->epoch = epoch_;
    notice->rank = rank_;
    std::strncpy(notice->reason, reason.c_str(), sizeof(notice->reason) - 1);
    for (int peer = 0; peer < size_; ++peer) {
      if (peer == rank_) continue;
      MPI_Request request = MPI_REQUEST_NULL;
      if (MPI_Isend(notice.get(), sizeof(Notice), MPI_BYTE, peer, wire_tag(7), comm_, &request) ==
          MPI_SUCCESS)
        parked_.push_back({request, notice});
    }
  }

  // Transfers parked by abandon that have not completed yet (tests and diagnostics).
  std::size_t parked() const { return parked_.size(); }

 private:
  struct Pending {
    MPI_Request request;
    std::size_t bytes;
    bool receive, done;
    int received;
  };
  struct Notice {
    std::int64_t epoch;
    std::int32_t rank;
    char reason[244];
  };
  struct Parked {
    MPI_Request request;
    std::shared_ptr<void> owner;
  };

  static void check(int code, const char* what) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    throw std::runtime_error(std::string("dilated_attention: ") + what +
                             " failed: " + std::string(text, static_cast<std::size_t>(length)));
  }
  // MPI counts are int; a larger step message would need MPI-4's large-count calls.
  static int count_of(std::size_t bytes) {
    if (bytes > static_cast<std::size_t>(INT_MAX))
      throw std::length_error("dilated_attention: a ring message of " + std::to_string(bytes) +
                              " bytes exceeds MPI's int count; use more ranks");
    return static_cast<int>(bytes);
  }
  int wire_tag(int tag) const {
    if (tag < 0 || tag > 7) throw std::invalid_argument("dilated_attention: tag outside 0..6");
    return static_cast<int>((epoch_ % epochs_) * 8 + tag);
  }
  // Between polls: give the core away, so that ranks sharing cores (oversubscribed tests, a
  // rank's own compute threads) are not starved by a spinning wait.
  static void idle() { std::this_thread::yield(); }
  Ticket remember(const Pending& pending) {
    const Ticket ticket = next_++;
    pending_.emplace(ticket, pending);
    return ticket;
  }
  // Raises PeerFailure when a notice of this call has arrived; stale notices are dropped.
  void check_notice() {
    if (notice_request_ == MPI_REQUEST_NULL) return;
    int flag = 0;
    check(MPI_Test(&notice_request_, &flag, MPI_STATUS_IGNORE), "MPI_Test");
    if (!flag) return;
    const Notice notice = notice_in_;
    check(MPI_Irecv(&notice_in_, sizeof(Notice), MPI_BYTE, MPI_ANY_SOURCE, wire_tag(7), comm_,
                    &notice_request_),
          "MPI_Irecv");
    if (notice.epoch != epoch_) return;
    throw PeerFailure(notice.rank,
                      std::string(notice.reason, strnlen(notice.reason, sizeof(notice.reason))));
  }
  // Cancels and completes `request`; a send that will not complete is parked with its owner.
  void release(MPI_Request& request, std::shared_ptr<void> owner) noexcept {
    if (request == MPI_REQUEST_NULL) return;
    MPI_Cancel(&request);
    for (int spin = 0; spin < 1000; ++spin) {
      int flag = 0;
      if (MPI_Test(&request, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS || flag) return;
    }
    parked_.push_back({request, std::move(owner)});
  }
  // Drops parked transfers that have completed; at destruction, frees the requests of the rest
  // and leaks their buffers on purpose (MPI may still read them).
  void reap(bool final) noexcept {
    for (auto it = parked_.begin(); it != parked_.end();) {
      int flag = 0;
      if (MPI_Test(&it->request, &flag, MPI_STATUS_IGNORE) == MPI_SUCCESS && flag) {
        it = parked_.erase(it);
        continue;
      }
      if (final) {
        MPI_Request_free(&it->request);
        new std::shared_ptr<void>(std::move(it->owner));  // deliberately never freed
        it = parked_.erase(it);
        continue;
      }
      ++it;
    }
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  Ticket next_ = 0;
  std::int64_t epoch_ = 0, epochs_ = 4096;
  Duration timeout_ = std::chrono::minutes(5);
  std::unordered_map<Ticket, Pending> pending_;
  std::list<Parked> parked_;
  Notice notice_in_{};
  MPI_Request notice_request_ = MPI_REQUEST_NULL;
  bool broken_ = false;
  std::string broken_reason_;
  std::vector<MPI_Request> requests_;
  std::vector<Ticket> tickets_;
  std::vector<int> indices_;
  std::vector<MPI_Status> statuses_;
};

}  // namespace dilated_attention::ring
