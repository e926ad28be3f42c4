#pragma once
// The MPI transport (opt-in: link DilatedAttention::mpi). CPU ranks in separate processes;
// MPI_Isend / MPI_Irecv of raw bytes on a private duplicate of the caller's communicator, so the
// ring's tags can never match the application's own messages.
//
// Ownership: the transport duplicates the communicator in its constructor and frees the duplicate
// in its destructor; both are collective over the communicator. MPI must be initialised before
// and finalised after the transport's lifetime. Errors on the duplicate return instead of
// aborting, and surface as std::runtime_error.

#include <mpi.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>

#include "transport.hpp"

namespace dilated_attention::ring {

class MpiTransport final : public Transport {
 public:
  explicit MpiTransport(MPI_Comm communicator = MPI_COMM_WORLD) {
    check(MPI_Comm_dup(communicator, &comm_), "MPI_Comm_dup");
    check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }
  MpiTransport(const MpiTransport&) = delete;
  MpiTransport& operator=(const MpiTransport&) = delete;
  ~MpiTransport() override {
    for (auto& entry : pending_) MPI_Cancel(&entry.second.request);  // only after an exception
    MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  MPI_Comm communicator() const { return comm_; }

  Ticket post_send(int peer, int tag, const void* data, std::size_t bytes) override {
    Pending pending{MPI_REQUEST_NULL, bytes, false};
    check(MPI_Isend(data, count_of(bytes), MPI_BYTE, peer, tag, comm_, &pending.request), "MPI_Isend");
    return remember(pending);
  }
  Ticket post_recv(int peer, int tag, void* data, std::size_t bytes) override {
    Pending pending{MPI_REQUEST_NULL, bytes, true};
    check(MPI_Irecv(data, count_of(bytes), MPI_BYTE, peer, tag, comm_, &pending.request), "MPI_Irecv");
    return remember(pending);
  }
  void wait(Ticket ticket) override {
    const auto found = pending_.find(ticket);
    if (found == pending_.end())
      throw std::logic_error("dilated_attention: wait on an unknown or finished MPI ticket");
    Pending pending = found->second;
    pending_.erase(found);
    MPI_Status status;
    check(MPI_Wait(&pending.request, &status), "MPI_Wait");
    if (pending.receive) {
      int received = 0;
      check(MPI_Get_count(&status, MPI_BYTE, &received), "MPI_Get_count");
      if (static_cast<std::size_t>(received) != pending.bytes)
        throw std::runtime_error("dilated_attention: rank " + std::to_string(rank_) + " expected " +
                                 std::to_string(pending.bytes) + " bytes but received " +
                                 std::to_string(received));
    }
  }

 private:
  struct Pending {
    MPI_Request request;
    std::size_t bytes;
    bool receive;
  };
  static void check(int code, const char* what) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    throw std::runtime_error(std::string("dilated_attention: ") + what + " failed: " +
                             std::string(text, static_cast<std::size_t>(length)));
  }
  // MPI counts are int; a larger step message would need MPI-4's large-count calls.
  static int count_of(std::size_t bytes) {
    if (bytes > static_cast<std::size_t>(INT_MAX))
      throw std::length_error("dilated_attention: a ring message of " + std::to_string(bytes) +
                              " bytes exceeds MPI's int count; use more ranks");
    return static_cast<int>(bytes);
  }
  Ticket remember(const Pending& pending) {
    const Ticket ticket = next_++;
    pending_.emplace(ticket, pending);
    return ticket;
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  Ticket next_ = 0;
  std::unordered_map<Ticket, Pending> pending_;
};

}  // namespace dilated_attention::ring
