# Sourced by the hostile-input sweep (scripts/test_hostile.sh and the case files it sources).
# A case runs one trainer command with a time limit and asserts its outcome: the exit status,
# a message in its output, and that files saved before it are still intact.
#
#   TRAINER      the binary under test (default ./train_omnimoe_cpu)
#   HOSTILE_WORK a scratch folder, made and removed by the driver
#
#   expect_fail NAME REGEX -- CMD...   CMD must exit non-zero (not by the time limit or a signal
#                                      it did not ask for) and print REGEX (grep -E, stdout+stderr)
#   expect_rc NAME RC REGEX -- CMD...  CMD must exit with status RC and print REGEX ('' = any)
#   expect_ok NAME REGEX -- CMD...     the same as expect_rc NAME 0 REGEX
#   snapshot DIR                       remember every file's checksum under DIR
#   expect_intact NAME DIR             every file of the last snapshot of DIR is still there, unchanged
#   check NAME CONDITION-COMMAND...    a plain assertion: passes when the command exits 0
#   hostile_summary                    prints "<label>: N passed, N failed"; returns 1 if any failed
#
# Each case prints PASS or FAIL with its name; a failing case shows the end of its output.

HOSTILE_TIMEOUT=${HOSTILE_TIMEOUT:-120}
TRAINER=${TRAINER:-./train_omnimoe_cpu}
hostile_passed=0
hostile_failed=0
hostile_last_log=""

hostile_pass() { echo "PASS $1"; hostile_passed=$((hostile_passed + 1)); }
hostile_fail() {
    echo "FAIL $1: $2"
    if [ -n "$hostile_last_log" ] && [ -f "$hostile_last_log" ]; then tail -n 5 "$hostile_last_log" | sed 's/^/    | /'; fi
    hostile_failed=$((hostile_failed + 1))
}

# runs CMD under the time limit, output to a fresh log; sets hostile_rc
hostile_exec() {
    local name=$1; shift
    hostile_last_log="$HOSTILE_WORK/case_$((hostile_passed + hostile_failed + 1)).log"
    timeout -k 5 "$HOSTILE_TIMEOUT" "$@" > "$hostile_last_log" 2>&1 < /dev/null
    hostile_rc=$?
}

expect_rc() {
    local name=$1 rc=$2 regex=$3
    shift 3
    [ "$1" = "--" ] && shift
    hostile_exec "$name" "$@"
    if [ "$hostile_rc" -eq 124 ] || [ "$hostile_rc" -eq 137 ]; then
        hostile_fail "$name" "timed out after ${HOSTILE_TIMEOUT}s (a hang)"
    elif [ "$hostile_rc" -ne "$rc" ]; then
        hostile_fail "$name" "exit status $hostile_rc, expected $rc"
    elif [ -n "$regex" ] && ! grep -Eq -- "$regex" "$hostile_last_log"; then
        hostile_fail "$name" "output does not match /$regex/"
    else
        hostile_pass "$name"
    fi
}

expect_ok() {
    local name=$1 regex=$2
    shift 2
    expect_rc "$name" 0 "$regex" "$@"
}

expect_fail() {
    local name=$1 regex=$2
    shift 2
    [ "$1" = "--" ] && shift
    hostile_exec "$name" "$@"
    if [ "$hostile_rc" -eq 124 ] || [ "$hostile_rc" -eq 137 ]; then
        hostile_fail "$name" "timed out after ${HOSTILE_TIMEOUT}s (a hang)"
    elif [ "$hostile_rc" -eq 0 ]; then
        hostile_fail "$name" "exit status 0, expected an error"
    elif [ "$hostile_rc" -ge 128 ]; then
        hostile_fail "$name" "killed by signal $((hostile_rc - 128)) (a crash), expected a clean error"
    elif ! grep -Eq -- "$regex" "$hostile_last_log"; then
        hostile_fail "$name" "output does not match /$regex/"
    else
        hostile_pass "$name"
    fi
}

hostile_snapshot_file() { echo "$HOSTILE_WORK/snapshot_$(echo "$1" | tr '/' '_')"; }

snapshot() {
    local dir=$1
    (cd "$dir" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum) > "$(hostile_snapshot_file "$dir")"
}

expect_intact() {
    local name=$1 dir=$2
    hostile_last_log=""
    if (cd "$dir" && sha256sum --quiet -c "$(hostile_snapshot_file "$dir")") > "$HOSTILE_WORK/intact.log" 2>&1; then
        hostile_pass "$name"
    else
        hostile_fail "$name" "files saved before changed or vanished: $(tr '\n' ' ' < "$HOSTILE_WORK/intact.log")"
    fi
}

check() {
    local name=$1
    shift
    hostile_last_log=""
    if "$@"; then hostile_pass "$name"; else hostile_fail "$name" "condition failed: $*"; fi
}

hostile_summary() {
    echo "$1: $hostile_passed passed, $hostile_failed failed"
    [ "$hostile_failed" -eq 0 ]
}
