# Benchmarks of the cpu area: the Google Benchmark suite behind the README's main job
# (benchmarks/run_comparison.sh) and the small program the peer comparison runs our kernel with.

include(CheckCXXCompilerFlag)
# Benchmarks measure what this machine can do, so they build for it (AVX2/FMA where present);
# the SGEMM they compare against lives in the same binary and gets the same flags.
option(DILATED_ATTENTION_BENCH_NATIVE "Build the CPU benchmarks with -march=native" ON)
check_cxx_compiler_flag(-march=native DILATED_ATTENTION_HAS_MARCH_NATIVE)

function(dilated_attention_cpu_benchmark_flags target)
  target_compile_options(${target} PRIVATE
    $<$<CXX_COMPILER_ID:GNU,Clang>:-Wall -Wextra -Wpedantic -Wshadow>)
  if(DILATED_ATTENTION_BENCH_NATIVE AND DILATED_ATTENTION_HAS_MARCH_NATIVE)
    target_compile_options(${target} PRIVATE -march=native)
  endif()
endfunction()

add_executable(cpu_forward_benchmark
  ${CMAKE_CURRENT_LIST_DIR}/cpu_forward_benchmark.cpp
  ${CMAKE_CURRENT_LIST_DIR}/cpu_heap_counter.cpp)
target_link_libraries(cpu_forward_benchmark PRIVATE DilatedAttention::dilated_attention benchmark::benchmark)
dilated_attention_cpu_benchmark_flags(cpu_forward_benchmark)

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
