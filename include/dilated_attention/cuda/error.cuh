#pragma once
// CUDA runtime errors become exceptions: std::runtime_error whose message carries the failing
// call, cudaGetErrorName and cudaGetErrorString. Argument errors are never reported this way;
// they are std::invalid_argument from validate() before any device work.

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace dilated_attention::cuda {

inline void check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  throw std::runtime_error(std::string("dilated_attention::cuda: ") + what + " failed: " +
                           cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

}  // namespace dilated_attention::cuda
