# The CUDA backend (issue 8): fused forward/backward and unfused kernels.
# Fused kernels are instantiated per (pass, element type) from fused.cu.in, so
# a build parallelises over ten translation units (SIMT forward and
# backward for three types, the tensor-core forward and backward for two);
# head-dim buckets are the only other template parameter (ranks share one
# padded rank-3 kernel, see common.cuh).
# Included from the top-level CMakeLists.txt (custom commands and the CUDA
# language must live in the directory that defines libna_core).
find_package(CUDAToolkit REQUIRED)

set(LIBNA_CUDA_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/backend.cu
  ${CMAKE_CURRENT_LIST_DIR}/unfused.cu
)
# The tensor-core passes (tc_forward.cuh, tc_backward.cuh) have float16 and
# bfloat16 units only.
foreach(LIBNA_CUDA_PASS fused_forward fused_backward tc_forward tc_backward)
  set(LIBNA_CUDA_HEADER fused.cuh)
  set(LIBNA_CUDA_RESULT void)
  set(LIBNA_CUDA_TYPE_NAMES f32 f16 bf16)
  if(LIBNA_CUDA_PASS MATCHES "^tc_")
    set(LIBNA_CUDA_HEADER ${LIBNA_CUDA_PASS}.cuh)
    set(LIBNA_CUDA_RESULT bool)
    set(LIBNA_CUDA_TYPE_NAMES f16 bf16)
  endif()
  foreach(LIBNA_CUDA_TYPE_NAME ${LIBNA_CUDA_TYPE_NAMES})
    if(LIBNA_CUDA_TYPE_NAME STREQUAL "f32")
      set(LIBNA_CUDA_TYPE float)
    elseif(LIBNA_CUDA_TYPE_NAME STREQUAL "f16")
      set(LIBNA_CUDA_TYPE __half)
    else()
      set(LIBNA_CUDA_TYPE __nv_bfloat16)
    endif()
    set(LIBNA_CUDA_FILE ${LIBNA_GENERATED_DIR}/cuda_${LIBNA_CUDA_PASS}_${LIBNA_CUDA_TYPE_NAME}.cu)
    configure_file(${CMAKE_CURRENT_LIST_DIR}/fused.cu.in ${LIBNA_CUDA_FILE} @ONLY)
    list(APPEND LIBNA_CUDA_SOURCES ${LIBNA_CUDA_FILE})
  endforeach()
endforeach()

target_sources(libna_core PRIVATE ${LIBNA_CUDA_SOURCES})
set_source_files_properties(${LIBNA_CUDA_SOURCES} PROPERTIES LANGUAGE CUDA)
target_include_directories(libna_core PRIVATE ${CMAKE_CURRENT_LIST_DIR})
# The CUDA runtime is linked statically (the wheel then needs only the driver's
# libcuda.so.1); the CUDA units hide their symbols as the C++ ones do, so that
# only the LIBNA_API functions are exported.
set_target_properties(libna_core PROPERTIES
  CUDA_ARCHITECTURES "${LIBNA_CUDA_ARCHS}"
  CUDA_RUNTIME_LIBRARY Static
  CUDA_VISIBILITY_PRESET hidden
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
)
# build_info()["cuda_architectures"] lists the architectures with machine code
# (SASS): "80-real;90" (SASS for sm_80 and sm_90, and sm_90's PTX, which the
# driver compiles for newer GPUs) reports sm_80 and sm_90; a "-virtual" entry,
# PTX only, is not listed.
set(LIBNA_CUDA_SASS_ARCHS ${LIBNA_CUDA_ARCHS})
list(FILTER LIBNA_CUDA_SASS_ARCHS EXCLUDE REGEX "-virtual$")
list(TRANSFORM LIBNA_CUDA_SASS_ARCHS REPLACE "-real$" "")
string(REPLACE ";" "," LIBNA_CUDA_ARCHS_CSV "${LIBNA_CUDA_SASS_ARCHS}")
target_compile_definitions(libna_core PRIVATE
  LIBNA_CUDA_ARCHITECTURES="${LIBNA_CUDA_ARCHS_CSV}")
# Warnings are errors in the CUDA sources (device and host side).
target_compile_options(libna_core PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings -Xcompiler=-Wall,-Wextra,-Werror>)
target_link_libraries(libna_core PRIVATE CUDA::cudart_static)

# Resource usage (registers, spills, shared memory) of every kernel, as ptxas
# reports it while compiling, collected into one file next to the library.
set(LIBNA_CUDA_USAGE_DIR ${CMAKE_BINARY_DIR}/cuda_resource_usage)
set(LIBNA_CUDA_USAGE_FILE ${CMAKE_BINARY_DIR}/libna_cuda_resource_usage.txt)
set_target_properties(libna_core PROPERTIES CUDA_COMPILER_LAUNCHER
  "${CMAKE_COMMAND};-DLOG_DIR=${LIBNA_CUDA_USAGE_DIR};-P;${CMAKE_CURRENT_LIST_DIR}/record_resource_usage.cmake;--")
target_compile_options(libna_core PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--resource-usage>)
add_custom_command(TARGET libna_core POST_BUILD
  COMMAND ${CMAKE_COMMAND} -DLOG_DIR=${LIBNA_CUDA_USAGE_DIR} -DMERGE=${LIBNA_CUDA_USAGE_FILE}
          -P ${CMAKE_CURRENT_LIST_DIR}/record_resource_usage.cmake
  VERBATIM)
install(FILES ${LIBNA_CUDA_USAGE_FILE} DESTINATION ${LIBNA_INSTALL_LIBDIR})
