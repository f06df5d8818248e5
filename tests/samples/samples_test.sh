#!/usr/bin/env bash
# resume_session (tell, exit, ask in a new process: the memory digest comes back equal)
# and selective_clear (forget a turn, clear everything: back to the initial bank).
set -euo pipefail
bin=$1
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
fail() { echo "FAIL: $*"; echo "--- output ---"; cat "$data/out"; exit 1; }

"$bin/resume_session" --data "$data" --tell "Mary went to the kitchen." >"$data/out" 2>&1 || fail "tell run"
told=$(sed -n 's/.*committed version 1; memory digest \([0-9.]*\).*/\1/p' "$data/out")
[[ -n $told ]] || fail "tell run printed no digest"
"$bin/resume_session" --data "$data" --ask "Where is Mary?" >"$data/out" 2>&1 || fail "ask run"
grep -q "resumed at version 1 (1 turns); memory digest $told" "$data/out" || fail "memory not restored (digest $told)"
grep -q "^reply: " "$data/out" || fail "no reply"
# With the trained demo model (the samples' default) the fact itself comes back.
if [[ -f models/lm2-demo/config.json ]]; then
  grep -q "^reply: In the kitchen." "$data/out" || fail "the resumed process did not recall the fact"
fi
rm -rf "$data/store"
"$bin/resume_session" --data "$data" --ask "Where is Mary?" >"$data/out" 2>&1 && fail "ask without tell succeeded"
grep -q "NotFound" "$data/out" || fail "ask without tell: no NotFound"

"$bin/selective_clear" --data "$data" >"$data/out" 2>&1 || fail "selective_clear"
grep -q "with the fact in memory:" "$data/out" || fail "no first answer"
grep -q "forgot turn v1" "$data/out" || fail "no forget"
grep -q "back to the initial bank: yes" "$data/out" || fail "clear did not restore the initial bank"
if [[ -f models/lm2-demo/config.json ]]; then
  grep -q "with the fact in memory: *In the kitchen." "$data/out" || fail "fact not recalled before forgetting"
  grep -q "after forgetting the fact: I don't know." "$data/out" || fail "fact still recalled after forgetting"
fi
echo "samples: OK"
