# Tests of the ring area. Every ring test carries the label `ring`; the tests whose ranks are
# threads of one process (forward, backward, driver, transport, faults) and the pattern-cache tests also carry
# `tsan` (CI reruns them under ThreadSanitizer), and the tests launched through mpiexec carry `mpi`.
# Every one runs under a CTest TIMEOUT, so a hang fails instead of stalling CI.

dilated_attention_add_test(ring_forward_test SOURCES ring_forward_test.cpp LABELS "ring;tsan" TIMEOUT 120)
dilated_attention_add_test(ring_backward_test SOURCES ring_backward_test.cpp LABELS "ring;tsan" TIMEOUT 300)
dilated_attention_add_test(ring_schedule_test SOURCES ring_schedule_test.cpp LABELS ring TIMEOUT 120)
dilated_attention_add_test(ring_pattern_cache_test SOURCES ring_pattern_cache_test.cpp LABELS "ring;tsan" TIMEOUT 120)
dilated_attention_add_test(ring_transport_test SOURCES ring_transport_test.cpp LABELS "ring;tsan" TIMEOUT 120)
dilated_attention_add_test(ring_driver_test SOURCES ring_driver_test.cpp LABELS "ring;tsan" TIMEOUT 120)
dilated_attention_add_test(ring_faults_test SOURCES ring_faults_test.cpp LABELS "ring;tsan" TIMEOUT 120)

# Ranks in separate processes: one executable, launched by mpiexec with 2, 3 and 4 ranks.
if(TARGET dilated_attention_mpi)
  add_executable(ring_mpi_test ring_mpi_test.cpp)
  target_link_libraries(ring_mpi_test PRIVATE DilatedAttention::mpi)
  target_include_directories(ring_mpi_test PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
  target_compile_options(ring_mpi_test PRIVATE
    $<$<CXX_COMPILER_ID:GNU,Clang>:-Wall -Wextra -Wpedantic -Wshadow -Werror=return-type>)
  # Open MPI refuses more ranks than cores and running as root unless told; CI does both. Open MPI
  # itself leaks at MPI_Finalize, so LeakSanitizer is off for these processes in sanitizer builds
  # (the ring's own allocations are leak-checked by the in-process tests).
  set(DILATED_ATTENTION_MPIEXEC_EXTRA_FLAGS "--oversubscribe" CACHE STRING
      "Extra mpiexec flags for the ring MPI tests (Open MPI: --oversubscribe)")
  separate_arguments(_ring_mpiexec_extra UNIX_COMMAND "${DILATED_ATTENTION_MPIEXEC_EXTRA_FLAGS}")
  foreach(ranks 2 3 4)
    add_test(NAME ring_mpi_test_${ranks}
             COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${ranks} ${_ring_mpiexec_extra}
                     ${MPIEXEC_PREFLAGS} $<TARGET_FILE:ring_mpi_test> ${MPIEXEC_POSTFLAGS})
    set_tests_properties(ring_mpi_test_${ranks} PROPERTIES
      LABELS "ring;mpi" TIMEOUT 120
      ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1;ASAN_OPTIONS=detect_leaks=0")
  endforeach()
endif()

# The NCCL transport: compiled wherever its target exists; the transfer case needs a GPU.
if(TARGET dilated_attention_nccl)
  add_executable(ring_nccl_test ring_nccl_test.cu)
  target_link_libraries(ring_nccl_test PRIVATE DilatedAttention::nccl GTest::gtest_main)
  target_compile_options(ring_nccl_test PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-Wshadow --Werror=all-warnings>)
  gtest_discover_tests(ring_nccl_test PROPERTIES LABELS ring TIMEOUT 120 DISCOVERY_TIMEOUT 120)
endif()

# The CUDA back ends of the ring, forward and backward (label `cuda`, first, so that `ctest -L
# cuda` and the one-call GPU check run them; a discovered test keeps only its first label). The
# emulated tests are plain C++ run on any machine; the .cu tests build wherever nvcc is found and
# skip their GPU cases without a device.
if(TARGET dilated_attention_cuda)
  dilated_attention_add_test(ring_cuda_emulated_test SOURCES ring_cuda_emulated_test.cpp
                             LABELS cuda TIMEOUT 600)
  target_include_directories(ring_cuda_emulated_test SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
  target_compile_options(ring_cuda_emulated_test PRIVATE -O2 -Wno-unknown-pragmas)
  dilated_attention_add_cuda_test(ring_cuda_forward_test ring_cuda_forward_test.cu)
  dilated_attention_add_test(ring_cuda_backward_emulated_test SOURCES ring_cuda_backward_emulated_test.cpp
                             LABELS cuda TIMEOUT 600)
  target_include_directories(ring_cuda_backward_emulated_test SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
  target_compile_options(ring_cuda_backward_emulated_test PRIVATE -O2 -Wno-unknown-pragmas)
  dilated_attention_add_cuda_test(ring_cuda_backward_test ring_cuda_backward_test.cu)
endif()
