#!/usr/bin/env bash
# profile_moe_layer.sh - where the moe layer's forward+backward goes, kernel by kernel, beside the
# dense SwiGLU of the same active size (dev/cuda/bench_moe.cu's shape): each kernel of
# `bench_moe_bin --profile moe|moe-tokens|dense` timed by Nsight Compute (one metric, gpu__time_duration, no
# cache flush, clocks untouched; kernels run one at a time), summed per name over its passes (the
# count the benchmark prints).
#
#   bash dev/profile_moe_layer.sh [TOKENS ...]     (default 8192 32768; needs ncu and a built
#                                                   dev/cuda/bench_moe_bin: CUTLASS's grouped GEMM
#                                                   in a `make USE_CUTLASS=1` build; with
#                                                   PROFILE_TOKENS=1 also the moe layer with its
#                                                   token reads, moe-tokens)
#   SHAPE=deepseekmoe-16b: bench_moe's --shape (default small); PROFILE_WHICH="moe-tokens": only
#   those layers (default: moe, moe-tokens with PROFILE_TOKENS=1, dense)
# Tables to stdout; the raw CSV to $OUT/profile_moe_<which>_<tokens>[_<shape>].csv when OUT is set.
set -u
cd "$(dirname "$0")/.."
D=${OUT:-/tmp/omnimoe_profile}
mkdir -p "$D"
BIN=${BENCH_MOE:-./dev/cuda/bench_moe_bin}
[ -x "$BIN" ] || { echo "profile_moe_layer: $BIN not built (make dev/cuda/bench_moe_bin)"; exit 1; }
command -v ncu > /dev/null || { echo "profile_moe_layer: ncu not found"; exit 1; }
tokens=("$@")
[ ${#tokens[@]} -gt 0 ] || tokens=(8192 32768)
rc=0
SHAPE=${SHAPE:-small}
suffix=""; [ "$SHAPE" = small ] || suffix="_$SHAPE"
for bt in "${tokens[@]}"; do
    for which in ${PROFILE_WHICH:-moe ${PROFILE_TOKENS:+moe-tokens} dense}; do
        csv="$D/profile_moe_${which}_$bt$suffix.csv"
        echo "== $which layer fwd+bwd, BT=$bt, shape $SHAPE ($BIN --profile $which --bt $bt --shape $SHAPE, under ncu)"
        timeout 300 ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
            "$BIN" --profile "$which" --bt "$bt" --shape "$SHAPE" > "$csv" 2> "${csv%.csv}.err" || rc=1
        runs=$(sed -n 's/^bench_moe --profile: \([0-9]*\) runs$/\1/p' "$csv" | head -1)
        [ -n "$runs" ] || { echo "   no run count in $csv (see ${csv%.csv}.err)"; rc=1; continue; }
        python3 dev/ncu_table.py --skip fill_random_device_kernel "$csv" "$runs" fwd+bwd 25 || rc=1  # not the set-up
    done
done
exit $rc
