#!/usr/bin/env bash
# One device call: build the CUDA trainer and its test (bf16 and fp32), run the GPU tests, run a
# short training of the default model, and print a summary last. Logs go to $OUT when set.
#   bash dev/gpu_check.sh [quick|full]      (quick: no training run)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/omnimoe_out}
mkdir -p "$OUT"
mode=${1:-full}
summary=()
run() {  # name, command...
    local name=$1; shift
    local t0=$(date +%s)
    if "$@" > "$OUT/$name.log" 2>&1; then status=PASS; else status="FAIL(rc=$?)"; fi
    summary+=("$(printf '%-28s %-10s %4ss' "$name" "$status" $(( $(date +%s) - t0 )))")
    tail -n 40 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
run build make -j3 train_omnimoe test_omnimoe test_omnimoe_fp32
run test_bf16 ./test_omnimoe
run test_fp32 ./test_omnimoe_fp32
if [ "$mode" = full ]; then
    run train_default ./train_omnimoe -x 20 -v 10 -s 20 -g 32
fi
echo "================ summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"
grep -h "test_omnimoe:" "$OUT"/test_*.log 2>/dev/null
grep -h "^FAIL" "$OUT"/test_*.log 2>/dev/null | head -20
for s in "${summary[@]}"; do echo "$s"; done
