#!/bin/bash
# Builds (make, the Makefile's flags) and runs the OmniMoE layer test and benchmark
# (llmc/omnimoe_layer.cuh and its router / scheduler / experts). Run from anywhere; needs a GPU.
#   dev/cuda/run_omni.sh            build, test, benchmark
#   SKIP_BENCH=1 dev/cuda/run_omni.sh   tests only
#   SKIP_BUILD=1 dev/cuda/run_omni.sh   run binaries built beforehand (make dev/cuda/test_omni_bin ...)
# Logs go to $LOG_DIR (default: $OUT if set, else /tmp). The summary is printed last.
set -u
cd "$(dirname "$0")/../.."
LOG_DIR="${LOG_DIR:-${OUT:-/tmp}}"
mkdir -p "$LOG_DIR"
if [ "${SKIP_BUILD:-0}" != "1" ]; then  # SKIP_BUILD=1: use binaries built beforehand
    # the Makefile's flags (sm_90a, NCCL/MPI as detected)
    if ! make -j2 dev/cuda/test_omni_bin dev/cuda/bench_omni_bin > "$LOG_DIR/build_omni.log" 2>&1; then
        echo "BUILD FAILED (log: $LOG_DIR/build_omni.log)"
        tail -20 "$LOG_DIR/build_omni.log"
        exit 1
    fi
fi

timeout 180 ./dev/cuda/test_omni_bin > "$LOG_DIR/test_omni.log" 2>&1
test_status=$?
bench_status=0
if [ "${SKIP_BENCH:-0}" != "1" ]; then
    timeout 180 ./dev/cuda/bench_omni_bin > "$LOG_DIR/bench_omni.log" 2>&1
    bench_status=$?
fi

echo "==== test_omni (failed checks, then totals; full log: $LOG_DIR/test_omni.log) ===="
grep -E "^FAIL|error|ERROR" "$LOG_DIR/test_omni.log" | head -40
grep -E "^test_omni:" "$LOG_DIR/test_omni.log"
if [ "${SKIP_BENCH:-0}" != "1" ]; then
    echo "==== bench_omni (full log: $LOG_DIR/bench_omni.log) ===="
    grep -E "^bench_omni|copy of 1 GiB|active experts" "$LOG_DIR/bench_omni.log"
    sed -n '/^== summary/,$p' "$LOG_DIR/bench_omni.log"
    [ $bench_status -ne 0 ] && { echo "bench_omni exited with $bench_status"; tail -5 "$LOG_DIR/bench_omni.log"; }
fi
echo "==== result: test_omni $([ $test_status -eq 0 ] && echo PASSED || echo FAILED), bench exit $bench_status ===="
[ $test_status -eq 0 ] && [ $bench_status -eq 0 ]
