#!/usr/bin/env bash
# lm2-chat driven through stdin, twice (two processes): the second run finds the memory
# restored and runs the history, show, forget, rollback, clear, slots and fork commands.
set -euo pipefail
chat=$1
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
export LM2_DATA_DIR=$data
fail() { echo "FAIL: $*"; echo "--- output ---"; cat "$data/out"; exit 1; }

printf 'Mary went to the kitchen.\nJohn picked up the apple.\n/quit\n' | "$chat" --user alice >"$data/out" 2>&1
grep -q "created key file" "$data/out" || fail "no key file message on first run"
[[ $(stat -c %a "$data/master.key") == 600 ]] || fail "key file mode is not 600"
grep -q "\[ 50%\] weights" "$data/out" || fail "no loading progress"
grep -q "new session" "$data/out" || fail "first run did not start a new session"
grep -q "\[v2:" "$data/out" || fail "second turn not committed as v2"

printf '/history\n/show 1\n/slots\n/forget 1\n/rollback 2\n/clear layer 1 slots 2,3\n/clear\n/history\n/fork 2 branch\n/rollback 99\n/bogus\nWhere is Mary?\n' |
  "$chat" --user alice --quiet >"$data/out" 2>&1
grep -q "memory restored: 2 turns, at version 2" "$data/out" || fail "memory not restored"
grep -q "v1   turn .*Mary went to the kitchen." "$data/out" || fail "history lacks turn 1"
grep -q "you> Mary went to the kitchen." "$data/out" || fail "/show 1"
grep -q "last turn" "$data/out" && fail "/slots printed a last turn in a fresh process"
grep -q "layer 2: " "$data/out" || fail "/slots printed no layer"
grep -q "forgot turn v1; now at v3" "$data/out" || fail "/forget"
grep -q "rolled back to v2" "$data/out" || fail "/rollback"
grep -q "cleared; now at v4" "$data/out" || fail "/clear layer slots"
grep -q "cleared; now at v5" "$data/out" || fail "/clear"
grep -q "v4   clear .*clear layers=1 slots=2,3" "$data/out" || fail "history lacks the clear"
grep -q "forked v2 into session 'branch'" "$data/out" || fail "/fork"
grep -q "error: NotFound" "$data/out" || fail "/rollback 99 gave no NotFound"
grep -q "unknown command" "$data/out" || fail "/bogus"

# Another user has a memory of their own.
printf '/history\n' | "$chat" --user bob --quiet >"$data/out" 2>&1
grep -q "new session" "$data/out" || fail "bob sees alice's session"
grep -q "(no turns yet)" "$data/out" || fail "bob's history is not empty"

# With the trained demo model (the default when present): a fact told in one process is
# recalled in the next through the restored memory alone, and not by another user.
if [[ -f models/lm2-demo/config.json ]]; then
  printf 'Sandra went to the garden.\n/quit\n' | "$chat" --user carol --quiet >"$data/out" 2>&1
  printf 'Where is Sandra?\n' | "$chat" --user carol --quiet >"$data/out" 2>&1
  grep -q "lm2> In the garden." "$data/out" || fail "carol's fact was not recalled after a restart"
  printf 'Where is Sandra?\n' | "$chat" --user dave --quiet >"$data/out" 2>&1
  grep -q "lm2> I don't know." "$data/out" || fail "dave recalled carol's fact"
fi
echo "lm2-chat: OK"
