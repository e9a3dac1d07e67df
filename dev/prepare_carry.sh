#!/usr/bin/env bash
# prepare_carry.sh - fill the git-ignored carry/ folder with what the GPU machine's checks need
# and cannot download there (it has no network). Run it here, once per checkout, then pass
# carry ["carry"] to the device call that runs dev/gpu_check.sh. About 40 MiB in all:
#   carry/include/xxhash.h    the xxHash header (Debian's libxxhash-dev) where the system has none
#   carry/mixed/              the dense-vs-OmniMoE recipe's shards (docs/dense_vs_omni.md, step 1)
#   carry/llm.c, carry/cudnn-frontend/include   llm.c with its CUDA 13 fix and the cudnn-frontend
#                             headers (dev/bench_llmc.sh prepare), when an llm.c clone is given
#   carry/cutlass/include     the CUTLASS 4.2 headers (cutlass/, cute/; PyPI's nvidia-cutlass
#                             wheel, its cutlass_library/source/include) for `make USE_CUTLASS=1`
#                             (llmc/moe_gemm_cutlass.cu; gpu_check.sh cutlass), with the word cutlass.
#                             About 27 MiB: with carry/mixed (35 MiB) it passes the device call's
#                             64 MiB limit, so a call that builds CUTLASS carries
#                             ["carry/include", "carry/cutlass"] and not carry/mixed
#
#   bash dev/prepare_carry.sh [cutlass] [LLMC_DIR]     LLMC_DIR: an llm.c clone (bare or not); optional
#   SHARED_DATA=DIR (default ../shared/data): the folder of the study's texts and tiktoken's files
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p carry

# the GPU machine has no xxhash.h of its own: carry it even where this machine has one
if [ ! -f carry/include/xxhash.h ] && [ -f /usr/include/xxhash.h ]; then
    mkdir -p carry/include && cp /usr/include/xxhash.h carry/include/
elif [ ! -f carry/include/xxhash.h ]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download libxxhash-dev >/dev/null) \
        || { echo "prepare_carry: apt-get download libxxhash-dev failed"; exit 1; }
    dpkg-deb -x "$tmp"/libxxhash-dev_*.deb "$tmp/x"
    mkdir -p carry/include && cp "$tmp/x/usr/include/xxhash.h" carry/include/
    rm -rf "$tmp"
fi

# the study's texts and tiktoken's BPE files: the project's shared data folder beside the
# repository, or SHARED_DATA=DIR for a checkout elsewhere
SHARED_DATA=${SHARED_DATA:-../shared/data}
if [ ! -f carry/mixed/mixed_val_000000.bin ]; then
    [ -f "$SHARED_DATA/tinyshakespeare/input.txt" ] && [ -d "$SHARED_DATA/corpus" ] \
        || { echo "prepare_carry: no $SHARED_DATA/tinyshakespeare/input.txt or $SHARED_DATA/corpus (set SHARED_DATA)"; exit 1; }
    tiktoken=()
    if [ -d "$SHARED_DATA/tiktoken" ]; then tiktoken=(--tiktoken-dir "$SHARED_DATA/tiktoken"); fi
    python3 dev/data/prepro.py files --name mixed --out-dir carry/mixed --shard-size 5000000 "${tiktoken[@]}" \
        "$SHARED_DATA/tinyshakespeare/input.txt" "$SHARED_DATA"/corpus/*.txt
fi

if [ "${1:-}" = cutlass ]; then
    shift
    bash dev/fetch_cutlass.sh
fi

if [ $# -ge 1 ]; then bash dev/bench_llmc.sh prepare "$1"; fi
du -sh carry/* | sed 's/^/prepare_carry: /'
