#pragma once
// What the GPU benchmarks share: the "no CUDA device: ..." check that turns every case into a
// reported error on a machine without one, device buffers filled with seeded random values on the
// device, and the CUDA-event timing loop behind Google Benchmark's manual time.

#include <dilated_attention/cuda.cuh>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

namespace dilated_attention::bench {

// Empty when a device is usable; otherwise why not.
inline std::string why_no_device() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) return std::string("no CUDA device: ") + cudaGetErrorString(status);
  if (count == 0) return "no CUDA device: cudaGetDeviceCount returned 0";
  return {};
}

// True, with the case reported as an error that says why, when no device is usable: the case then
// times nothing.
inline bool skip_without_device(benchmark::State& state) {
  const std::string why = why_no_device();
  if (why.empty()) return false;
  state.SkipWithError(why.c_str());
  return true;
}

// Uniform on [-sqrt 3, sqrt 3) from a hash of (seed, index): unit variance, reproducible. Never
// zeros: they hide unwritten outputs and can run faster.
template <class T>
__global__ void fill_random(T* data, std::int64_t count, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + static_cast<std::uint64_t>(i);
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    x ^= x >> 31;
    const float unit = static_cast<float>(x >> 40) * (1.0f / 16777216.0f);
    data[i] = T((unit * 2.0f - 1.0f) * 1.7320508f);
  }
}

// `count` elements of device memory (at least one allocated, so a zero count still has a valid
// pointer); filled by fill_random when `seed` is not 0, left unset otherwise (outputs, workspace).
template <class T>
struct DeviceTensor {
  T* data = nullptr;
  explicit DeviceTensor(std::int64_t count, std::uint64_t seed = 0) {
    cuda::check(
        cudaMalloc(&data, static_cast<std::size_t>(std::max<std::int64_t>(count, 1)) * sizeof(T)),
        "cudaMalloc");
    if (seed != 0) {
      fill_random<<<1024, 256>>>(data, count, seed);
      cuda::check(cudaGetLastError(), "fill_random");
    }
  }
  ~DeviceTensor() { cudaFree(data); }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;
};

// Times `call` with CUDA events around each call, after one untimed warm-up call (module load,
// shared-memory attributes and pool growth stay out of the timings); returns seconds per call.
template <class Call>
double time_calls(benchmark::State& state, Call&& call) {
  cudaEvent_t start, stop;
  cuda::check(cudaEventCreate(&start), "cudaEventCreate");
  cuda::check(cudaEventCreate(&stop), "cudaEventCreate");
  call();
  cuda::check(cudaDeviceSynchronize(), "warm-up");
  double total = 0.0;
  for (auto _ : state) {
    cuda::check(cudaEventRecord(start), "cudaEventRecord");
    call();
    cuda::check(cudaEventRecord(stop), "cudaEventRecord");
    cuda::check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0.f;
    cuda::check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    state.SetIterationTime(ms * 1e-3);
    total += ms * 1e-3;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return total / static_cast<double>(std::max<benchmark::IterationCount>(state.iterations(), 1));
}

// Labels the case with the device's name, so that the JSON says which GPU was timed.
inline void label_with_device(benchmark::State& state) {
  cudaDeviceProp props{};
  int device = 0;
  if (cudaGetDevice(&device) == cudaSuccess &&
      cudaGetDeviceProperties(&props, device) == cudaSuccess)
    state.SetLabel(props.name);
}

}  // namespace dilated_attention::bench
