// CUDA forward tests for float storage; the body is shared by the three storage types.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

using Storage = float;
#define DILATED_ATTENTION_SUITE(name) CudaForwardFloat##name

#include "support/cuda_forward_test_body.cuh"
