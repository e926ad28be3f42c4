# cmake -P install_and_check.cmake -DBUILD_DIR=... -DPREFIX=... -DPACKAGE_DIR=<rel> -DINCLUDE_DIR=<rel>
#   -DSOURCE_INCLUDE=<repo>/include [-DCONFIG=...]
# Installs the build tree into a fresh PREFIX and checks that the package files and every public
# header are there: the setup step of the find_package consumer tests.
file(REMOVE_RECURSE "${PREFIX}")
set(config_args "")
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" ${config_args}
                RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "cmake --install failed (${result})")
endif()

set(package_dir "${PREFIX}/${PACKAGE_DIR}")
foreach(file DilatedAttentionConfig.cmake DilatedAttentionConfigVersion.cmake DilatedAttentionTargets.cmake)
  if(NOT EXISTS "${package_dir}/${file}")
    message(FATAL_ERROR "missing after install: ${package_dir}/${file}")
  endif()
endforeach()

file(GLOB_RECURSE headers RELATIVE "${SOURCE_INCLUDE}" "${SOURCE_INCLUDE}/*.hpp" "${SOURCE_INCLUDE}/*.cuh")
foreach(header IN LISTS headers)
  if(NOT EXISTS "${PREFIX}/${INCLUDE_DIR}/${header}")
    message(FATAL_ERROR "header not installed: ${INCLUDE_DIR}/${header}")
  endif()
endforeach()
# The headers cite docs/semantics.md by heading: the page is installed beside them.
file(GLOB_RECURSE semantics "${PREFIX}/share/doc/*/semantics.md")
if(NOT semantics)
  message(FATAL_ERROR "docs/semantics.md not installed under ${PREFIX}/share/doc/")
endif()
list(LENGTH headers count)
message(STATUS "installed package and ${count} headers into ${PREFIX}")
