#pragma once
// The Device policy of the ring's CUDA back ends (ring/cuda/shard.cuh) on the host, for the
// emulation tests: memory is memory, launches run the kernel's blocks one after another
// (emulation::launch), the "stream" is program order, and a release is stream-ordered
// (EmulatedMemory: poisoned at once, freed when the stream drains). One process-wide lock serialises
// launches: the emulation's fibers and shared memory are per process, and the ranks are threads.
// Also a transport adapter that claims device ordering, for the driver's stream-ordered path.
// Include after cuda_host_emulation.hpp and the ring's CUDA headers.

#include <dilated_attention/ring/transport/transport.hpp>
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <new>
#include <map>
#include <set>
#include <utility>
#include <vector>

namespace dilated_attention::testing {

inline std::mutex& emulated_launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

// The emulated stream's memory rule, the one CudaStreamDevice follows with cudaFreeAsync: a
// release is stream-ordered. The memory stays allocated until the stream drains (synchronize()
// on the same stream), but it is poisoned at once (every byte 0xFF: NaN floats, index -1), so
// that a kernel launched after the release -- a use after free on a GPU -- reads garbage and
// the test fails. ring::cuda calls return without a final synchronisation, so after a call the
// back end's buffers sit here, released but not freed, until the caller's next synchronize().
struct EmulatedMemory {
  std::mutex mutex;
  std::map<void*, std::size_t> live;                    // allocation -> bytes
  std::vector<std::pair<const void*, void*>> released;  // (stream, allocation), not yet freed
  std::int64_t synchronizations = 0;                    // EmulatedDevice::synchronize() calls
};
inline EmulatedMemory& emulated_memory() {
  static EmulatedMemory memory;  // reachable to the end: never a leak
  return memory;
}

struct EmulatedDevice {
  void* allocate(std::size_t bytes) const {
    void* data = ::operator new(bytes, std::align_val_t(256));
    EmulatedMemory& memory = emulated_memory();
    const std::lock_guard<std::mutex> lock(memory.mutex);
    memory.live[data] = bytes;
    return data;
  }
  void release(void* data) const noexcept {
    EmulatedMemory& memory = emulated_memory();
    const std::lock_guard<std::mutex> lock(memory.mutex);
    const auto found = memory.live.find(data);
    if (found == memory.live.end()) {
      ADD_FAILURE()
          << "release of memory the emulated device did not allocate (or a double release)";
      return;
    }
    std::memset(data, 0xFF, found->second);
    memory.live.erase(found);
    memory.released.emplace_back(stream, data);
  }
  void upload(void* device, const void* host, std::size_t bytes) const {
    std::memcpy(device, host, bytes);
  }
  void zero(void* device, std::size_t bytes) const { std::memset(device, 0, bytes); }
  template <class Params>
  void launch(void (*kernel)(Params), std::int64_t blocks, int threads, std::size_t shared_bytes,
              const Params& params) const {
    EXPECT_LE(shared_bytes, sizeof(ring::device::ring_query_rows));
    const std::lock_guard<std::mutex> lock(emulated_launch_mutex());
    emulation::launch(static_cast<unsigned>(blocks), static_cast<unsigned>(threads),
                      reinterpret_cast<unsigned char*>(ring::device::ring_query_rows), shared_bytes,
                      [&] { kernel(params); });
  }
  // The stream drains: the memory released on it is freed now.
  void synchronize() const {
    EmulatedMemory& memory = emulated_memory();
    const std::lock_guard<std::mutex> lock(memory.mutex);
    ++memory.synchronizations;
    auto& released = memory.released;
    for (auto it = released.begin(); it != released.end();) {
      if (it->first == stream) {
        ::operator delete(it->second, std::align_val_t(256));
        it = released.erase(it);
      } else {
        ++it;
      }
    }
  }
  void* queue() const { return stream; }
  void* stream = nullptr;  // what the driver hands to the transport's stream hooks

  // How many releases on `stream` wait for it to drain; how many synchronize() calls so far.
  static std::size_t pending_releases(const void* stream) {
    EmulatedMemory& memory = emulated_memory();
    const std::lock_guard<std::mutex> lock(memory.mutex);
    std::size_t count = 0;
    for (const auto& entry : memory.released) count += entry.first == stream ? 1 : 0;
    return count;
  }
  static std::int64_t synchronizations() {
    EmulatedMemory& memory = emulated_memory();
    const std::lock_guard<std::mutex> lock(memory.mutex);
    return memory.synchronizations;
  }
};

// A transport that claims device ordering, as the loopback and NCCL transports do: sends are
// "ordered" (program order), a stream wait completes the receive on the host and leaves the
// ticket open until the driver's final wait. Exercises the driver's stream-ordered path.
class StreamOrderedAdapter final : public ring::TransportAdapter {
 public:
  using TransportAdapter::TransportAdapter;
  bool order_sends_after(void*) override {
    ++orderings;
    return true;
  }
  bool enqueue_wait(Ticket ticket, void*) override {
    TransportAdapter::wait(ticket);
    arrived_.insert(ticket);
    ++stream_waits;
    return true;
  }
  void wait(Ticket ticket) override {
    if (arrived_.erase(ticket) != 0) return;
    TransportAdapter::wait(ticket);
  }
  int orderings = 0, stream_waits = 0;

 private:
  std::set<Ticket> arrived_;
};

}  // namespace dilated_attention::testing
