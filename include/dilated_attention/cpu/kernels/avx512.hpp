#pragma once
// AVX-512F micro-kernels (float): the generic.hpp contract on 16-lane vectors.
//
// Every function carries __attribute__((target("avx512f,avx2,fma"))), so this header compiles
// in a baseline x86-64 build and isa.hpp picks it at run time when the CPU has AVX-512F.
//
// multiply(): a 12 x 32 register tile (24 accumulators, two B vectors, one broadcast: 27 of 32
// zmm registers). Per depth step: 2 loads of the packed B panel, 12 broadcasts, 24 FMAs.

#include "isa.hpp"
#include "pack.hpp"

#if defined(DILATED_ATTENTION_X86_KERNELS)

#include <immintrin.h>

#include <cstdint>

#define DILATED_ATTENTION_AVX512 __attribute__((target("avx512f,avx2,fma")))

namespace dilated_attention::cpu::kernels {

namespace avx512_detail {

// GCC 12's unmasked _mm512_max_ps / _min_ps / _slli_epi32 pass _mm512_undefined_*() and trip
// -Wmaybe-uninitialized in the caller's build; the zero-masked forms with a full mask are the
// same instruction without the warning.
constexpr __mmask16 all_lanes = static_cast<__mmask16>(0xFFFF);
DILATED_ATTENTION_AVX512 inline __m512 max(__m512 a, __m512 b) {
  return _mm512_maskz_max_ps(all_lanes, a, b);
}
DILATED_ATTENTION_AVX512 inline __m512 min(__m512 a, __m512 b) {
  return _mm512_maskz_min_ps(all_lanes, a, b);
}

// e^x for x <= 0 on 16 lanes: the method and bound of avx2.hpp's exp_nonpositive (Cody-Waite
// reduction, degree-7 Taylor polynomial with FMAs, x clamped at -87), with 2^k applied by
// vscalefps, which also carries NaN through (the clamp's operand order keeps a NaN argument).
// Relative error within 2 float ulps.
DILATED_ATTENTION_AVX512 inline __m512 exp_nonpositive(__m512 argument) {
  const __m512 x = max(_mm512_set1_ps(-87.0f), argument);  // NaN argument: NaN
  const __m512 magic = _mm512_set1_ps(12582912.0f);          // 1.5 * 2^23: rounds to integer
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 k = _mm512_sub_ps(_mm512_fmadd_ps(x, log2e, magic), magic);
  __m512 f = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 5040.0f), f, _mm512_set1_ps(1.0f / 720.0f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f / 120.0f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f / 24.0f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f / 6.0f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(all_lanes, y, k);
}

// Lanes folded in halves (a fixed order): 8 + 8, 4 + 4, 2 + 2, 1 + 1.
DILATED_ATTENTION_AVX512 inline __m512 fold_halves(__m512 v, __m512 (*op)(__m512, __m512)) {
  v = op(v, _mm512_maskz_shuffle_f32x4(all_lanes, v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = op(v, _mm512_maskz_shuffle_f32x4(all_lanes, v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  v = op(v, _mm512_maskz_permute_ps(all_lanes, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = op(v, _mm512_maskz_permute_ps(all_lanes, v, _MM_SHUFFLE(2, 3, 0, 1)));
  return v;
}
DILATED_ATTENTION_AVX512 inline __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }

}  // namespace avx512_detail

struct Avx512 {
  using value_type = float;
  static constexpr CpuIsa isa = CpuIsa::avx512;
  static constexpr int rows = 12;
  static constexpr int cols = 32;

  // pack.hpp's pack_key_panels for this kernel's storage, compiled for this instruction set (the
  // transpose is the one packing step the compiler vectorises only with wide registers).
  DILATED_ATTENTION_AVX512 static void pack_key_panels(const float* data, std::int64_t row_stride,
                                         std::int64_t count, std::int64_t dim, float* out) {
    kernels::pack_key_panels(data, row_stride, count, dim, cols, out);
  }

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
      extreme = largest ? avx512_detail::max(extreme, v) : avx512_detail::min(extreme, v);
    }
    if (i < n) {  // masked load of the ragged end; absent lanes repeat s[0]
      const __mmask16 live = static_cast<__mmask16>((1u << (n - i)) - 1u);
      const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(s[0]), live, s + i);
      extreme = largest ? avx512_detail::max(extreme, v) : avx512_detail::min(extreme, v);
    }
    // (GCC 12's _mm512_reduce_* trip -Wmaybe-uninitialized, hence fold_halves.)
    extreme =
        avx512_detail::fold_halves(extreme, largest ? avx512_detail::max : avx512_detail::min);
    return scale * _mm512_cvtss_f32(extreme);
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
    const __m512 sum = _mm512_add_ps(sum0, sum1);
    return _mm512_cvtss_f32(avx512_detail::fold_halves(sum, avx512_detail::add));
  }
};

}  // namespace dilated_attention::cpu::kernels

#endif  // DILATED_ATTENTION_X86_KERNELS
