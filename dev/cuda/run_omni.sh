#!/bin/bash
# Builds and runs the OmniMoE router / scheduler / experts tests and benchmarks
# (llmc/router.cuh, llmc/scheduler.cuh, llmc/experts.cuh). Run from anywhere; needs a GPU.
#   dev/cuda/run_omni.sh            build, test, benchmark
#   SKIP_BENCH=1 dev/cuda/run_omni.sh   tests only
#   SKIP_BUILD=1 dev/cuda/run_omni.sh   run binaries built beforehand
# Logs go to $LOG_DIR (default: $OUT if set, else /tmp). The summary is printed last.
set -u
cd "$(dirname "$0")/../.."
LOG_DIR="${LOG_DIR:-${OUT:-/tmp}}"
mkdir -p "$LOG_DIR"
BIN=dev/cuda/build
# the Makefile's flags (make kernel_tests / kernel_benches); SKIP_BUILD=1: use the binaries there
if [ "${SKIP_BUILD:-0}" != "1" ]; then
    make -s -j2 "$BIN/test_omni" "$BIN/bench_omni" || { echo "BUILD FAILED: test_omni / bench_omni"; exit 1; }
fi

timeout 180 ./$BIN/test_omni > "$LOG_DIR/test_omni.log" 2>&1
test_status=$?
bench_status=0
if [ "${SKIP_BENCH:-0}" != "1" ]; then
    timeout 180 ./$BIN/bench_omni > "$LOG_DIR/bench_omni.log" 2>&1
    bench_status=$?
fi

echo "==== test_omni (failed checks, then totals; full log: $LOG_DIR/test_omni.log) ===="
grep -E "FAIL|error|ERROR" "$LOG_DIR/test_omni.log" | head -40
grep -E "^== summary|TEST_OMNI|^test_omni: [0-9]+ passed" "$LOG_DIR/test_omni.log"
if [ "${SKIP_BENCH:-0}" != "1" ]; then
    echo "==== bench_omni (full log: $LOG_DIR/bench_omni.log) ===="
    grep -E "^bench_omni|copy of 1 GiB|active experts" "$LOG_DIR/bench_omni.log"
    sed -n '/^== summary/,$p' "$LOG_DIR/bench_omni.log"
    [ $bench_status -ne 0 ] && { echo "bench_omni exited with $bench_status"; tail -5 "$LOG_DIR/bench_omni.log"; }
fi
echo "==== result: test_omni $([ $test_status -eq 0 ] && echo PASSED || echo FAILED), bench exit $bench_status ===="
[ $test_status -eq 0 ] && [ $bench_status -eq 0 ]
