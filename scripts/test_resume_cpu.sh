#!/usr/bin/env bash
# The CPU reference trainer end to end (main() is compiled out of the C tests): 6 straight steps
# against 3 steps + resume + 3 steps must give bitwise identical log lines (loss, norm, lr,
# val loss), and the run must write its checkpoints and model.bin. A constant schedule keeps
# the learning rate independent of -x. Run from the repository root (make test does).
set -euo pipefail
bin=./train_omnimoe_cpu
[ -x "$bin" ] || { echo "FAIL test_resume_cpu: $bin not built (make train_omnimoe_cpu)"; exit 1; }
work=$(mktemp -d /tmp/test_resume_cpu.XXXXXX)
trap 'rm -rf "$work"' EXIT
flags=(-e tiny -f omni -b 2 -t 32 -l 1e-3 -u 1 --schedule constant -v 2 -m 2 -s 0 --seed 5 -n 3)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"$bin" "${flags[@]}" -x 6 -o "$work/straight" > "$work/straight.txt" 2>&1
"$bin" "${flags[@]}" -x 3 -o "$work/resumed" > "$work/first.txt" 2>&1
"$bin" "${flags[@]}" -x 6 -o "$work/resumed" -y 1 > "$work/second.txt" 2>&1
fail=0
for f in straight/ckpt_00000006.bin straight/model.bin resumed/ckpt_00000003.bin resumed/ckpt_00000006.bin; do
    [ -s "$work/$f" ] || { echo "FAIL test_resume_cpu: $f was not written"; fail=1; }
done
grep -q "resumed from .*ckpt_00000003.bin" "$work/second.txt" || { echo "FAIL test_resume_cpu: no resume from step 3"; fail=1; }
if python3 scripts/compare_logs.py "$work/straight/log.jsonl" "$work/resumed/log.jsonl" --exact; then :; else fail=1; fi
if cmp -s "$work/straight/ckpt_00000006.bin" "$work/resumed/ckpt_00000006.bin"; then
    echo "PASS test_resume_cpu: step-6 checkpoints byte-identical"
else
    echo "FAIL test_resume_cpu: step-6 checkpoints differ"; fail=1
fi
[ $fail -eq 0 ] && echo "PASS test_resume_cpu: 6 straight steps == 3 + resume + 3 (bitwise)"
exit $fail
