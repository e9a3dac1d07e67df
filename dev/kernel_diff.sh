#!/usr/bin/env bash
# kernel_diff.sh - without a GPU: is the machine code of every CUDA kernel the same as at another
# commit? Both trees' device code is compiled with this Makefile's NVCC_FLAGS (sm_90a, -cubin) and
# disassembled (cuobjdump -sass); each kernel present at both commits is compared as text, with its
# registers, shared and constant memory (cuobjdump -res-usage).
#
#   bash dev/kernel_diff.sh <base commit> [<commit>]    the second defaults to the work tree
#   SOURCES="train_omnimoe test_omnimoe"                the .cu files compiled (this default)
#
# Prints per source the kernels that differ and those only one side has (new or removed kernels);
# exit 0 when every kernel present at both is identical, 1 when one differs, 2 when it could not
# compare. Identical SASS for the kernels a run launches, with host code that launches them alike,
# means the same bits on a GPU.
# Needs cuobjdump and nvdisasm (the CUDA toolkit's, or PyPI's nvidia-cuda-cuobjdump and
# nvidia-cuda-nvdisasm: their bin/ in PATH).
set -u
cd "$(dirname "$0")/.."
base=${1:?usage: dev/kernel_diff.sh <base commit> [<commit>]}
rev=${2:-}
SOURCES=${SOURCES:-"train_omnimoe test_omnimoe"}
for tool in cuobjdump nvdisasm; do
    command -v $tool > /dev/null || { echo "kernel_diff: $tool not in PATH (CUDA toolkit, or PyPI nvidia-cuda-$tool)"; exit 2; }
done
for c in "$base" $rev; do
    git rev-parse --verify -q "$c^{commit}" > /dev/null || { echo "kernel_diff: $c is not a commit"; exit 2; }
done
flags=$(make -s --no-print-directory --eval='kernel_diff_flags: ; @echo $(NVCC_FLAGS)' kernel_diff_flags)
flags=${flags//-Icarry\/include/-I$PWD\/carry\/include}  # the trees compile elsewhere
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# the two trees: git archive of each commit; the work tree as it is when no second commit is given
mkdir -p "$work/a" "$work/b"
git archive "$base" | tar -x -C "$work/a"
[ -n "$rev" ] && git archive "$rev" | tar -x -C "$work/b"
status=0
for src in $SOURCES; do
    for side in a b; do
        dir="$work/$side"
        [ "$side" = b ] && [ -z "$rev" ] && dir=.
        if [ ! -f "$dir/$src.cu" ]; then echo "kernel_diff: $src.cu missing on side $side"; exit 2; fi
        (cd "$dir" && nvcc $flags -cubin "$src.cu" -o "$work/$side.$src.cubin") || { echo "kernel_diff: $src.cu failed to build ($side)"; exit 2; }
        cuobjdump -sass "$work/$side.$src.cubin" > "$work/$side.$src.sass" || exit 2
        cuobjdump -res-usage "$work/$side.$src.cubin" > "$work/$side.$src.res" || exit 2
    done
    python3 - "$src" "$work/a.$src" "$work/b.$src" <<'EOF' || status=1
import re, sys
src, a, b = sys.argv[1:4]
def sass(path):  # kernel name -> its SASS text (addresses are per function)
    funcs, cur = {}, None
    for line in open(path + '.sass'):
        m = re.match(r'\s*Function : (\S+)', line)
        if m:
            cur = m.group(1); funcs[cur] = []
        elif cur is not None and not line.startswith('\t\tFatbin') and 'code for sm_' not in line:
            funcs[cur].append(line.rstrip())
    return {k: '\n'.join(v).strip() for k, v in funcs.items()}
def res(path):  # kernel name -> its resource line
    out, name = {}, None
    for line in open(path + '.res'):
        m = re.match(r'\s*Function (\S+):', line)
        if m: name = m.group(1)
        elif name and 'REG' in line: out[name] = line.strip(); name = None
    return out
sa, sb, ra, rb = sass(a), sass(b), res(a), res(b)
if set(ra) != set(sa) or set(rb) != set(sb) or not sa:
    sys.exit(f'kernel_diff: {src}: the -sass and -res-usage listings name different kernels (or none)')
common = sorted(set(sa) & set(sb))
differ = [k for k in common if sa[k] != sb[k] or ra.get(k) != rb.get(k)]
print(f'{src}: {len(common)} kernels at both commits, {len(common) - len(differ)} identical (SASS and resources), '
      f'{len(differ)} differ; {len(set(sa) - set(sb))} only at the base, {len(set(sb) - set(sa))} only in the other')
for k in differ: print('  differs:', k)
for k in sorted(set(sa) - set(sb)): print('  only at the base:', k)
for k in sorted(set(sb) - set(sa)): print('  only in the other:', k)
sys.exit(1 if differ else 0)
EOF
done
exit $status
