# PyTorch operators: target dilated_attention_torch / DilatedAttention::torch (headers
# <dilated_attention/torch.hpp> and <dilated_attention/torch_registration.hpp>, docs/torch.md).
# Header-only like the rest, and unlike the other back ends it needs nothing at *this* project's
# configure time: the target links Torch's imported target `torch` by name, which exists once the
# consumer has called find_package(Torch) (Torch's CMake package, e.g. from the PyPI wheel's
# torch.utils.cmake_prefix_path). The package config looks Torch up when a consumer asks for
# COMPONENTS Torch. A consumer that compiles the registration with nvcc also links
# DilatedAttention::cuda (docs/torch.md).
option(DILATED_ATTENTION_ENABLE_TORCH
       "Provide DilatedAttention::torch (PyTorch operators; the consumer brings Torch)" ON)

if(DILATED_ATTENTION_ENABLE_TORCH)
  add_library(dilated_attention_torch INTERFACE)
  add_library(DilatedAttention::torch ALIAS dilated_attention_torch)
  set_target_properties(dilated_attention_torch PROPERTIES EXPORT_NAME torch)
  target_link_libraries(dilated_attention_torch INTERFACE dilated_attention torch)
  # Torch's headers need C++17 at least (Torch 2.15's package itself asks for C++20).
  target_compile_features(dilated_attention_torch INTERFACE cxx_std_17)
  message(STATUS "DilatedAttention: PyTorch operators provided (DilatedAttention::torch; Torch is the consumer's)")
endif()
