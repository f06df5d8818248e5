# Fails when ptxas serialises the wgmma instructions of a kernel: when it cannot prove a
# pipeline stage free of other instructions touching the accumulators, it waits for every
# wgmma right after issuing it (a `WARPGROUP.DEPBAR` after each HGMMA) and says so only as
# an advisory under -v ("(C7514) Potential Performance Loss: wgmma.mma_async instructions
# are serialized ..."). The kernels stay correct and get slower: a build of the memory read
# with a runtime switch around its product issue ran at 41-43 µs against 35
# (docs/benchmarks.md). Compile-only, so it runs wherever nvcc does (CI included).
#
# The compile is the object library's own (tests/cuda/CMakeLists.txt passes its include
# directories, definitions, architectures and C++ standard from the target's properties and
# the build type's CUDA flags), with -Xptxas -v added:
#
#   cmake -DNVCC=... -DSOURCES="a.cu;b.cu" -DSOURCE_DIR=... -DINCLUDES="a;b" -DDEFINES="X=1;Y"
#         -DARCHS=90a -DSTD=17 -DFLAGS="-O2 -g -DNDEBUG" -DOUTPUT=... -P wgmma_serialization.cmake
#
# (SOURCES relative to SOURCE_DIR, as the target's SOURCES property holds them.)
set(_args "")
foreach(_dir IN LISTS INCLUDES)
  list(APPEND _args "-I${_dir}")
endforeach()
foreach(_def IN LISTS DEFINES)
  list(APPEND _args "-D${_def}")
endforeach()
foreach(_arch IN LISTS ARCHS)
  string(REGEX REPLACE "-(real|virtual)$" "" _arch "${_arch}")
  list(APPEND _args "--generate-code=arch=compute_${_arch},code=sm_${_arch}")
endforeach()
if(STD)
  list(APPEND _args "-std=c++${STD}")
endif()
separate_arguments(_flags UNIX_COMMAND "${FLAGS}")
# (-diag-suppress=2810: the target's own, for a front-end remark on core/status.h)
foreach(_source IN LISTS SOURCES)
  if(NOT IS_ABSOLUTE "${_source}")
    set(_source "${SOURCE_DIR}/${_source}")
  endif()
  execute_process(
    COMMAND "${NVCC}" ${_args} ${_flags} -diag-suppress=2810 -Xptxas -v -x cu -c "${_source}" -o "${OUTPUT}"
    RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "nvcc failed (${_rc}) on ${_source}:\n${_out}${_err}")
  endif()
  string(REGEX MATCHALL "[^\n]*wgmma[^\n]*serialized[^\n]*" _found "${_out}${_err}")
  if(_found)
    string(REPLACE ";" "\n" _found "${_found}")
    message(FATAL_ERROR "ptxas serialises wgmma instructions in ${_source}:\n${_found}")
  endif()
  string(REGEX MATCHALL "Compiling entry function" _kernels "${_err}${_out}")
  list(LENGTH _kernels _n)
  message(STATUS "${_source} (${ARCHS}): ${_n} kernels, no wgmma serialised")
endforeach()
if(NOT SOURCES)
  message(FATAL_ERROR "no sources to check")
endif()
