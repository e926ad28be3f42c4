#pragma once
// What the ring's CPU back ends (forward: ring/cpu/forward_backend.hpp, backward:
// ring/cpu/backward_backend.hpp) share: one rank's rows of Q, K and V addressed by global
// position, host message buffers, the packing of K/V rows into a message, and a static thread
// loop over work units.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "../../config.hpp"
#include "../../cpu/attend.hpp"
#include "../../cpu/kernels/isa.hpp"
#include "../../pattern.hpp"
#include "../driver/layout.hpp"

namespace dilated_attention::ring {

template <class T>
class CpuShard {
 public:
  using Scalar = T;
  using Buffer = std::vector<T>;

  // local: the shard's shape (seq_len = N / P); chunks: which global rows the views hold
  // (ring/driver/layout.hpp); threads: resolved (positive); isa: CpuOptions::isa (automatic:
  // DILATED_ATTENTION_CPU_ISA, else the best this CPU runs).
  CpuShard(const Shape& local, std::vector<Chunk> chunks, View<const T> q, View<const T> k,
           View<const T> v, int threads, CpuIsa isa = CpuIsa::automatic)
      : shape_(local),
        chunks_(std::move(chunks)),
        q_(q),
        k_(k),
        v_(v),
        threads_(std::max(1, threads)),
        isa_(isa) {}

  Buffer make_buffer(std::size_t elements) const { return Buffer(elements); }
  static void* bytes(Buffer& buffer) { return buffer.data(); }
  static std::size_t element_size() { return sizeof(T); }

  // K rows then V rows of (batch b, kv head g) at global positions `rows`, each head_dim wide,
  // written at `destination + element_offset`.
  void pack(Buffer& destination, std::size_t element_offset, std::int64_t b, std::int64_t g,
            const Progression& rows) const {
    const std::int64_t dim = shape_.head_dim;
    T* out = destination.data() + element_offset;
    for (const View<const T>* source : {&k_, &v_})
      for (std::int64_t j = 0; j < rows.count; ++j) {
        const T* row = source->data + b * source->batch_stride +
                       local_of(rows.at(j)) * source->seq_stride + g * source->head_stride;
        out = std::copy(row, row + dim, out);
      }
  }

 protected:
  // Runs body(unit, workspace) for units 0..count-1. The schedule is static (thread t takes
  // units t, t + threads, ...) so that the calling thread always computes, and so drives the
  // transport's progress between blocks (ring/driver/exchange.hpp). The instruction set is resolved
  // here, on the calling thread, so that a bad DILATED_ATTENTION_CPU_ISA raises
  // std::invalid_argument to the caller; a worker's exception is carried back and rethrown here
  // after every worker has joined, never left to terminate. make_workspace(isa) builds one
  // thread's scratch.
  template <class MakeWorkspace, class Body>
  void run_units(std::int64_t count, MakeWorkspace&& make_workspace, Body&& body) const {
    const CpuIsa isa = cpu::resolve_isa(isa_);
    std::exception_ptr error;
    std::mutex error_mutex;
    std::atomic<bool> failed{false};
    const auto work = [&](int thread) {
      try {
        auto workspace = make_workspace(isa);
        for (std::int64_t unit = thread; unit < count && !failed.load(std::memory_order_relaxed);
             unit += threads_)
          body(unit, workspace);
      } catch (...) {
        const std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        failed.store(true, std::memory_order_relaxed);
      }
    };
    std::vector<std::thread> pool;
    const int helpers = static_cast<int>(std::min<std::int64_t>(threads_, count)) - 1;
    try {
      for (int t = 1; t <= helpers; ++t) pool.emplace_back(work, t);
    } catch (...) {
      failed.store(true, std::memory_order_relaxed);  // could not start a thread: stop, report
      for (std::thread& thread : pool) thread.join();
      throw;
    }
    work(0);
    for (std::thread& thread : pool) thread.join();
    if (error) std::rethrow_exception(error);
  }

  // Rows `rows` (global positions, inside one chunk) of `view` for (batch b, head), with their
  // global positions.
  template <class U>
  cpu::StridedRows<U> local_rows(const View<const U>& view, std::int64_t b, std::int64_t head,
                                 const Progression& rows) const {
    return {view.data + b * view.batch_stride + local_of(rows.first) * view.seq_stride +
                head * view.head_stride,
            rows.stride * view.seq_stride, rows};
  }
  // The local row of global position x (a progression never crosses a chunk: the schedule
  // cuts every one at chunk bounds).
  std::int64_t local_of(std::int64_t x) const { return local_row(chunks_, x); }

  Shape shape_;
  std::vector<Chunk> chunks_;
  View<const T> q_, k_, v_;
  int threads_;
  CpuIsa isa_;
};

}  // namespace dilated_attention::ring
