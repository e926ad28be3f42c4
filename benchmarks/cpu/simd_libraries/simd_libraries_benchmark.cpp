// Which way to reach AVX2 / AVX-512 from a header-only library, measured (docs/design.md, SIMD
// section): the attention's two products for one 48-row query tile against 512 keys at D = 64
// (S = Q Kᵀ with depth 64, then O = S V with depth 512), single-threaded, through the register
// tile of each candidate:
//   ours/<isa>       cpu/kernels/<isa>.hpp: intrinsics in functions with target attributes
//                    (this translation unit is compiled for baseline x86-64, no -march)
//   highway/dynamic  Google Highway, every target in one baseline translation unit,
//                    HWY_DYNAMIC_DISPATCH (links libhwy)
//   xsimd/native     xsimd, its translation unit compiled with -march=native
// Built only with -DDILATED_ATTENTION_BENCH_SIMD_LIBRARIES=ON.
#include <dilated_attention/cpu/kernels/dispatch.hpp>

#include <benchmark/benchmark.h>

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace simd_libraries {
void highway_multiply(const float*, std::int64_t, const float*, std::int64_t, float*, std::int64_t);
int highway_rows();
int highway_cols();
void xsimd_multiply(const float*, std::int64_t, const float*, std::int64_t, float*, std::int64_t);
int xsimd_rows();
int xsimd_cols();
const char* xsimd_arch();
}  // namespace simd_libraries

namespace {

using Multiply = std::function<void(const float*, std::int64_t, const float*, std::int64_t, float*,
                                    std::int64_t)>;
constexpr std::int64_t tile_keys = 48, key_count = 512, head_dim_fixed = 64;

void BM_Products(benchmark::State& state, Multiply multiply, int rows, int cols) {
  std::mt19937 engine(1);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> q(tile_keys * head_dim_fixed), k(key_count * head_dim_fixed),
      v(key_count * head_dim_fixed), s(tile_keys * key_count), o(tile_keys * head_dim_fixed);
  for (std::vector<float>* x : {&q, &k, &v})
    for (float& e : *x) e = uniform(engine);
  for (auto _ : state) {
    for (std::int64_t p = 0; p < key_count / cols; ++p)  // S = Q Kᵀ, key panel p
      for (std::int64_t r = 0; r < tile_keys / rows; ++r)
        multiply(q.data() + r * rows * head_dim_fixed, head_dim_fixed,
                 k.data() + p * head_dim_fixed * cols, head_dim_fixed,
                 s.data() + r * rows * key_count + p * cols, key_count);
    for (std::int64_t c = 0; c < head_dim_fixed / cols; ++c)  // O = S V, column panel c
      for (std::int64_t r = 0; r < tile_keys / rows; ++r)
        multiply(s.data() + r * rows * key_count, key_count, v.data() + c * key_count * cols,
                 key_count, o.data() + r * rows * head_dim_fixed + c * cols, head_dim_fixed);
    benchmark::DoNotOptimize(o.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOPs"] = benchmark::Counter(4.0 * tile_keys * key_count * head_dim_fixed * 1e-9,
                                                benchmark::Counter::kIsIterationInvariantRate);
}

template <class K>
void register_ours() {
  namespace cpu = dilated_attention::cpu;
  if (!cpu::isa_supported(K::isa)) return;
  benchmark::RegisterBenchmark(
      (std::string("ours/") + dilated_attention::to_string(K::isa)).c_str(), BM_Products,
      [](const float* a, std::int64_t a_row, const float* b, std::int64_t depth, float* c,
         std::int64_t c_row) { K::multiply(a, a_row, 1, b, depth, c, c_row, false); },
      K::rows, K::cols);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  register_ours<dilated_attention::cpu::kernels::Avx512>();
  register_ours<dilated_attention::cpu::kernels::Avx2>();
  benchmark::RegisterBenchmark("highway/dynamic", BM_Products, simd_libraries::highway_multiply,
                               simd_libraries::highway_rows(), simd_libraries::highway_cols());
  benchmark::RegisterBenchmark(
      (std::string("xsimd/native:") + simd_libraries::xsimd_arch()).c_str(), BM_Products,
      simd_libraries::xsimd_multiply, simd_libraries::xsimd_rows(), simd_libraries::xsimd_cols());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
