#pragma once
// AVX2 + FMA micro-kernels (float): the generic.hpp contract on 8-lane vectors.
//
// Every function carries __attribute__((target("avx2,fma"))), so this header compiles in a
// baseline x86-64 build (no -march flag) and isa.hpp picks it at run time when the CPU has
// AVX2 and FMA. Nothing outside cpu/kernels/ sees these intrinsics.
//
// multiply(): a 6 x 16 register tile (12 accumulators, two B vectors, one broadcast: 15 of 16
// ymm registers), as in BLIS's Haswell sgemm. Per depth step: 2 loads of the packed B panel, 6
// broadcasts of A, 12 FMAs.

#include "isa.hpp"
#include "pack.hpp"

#if defined(DILATED_ATTENTION_X86_KERNELS)

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#define DILATED_ATTENTION_AVX2 __attribute__((target("avx2,fma")))

namespace dilated_attention::cpu::kernels {

namespace avx2_detail {

// e^x for x <= 0 on 8 lanes, x clamped at -87 (e^-87 ~ 1.6e-38, below a sum of at least 1).
// Cody-Waite reduction x = k ln2 + f, |f| <= ln2/2 (ln2 split so that k ln2 is exact), a
// degree-7 Taylor polynomial for e^f (truncation error below 6e-9 relative) evaluated with FMAs,
// and 2^k put into the exponent bits. Relative error against the exact e^x: within 2 float ulps
// (measured max 1.8e-7 over the softmax range, tests/cpu/cpu_attend_test.cpp). NaN stays NaN.
DILATED_ATTENTION_AVX2 inline __m256 exp_nonpositive(__m256 argument) {
  const __m256 x = _mm256_max_ps(argument, _mm256_set1_ps(-87.0f));
  const __m256 magic = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds to integer
  const __m256 shifted = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 k = _mm256_sub_ps(shifted, magic);
  const __m256i k_bits = _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_castps_si256(magic));
  __m256 f = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 y = _mm256_fmadd_ps(_mm256_set1_ps(1.0f / 5040.0f), f, _mm256_set1_ps(1.0f / 720.0f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.0f / 120.0f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.0f / 24.0f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.0f / 6.0f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(0.5f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.0f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.0f));
  y = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y), _mm256_slli_epi32(k_bits, 23)));
  const __m256 not_a_number = _mm256_cmp_ps(argument, argument, _CMP_UNORD_Q);
  return _mm256_blendv_ps(y, argument, not_a_number);
}

// Lanes summed in a fixed order.
DILATED_ATTENTION_AVX2 inline float horizontal_sum(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
}

}  // namespace avx2_detail

struct Avx2 {
  using value_type = float;
  static constexpr CpuIsa isa = CpuIsa::avx2;
  static constexpr int rows = 6;
  static constexpr int cols = 16;

  // pack.hpp's pack_key_panels for this kernel's storage, compiled for this instruction set (the
  // transpose is the one packing step the compiler vectorises only with wide registers).
  DILATED_ATTENTION_AVX2 static void pack_key_panels(const float* data, std::int64_t row_stride,
                                         std::int64_t count, std::int64_t dim, float* out) {
    kernels::pack_key_panels(data, row_stride, count, dim, cols, out);
  }

  DILATED_ATTENTION_AVX2 static void multiply(const float* a, std::int64_t a_row,
                                              std::int64_t a_depth, const float* b,
                                              std::int64_t depth, float* c, std::int64_t c_row,
                                              bool accumulate) {
    __m256 sum[rows][2];
#pragma GCC unroll 6
    for (int i = 0; i < rows; ++i) sum[i][0] = sum[i][1] = _mm256_setzero_ps();
    const float* a_rows[rows];
#pragma GCC unroll 6
    for (int i = 0; i < rows; ++i) a_rows[i] = a + i * a_row;
    for (std::int64_t p = 0; p < depth; ++p) {
      const __m256 b0 = _mm256_loadu_ps(b + p * cols), b1 = _mm256_loadu_ps(b + p * cols + 8);
      const std::int64_t offset = p * a_depth;
#pragma GCC unroll 6
      for (int i = 0; i < rows; ++i) {
        const __m256 a_value = _mm256_broadcast_ss(a_rows[i] + offset);
        sum[i][0] = _mm256_fmadd_ps(a_value, b0, sum[i][0]);
        sum[i][1] = _mm256_fmadd_ps(a_value, b1, sum[i][1]);
      }
    }
#pragma GCC unroll 6
    for (int i = 0; i < rows; ++i) {
      float* row = c + i * c_row;
      if (accumulate) {
        sum[i][0] = _mm256_add_ps(_mm256_loadu_ps(row), sum[i][0]);
        sum[i][1] = _mm256_add_ps(_mm256_loadu_ps(row + 8), sum[i][1]);
      }
      _mm256_storeu_ps(row, sum[i][0]);
      _mm256_storeu_ps(row + 8, sum[i][1]);
    }
  }

  DILATED_ATTENTION_AVX2 static float max_scaled(const float* s, std::int64_t n, float scale) {
    const bool largest = scale >= 0.0f;
    __m256 extreme = _mm256_set1_ps(s[0]);
    std::int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(s + i);
      extreme = largest ? _mm256_max_ps(extreme, v) : _mm256_min_ps(extreme, v);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, extreme);
    float value = lanes[0];
    for (int j = 1; j < 8; ++j)
      value = largest ? std::fmax(value, lanes[j]) : std::fmin(value, lanes[j]);
    for (; i < n; ++i) value = largest ? std::fmax(value, s[i]) : std::fmin(value, s[i]);
    return scale * value;
  }

  DILATED_ATTENTION_AVX2 static float exp_shifted_sum(float* p, std::int64_t n, float scale,
                                                      float shift) {
    const __m256 vscale = _mm256_set1_ps(scale), vshift = _mm256_set1_ps(shift);
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    std::int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m256 y0 = avx2_detail::exp_nonpositive(
          _mm256_fmsub_ps(_mm256_loadu_ps(p + i), vscale, vshift));
      const __m256 y1 = avx2_detail::exp_nonpositive(
          _mm256_fmsub_ps(_mm256_loadu_ps(p + i + 8), vscale, vshift));
      _mm256_storeu_ps(p + i, y0);
      _mm256_storeu_ps(p + i + 8, y1);
      sum0 = _mm256_add_ps(sum0, y0);
      sum1 = _mm256_add_ps(sum1, y1);
    }
    if (i < n) {  // the ragged end through a masked copy, so every lane has a defined value
      alignas(32) float tail[16] = {};
      const std::int64_t left = n - i;
      for (std::int64_t j = 0; j < left; ++j) tail[j] = p[i + j];
      for (int half = 0; half < 2 && half * 8 < left; ++half) {
        __m256 y = avx2_detail::exp_nonpositive(
            _mm256_fmsub_ps(_mm256_load_ps(tail + 8 * half), vscale, vshift));
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i live = _mm256_cmpgt_epi32(
            _mm256_set1_epi32(static_cast<int>(left - 8 * half)), lane);
        y = _mm256_and_ps(y, _mm256_castsi256_ps(live));
        _mm256_store_ps(tail + 8 * half, y);
        (half == 0 ? sum0 : sum1) = _mm256_add_ps(half == 0 ? sum0 : sum1, y);
      }
      for (std::int64_t j = 0; j < left; ++j) p[i + j] = tail[j];
    }
    return avx2_detail::horizontal_sum(_mm256_add_ps(sum0, sum1));
  }
};

}  // namespace dilated_attention::cpu::kernels

#endif  // DILATED_ATTENTION_X86_KERNELS
