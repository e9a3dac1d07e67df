#!/usr/bin/env bash
# run_std.sh - build and run the standard-kernel tests (matmul, layernorm, encoder,
# activations, classifier, adamw, global_norm), each in a bf16 build (tolerance 1e-2, plus
# benchmarks) and an -DENABLE_FP32 build (tolerance 1e-5, no benchmarks), then print a
# summary table last.
#
# usage: dev/cuda/run_std.sh            build (in parallel) into dev/cuda/build_std/, run all
#        SKIP_BUILD=1 dev/cuda/run_std.sh   run binaries already in dev/cuda/build_std/
#        TESTS="matmul adamw" dev/cuda/run_std.sh   only these
# Exit status: 0 when every build and every test passed.
set -u
cd "$(dirname "$0")/../.."
BUILD_DIR=dev/cuda/build_std
NVCC_FLAGS="-O3 -std=c++17 -arch=sm_90 -Xcompiler -Wall,-Wextra"
LIBS="-lcublasLt -lcublas"
TESTS=${TESTS:-"matmul layernorm encoder activations classifier adamw global_norm"}
mkdir -p "$BUILD_DIR"

status=0
if [ "${SKIP_BUILD:-0}" != "1" ]; then
    echo "building into $BUILD_DIR ..."
    pids=""
    for t in $TESTS; do
        nvcc $NVCC_FLAGS "dev/cuda/test_$t.cu" -o "$BUILD_DIR/test_$t" $LIBS > "$BUILD_DIR/build_$t.log" 2>&1 &
        pids="$pids $!"
        nvcc $NVCC_FLAGS -DENABLE_FP32 "dev/cuda/test_$t.cu" -o "$BUILD_DIR/test_${t}_fp32" $LIBS \
            > "$BUILD_DIR/build_${t}_fp32.log" 2>&1 &
        pids="$pids $!"
    done
    for p in $pids; do wait "$p" || status=1; done
    for f in "$BUILD_DIR"/build_*.log; do
        if [ -s "$f" ]; then echo "--- $f"; cat "$f"; fi
    done
    if [ $status -ne 0 ]; then echo "BUILD FAILED"; exit 1; fi
fi

summary=""
for t in $TESTS; do
    for variant in "" "_fp32"; do
        bin="$BUILD_DIR/test_${t}${variant}"
        echo "================================================ $bin"
        if [ ! -x "$bin" ]; then
            summary="${summary}SUMMARY| ${t}${variant} | missing binary\n"
            status=1
            continue
        fi
        start=$(date +%s.%N)
        out=$(timeout "${TEST_TIMEOUT:-150}" "$bin" 2>&1)
        rc=$?
        end=$(date +%s.%N)
        echo "$out"
        line=$(echo "$out" | grep '^SUMMARY|' | tail -1)
        if [ -z "$line" ]; then line="SUMMARY| ${t}${variant} | CRASHED (exit $rc, no summary line)"; fi
        secs=$(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.1f", b-a}')
        summary="${summary}${line} | ${secs}s\n"
        if [ $rc -ne 0 ]; then status=1; fi
    done
done

echo
echo "================================ standard kernels: summary"
echo "        test             | type   | ok   | checks     | performance | wall"
printf "%b" "$summary"
if [ $status -eq 0 ]; then echo "ALL PASSED"; else echo "SOME FAILED"; fi
exit $status
