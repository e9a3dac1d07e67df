#!/usr/bin/env bash
# compare_dense_omni.sh - dense vs OmniMoE on the same data, token budget, schedule and seed.
#
# Trains six models one after the other with identical data, batch, steps, learning-rate
# schedule, seed and evaluation flags; only the feed-forward layer differs:
#   swiglu    dense SwiGLU (I = 8C/3)                          ~ the same active parameters
#   omni      OmniMoE, the preset's N and k                    ~ the same active parameters
#   gelu      GPT-2's GELU MLP (4C)                            ~ the same active parameters
#   omni_big  OmniMoE with BIG_EXPERTS experts, same k and I   ~ the same active, more total
#   moe       DeepSeekMoE-style top-k MoE (docs/design.md §10)  ~ the same active parameters
#   moepp     the same with the MoE++ experts (--moepp 1)      ~ the same active (an upper bound)
# (the committed rows of docs/dense_vs_omni.md are the first four; RUNS="moe moepp" runs the
# two new ones alone, into the same OUT_DIR beside them.)
# (llmc/config.h picks the widths so active parameters per token agree within ~2%.)
#
# Usage (from anywhere; the trainer runs in the repository root):
#   make train_omnimoe
#   bash scripts/compare_dense_omni.sh DATA_DIR OUT_DIR
# DATA_DIR holds llm.c-format shards named *_train_*.bin and *_val_*.bin (dev/data/prepro.py
# `files` or `fineweb-edu` output). Each run writes OUT_DIR/<name>/log.jsonl (JSONL, see
# llmc/logger.h) and OUT_DIR/<name>/stdout.txt; OUT_DIR/summary.txt gets one line per run.
#
# Settings (environment variables; the defaults are the recipe of docs/dense_vs_omni.md):
#   PRESET=d12 B=16 T=1024 STEPS=1000 LR=6e-4 WARMUP=100 FINAL_LR_FRAC=0.1 SCHEDULE=cosine
#   VAL_EVERY=100 VAL_BATCHES=-1 SEED=42 BIG_EXPERTS=65536 RUNS="swiglu omni gelu omni_big moe moepp"
#   SAVE=0   (1 = pass -o OUT_DIR/<name>: final checkpoint + model.bin; the omni_big checkpoint
#             alone is ~16 GB, so the default writes only the logs)
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 DATA_DIR OUT_DIR   (DATA_DIR with *_train_*.bin and *_val_*.bin shards)" >&2
    exit 1
fi
DATA_DIR=$(cd "$1" 2>/dev/null && pwd) || { echo "Error: data directory \"$1\" does not exist" >&2; exit 1; }
mkdir -p "$2"
OUT_DIR=$(cd "$2" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TRAINER=${TRAINER:-$REPO/train_omnimoe}  # TRAINER=.../train_omnimoe_cpu: the CPU reference (a smoke run at a tiny preset)

PRESET=${PRESET:-d12}
B=${B:-16}
T=${T:-1024}
STEPS=${STEPS:-1000}
LR=${LR:-6e-4}
WARMUP=${WARMUP:-100}
FINAL_LR_FRAC=${FINAL_LR_FRAC:-0.1}
SCHEDULE=${SCHEDULE:-cosine}
VAL_EVERY=${VAL_EVERY:-100}
VAL_BATCHES=${VAL_BATCHES:--1}
SEED=${SEED:-42}
BIG_EXPERTS=${BIG_EXPERTS:-65536}
RUNS=${RUNS:-swiglu omni gelu omni_big moe moepp}
SAVE=${SAVE:-0}

shopt -s nullglob
train_shards=("$DATA_DIR"/*_train_*.bin)
val_shards=("$DATA_DIR"/*_val_*.bin)
shopt -u nullglob
if [ ${#train_shards[@]} -eq 0 ] || [ ${#val_shards[@]} -eq 0 ]; then
    echo "Error: $DATA_DIR must hold *_train_*.bin and *_val_*.bin shards (dev/data/prepro.py makes them)" >&2
    exit 1
fi
if [ ! -x "$TRAINER" ]; then
    echo "Error: $TRAINER not found: run 'make train_omnimoe' in $REPO first" >&2
    exit 1
fi

# the flags every run shares: same data, batch, budget, schedule, seed and evaluation
COMMON=(-e "$PRESET" -i "$DATA_DIR/*_train_*.bin" -j "$DATA_DIR/*_val_*.bin"
        -b "$B" -t "$T" -d $((B * T)) -x "$STEPS" -l "$LR" -u "$WARMUP" -q "$FINAL_LR_FRAC"
        --schedule "$SCHEDULE" --seed "$SEED" --shuffle 1 -v "$VAL_EVERY" -m "$VAL_BATCHES" -s 0)

model_flags() {
    case "$1" in
        swiglu) echo "-f swiglu" ;;
        gelu) echo "-f gelu --gelu-fusion 1" ;;  # the committed row's setting (the default became 2 after it ran)
        omni) echo "-f omni" ;;
        omni_big) echo "-f omni --experts $BIG_EXPERTS" ;;
        moe) echo "-f moe" ;;
        moepp) echo "-f moe --moepp 1" ;;
        *) echo "Error: unknown run \"$1\" in RUNS (swiglu, omni, gelu, omni_big, moe, moepp)" >&2; return 1 ;;
    esac
}

summary="$OUT_DIR/summary.txt"
{
    echo "# compare_dense_omni.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# data $DATA_DIR: ${#train_shards[@]} train shard(s), ${#val_shards[@]} val shard(s)"
    echo "# common flags: ${COMMON[*]}"
    if command -v nvidia-smi > /dev/null; then
        echo "# card: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
    fi
    printf "# %-9s %13s %13s %10s %10s %12s %8s %s\n" run total_params active_params final_val min_val median_tok_s wall_s flags
} > "$summary"

status=0
for name in $RUNS; do
    flags=$(model_flags "$name")
    run_dir="$OUT_DIR/$name"
    mkdir -p "$run_dir"
    # --overwrite 1: a rerun into the same OUT_DIR replaces the log (and checkpoints) of the last one
    out_flags=(--log-file "$run_dir/log.jsonl" --overwrite 1)
    if [ "$SAVE" = "1" ]; then out_flags=(-o "$run_dir" --overwrite 1); fi
    echo "=== $name: $TRAINER ${COMMON[*]} $flags ${out_flags[*]}"
    start=$(date +%s)
    # shellcheck disable=SC2086  # $flags is a list of words
    (cd "$REPO" && "$TRAINER" "${COMMON[@]}" $flags "${out_flags[@]}") > "$run_dir/stdout.txt" 2>&1 || {
        rc=$?
        echo "Error: run $name exited with $rc; the end of $run_dir/stdout.txt:" >&2
        tail -5 "$run_dir/stdout.txt" >&2
        status=1
    }
    wall=$(( $(date +%s) - start ))
    grep -E '^\| (model|ffn|parameters|GPU memory)|^train:|^final val' "$run_dir/stdout.txt" || true
    # one summary line from the stdout (parameter counts) and the JSONL log (losses, speed)
    python3 - "$name" "$run_dir" "$wall" "$flags" >> "$summary" <<'EOF'
import json, re, statistics, sys
name, run_dir, wall, flags = sys.argv[1:5]
total = active = "?"
for line in open(f"{run_dir}/stdout.txt", errors="replace"):
    m = re.match(r"\| parameters: total (\d+), active per token (\d+)", line)
    if m:
        total, active = m.group(1), m.group(2)
vals, toks = [], []
try:
    for line in open(f"{run_dir}/log.jsonl"):
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if e.get("type") == "eval":
            vals.append(e["val_loss"])
        elif e.get("type") == "train" and e.get("step", 0) > 10:  # skip warm-up steps
            toks.append(e["tok_s"])
except OSError:
    pass
fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"
tok = f"{statistics.median(toks):.0f}" if toks else "-"
print(f"  {name:<9s} {total:>13s} {active:>13s} {fmt(vals[-1] if vals else None):>10s} "
      f"{fmt(min(vals) if vals else None):>10s} {tok:>12s} {wall:>8s} {flags}")
EOF
    tail -1 "$summary"
done
echo
cat "$summary"
exit $status
