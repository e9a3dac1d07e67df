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
NVCC_FLAGS="-O3 -std=c++17 -arch=sm_90 -I. -Xcompiler -Wall"
LIBS="-lcublasLt -lcublas"

build() {  # build <source> <binary>
    if ! nvcc $NVCC_FLAGS "$1" -o "$2" $LIBS; then
        echo "BUILD FAILED: $1"
        exit 1
    fi
}
if [ "${SKIP_BUILD:-0}" != "1" ]; then  # SKIP_BUILD=1: use binaries built beforehand (same nvcc)
    build dev/cuda/test_omni.cu dev/cuda/test_omni_bin &
    pid_test=$!
    build dev/cuda/bench_omni.cu dev/cuda/bench_omni_bin &
    pid_bench=$!
    wait $pid_test || exit 1
    wait $pid_bench || exit 1
fi

timeout 180 ./dev/cuda/test_omni_bin > "$LOG_DIR/test_omni.log" 2>&1
test_status=$?
bench_status=0
if [ "${SKIP_BENCH:-0}" != "1" ]; then
    timeout 180 ./dev/cuda/bench_omni_bin > "$LOG_DIR/bench_omni.log" 2>&1
    bench_status=$?
fi

echo "==== test_omni (failed checks, then totals; full log: $LOG_DIR/test_omni.log) ===="
grep -E "FAIL|error|ERROR" "$LOG_DIR/test_omni.log" | head -40
grep -E "^== summary|TEST_OMNI" "$LOG_DIR/test_omni.log"
if [ "${SKIP_BENCH:-0}" != "1" ]; then
    echo "==== bench_omni (full log: $LOG_DIR/bench_omni.log) ===="
    grep -E "^bench_omni|copy of 1 GiB|active experts" "$LOG_DIR/bench_omni.log"
    sed -n '/^== summary/,$p' "$LOG_DIR/bench_omni.log"
    [ $bench_status -ne 0 ] && { echo "bench_omni exited with $bench_status"; tail -5 "$LOG_DIR/bench_omni.log"; }
fi
echo "==== result: test_omni $([ $test_status -eq 0 ] && echo PASSED || echo FAILED), bench exit $bench_status ===="
[ $test_status -eq 0 ] && [ $bench_status -eq 0 ]
