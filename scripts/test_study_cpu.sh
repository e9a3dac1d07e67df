#!/usr/bin/env bash
# The dense-vs-OmniMoE recipe (scripts/compare_dense_omni.sh) end to end with the CPU trainer at
# the tiny preset, all six rows (swiglu omni gelu omni_big moe moepp) for 4 steps on the committed
# tinyshakespeare shards: every run exits 0, writes its JSONL log with the evaluations (steps 0, 2, 4), and gets a
# summary line with parameter counts and validation losses; the rows' active parameters agree
# within 2% (the recipe's equal-active-size premise; llmc/config.h picks the widths). A bad data
# folder is refused with a message. The GPU runs of the recipe: dev/gpu_check.sh study.
# One PASS/FAIL line per check (scripts/hostile_lib.sh), then "test_study_cpu: N passed, N failed".
set -uo pipefail
HOSTILE_WORK=$(mktemp -d /tmp/test_study_cpu.XXXXXX)
trap 'rm -rf "$HOSTILE_WORK"' EXIT
source scripts/hostile_lib.sh
work=$HOSTILE_WORK
trainer=$PWD/train_omnimoe_cpu
check "CPU trainer built" [ -x "$trainer" ]
# the recipe reads *_train_*.bin and *_val_*.bin
mkdir -p "$work/data"
ln -s "$PWD/data/tinyshakespeare/tiny_shakespeare_train.bin" "$work/data/ts_train_000.bin"
ln -s "$PWD/data/tinyshakespeare/tiny_shakespeare_val.bin" "$work/data/ts_val_000.bin"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
expect_ok "six runs of the recipe at -e tiny" "=== moepp" -- env TRAINER="$trainer" PRESET=tiny B=2 T=32 STEPS=4 \
    WARMUP=1 VAL_EVERY=2 VAL_BATCHES=1 BIG_EXPERTS=256 bash scripts/compare_dense_omni.sh "$work/data" "$work/out"
for run in swiglu omni gelu omni_big moe moepp; do
    check "$run: evaluations at steps 0, 2 and 4 in its log" [ "$(grep -c '"type":"eval"' "$work/out/$run/log.jsonl" 2>/dev/null)" = 3 ]
done
check "summary: six rows with parameter counts and losses, active parameters within 2%" python3 - "$work/out/summary.txt" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip() and not l.startswith("#")]
names = [r[0] for r in rows]
assert names == ["swiglu", "omni", "gelu", "omni_big", "moe", "moepp"], names
active = [int(r[2]) for r in rows]
assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows), rows
assert max(active) <= 1.02 * min(active), active
PY
expect_fail "a data folder without shards is refused" "must hold \*_train_\*.bin" -- \
    env TRAINER="$trainer" bash scripts/compare_dense_omni.sh "$work" "$work/out2"
hostile_summary test_study_cpu
