#pragma once
// The Device policy of the ring's CUDA back ends (ring/cuda/shard.cuh) on the host, for the
// emulation tests: memory is memory, launches run the kernel's blocks one after another
// (emulation::launch), the "stream" is program order. One process-wide lock serialises
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
#include <set>

namespace dilated_attention::testing {

inline std::mutex& emulated_launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

struct EmulatedDevice {
  static void* allocate(std::size_t bytes) { return ::operator new(bytes, std::align_val_t(256)); }
  static void release(void* data) noexcept { ::operator delete(data, std::align_val_t(256)); }
  void upload(void* device, const void* host, std::size_t bytes) const { std::memcpy(device, host, bytes); }
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
  void synchronize() const {}
  void* queue() const { return stream; }
  void* stream = nullptr;  // what the driver hands to the transport's stream hooks
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
