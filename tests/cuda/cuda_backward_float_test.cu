// CUDA backward tests for float storage; the body is shared by the three storage types.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

using Storage = float;
#define DILATED_ATTENTION_SUITE(name) CudaBackwardFloat##name

#include "support/cuda_backward_test_body.cuh"
