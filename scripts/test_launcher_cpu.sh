#!/usr/bin/env bash
# test_launcher_cpu.sh - scripts/run_multi_gpu.sh's launch without MPI over two "hosts" of this
# machine (two launchers, one id file), with a stand-in for ./train_omnimoe: no GPU needed.
#   1. a rank of host 1 fails: host 1's launcher exits with its status, and host 0's launcher ends
#      its own ranks (which in a real run would wait inside NCCL forever) and exits non-zero, both
#      within seconds; no rank is left running
#   2. a clean run: both launchers exit 0
#   3. a marker left by a failed launch: the next launch with the same id file is refused
# One PASS/FAIL line per check, then "test_launcher_cpu: N passed, N failed"; exit 1 on any FAIL.
set -u
cd "$(dirname "$0")/.."
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/pids"
# the stand-in: records its pid under rank, then rank $FAIL_RANK exits 3 after 1 s and the others
# run for $RUN_S s (default: long enough to count as hanging)
cat > "$W/fake_trainer" <<'FAKE'
#!/usr/bin/env bash
rank=-1
while [ $# -gt 0 ]; do if [ "$1" = -pr ]; then rank=$2; fi; shift; done
echo $$ > "$PID_DIR/$rank"
if [ "$rank" = "${FAIL_RANK:--1}" ]; then sleep 1; exit 3; fi
exec sleep "${RUN_S:-300}"
FAKE
chmod +x "$W/fake_trainer"
export OMNIMOE_BIN="$W/fake_trainer" OMNIMOE_LAUNCH=file OMNIMOE_NODES=2 PID_DIR="$W/pids"
passed=0
failures=0
check() {  # check <label> <condition...>
    local label=$1
    shift
    if "$@"; then echo "PASS $label"; passed=$((passed + 1)); else echo "FAIL $label"; failures=$((failures + 1)); fi
}
none_running() {  # no stand-in recorded under $PID_DIR is alive
    local f
    for f in "$PID_DIR"/*; do
        [ -e "$f" ] || continue
        if kill -0 "$(cat "$f")" 2>/dev/null; then return 1; fi
    done
    return 0
}
launch_two_hosts() {  # launch_two_hosts <id file>: runs both launchers (2 ranks each), sets rc0 rc1 elapsed
    local start=$(date +%s) h0 h1
    OMNIMOE_ID_FILE=$1 OMNIMOE_NODE_RANK=0 timeout 20 scripts/run_multi_gpu.sh 2 > "$W/host0.out" 2>&1 &
    h0=$!
    OMNIMOE_ID_FILE=$1 OMNIMOE_NODE_RANK=1 timeout 20 scripts/run_multi_gpu.sh 2 > "$W/host1.out" 2>&1 &
    h1=$!
    wait "$h0"; rc0=$?
    wait "$h1"; rc1=$?
    elapsed=$(( $(date +%s) - start ))
}

# 1. rank 3 (host 1) fails
FAIL_RANK=3 launch_two_hosts "$W/run1.id"
check "host 1's launcher exits with its failed rank's status 3 (got $rc1)" [ "$rc1" -eq 3 ]
check "host 0's launcher ends its ranks and exits non-zero, not by the 20 s timeout (got $rc0)" \
    bash -c "[ $rc0 -ne 0 ] && [ $rc0 -ne 124 ]"
check "both launchers are done within 10 s ($elapsed s)" [ "$elapsed" -le 10 ]
check "no rank is left running" none_running
check "host 0 says why it ended its ranks" grep -q "ending this host's ranks: a rank of host 1 exited with status 3" "$W/host0.out"

# 2. a clean run
rm -f "$PID_DIR"/*
RUN_S=2 launch_two_hosts "$W/run2.id"
check "a clean run: both launchers exit 0 (got $rc0, $rc1)" bash -c "[ $rc0 -eq 0 ] && [ $rc1 -eq 0 ]"
check "a clean run leaves no failure marker" [ ! -e "$W/run2.id.failed" ]

# 3. the marker of launch 1 refuses a new launch on the same id file
OMNIMOE_ID_FILE="$W/run1.id" OMNIMOE_NODE_RANK=0 timeout 10 scripts/run_multi_gpu.sh 2 > "$W/stale.out" 2>&1
rc=$?
check "a launch on an id file whose launch failed is refused with exit 2 (got $rc)" [ "$rc" -eq 2 ]
check "... and says to use a new OMNIMOE_ID_FILE" grep -q "give every launch a new OMNIMOE_ID_FILE" "$W/stale.out"

echo "test_launcher_cpu: $passed passed, $failures failed"
[ "$failures" -eq 0 ] && [ "$passed" -gt 0 ]
