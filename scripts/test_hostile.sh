#!/usr/bin/env bash
# The hostile-input sweep: the trainer given bad shards, flags, model files, checkpoints, a full
# disk and other careless or hostile input must refuse with one clear message naming the flag or
# file (non-zero exit), or behave correctly; files saved before must stay intact.
#   bash scripts/test_hostile.sh                              the CPU trainer (make test_cpu runs it)
#   TRAINER=./train_omnimoe bash scripts/test_hostile.sh      the CUDA trainer (dev/gpu_check.sh)
# Cases live in scripts/hostile_cases_*.sh (input: data, flags, files; run: signals, output
# directories, resume; features: what came later, --mc-eval and its tools, moe, --plan), sourced
# in that order (HOSTILE_CASES="scripts/hostile_cases_features.sh" runs some of them); helpers in
# scripts/hostile_lib.sh. The cases use the tiny preset on the CPU trainer (20-90 s on 2 cores)
# and small on the CUDA trainer (its attention needs a head size of 32, 64 or 128). Case list and outcomes: docs/hostile_sweep.md.
# Ends with "hostile: N passed, N failed"; exits 1 when a case failed.
set -u
cd "$(dirname "$0")/.."
source scripts/hostile_lib.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if [ ! -x "$TRAINER" ]; then
    echo "FAIL test_hostile: $TRAINER not built (make ${TRAINER#./})"
    echo "hostile: 0 passed, 1 failed"
    exit 1
fi
HOSTILE_WORK=$(mktemp -d /tmp/test_hostile.XXXXXX)
hostile_mounts=()  # tmpfs mounts made by cases (full-disk cases); unmounted before the folder goes
hostile_cleanup() {
    for m in "${hostile_mounts[@]+"${hostile_mounts[@]}"}"; do umount "$m" 2>/dev/null; done
    rm -rf "$HOSTILE_WORK"
}
trap hostile_cleanup EXIT
echo "hostile: trainer $TRAINER, scratch $HOSTILE_WORK"
t0=$(date +%s)
for cases in ${HOSTILE_CASES:-scripts/hostile_cases_input.sh scripts/hostile_cases_run.sh scripts/hostile_cases_features.sh}; do
    if [ -f "$cases" ]; then
        echo "---- $cases"
        source "$cases"
    fi
done
echo "hostile: $(( $(date +%s) - t0 )) s"
hostile_summary hostile
