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
    # TIMEOUT: a GPU case that hangs (a stream never completing, a loopback rank stuck) fails.
    gtest_discover_tests(${name} PROPERTIES LABELS cuda TIMEOUT 300 DISCOVERY_TIMEOUT 120)
  endfunction()
  # The kernels' own source run on the host (fibers, emulated ldmatrix/mma): plain C++ with the
  # CUDA headers for __half/__nv_bfloat16, optimised even in Debug because emulating a warp's
  # mma is slow at -O0.
  dilated_attention_add_test(cuda_emulated_kernel_test SOURCES cuda_emulated_kernel_test.cpp
                             LABELS cuda)
  target_include_directories(cuda_emulated_kernel_test SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
  target_compile_options(cuda_emulated_kernel_test PRIVATE -O2 -Wno-unknown-pragmas)
  dilated_attention_add_test(cuda_emulated_backward_test SOURCES cuda_emulated_backward_test.cpp
                             LABELS cuda)
  target_include_directories(cuda_emulated_backward_test SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
  target_compile_options(cuda_emulated_backward_test PRIVATE -O2 -Wno-unknown-pragmas)

  # One executable per storage type, so that the kernels of each compile in parallel.
  dilated_attention_add_cuda_test(cuda_forward_half_test cuda_forward_half_test.cu)
  dilated_attention_add_cuda_test(cuda_forward_bfloat16_test cuda_forward_bfloat16_test.cu)
  dilated_attention_add_cuda_test(cuda_forward_float_test cuda_forward_float_test.cu)
  dilated_attention_add_cuda_test(cuda_backward_half_test cuda_backward_half_test.cu)
  dilated_attention_add_cuda_test(cuda_backward_bfloat16_test cuda_backward_bfloat16_test.cu)
  dilated_attention_add_cuda_test(cuda_backward_float_test cuda_backward_float_test.cu)
endif()

# The one-call GPU check (benchmarks/gpu/run_gpu_check.sh) dry-run: configure the GPU build in a
# scratch folder (with the dependency bundle when build/gpu-bundle has one), skip every GPU step
# with its reason, and write the summary and the archive. Label gpu_check, not cuda: the check
# itself runs `ctest -L cuda`.
find_program(DILATED_ATTENTION_BASH bash)
if(DILATED_ATTENTION_BASH)
  set(_gpu_check_out ${CMAKE_CURRENT_BINARY_DIR}/gpu_check_dry_run)
  add_test(NAME cuda_gpu_check_dry_run
           COMMAND ${DILATED_ATTENTION_BASH} -c
                   "\"$0\" \"$1\" --dry-run --budget 240 && test -s \"$1/summary.txt\" && grep -q 'overall: PASS' \"$1/summary.txt\" && grep -q 'ctest .*SKIP .*dry run' \"$1/summary.txt\" && tar -tzf \"$1/gpu_check.tar.gz\" | grep -q gpu_check/configure.log"
                   ${PROJECT_SOURCE_DIR}/benchmarks/gpu/run_gpu_check.sh ${_gpu_check_out})
  set_tests_properties(cuda_gpu_check_dry_run PROPERTIES LABELS gpu_check TIMEOUT 300
                       ENVIRONMENT "BUILD=${_gpu_check_out}/build")
endif()
