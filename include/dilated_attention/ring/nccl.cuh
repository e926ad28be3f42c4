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
// communication stream after the operation); a device pipeline would instead use event(ticket)
// with cudaStreamWaitEvent on its compute stream. The communicator and stream are borrowed.

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstddef>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "transport.hpp"

namespace dilated_attention::ring {

class NcclTransport final : public Transport {
 public:
  NcclTransport(ncclComm_t communicator, cudaStream_t stream) : comm_(communicator), stream_(stream) {
    check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
    check(ncclCommCount(comm_, &size_), "ncclCommCount");
  }
  NcclTransport(const NcclTransport&) = delete;
  NcclTransport& operator=(const NcclTransport&) = delete;
  ~NcclTransport() override {
    for (auto& entry : events_) cudaEventDestroy(entry.second);
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
  void wait(Ticket ticket) override {
    const auto found = events_.find(ticket);
    if (found == events_.end())
      throw std::logic_error("dilated_attention: wait on an unknown or finished NCCL ticket");
    const cudaEvent_t event = found->second;
    events_.erase(found);
    const cudaError_t status = cudaEventSynchronize(event);
    cudaEventDestroy(event);
    if (status != cudaSuccess)
      throw std::runtime_error(std::string("dilated_attention: NCCL transfer failed: ") +
                               cudaGetErrorString(status));
    ncclResult_t async = ncclSuccess;
    check(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError");
    check(async, "NCCL transfer");
  }
  // The completion event of a posted transfer, for device-side waits (valid until wait()).
  cudaEvent_t event(Ticket ticket) const { return events_.at(ticket); }

 private:
  static void check(ncclResult_t code, const char* what) {
    if (code != ncclSuccess)
      throw std::runtime_error(std::string("dilated_attention: ") + what + " failed: " +
                               ncclGetErrorString(code));
  }
  Ticket issued() {
    const Ticket ticket = next_++;
    cudaEvent_t event;
    if (cudaEventCreateWithFlags(&event, cudaEventDisableTiming) != cudaSuccess)
      throw std::runtime_error("dilated_attention: cudaEventCreate failed");
    events_.emplace(ticket, event);
    if (in_group_) grouped_.push_back(ticket);
    else record(ticket);
    return ticket;
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
};

}  // namespace dilated_attention::ring
