// CUDA forward tests for __half storage; the body is shared by the three storage types.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

using Storage = __half;
#define DILATED_ATTENTION_SUITE(name) CudaForwardHalf##name

#include "support/cuda_forward_test_body.cuh"
