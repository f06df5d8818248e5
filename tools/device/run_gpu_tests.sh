#!/usr/bin/env bash
# Runs lm2's GPU tests on the GPU machine from the bundle made by make_gpu_bundle.sh:
# the CUDA op tests, the whole-model tests (golden files, greedy tokens vs the CPU backend,
# export/import, threads, backend choice, continuous batching), device discovery, `lm2
# generate` end to end on the GPU (tests/runtime/cli_generate_test.sh), the SDK's suite on the
# GPU (sdk_tests: its [gpu] cases, sessions chatting at once through the engine's decode
# batcher and on a full device, and every other case with GPU engines), then
# compute-sanitizer memcheck over the op and model tests and racecheck over the kernels that
# reuse shared memory. Run from the repository root; logs go to $OUT (or device_bundle/logs).
#
#   device run: tools/device/run_gpu_tests.sh        (carry device_bundle)
#
# Environment: SKIP_MEMCHECK=1 skips the sanitizer passes, SKIP_RACECHECK=1 the racecheck
# pass alone, RACECHECK_ONLY=1 runs only it. When device_bundle/lm2-gpu-sm80.tar.xz exists
# (SM80_BUNDLE names another), its op and model tests run too: a SLIM bundle of a build
# configured with -DCMAKE_CUDA_ARCHITECTURES=80 (the sm_80 code, on this card through PTX).
# Exit status 0 when all pass. On an H200 the
# suite without racecheck takes ~2 minutes and racecheck ~7 (431 s at 24edf3b; its
# MemoryReadWrite case 13 s of them), together more than the device tool allows one
# command: run it as SKIP_RACECHECK=1, then RACECHECK_ONLY=1.
set -uo pipefail
ROOT=$(pwd)
BUNDLE=${BUNDLE:-$ROOT/device_bundle/lm2-gpu.tar.xz}
SM80_BUNDLE=${SM80_BUNDLE:-$ROOT/device_bundle/lm2-gpu-sm80.tar.xz}
LOG_DIR=${OUT:-$ROOT/device_bundle/logs}
mkdir -p "$LOG_DIR"
if [[ ! -f "$BUNDLE" ]]; then
  echo "run_gpu_tests.sh: no $BUNDLE (run tools/device/make_gpu_bundle.sh first and carry device_bundle)" >&2
  exit 2
fi
DEST=$(mktemp -d /tmp/lm2-gpu.XXXXXX)
tar -C "$DEST" -xJf "$BUNDLE"
export LD_LIBRARY_PATH="$DEST/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LM2_SOURCE_DIR="$ROOT"
for d in /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer; do [[ -d "$d" ]] && PATH="$PATH:$d"; done
export PATH
BIN="$DEST/bin"

{
  echo "== lm2 GPU tests: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "bundle commit: $(tr '\n' ' ' <"$DEST/COMMIT")"
  echo "host: $(uname -srm), $(nproc) CPUs"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  compute-sanitizer --version 2>/dev/null | head -n 2 || echo "(no compute-sanitizer)"
} 2>&1 | tee "$LOG_DIR/versions.txt"

status=0
run() {  # run NAME COMMAND...: logs to $LOG_DIR/NAME.log, remembers the first failure
  local name="$1"; shift
  echo "== $name"
  "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name: exit status $rc" | tee -a "$LOG_DIR/$name.log"
  if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; fi
}

if [[ "${RACECHECK_ONLY:-0}" != 1 ]]; then
  run cuda_ops_tests "$BIN/cuda_ops_tests" --durations yes
  run cuda_model_tests "$BIN/cuda_model_tests" --durations yes
  run gpu_tests "$BIN/gpu_tests"
  run cli_generate bash tests/runtime/cli_generate_test.sh "$BIN/lm2"
  # The SDK on the GPU, the whole suite (its engines take the GPU where one is present):
  # concurrent sessions through the engine's decode batcher, idle sessions' states evicted
  # to make room on a full device (the [gpu] cases), and every other case; the
  # child-process cases run the bundle's sdk_test_child.
  LM2_SDK_CHILD="$BIN/sdk_test_child" run sdk "$BIN/sdk_tests"
  # The sm_80 code (what Ampere and Ada run) on this card: a slim bundle built with 80
  # alone, its PTX compiled by the driver, run with this bundle's libraries.
  if [[ -f "$SM80_BUNDLE" ]]; then
    SM80=$(mktemp -d /tmp/lm2-sm80.XXXXXX)
    tar -C "$SM80" -xJf "$SM80_BUNDLE"
    run sm80_ops_tests "$SM80/bin/cuda_ops_tests"
    run sm80_model_tests "$SM80/bin/cuda_model_tests"
  fi
fi
if [[ "${SKIP_MEMCHECK:-0}" != 1 && "${RACECHECK_ONLY:-0}" != 1 ]]; then
  run memcheck_ops compute-sanitizer --tool memcheck --error-exitcode 99 --leak-check full "$BIN/cuda_ops_tests"
  # ~[oom]: the out-of-memory case takes all of the device's memory, which the tool needs too.
  run memcheck_model compute-sanitizer --tool memcheck --error-exitcode 99 --leak-check full "$BIN/cuda_model_tests" \
    '~[oom]'
fi
if [[ "${SKIP_MEMCHECK:-0}" != 1 && "${SKIP_RACECHECK:-0}" != 1 ]]; then
  # Shared-memory hazards in the kernels that reuse shared memory between phases (the
  # sampler's candidate selection and pick, the fused RoPE + attention, the argmax, the
  # tensor-core tile kernels, the attention kernels and the split decode attention's range
  # merge, the decode memory reads).
  # The filter keeps to cases that run no cuBLAS GEMM besides attention's: racecheck reports
  # hazards inside cuBLAS's strided-batched nvjet kernels (those of MemoryRead and
  # FlushStagedWrites, 2026-11-27), and leaving them out by kernel name crashed the sanitizer.
  run racecheck_ops compute-sanitizer --tool racecheck --error-exitcode 99 "$BIN/cuda_ops_tests" \
    "SampleRows*,RopeAttentionDecodeBatch*,Decode attention split*,ArgmaxRows*,MemoryReadWrite*,MemoryReadOneToken*,CausalAttention*"
fi
echo "== done: status $status (logs in $LOG_DIR)"
exit "$status"
