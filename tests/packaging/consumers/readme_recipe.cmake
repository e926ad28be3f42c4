# cmake -P readme_recipe.cmake -DREADME=<README.md> -DPREFIX=<install prefix> -DBINARY_DIR=...
#   -DGENERATOR=... [-DOPTIONS=<|-separated -D... options: compiler, Eigen3_DIR, make program>]
# README's "Using it from CMake" recipe, as a user follows it: the example (README's first ```cpp
# block) as main.cpp and the consumer CMakeLists.txt (the ```cmake block that defines my_app),
# configured with -DCMAKE_PREFIX_PATH=<prefix> -DCMAKE_BUILD_TYPE=Release, built and run. Then the
# package's build-type note: absent in Release, printed exactly once per configure without a build
# type (even when find_package is called twice), absent with DILATED_ATTENTION_NO_BUILD_TYPE_NOTE.
cmake_minimum_required(VERSION 3.21)
foreach(var README PREFIX BINARY_DIR GENERATOR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "readme_recipe.cmake needs -D${var}=...")
  endif()
endforeach()
string(REPLACE "|" ";" OPTIONS "${OPTIONS}")

# The fenced block of `language` whose text contains `needle` (the first one if needle is empty).
function(readme_block out language needle)
  file(READ "${README}" text)
  set(fence "```${language}\n")
  string(LENGTH "${fence}" fence_length)
  while(TRUE)
    string(FIND "${text}" "${fence}" begin)
    if(begin EQUAL -1)
      message(FATAL_ERROR "${README}: no ```${language} block containing '${needle}'")
    endif()
    math(EXPR begin "${begin} + ${fence_length}")
    string(SUBSTRING "${text}" ${begin} -1 text)
    string(FIND "${text}" "```" end)
    string(SUBSTRING "${text}" 0 ${end} block)
    string(SUBSTRING "${text}" ${end} -1 text)
    if(needle STREQUAL "")
      break()
    endif()
    string(FIND "${block}" "${needle}" found)
    if(NOT found EQUAL -1)
      break()
    endif()
  endwhile()
  set(${out} "${block}" PARENT_SCOPE)
endfunction()

# Runs a command; fails with its output on a non-zero exit; returns its output in `out`.
function(step what out)
  message(STATUS "readme: ${what}: ${ARGN}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
  message("${output}")
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "readme: ${what} failed (${result})")
  endif()
  set(${out} "${output}" PARENT_SCOPE)
endfunction()

set(note "DilatedAttention: no CMAKE_BUILD_TYPE compiles its kernels unoptimised")
function(count_notes out text)
  string(REGEX MATCHALL "DilatedAttention: [^\n]*unoptimised" notes "${text}")
  list(LENGTH notes count)
  set(${out} ${count} PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${BINARY_DIR}")
set(app "${BINARY_DIR}/my_app")
readme_block(example cpp "")
readme_block(lists cmake "add_executable(my_app")
file(WRITE "${app}/main.cpp" "${example}")
file(WRITE "${app}/CMakeLists.txt" "${lists}")

# As the README says: Release, the prefix on CMAKE_PREFIX_PATH.
step("configure (Release)" output "${CMAKE_COMMAND}" -S "${app}" -B "${app}/build" -G "${GENERATOR}"
     "-DCMAKE_PREFIX_PATH=${PREFIX}" -DCMAKE_BUILD_TYPE=Release ${OPTIONS})
count_notes(notes "${output}")
if(NOT notes EQUAL 0)
  message(FATAL_ERROR "readme: a Release consumer got the build-type note")
endif()
step(build output "${CMAKE_COMMAND}" --build "${app}/build")
step(run output "${app}/build/my_app")
if(NOT output MATCHES "out\\[0\\] = -?[0-9]+\\.[0-9]+, lse\\[0\\] = -?[0-9]+\\.[0-9]+")
  message(FATAL_ERROR "readme: my_app printed '${output}', not the example's out[0] and lse[0]")
endif()

# No build type: the note, once, even with a second find_package.
file(WRITE "${BINARY_DIR}/twice/CMakeLists.txt"
     "${lists}\nfind_package(DilatedAttention 0.1 CONFIG REQUIRED)\n")
file(COPY "${app}/main.cpp" DESTINATION "${BINARY_DIR}/twice")
step("configure (no build type)" output "${CMAKE_COMMAND}" -S "${BINARY_DIR}/twice"
     -B "${BINARY_DIR}/twice/build" -G "${GENERATOR}" "-DCMAKE_PREFIX_PATH=${PREFIX}" ${OPTIONS})
count_notes(notes "${output}")
string(FIND "${output}" "${note}" found)
if(NOT notes EQUAL 1 OR found EQUAL -1)
  message(FATAL_ERROR "readme: expected the note '${note}' once without a build type, got ${notes}")
endif()
step("configure (no build type, note off)" output "${CMAKE_COMMAND}" -S "${BINARY_DIR}/twice"
     -B "${BINARY_DIR}/twice/quiet" -G "${GENERATOR}" "-DCMAKE_PREFIX_PATH=${PREFIX}"
     -DDILATED_ATTENTION_NO_BUILD_TYPE_NOTE=ON ${OPTIONS})
count_notes(notes "${output}")
if(NOT notes EQUAL 0)
  message(FATAL_ERROR "readme: DILATED_ATTENTION_NO_BUILD_TYPE_NOTE=ON did not silence the note")
endif()
message(STATUS "readme: the recipe builds and runs; the build-type note shows once, and only when due")
