#pragma once
// A host emulation of just enough of the CUDA execution model to run the forward kernels' own
// source on a CPU, so that machines without a GPU (CI, development boxes) still execute the
// kernels' index math, masking, online softmax, pipeline bookkeeping and tensor-core fragment
// layouts against the fp64 reference.
//
// - Each thread of a block is a fiber (ucontext) on the calling thread; blocks run one after
//   another. __syncthreads and every warp collective are barriers between fibers.
// - ldmatrix and mma.sync m16n8k16 are emulated from the PTX ISA's definition of their fragment
//   layouts, written here independently of the kernel: element (row, col) of A lives in lane
//   (row % 8) * 4 + (col % 8) / 2, register (row >= 8) + 2 * (col >= 8), half col % 2; element
//   (k, n) of B in lane n * 4 + (k % 8) / 2, register k >= 8, half k % 2; accumulator element e of
//   lane l is (l / 4 + 8 * (e >= 2), 2 * (l % 4) + e % 2). ldmatrix gives lane l row l / 4,
//   elements 2 (l % 4) and 2 (l % 4) + 1 of each 8x8 matrix (transposed: column l / 4).
// - cp.async is deferred as on the device: each thread's copies wait in commit groups and land in
//   shared memory only when a cp.async.wait_group retires their group (the newest `Pending`
//   committed groups and uncommitted copies stay in flight), so a tile read before its wait
//   sees the stage's old contents. Cross-thread visibility still comes from the barriers.
// - Shared memory is filled with NaN bytes before each block, so reads of unwritten shared
//   memory show up as NaN in the output.
//
// Include this header instead of <dilated_attention/cuda.cuh>, then the kernel headers.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <initializer_list>
#include <memory>
#include <utility>
#include <vector>

#define DILATED_ATTENTION_CUDA_HOST_EMULATION 1

// ASan and TSan do not follow ucontext fibers: a test that runs kernels in the emulation starts
// with DILATED_ATTENTION_REQUIRE_FIBERS(), which skips it (with the reason) under either.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define DILATED_ATTENTION_FIBERS_UNSUPPORTED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define DILATED_ATTENTION_FIBERS_UNSUPPORTED 1
#endif
#endif
#if defined(DILATED_ATTENTION_FIBERS_UNSUPPORTED)
#define DILATED_ATTENTION_REQUIRE_FIBERS() \
  GTEST_SKIP() << "host emulation uses ucontext fibers, which ASan/TSan do not follow"
#else
#define DILATED_ATTENTION_REQUIRE_FIBERS() (void)0
#endif
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#undef __shared__
#define __shared__
#define __launch_bounds__(...)

namespace emulation {

struct Dim3 {
  unsigned x = 0, y = 1, z = 1;
};

struct Barrier {
  int arrived = 0;
  unsigned long generation = 0;
};

// Global memory a kernel may read by cp.async: when any range is registered, every valid
// cp.async source must lie inside one of them (a read past a tensor fails the test at once).
struct GlobalRange {
  const unsigned char* begin;
  const unsigned char* end;
};
inline std::vector<GlobalRange>& readable_ranges() {
  static std::vector<GlobalRange> ranges;
  return ranges;
}
inline void check_readable(const void* source, std::size_t bytes) {
  const auto& ranges = readable_ranges();
  if (ranges.empty()) return;
  const auto* at = static_cast<const unsigned char*>(source);
  for (const GlobalRange& range : ranges)
    if (at >= range.begin && at + bytes <= range.end) return;
  std::fprintf(stderr, "emulation: cp.async reads %zu bytes at %p, outside every input tensor\n",
               bytes, source);
  std::abort();
}
// Registers [data, data + count) for the lifetime of the object.
class ReadableScope {
 public:
  template <class T>
  ReadableScope(std::initializer_list<std::pair<const T*, std::size_t>> tensors) {
    for (const auto& [data, count] : tensors)
      readable_ranges().push_back({reinterpret_cast<const unsigned char*>(data),
                                   reinterpret_cast<const unsigned char*>(data + count)});
  }
  ~ReadableScope() { readable_ranges().clear(); }
  ReadableScope(const ReadableScope&) = delete;
  ReadableScope& operator=(const ReadableScope&) = delete;
};

// One thread block: `threads` fibers sharing the calling OS thread.
class Block {
 public:
  static constexpr std::size_t stack_bytes = 256 * 1024;

  Block(unsigned threads, Dim3 block_idx, Dim3 grid_dim)
      : threads_(threads),
        block_idx_(block_idx),
        grid_dim_(grid_dim),
        fibers_(threads),
        warp_barriers_((threads + 31) / 32) {
    slots_[0].resize(threads);
    slots_[1].resize(threads);
  }
  // The fibers' stacks go back to this OS thread's pool: allocating 256 KiB per emulated thread
  // for every block again made the emulation tests spend most of their time in the kernel.
  ~Block() {
    for (Fiber& fiber : fibers_)
      if (fiber.stack) stack_pool().push_back(std::move(fiber.stack));
  }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;

  void run(const std::function<void()>& body) {
    body_ = &body;
    Block* const previous = current_;
    current_ = this;
    for (unsigned i = 0; i < threads_; ++i) {
      Fiber& fiber = fibers_[i];
      fiber.thread_idx.x = i;
      if (!stack_pool().empty()) {
        fiber.stack = std::move(stack_pool().back());
        stack_pool().pop_back();
      } else {
        fiber.stack.reset(new char[stack_bytes]);
      }
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack.get();
      fiber.context.uc_stack.ss_size = stack_bytes;
      fiber.context.uc_link = &scheduler_;
      makecontext(&fiber.context, &Block::trampoline, 0);
    }
    // Round robin over the fibers that can run: not finished, not held at a barrier.
    for (bool running = true; running;) {
      running = false;
      bool progressed = false;
      for (unsigned i = 0; i < threads_; ++i) {
        Fiber& fiber = fibers_[i];
        if (fiber.done) continue;
        running = true;
        if (fiber.waiting_on != nullptr && fiber.waiting_on->generation == fiber.waiting_generation)
          continue;
        fiber.waiting_on = nullptr;
        running_ = i;
        progressed = true;
        swapcontext(&scheduler_, &fiber.context);
      }
      if (running && !progressed) {
        std::fprintf(stderr,
                     "emulation: every live thread waits at a barrier that can never "
                     "complete (a collective not reached by all threads)\n");
        std::abort();
      }
    }
    current_ = previous;
  }

  static Block& current() { return *current_; }
  const Dim3& thread_idx() const { return fibers_[running_].thread_idx; }
  const Dim3& block_idx() const { return block_idx_; }
  const Dim3& grid_dim() const { return grid_dim_; }
  Dim3 block_dim() const { return Dim3{threads_, 1, 1}; }
  unsigned lane() const { return running_ % 32; }

  void sync_block() { wait(block_barrier_, static_cast<int>(threads_)); }
  void sync_warp() { wait(warp_barriers_[running_ / 32], 32); }

  // Warp exchange: every lane publishes a value, passes one warp barrier, then reads any lane's.
  // Two slot sets used alternately make a second barrier unnecessary: a lane can run at most one
  // exchange ahead (the next barrier holds it), so it never overwrites a set still being read.
  template <class V>
  void exchange(const V& value) {
    static_assert(sizeof(V) <= sizeof(Slot), "slot too small");
    Fiber& fiber = fibers_[running_];
    fiber.slot_set ^= 1u;
    std::memcpy(slots_[fiber.slot_set][running_].data(), &value, sizeof(V));
    sync_warp();
  }
  // cp.async of the running thread: queued, committed in groups, retired by wait_group.
  void async_copy(void* shared, const void* global, bool valid) {
    Fiber& fiber = fibers_[running_];
    AsyncCopy copy{static_cast<unsigned char*>(shared), {}};
    if (valid) {
      check_readable(global, 16);
      std::memcpy(copy.bytes.data(), global, 16);  // inputs do not change during a launch
    }
    fiber.open_copies.push_back(copy);
  }
  void async_commit() {
    Fiber& fiber = fibers_[running_];
    fiber.committed.push_back(std::move(fiber.open_copies));
    fiber.open_copies.clear();
  }
  void async_wait(int pending) {
    Fiber& fiber = fibers_[running_];
    while (static_cast<int>(fiber.committed.size()) > pending) {
      for (const AsyncCopy& copy : fiber.committed.front())
        std::memcpy(copy.shared, copy.bytes.data(), 16);
      fiber.committed.pop_front();
    }
  }

  template <class V>
  V read(unsigned lane) const {
    V value;
    const unsigned set = fibers_[running_].slot_set;
    std::memcpy(static_cast<void*>(&value), slots_[set][(running_ / 32) * 32 + lane].data(),
                sizeof(V));
    return value;
  }

 private:
  static std::vector<std::unique_ptr<char[]>>& stack_pool() {
    static thread_local std::vector<std::unique_ptr<char[]>> pool;
    return pool;
  }
  using Slot = std::array<unsigned char, 64>;
  struct AsyncCopy {
    unsigned char* shared;
    std::array<unsigned char, 16> bytes;  // zero for a zero-filled (invalid) source
  };
  struct Fiber {
    ucontext_t context{};
    std::unique_ptr<char[]> stack;
    Dim3 thread_idx;
    bool done = false;
    unsigned slot_set = 0;
    Barrier* waiting_on = nullptr;
    unsigned long waiting_generation = 0;
    std::vector<AsyncCopy> open_copies;
    std::deque<std::vector<AsyncCopy>> committed;
  };

  static void trampoline() {
    Block& block = *current_;
    (*block.body_)();
    block.fibers_[block.running_].done = true;
  }  // returns to uc_link: the scheduler

  void yield() { swapcontext(&fibers_[running_].context, &scheduler_); }

  // The last to arrive releases the others; they are resumed by the scheduler only then.
  void wait(Barrier& barrier, int participants) {
    if (++barrier.arrived == participants) {
      barrier.arrived = 0;
      ++barrier.generation;
      return;
    }
    fibers_[running_].waiting_on = &barrier;
    fibers_[running_].waiting_generation = barrier.generation;
    yield();
  }

  unsigned threads_;
  Dim3 block_idx_, grid_dim_;
  std::vector<Fiber> fibers_;
  Barrier block_barrier_;
  std::vector<Barrier> warp_barriers_;
  std::vector<Slot> slots_[2];
  ucontext_t scheduler_{};
  unsigned running_ = 0;
  const std::function<void()>* body_ = nullptr;
  static inline Block* current_ = nullptr;
};

// Runs kernel(args...) over a 1-D grid, block after block.
template <class Kernel>
void launch(unsigned blocks, unsigned threads, unsigned char* shared, std::size_t shared_bytes,
            Kernel&& kernel) {
  for (unsigned b = 0; b < blocks; ++b) {
    std::memset(shared, 0xFF, shared_bytes);  // NaN in every float and 16-bit type
    Block block(threads, Dim3{b, 1, 1}, Dim3{blocks, 1, 1});
    const std::function<void()> body = [&] { kernel(); };
    block.run(body);
  }
}

}  // namespace emulation

#define threadIdx (::emulation::Block::current().thread_idx())
#define blockIdx (::emulation::Block::current().block_idx())
#define gridDim (::emulation::Block::current().grid_dim())
#define blockDim (::emulation::Block::current().block_dim())

inline void __syncthreads() { emulation::Block::current().sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emulation::Block::current().sync_warp(); }

template <class V>
V __shfl_sync(unsigned, V value, int source_lane) {
  emulation::Block& block = emulation::Block::current();
  block.exchange(value);
  return block.read<V>(static_cast<unsigned>(source_lane) % 32);
}
template <class V>
V __shfl_xor_sync(unsigned, V value, int lane_mask) {
  emulation::Block& block = emulation::Block::current();
  return __shfl_sync(0xffffffffu, value,
                     static_cast<int>(block.lane() ^ static_cast<unsigned>(lane_mask)));
}

inline unsigned __ballot_sync(unsigned, int predicate) {
  emulation::Block& block = emulation::Block::current();
  block.exchange(predicate != 0);
  unsigned mask = 0;
  for (unsigned l = 0; l < 32; ++l) mask |= block.read<bool>(l) ? 1u << l : 0u;
  return mask;
}

inline float __int_as_float(int bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

namespace dilated_attention::cuda::device {

// The dynamic shared memory of the emulated blocks (the kernels declare them extern).
alignas(16) inline unsigned char shared_raw[256 * 1024];
alignas(16) inline float simt_query_rows[64 * 1024];
alignas(16) inline float backward_rows[64 * 1024];

namespace emulated {

inline std::uint16_t bits16(const unsigned char* address) {
  std::uint16_t value;
  std::memcpy(&value, address, 2);
  return value;
}

}  // namespace emulated

inline void ldmatrix_x4(std::uint32_t (&r)[4], const void* row) {
  emulation::Block& block = emulation::Block::current();
  block.exchange(row);
  const unsigned lane = block.lane();
  for (unsigned i = 0; i < 4; ++i) {
    const auto* address =
        static_cast<const unsigned char*>(block.read<const void*>(8 * i + lane / 4));
    const std::uint32_t lo = emulated::bits16(address + 2 * (2 * (lane % 4)));
    const std::uint32_t hi = emulated::bits16(address + 2 * (2 * (lane % 4) + 1));
    r[i] = lo | (hi << 16);
  }
}

inline void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* row) {
  emulation::Block& block = emulation::Block::current();
  block.exchange(row);
  const unsigned lane = block.lane();
  for (unsigned i = 0; i < 4; ++i) {
    const auto* row0 =
        static_cast<const unsigned char*>(block.read<const void*>(8 * i + 2 * (lane % 4)));
    const auto* row1 =
        static_cast<const unsigned char*>(block.read<const void*>(8 * i + 2 * (lane % 4) + 1));
    const std::uint32_t lo = emulated::bits16(row0 + 2 * (lane / 4));
    const std::uint32_t hi = emulated::bits16(row1 + 2 * (lane / 4));
    r[i] = lo | (hi << 16);
  }
}

template <class T>
struct MmaOp {
  struct Operands {
    std::uint32_t a[4], b[2];
  };
  static float element(std::uint32_t reg, unsigned half) {
    const auto bits = static_cast<std::uint16_t>(half ? reg >> 16 : reg & 0xFFFFu);
    T value;
    std::memcpy(static_cast<void*>(&value), &bits, 2);  // the 16 bits of a T
    return static_cast<float>(value);
  }
  static void run(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
    emulation::Block& block = emulation::Block::current();
    block.exchange(Operands{{a[0], a[1], a[2], a[3]}, {b0, b1}});
    Operands all[32];
    for (unsigned l = 0; l < 32; ++l) all[l] = block.read<Operands>(l);
    const unsigned lane = block.lane();
    for (unsigned e = 0; e < 4; ++e) {
      const unsigned row = lane / 4 + 8 * (e >= 2), col = 2 * (lane % 4) + e % 2;
      float sum = d[e];
      for (unsigned k = 0; k < 16; ++k)
        sum += element(all[(row % 8) * 4 + (k % 8) / 2].a[(row >= 8) + 2 * (k >= 8)], k % 2) *
               element(all[col * 4 + (k % 8) / 2].b[k >= 8], k % 2);
      d[e] = sum;
    }
  }
  static std::uint32_t pack(float lo, float hi) {
    const T low(lo), high(hi);
    std::uint16_t l, h;
    std::memcpy(&l, &low, 2);
    std::memcpy(&h, &high, 2);
    return static_cast<std::uint32_t>(l) | (static_cast<std::uint32_t>(h) << 16);
  }
};

// ex2.approx.ftz on the host: exact exp2 with subnormal results flushed to zero.
inline float fast_exp2(float x) {
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

inline void cp_async_16(void* shared, const void* global, bool valid) {
  emulation::Block::current().async_copy(shared, global, valid);
}
inline void store_16(void* global, const std::uint32_t (&words)[4]) {
  std::memcpy(global, words, 16);
}
inline void cp_async_commit() { emulation::Block::current().async_commit(); }
template <int Pending>
inline void cp_async_wait() {
  emulation::Block::current().async_wait(Pending);
}

}  // namespace dilated_attention::cuda::device

// The dynamic shared memory of the ring back end's kernels (ring/cuda/forward_kernels.cuh).
namespace dilated_attention::ring::device {
alignas(16) inline float ring_query_rows[16 * 1024];
}  // namespace dilated_attention::ring::device
