// Live-heap accounting for the benchmarks' peak-memory figure: the executable defines malloc,
// free and the rest of the family (glibc's documented way to replace the allocator), forwards
// each call to glibc's own __libc_* entry points, and keeps the live byte count (by
// malloc_usable_size, so allocator rounding is included) and its high-water mark. Every
// allocation in the process goes through it: operator new, Eigen's aligned_malloc, std::thread.
//
// Off under sanitizers (they own malloc) and off the glibc path; heap::available() says which.

#include "cpu_benchmark_support.hpp"

#include <atomic>
#include <cstddef>
#include <cstdint>

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
#define DA_BENCH_SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define DA_BENCH_SANITIZED 1
#endif

#if defined(__GLIBC__) && !defined(DA_BENCH_SANITIZED) && !defined(DA_BENCH_NO_HEAP_COUNTER)
#define DA_BENCH_HEAP_COUNTER 1
#include <malloc.h>

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);
}

namespace {

// Plain atomics with constant initialisation: usable before any constructor runs.
std::atomic<std::int64_t> live_bytes{0};
std::atomic<std::int64_t> peak_bytes{0};
std::atomic<std::int64_t> baseline_bytes{0};

void note_allocated(void* p) {
  if (p == nullptr) return;
  const auto size = static_cast<std::int64_t>(malloc_usable_size(p));
  const std::int64_t now = live_bytes.fetch_add(size, std::memory_order_relaxed) + size;
  std::int64_t peak = peak_bytes.load(std::memory_order_relaxed);
  while (now > peak && !peak_bytes.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {}
}

void note_freed(void* p) {
  if (p == nullptr) return;
  live_bytes.fetch_sub(static_cast<std::int64_t>(malloc_usable_size(p)), std::memory_order_relaxed);
}

}  // namespace

extern "C" {

void* malloc(std::size_t size) {
  void* p = __libc_malloc(size);
  note_allocated(p);
  return p;
}

void free(void* p) {
  note_freed(p);
  __libc_free(p);
}

void* calloc(std::size_t count, std::size_t size) {
  void* p = __libc_calloc(count, size);
  note_allocated(p);
  return p;
}

void* realloc(void* old, std::size_t size) {
  // Count the old block out before glibc may release it; count the result in afterwards.
  const auto old_size = old == nullptr ? 0 : static_cast<std::int64_t>(malloc_usable_size(old));
  void* p = __libc_realloc(old, size);
  if (p == nullptr && size != 0) return nullptr;  // failure leaves the old block as it was
  live_bytes.fetch_sub(old_size, std::memory_order_relaxed);
  note_allocated(p);
  return p;
}

void* memalign(std::size_t alignment, std::size_t size) {
  void* p = __libc_memalign(alignment, size);
  note_allocated(p);
  return p;
}

void* aligned_alloc(std::size_t alignment, std::size_t size) { return memalign(alignment, size); }

int posix_memalign(void** out, std::size_t alignment, std::size_t size) {
  if (alignment % sizeof(void*) != 0 || (alignment & (alignment - 1)) != 0) return 22;  // EINVAL
  void* p = memalign(alignment, size);
  if (p == nullptr) return 12;  // ENOMEM
  *out = p;
  return 0;
}

void* valloc(std::size_t size) { return memalign(4096, size); }

void* pvalloc(std::size_t size) { return memalign(4096, (size + 4095) / 4096 * 4096); }

}  // extern "C"
#endif

namespace dilated_attention::bench::heap {

#if DA_BENCH_HEAP_COUNTER
bool available() { return true; }
void reset_peak() {
  const std::int64_t now = live_bytes.load(std::memory_order_relaxed);
  baseline_bytes.store(now, std::memory_order_relaxed);
  peak_bytes.store(now, std::memory_order_relaxed);
}
std::int64_t peak_since_reset() {
  return peak_bytes.load(std::memory_order_relaxed) -
         baseline_bytes.load(std::memory_order_relaxed);
}
#else
bool available() { return false; }
void reset_peak() {}
std::int64_t peak_since_reset() { return -1; }
#endif

}  // namespace dilated_attention::bench::heap
