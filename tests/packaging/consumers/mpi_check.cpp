// Compiled by the find_package consumer when it asks for COMPONENTS MPI: the MPI transport header
// and DilatedAttention::mpi's link interface must be enough to build against. Not run (that needs
// an MPI launcher); MPI_Initialized is callable before MPI_Init and proves the link.
#include <dilated_attention/ring.hpp>
#include <dilated_attention/ring/mpi.hpp>

#include <cstdio>

int main() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  std::printf("MPI linked, initialized = %d\n", initialized);
  return 0;
}
