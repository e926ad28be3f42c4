#pragma once
// The softmax numerator of one score row: p = exp(scale * s - shift) in place, and its sum.
//
// Eigen's vectorised exp is used everywhere except plain SSE2 float builds (x86-64 without
// -march flags: what a consumer gets by default), where it costs about as much per score as the
// two GEMMs of a 64-wide head together. There a short SSE2 routine does the same job: Cody-Waite
// range reduction (x = k ln2 + f, |f| <= ln2 / 2, ln2 split in two so k ln2 is exact), a degree-7
// Taylor polynomial for e^f (relative error below 1e-8, under float rounding), and 2^k put
// straight into the exponent bits. Arguments are <= 0 here (scores minus their running max), and
// those below -87 are clamped there: e^-87 ~ 1.6e-38 against a sum of at least 1.
//
// The summation order depends only on n, so results are deterministic.

#include <cmath>
#include <cstdint>

#include <Eigen/Core>

#if defined(__SSE2__) && !defined(__AVX2__) && !defined(DILATED_ATTENTION_NO_SSE2_EXP)
#include <emmintrin.h>
#define DILATED_ATTENTION_SSE2_EXP 1
#endif

namespace dilated_attention::cpu::detail {

// p[i] = exp(p[i] * scale - shift) for i < n; returns the sum of the new p[i].
template <class Acc>
Acc exp_shifted_sum(Acc* p, std::int64_t n, Acc scale, Acc shift) {
  Eigen::Map<Eigen::Array<Acc, 1, Eigen::Dynamic>> row(p, n);
  row = (row * scale - shift).exp();
  return row.sum();
}

#if defined(DILATED_ATTENTION_SSE2_EXP)
template <>
inline float exp_shifted_sum<float>(float* p, std::int64_t n, float scale, float shift) {
  const __m128 vscale = _mm_set1_ps(scale), vshift = _mm_set1_ps(shift);
  const __m128 lowest = _mm_set1_ps(-87.0f), log2e = _mm_set1_ps(1.44269504088896341f);
  const __m128 magic = _mm_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const __m128 ln2_hi = _mm_set1_ps(0.693359375f), ln2_lo = _mm_set1_ps(-2.12194440e-4f);
  const __m128 c7 = _mm_set1_ps(1.0f / 5040.0f), c6 = _mm_set1_ps(1.0f / 720.0f);
  const __m128 c5 = _mm_set1_ps(1.0f / 120.0f), c4 = _mm_set1_ps(1.0f / 24.0f);
  const __m128 c3 = _mm_set1_ps(1.0f / 6.0f), c2 = _mm_set1_ps(0.5f), one = _mm_set1_ps(1.0f);
  __m128 sum = _mm_setzero_ps();
  std::int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m128 argument = _mm_sub_ps(_mm_mul_ps(_mm_loadu_ps(p + i), vscale), vshift);
    const __m128 not_a_number = _mm_cmpunord_ps(argument, argument);  // NaN in, NaN out
    const __m128 x = _mm_max_ps(argument, lowest);
    const __m128 shifted = _mm_add_ps(_mm_mul_ps(x, log2e), magic);
    const __m128 k = _mm_sub_ps(shifted, magic);
    const __m128i k_bits = _mm_sub_epi32(_mm_castps_si128(shifted), _mm_castps_si128(magic));
    __m128 f = _mm_sub_ps(x, _mm_mul_ps(k, ln2_hi));
    f = _mm_sub_ps(f, _mm_mul_ps(k, ln2_lo));
    __m128 y = _mm_add_ps(_mm_mul_ps(c7, f), c6);
    y = _mm_add_ps(_mm_mul_ps(y, f), c5);
    y = _mm_add_ps(_mm_mul_ps(y, f), c4);
    y = _mm_add_ps(_mm_mul_ps(y, f), c3);
    y = _mm_add_ps(_mm_mul_ps(y, f), c2);
    y = _mm_add_ps(_mm_mul_ps(y, f), one);
    y = _mm_add_ps(_mm_mul_ps(y, f), one);
    y = _mm_castsi128_ps(_mm_add_epi32(_mm_castps_si128(y), _mm_slli_epi32(k_bits, 23)));
    y = _mm_or_ps(_mm_and_ps(not_a_number, argument), _mm_andnot_ps(not_a_number, y));
    _mm_storeu_ps(p + i, y);
    sum = _mm_add_ps(sum, y);
  }
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, sum);
  float total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; i < n; ++i) {
    p[i] = std::exp(p[i] * scale - shift);
    total += p[i];
  }
  return total;
}
#endif

}  // namespace dilated_attention::cpu::detail
