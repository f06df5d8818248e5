#!/usr/bin/env bash
# Runs one test executable of the sanitizer build (ASan + UBSan), which scripts/test
# builds in build-asan. Exits 77 (ctest "Skipped") with the reason when it was not built.
bin="$1"; shift
if [[ ! -x "$bin" ]]; then
  echo "SKIPPED: $bin not built; scripts/test builds the sanitizer suite (LM2_SKIP_ASAN=1 skips it)"
  exit 77
fi
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
exec "$bin" "$@"
