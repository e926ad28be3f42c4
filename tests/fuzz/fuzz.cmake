# Fuzzing validate() and the CPU forward/backward (tests/fuzz/fuzz_cpu.cpp).
#
# Always: fuzz_driver, a seeded random driver built with the normal compiler (g++ in CI). CTest
# test `fuzz_cpu` (label `fuzz`) replays tests/fuzz/corpus/ and then runs random inputs from seed
# 1 for at most 40 s / 4000 inputs. By hand:
#   build/<dir>/tests/fuzz_driver --seed=7 --runs=100000 --seconds=600 tests/fuzz/corpus
#   FUZZ_CPU_STATS=1 ...   prints what non-finite inputs did (docs/semantics.md, "Non-finite inputs")
# A failing input is left in ./fuzz-crash.bin; replay it with `fuzz_driver --runs=0 fuzz-crash.bin`.
#
# With clang and libFuzzer (Debian: clang-14 and libclang-rt-14-dev), also fuzz_cpu_libfuzzer
# (-fsanitize=fuzzer,address,undefined). Configure a separate build with clang and run it:
#   cmake -S . -B build/fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
#         -DDILATED_ATTENTION_ENABLE_CUDA=OFF -DDILATED_ATTENTION_BUILD_BENCHMARKS=OFF
#   ninja -C build/fuzz fuzz_cpu_libfuzzer
#   mkdir -p /tmp/fuzz-corpus && build/fuzz/tests/fuzz_cpu_libfuzzer -max_len=96 -max_total_time=300 \
#         /tmp/fuzz-corpus tests/fuzz/corpus
# (new inputs go to /tmp/fuzz-corpus; copy a few small interesting ones into tests/fuzz/corpus/).
# Nothing is installed from here: without libFuzzer support the target is skipped with a message.

add_executable(fuzz_driver ${CMAKE_CURRENT_LIST_DIR}/fuzz_driver.cpp
                           ${CMAKE_CURRENT_LIST_DIR}/fuzz_cpu.cpp)
target_link_libraries(fuzz_driver PRIVATE DilatedAttention::dilated_attention)
target_include_directories(fuzz_driver PRIVATE ${PROJECT_SOURCE_DIR}/tests)
target_compile_options(fuzz_driver PRIVATE
  $<$<CXX_COMPILER_ID:GNU,Clang>:-Wall -Wextra -Wpedantic -Wshadow -Werror=return-type>)
add_test(NAME fuzz_cpu
         COMMAND fuzz_driver --seed=1 --runs=4000 --seconds=40 ${CMAKE_CURRENT_LIST_DIR}/corpus)
set_tests_properties(fuzz_cpu PROPERTIES LABELS fuzz TIMEOUT 120
                     ENVIRONMENT "FUZZ_CPU_STATS=1")

if(CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
  include(CheckCXXSourceCompiles)
  set(CMAKE_REQUIRED_FLAGS "-fsanitize=fuzzer")
  check_cxx_source_compiles(
    "#include <cstdint>\n#include <cstddef>\nextern \"C\" int LLVMFuzzerTestOneInput(const std::uint8_t*, std::size_t) { return 0; }"
    DILATED_ATTENTION_HAVE_LIBFUZZER)
  unset(CMAKE_REQUIRED_FLAGS)
  if(DILATED_ATTENTION_HAVE_LIBFUZZER)
    add_executable(fuzz_cpu_libfuzzer ${CMAKE_CURRENT_LIST_DIR}/fuzz_cpu.cpp)
    target_link_libraries(fuzz_cpu_libfuzzer PRIVATE DilatedAttention::dilated_attention)
    target_include_directories(fuzz_cpu_libfuzzer PRIVATE ${PROJECT_SOURCE_DIR}/tests)
    target_compile_options(fuzz_cpu_libfuzzer PRIVATE -fsanitize=fuzzer,address,undefined -g)
    target_link_options(fuzz_cpu_libfuzzer PRIVATE -fsanitize=fuzzer,address,undefined)
  else()
    message(STATUS "DilatedAttention: clang++ cannot link -fsanitize=fuzzer (Debian: install "
                   "libclang-rt-14-dev); fuzz_cpu_libfuzzer skipped, fuzz_driver still built")
  endif()
endif()
