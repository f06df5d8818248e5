#!/usr/bin/env bash
# Builds the CUDA ops alone (LM2_CUDA_OPS_ONLY) and runs their tests on this machine's GPU,
# then once more under compute-sanitizer memcheck. Run from the repository root on the GPU
# machine, which has CUDA, CMake and ninja but none of the runtime's other dependencies.
#
# Catch2 v2's single header must be in the tree: a copy of /usr/include/catch2/catch.hpp at
# third_party_device/catch2/catch.hpp (not committed; listed in .git/info/exclude), or set
# LM2_CATCH2_INCLUDE_DIR to the folder holding catch2/catch.hpp.
#
# Environment: OUT (logs are written there when set), BUILD_DIR (default build-cudaops-device),
# CUDA_ARCH (default 90), SKIP_MEMCHECK=1 to skip the sanitizer pass.
# Exit status: 0 when both passes pass; otherwise the first failure's.
set -euo pipefail

ROOT=$(pwd)
if [[ ! -f "$ROOT/CMakeLists.txt" || ! -d "$ROOT/runtime/src/cuda" ]]; then
  echo "run_cuda_op_tests.sh: run me from the lm2 repository root" >&2
  exit 2
fi
BUILD_DIR=${BUILD_DIR:-build-cudaops-device}
CUDA_ARCH=${CUDA_ARCH:-90}
LOG_DIR=${OUT:-$ROOT/$BUILD_DIR/logs}
mkdir -p "$LOG_DIR"
CATCH2_DIR=${LM2_CATCH2_INCLUDE_DIR:-$ROOT/third_party_device}
if [[ ! -f "$CATCH2_DIR/catch2/catch.hpp" ]]; then
  echo "run_cuda_op_tests.sh: no $CATCH2_DIR/catch2/catch.hpp (copy /usr/include/catch2/catch.hpp there)" >&2
  exit 2
fi

# nvcc and compute-sanitizer may not be on PATH.
for d in /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer; do
  [[ -d "$d" ]] && PATH="$PATH:$d"
done
export PATH

{
  echo "== lm2 CUDA op tests: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  if git rev-parse HEAD >/dev/null 2>&1; then
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (+ local changes)')"
  else
    echo "commit: unknown (no git metadata in this copy)"
  fi
  echo "host: $(uname -srm), $(nproc) CPUs"
  echo "-- nvidia-smi -L"; nvidia-smi -L || echo "(nvidia-smi failed)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  echo "-- nvcc"; nvcc --version | tail -n 2
  echo "-- cmake"; cmake --version | head -n 1
  echo "-- ninja"; ninja --version
  echo "-- compute-sanitizer"; compute-sanitizer --version 2>/dev/null | head -n 2 || echo "(not found)"
} 2>&1 | tee "$LOG_DIR/versions.txt"

echo "== configure ($BUILD_DIR, sm_$CUDA_ARCH)"
t0=$(date +%s)
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DLM2_CUDA_OPS_ONLY=ON -DLM2_CUDA=ON -DLM2_CUDA_ARCHITECTURES="$CUDA_ARCH" \
  -DLM2_CATCH2_INCLUDE_DIR="$CATCH2_DIR" 2>&1 | tee "$LOG_DIR/configure.log"
echo "== build"
cmake --build "$BUILD_DIR" -j "$(nproc)" 2>&1 | tee "$LOG_DIR/build.log"
t1=$(date +%s)
echo "build took $((t1 - t0)) s" | tee -a "$LOG_DIR/build.log"

TEST_BIN="$BUILD_DIR/tests/cuda/cuda_ops_tests"
status=0

echo "== tests"
set +e
"$TEST_BIN" --durations yes 2>&1 | tee "$LOG_DIR/cuda_ops_tests.log"
rc=${PIPESTATUS[0]}
set -e
echo "cuda_ops_tests exit status $rc" | tee -a "$LOG_DIR/cuda_ops_tests.log"
if [[ $rc -eq 77 ]]; then
  echo "run_cuda_op_tests.sh: the tests skipped (no usable GPU): nothing was checked" >&2
  exit 77
fi
[[ $rc -ne 0 && $status -eq 0 ]] && status=$rc

if [[ "${SKIP_MEMCHECK:-0}" != 1 ]]; then
  echo "== compute-sanitizer --tool memcheck"
  if ! command -v compute-sanitizer >/dev/null; then
    echo "run_cuda_op_tests.sh: compute-sanitizer not found (PATH, /usr/local/cuda/bin); SKIP_MEMCHECK=1 to run without" \
      | tee "$LOG_DIR/cuda_ops_tests.memcheck.log" >&2
    [[ $status -eq 0 ]] && status=3
    echo "== done: status $status (logs in $LOG_DIR)"
    exit "$status"
  fi
  set +e
  compute-sanitizer --tool memcheck --error-exitcode 99 --leak-check full "$TEST_BIN" 2>&1 \
    | tee "$LOG_DIR/cuda_ops_tests.memcheck.log"
  rc=${PIPESTATUS[0]}
  set -e
  echo "memcheck exit status $rc" | tee -a "$LOG_DIR/cuda_ops_tests.memcheck.log"
  [[ $rc -ne 0 && $status -eq 0 ]] && status=$rc
fi

echo "== done: status $status (logs in $LOG_DIR)"
exit "$status"
