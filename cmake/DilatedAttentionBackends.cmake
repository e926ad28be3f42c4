# Optional back ends. Each defines its INTERFACE target only when its toolchain is found, so a
# plain C++ consumer never needs CUDA, MPI or NCCL. (Filled in by the CUDA and ring work.)
