// Compiled by the cuda.deprecation_check.* tests (tests/cuda/CMakeLists.txt) with nvcc's
// --Werror deprecated-declarations, once per DEPRECATION_CASE: each case (one old positional
// spelling) must fail with its deprecation message, in the front end, before any device code is
// generated (cheap). The grouped calls are compiled, warning-free, by every other .cu test.
#include <dilated_attention/cuda.cuh>

namespace da = dilated_attention;

void check(const da::Config& c, const da::Shape& s, da::View<const float> x, da::View<float> y,
           float* lse, void* workspace, std::size_t bytes) {
#if DEPRECATION_CASE == 1
  da::cuda::forward<float>(c, s, x, x, x, y, lse, cudaStream_t{});
#elif DEPRECATION_CASE == 2
  da::cuda::backward<float>(c, s, x, x, x, x, lse, x, y, y, y, workspace, bytes, cudaStream_t{});
#endif
  (void)workspace, (void)bytes;
}
