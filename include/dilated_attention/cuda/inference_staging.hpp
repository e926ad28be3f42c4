#pragma once
// Pinned host staging for the inference forms' per-call table (cuda/inference.cuh): the call
// copies its table into a pinned buffer and uploads it with cudaMemcpyAsync from there, which
// is asynchronous for pinned memory (from pageable memory the driver may first wait for the
// stream). A buffer is reused only once the event recorded after its upload has completed, so an
// upload still in flight never sees its bytes change: decode steps enqueued back to back keep
// the host ahead of the GPU.
//
// Buffers are per device (the event must belong to the stream's device), grow to the largest
// table seen, and live until the process ends (never freed: no CUDA call after the runtime's
// own teardown). At most max_slots per device; past that a call waits for the slot it reuses.
// Thread-safe (one mutex; the CUDA calls under it are cheap: query, record, and the rare
// allocation). Plain C++ over the CUDA runtime API, tested with a fake runtime
// (tests/cuda/cuda_inference_staging_test.cpp).

#include <cuda_runtime_api.h>

#include <cstddef>
#include <mutex>
#include <vector>

#include "error.cuh"

namespace dilated_attention::cuda::detail {

class HostStaging {
 public:
  static constexpr int max_slots = 16;
  static constexpr std::size_t min_bytes = 4096;

  HostStaging() = default;
  HostStaging(const HostStaging&) = delete;
  HostStaging& operator=(const HostStaging&) = delete;
  // Only a private instance is ever destroyed (tests): waits for its uploads, frees everything.
  ~HostStaging() {
    for (Slot& s : slots_) {
      if (s.recorded) (void)cudaEventSynchronize(s.done);
      if (s.done != nullptr) (void)cudaEventDestroy(s.done);
      if (s.host != nullptr) (void)cudaFreeHost(s.host);
    }
  }

  // The process-wide instance, never destroyed.
  static HostStaging& instance() {
    static HostStaging* staging = new HostStaging;
    return *staging;
  }

  // A pinned buffer of at least `bytes` on `device` that no upload still reads; `slot` names it
  // for release(). Throws std::runtime_error on a CUDA failure.
  void* acquire(std::size_t bytes, int device, int& slot) {
    std::lock_guard<std::mutex> lock(mutex_);
    int mine = 0, fallback = -1;
    for (int i = 0; i < static_cast<int>(slots_.size()); ++i) {
      Slot& s = slots_[static_cast<std::size_t>(i)];
      if (s.device != device || s.busy) continue;
      ++mine;
      if (fallback < 0) fallback = i;
      if (s.bytes >= bytes && completed(s)) return take(i, slot);
    }
    if (mine < max_slots || fallback < 0) {
      slots_.push_back(Slot{});
      Slot& s = slots_.back();
      s.device = device;
      check(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming), "cudaEventCreateWithFlags");
      grow(s, bytes);
      return take(static_cast<int>(slots_.size()) - 1, slot);
    }
    // Every slot of this device is in use or in flight: wait for one and reuse it.
    Slot& s = slots_[static_cast<std::size_t>(fallback)];
    if (s.recorded) check(cudaEventSynchronize(s.done), "cudaEventSynchronize (staging)");
    s.recorded = false;
    if (s.bytes < bytes) grow(s, bytes);
    return take(fallback, slot);
  }

  // The upload from `slot` is enqueued on `stream`: the slot is reusable once the stream gets
  // past this point.
  void release_after(int slot, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    Slot& s = slots_[static_cast<std::size_t>(slot)];
    s.busy = false;
    const cudaError_t status = cudaEventRecord(s.done, stream);
    s.recorded = status == cudaSuccess;
    if (!s.recorded) {
      // Without the event nothing would protect the bytes: keep the slot out of use for good.
      s.busy = true;
      check(status, "cudaEventRecord (staging)");
    }
  }

  // Nothing was enqueued from `slot` (a failed upload): reusable at once.
  void release_unused(int slot) {
    std::lock_guard<std::mutex> lock(mutex_);
    slots_[static_cast<std::size_t>(slot)].busy = false;
  }

  std::size_t slot_count() {
    std::lock_guard<std::mutex> lock(mutex_);
    return slots_.size();
  }

 private:
  struct Slot {
    void* host = nullptr;
    std::size_t bytes = 0;
    int device = -1;
    cudaEvent_t done = nullptr;
    bool busy = false;      // between acquire and release
    bool recorded = false;  // `done` marks the end of its last upload
  };

  // Whether the slot's last upload has finished. cudaErrorNotReady is not an error: it is
  // taken back from the runtime's last-error state, which the caller's checks read.
  static bool completed(const Slot& s) {
    if (!s.recorded) return true;
    const cudaError_t status = cudaEventQuery(s.done);
    if (status == cudaSuccess) return true;
    if (status == cudaErrorNotReady) {
      (void)cudaGetLastError();
      return false;
    }
    check(status, "cudaEventQuery (staging)");
    return false;
  }

  static void grow(Slot& s, std::size_t bytes) {
    if (s.host != nullptr) check(cudaFreeHost(s.host), "cudaFreeHost (staging)");
    s.host = nullptr;
    s.bytes = 0;
    const std::size_t size = bytes < min_bytes ? min_bytes : bytes;
    check(cudaMallocHost(&s.host, size), "cudaMallocHost (staging)");
    s.bytes = size;
  }

  void* take(int i, int& slot) {
    Slot& s = slots_[static_cast<std::size_t>(i)];
    s.busy = true;
    slot = i;
    return s.host;
  }

  std::mutex mutex_;
  std::vector<Slot> slots_;
};

}  // namespace dilated_attention::cuda::detail
