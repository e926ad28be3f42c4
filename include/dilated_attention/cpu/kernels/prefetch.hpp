#pragma once
// A software prefetch of a byte range, for the code that reads strided rows (packing, the decode
// kernel): the hardware prefetcher follows sequential lines, not rows r * H * D elements apart.
//
// Always inlined, on purpose: GCC's IPA pure-const pass sees a function whose only statements are
// __builtin_prefetch as having no side effects, marks it const and deletes its calls when it is
// not inlined -- and a lambda in a function template is analysed that way before inlining. With
// GCC 12 -O3 the decode kernel's prefetch lambda compiled to no instruction at all.

#include <cstdint>

#if defined(__GNUC__) || defined(__clang__)
#define DILATED_ATTENTION_ALWAYS_INLINE __attribute__((always_inline))
#else
#define DILATED_ATTENTION_ALWAYS_INLINE
#endif

namespace dilated_attention::cpu::kernels {

// Asks for the cache lines of [p, p + bytes); a hint only.
#if defined(__GNUC__) || defined(__clang__)
DILATED_ATTENTION_ALWAYS_INLINE inline void prefetch_bytes(const void* p, std::int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (std::int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b);
}
#else
inline void prefetch_bytes(const void*, std::int64_t) {}
#endif

}  // namespace dilated_attention::cpu::kernels
