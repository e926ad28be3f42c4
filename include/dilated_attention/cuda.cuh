#pragma once
// The GPU umbrella header: dilated_attention::cuda::forward and ::backward on device pointers for __half,
// __nv_bfloat16 and float (docs/semantics.md "Entry points"). The only way CUDA enters a build: compile the including
// translation unit with nvcc and link DilatedAttention::cuda. The CPU headers never include it.

#include "config.hpp"
#include "arguments.hpp"
#include "sequences.hpp"
#include "pattern.hpp"
#include "reference.hpp"
#include "cuda/error.cuh"
#include "cuda/backward.cuh"
#include "cuda/forward.cuh"
#include "cuda/inference.cuh"
#include "cuda/launch_plan.hpp"
