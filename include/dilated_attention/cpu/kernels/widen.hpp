#pragma once
// Half-width storage widened to float, a row at a time, for the code that reads bfloat16 or half
// keys and values in place (the one-row decode kernel, cpu/inference.hpp) rather than packing
// them. Exact: every bfloat16 and every half is a float, so a widened row holds the same values
// and the code that reads it is the float code (docs/semantics.md "Tensors and scores": every
// kernel accumulates in fp32 or wider, whatever the storage type).
//
//   bfloat16   its 16 bits are the high half of the float's 32: a shift, which the compiler
//              vectorises for any target.
//   half       F16C's vcvtph2ps, eight at a time, where the CPU has it (target attribute and
//              run-time check, as isa.hpp does for the kernels); elsewhere Eigen's conversion.
//
// Both conversions are exact, so which one runs never changes a result.

#include <cstdint>
#include <cstring>

#include <Eigen/Core>

#include "isa.hpp"

#if defined(DILATED_ATTENTION_X86_KERNELS)
#include <immintrin.h>
#endif

namespace dilated_attention::cpu::kernels {

// to[i] = float(from[i]) for i < n.
inline void widen(const Eigen::bfloat16* from, float* to, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) {
    std::uint16_t bits;
    std::memcpy(&bits, from + i, sizeof bits);
    const std::uint32_t wide = static_cast<std::uint32_t>(bits) << 16;
    std::memcpy(to + i, &wide, sizeof wide);
  }
}

namespace widen_detail {

#if defined(DILATED_ATTENTION_X86_KERNELS)
__attribute__((target("avx,f16c"))) inline void half_f16c(const Eigen::half* from, float* to,
                                                          std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(to + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from + i))));
  for (; i < n; ++i) to[i] = static_cast<float>(from[i]);
}
#endif

}  // namespace widen_detail

// to[i] = float(from[i]) for i < n.
inline void widen(const Eigen::half* from, float* to, std::int64_t n) {
#if defined(DILATED_ATTENTION_X86_KERNELS)
  if (__builtin_cpu_supports("f16c")) return widen_detail::half_f16c(from, to, n);
#endif
  for (std::int64_t i = 0; i < n; ++i) to[i] = static_cast<float>(from[i]);
}

}  // namespace dilated_attention::cpu::kernels
