# Optional back ends, each opt-in and each in its own file. A back end defines its INTERFACE
# target (DilatedAttention::cuda, ::mpi, ::nccl) only when its toolchain is found, so a plain C++
# consumer never needs CUDA, MPI or NCCL. DilatedAttention::torch needs no toolchain here: the
# consumer brings Torch (backends/torch.cmake).
include(${CMAKE_CURRENT_LIST_DIR}/backends/cuda.cmake)
include(${CMAKE_CURRENT_LIST_DIR}/backends/mpi.cmake)
include(${CMAKE_CURRENT_LIST_DIR}/backends/nccl.cmake)
include(${CMAKE_CURRENT_LIST_DIR}/backends/torch.cmake)
