#!/usr/bin/env bash
# fetch_cutlass.sh - the CUTLASS 4.2 headers (cutlass/, cute/) into carry/cutlass/include, from
# PyPI's nvidia-cutlass wheel (its cutlass_library/source/include; header-only, nothing built):
# what `make USE_CUTLASS=1` and `make test`'s dev/cuda/check_gather_copies.cu compile against.
# Nothing to do when they are there. dev/prepare_carry.sh cutlass and .ci/run call it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f carry/cutlass/include/cutlass/gemm/collective/collective_builder.hpp ]; then
    tmp=$(mktemp -d)
    python3 -m pip download --no-deps --only-binary :all: -d "$tmp" "nvidia-cutlass==4.2.*" >/dev/null \
        || { echo "fetch_cutlass: pip download nvidia-cutlass failed"; rm -rf "$tmp"; exit 1; }
    rm -rf carry/cutlass && mkdir -p carry/cutlass
    python3 - "$tmp" carry/cutlass <<'EOF'
import glob, os, sys, zipfile
whl = glob.glob(os.path.join(sys.argv[1], "nvidia_cutlass-*.whl"))[0]
prefix = "cutlass_library/source/include/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            dst = os.path.join(sys.argv[2], "include", name[len(prefix):])
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as f:
                f.write(z.read(name))
EOF
    rm -rf "$tmp"
    [ -f carry/cutlass/include/cutlass/gemm/collective/collective_builder.hpp ] \
        || { echo "fetch_cutlass: no CUTLASS headers in the wheel"; exit 1; }
fi
