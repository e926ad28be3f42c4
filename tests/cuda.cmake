# Tests of the cuda area (label "cuda").
#
# cuda_launch_plan_test is plain C++ (the launch plan is host+device code) and always builds: it
# checks the kernels' work decomposition against the pattern on any machine. The .cu tests build
# whenever the CUDA target exists (nvcc found), also in CI without a GPU; their GPU cases skip
# with "no CUDA device: ..." there, while their argument and error-path cases run.
dilated_attention_add_test(cuda_launch_plan_test SOURCES cuda_launch_plan_test.cpp LABELS cuda)

if(TARGET dilated_attention_cuda)
  # Not dilated_attention_add_test: its GCC warning flags would reach nvcc itself.
  function(dilated_attention_add_cuda_test name)
    add_executable(${name} ${ARGN})
    target_link_libraries(${name} PRIVATE DilatedAttention::cuda GTest::gtest_main)
    target_include_directories(${name} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
    target_compile_options(${name} PRIVATE
      $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-Wshadow --Werror=all-warnings>)
    gtest_discover_tests(${name} PROPERTIES LABELS cuda DISCOVERY_TIMEOUT 120)
  endfunction()
  # The kernels' own source run on the host (fibers, emulated ldmatrix/mma): plain C++ with the
  # CUDA headers for __half/__nv_bfloat16, optimised even in Debug because emulating a warp's
  # mma is slow at -O0.
  dilated_attention_add_test(cuda_emulated_kernel_test SOURCES cuda_emulated_kernel_test.cpp
                             LABELS cuda)
  target_include_directories(cuda_emulated_kernel_test SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
  target_compile_options(cuda_emulated_kernel_test PRIVATE -O2 -Wno-unknown-pragmas)

  # One executable per storage type, so that the kernels of each compile in parallel.
  dilated_attention_add_cuda_test(cuda_forward_half_test cuda_forward_half_test.cu)
  dilated_attention_add_cuda_test(cuda_forward_bfloat16_test cuda_forward_bfloat16_test.cu)
  dilated_attention_add_cuda_test(cuda_forward_float_test cuda_forward_float_test.cu)
endif()
