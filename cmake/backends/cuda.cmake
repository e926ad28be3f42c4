# CUDA back end: INTERFACE target dilated_attention_cuda / DilatedAttention::cuda, defined only when
# a CUDA compiler is found and DILATED_ATTENTION_ENABLE_CUDA is on. Nothing else in the project
# depends on it, so a plain C++ consumer never needs nvcc.
#
# include()d from the root CMakeLists.txt: check_language/enable_language must run at directory
# scope of the top-level project, which an include() preserves.

include(CheckLanguage)
# nvcc is often installed off PATH (/usr/local/cuda/bin): point check_language at it through
# CUDACXX, which its test project inherits, unless the user already chose a compiler.
if(NOT DEFINED CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
  find_program(DILATED_ATTENTION_NVCC nvcc
               PATHS ENV CUDA_PATH ENV CUDA_HOME /usr/local/cuda /opt/cuda PATH_SUFFIXES bin
               DOC "nvcc used to look for CUDA support")
  if(DILATED_ATTENTION_NVCC)
    set(ENV{CUDACXX} "${DILATED_ATTENTION_NVCC}")
  endif()
endif()
check_language(CUDA)

if(CMAKE_CUDA_COMPILER)
  set(_dilated_attention_cuda_found ON)
else()
  set(_dilated_attention_cuda_found OFF)
endif()
option(DILATED_ATTENTION_ENABLE_CUDA "Build the CUDA back end (cuda.cuh), its tests and benchmarks"
       ${_dilated_attention_cuda_found})

if(DILATED_ATTENTION_ENABLE_CUDA AND NOT CMAKE_CUDA_COMPILER)
  message(WARNING "DILATED_ATTENTION_ENABLE_CUDA is ON but no CUDA compiler was found "
                  "(set CMAKE_CUDA_COMPILER or put nvcc on PATH); the CUDA back end is skipped")
endif()

if(DILATED_ATTENTION_ENABLE_CUDA AND CMAKE_CUDA_COMPILER)
  # Ampere (sm_80: mma.sync, cp.async, ldmatrix) and Hopper (sm_90) unless the user chose.
  # Must be set before enable_language, which otherwise picks the compiler's default.
  if((NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
     AND NOT DEFINED ENV{CUDAARCHS})
    set(CMAKE_CUDA_ARCHITECTURES 80 90)
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)

  add_library(dilated_attention_cuda INTERFACE)
  add_library(DilatedAttention::cuda ALIAS dilated_attention_cuda)
  set_target_properties(dilated_attention_cuda PROPERTIES EXPORT_NAME cuda)
  target_link_libraries(dilated_attention_cuda INTERFACE dilated_attention CUDA::cudart)
  target_compile_features(dilated_attention_cuda INTERFACE cuda_std_17)
  message(STATUS "DilatedAttention: CUDA back end enabled "
                 "(nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES})")
endif()
