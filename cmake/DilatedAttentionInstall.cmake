# The package side of the build: install rules, the package config and version files, and the
# same config in the build tree.
#
# One export set per target: the core (DilatedAttentionTargets) is always loaded, each optional back
# end (DilatedAttention{Cuda,Mpi,Nccl}Targets) only when a consumer asks for its component. A
# consumer that wants the CPU library never needs CUDA, MPI or NCCL on its machine, even when the
# installed package was built with all three.
#
# Consumers:
#   find_package(DilatedAttention 0.1 CONFIG REQUIRED)                    -> DilatedAttention::dilated_attention
#   find_package(DilatedAttention 0.1 CONFIG REQUIRED COMPONENTS CUDA)    -> also DilatedAttention::cuda
#   find_package(DilatedAttention CONFIG OPTIONAL_COMPONENTS MPI NCCL)    -> DilatedAttention_MPI_FOUND, ...
#   find_package(Torch) + find_package(DilatedAttention CONFIG REQUIRED COMPONENTS Torch)
#                                                                         -> DilatedAttention::torch

include(CMakePackageConfigHelpers)

set(DILATED_ATTENTION_CMAKE_DIR "${CMAKE_INSTALL_DATADIR}/cmake/DilatedAttention"
    CACHE STRING "Where the package config files are installed, relative to the prefix")
mark_as_advanced(DILATED_ATTENTION_CMAKE_DIR)


# component name in find_package -> target, export set
set(_dilated_attention_components CUDA MPI NCCL Torch)
set(_dilated_attention_CUDA_target dilated_attention_cuda)
set(_dilated_attention_CUDA_export DilatedAttentionCudaTargets)
set(_dilated_attention_MPI_target dilated_attention_mpi)
set(_dilated_attention_MPI_export DilatedAttentionMpiTargets)
set(_dilated_attention_NCCL_target dilated_attention_nccl)
set(_dilated_attention_NCCL_export DilatedAttentionNcclTargets)
set(_dilated_attention_Torch_target dilated_attention_torch)
set(_dilated_attention_Torch_export DilatedAttentionTorchTargets)

# The build tree behaves like an install prefix too: DilatedAttention_DIR=<build dir> works.
set(_dilated_attention_build_dir "${PROJECT_BINARY_DIR}")

if(DILATED_ATTENTION_INSTALL)
  install(TARGETS dilated_attention EXPORT DilatedAttentionTargets)
  install(DIRECTORY include/ DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}"
          FILES_MATCHING PATTERN "*.hpp" PATTERN "*.cuh" PATTERN "*.h")
  install(EXPORT DilatedAttentionTargets NAMESPACE DilatedAttention::
          DESTINATION "${DILATED_ATTENTION_CMAKE_DIR}")
  export(EXPORT DilatedAttentionTargets NAMESPACE DilatedAttention::
         FILE "${_dilated_attention_build_dir}/DilatedAttentionTargets.cmake")

  set(DILATED_ATTENTION_BUILT_COMPONENTS "")
  foreach(_component IN LISTS _dilated_attention_components)
    set(_target "${_dilated_attention_${_component}_target}")
    set(_export "${_dilated_attention_${_component}_export}")
    if(TARGET ${_target})
      list(APPEND DILATED_ATTENTION_BUILT_COMPONENTS ${_component})
      install(TARGETS ${_target} EXPORT ${_export})
      install(EXPORT ${_export} NAMESPACE DilatedAttention::
              DESTINATION "${DILATED_ATTENTION_CMAKE_DIR}")
      export(EXPORT ${_export} NAMESPACE DilatedAttention::
             FILE "${_dilated_attention_build_dir}/${_export}.cmake")
    endif()
  endforeach()

  # The installed config.
  configure_package_config_file(
    "${CMAKE_CURRENT_LIST_DIR}/DilatedAttentionConfig.cmake.in"
    "${PROJECT_BINARY_DIR}/package/DilatedAttentionConfig.cmake"
    INSTALL_DESTINATION "${DILATED_ATTENTION_CMAKE_DIR}")
  # The build-tree config: the same file, with the build directory as its "prefix".
  configure_package_config_file(
    "${CMAKE_CURRENT_LIST_DIR}/DilatedAttentionConfig.cmake.in"
    "${_dilated_attention_build_dir}/DilatedAttentionConfig.cmake"
    INSTALL_DESTINATION "${_dilated_attention_build_dir}"
    INSTALL_PREFIX "${_dilated_attention_build_dir}")
  # Headers only: the package fits any architecture, so a 32-bit consumer may use it too.
  write_basic_package_version_file(
    "${_dilated_attention_build_dir}/DilatedAttentionConfigVersion.cmake"
    VERSION ${PROJECT_VERSION}
    COMPATIBILITY SameMajorVersion
    ARCH_INDEPENDENT)

  install(FILES "${PROJECT_BINARY_DIR}/package/DilatedAttentionConfig.cmake"
                "${_dilated_attention_build_dir}/DilatedAttentionConfigVersion.cmake"
          DESTINATION "${DILATED_ATTENTION_CMAKE_DIR}")
  install(FILES "${PROJECT_SOURCE_DIR}/LICENSE" "${PROJECT_SOURCE_DIR}/README.md"
                "${PROJECT_SOURCE_DIR}/CHANGELOG.md"
          DESTINATION "${CMAKE_INSTALL_DOCDIR}" OPTIONAL)
  # The normative definition the headers' comments cite by heading ("Bad input", ...): an
  # installed copy must be able to follow them.
  install(FILES "${PROJECT_SOURCE_DIR}/docs/semantics.md" DESTINATION "${CMAKE_INSTALL_DOCDIR}")
endif()
