#!/usr/bin/env bash
# The Hugging Face export (dev/export_hf.py) without PyTorch: trains 2 steps of -e tiny for each
# FFN kind with the CPU trainer, exports model.bin, and checks the folder with the pure-Python
# reader scripts/check_export_hf.py (safetensors header, names, shapes, contiguous byte ranges,
# values bit for bit, config.json against the model header). The omni checkpoint must export to
# the same safetensors bytes as model.bin; a one-bit change to an export must be caught; bad
# inputs are refused with a message naming the file and nothing is written.
# The logits of the exports against ours need torch and transformers: dev/test_export_hf.py.
# One PASS/FAIL line per check, then "test_export_cpu: N passed, N failed"; exit 1 on any FAIL.
set -uo pipefail
bin=${TRAINER:-./train_omnimoe_cpu}
passed=0
failed=0
check() {  # check <name> <detail> <command...>: PASS when the command succeeds
    local name=$1 detail=$2
    shift 2
    if "$@"; then echo "PASS $name"; passed=$((passed + 1)); else echo "FAIL $name: $detail"; failed=$((failed + 1)); fi
}
finish() {
    echo "test_export_cpu: $passed passed, $failed failed"
    [ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
    exit $?
}
refused() {  # refused <pattern> <out> <export args...>: exit 1, the pattern in stderr, no output dir
    local pattern=$1 out=$2
    shift 2
    python3 dev/export_hf.py "$@" "$out" > "$work/refused.txt" 2>&1 && { echo "    accepted: $*"; return 1; }
    grep -q "$pattern" "$work/refused.txt" && [ ! -e "$out" ] && return 0
    echo "    exporter said: $(cat "$work/refused.txt")"; return 1
}
check "trainer built" "$bin missing (make train_omnimoe_cpu)" [ -x "$bin" ] || finish
work=$(mktemp -d /tmp/test_export_cpu.XXXXXX)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
for kind in gelu swiglu omni; do
    "$bin" -e tiny -f $kind -b 2 -t 32 -x 2 -v 0 -s 0 --seed 3 -o "$work/$kind" > "$work/$kind.txt" 2>&1; rc=$?
    check "$kind: 2 steps write model.bin" "exit status $rc: $(tail -n 1 "$work/$kind.txt")" [ $rc -eq 0 -a -s "$work/$kind/model.bin" ] || continue
    python3 dev/export_hf.py "$work/$kind/model.bin" "$work/hf_$kind" > "$work/export_$kind.txt" 2>&1; rc=$?
    check "$kind: export" "exit status $rc: $(tail -n 1 "$work/export_$kind.txt")" [ $rc -eq 0 ] || continue
    out=$(python3 scripts/check_export_hf.py "$work/$kind/model.bin" "$work/hf_$kind" 2>&1); rc=$?
    check "$kind: safetensors and config.json match model.bin ($out)" "$out" [ $rc -eq 0 ]
done
if [ -s "$work/omni/ckpt_00000002.bin" ]; then
    python3 dev/export_hf.py "$work/omni/ckpt_00000002.bin" "$work/hf_ckpt" > "$work/export_ckpt.txt" 2>&1
    check "omni: checkpoint exports the same safetensors bytes as model.bin" "$(tail -n 1 "$work/export_ckpt.txt")" \
        cmp -s "$work/hf_ckpt/model.safetensors" "$work/hf_omni/model.safetensors"
fi
# the checker must be able to fail: one bit of the last float of the file flipped
cp -r "$work/hf_gelu" "$work/hf_tampered"
python3 -c "import sys; p=sys.argv[1]; b=bytearray(open(p,'rb').read()); b[-1]^=1; open(p,'wb').write(b)" \
    "$work/hf_tampered/model.safetensors"
out=$(python3 scripts/check_export_hf.py "$work/gelu/model.bin" "$work/hf_tampered" 2>&1)
check "one flipped bit in an export is caught ($out)" "the checker passed it" grep -q "transformer.ln_f.bias differs" <<< "$out"
# bad inputs
head -c 5000 "$work/swiglu/model.bin" > "$work/truncated.bin"
check "truncated model file refused" "no such message, or output written" \
    refused "truncated.bin: truncated: 5000 bytes, expected" "$work/out_truncated" "$work/truncated.bin"
check "directory refused" "no such message, or output written" \
    refused "is a directory, not a file" "$work/out_dir" "$work/omni"
check "test fixture refused as one" "no such message, or output written" \
    refused "it is an omnimoe test fixture" "$work/out_fixture" dev/fixtures/gelu.bin
python3 dev/export_hf.py "$work/swiglu/model.bin" "$work/hf_gelu" > "$work/refused.txt" 2>&1; rc=$?
check "an existing export is not overwritten" "exit $rc: $(cat "$work/refused.txt")" \
    bash -c "[ $rc -ne 0 ] && grep -q 'exists and is not an empty directory' '$work/refused.txt' && python3 scripts/check_export_hf.py '$work/gelu/model.bin' '$work/hf_gelu' > /dev/null"
finish
