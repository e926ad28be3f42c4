#pragma once
// NEON micro-kernels (float, aarch64): the generic.hpp contract on 4-lane vectors. NEON is part
// of the aarch64 base ISA, so no target attribute and no run-time check are needed.
//
// multiply(): an 8 x 8 register tile (16 accumulators, two B vectors, one broadcast, of 32
// q registers).

#include "isa.hpp"
#include "pack.hpp"

#if defined(DILATED_ATTENTION_NEON_KERNELS)

#include <arm_neon.h>

#include <cmath>
#include <cstdint>

namespace dilated_attention::cpu::kernels {

namespace neon_detail {

// e^x for x <= 0 on 4 lanes: the same method and bound as avx2.hpp's exp_nonpositive (Cody-Waite
// reduction, degree-7 Taylor polynomial with FMAs, 2^k in the exponent bits, x clamped at -87);
// relative error within 2 float ulps. NaN stays NaN.
inline float32x4_t exp_nonpositive(float32x4_t argument) {
  const float32x4_t x = vmaxq_f32(argument, vdupq_n_f32(-87.0f));
  const float32x4_t k = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
  const int32x4_t k_bits = vcvtq_s32_f32(k);
  float32x4_t f = vfmsq_f32(x, k, vdupq_n_f32(0.693359375f));
  f = vfmsq_f32(f, k, vdupq_n_f32(-2.12194440e-4f));
  float32x4_t y = vfmaq_f32(vdupq_n_f32(1.0f / 720.0f), vdupq_n_f32(1.0f / 5040.0f), f);
  y = vfmaq_f32(vdupq_n_f32(1.0f / 120.0f), y, f);
  y = vfmaq_f32(vdupq_n_f32(1.0f / 24.0f), y, f);
  y = vfmaq_f32(vdupq_n_f32(1.0f / 6.0f), y, f);
  y = vfmaq_f32(vdupq_n_f32(0.5f), y, f);
  y = vfmaq_f32(vdupq_n_f32(1.0f), y, f);
  y = vfmaq_f32(vdupq_n_f32(1.0f), y, f);
  y = vreinterpretq_f32_s32(vaddq_s32(vreinterpretq_s32_f32(y), vshlq_n_s32(k_bits, 23)));
  const uint32x4_t is_number = vceqq_f32(argument, argument);
  return vbslq_f32(is_number, y, argument);
}

}  // namespace neon_detail

struct Neon {
  using value_type = float;
  static constexpr CpuIsa isa = CpuIsa::neon;
  static constexpr int rows = 8;
  static constexpr int cols = 8;

  // pack.hpp's pack_key_panels for this kernel's storage, compiled for this instruction set (the
  // transpose is the one packing step the compiler vectorises only with wide registers).
  static void pack_key_panels(const float* data, std::int64_t row_stride, std::int64_t count,
                              std::int64_t dim, float* out) {
    kernels::pack_key_panels(data, row_stride, count, dim, cols, out);
  }

  static void multiply(const float* a, std::int64_t a_row, std::int64_t a_depth, const float* b,
                       std::int64_t depth, float* c, std::int64_t c_row, bool accumulate) {
    float32x4_t sum[rows][2];
    for (int i = 0; i < rows; ++i) sum[i][0] = sum[i][1] = vdupq_n_f32(0.0f);
    for (std::int64_t p = 0; p < depth; ++p) {
      const float32x4_t b0 = vld1q_f32(b + p * cols), b1 = vld1q_f32(b + p * cols + 4);
      for (int i = 0; i < rows; ++i) {
        const float32x4_t a_value = vld1q_dup_f32(a + i * a_row + p * a_depth);
        sum[i][0] = vfmaq_f32(sum[i][0], a_value, b0);
        sum[i][1] = vfmaq_f32(sum[i][1], a_value, b1);
      }
    }
    for (int i = 0; i < rows; ++i) {
      float* row = c + i * c_row;
      if (accumulate) {
        sum[i][0] = vaddq_f32(vld1q_f32(row), sum[i][0]);
        sum[i][1] = vaddq_f32(vld1q_f32(row + 4), sum[i][1]);
      }
      vst1q_f32(row, sum[i][0]);
      vst1q_f32(row + 4, sum[i][1]);
    }
  }

  static float max_scaled(const float* s, std::int64_t n, float scale) {
    const bool largest = scale >= 0.0f;
    float32x4_t extreme = vdupq_n_f32(s[0]);
    std::int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      const float32x4_t v = vld1q_f32(s + i);
      extreme = largest ? vmaxq_f32(extreme, v) : vminq_f32(extreme, v);
    }
    float value = largest ? vmaxvq_f32(extreme) : vminvq_f32(extreme);
    for (; i < n; ++i) value = largest ? std::fmax(value, s[i]) : std::fmin(value, s[i]);
    return scale * value;
  }

  static float exp_shifted_sum(float* p, std::int64_t n, float scale, float shift) {
    const float32x4_t vshift = vdupq_n_f32(shift), vscale = vdupq_n_f32(scale);
    float32x4_t sum = vdupq_n_f32(0.0f);
    std::int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      const float32x4_t argument = vfmsq_f32(vnegq_f32(vshift), vld1q_f32(p + i), vnegq_f32(vscale));
      const float32x4_t y = neon_detail::exp_nonpositive(argument);
      vst1q_f32(p + i, y);
      sum = vaddq_f32(sum, y);
    }
    if (i < n) {  // ragged end through a zero-padded copy; dead lanes are cleared before the sum
      float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const std::int64_t left = n - i;
      for (std::int64_t j = 0; j < left; ++j) tail[j] = p[i + j];
      float32x4_t y = neon_detail::exp_nonpositive(
          vfmsq_f32(vnegq_f32(vshift), vld1q_f32(tail), vnegq_f32(vscale)));
      vst1q_f32(tail, y);
      for (std::int64_t j = left; j < 4; ++j) tail[j] = 0.0f;
      for (std::int64_t j = 0; j < left; ++j) p[i + j] = tail[j];
      sum = vaddq_f32(sum, vld1q_f32(tail));
    }
    // Lanes summed in a fixed order.
    return (vgetq_lane_f32(sum, 0) + vgetq_lane_f32(sum, 1)) +
           (vgetq_lane_f32(sum, 2) + vgetq_lane_f32(sum, 3));
  }
};

}  // namespace dilated_attention::cpu::kernels

#endif  // DILATED_ATTENTION_NEON_KERNELS
