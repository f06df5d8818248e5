#!/usr/bin/env bash
# Packs what the GPU machine needs to run lm2's GPU tests and benchmarks, built HERE (it has
# CUDA but none of lm2's Debian libraries): the GPU test executables, the SDK tests (their
# GPU case), the CLI and the CUDA benchmarks (lm2_cuda_bench, lm2_cuda_sync_bench,
# lm2_cuda_gemm_bench, lm2_cuda_persistent_bench) with the batcher's (lm2_batcher_bench: the GPU machine has more
# cores than CI's), stripped, the kernel tracer (liblm2_kernel_trace.so, with its CUPTI),
# plus the shared libraries they load that the GPU machine lacks (RocksDB, OpenSSL,
# sentencepiece, OpenBLAS and their dependencies; not glibc, libstdc++ or CUDA's own, which
# it has). One compressed archive, under the device tool's size limit.
#
#   tools/device/make_gpu_bundle.sh [BUILD_DIR]     (default: build; configured with CUDA)
#
# Writes device_bundle/lm2-gpu.tar.xz (device_bundle/ is git-ignored: name it in the device
# tool's carry), to be carried to the GPU machine and unpacked there by
# tools/device/run_gpu_tests.sh and bench/cuda/run_cuda_bench.
#
# SLIM=1 writes device_bundle/lm2-gpu-slim.tar.xz instead: the CUDA benchmark and the CUDA
# op and model tests only, no libraries (~5 MB against ~16 for the default architectures,
# 80 and 90: the libraries are the same in every build). bench/cuda/compare_builds runs it
# with the other build's libraries, so several builds fit the device tool's carry limit
# beside the working tree.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD_DIR=${1:-build}
OUT_DIR=device_bundle
SLIM=${SLIM:-0}
if [[ "$SLIM" == 1 ]]; then
  TARGETS=(cuda_ops_tests cuda_model_tests lm2_cuda_bench lm2_cuda_gemm_bench lm2_batcher_bench)
  NAME=lm2-gpu-slim.tar.xz
else
  TARGETS=(cuda_ops_tests cuda_model_tests gpu_tests lm2_cli sdk_tests sdk_test_child)
  if [[ -f bench/cuda/CMakeLists.txt ]]; then
    TARGETS+=(lm2_cuda_bench lm2_cuda_sync_bench lm2_cuda_gemm_bench lm2_cuda_persistent_bench lm2_batcher_bench)
    # The kernel tracer (bench/cuda/trace_prefill), where CUPTI was found.
    if cmake --build "$BUILD_DIR" --target help 2>/dev/null | grep -q 'lm2_kernel_trace'; then
      TARGETS+=(lm2_kernel_trace)
    fi
  fi
  NAME=lm2-gpu.tar.xz
fi

echo "bundle: building ${TARGETS[*]} in $BUILD_DIR"
cmake --build "$BUILD_DIR" -j"$(nproc)" --target "${TARGETS[@]}"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/lib"
for exe in tests/cuda/cuda_ops_tests tests/cuda/cuda_model_tests tests/runtime/gpu_tests tools/cli/lm2 \
           tests/sdk/sdk_tests tests/sdk/sdk_test_child bench/cuda/lm2_cuda_bench bench/cuda/lm2_cuda_sync_bench \
           bench/cuda/lm2_cuda_gemm_bench bench/cuda/lm2_cuda_persistent_bench bench/runtime/lm2_batcher_bench; do
  [[ -f "$BUILD_DIR/$exe" ]] || continue
  target=$(basename "$exe")
  [[ "$target" == lm2 ]] && target=lm2_cli
  [[ " ${TARGETS[*]} " == *" $target "* ]] || continue
  strip -o "$stage/bin/$(basename "$exe")" "$BUILD_DIR/$exe"
done
if [[ " ${TARGETS[*]} " == *" lm2_kernel_trace "* ]]; then
  strip -o "$stage/lib/liblm2_kernel_trace.so" "$BUILD_DIR/bench/cuda/liblm2_kernel_trace.so"
fi
# Libraries the executables (and the tracer, whose CUPTI comes along: it must match the
# headers it was built with) resolve here, minus what every Linux and the CUDA image have.
skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libpthread|libdl|librt|libutil|libstdc\+\+|libgcc_s|libcuda|libcudart|libcublas|libcublasLt|libnvidia)'
for exe in "$stage"/bin/* "$stage"/lib/liblm2_kernel_trace.so; do
  [[ -f "$exe" ]] || continue
  ldd "$exe" | awk '$3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r name path; do
  if [[ "$SLIM" != 1 && ! "$name" =~ $skip ]]; then cp -L "$path" "$stage/lib/$name"; fi
done
git rev-parse HEAD >"$stage/COMMIT" 2>/dev/null || echo unknown >"$stage/COMMIT"
git diff --quiet HEAD -- . 2>/dev/null || echo "(+ local changes)" >>"$stage/COMMIT"
mkdir -p "$OUT_DIR"
# xz -9: its 64 MiB window spans several executables, which share most of their bytes (the
# runtime's kernels, linked into each): a full bundle ~16 MB against ~42 at tar's default -6
# (2026-11-29; ~1.5 minutes either way on the 2-core CPU machine). Two threads: -9's blocks
# are 192 MiB, so a bundle's ~230 MB make two, and xz asks 2.5 GiB of memory for them
# (unpacking needs 65 MiB).
tar -C "$stage" -cf - . | xz -9 -T2 >"$OUT_DIR/$NAME"
echo "bundle: $OUT_DIR/$NAME ($(du -h "$OUT_DIR/$NAME" | cut -f1)): $(ls "$stage/bin" | tr '\n' ' ')"
if [[ "$SLIM" == 1 ]]; then
  echo "bundle: no libraries (slim: compare_builds runs it with the other build's)"
else
  echo "bundle: libraries: $(ls "$stage/lib" | tr '\n' ' ')"
fi
