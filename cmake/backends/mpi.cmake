# MPI back end: target dilated_attention_mpi / DilatedAttention::mpi (header ring/mpi.hpp) when
# MPI's C++ bindings are found. Header-only like the rest: the target only adds MPI to the
# consumer's link. A consumer that does not link it never needs MPI.
option(DILATED_ATTENTION_ENABLE_MPI "Provide the MPI ring transport (DilatedAttention::mpi) when MPI is found" ON)

if(DILATED_ATTENTION_ENABLE_MPI)
  find_package(MPI COMPONENTS CXX QUIET)
  if(MPI_CXX_FOUND)
    add_library(dilated_attention_mpi INTERFACE)
    add_library(DilatedAttention::mpi ALIAS dilated_attention_mpi)
    set_target_properties(dilated_attention_mpi PROPERTIES EXPORT_NAME mpi)
    target_link_libraries(dilated_attention_mpi INTERFACE dilated_attention MPI::MPI_CXX)
    message(STATUS "DilatedAttention: MPI ring transport enabled (MPI ${MPI_CXX_VERSION})")
  else()
    message(STATUS "DilatedAttention: MPI not found, DilatedAttention::mpi not provided")
  endif()
endif()
