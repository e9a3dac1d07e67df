#!/usr/bin/env bash
# profile_step.sh - where a training step's GPU time goes: every kernel of a short trainer run
# timed by Nsight Compute (one metric, gpu__time_duration, no cache flush, clocks untouched),
# summed per kernel name and per step, next to the trainer's own ms/step (the difference is
# time the GPU waited for the host). Needs ncu (the device machine has it).
#
#   bash dev/profile_step.sh "-e d12 -f omni -b 8" ["-e d12 -f swiglu -b 8" ...]
#
# Each argument is one configuration (trainer flags); each runs STEPS=2 steps on the committed
# tinyshakespeare shard without evaluation, sampling or checkpoints. Tables go to stdout; the raw
# CSV to $OUT/profile_<n>.csv when OUT is set.
set -u
cd "$(dirname "$0")/.."
STEPS=${STEPS:-2}
D=${OUT:-/tmp/omnimoe_profile}
mkdir -p "$D"
if [ "${SKIP_BUILD:-0}" != 1 ]; then make train_omnimoe >"$D/profile_build.log" 2>&1 || { tail "$D/profile_build.log"; exit 1; }; fi
n=0
for flags in "$@"; do
    n=$((n + 1))
    echo "== profile $n: ./train_omnimoe $flags (steps 1-$STEPS)"
    # the trainer's own step times, without the profiler
    ./train_omnimoe $flags -x $((STEPS + 8)) -v 0 -s 0 -m -1 --val-data= > "$D/profile_${n}_plain.out" 2>&1
    grep "^step" "$D/profile_${n}_plain.out" | tail -n 3 | cut -c1-110
    timeout 200 ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
        ./train_omnimoe $flags -x "$STEPS" -v 0 -s 0 -m -1 --val-data= > "$D/profile_$n.csv" 2> "$D/profile_${n}_ncu.err"
    python3 dev/ncu_table.py "$D/profile_$n.csv" "$STEPS" step
done
