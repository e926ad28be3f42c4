# Benchmarks of the ring area: an MPI program (bytes per rank and time for P ranks against the
# single-process forward), driven by benchmarks/ring_benchmark.sh for P = 1, 2, 4.
if(TARGET dilated_attention_mpi)
  add_executable(ring_benchmark ${CMAKE_CURRENT_LIST_DIR}/ring_benchmark.cpp)
  target_link_libraries(ring_benchmark PRIVATE DilatedAttention::mpi)
  target_compile_options(ring_benchmark PRIVATE
    $<$<CXX_COMPILER_ID:GNU,Clang>:-Wall -Wextra -Wpedantic -Wshadow>)
  if(COMMAND dilated_attention_cpu_benchmark_flags)
    dilated_attention_cpu_benchmark_flags(ring_benchmark)  # the CPU area's -march=native choice
  endif()
endif()

# The at-scale model (no MPI, no transfer): bytes and messages per rank from the schedule for
# N = 2^20 and P = 64..1024, with a latency-bandwidth time model (docs/ring.md, "At scale").
add_executable(ring_at_scale ${CMAKE_CURRENT_LIST_DIR}/ring_at_scale.cpp)
target_link_libraries(ring_at_scale PRIVATE DilatedAttention::dilated_attention)
target_compile_options(ring_at_scale PRIVATE $<$<CXX_COMPILER_ID:GNU,Clang>:-Wall -Wextra -Wpedantic -Wshadow>)
