// Compiled by the cpu.deprecation_check.* tests (tests/cpu/CMakeLists.txt) with
// -Werror=deprecated-declarations, once per DEPRECATION_CASE: case 0 (the grouped calls) must
// compile, every other case (one old positional spelling each) must fail with its deprecation
// message. Never part of a test executable.
#include <dilated_attention/dilated_attention.hpp>

namespace da = dilated_attention;

void check(const da::Config& c, const da::Shape& s, da::View<const float> x, da::View<float> y,
           float* lse) {
  const da::CpuOptions options{};
#if DEPRECATION_CASE == 0
  da::forward<float>(c, s, {x, x, x}, {y, lse}, options);
  da::forward<float>(c, s, {x, x, x}, {y, lse});
  da::backward<float>(c, s, {x, x, x}, {x, lse}, x, {y, y, y}, options);
  da::backward<float>(c, s, {x, x, x}, {x, lse}, x, {y, y, y});
  da::reference::forward<float>(c, s, {x, x, x}, {y, lse});
  da::reference::backward<float>(c, s, {x, x, x}, {x, lse}, x, {y, y, y});
#elif DEPRECATION_CASE == 1
  da::forward<float>(c, s, x, x, x, y, lse, options);
#elif DEPRECATION_CASE == 2
  da::forward<float>(c, s, x, x, x, y, lse);
#elif DEPRECATION_CASE == 3
  da::backward<float>(c, s, x, x, x, x, lse, x, y, y, y, options);
#elif DEPRECATION_CASE == 4
  da::backward<float>(c, s, x, x, x, x, lse, x, y, y, y);
#elif DEPRECATION_CASE == 5
  da::reference::forward<float>(c, s, x, x, x, y, lse);
#elif DEPRECATION_CASE == 6
  da::reference::backward<float>(c, s, x, x, x, x, lse, x, y, y, y);
#endif
  (void)options;
}
