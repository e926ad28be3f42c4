// The attention's register-tiled product (generic.hpp's multiply: C[MR x 2 vectors] = A B over
// `depth`) written with Google Highway and dispatched at run time (foreach_target: every x86
// target compiled in this one baseline translation unit; HWY_DYNAMIC_DISPATCH picks one, which
// needs libhwy linked). Only for the measurement in docs/design.md (SIMD section).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "highway_kernel.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <cstdint>

HWY_BEFORE_NAMESPACE();
namespace simd_libraries {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// 12 rows where the target has 32 registers (AVX-512), 6 where it has 16.
#if HWY_TARGET <= HWY_AVX3
constexpr int tile_rows = 12;
#else
constexpr int tile_rows = 6;
#endif

void Multiply(const float* a, std::int64_t a_row, const float* b, std::int64_t depth, float* c,
              std::int64_t c_row) {
  const hn::ScalableTag<float> d;
  const std::size_t lanes = hn::Lanes(d);
  using V = hn::Vec<decltype(d)>;
  V sum0[tile_rows], sum1[tile_rows];
  for (int i = 0; i < tile_rows; ++i) sum0[i] = sum1[i] = hn::Zero(d);
  for (std::int64_t p = 0; p < depth; ++p) {
    const V b0 = hn::LoadU(d, b + p * 2 * lanes), b1 = hn::LoadU(d, b + p * 2 * lanes + lanes);
    for (int i = 0; i < tile_rows; ++i) {
      const V av = hn::Set(d, a[i * a_row + p]);
      sum0[i] = hn::MulAdd(av, b0, sum0[i]);
      sum1[i] = hn::MulAdd(av, b1, sum1[i]);
    }
  }
  for (int i = 0; i < tile_rows; ++i) {
    hn::StoreU(sum0[i], d, c + i * c_row);
    hn::StoreU(sum1[i], d, c + i * c_row + lanes);
  }
}

int Rows() { return tile_rows; }
int Cols() { return static_cast<int>(2 * hn::Lanes(hn::ScalableTag<float>())); }

}  // namespace HWY_NAMESPACE
}  // namespace simd_libraries
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace simd_libraries {
HWY_EXPORT(Multiply);
HWY_EXPORT(Rows);
HWY_EXPORT(Cols);
void highway_multiply(const float* a, std::int64_t a_row, const float* b, std::int64_t depth,
                      float* c, std::int64_t c_row) {
  HWY_DYNAMIC_DISPATCH(Multiply)(a, a_row, b, depth, c, c_row);
}
int highway_rows() { return HWY_DYNAMIC_DISPATCH(Rows)(); }
int highway_cols() { return HWY_DYNAMIC_DISPATCH(Cols)(); }
}  // namespace simd_libraries
#endif
