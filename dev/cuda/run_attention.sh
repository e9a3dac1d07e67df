#!/bin/bash
# run_attention.sh - builds and runs every test and benchmark of llmc/attention.cuh on the GPU
# machine, then prints a summary table last.
#   1. build test_attention (bf16, tensor-core kernels) and test_attention_fp32 (-DENABLE_FP32)
#      with the Makefile (its flags): dev/cuda/test_attention_bin and test_attention_fp32_bin
#   2. --bad-shape must fail with a clear message
#   3. fp32 build: --quick checks
#   4. bf16 build: all checks + GPT-2-shape benchmark
#   5. PyTorch SDPA (flash / cudnn / efficient / math) at the same shape
#   6. compute-sanitizer memcheck, racecheck, synccheck on --tiny (if the tool exists and time allows)
# Logs go to $OUT (if set) or /tmp. Exit status is non-zero if any step failed.
set -u
cd "$(dirname "$0")/../.."
LOG_DIR=${OUT:-/tmp}
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/attention_log.txt"
: > "$LOG"
STATUS=()
fail=0
step() {  # step NAME COMMAND... : runs, logs, records PASS/FAIL
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$LOG"
    if "$@" 2>&1 | tee -a "$LOG"; then STATUS+=("PASS  $name"); else STATUS+=("FAIL  $name"); fail=1; fi
}
set -o pipefail

BIN=dev/cuda/test_attention_bin
BIN32=dev/cuda/test_attention_fp32_bin
if make -s -j2 "$BIN" "$BIN32" > "$LOG_DIR/attention_build.txt" 2>&1
then STATUS+=("PASS  build bf16 + fp32 (make)"); else STATUS+=("FAIL  build (make)"); fail=1; fi
cat "$LOG_DIR/attention_build.txt" | tee -a "$LOG"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>&1 | tee -a "$LOG"

if [ -x "$BIN" ]; then
    echo "=== bad shape (must exit non-zero with a message)" | tee -a "$LOG"
    "$BIN" --bad-shape > "$LOG_DIR/attention_bad.txt" 2>&1
    rc=$?
    cat "$LOG_DIR/attention_bad.txt" | tee -a "$LOG"
    if [ $rc -ne 0 ] && grep -q "head size" "$LOG_DIR/attention_bad.txt"; then STATUS+=("PASS  bad shape rejected (rc=$rc)")
    else STATUS+=("FAIL  bad shape not rejected (rc=$rc)"); fail=1; fi

fi
[ -x "$BIN32" ] && step "fp32 checks (--quick)" "$BIN32" --quick
[ -x "$BIN" ] && step "bf16 checks + benchmark" "$BIN"
PEAK_TFLOPS=$(grep -m1 -o "^peak bf16 [0-9.e+]*" "$LOG" | awk '{print $3}')  # test_attention's table value
step "pytorch sdpa" env PYTHONUNBUFFERED=1 PEAK_TFLOPS="${PEAK_TFLOPS:-0}" python3 dev/cuda/bench_attention_torch.py
# sanitizers last (slow); skipped when the run is already long (SANITIZE_BUDGET_S, default 200 s)
if [ -x "$BIN" ] && command -v compute-sanitizer > /dev/null; then
    if [ $SECONDS -lt ${SANITIZE_BUDGET_S:-200} ]; then
        step "memcheck --tiny" timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN" --tiny
        step "racecheck --tiny" timeout 60 compute-sanitizer --tool racecheck --error-exitcode 9 "$BIN" --tiny
        step "synccheck --tiny" timeout 40 compute-sanitizer --tool synccheck --error-exitcode 9 "$BIN" --tiny
    else
        STATUS+=("SKIP  compute-sanitizer (run already ${SECONDS}s)")
    fi
else
    STATUS+=("SKIP  compute-sanitizer not found")
fi

echo
echo "==================== attention summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)) ===================="
for s in "${STATUS[@]}"; do echo "$s"; done
grep -h "^FAIL " "$LOG"
grep -h -E "^test_attention(_fp32)?: [0-9]+ passed" "$LOG"
grep -h "^SUMMARY" "$LOG" | sed 's/^SUMMARY //'
exit $fail
