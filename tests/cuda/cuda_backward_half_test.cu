// CUDA backward tests for __half storage; the body is shared by the three storage types.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

using Storage = __half;
#define DILATED_ATTENTION_SUITE(name) CudaBackwardHalf##name

#include "support/cuda_backward_test_body.cuh"
