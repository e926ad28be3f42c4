#pragma once
// AVX-512F micro-kernels (float): the generic.hpp contract on 16-lane vectors.
//
// Every function carries __attribute__((target("avx512f,avx2,fma"))), so this header compiles
// in a baseline x86-64 build and isa.hpp picks it at run time when the CPU has AVX-512F.
//
// multiply(): a 12 x 32 register tile (24 accumulators, two B vectors, one broadcast: 27 of 32
// zmm registers). Per depth step: 2 loads of the packed B panel, 12 broadcasts, 24 FMAs.

#include "isa.hpp"

#if defined(DILATED_ATTENTION_X86_KERNELS)

#include <immintrin.h>

#include <cstdint>

#define DILATED_ATTENTION_AVX512 __attribute__((target("avx512f,avx2,fma")))

namespace dilated_attention::cpu::kernels {

namespace avx512_detail {

// e^x for x <= 0 on 16 lanes: the same method and bound as avx2.hpp's exp_nonpositive (Cody-Waite
// reduction, degree-7 Taylor polynomial with FMAs, 2^k in the exponent bits, x clamped at -87);
// relative error within 2 float ulps. NaN stays NaN.
DILATED_ATTENTION_AVX512 inline __m512 exp_nonpositive(__m512 argument) {
  const __m512 x = _mm512_max_ps(argument, _mm512_set1_ps(-87.0f));
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 shifted = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic);
  const __m512 k = _mm512_sub_ps(shifted, magic);
  const __m512i k_bits = _mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_castps_si512(magic));
  __m512 f = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 5040.0f), f, _mm512_set1_ps(1.0f / 720.0f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f / 120.0f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f / 24.0f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f / 6.0f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
  y = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(y), _mm512_slli_epi32(k_bits, 23)));
  const __mmask16 not_a_number = _mm512_cmp_ps_mask(argument, argument, _CMP_UNORD_Q);
  return _mm512_mask_blend_ps(not_a_number, y, argument);
}

}  // namespace avx512_detail

struct Avx512 {
  using value_type = float;
  static constexpr CpuIsa isa = CpuIsa::avx512;
  static constexpr int rows = 12;
  static constexpr int cols = 32;

  DILATED_ATTENTION_AVX512 static void multiply(const float* a, std::int64_t a_row,
                                                std::int64_t a_depth, const float* b,
                                                std::int64_t depth, float* c, std::int64_t c_row,
                                                bool accumulate) {
    __m512 sum[rows][2];
#pragma GCC unroll 12
    for (int i = 0; i < rows; ++i) sum[i][0] = sum[i][1] = _mm512_setzero_ps();
    const float* a_rows[rows];
#pragma GCC unroll 12
    for (int i = 0; i < rows; ++i) a_rows[i] = a + i * a_row;
    for (std::int64_t p = 0; p < depth; ++p) {
      const __m512 b0 = _mm512_loadu_ps(b + p * cols), b1 = _mm512_loadu_ps(b + p * cols + 16);
      const std::int64_t offset = p * a_depth;
#pragma GCC unroll 12
      for (int i = 0; i < rows; ++i) {
        const __m512 a_value = _mm512_set1_ps(a_rows[i][offset]);
        sum[i][0] = _mm512_fmadd_ps(a_value, b0, sum[i][0]);
        sum[i][1] = _mm512_fmadd_ps(a_value, b1, sum[i][1]);
      }
    }
#pragma GCC unroll 12
    for (int i = 0; i < rows; ++i) {
      float* row = c + i * c_row;
      if (accumulate) {
        sum[i][0] = _mm512_add_ps(_mm512_loadu_ps(row), sum[i][0]);
        sum[i][1] = _mm512_add_ps(_mm512_loadu_ps(row + 16), sum[i][1]);
      }
      _mm512_storeu_ps(row, sum[i][0]);
      _mm512_storeu_ps(row + 16, sum[i][1]);
    }
  }

  DILATED_ATTENTION_AVX512 static float max_scaled(const float* s, std::int64_t n, float scale) {
    const bool largest = scale >= 0.0f;
    __m512 extreme = _mm512_set1_ps(s[0]);
    std::int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_loadu_ps(s + i);
      extreme = largest ? _mm512_max_ps(extreme, v) : _mm512_min_ps(extreme, v);
    }
    if (i < n) {  // masked load of the ragged end; absent lanes repeat s[0]
      const __mmask16 live = static_cast<__mmask16>((1u << (n - i)) - 1u);
      const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(s[0]), live, s + i);
      extreme = largest ? _mm512_max_ps(extreme, v) : _mm512_min_ps(extreme, v);
    }
    return scale * (largest ? _mm512_reduce_max_ps(extreme) : _mm512_reduce_min_ps(extreme));
  }

  DILATED_ATTENTION_AVX512 static float exp_shifted_sum(float* p, std::int64_t n, float scale,
                                                        float shift) {
    const __m512 vscale = _mm512_set1_ps(scale), vshift = _mm512_set1_ps(shift);
    __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
    std::int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      const __m512 y0 = avx512_detail::exp_nonpositive(
          _mm512_fmsub_ps(_mm512_loadu_ps(p + i), vscale, vshift));
      const __m512 y1 = avx512_detail::exp_nonpositive(
          _mm512_fmsub_ps(_mm512_loadu_ps(p + i + 16), vscale, vshift));
      _mm512_storeu_ps(p + i, y0);
      _mm512_storeu_ps(p + i + 16, y1);
      sum0 = _mm512_add_ps(sum0, y0);
      sum1 = _mm512_add_ps(sum1, y1);
    }
    for (int half = 0; half < 2 && i < n; ++half, i += 16) {  // ragged end, masked
      const std::int64_t left = n - i < 16 ? n - i : 16;
      const __mmask16 live = static_cast<__mmask16>((1u << left) - 1u);
      const __m512 y = avx512_detail::exp_nonpositive(
          _mm512_fmsub_ps(_mm512_maskz_loadu_ps(live, p + i), vscale, vshift));
      _mm512_mask_storeu_ps(p + i, live, y);
      (half == 0 ? sum0 : sum1) = _mm512_add_ps(half == 0 ? sum0 : sum1,
                                                _mm512_maskz_mov_ps(live, y));
    }
    // Lanes summed in a fixed order.
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, _mm512_add_ps(sum0, sum1));
    float total = 0.0f;
    for (int step = 8; step >= 1; step /= 2)
      for (int j = 0; j < step; ++j) lanes[j] += lanes[j + step];
    total = lanes[0];
    return total;
  }
};

}  // namespace dilated_attention::cpu::kernels

#endif  // DILATED_ATTENTION_X86_KERNELS
