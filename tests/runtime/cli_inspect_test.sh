#!/usr/bin/env bash
# `lm2 inspect` end to end: output of the test models, clean failures for bad directories,
# help and usage exit codes. Usage: cli_inspect_test.sh PATH/TO/lm2 (run from the source root).
set -uo pipefail
LM2="$1"
fail=0
check() {  # check DESCRIPTION COMMAND...: the command must succeed
  local what="$1"; shift
  if ! "$@"; then echo "FAIL: $what"; fail=1; fi
}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

out=$("$LM2" inspect tests/data/models/tiny-lm2); rc=$?
check "tiny-lm2 exits 0" test "$rc" -eq 0
for want in "total                    281,600" "memory                   86,592 (86.59 K) = 3 x (7d^2 + 3d = 28,864)" \
            "layers                   [0, 1, 2] (3 of 3)" "bank per session (fp32)  12.0 KiB" \
            "chat symbols             <|user|> 4, <|assistant|> 5, <|end|> 6" "tensors                  60 (F32 x 60)"; do
  check "tiny-lm2 prints '$want'" grep -qF -- "$want" <<<"$out"
done
check "fingerprint is 64 hex digits" grep -qE '^fingerprint +[0-9a-f]{64}$' <<<"$out"

out=$("$LM2" inspect tests/data/models/tiny-partial); rc=$?
check "tiny-partial exits 0" test "$rc" -eq 0
check "tiny-partial counts the learned init" grep -qF "= 1 x (7d^2 + 3d = 16,272) + learned init 576" <<<"$out"
out=$("$LM2" inspect --no-fingerprint tests/data/models/tiny-vanilla); rc=$?
check "tiny-vanilla exits 0" test "$rc" -eq 0
check "tiny-vanilla has no memory" grep -qF "none (a vanilla Llama model)" <<<"$out"
check "--no-fingerprint skips it" bash -c "! grep -q '^fingerprint' <<<\"\$0\"" "$out"

# Bad directories: exit 1, the Status on stderr, no crash.
err=$("$LM2" inspect "$tmp/none" 2>&1 >/dev/null); rc=$?
check "missing dir exits 1" test "$rc" -eq 1
check "missing dir says NotFound" grep -qF "NotFound" <<<"$err"
cp -r tests/data/models/tiny-lm2 "$tmp/trunc"
head -c 5000 tests/data/models/tiny-lm2/model.safetensors >"$tmp/trunc/model.safetensors"
err=$("$LM2" inspect "$tmp/trunc" 2>&1 >/dev/null); rc=$?
check "truncated weights exit 1" test "$rc" -eq 1
check "truncated weights say Corruption" grep -qF "Corruption" <<<"$err"

# Help and usage.
check "--help exits 0 and lists inspect" bash -c "'$LM2' --help | grep -q '^  inspect '"
check "help inspect shows usage" bash -c "'$LM2' help inspect | grep -q 'usage: lm2 inspect'"
"$LM2" >/dev/null 2>&1; check "no command exits 2" test $? -eq 2
"$LM2" frobnicate >/dev/null 2>&1; check "unknown command exits 2" test $? -eq 2
"$LM2" inspect >/dev/null 2>&1; check "inspect without DIR exits 2" test $? -eq 2
exit $fail
