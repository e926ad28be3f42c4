// A downstream CUDA program: cuda::forward<float> on a small causal problem, compared with the
// fp64 reference. Exits 0 with a "skip" line when no GPU answers (compiling it is the check then).

#include <dilated_attention/cuda.cuh>
#include <dilated_attention/reference.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace da = dilated_attention;

#define CONSUMER_CHECK(call)                                           \
  do {                                                                 \
    const cudaError_t status = (call);                                 \
    if (status != cudaSuccess) {                                       \
      std::printf("FAIL %s: %s\n", #call, cudaGetErrorString(status)); \
      return 1;                                                        \
    }                                                                  \
  } while (0)

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("skip: no CUDA device; the consumer compiled and linked\n");
    return 0;
  }
  const da::Shape shape{1, 37, 4, 2, 64};
  da::Config config;
  config.segment_lengths = {8, 16, 32};
  config.dilation_rates = {1, 2, 4};
  config.causal = true;

  std::mt19937 engine(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const std::size_t q_elements =
      static_cast<std::size_t>(shape.seq_len * shape.num_heads * shape.head_dim);
  const std::size_t kv_elements =
      static_cast<std::size_t>(shape.seq_len * shape.num_kv_heads * shape.head_dim);
  std::vector<float> q(q_elements), k(kv_elements), v(kv_elements), expected(q_elements),
      out(q_elements);
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = normal(engine);
  da::reference::forward(config, shape,
                         {da::contiguous_view(q.data(), shape, shape.num_heads),
                          da::contiguous_view(k.data(), shape, shape.num_kv_heads),
                          da::contiguous_view(v.data(), shape, shape.num_kv_heads)},
                         da::Outputs{da::contiguous_view(expected.data(), shape, shape.num_heads)});

  float *dq = nullptr, *dk = nullptr, *dv = nullptr, *dout = nullptr;
  CONSUMER_CHECK(cudaMalloc(&dq, q_elements * sizeof(float)));
  CONSUMER_CHECK(cudaMalloc(&dk, kv_elements * sizeof(float)));
  CONSUMER_CHECK(cudaMalloc(&dv, kv_elements * sizeof(float)));
  CONSUMER_CHECK(cudaMalloc(&dout, q_elements * sizeof(float)));
  CONSUMER_CHECK(cudaMemcpy(dq, q.data(), q_elements * sizeof(float), cudaMemcpyHostToDevice));
  CONSUMER_CHECK(cudaMemcpy(dk, k.data(), kv_elements * sizeof(float), cudaMemcpyHostToDevice));
  CONSUMER_CHECK(cudaMemcpy(dv, v.data(), kv_elements * sizeof(float), cudaMemcpyHostToDevice));
  da::cuda::forward(config, shape,
                    {da::contiguous_view<const float>(dq, shape, shape.num_heads),
                     da::contiguous_view<const float>(dk, shape, shape.num_kv_heads),
                     da::contiguous_view<const float>(dv, shape, shape.num_kv_heads)},
                    da::Outputs{da::contiguous_view(dout, shape, shape.num_heads)});
  CONSUMER_CHECK(cudaDeviceSynchronize());
  CONSUMER_CHECK(cudaMemcpy(out.data(), dout, q_elements * sizeof(float), cudaMemcpyDeviceToHost));
  for (float* p : {dq, dk, dv, dout}) cudaFree(p);

  double worst = 0.0;
  for (std::size_t j = 0; j < out.size(); ++j)
    worst = std::max(worst, std::abs(static_cast<double>(out[j]) - expected[j]));
  const bool ok = worst < 2e-3;  // fp32 storage; the kernel may use TF32-free fp32 or fp16 paths
  std::printf("%s cuda forward<float> vs reference: max |dO| = %.3g\n", ok ? "ok  " : "FAIL",
              worst);
  return ok ? 0 : 1;
}
