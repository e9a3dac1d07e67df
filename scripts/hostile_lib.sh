# Sourced by the hostile-input sweep (scripts/test_hostile.sh and the case files it sources).
# A case runs one trainer command with a time limit and asserts its outcome: the exit status,
# a message in its output, and that files saved before it are still intact.
#
#   TRAINER      the binary under test (default ./train_omnimoe_cpu)
#   HOSTILE_MODEL the preset every case trains (tiny for the CPU trainer, small for the CUDA one)
#   HOSTILE_WORK a scratch folder, made and removed by the driver
#
#   expect_fail NAME REGEX -- CMD...   CMD must exit non-zero (not by the time limit or a signal
#                                      it did not ask for) and print REGEX (grep -E, stdout+stderr)
#   expect_rc NAME RC REGEX -- CMD...  CMD must exit with status RC and print REGEX ('' = any)
#   expect_ok NAME REGEX -- CMD...     the same as expect_rc NAME 0 REGEX
#   expect_no_match NAME REGEX         the output of the last expect_* command does not match REGEX
#   snapshot DIR [FILE...]             remember the checksum of every file under DIR (or of FILEs,
#                                      paths relative to DIR: the files a case must not touch)
#   expect_intact NAME DIR             every file of the last snapshot of DIR is still there, unchanged
#   check NAME CONDITION-COMMAND...    a plain assertion: passes when the command exits 0
#   hostile_skip NAME WHY              a case this machine cannot run (counted apart, never a pass)
#   hostile_summary                    prints "<label>: N passed, N failed"; returns 1 if any failed
#
# Files for cases (python3, no other package):
#   make_shard PATH NTOK [seed=S] [magic=M] [version=V] [count=C] [last=TOK]
#                                      a token shard of NTOK random tokens below 50257; the header
#                                      fields can lie (count=), last= sets the final token
#   xor_byte FILE OFFSET MASK          flip the bits MASK of the byte at OFFSET
#   put_f32 FILE OFFSET VALUE          overwrite 4 bytes at OFFSET with a float (nan, inf, 1.5)
#   flag_re 'NAMES'                    a regex for one of the '|'-separated flag NAMES as a word
#                                      ("-b|--batch-size" matches "-b 0" or "(--batch-size)",
#                                      never "-bx"), prefixed by "Error"
#
# A case may set HOSTILE_TIMEOUT for one command (HOSTILE_TIMEOUT=10 expect_fail ...).
# Each case prints PASS or FAIL with its name; a failing case shows the end of its output.

HOSTILE_TIMEOUT=${HOSTILE_TIMEOUT:-120}
TRAINER=${TRAINER:-./train_omnimoe_cpu}
# the preset of the cases (-e "$HOSTILE_MODEL"): the smallest the trainer runs. tiny (head size
# 16) is for the CPU; the GPU kernels need a head size of 32, 64 or 128, so the CUDA trainer gets
# small (C=128, NH=4)
if [ -z "${HOSTILE_MODEL:-}" ]; then
    case "$TRAINER" in *_cpu) HOSTILE_MODEL=tiny ;; *) HOSTILE_MODEL=small ;; esac
fi
hostile_passed=0
hostile_failed=0
hostile_skipped=0
hostile_last_log=""
hostile_case_log=""  # output of the last expect_* command (kept for expect_no_match)

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
    hostile_case_log=$hostile_last_log
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

expect_no_match() {
    local name=$1 regex=$2
    hostile_last_log=$hostile_case_log
    if [ -z "$hostile_case_log" ] || ! [ -f "$hostile_case_log" ]; then
        hostile_fail "$name" "no command output to look at"
    elif grep -Eq -- "$regex" "$hostile_case_log"; then
        hostile_fail "$name" "output matches /$regex/: $(grep -Em 1 -- "$regex" "$hostile_case_log")"
    else
        hostile_pass "$name"
    fi
}

hostile_snapshot_file() { echo "$HOSTILE_WORK/snapshot_$(echo "$1" | tr '/' '_')"; }

snapshot() {
    local dir=$1
    shift
    if [ $# -gt 0 ]; then
        (cd "$dir" && sha256sum -- "$@") > "$(hostile_snapshot_file "$dir")"
    else
        (cd "$dir" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum) > "$(hostile_snapshot_file "$dir")"
    fi
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

hostile_skip() {
    echo "SKIP $1: $2"
    hostile_skipped=$((hostile_skipped + 1))
}

hostile_summary() {
    [ "$hostile_skipped" -gt 0 ] && echo "$1: $hostile_skipped case(s) skipped on this machine (SKIP lines above)"
    echo "$1: $hostile_passed passed, $hostile_failed failed"
    [ "$hostile_failed" -eq 0 ]
}

make_shard() {
    python3 - "$@" <<'PY'
import random, struct, sys
path, n = sys.argv[1], int(sys.argv[2])
opt = dict(a.split("=", 1) for a in sys.argv[3:])
rng = random.Random(int(opt.get("seed", 1)))
tokens = [rng.randrange(50257) for _ in range(n)]
if "last" in opt and n > 0:
    tokens[-1] = int(opt["last"])
header = [0] * 256
header[0] = int(opt.get("magic", 20240520))
header[1] = int(opt.get("version", 1))
header[2] = int(opt.get("count", n))
with open(path, "wb") as f:
    f.write(struct.pack("<256i", *header))
    f.write(struct.pack("<%dH" % n, *tokens))
PY
}

xor_byte() {
    python3 - "$@" <<'PY'
import sys
path, offset, mask = sys.argv[1], int(sys.argv[2]), int(sys.argv[3], 0)
with open(path, "r+b") as f:
    f.seek(offset)
    b = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([b ^ mask]))
PY
}

put_f32() {
    python3 - "$@" <<'PY'
import struct, sys
path, offset, value = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with open(path, "r+b") as f:
    f.seek(offset)
    f.write(struct.pack("<f", value))
PY
}

flag_re() { echo "Error.*(^|[^[:alnum:]-])($1)([^[:alnum:]-]|\$)"; }
