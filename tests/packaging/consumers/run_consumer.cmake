# cmake -P run_consumer.cmake: configure, build and run one consumer project from scratch.
#   -DSOURCE_DIR=... -DBINARY_DIR=... -DGENERATOR=... -DOPTIONS=<|-separated -D... options>
#   -DRUN=<|-separated executables of the project to run, in order; empty: build only>
# Every step's output is shown; the first failing step fails the test.
foreach(var SOURCE_DIR BINARY_DIR GENERATOR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_consumer.cmake needs -D${var}=...")
  endif()
endforeach()

function(step what)
  message(STATUS "consumer: ${what}: ${ARGN}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "consumer: ${what} failed (${result})")
  endif()
endfunction()

string(REPLACE "|" ";" OPTIONS "${OPTIONS}")
string(REPLACE "|" ";" RUN "${RUN}")

file(REMOVE_RECURSE "${BINARY_DIR}")
step(configure "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${BINARY_DIR}" -G "${GENERATOR}" ${OPTIONS})
step(build "${CMAKE_COMMAND}" --build "${BINARY_DIR}")
foreach(program IN LISTS RUN)
  step("run ${program}" "${BINARY_DIR}/${program}")
endforeach()
