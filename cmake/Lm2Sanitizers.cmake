# Build type "Asan": AddressSanitizer + UndefinedBehaviorSanitizer, every UB report fatal.
#   cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Asan
set(_lm2_san_flags "-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all")
set(CMAKE_C_FLAGS_ASAN "${_lm2_san_flags}" CACHE STRING "C flags for the Asan build type" FORCE)
set(CMAKE_CXX_FLAGS_ASAN "${_lm2_san_flags}" CACHE STRING "C++ flags for the Asan build type" FORCE)
set(CMAKE_EXE_LINKER_FLAGS_ASAN "-fsanitize=address,undefined" CACHE STRING "" FORCE)
set(CMAKE_SHARED_LINKER_FLAGS_ASAN "-fsanitize=address,undefined" CACHE STRING "" FORCE)
mark_as_advanced(CMAKE_C_FLAGS_ASAN CMAKE_CXX_FLAGS_ASAN CMAKE_EXE_LINKER_FLAGS_ASAN
                 CMAKE_SHARED_LINKER_FLAGS_ASAN)
