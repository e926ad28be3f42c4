#pragma once
// How ranks move bytes: one small interface, implemented by the in-process transport
// (ring/transport/in_process.hpp: ranks are threads of one process), MPI (ring/mpi.hpp) and NCCL
// (ring/nccl.cuh). Point-to-point transfers carry K/V rows; three per-call operations make a
// call fault safe: begin_call/end_call bracket one ring call (a forward) and give its messages
// tags no other call can match, all_gather is the one small collective the ranks agree through,
// and notify_failure tells the others that this rank gave up, so that none of them waits for its
// messages.
//
// Semantics every transport keeps:
// - post_send / post_recv return at once with a ticket; the buffer must stay alive (and, for a
//   send, unmodified) until wait(ticket) returns or abandon(ticket, owner) took it over.
// - Messages between one ordered pair of ranks with the same tag, within one call, arrive in
//   posting order, and a receive must name exactly the byte count that was sent (a mismatch is
//   a schedule bug and throws std::runtime_error rather than truncating).
// - wait, all_gather: block at most `timeout` (begin_call's argument), then throw
//   TransferTimeout; wait throws PeerFailure as soon as another rank called notify_failure in
//   the same call. A ticket whose wait threw is still pending: release it with abandon.
// - abandon(ticket, owner) never throws and never blocks for long: it cancels the transfer and
//   completes it. When a transport cannot cancel it (an MPI send the peer never matches), the
//   transport keeps `owner` (the buffer) alive until the transfer completes or the transport is
//   destroyed; either way the caller may drop its own reference at once.
// - progress() drives pending transfers without blocking; the driver calls it between compute
//   blocks so that a transfer that needs the sender's attention (a rendezvous) moves meanwhile.
// - Transfers posted between begin_group() and end_group() are issued together: NCCL needs that
//   so that a step's send and receive cannot wait on each other; other transports ignore it.
// - Device streams (for a back end whose buffers are device memory, ring/cuda/forward_backend.cuh):
//   `queue` is a cudaStream_t, opaque here so that this header needs no CUDA. order_sends_after
//   (queue): transfers posted from now on touch their buffers only after the work already
//   enqueued on `queue` -- a send reads after the packing kernels, a receive writes after its
//   buffer's stream-ordered allocation (cudaMallocAsync on `queue`). enqueue_wait(ticket, queue): work enqueued on `queue` from now on
//   runs after the transfer completed, without the host waiting for the device (it may wait for
//   the peer to post); the ticket stays open, wait() or abandon() still completes it. Both return
//   false when the transport cannot order transfers on a device stream (host transports): the
//   caller then synchronises the stream before posting and calls wait() before computing.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

namespace dilated_attention::ring {

// Another rank gave up on this call: it refused its input, saw a different configuration, or
// failed while the call ran. failed_rank() is that rank.
class PeerFailure : public std::runtime_error {
 public:
  PeerFailure(int failed_rank, const std::string& what)
      : std::runtime_error(what), failed_rank_(failed_rank) {}
  int failed_rank() const { return failed_rank_; }

 private:
  int failed_rank_;
};

// A transfer or the agreement collective did not complete within Options::timeout.
class TransferTimeout : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Transport {
 public:
  using Ticket = std::int64_t;
  using Duration = std::chrono::milliseconds;

  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  virtual Ticket post_send(int peer, int tag, const void* data, std::size_t bytes) = 0;
  virtual Ticket post_recv(int peer, int tag, void* data, std::size_t bytes) = 0;
  virtual void wait(Ticket ticket) = 0;
  virtual void abandon(Ticket ticket, std::shared_ptr<void> owner) noexcept = 0;
  virtual void progress() {}
  virtual void begin_group() {}
  virtual void end_group() {}
  virtual bool order_sends_after(void* /*queue*/) { return false; }
  virtual bool enqueue_wait(Ticket /*ticket*/, void* /*queue*/) { return false; }

  // One ring call. Every rank calls begin_call and end_call the same number of times, in the
  // same order; tags of different calls never match. Tags passed to post_* are 0..6.
  virtual void begin_call(Duration timeout) = 0;
  virtual void end_call() noexcept = 0;
  // Every rank contributes `bytes` bytes; `all` receives size() * bytes, rank order.
  virtual void all_gather(const void* mine, void* all, std::size_t bytes) = 0;
  // Best effort, never throws: the other ranks' waits in this call raise PeerFailure(rank()).
  virtual void notify_failure(const std::string& reason) noexcept = 0;
};

// Forwards every call to another transport: derive from it to observe or alter one operation
// (the tests count calls and inject faults this way).
class TransportAdapter : public Transport {
 public:
  explicit TransportAdapter(Transport& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  Ticket post_send(int peer, int tag, const void* data, std::size_t bytes) override {
    return inner_.post_send(peer, tag, data, bytes);
  }
  Ticket post_recv(int peer, int tag, void* data, std::size_t bytes) override {
    return inner_.post_recv(peer, tag, data, bytes);
  }
  void wait(Ticket ticket) override { inner_.wait(ticket); }
  void abandon(Ticket ticket, std::shared_ptr<void> owner) noexcept override {
    inner_.abandon(ticket, std::move(owner));
  }
  void progress() override { inner_.progress(); }
  void begin_group() override { inner_.begin_group(); }
  void end_group() override { inner_.end_group(); }
  bool order_sends_after(void* queue) override { return inner_.order_sends_after(queue); }
  bool enqueue_wait(Ticket ticket, void* queue) override {
    return inner_.enqueue_wait(ticket, queue);
  }
  void begin_call(Duration timeout) override { inner_.begin_call(timeout); }
  void end_call() noexcept override { inner_.end_call(); }
  void all_gather(const void* mine, void* all, std::size_t bytes) override {
    inner_.all_gather(mine, all, bytes);
  }
  void notify_failure(const std::string& reason) noexcept override {
    inner_.notify_failure(reason);
  }

 protected:
  Transport& inner() { return inner_; }

 private:
  Transport& inner_;
};

}  // namespace dilated_attention::ring
