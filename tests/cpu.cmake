# Tests of the cpu area: the attend primitive and the threaded forward kernel, against the fp64
# reference and brute force. Small shapes, so that Debug and sanitizer builds stay quick.
dilated_attention_add_test(cpu_attend_test SOURCES cpu_attend_test.cpp LABELS cpu)
dilated_attention_add_test(cpu_forward_test SOURCES cpu_forward_test.cpp LABELS "cpu;tsan")
dilated_attention_add_test(cpu_threads_test SOURCES cpu_threads_test.cpp LABELS "cpu;tsan")
# The backward: against reference::backward, determinism across threads (also under TSan), a
# 128 KiB-stack thread, one test per bad input.
dilated_attention_add_test(cpu_backward_test SOURCES cpu_backward_test.cpp LABELS "cpu;tsan")
# The forward suite once more per instruction-set path, forced by DILATED_ATTENTION_CPU_ISA;
# skipped (not failed) where this CPU or build lacks the path.
foreach(isa generic avx2 avx512 neon)
  add_test(NAME cpu_forward_test.isa.${isa} COMMAND cpu_forward_test)
  set_tests_properties(cpu_forward_test.isa.${isa} PROPERTIES
    ENVIRONMENT DILATED_ATTENTION_CPU_ISA=${isa} LABELS cpu SKIP_REGULAR_EXPRESSION "isa-unsupported")
endforeach()
# Opt-in: the CPU tests cross-compiled for aarch64 (NEON kernels) and run under qemu-user
# (tests/cpu_neon_qemu.sh; about 2 minutes on two cores). Skipped when the tools are missing.
option(DILATED_ATTENTION_TEST_NEON_QEMU "Run the CPU tests for aarch64 under qemu-aarch64" OFF)
if(DILATED_ATTENTION_TEST_NEON_QEMU)
  add_test(NAME cpu_neon_qemu
           COMMAND ${CMAKE_CURRENT_LIST_DIR}/cpu_neon_qemu.sh ${CMAKE_CURRENT_BINARY_DIR}/neon-qemu)
  set_tests_properties(cpu_neon_qemu PROPERTIES LABELS cpu SKIP_RETURN_CODE 77 TIMEOUT 1200)
endif()
# The forward suite built with Eigen's stack allocation turned off: the kernel's tiles no longer
# depend on EIGEN_STACK_ALLOCATION_LIMIT (one whole-executable test, so test names stay unique).
add_executable(cpu_forward_test_eigen_stack_0 cpu_forward_test.cpp)
target_link_libraries(cpu_forward_test_eigen_stack_0 PRIVATE DilatedAttention::dilated_attention
                      GTest::gtest_main)
target_compile_definitions(cpu_forward_test_eigen_stack_0 PRIVATE EIGEN_STACK_ALLOCATION_LIMIT=0)
add_test(NAME cpu_forward_test.eigen_stack_limit_0 COMMAND cpu_forward_test_eigen_stack_0)
set_tests_properties(cpu_forward_test.eigen_stack_limit_0 PROPERTIES LABELS cpu)
