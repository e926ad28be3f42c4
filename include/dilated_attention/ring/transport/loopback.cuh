#pragma once
// The loopback CUDA transport: P ranks on one GPU in one process, each rank a host thread with
// its own compute stream and device buffers (ring/transport/transport.hpp states the contract). It lets
// the CUDA back end run a real ring, P > 1, on a single device.
//
// A transfer is a Link matched by (receiver, sender, call's tag, sequence number), as the
// in-process transport matches messages. post_send records an event (`ready`) on the sender's
// stream (the one order_sends_after named: the packing kernels are before it), post_recv one
// (`posted`) on the receiver's (its buffer's stream-ordered allocation is before it); whichever
// side posts second enqueues, on the receiver's copy stream, cudaStreamWaitEvent(ready) and
// (posted), a cudaMemcpyAsync device to device, and an event `copied`. enqueue_wait(ticket, stream) blocks the
// host only until both sides posted, then makes `stream` wait for `copied`; wait(ticket) also
// waits (polling, to the deadline) until `copied` completed on the device. So the copy runs on
// its own stream while the ranks compute, and no rank synchronises with the device per step.
//
// Calls, agreement and failures go through an InProcessWorld: per-call tags and purges,
// all_gather, notify_failure (waits raise PeerFailure), kill (a rank's thread died). abandon
// never blocks: an unmatched link is withdrawn (no copy will ever touch its buffer); a matched
// one keeps its buffer's owner until `copied` completed (checked at begin_call, waited for in
// the destructor).

#include <cuda_runtime.h>

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../../cuda/error.cuh"
#include "in_process.hpp"
#include "transport.hpp"

namespace dilated_attention::ring {

class LoopbackWorld {
 public:
  using Clock = std::chrono::steady_clock;
  using Key = std::tuple<int, int, std::int64_t, std::int64_t>;  // to, from, wire tag, sequence

  struct Link {
    Key key;
    const void* source = nullptr;
    void* destination = nullptr;
    std::size_t send_bytes = 0, recv_bytes = 0;
    bool sent = false, received = false, matched = false;
    std::string error;
    // ready: the sender's stream at the send (the packing before it); posted: the receiver's
    // stream at the receive (the buffer's stream-ordered allocation before it: a cudaMallocAsync
    // may hand out memory that work still queued on that stream reads until its cudaFreeAsync).
    cudaEvent_t ready = nullptr, posted = nullptr, copied = nullptr;
    ~Link() {
      if (ready != nullptr) cudaEventDestroy(ready);
      if (posted != nullptr) cudaEventDestroy(posted);
      if (copied != nullptr) cudaEventDestroy(copied);
    }
  };

  // Every rank uses the device current when the world is built.
  explicit LoopbackWorld(int num_ranks) : control_(num_ranks) {
    dilated_attention::cuda::check(cudaGetDevice(&device_), "cudaGetDevice");
    for (int p = 0; p < num_ranks; ++p) {
      cudaStream_t stream = nullptr;
      dilated_attention::cuda::check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                                     "cudaStreamCreate (loopback copies)");
      copy_streams_.push_back(stream);
    }
  }
  LoopbackWorld(const LoopbackWorld&) = delete;
  LoopbackWorld& operator=(const LoopbackWorld&) = delete;
  ~LoopbackWorld() {
    for (cudaStream_t stream : copy_streams_) {
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
    }
  }
  int size() const { return control_.size(); }
  int device() const { return device_; }
  InProcessWorld& control() { return control_; }

  // One side of a transfer; the copy is enqueued when the other side is there too.
  std::shared_ptr<Link> post(const Key& key, bool send, const void* source, void* destination,
                             std::size_t bytes, cudaStream_t poster_stream) {
    cudaEvent_t ready = nullptr;  // either side's: the copy waits for both
    dilated_attention::cuda::check(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming),
                                   "cudaEventCreate");
    const cudaError_t status = cudaEventRecord(ready, poster_stream);
    if (status != cudaSuccess) cudaEventDestroy(ready);
    dilated_attention::cuda::check(
        status, send ? "cudaEventRecord (loopback send)" : "cudaEventRecord (loopback receive)");
    std::shared_ptr<Link> link;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      std::shared_ptr<Link>& slot = links_[key];
      if (!slot) {
        slot = std::make_shared<Link>();
        slot->key = key;
      }
      link = slot;
      if (send) {
        link->source = source, link->send_bytes = bytes, link->ready = ready, link->sent = true;
      } else {
        link->destination = destination, link->recv_bytes = bytes, link->posted = ready,
        link->received = true;
      }
      if (link->sent && link->received) {
        links_.erase(key);
        enqueue_copy(*link);
      }
    }
    ready_.notify_all();
    return link;
  }

  // Blocks until both sides of `link` posted; throws as the in-process transport would.
  void await_match(int rank, std::int64_t epoch, const Link& link, Clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!link.matched) {
      lock.unlock();
      control_.check_failures(rank, epoch);
      lock.lock();
      if (link.matched) break;
      if (Clock::now() > deadline)
        throw TransferTimeout("dilated_attention: rank " + std::to_string(rank) +
                              ": a loopback transfer with rank " +
                              std::to_string(peer_of(link, rank)) +
                              " was not posted by that rank within options.timeout");
      ready_.wait_for(lock, std::chrono::milliseconds(2));
    }
    if (!link.error.empty()) throw std::runtime_error(link.error);
  }

  // Withdraws an unmatched link (true); false when its copy is already enqueued.
  bool withdraw(Link& link) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (link.matched) return false;
    const auto found = links_.find(link.key);
    if (found != links_.end() && found->second.get() == &link) links_.erase(found);
    return true;
  }

  // Drops the unmatched links addressed to `to` by calls before `epoch` (wire tags epoch*8+tag).
  void purge_before(int to, std::int64_t epoch) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = links_.begin(); it != links_.end();)
      it = std::get<0>(it->first) == to && std::get<2>(it->first) < epoch * 8 ? links_.erase(it)
                                                                              : std::next(it);
  }

  void kill() {
    control_.kill();
    ready_.notify_all();
  }

 private:
  static int peer_of(const Link& link, int rank) {
    return std::get<0>(link.key) == rank ? std::get<1>(link.key) : std::get<0>(link.key);
  }
  // Called with the lock held, once per link.
  void enqueue_copy(Link& link) {
    link.matched = true;
    if (link.send_bytes != link.recv_bytes) {
      link.error = "dilated_attention: rank " + std::to_string(std::get<0>(link.key)) +
                   " expected " + std::to_string(link.recv_bytes) + " bytes from rank " +
                   std::to_string(std::get<1>(link.key)) + " but " +
                   std::to_string(link.send_bytes) + " were sent";
      return;
    }
    const cudaStream_t stream = copy_streams_[static_cast<std::size_t>(std::get<0>(link.key))];
    cudaError_t status = cudaEventCreateWithFlags(&link.copied, cudaEventDisableTiming);
    if (status == cudaSuccess) status = cudaStreamWaitEvent(stream, link.ready, 0);
    if (status == cudaSuccess) status = cudaStreamWaitEvent(stream, link.posted, 0);
    if (status == cudaSuccess && link.send_bytes != 0)
      status = cudaMemcpyAsync(link.destination, link.source, link.send_bytes,
                               cudaMemcpyDeviceToDevice, stream);
    if (status == cudaSuccess) status = cudaEventRecord(link.copied, stream);
    if (status != cudaSuccess)
      link.error =
          std::string("dilated_attention: loopback copy failed: ") + cudaGetErrorString(status);
  }

  InProcessWorld control_;
  int device_ = 0;
  std::vector<cudaStream_t> copy_streams_;  // per receiving rank
  std::mutex mutex_;
  std::condition_variable ready_;
  std::map<Key, std::shared_ptr<Link>> links_;  // posted by one side only
};

class LoopbackTransport final : public Transport {
 public:
  // `stream`: where sends wait for their data until order_sends_after names another stream.
  LoopbackTransport(LoopbackWorld& world, int rank, cudaStream_t stream = nullptr)
      : world_(world), rank_(rank), send_stream_(stream) {
    if (rank < 0 || rank >= world.size())
      throw std::invalid_argument("dilated_attention: rank = " + std::to_string(rank) +
                                  " is out of range: ranks are 0.." +
                                  std::to_string(world.size() - 1));
  }
  LoopbackTransport(const LoopbackTransport&) = delete;
  LoopbackTransport& operator=(const LoopbackTransport&) = delete;
  ~LoopbackTransport() override { release_parked(true); }

  int rank() const override { return rank_; }
  int size() const override { return world_.size(); }

  Ticket post_send(int peer, int tag, const void* data, std::size_t bytes) override {
    return post(peer, tag, true, data, nullptr, bytes);
  }
  Ticket post_recv(int peer, int tag, void* data, std::size_t bytes) override {
    return post(peer, tag, false, nullptr, data, bytes);
  }
  bool order_sends_after(void* queue) override {
    send_stream_ = static_cast<cudaStream_t>(queue);
    return true;
  }
  bool enqueue_wait(Ticket ticket, void* queue) override {
    const LoopbackWorld::Link& link = matched(ticket);
    dilated_attention::cuda::check(
        cudaStreamWaitEvent(static_cast<cudaStream_t>(queue), link.copied, 0),
        "cudaStreamWaitEvent (loopback receive)");
    return true;
  }
  void wait(Ticket ticket) override {
    const LoopbackWorld::Link& link = matched(ticket);
    const auto deadline = LoopbackWorld::Clock::now() + timeout_;
    for (;;) {
      const cudaError_t status = cudaEventQuery(link.copied);
      if (status == cudaSuccess) break;
      if (status != cudaErrorNotReady) dilated_attention::cuda::check(status, "loopback copy");
      if (LoopbackWorld::Clock::now() > deadline)
        throw TransferTimeout("dilated_attention: rank " + std::to_string(rank_) +
                              ": a loopback copy did not complete within options.timeout");
      std::this_thread::yield();
    }
    tickets_.erase(ticket);
  }
  void abandon(Ticket ticket, std::shared_ptr<void> owner) noexcept override {
    const auto found = tickets_.find(ticket);
    if (found == tickets_.end()) return;
    if (!world_.withdraw(*found->second)) parked_.emplace_back(found->second, std::move(owner));
    tickets_.erase(found);
  }

  void begin_call(Duration timeout) override {
    release_parked(false);
    timeout_ = timeout;
    ++epoch_;
    tickets_.clear();
    sent_.clear();
    received_.clear();
    world_.purge_before(rank_, epoch_);
    world_.control().purge_before(rank_, epoch_);
  }
  void end_call() noexcept override {}
  void all_gather(const void* mine, void* all, std::size_t bytes) override {
    world_.control().gather(rank_, gathers_++, mine, all, bytes,
                            LoopbackWorld::Clock::now() + timeout_);
  }
  void notify_failure(const std::string& reason) noexcept override {
    try {
      world_.control().notify(epoch_, rank_, reason);
    } catch (...) {  // best effort: the others then end in their timeout
    }
  }

 private:
  Ticket post(int peer, int tag, bool send, const void* source, void* destination,
              std::size_t bytes) {
    if (peer < 0 || peer >= world_.size())
      throw std::invalid_argument("dilated_attention: peer = " + std::to_string(peer) +
                                  " is out of range: ranks are 0.." +
                                  std::to_string(world_.size() - 1));
    if (tag < 0 || tag > 6)
      throw std::invalid_argument("dilated_attention: tag = " + std::to_string(tag) +
                                  " is outside 0..6");
    const std::int64_t wire = epoch_ * 8 + tag;
    std::int64_t& sequence = (send ? sent_ : received_)[{peer, wire}];
    const LoopbackWorld::Key key = send ? LoopbackWorld::Key{peer, rank_, wire, sequence}
                                        : LoopbackWorld::Key{rank_, peer, wire, sequence};
    auto link = world_.post(key, send, source, destination, bytes, send_stream_);
    ++sequence;
    tickets_.emplace(next_, std::move(link));
    return next_++;
  }
  // The ticket's link once both sides posted (throws TransferTimeout, PeerFailure, a size error).
  const LoopbackWorld::Link& matched(Ticket ticket) {
    const auto found = tickets_.find(ticket);
    if (found == tickets_.end())
      throw std::logic_error("dilated_attention: wait on an unknown or finished loopback ticket");
    world_.await_match(rank_, epoch_, *found->second, LoopbackWorld::Clock::now() + timeout_);
    return *found->second;
  }
  void release_parked(bool block) noexcept {
    for (auto it = parked_.begin(); it != parked_.end();) {
      cudaEvent_t copied = it->first->copied;
      const bool done = copied == nullptr || (block ? cudaEventSynchronize(copied)
                                                    : cudaEventQuery(copied)) != cudaErrorNotReady;
      it = done ? parked_.erase(it) : std::next(it);
    }
  }

  LoopbackWorld& world_;
  int rank_;
  cudaStream_t send_stream_;
  Ticket next_ = 0;
  std::int64_t epoch_ = 0, gathers_ = 0;
  Duration timeout_ = std::chrono::minutes(5);
  std::unordered_map<Ticket, std::shared_ptr<LoopbackWorld::Link>> tickets_;
  std::map<std::pair<int, std::int64_t>, std::int64_t> sent_, received_;  // per (peer, wire tag)
  std::vector<std::pair<std::shared_ptr<LoopbackWorld::Link>, std::shared_ptr<void>>> parked_;
};

// Runs body(transport, stream) on num_ranks host threads of one GPU (the current device), each
// with its own non-blocking stream, and rethrows the first real error after all have finished
// (as run_in_process). A rank whose body throws kills the world so that no rank waits forever.
template <class Body>
void run_in_loopback(int num_ranks, Body&& body) {
  LoopbackWorld world(num_ranks);
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(num_ranks));
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(num_ranks));
  for (int p = 0; p < num_ranks; ++p)
    threads.emplace_back([&, p] {
      cudaStream_t stream = nullptr;
      try {
        dilated_attention::cuda::check(cudaSetDevice(world.device()), "cudaSetDevice");
        dilated_attention::cuda::check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                                       "cudaStreamCreate (loopback rank)");
        LoopbackTransport transport(world, p, stream);
        body(static_cast<Transport&>(transport), stream);
      } catch (...) {
        errors[static_cast<std::size_t>(p)] = std::current_exception();
        world.kill();
      }
      if (stream != nullptr) {
        cudaStreamSynchronize(stream);
        cudaStreamDestroy(stream);
      }
    });
  for (std::thread& thread : threads) thread.join();
  detail::rethrow_first_cause(errors);
}

}  // namespace dilated_attention::ring
