# Benchmarks of the cuda area, built whenever the CUDA target exists (they report "no CUDA
# device: ..." and time nothing on machines without one).
if(TARGET dilated_attention_cuda)
  add_executable(cuda_forward_benchmark ${CMAKE_CURRENT_LIST_DIR}/cuda_forward_benchmark.cu)
  target_link_libraries(cuda_forward_benchmark PRIVATE DilatedAttention::cuda benchmark::benchmark)
  target_compile_options(cuda_forward_benchmark PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-Wshadow --Werror=all-warnings>)

  add_executable(cuda_backward_benchmark ${CMAKE_CURRENT_LIST_DIR}/cuda_backward_benchmark.cu)
  target_link_libraries(cuda_backward_benchmark PRIVATE DilatedAttention::cuda benchmark::benchmark)
  target_compile_options(cuda_backward_benchmark PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-Wshadow --Werror=all-warnings>)

  # Our side of benchmarks/peers/cuda_sdpa_and_peer.py: raw float32 files in, output file and
  # CUDA-event timings out.
  add_executable(cuda_forward_from_files ${CMAKE_CURRENT_LIST_DIR}/cuda_forward_from_files.cu)
  target_link_libraries(cuda_forward_from_files PRIVATE DilatedAttention::cuda)
  target_compile_options(cuda_forward_from_files PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-Wshadow --Werror=all-warnings>)
endif()
