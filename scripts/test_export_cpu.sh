#!/usr/bin/env bash
# The Hugging Face export (dev/export_hf.py) without PyTorch: trains 2 steps of -e tiny for each
# FFN kind with the CPU trainer, exports model.bin, and checks the folder with the pure-Python
# reader scripts/check_export_hf.py (safetensors header, names, shapes, contiguous byte ranges,
# values bit for bit, config.json against the model header). The omni checkpoint must export to
# the same safetensors bytes as model.bin; a one-bit change to an export must be caught; bad
# inputs (one flipped bit under an intact end marker included) are refused with a message naming
# the file, and nothing is written; a write error (a full disk) leaves no half-written export.
# Runs without the python xxhash module (dev/xxh64.py).
# The logits of the exports against ours need torch and transformers: dev/test_export_hf.py.
# One PASS/FAIL line per check (the helpers of scripts/hostile_lib.sh), then
# "test_export_cpu: N passed, N failed"; exit 1 on any FAIL. Run from the repository root.
set -uo pipefail
HOSTILE_WORK=$(mktemp -d /tmp/test_export_cpu.XXXXXX)
trap 'umount "$HOSTILE_WORK/full" 2>/dev/null; rm -rf "$HOSTILE_WORK"' EXIT
source scripts/hostile_lib.sh
work=$HOSTILE_WORK
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
check "trainer built ($TRAINER)" [ -x "$TRAINER" ]
expect_ok "pure-Python XXH64: published vectors, streaming == one-shot" "^OK XXH64" -- python3 dev/xxh64.py
for kind in gelu swiglu omni; do
    expect_ok "$kind: 2 steps write model.bin" "wrote model" -- \
        "$TRAINER" -e tiny -f $kind -b 2 -t 32 -x 2 -v 0 -s 0 --seed 3 -o "$work/$kind"
    # the hash is verified with the python xxhash module or, without it, dev/xxh64.py: against the
    # trainer's C XXH64 on a real file either way
    expect_ok "$kind: export (hash verified)" "exported .*model.bin .*hash verified \(XXH64\)" -- \
        python3 dev/export_hf.py "$work/$kind/model.bin" "$work/hf_$kind"
    expect_ok "$kind: safetensors and config.json match model.bin bit for bit" "^OK [0-9]+ tensors bit-identical" -- \
        python3 scripts/check_export_hf.py "$work/$kind/model.bin" "$work/hf_$kind"
done
expect_ok "omni: the checkpoint exports (hash verified)" "checkpoint v2, step 2.*hash verified \(XXH64\)" -- \
    python3 dev/export_hf.py "$work/omni/ckpt_00000002.bin" "$work/hf_ckpt"
check "omni: the checkpoint's safetensors bytes == model.bin's" \
    cmp -s "$work/hf_ckpt/model.safetensors" "$work/hf_omni/model.safetensors"
# the checker must be able to fail: one bit of the last float of the file flipped
cp -r "$work/hf_gelu" "$work/hf_tampered"
xor_byte "$work/hf_tampered/model.safetensors" $(( $(stat -c %s "$work/hf_tampered/model.safetensors") - 1 )) 1
expect_fail "one flipped bit in an export is caught" "transformer.ln_f.bias differs" -- \
    python3 scripts/check_export_hf.py "$work/gelu/model.bin" "$work/hf_tampered"
# the checker on bad inputs: one line naming the file, exit 1, no traceback
expect_fail "checker: a missing export folder, named" "^check_export_hf: .*hf_none/model.safetensors: cannot read" -- \
    python3 scripts/check_export_hf.py "$work/gelu/model.bin" "$work/hf_none"
head -c 500 "$work/gelu/model.bin" > "$work/short_model.bin"
expect_fail "checker: a model file shorter than its header, named" "^check_export_hf: .*short_model.bin: 500 bytes" -- \
    python3 scripts/check_export_hf.py "$work/short_model.bin" "$work/hf_gelu"
cp -r "$work/hf_gelu" "$work/hf_badjson"
printf '{"vocab_size": ' > "$work/hf_badjson/config.json"
expect_fail "checker: a truncated config.json, named" "^check_export_hf: .*hf_badjson/config.json: not JSON" -- \
    python3 scripts/check_export_hf.py "$work/gelu/model.bin" "$work/hf_badjson"
xor_byte "$work/hf_badjson/model.safetensors" 8 $(( 0x7b ^ 0x5b ))  # the header's opening { becomes [
expect_fail "checker: a safetensors header that is not JSON, named" "^check_export_hf: .*hf_badjson/model.safetensors: not JSON" -- \
    python3 scripts/check_export_hf.py "$work/gelu/model.bin" "$work/hf_badjson"
expect_no_match "checker: ... without a traceback" "Traceback"
# bad inputs: a message naming the file, no output folder
head -c 5000 "$work/swiglu/model.bin" > "$work/truncated.bin"
expect_fail "truncated model file refused" "truncated.bin: truncated: 5000 bytes, expected" -- \
    python3 dev/export_hf.py "$work/truncated.bin" "$work/out_truncated"
expect_fail "directory refused" "omni: is a directory, not a file" -- python3 dev/export_hf.py "$work/omni" "$work/out_dir"
expect_fail "test fixture refused as one" "it is an omnimoe test fixture" -- \
    python3 dev/export_hf.py dev/fixtures/gelu.bin "$work/out_fixture"
# one flipped bit inside the payload (end marker intact) fails the XXH64 of the trailer: in a
# tensor of a model file, and in the AdamW moments of a checkpoint (read only to be hashed)
cp "$work/omni/model.bin" "$work/flipped.bin"
xor_byte "$work/flipped.bin" $(( $(stat -c %s "$work/flipped.bin") / 2 )) 4
expect_fail "model file with one flipped bit refused" "flipped.bin: checksum mismatch \(XXH64 of the contents [0-9a-f]{16}, stored in the trailer [0-9a-f]{16}\)" -- \
    python3 dev/export_hf.py "$work/flipped.bin" "$work/out_flipped"
cp "$work/omni/ckpt_00000002.bin" "$work/flipped_ckpt.bin"
xor_byte "$work/flipped_ckpt.bin" $(( $(stat -c %s "$work/flipped_ckpt.bin") / 2 )) 16
expect_fail "checkpoint with one flipped bit refused" "flipped_ckpt.bin: checksum mismatch \(XXH64" -- \
    python3 dev/export_hf.py "$work/flipped_ckpt.bin" "$work/out_flipped_ckpt"
expect_ok "moe: 2 steps write model.bin" "wrote model" -- \
    "$TRAINER" -e tiny -f moe -b 2 -t 32 -x 2 -v 0 -s 0 --seed 3 -o "$work/moe"
expect_fail "moe model refused by name" "model.bin: a moe model \(-f moe\): this exporter writes gelu, swiglu and omni models only" -- \
    python3 dev/export_hf.py "$work/moe/model.bin" "$work/out_moe"
check "refused inputs wrote nothing" bash -c "! ls -d '$work'/out_* 2>/dev/null"
expect_fail "an existing export is not overwritten" "hf_gelu: exists and is not an empty directory" -- \
    python3 dev/export_hf.py "$work/swiglu/model.bin" "$work/hf_gelu"
expect_ok "... and is left intact" "^OK" -- python3 scripts/check_export_hf.py "$work/gelu/model.bin" "$work/hf_gelu"
# a model file the user may not read (root reads anything: run as nobody where root can)
if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null && [ -x /usr/bin/python3 ]; then
    mkdir -p "$work/unreadable" && chmod 755 "$work" "$work/unreadable"
    cp "$work/swiglu/model.bin" "$work/unreadable/model.bin" && chmod 000 "$work/unreadable/model.bin"
    expect_fail "a model file without read permission is one message naming it" \
        "Error: .*unreadable/model.bin: cannot open: Permission denied" -- \
        setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 dev/export_hf.py \
        "$work/unreadable/model.bin" "$work/unreadable/hf"
    expect_no_match "... without a traceback" "Traceback"
else
    hostile_skip "unreadable model file" "needs root and setpriv (to run as nobody)"
fi
# write errors: one message naming the output folder, and no half-written export left behind
# (a later export into it would be refused as "not empty")
expect_fail "an output folder below a regular file is one message" "Error: .*model.bin/hf: writing the export failed" -- \
    python3 dev/export_hf.py "$work/swiglu/model.bin" "$work/gelu/model.bin/hf"
expect_no_match "... without a traceback" "Traceback"
mkdir -p "$work/full"
if mount -t tmpfs -o size=2m tmpfs "$work/full" 2>/dev/null; then  # less than the 13 MB export
    expect_fail "a full disk is one message naming the folder and the cause" \
        "Error: .*full/hf: writing the export failed \(No space left on device\)" -- \
        python3 dev/export_hf.py "$work/swiglu/model.bin" "$work/full/hf"
    check "... and the half-written export is removed" test ! -e "$work/full/hf"
    mkdir "$work/full/empty"
    expect_fail "a full disk, an existing empty folder: one message" "Error: .*full/empty: writing the export failed" -- \
        python3 dev/export_hf.py "$work/swiglu/model.bin" "$work/full/empty"
    check "... the folder is left as it was, empty" bash -c "[ -d '$work/full/empty' ] && [ -z \"\$(ls -A '$work/full/empty')\" ]"
else
    hostile_skip "full disk" "cannot mount a tmpfs here (needs root)"
fi
hostile_summary test_export_cpu
