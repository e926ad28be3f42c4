# NCCL back end: target dilated_attention_nccl / DilatedAttention::nccl (header ring/nccl.cuh)
# when the CUDA back end exists (cmake/backends/cuda.cmake, included first) and NCCL's header and
# library are found among CUDAToolkit's directories (or under NCCL_ROOT / $NCCL_HOME).
option(DILATED_ATTENTION_ENABLE_NCCL "Provide the NCCL ring transport (DilatedAttention::nccl) when CUDA and NCCL are found" ON)

if(DILATED_ATTENTION_ENABLE_NCCL AND TARGET dilated_attention_cuda)
  find_path(DILATED_ATTENTION_NCCL_INCLUDE_DIR nccl.h
            HINTS ${NCCL_ROOT} $ENV{NCCL_HOME} ${CUDAToolkit_INCLUDE_DIRS}
            PATH_SUFFIXES include)
  find_library(DILATED_ATTENTION_NCCL_LIBRARY nccl
               HINTS ${NCCL_ROOT} $ENV{NCCL_HOME} ${CUDAToolkit_LIBRARY_DIR}
               PATH_SUFFIXES lib lib64)
  mark_as_advanced(DILATED_ATTENTION_NCCL_INCLUDE_DIR DILATED_ATTENTION_NCCL_LIBRARY)
  if(DILATED_ATTENTION_NCCL_INCLUDE_DIR AND DILATED_ATTENTION_NCCL_LIBRARY)
    add_library(dilated_attention_nccl INTERFACE)
    add_library(DilatedAttention::nccl ALIAS dilated_attention_nccl)
    set_target_properties(dilated_attention_nccl PROPERTIES EXPORT_NAME nccl)
    # The transport needs the CUDA runtime and NCCL, not the CUDA kernels: linking
    # dilated_attention_cuda would tie this export set to the CUDA one.
    target_link_libraries(dilated_attention_nccl INTERFACE dilated_attention CUDA::cudart)
    get_filename_component(_dilated_attention_nccl_dir "${DILATED_ATTENTION_NCCL_LIBRARY}" DIRECTORY)
    get_filename_component(_dilated_attention_nccl_dir "${_dilated_attention_nccl_dir}" REALPATH)
    get_filename_component(_dilated_attention_toolkit_dir "${CUDAToolkit_LIBRARY_DIR}" REALPATH)
    if(_dilated_attention_nccl_dir STREQUAL _dilated_attention_toolkit_dir)
      # Inside the toolkit: link by name through CUDA::toolkit's include and link directories,
      # which a consumer's own find_package(CUDAToolkit) recreates (relocatable export).
      target_link_libraries(dilated_attention_nccl INTERFACE CUDA::toolkit nccl)
    else()
      # Elsewhere: the found paths (not relocatable; the consumer's NCCL must live there too).
      target_include_directories(dilated_attention_nccl INTERFACE "${DILATED_ATTENTION_NCCL_INCLUDE_DIR}")
      target_link_libraries(dilated_attention_nccl INTERFACE "${DILATED_ATTENTION_NCCL_LIBRARY}")
    endif()
    unset(_dilated_attention_nccl_dir)
    unset(_dilated_attention_toolkit_dir)
    message(STATUS "DilatedAttention: NCCL ring transport enabled (${DILATED_ATTENTION_NCCL_LIBRARY})")
  else()
    message(STATUS "DilatedAttention: NCCL not found, DilatedAttention::nccl not provided")
  endif()
endif()
