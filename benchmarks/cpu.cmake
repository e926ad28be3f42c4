# Benchmarks of the cpu area: the Google Benchmark suite behind the README's main job
# (benchmarks/run_comparison.sh) and the small program the peer comparison runs our kernel with.

include(CheckCXXCompilerFlag)
# Benchmarks measure what this machine can do, so they build for it (AVX2/FMA where present);
# the SGEMM they compare against lives in the same binary and gets the same flags.
option(DILATED_ATTENTION_BENCH_NATIVE "Build the CPU benchmarks with -march=native" ON)
check_cxx_compiler_flag(-march=native DILATED_ATTENTION_HAS_MARCH_NATIVE)

function(dilated_attention_cpu_benchmark_flags target)
  target_compile_options(${target} PRIVATE
    $<$<CXX_COMPILER_ID:GNU,Clang>:-Wall -Wextra -Wpedantic -Wshadow>
    # GCC 12 reports thousands of false -Wmaybe-uninitialized inside its own AVX-512 headers
    # when Eigen's vectorised exp is compiled with -march=native on an AVX-512 machine.
    $<$<CXX_COMPILER_ID:GNU>:-Wno-maybe-uninitialized>)
  if(DILATED_ATTENTION_BENCH_NATIVE AND DILATED_ATTENTION_HAS_MARCH_NATIVE)
    target_compile_options(${target} PRIVATE -march=native)
    target_compile_definitions(${target} PRIVATE DA_BENCH_NATIVE_BUILD)
  endif()
endfunction()

# OpenBLAS: a second SGEMM yardstick beside Eigen's, in the benchmark binary only (the library
# never links it). Optional: without it the benchmark runs without that yardstick.
find_path(DILATED_ATTENTION_CBLAS_INCLUDE cblas.h PATH_SUFFIXES openblas openblas-pthread)
find_library(DILATED_ATTENTION_OPENBLAS_LIBRARY openblas)

function(dilated_attention_cpu_forward_benchmark target)
  add_executable(${target}
    ${CMAKE_CURRENT_LIST_DIR}/cpu_forward_benchmark.cpp
    ${CMAKE_CURRENT_LIST_DIR}/cpu_heap_counter.cpp)
  target_link_libraries(${target} PRIVATE DilatedAttention::dilated_attention benchmark::benchmark)
  if(DILATED_ATTENTION_CBLAS_INCLUDE AND DILATED_ATTENTION_OPENBLAS_LIBRARY)
    target_include_directories(${target} SYSTEM PRIVATE ${DILATED_ATTENTION_CBLAS_INCLUDE})
    target_link_libraries(${target} PRIVATE ${DILATED_ATTENTION_OPENBLAS_LIBRARY})
    target_compile_definitions(${target} PRIVATE DA_BENCH_OPENBLAS)
  endif()
endfunction()

dilated_attention_cpu_forward_benchmark(cpu_forward_benchmark)
dilated_attention_cpu_benchmark_flags(cpu_forward_benchmark)

# The same benchmark built as a consumer with default flags would build it (baseline x86-64, no
# -march): the kernel must reach AVX2 / AVX-512 through run-time dispatch alone.
dilated_attention_cpu_forward_benchmark(cpu_forward_benchmark_portable)
target_compile_options(cpu_forward_benchmark_portable PRIVATE
  $<$<CXX_COMPILER_ID:GNU,Clang>:-Wall -Wextra -Wpedantic -Wshadow>)

# Reads raw float32 inputs written by benchmarks/peers/compare_dilated_attention_pytorch.py,
# runs our forward on them and writes the output back (peer comparison, docs/performance.md).
add_executable(cpu_forward_from_files ${CMAKE_CURRENT_LIST_DIR}/peers/cpu_forward_from_files.cpp)
target_link_libraries(cpu_forward_from_files PRIVATE DilatedAttention::dilated_attention)
dilated_attention_cpu_benchmark_flags(cpu_forward_from_files)

# Forward and backward timed in one binary (the backward rows of the main job's table).
add_executable(cpu_backward_benchmark
  ${CMAKE_CURRENT_LIST_DIR}/cpu_backward_benchmark.cpp
  ${CMAKE_CURRENT_LIST_DIR}/cpu_heap_counter.cpp)
target_link_libraries(cpu_backward_benchmark PRIVATE DilatedAttention::dilated_attention benchmark::benchmark)
dilated_attention_cpu_benchmark_flags(cpu_backward_benchmark)

# Our side of the backward peer comparison (benchmarks/peers/compare_backward_pytorch.py).
add_executable(cpu_backward_from_files ${CMAKE_CURRENT_LIST_DIR}/peers/cpu_backward_from_files.cpp)
target_link_libraries(cpu_backward_from_files PRIVATE DilatedAttention::dilated_attention)
dilated_attention_cpu_benchmark_flags(cpu_backward_from_files)
# The measurement behind the choice of per-function target attributes over Google Highway and
# xsimd (docs/design.md, SIMD section). Opt-in: it needs libhwy-dev and libxsimd-dev.
option(DILATED_ATTENTION_BENCH_SIMD_LIBRARIES "Build the Highway / xsimd comparison benchmark" OFF)
if(DILATED_ATTENTION_BENCH_SIMD_LIBRARIES)
  find_library(DILATED_ATTENTION_HWY_LIBRARY hwy REQUIRED)
  add_executable(cpu_simd_libraries_benchmark
    ${CMAKE_CURRENT_LIST_DIR}/simd_libraries/simd_libraries_benchmark.cpp
    ${CMAKE_CURRENT_LIST_DIR}/simd_libraries/highway_kernel.cpp
    ${CMAKE_CURRENT_LIST_DIR}/simd_libraries/xsimd_kernel.cpp)
  target_include_directories(cpu_simd_libraries_benchmark PRIVATE
    ${CMAKE_CURRENT_LIST_DIR}/simd_libraries)
  set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/simd_libraries/xsimd_kernel.cpp
    PROPERTIES COMPILE_OPTIONS -march=native)
  target_link_libraries(cpu_simd_libraries_benchmark PRIVATE DilatedAttention::dilated_attention
                        benchmark::benchmark ${DILATED_ATTENTION_HWY_LIBRARY})
endif()
