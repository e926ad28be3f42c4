# cmake -P run_consumer.cmake: configure, build and run one consumer project from scratch.
#   -DSOURCE_DIR=... -DBINARY_DIR=... -DGENERATOR=... -DOPTIONS=<;-list of -D...> [-DRUN=OFF]
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

file(REMOVE_RECURSE "${BINARY_DIR}")
step(configure "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${BINARY_DIR}" -G "${GENERATOR}" ${OPTIONS})
step(build "${CMAKE_COMMAND}" --build "${BINARY_DIR}")
if(NOT DEFINED RUN OR RUN)
  step(run "${BINARY_DIR}/consumer")
endif()
