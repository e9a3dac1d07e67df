#!/usr/bin/env bash
# prepare_carry.sh - fill the git-ignored carry/ folder with what the GPU machine's checks need
# and cannot download there (it has no network). Run it here, once per checkout, then pass
# carry ["carry"] to the device call that runs dev/gpu_check.sh. About 40 MiB in all:
#   carry/include/xxhash.h    the xxHash header (Debian's libxxhash-dev) where the system has none
#   carry/mixed/              the dense-vs-OmniMoE recipe's shards (docs/dense_vs_omni.md, step 1)
#   carry/llm.c, carry/cudnn-frontend/include   llm.c with its CUDA 13 fix and the cudnn-frontend
#                             headers (dev/bench_llmc.sh prepare), when an llm.c clone is given
#
#   bash dev/prepare_carry.sh [LLMC_DIR]     LLMC_DIR: an llm.c clone (bare or not); optional
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p carry

if [ ! -f carry/include/xxhash.h ] && [ ! -f /usr/include/xxhash.h ]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download libxxhash-dev >/dev/null) \
        || { echo "prepare_carry: apt-get download libxxhash-dev failed"; exit 1; }
    dpkg-deb -x "$tmp"/libxxhash-dev_*.deb "$tmp/x"
    mkdir -p carry/include && cp "$tmp/x/usr/include/xxhash.h" carry/include/
    rm -rf "$tmp"
fi

if [ ! -f carry/mixed/mixed_val_000000.bin ]; then   # tiktoken reads the BPE files offline
    python3 dev/data/prepro.py files --name mixed --out-dir carry/mixed --shard-size 5000000 \
        ../shared/data/tinyshakespeare/input.txt ../shared/data/corpus/*.txt
fi

if [ $# -ge 1 ]; then bash dev/bench_llmc.sh prepare "$1"; fi
du -sh carry/* | sed 's/^/prepare_carry: /'
