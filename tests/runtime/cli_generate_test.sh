#!/usr/bin/env bash
# `lm2 generate` end to end: greedy output is deterministic (tiny test model), a fact
# told in turn 1 reaches turn 2 through memory alone (the shipped demo model), bad input
# fails cleanly. Usage: cli_generate_test.sh PATH/TO/lm2 (run from the source root).
set -uo pipefail
LM2="$1"
M=tests/data/models/tiny-lm2
fail=0
check() {  # check DESCRIPTION COMMAND...: the command must succeed
  local what="$1"; shift
  if ! "$@"; then echo "FAIL: $what"; fail=1; fi
}

a=$("$LM2" generate --model $M --prompt "Mary went to the kitchen." --max-tokens 8 --quiet); rc=$?
check "greedy run exits 0" test "$rc" -eq 0
check "greedy run prints a reply" test -n "$a"
b=$("$LM2" generate --model $M --prompt "Mary went to the kitchen." --max-tokens 8 --quiet)
check "greedy is deterministic" test "$a" == "$b"

# Two turns with the context reset, on the trained demo model: the second reply depends
# on the first turn only through memory.
D=models/lm2-demo
t1=$("$LM2" generate --model $D --prompt "Mary went to the kitchen." --prompt "Where is Mary?" --reset-context --max-tokens 8 --quiet)
t2=$("$LM2" generate --model $D --prompt "John took the apple." --prompt "Where is Mary?" --reset-context --max-tokens 8 --quiet)
check "two turns print both" test "$(grep -c '^\[' <<<"$t1")" -eq 2
check "memory carries the fact into turn 2" test "$(tail -n 1 <<<"$t1")" == "> In the kitchen."
check "without the fact the model does not know" test "$(tail -n 1 <<<"$t2")" == "> I don't know."

err=$("$LM2" generate --model $M --prompt hi --max-tokens 4 2>&1 >/dev/null)
check "statistics on stderr" grep -qF "tokens/s" <<<"$err"

"$LM2" generate --model $M >/dev/null 2>&1; rc=$?
check "missing --prompt is a usage error (2)" test "$rc" -eq 2
"$LM2" generate --model $M --prompt hi --temperature abc >/dev/null 2>&1; rc=$?
check "non-numeric option is a usage error (2)" test "$rc" -eq 2
err=$("$LM2" generate --model $M --prompt hi --top-p 3 2>&1 >/dev/null); rc=$?
check "bad sampling options exit 1" test "$rc" -eq 1
check "bad sampling options say InvalidArgument" grep -qF "InvalidArgument" <<<"$err"
err=$("$LM2" generate --model /nonexistent --prompt hi 2>&1 >/dev/null); rc=$?
check "missing model exits 1 with NotFound" bash -c "test $rc -eq 1 && grep -qF NotFound <<<\"\$0\"" "$err"
long=$(printf 'Mary went to the kitchen. %.0s' $(seq 60))
err=$("$LM2" generate --model $M --prompt "$long" 2>&1 >/dev/null); rc=$?
check "over-long prompt exits 1 with OutOfRange" bash -c "test $rc -eq 1 && grep -qF OutOfRange <<<\"\$0\"" "$err"
"$LM2" generate --model $M --prompt "$long" --split-long-prompt --max-tokens 4 --quiet >/dev/null; rc=$?
check "--split-long-prompt processes it" test "$rc" -eq 0
# Backend choice: the CPU explicitly gives the same greedy text; a bad name is a usage
# error; "backend ..." on stderr names what auto picked; cuda without a GPU is Unavailable.
c=$("$LM2" generate --model $M --prompt "Mary went to the kitchen." --max-tokens 8 --quiet --backend cpu)
check "--backend cpu runs" test -n "$c"
"$LM2" generate --model $M --prompt hi --backend tpu >/dev/null 2>&1; rc=$?
check "unknown --backend is a usage error (2)" test "$rc" -eq 2
err=$("$LM2" generate --model $M --prompt hi --max-tokens 2 2>&1 >/dev/null)
check "stderr names the backend" grep -qE "backend (cpu|cuda:0)," <<<"$err"
if grep -qF "backend cpu," <<<"$err"; then  # auto chose the CPU: no usable GPU here
  check "auto on the CPU equals --backend cpu" test "$a" == "$c"
  err=$("$LM2" generate --model $M --prompt hi --backend cuda 2>&1 >/dev/null); rc=$?
  check "--backend cuda without a GPU exits 1 with Unavailable" bash -c "test $rc -eq 1 && grep -qF Unavailable <<<\"\$0\"" "$err"
fi
"$LM2" help generate | grep -qF -- "--reset-context"; check "help generate documents options" test $? -eq 0

if [[ $fail -ne 0 ]]; then exit 1; fi
echo "cli_generate: all checks passed"
