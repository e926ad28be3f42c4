#pragma once
// One macro so that the index algebra compiles unchanged as plain C++ and as CUDA device code.
// Only headers below the kernels use it; a plain C++ build never sees a CUDA keyword.

#if defined(__CUDACC__)
#define DILATED_ATTENTION_HOST_DEVICE __host__ __device__ inline
#else
#define DILATED_ATTENTION_HOST_DEVICE inline
#endif
