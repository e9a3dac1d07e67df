#!/usr/bin/env bash
# prebuild.sh - build here, on a machine without a GPU (nvcc compiles anywhere), the CUDA programs
# that a device call of dev/gpu_check.sh would otherwise spend its first minutes building, and
# pack them with a stamp of what they were built from. A device call then unpacks a pack whose
# stamp matches the tree it runs in and skips those builds; a missing or stale pack, or one whose
# programs lack a shared library there, leaves the call building as before.
#
#   bash dev/prebuild.sh [FLAVOUR...]   build FLAVOURs (default: default cutlass cudnn llmc) into
#                                       carry/prebuilt/FLAVOUR.tgz (carry ["carry/prebuilt", ...])
#   bash dev/prebuild.sh --unpack FLAVOUR   on the device: unpack into the tree if the stamp
#                                       matches and every program finds its libraries; exit 0 if used
#
# Flavours (what gpu_check.sh builds with make in each of its modes):
#   default  the trainers, the GPU tests, every kernel test and benchmark (make's default flags)
#   cutlass  test_moe, bench_moe, the trainer (train_omnimoe_cutlass), check_gather_copies and
#            test_matmul (test_matmul_cutlass_bin) with USE_CUTLASS=1, and bench_moe for each of CUTLASS_VARIANTS
#            as dev/cuda/bench_moe_bin.VARIANT (needs carry/cutlass)
#   cudnn    train_omnimoe, test_omnimoe and test_attention with USE_CUDNN=1 (needs carry/cudnn-frontend)
#   llmc     llm.c's train_gpt2cu with and without cuDNN for dev/bench_llmc.sh (needs carry/llm.c)
# The stamp covers every C/CUDA source and Makefile of the tree by content (for llmc: carry/llm.c's
# and dev/bench_llmc.sh, which holds its build flags), the flavour's make variables, the nvcc
# release (programs from another compiler would not give the bits that the committed logs were
# made with) and whether mpicc works (the Makefile builds the mpirun launch in where it does).
set -uo pipefail
cd "$(dirname "$0")/.."
PACKS=carry/prebuilt
JOBS=${JOBS:-$(nproc)}
CUTLASS_VARIANTS=${CUTLASS_VARIANTS:-MOE_CUTLASS_TILE_N=128 MOE_CUTLASS_PINGPONG=1}
DEFAULT_TARGETS=(train_omnimoe train_omnimoe_cpu test_omnimoe test_omnimoe_fp32 kernel_tests kernel_benches)

stamp() {  # stamp FLAVOUR: 16 hex digits
    local flavour=$1 root=.
    [ "$flavour" = llmc ] && root=carry/llm.c
    {   echo "$flavour"; [ "$flavour" = cutlass ] && echo "$CUTLASS_VARIANTS"
        nvcc --version | grep -i release
        # the device has OpenMPI; here: apt-get install libopenmpi-dev
        mpicc --showme:compile > /dev/null 2>&1 && echo "with MPI" || echo "without MPI"
        [ "$flavour" = llmc ] && sha256sum dev/bench_llmc.sh   # its build flags
        find "$root" \( -path ./carry -o -path ./build -o -path ./.git -o -path ./dev/cuda/build_logs -o -path "$root/bin" \) -prune \
            -o -type f \( -name '*.c' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.hpp' -o -name Makefile \) -print \
            | LC_ALL=C sort | xargs -d '\n' sha256sum
    } | sha256sum | cut -c1-16
}

if [ "${1:-}" = --unpack ]; then
    flavour=${2:?usage: bash dev/prebuild.sh --unpack FLAVOUR}
    pack=$PACKS/$flavour.tgz
    [ -f "$pack" ] || exit 1
    want=$(tar xzf "$pack" -O PREBUILT_STAMP 2>/dev/null)
    have=$(stamp "$flavour")
    if [ "$want" != "$have" ]; then echo "prebuild: $pack is stale (stamp $want, tree $have): building"; exit 1; fi
    dest=.; [ "$flavour" = llmc ] && dest=carry/llm.c/bin && mkdir -p "$dest"
    # -m: the unpacked files take the time of now, newer than every source, so make leaves them;
    # then one time for all of them, so that no program is older than an object it links
    files=$(tar xzmvf "$pack" -C "$dest" --exclude PREBUILT_STAMP) || exit 1
    (cd "$dest" && touch -d "@$(date +%s.%N)" $files) || exit 1
    missing=$(cd "$dest" && for f in $files; do [ -f "$f" ] && [ -x "$f" ] && ldd "$f" 2>/dev/null | grep "not found"; done | sort -u)
    if [ -n "$missing" ]; then
        echo "prebuild: $pack's programs lack libraries here ($missing): building"
        (cd "$dest" && rm -f $files); exit 1
    fi
    echo "prebuild: unpacked $pack ($(echo "$files" | wc -w) files, stamp $have)"
    exit 0
fi

# ---- build: each flavour in a scratch copy of the tree (the files a device call receives), so
# that the flavours' different flags never mix and this checkout's own builds stay as they are
build_flavour() {
    local flavour=$1 tmp files=()
    tmp=$(mktemp -d)
    git ls-files -z -co --exclude-standard | tar -c --null -T - | tar -x -C "$tmp" || return 1
    ln -s "$PWD/carry" "$tmp/carry"
    local st; st=$(cd "$tmp" && stamp "$flavour")   # of the files a device call receives
    local log=$PACKS/$flavour.build.log
    : > "$log"
    case $flavour in
        default)
            (cd "$tmp" && make -j"$JOBS" "${DEFAULT_TARGETS[@]}") > "$log" 2>&1 || return 1
            files=(train_omnimoe train_omnimoe_cpu test_omnimoe test_omnimoe_fp32)
            files+=($(cd "$tmp" && ls dev/cuda/*_bin));;
        cutlass)   # the variants first, the default tile last (its object is the one make then finds)
            for v in $CUTLASS_VARIANTS; do
                (cd "$tmp" && make -B -j"$JOBS" USE_CUTLASS=1 "$v" dev/cuda/bench_moe_bin) >> "$log" 2>&1 || return 1
                mv "$tmp/dev/cuda/bench_moe_bin" "$tmp/dev/cuda/bench_moe_bin.$v"
                files+=("dev/cuda/bench_moe_bin.$v")
            done
            (cd "$tmp" && make -B -j"$JOBS" USE_CUTLASS=1 dev/cuda/test_moe_bin dev/cuda/bench_moe_bin train_omnimoe \
                dev/cuda/check_gather_copies_bin dev/cuda/test_matmul_bin) >> "$log" 2>&1 || return 1
            # beside the default build's trainer and test_matmul, not over them
            mv "$tmp/train_omnimoe" "$tmp/train_omnimoe_cutlass"
            mv "$tmp/dev/cuda/test_matmul_bin" "$tmp/dev/cuda/test_matmul_cutlass_bin"
            files+=(dev/cuda/test_moe_bin dev/cuda/bench_moe_bin build/moe_gemm_cutlass.o build/matmul_gelu_cutlass.o
                    train_omnimoe_cutlass dev/cuda/check_gather_copies_bin dev/cuda/test_matmul_cutlass_bin);;
        cudnn)
            (cd "$tmp" && make -j"$JOBS" USE_CUDNN=1 train_omnimoe test_omnimoe dev/cuda/test_attention_bin) > "$log" 2>&1 || return 1
            files=(train_omnimoe test_omnimoe dev/cuda/test_attention_bin build/attention_cudnn.o);;
        llmc)
            [ -f carry/llm.c/train_gpt2.cu ] || { echo "carry/llm.c missing (dev/bench_llmc.sh prepare)" > "$log"; return 1; }
            rm -rf "$tmp/llmc_bin" && mkdir -p "$tmp/llmc_bin"
            BENCH_BUILD_ONLY="$tmp/llmc_bin" bash dev/bench_llmc.sh > "$log" 2>&1 || return 1
            tmp=$tmp/llmc_bin
            files=(llmc_cudnn llmc_plain);;
        *) echo "prebuild: unknown flavour '$flavour' (default, cutlass, cudnn, llmc)"; return 1;;
    esac
    echo "$st" > "$tmp/PREBUILT_STAMP"
    tar czf "$PACKS/$flavour.tgz" -C "$tmp" PREBUILT_STAMP "${files[@]}" || return 1
    echo "prebuild: $PACKS/$flavour.tgz: ${#files[@]} files, $(du -h "$PACKS/$flavour.tgz" | cut -f1), stamp $(cat "$tmp/PREBUILT_STAMP")"
    rm -rf "${tmp%/llmc_bin}"
}

mkdir -p "$PACKS"
status=0
for flavour in ${@:-default cutlass cudnn llmc}; do
    t0=$(date +%s)
    build_flavour "$flavour" || { echo "prebuild: FAIL: $flavour (log: $PACKS/$flavour.build.log)"; tail -n 5 "$PACKS/$flavour.build.log"; status=1; }
    echo "prebuild: $flavour took $(( $(date +%s) - t0 )) s"
done
exit $status
