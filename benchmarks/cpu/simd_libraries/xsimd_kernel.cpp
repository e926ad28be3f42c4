// The same product with xsimd. xsimd picks its architecture from the compiler's target macros,
// so this translation unit is compiled with -march=native (a baseline build would get SSE2);
// run-time dispatch with xsimd needs one such translation unit per architecture.
#include <xsimd/xsimd.hpp>

#include <cstdint>

namespace simd_libraries {

using Batch = xsimd::batch<float>;
constexpr int tile_rows = Batch::size == 16 ? 12 : 6;

void xsimd_multiply(const float* a, std::int64_t a_row, const float* b, std::int64_t depth,
                    float* c, std::int64_t c_row) {
  constexpr std::size_t lanes = Batch::size;
  Batch sum0[tile_rows], sum1[tile_rows];
  for (int i = 0; i < tile_rows; ++i) sum0[i] = sum1[i] = Batch(0.0f);
  for (std::int64_t p = 0; p < depth; ++p) {
    const Batch b0 = Batch::load_unaligned(b + p * 2 * lanes);
    const Batch b1 = Batch::load_unaligned(b + p * 2 * lanes + lanes);
    for (int i = 0; i < tile_rows; ++i) {
      const Batch av(a[i * a_row + p]);
      sum0[i] = xsimd::fma(av, b0, sum0[i]);
      sum1[i] = xsimd::fma(av, b1, sum1[i]);
    }
  }
  for (int i = 0; i < tile_rows; ++i) {
    sum0[i].store_unaligned(c + i * c_row);
    sum1[i].store_unaligned(c + i * c_row + lanes);
  }
}
int xsimd_rows() { return tile_rows; }
int xsimd_cols() { return static_cast<int>(2 * Batch::size); }
const char* xsimd_arch() { return xsimd::default_arch::name(); }

}  // namespace simd_libraries
