# Fails when ptxas serialises the wgmma instructions of a kernel: when it cannot prove a
# pipeline stage free of other instructions touching the accumulators, it waits for every
# wgmma right after issuing it (a `WARPGROUP.DEPBAR` after each HGMMA) and says so only as
# an advisory under -v ("(C7514) Potential Performance Loss: wgmma.mma_async instructions
# are serialized ..."). The kernels stay correct and get slower: a build of the memory read
# with a runtime switch around its product issue ran at 41-43 µs against 35
# (docs/benchmarks.md). Compile-only, so it runs wherever nvcc does (CI included).
#
#   cmake -DNVCC=... -DSOURCE=... -DINCLUDES="a;b;c" -DOUTPUT=... -P wgmma_serialization.cmake
set(_includes "")
foreach(_dir IN LISTS INCLUDES)
  list(APPEND _includes "-I${_dir}")
endforeach()
execute_process(
  COMMAND "${NVCC}" -DLM2_CUDA_SM90A=1 ${_includes} -O2 -DNDEBUG -std=c++17 -diag-suppress=2810
          --generate-code=arch=compute_90a,code=sm_90a -Xptxas -v -x cu -c "${SOURCE}" -o "${OUTPUT}"
  RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "nvcc failed (${_rc}) on ${SOURCE}:\n${_out}${_err}")
endif()
string(REGEX MATCHALL "[^\n]*wgmma[^\n]*serialized[^\n]*" _found "${_out}${_err}")
if(_found)
  string(REPLACE ";" "\n" _found "${_found}")
  message(FATAL_ERROR "ptxas serialises wgmma instructions in ${SOURCE}:\n${_found}")
endif()
string(REGEX MATCHALL "Compiling entry function" _kernels "${_err}${_out}")
list(LENGTH _kernels _n)
message(STATUS "${SOURCE}: ${_n} kernels, no wgmma serialised")
