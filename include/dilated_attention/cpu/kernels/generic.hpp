#pragma once
// The portable micro-kernels: plain C++, every accumulator type, every CPU. They define the
// contract the instruction-set variants (avx2.hpp, avx512.hpp, neon.hpp) share, and are the
// oracle those are tested against (tests/cpu/cpu_attend_test.cpp runs each path against it and the
// fp64 brute force).
//
// The contract of a kernel set K (all members static):
//   value_type             the accumulator type it computes in
//   isa                    its CpuIsa
//   rows, cols             MR x NR, the register tile of multiply()
//   multiply(a, a_row, a_depth, b, depth, c, c_row, accumulate)
//       C[i][j] (+)= sum_{p < depth} A[i * a_row + p * a_depth] * B[p * cols + j]
//       for i < rows, j < cols: A addressed by two strides (so A and its transpose are the same
//       call: Q Kᵀ, P V, and the backward's dO Vᵀ, Pᵀ dO, dS K, dSᵀ Q), B a packed panel
//       (pack.hpp), C row-major. The depth sum is kept in registers and added to C once, so C
//       sees one rounding per call (blocked summation: a key tile at a time).
//   pack_key_panels(data, row_stride, count, dim, out)
//       pack.hpp's pack_key_panels with cols = K::cols, for storage of value_type
//   max_scaled(s, n, scale)        max_i scale * s[i] over n >= 1 scores
//   exp_shifted_sum(p, n, scale, shift)
//       p[i] = exp(scale * p[i] - shift) in place for i < n; returns their sum.
// Every result depends only on the arguments (fixed summation order): bitwise deterministic.

#include <algorithm>
#include <cstdint>

#include "../exp.hpp"
#include "isa.hpp"
#include "pack.hpp"

namespace dilated_attention::cpu::kernels {

template <class Acc>
struct Generic {
  using value_type = Acc;
  static constexpr CpuIsa isa = CpuIsa::generic;
  static constexpr int rows = 4;
  static constexpr int cols = 8;

  // pack.hpp's pack_key_panels for this kernel's storage, compiled for this instruction set (the
  // transpose is the one packing step the compiler vectorises only with wide registers).
  static void pack_key_panels(const Acc* data, std::int64_t row_stride, std::int64_t count,
                              std::int64_t dim, Acc* out) {
    kernels::pack_key_panels(data, row_stride, count, dim, cols, out);
  }

  static void multiply(const Acc* a, std::int64_t a_row, std::int64_t a_depth, const Acc* b,
                       std::int64_t depth, Acc* c, std::int64_t c_row, bool accumulate) {
    Acc sum[rows][cols] = {};
    for (std::int64_t p = 0; p < depth; ++p) {
      const Acc* b_row = b + p * cols;
      for (int i = 0; i < rows; ++i) {
        const Acc a_value = a[i * a_row + p * a_depth];
        for (int j = 0; j < cols; ++j) sum[i][j] += a_value * b_row[j];
      }
    }
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < cols; ++j)
        c[i * c_row + j] = accumulate ? c[i * c_row + j] + sum[i][j] : sum[i][j];
  }

  static Acc max_scaled(const Acc* s, std::int64_t n, Acc scale) {
    // max(scale * s) is scale * max(s) for scale >= 0 and scale * min(s) otherwise (rounding is
    // monotonic), so one multiply per row.
    Acc extreme = s[0];
    if (scale >= Acc(0)) {
      for (std::int64_t i = 1; i < n; ++i) extreme = std::max(extreme, s[i]);
    } else {
      for (std::int64_t i = 1; i < n; ++i) extreme = std::min(extreme, s[i]);
    }
    return scale * extreme;
  }

  static Acc exp_shifted_sum(Acc* p, std::int64_t n, Acc scale, Acc shift) {
    return detail::exp_shifted_sum(p, n, scale, shift);
  }
};

}  // namespace dilated_attention::cpu::kernels
