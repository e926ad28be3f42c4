#pragma once
// The NCCL transport (opt-in: link DilatedAttention::nccl; compile with nvcc). One process per
// GPU; ncclSend / ncclRecv of raw bytes on a communication stream, a step's send and receive
// issued inside one ncclGroupStart/ncclGroupEnd (the driver brackets them with begin_group /
// end_group) so that a ring of sends cannot deadlock.
//
// Buffers are device pointers: this transport serves a ring driver whose back end keeps K/V in
// device memory (a CUDA back end; see docs/ring.md for what remains to be built and tested on a
// GPU). NCCL has no tags: point-to-point operations between two ranks match in issue order,
// which the ring driver keeps identical on both sides, so the tag argument is checked for
// nothing and only documents intent.
//
// wait(ticket) blocks the host until the transfer is done (an event recorded on the
// communication stream after the operation). The CUDA ring back end instead orders transfers on
// its compute stream: order_sends_after(compute) makes the communication stream wait for the
// packing kernels, enqueue_wait(ticket, compute) makes the compute stream wait for a receive; no
// host synchronisation per step. Passing the compute stream itself as the communication stream
// is correct too, but then every transfer is serialised with compute. The communicator and
// stream are borrowed.
//
// Faults (ring/transport/transport.hpp). NCCL can neither cancel an operation nor send a side message, so:
// - wait and all_gather poll their event (cudaEventQuery, ncclCommGetAsyncError) until the
//   call's deadline; on timeout or on an asynchronous NCCL error the transport calls
//   ncclCommAbort (which ends every outstanding operation of the communicator) and is broken:
//   later calls throw at begin_call; the application must build a new communicator.
// - abandon aborts the communicator the same way and keeps the buffer's owner until the transport
//   is destroyed, so no device buffer is freed while a kernel of NCCL may still use it.
// - notify_failure aborts the communicator too: the other ranks see no notice, their transfers
//   with this rank end in their own TransferTimeout (or an NCCL error) after options.timeout.
// - all_gather stages the records through a small device buffer (ncclAllGather).

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "transport.hpp"

namespace dilated_attention::ring {

class NcclTransport final : public Transport {
 public:
  NcclTransport(ncclComm_t communicator, cudaStream_t stream)
      : comm_(communicator), stream_(stream) {
    check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
    check(ncclCommCount(comm_, &size_), "ncclCommCount");
  }
  NcclTransport(const NcclTransport&) = delete;
  NcclTransport& operator=(const NcclTransport&) = delete;
  ~NcclTransport() override {
    for (auto& entry : events_) cudaEventDestroy(entry.second);
    if (staging_ != nullptr) cudaFree(staging_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  cudaStream_t stream() const { return stream_; }

  void begin_group() override {
    check(ncclGroupStart(), "ncclGroupStart");
    in_group_ = true;
  }
  void end_group() override {
    check(ncclGroupEnd(), "ncclGroupEnd");
    in_group_ = false;
    // Operations of a group are enqueued at ncclGroupEnd: only now can their completion events
    // be recorded.
    for (const Ticket ticket : grouped_) record(ticket);
    grouped_.clear();
  }

  Ticket post_send(int peer, int /*tag*/, const void* data, std::size_t bytes) override {
    check(ncclSend(data, bytes, ncclUint8, peer, comm_, stream_), "ncclSend");
    return issued();
  }
  Ticket post_recv(int peer, int /*tag*/, void* data, std::size_t bytes) override {
    check(ncclRecv(data, bytes, ncclUint8, peer, comm_, stream_), "ncclRecv");
    return issued();
  }
  bool order_sends_after(void* queue) override {
    const auto compute = static_cast<cudaStream_t>(queue);
    if (compute == stream_) return true;
    cudaEvent_t packed;
    if (cudaEventCreateWithFlags(&packed, cudaEventDisableTiming) != cudaSuccess)
      throw std::runtime_error("dilated_attention: cudaEventCreate failed");
    const bool ok = cudaEventRecord(packed, compute) == cudaSuccess &&
                    cudaStreamWaitEvent(stream_, packed, 0) == cudaSuccess;
    cudaEventDestroy(packed);  // released once the wait is done
    if (!ok)
      throw std::runtime_error(
          "dilated_attention: ordering NCCL sends after the compute stream failed");
    return true;
  }
  bool enqueue_wait(Ticket ticket, void* queue) override {
    const auto found = events_.find(ticket);
    if (found == events_.end() || in_group_)
      throw std::logic_error(
          "dilated_attention: enqueue_wait on an unknown or finished NCCL ticket, or inside a "
          "group (its event is recorded at end_group)");
    if (cudaStreamWaitEvent(static_cast<cudaStream_t>(queue), found->second, 0) != cudaSuccess)
      throw std::runtime_error("dilated_attention: cudaStreamWaitEvent on an NCCL transfer failed");
    return true;
  }
  void wait(Ticket ticket) override {
    const auto found = events_.find(ticket);
    if (found == events_.end())
      throw std::logic_error("dilated_attention: wait on an unknown or finished NCCL ticket");
    poll(found->second, "an NCCL transfer");
    cudaEventDestroy(found->second);
    events_.erase(found);
  }
  void abandon(Ticket ticket, std::shared_ptr<void> owner) noexcept override {
    const auto found = events_.find(ticket);
    if (found == events_.end()) return;
    if (cudaEventQuery(found->second) != cudaSuccess) {
      abort("a transfer was abandoned");
      kept_.push_back(std::move(owner));
    }
    cudaEventDestroy(found->second);
    events_.erase(found);
  }
  void begin_call(Duration timeout) override {
    if (broken_)
      throw std::runtime_error(
          "dilated_attention: this NcclTransport's communicator was aborted (" + broken_reason_ +
          "); build a new communicator and transport");
    timeout_ = timeout;
  }
  void end_call() noexcept override {}
  void all_gather(const void* mine, void* all, std::size_t bytes) override {
    const std::size_t total = bytes * static_cast<std::size_t>(size_ + 1);
    if (staging_bytes_ < total) {
      if (staging_ != nullptr) cudaFree(staging_);
      staging_ = nullptr;
      staging_bytes_ = 0;
      if (cudaMalloc(&staging_, total) != cudaSuccess)
        throw std::runtime_error("dilated_attention: cudaMalloc of the agreement buffer failed");
      staging_bytes_ = total;
    }
    unsigned char* in = static_cast<unsigned char*>(staging_);
    unsigned char* out = in + bytes;
    if (cudaMemcpyAsync(in, mine, bytes, cudaMemcpyHostToDevice, stream_) != cudaSuccess)
      throw std::runtime_error("dilated_attention: cudaMemcpyAsync failed");
    check(ncclAllGather(in, out, bytes, ncclUint8, comm_, stream_), "ncclAllGather");
    cudaEvent_t done;
    if (cudaEventCreateWithFlags(&done, cudaEventDisableTiming) != cudaSuccess)
      throw std::runtime_error("dilated_attention: cudaEventCreate failed");
    cudaEventRecord(done, stream_);
    try {
      poll(done, "the ranks' agreement");
    } catch (...) {
      cudaEventDestroy(done);
      staging_ = nullptr;  // deliberately leaked: NCCL may still write it
      staging_bytes_ = 0;
      throw;
    }
    cudaEventDestroy(done);
    if (cudaMemcpy(all, out, bytes * static_cast<std::size_t>(size_), cudaMemcpyDeviceToHost) !=
        cudaSuccess)
      throw std::runtime_error("dilated_attention: cudaMemcpy of the agreement failed");
  }
  void notify_failure(const std::string& reason) noexcept override { abort(reason); }

  // The completion event of a posted transfer, for device-side waits (valid until wait()).
  cudaEvent_t event(Ticket ticket) const { return events_.at(ticket); }

 private:
  static void check(ncclResult_t code, const char* what) {
    if (code != ncclSuccess)
      throw std::runtime_error(std::string("dilated_attention: ") + what +
                               " failed: " + ncclGetErrorString(code));
  }
  Ticket issued() {
    const Ticket ticket = next_++;
    cudaEvent_t event;
    if (cudaEventCreateWithFlags(&event, cudaEventDisableTiming) != cudaSuccess)
      throw std::runtime_error("dilated_attention: cudaEventCreate failed");
    events_.emplace(ticket, event);
    if (in_group_)
      grouped_.push_back(ticket);
    else
      record(ticket);
    return ticket;
  }
  // Waits for `event` until the deadline, watching for asynchronous NCCL errors; aborts the
  // communicator on either failure.
  void poll(cudaEvent_t event, const char* what) {
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    for (;;) {
      const cudaError_t status = cudaEventQuery(event);
      if (status == cudaSuccess) return;
      if (status != cudaErrorNotReady) {
        abort(cudaGetErrorString(status));
        throw std::runtime_error(std::string("dilated_attention: ") + what +
                                 " failed: " + cudaGetErrorString(status));
      }
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async != ncclSuccess && async != ncclInProgress) {
        abort(ncclGetErrorString(async));
        throw std::runtime_error(std::string("dilated_attention: ") + what +
                                 " failed: " + ncclGetErrorString(async));
      }
      if (std::chrono::steady_clock::now() > deadline) {
        abort("a timeout");
        throw TransferTimeout(std::string("dilated_attention: rank ") + std::to_string(rank_) +
                              ": " + what +
                              " did not complete within options.timeout; the communicator "
                              "was aborted");
      }
    }
  }
  void abort(const std::string& reason) noexcept {
    if (broken_) return;
    broken_ = true;
    broken_reason_ = reason;
    ncclCommAbort(comm_);
  }
  void record(Ticket ticket) {
    if (cudaEventRecord(events_.at(ticket), stream_) != cudaSuccess)
      throw std::runtime_error("dilated_attention: cudaEventRecord failed");
  }

  ncclComm_t comm_;
  cudaStream_t stream_;
  int rank_ = 0, size_ = 1;
  bool in_group_ = false;
  Ticket next_ = 0;
  std::vector<Ticket> grouped_;
  std::unordered_map<Ticket, cudaEvent_t> events_;
  Duration timeout_ = std::chrono::minutes(5);
  bool broken_ = false;
  std::string broken_reason_;
  std::vector<std::shared_ptr<void>> kept_;  // buffers of abandoned transfers
  void* staging_ = nullptr;
  std::size_t staging_bytes_ = 0;
};

}  // namespace dilated_attention::ring
