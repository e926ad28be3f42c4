// CUDA forward tests for __nv_bfloat16 storage; the body is shared by the three storage types.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

using Storage = __nv_bfloat16;
#define DILATED_ATTENTION_SUITE(name) CudaForwardBfloat16##name

#include "support/cuda_forward_test_body.cuh"
