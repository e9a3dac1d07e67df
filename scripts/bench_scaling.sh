#!/usr/bin/env bash
# bench_scaling.sh - data-parallel scaling: training tok/s on 1, 2 and 4 GPUs (issue 5).
#
#   scripts/bench_scaling.sh                    # builds ./train_omnimoe first (SKIP_BUILD=1 to skip)
#   GPUS="1 2" MODELS="swiglu" B=8 STEPS=40 scripts/bench_scaling.sh
#   OVERLAP="0 1" scripts/bench_scaling.sh     # both gradient all-reduce modes on 2 and 4 GPUs
#   EXTRA="--zero 1" scripts/bench_scaling.sh  # more trainer flags for every run (e.g. ZeRO-1)
#
# Each run: d12 with the given FFN (swiglu = dense baseline, omni = OmniMoE), B x T = 8 x 1024
# tokens per GPU and step (fixed per GPU: the global batch grows with G, no grad accumulation),
# STEPS steps, no evaluation or sampling; tok/s of a step counts all GPUs' tokens. The number is
# the median over steps SKIP+1..STEPS (the first steps warm up cuBLAS, NCCL and the caches).
# efficiency(G) = tok/s(G) / (G * tok/s(1)). Launch: scripts/run_multi_gpu.sh (mpirun when the
# binary has MPI, else the id-file launch). Prints a markdown table last; logs under $BENCH_DIR.
# OVERLAP: the --overlap-comm values to run on more than one GPU (0 = the all-reduce after the
# backward, 1 = overlapped with it; a list runs each); one GPU has no all-reduce and runs once.
# With both, the loss and norm lines of the two modes are compared bit for bit (PASS/FAIL last).
set -u
export NCCL_NVLS_ENABLE=0   # never NVLink multicast (house rule)
cd "$(dirname "$0")/.."
GPUS=${GPUS:-1 2 4}
MODELS=${MODELS:-swiglu omni}
B=${B:-8}
T=${T:-1024}
STEPS=${STEPS:-40}
SKIP=${SKIP:-10}
OVERLAP=${OVERLAP:-0}
EXTRA=${EXTRA:-}
D=${BENCH_DIR:-/tmp/omnimoe_bench_scaling}
rm -rf "$D"
mkdir -p "$D"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    make train_omnimoe >"$D/build.log" 2>&1 || { cat "$D/build.log"; echo "FAIL: build"; exit 1; }
fi
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "card: $card x $ngpu; B=$B T=$T per GPU; $STEPS steps, median of steps $((SKIP + 1))-$STEPS; overlap-comm: $OVERLAP; extra flags: ${EXTRA:-none}"

median_tok_s() {  # median_tok_s <log.jsonl>
    python3 - "$1" "$SKIP" <<'EOF'
import json, sys
path, skip = sys.argv[1], int(sys.argv[2])
vals = sorted(r["tok_s"] for r in map(json.loads, open(path)) if r.get("type") == "train" and r["step"] > skip)
print("%.1f %d" % (vals[len(vals) // 2] if vals else 0.0, len(vals)))
EOF
}

overlaps_of() {  # overlaps_of <G>: the --overlap-comm values to run ("-": one GPU, no all-reduce)
    if [ "$1" -eq 1 ]; then echo "-"; else echo "$OVERLAP"; fi
}
declare -A TOKS
for model in $MODELS; do
    for g in $GPUS; do
        if [ "$g" -gt "$ngpu" ]; then echo "skip $model G=$g: only $ngpu GPUs"; continue; fi
        for ov in $(overlaps_of "$g"); do
            name="${model}_g${g}"
            flags=()
            if [ "$ov" != "-" ]; then name="${name}_ov${ov}"; flags=(--overlap-comm "$ov"); fi
            start=$(date +%s)
            timeout 300 scripts/run_multi_gpu.sh "$g" -e d12 -f "$model" -b "$B" -t "$T" -x "$STEPS" -u 10 --val-data= \
                -v 0 -s 0 "${flags[@]}" $EXTRA --log-file "$D/$name.jsonl" >"$D/$name.out" 2>&1
            rc=$?
            if [ "$rc" -ne 0 ] || [ ! -s "$D/$name.jsonl" ]; then
                echo "FAIL: $name exited $rc"
                tail -n 5 "$D/$name.out"
                continue
            fi
            read -r toks n <<<"$(median_tok_s "$D/$name.jsonl")"
            TOKS[$name]=$toks
            ms=$(python3 -c "print('%.2f' % (1000.0 * $g * $B * $T / $toks))")
            echo "$name: median $toks tok/s over $n steps (${ms} ms/step), run took $(( $(date +%s) - start )) s"
        done
    done
done

echo
echo "| model | GPUs | overlap-comm | tok/s (all GPUs) | tok/s per GPU | ms/step | efficiency |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for model in $MODELS; do
    base=${TOKS[${model}_g1]:-}
    for g in $GPUS; do
        for ov in $(overlaps_of "$g"); do
            name="${model}_g${g}"
            if [ "$ov" != "-" ]; then name="${name}_ov${ov}"; fi
            t=${TOKS[$name]:-}
            [ -z "$t" ] && continue
            python3 - "$model" "$g" "$ov" "$t" "${base:-0}" "$B" "$T" <<'EOF'
import sys
model, g, ov, t, base = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
B, T = int(sys.argv[6]), int(sys.argv[7])
eff = "%.3f" % (t / (g * base)) if base > 0 else "n/a"
print("| d12 %s | %d | %s | %.0f | %.0f | %.2f | %s |" % (model, g, ov, t, t / g, 1000.0 * g * B * T / t, eff))
EOF
        done
    done
done

# both --overlap-comm modes ran: they must give the same bits (same NCCL calls, launched earlier
# or later), which on 3+ GPUs is more than a 2-GPU test shows (the summation order matters there)
for model in $MODELS; do
    for g in $GPUS; do
        a="$D/${model}_g${g}_ov0.jsonl"
        b="$D/${model}_g${g}_ov1.jsonl"
        if [ "$g" -gt 1 ] && [ -s "$a" ] && [ -s "$b" ]; then
            python3 scripts/compare_logs.py "$a" "$b" --exact --label "d12 $model, $g GPUs: --overlap-comm 1 vs 0"
        fi
    done
done
