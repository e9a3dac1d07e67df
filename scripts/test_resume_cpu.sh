#!/usr/bin/env bash
# The CPU reference trainer end to end (main() is compiled out of the C tests): 6 straight steps
# against 3 steps + resume + 3 steps must give bitwise identical log lines (loss, norm, lr,
# val loss), and the run must write its checkpoints and model.bin. A constant schedule keeps
# the learning rate independent of -x. Run from the repository root (make test does).
# One PASS/FAIL line per check, then "test_resume_cpu: N passed, N failed"; exit 1 on any FAIL.
# The CUDA trainer runs the same checks: TRAINER=./train_omnimoe RESUME_MODEL=small (its attention
# needs a head size of 32, 64 or 128). RESUME_FFN="moe --moepp 1 --moe-bias-rate 0.001" runs them on the
# moe FFN with the MoE++ experts and the loss-free bias (the bias is saved with the weights).
set -uo pipefail
bin=${TRAINER:-./train_omnimoe_cpu}
passed=0
failed=0
check() {  # check <name> <detail> <command...>: PASS when the command succeeds
    local name=$1 detail=$2
    shift 2
    if "$@"; then echo "PASS $name"; passed=$((passed + 1)); else echo "FAIL $name: $detail"; failed=$((failed + 1)); fi
}
finish() {
    echo "test_resume_cpu: $passed passed, $failed failed"
    [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
    exit $?
}
check "trainer built" "$bin missing (make train_omnimoe_cpu)" [ -x "$bin" ] || finish
work=$(mktemp -d /tmp/test_resume_cpu.XXXXXX)
trap 'rm -rf "$work"' EXIT
flags=(-e ${RESUME_MODEL:-tiny} -f ${RESUME_FFN:-omni} -b 2 -t 32 -l 1e-3 -u 1 --schedule constant -v 2 -m 2 -s 0 --seed 5 -n 3)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"$bin" "${flags[@]}" -x 6 -o "$work/straight" > "$work/straight.txt" 2>&1; rc=$?
check "6 straight steps run" "exit status $rc: $(tail -n 1 "$work/straight.txt")" [ $rc -eq 0 ]
"$bin" "${flags[@]}" -x 3 -o "$work/resumed" > "$work/first.txt" 2>&1; rc=$?
check "3 steps run" "exit status $rc: $(tail -n 1 "$work/first.txt")" [ $rc -eq 0 ]
"$bin" "${flags[@]}" -x 6 -o "$work/resumed" -y 1 > "$work/second.txt" 2>&1; rc=$?
check "3 more steps after resume run" "exit status $rc: $(tail -n 1 "$work/second.txt")" [ $rc -eq 0 ]
for f in straight/ckpt_00000006.bin straight/model.bin resumed/ckpt_00000003.bin resumed/ckpt_00000006.bin; do
    check "$f written" "missing or empty" [ -s "$work/$f" ]
done
check "resume from step 3" "no 'resumed from ...ckpt_00000003.bin' in the output" \
    grep -q "resumed from .*ckpt_00000003.bin" "$work/second.txt"
compare=$(python3 scripts/compare_logs.py "$work/straight/log.jsonl" "$work/resumed/log.jsonl" --exact 2>&1 | tail -n 1); rc=$?
check "6 straight steps == 3 + resume + 3 (bitwise log lines)" "compare_logs.py: $compare" [ $rc -eq 0 ]
echo "    compare_logs.py: $compare"
check "step-6 checkpoints byte-identical" "step-6 checkpoints differ" \
    cmp -s "$work/straight/ckpt_00000006.bin" "$work/resumed/ckpt_00000006.bin"
finish
