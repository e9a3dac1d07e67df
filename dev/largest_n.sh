#!/usr/bin/env bash
# The largest OmniMoE model that trains on one GPU (issue 18: d12, B=16, T=1024, with and without
# activation recomputation). For each -r, --plan (no GPU needed) finds the largest grid side n whose
# plan fits the card's free memory; on a GPU machine the trainer then runs 3 steps at N = n*n (and,
# if that fails, at smaller n down to 3 tries), so the result is measured, not planned.
#   bash dev/largest_n.sh [plan]      plan: only the --plan search (runs anywhere)
# (dev/gpu_check.sh largest runs it; the training needs ./train_omnimoe, the search takes
# ./train_omnimoe_cpu where that is missing: both print the same bf16 plan)
set -uo pipefail
cd "$(dirname "$0")/.."
only_plan=${1:-}
flags=(-e d12 -f omni -b 16 -t 1024)
planner=./train_omnimoe
if [ ! -x "$planner" ]; then planner=./train_omnimoe_cpu; fi
[ -x "$planner" ] || { echo "largest_n: build ./train_omnimoe or ./train_omnimoe_cpu first (make)"; exit 1; }
fits() {  # fits <n> <r>: 0 when --plan says the model fits an H200
    "$planner" --plan 1 "${flags[@]}" -r "$2" --experts $(( $1 * $1 )) 2>/dev/null \
        | grep -q "an H200 (139 GiB free): yes"
}
largest_planned() {  # largest_planned <r>: binary search over n in [2, 2048]
    local lo=2 hi=2048 mid
    while [ $lo -lt $hi ]; do
        mid=$(( (lo + hi + 1) / 2 ))
        if fits $mid "$1"; then lo=$mid; else hi=$(( mid - 1 )); fi
    done
    echo $lo
}
# the search plans for an H200; on a smaller card the training would only show that it does not fit
if [ "$only_plan" != plan ]; then
    mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
    if ! [[ "$mib" =~ ^[0-9]+$ ]] || [ "$mib" -lt 130000 ]; then
        if [[ "$mib" =~ ^[0-9]+$ ]]; then here="a GPU of $mib MiB"; else here="no GPU memory size (nvidia-smi: '${mib}')"; fi
        echo "largest_n: SKIPPED the training: it needs an H200 (141 GB); here: $here; the plan only"
        only_plan=plan
        skipped=1
    fi
fi
failed=0
printf '%-4s %10s %14s %14s %s\n' -r planned_n planned_N trained_N params
for r in 0 2; do
    n=$(largest_planned $r)
    trained="-"; params="-"
    if [ "$only_plan" != plan ]; then
        for try in 0 1 2; do
            m=$(( n - 8 * try ))
            log=$(mktemp)
            if ./train_omnimoe "${flags[@]}" -r $r --experts $(( m * m )) -x 3 -v 0 -s 0 > "$log" 2>&1 \
                && grep -q "^step *3/3" "$log"; then
                trained=$(( m * m ))
                params=$(sed -n 's/^| parameters: total \([0-9]*\).*/\1/p' "$log" | head -1)
                grep -E "^step *3/3|GPU memory in use" "$log" | sed 's/^/    /'
                rm -f "$log"
                break
            fi
            # the trainer's Error line (stderr, unbuffered, lands before the buffered table), else its last lines
            echo "    -r $r N=$(( m * m )): did not train 3 steps:"
            { grep -m 2 -iE "error|out of GPU memory" "$log" || tail -n 3 "$log"; } | sed 's/^/      /'
            rm -f "$log"
        done
    fi
    printf '%-4s %10s %14s %14s %s\n' $r $n $(( n * n )) "$trained" "$params"
    if [ "$only_plan" != plan ] && [ "$trained" = "-" ]; then failed=1; fi
done
# 1 when a search's N (or the two below it) did not train; 2 when the training was skipped (no H200)
if [ "${skipped:-0}" = 1 ]; then exit 2; fi
exit $failed
