#!/usr/bin/env bash
# multi_gpu_runs.sh - the runs of the multi-GPU issue in one command, on one host with 2 or more
# GPUs (NCCL_NVLS_ENABLE=0 always). Logs under $OUT (default /tmp/omnimoe_multi_gpu); a summary last.
#
#   bash scripts/multi_gpu_runs.sh            builds ./train_omnimoe first (SKIP_BUILD=1 to skip)
#   ITEMS="1" bash scripts/multi_gpu_runs.sh  only the items listed (default "1 2 3 4"): one item
#                                             per call where a launcher limits a command's time
#
#   1. scripts/test_multi_gpu.sh on 2 GPUs: every check, (g) ZeRO-1 against the replicated path,
#      bitwise resume from its sharded checkpoint, resume on another GPU count, (i) the
#      column-sharded expert tables (--shard-experts 1) likewise
#   2. scaling of d12 omni (N=16,384) and swiglu on 1, 2 and 4 GPUs (as many as there are), B=8,
#      T=1024, --overlap-comm 1: replicated, then --zero 1 (scripts/bench_scaling.sh)
#   3. the memory plan of d12 N=1,048,576 at B=16 on the GPUs there are, in each mode (--plan),
#      beside the peak memory a ZeRO-1 run at N=16,384 used (nvidia-smi)
#   4. with 4 or more GPUs: the million-expert run (issue 16): d12 omni, N=1,048,576, B=16, T=1024,
#      --shard-experts 1 on 4 GPUs, 200 steps; its loss must fall, and its peak memory per GPU
#      (nvidia-smi) is printed beside its --plan (docs/sharding.md §1.3: 85.6 GiB per GPU)
# Not in it yet: the sharded tables' scaling (bench_scaling.sh with --shard-experts 1).
set -uo pipefail
export NCCL_NVLS_ENABLE=0
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/omnimoe_multi_gpu}
mkdir -p "$OUT"
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$ngpu" -lt 2 ]; then echo "multi_gpu_runs: needs 2 or more GPUs, found $ngpu"; exit 1; fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    make -j"$(nproc)" train_omnimoe > "$OUT/build.log" 2>&1 || { tail -n 20 "$OUT/build.log"; echo "FAIL: build"; exit 1; }
fi
gpus="1 2"; [ "$ngpu" -ge 4 ] && gpus="1 2 4"
ITEMS=${ITEMS:-1 2 3 4}
want() { [[ " $ITEMS " == *" $1 "* ]]; }  # want <item>: is it in $ITEMS
summary=()
step() {  # step <name> <command...>: runs it, logs to $OUT/<name>.log, records PASS/FAIL
    local name=$1; shift
    local t0=$(date +%s)
    if "$@" > "$OUT/$name.log" 2>&1; then s=PASS; else s="FAIL(rc=$?)"; fi
    summary+=("$(printf '%-26s %-10s %5ss' "$name" "$s" $(( $(date +%s) - t0 )))")
    tail -n 15 "$OUT/$name.log"
}
if want 1; then
    step test_multi_gpu env SKIP_BUILD=1 bash scripts/test_multi_gpu.sh
fi
if want 2; then
    step scaling_replicated env SKIP_BUILD=1 GPUS="$gpus" OVERLAP=1 BENCH_DIR="$OUT/scaling_replicated" \
        bash scripts/bench_scaling.sh
    step scaling_zero1 env SKIP_BUILD=1 GPUS="$gpus" OVERLAP=1 EXTRA="--zero 1" BENCH_DIR="$OUT/scaling_zero1" \
        bash scripts/bench_scaling.sh
fi
if want 3; then
    for p in $gpus; do  # gpus starts at 1
        for mode in "" "--zero 1"; do
            ./train_omnimoe --plan "$p" -e d12 -f omni --experts 1048576 -b 16 -t 1024 $mode >> "$OUT/plan.log" 2>&1
        done
    done
    # peak memory of a ZeRO-1 run next to its plan (printed at its start)
    ( nvidia-smi --query-gpu=index,memory.used --format=csv,noheader -lms 500 > "$OUT/zero1_memory.csv" ) &
    smi=$!
    step zero1_memory scripts/run_multi_gpu.sh 2 -e d12 -f omni -b 8 -t 1024 -x 20 --val-data= -v 0 -s 0 --zero 1
    kill "$smi" 2>/dev/null
fi
# 4. a million experts on 4 GPUs (19.5B parameters; each rank draws only its local layout on the
# host at init, 30 GB each: docs/sharding.md §3.4)
if want 4 && [ "$ngpu" -ge 4 ]; then
    MILLION=(-e d12 -f omni --experts 1048576 -b 16 -t 1024 -d 65536 --shard-experts 1)
    ./train_omnimoe --plan 4 "${MILLION[@]}" > "$OUT/million_plan.log" 2>&1
    ( nvidia-smi --query-gpu=index,memory.used --format=csv,noheader -lms 1000 > "$OUT/million_memory.csv" ) &
    smi=$!
    step million_experts env CUDA_VISIBLE_DEVICES=0,1,2,3 scripts/run_multi_gpu.sh 4 "${MILLION[@]}" -x 200 \
        --val-data= -v 0 -s 0 --log-file "$OUT/million.jsonl"
    kill "$smi" 2>/dev/null
    step million_loss_falls python3 -c "
import json, sys
t = [json.loads(l) for l in open('$OUT/million.jsonl') if '\"type\":\"train\"' in l]
first, last = sum(r['loss'] for r in t[:10]) / 10, sum(r['loss'] for r in t[-10:]) / 10
print(f'{len(t)} steps, mean loss of the first 10 {first:.4f}, of the last 10 {last:.4f}')
sys.exit(0 if len(t) >= 200 and last < first - 0.5 else 1)"
fi
echo "================ summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x $ngpu)"
for s in "${summary[@]}"; do echo "$s"; done
if want 2; then
    for d in scaling_replicated scaling_zero1; do sed -n '/^| model |/,$p' "$OUT/$d.log"; done
fi
if want 3; then
    echo "peak MiB per GPU in the --zero 1 run: $(sort -t, -k2 -n "$OUT/zero1_memory.csv" 2>/dev/null | tail -1)"
fi
if want 4 && [ "$ngpu" -ge 4 ]; then
    echo "million experts: peak MiB per GPU (index, MiB) $(sort -t, -k2 -n "$OUT/million_memory.csv" 2>/dev/null | tail -1);" \
         "plan: $(grep -E '^  total' "$OUT/million_plan.log")"
fi
