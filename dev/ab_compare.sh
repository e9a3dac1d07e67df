#!/usr/bin/env bash
# ab_compare.sh - A/B of the CUDA kernels and the trainer against another commit, both built and
# timed in ONE device call (so the ratio is measured on one card, in one run).
#
#   bash dev/ab_compare.sh prepare <commit>     here (needs git): writes carry/ab_base/ with that
#                                               commit's llmc/, train_omnimoe.cu and dev/cuda/bench_*.cu
#   bash dev/ab_compare.sh run                  on the device, carry=["carry"]: builds base and
#                                               current, runs them interleaved, prints a table last
#   FFN="omni swiglu" B=32 STEPS=30 ...         trainer runs (default: omni only, B=32, 30 steps)
#
# The base sources sit in carry/ab_base/ beside their own llmc/: a quoted #include "llmc/x.cuh"
# is looked up first in the including file's directory, so the base trainer and benches compile
# against the base headers, the current ones against ./llmc. Timings: bench_omni and bench_layer
# rows (medians of CUDA-graph replays), and the trainer's median ms/step over steps 11..STEPS,
# base and current alternated twice. "same bits" says whether both trainers logged identical
# losses (a change meant to be exact must say yes).
set -u
cd "$(dirname "$0")/.."
BASE=carry/ab_base
mode=${1:-}

if [ "$mode" = prepare ]; then
    commit=${2:?usage: dev/ab_compare.sh prepare <commit>}
    git rev-parse --verify -q "$commit^{commit}" > /dev/null || { echo "ab_compare: $commit is not a commit"; exit 1; }
    rm -rf "$BASE"
    mkdir -p "$BASE/dev/cuda"
    git archive "$commit" llmc train_omnimoe.cu | tar -x -C "$BASE"
    for f in bench_omni.cu bench_layer.cu; do git show "$commit:dev/cuda/$f" > "$BASE/dev/cuda/$f"; done
    echo "$commit $(git log -1 --format=%s "$commit")" > "$BASE/COMMIT"
    echo "ab_compare: base = $(cat "$BASE/COMMIT") in $BASE (carry it: carry=[\"carry\"])"
    exit 0
fi
if [ "$mode" != run ]; then sed -n 2,17p "$0"; exit 2; fi
if [ ! -f "$BASE/COMMIT" ]; then echo "ab_compare: $BASE missing: run 'bash dev/ab_compare.sh prepare <commit>' here first"; exit 1; fi

OUT=${OUT:-/tmp/ab_compare}
BIN=/tmp/ab_compare_bin   # binaries outside $OUT: only the logs come back
mkdir -p "$OUT" "$BIN"
FFN=${FFN:-omni}
B=${B:-32}
STEPS=${STEPS:-30}
F="-O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Xcompiler -Wall"
[ -f carry/include/xxhash.h ] && F="$F -Icarry/include"   # xxHash header where the system has none
L="-lcublasLt -lcublas"
echo "ab_compare on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1): base = $(cat "$BASE/COMMIT")"
for side in base cur; do
    if [ $side = base ]; then root=$BASE; inc="-I$BASE -I."; else root=.; inc="-I."; fi
    nvcc $F $inc "$root/dev/cuda/bench_omni.cu" -o "$BIN/bench_omni_$side" $L > "$OUT/build_omni_$side.log" 2>&1 &
    nvcc $F $inc "$root/dev/cuda/bench_layer.cu" -o "$BIN/bench_layer_$side" $L > "$OUT/build_layer_$side.log" 2>&1 &
    nvcc $F -DMULTI_GPU -I. "$root/train_omnimoe.cu" -o "$BIN/train_$side" $L -lnccl > "$OUT/build_train_$side.log" 2>&1 &
done
wait
for f in "$OUT"/build_*.log; do grep -q -i "error" "$f" && { echo "ab_compare: build failed: $f"; tail -n 20 "$f"; exit 1; }; done

for side in base cur; do
    timeout 150 "$BIN/bench_omni_$side" > "$OUT/bench_omni_$side.log" 2>&1 || echo "bench_omni $side: exit $?"
    timeout 200 "$BIN/bench_layer_$side" > "$OUT/bench_layer_$side.log" 2>&1 || echo "bench_layer $side: exit $?"
done
DATA=data/tinyshakespeare/tiny_shakespeare_train.bin
for ffn in $FFN; do
    for rep_side in base:1 cur:1 cur:2 base:2; do
        side=${rep_side%:*}; rep=${rep_side#*:}
        rm -f "$OUT/train_${ffn}_${side}_$rep.jsonl"  # a trainer refuses to overwrite another run's log
        timeout 150 "$BIN/train_$side" -e d12 -f "$ffn" -b "$B" -t 1024 -x "$STEPS" -u 10 -i "$DATA" --val-data= -v 0 -s 0 \
            --log-file "$OUT/train_${ffn}_${side}_$rep.jsonl" > "$OUT/train_${ffn}_${side}_$rep.out" 2>&1 \
            || { echo "train $ffn $side: exit $?"; tail -n 3 "$OUT/train_${ffn}_${side}_$rep.out"; }
    done
done

OUT="$OUT" FFN="$FFN" python3 - <<'EOF'
import json, os, re, statistics
out = os.environ["OUT"]
def rows(path, pattern):
    """name -> median ms from the summary rows of a bench log"""
    got = {}
    if not os.path.exists(path):
        return got
    for line in open(path):
        m = re.match(pattern, line)
        if m:
            got[m.group(1).strip()] = float(m.group(2))
    return got
tables = [("bench_omni", r"^([AB] .*?)\s{2,}([0-9.]+)\s"), ("bench_layer", r"^([^|]+)\|[^|]+\|\s*([0-9.]+)\s*\|")]
print("\n| benchmark row | base ms | current ms | current / base |")
print("|---|---:|---:|---:|")
for name, pat in tables:
    base = rows(os.path.join(out, name + "_base.log"), pat)
    cur = rows(os.path.join(out, name + "_cur.log"), pat)
    for key in base:
        if key in cur and base[key] > 0:
            print("| %s: %s | %.4f | %.4f | %.3f |" % (name, key, base[key], cur[key], cur[key] / base[key]))
print("\n| trainer d12 | base ms/step | current ms/step | current / base | same bits |")
print("|---|---:|---:|---:|---|")
for ffn in os.environ["FFN"].split():
    med, losses = {}, {}
    for side in ("base", "cur"):
        ms, ls = [], []
        for rep in (1, 2):
            path = os.path.join(out, "train_%s_%s_%d.jsonl" % (ffn, side, rep))
            if not os.path.exists(path):
                continue
            steps = [json.loads(l) for l in open(path) if '"train"' in l]
            ms += [s["ms"] for s in steps[10:]]
            ls.append([s["loss"] for s in steps])
        med[side] = statistics.median(ms) if ms else float("nan")
        losses[side] = ls
    same = bool(losses["base"]) and all(l == losses["base"][0] for l in losses["base"] + losses["cur"])
    print("| %s | %.2f | %.2f | %.3f | %s |" % (ffn, med["base"], med["cur"], med["cur"] / med["base"], "yes" if same else "no"))
EOF
(cd "$OUT" && tar czf "$BIN/ab_logs.tgz" --exclude=ab_logs.tgz . && find . -type f ! -name ab_logs.tgz -delete && mv "$BIN/ab_logs.tgz" .)
