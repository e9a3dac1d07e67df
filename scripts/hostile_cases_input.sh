# Hostile-input cases: shards, flags, model files, checkpoints, memory, output files.
# Sourced by scripts/test_hostile.sh (after scripts/hostile_lib.sh); uses TRAINER and HOSTILE_WORK.
# The behaviour asked for (issue 13): one clear message naming the flag or file and a non-zero
# exit, or the correct behaviour; nothing saved before is lost. Everything lives in
# $HOSTILE_WORK/input.

hostile_cases_input() {
    local W=$HOSTILE_WORK/input
    mkdir -p "$W/data" "$W/data2"
    local flags=(-e "$HOSTILE_MODEL" -b 2 -t 32 -v 0 -s 0 -j "")  # every case adds -x and its data
    # good data: three training shards of random tokens (shuffled windows by default) and a val shard
    make_shard "$W/data/train_000.bin" 3000 seed=1
    make_shard "$W/data/train_001.bin" 3000 seed=2
    make_shard "$W/data/train_002.bin" 3000 seed=3
    make_shard "$W/data/val_000.bin" 1000 seed=4
    local data=(-i "$W/data/train_*.bin")
    # other data with the same shard count (other tokens and sizes)
    make_shard "$W/data2/train_000.bin" 2900 seed=11
    make_shard "$W/data2/train_001.bin" 3100 seed=12
    make_shard "$W/data2/train_002.bin" 3000 seed=13

    # ---- a good run: the checkpoints and model file the later cases start from
    expect_ok "base run: 2 steps, checkpoints at steps 1 and 2, model file" "" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -x 2 -n 1 -o "$W/base"
    check "base run wrote ckpt 1, ckpt 2, model.bin and the log" \
        test -s "$W/base/ckpt_00000001.bin" -a -s "$W/base/ckpt_00000002.bin" -a -s "$W/base/model.bin" -a -s "$W/base/log.jsonl"
    local model=$W/base/model.bin
    # a fresh copy of the base run's output directory
    copy_base() { rm -rf "$1" && cp -r "$W/base" "$1"; }

    # ---- shards: every bad shard is refused when opened, naming the file
    expect_fail "shard: missing file" "Error.*(missing_shard\.bin)" -- \
        "$TRAINER" "${flags[@]}" -x 1 -i "$W/missing_shard.bin"
    expect_fail "shard: glob matching nothing" "Error.*(nothing_\*\.bin|nothing_)" -- \
        "$TRAINER" "${flags[@]}" -x 1 -i "$W/nothing_*.bin"
    : > "$W/empty.bin"
    expect_fail "shard: empty file" "Error.*(empty\.bin)" -- "$TRAINER" "${flags[@]}" -x 1 -i "$W/empty.bin"
    head -c 100 "$W/data/train_000.bin" > "$W/short_header.bin"
    expect_fail "shard: truncated header (100 bytes)" "Error.*(short_header\.bin)" -- \
        "$TRAINER" "${flags[@]}" -x 1 -i "$W/short_header.bin"
    make_shard "$W/bad_magic.bin" 3000 magic=20240521
    expect_fail "shard: wrong magic" "Error.*(bad_magic\.bin)" -- "$TRAINER" "${flags[@]}" -x 1 -i "$W/bad_magic.bin"
    make_shard "$W/bad_version.bin" 3000 version=2
    expect_fail "shard: wrong version" "Error.*(bad_version\.bin)" -- "$TRAINER" "${flags[@]}" -x 1 -i "$W/bad_version.bin"
    make_shard "$W/count_lies.bin" 3000 count=5000
    expect_fail "shard: token count larger than the file" "Error.*(count_lies\.bin)" -- \
        "$TRAINER" "${flags[@]}" -x 1 -i "$W/count_lies.bin"
    make_shard "$W/too_small.bin" 40
    expect_fail "shard: fewer tokens than one batch (40 < B*T+1)" "Error.*(too_small\.bin)" -- \
        "$TRAINER" "${flags[@]}" -x 1 -i "$W/too_small.bin"
    mkfifo "$W/fifo.bin"
    # a hang is forever; 30 s leaves room for the CUDA trainer, which opens the shards only after
    # creating its CUDA context and building the model (seconds on a cold GPU)
    HOSTILE_TIMEOUT=30 expect_fail "shard: a FIFO is refused, no hang" "Error.*(fifo\.bin)" -- \
        "$TRAINER" "${flags[@]}" -x 1 -i "$W/fifo.bin"
    mkdir -p "$W/dir.bin"
    expect_fail "shard: a directory" "Error.*(dir\.bin)" -- "$TRAINER" "${flags[@]}" -x 1 -i "$W/dir.bin"
    make_shard "$W/val_tiny.bin" 20 seed=5
    expect_fail "shard: validation set smaller than one batch" "Error.*(val_tiny\.bin)" -- \
        "$TRAINER" "${flags[@]}" -x 1 "${data[@]}" -j "$W/val_tiny.bin" -v 1
    # a token >= vocab (50257) as the very last token of the last shard: found before step 1
    mkdir -p "$W/oov"
    cp "$W/data/train_000.bin" "$W/data/train_001.bin" "$W/oov/"
    make_shard "$W/oov/train_002.bin" 3000 seed=3 last=50257
    expect_fail "shard: token >= vocab at the end of the last shard, fresh run" "Error.*(oov/train_002\.bin)" -- \
        "$TRAINER" "${flags[@]}" -x 2 -n 1 -i "$W/oov/train_*.bin" -o "$W/oov_out"
    expect_no_match "shard: token >= vocab refused before step 1" "^step +1"
    check "shard: token >= vocab, the refused run wrote no checkpoint" \
        test -z "$(ls "$W/oov_out" 2>/dev/null | grep ckpt_)"
    # the same data but the last shard gets its bad token after checkpoints were saved
    mkdir -p "$W/oov2"
    cp "$W/data/"train_00*.bin "$W/oov2/"
    expect_ok "shard: (setup) a run on good data, checkpoints at steps 1 and 2" "" -- \
        "$TRAINER" "${flags[@]}" -x 2 -n 1 -i "$W/oov2/train_*.bin" -o "$W/oov2_out"
    check "shard: (setup) the run wrote ckpt 2" test -s "$W/oov2_out/ckpt_00000002.bin"
    make_shard "$W/oov2/train_002.bin" 3000 seed=3 last=50257
    snapshot "$W/oov2_out"
    expect_fail "shard: resume onto a shard with a token >= vocab at its end" "Error.*(oov2/train_002\.bin)" -- \
        "$TRAINER" "${flags[@]}" -x 4 -n 1 -i "$W/oov2/train_*.bin" -o "$W/oov2_out" -y 1
    expect_no_match "shard: token >= vocab on resume refused before any step" "^step +[0-9]"
    expect_intact "shard: token >= vocab on resume, checkpoints and log intact" "$W/oov2_out"

    # ---- flags: one message naming the flag, before anything is read or written
    expect_fail "flag: unknown flag" "$(flag_re '--bogus')" -- "$TRAINER" "${flags[@]}" -x 1 --bogus 3
    expect_fail "flag: missing value" "$(flag_re '-x|--steps')" -- "$TRAINER" "${flags[@]}" -x
    expect_fail "flag: -b 0" "$(flag_re '-b|--batch-size')" -- "$TRAINER" "${flags[@]}" -x 1 -b 0
    expect_fail "flag: -b -2" "$(flag_re '-b|--batch-size')" -- "$TRAINER" "${flags[@]}" -x 1 -b -2
    expect_fail "flag: -t 0" "$(flag_re '-t|--seq-len')" -- "$TRAINER" "${flags[@]}" -x 1 -t 0
    expect_fail "flag: -t -32" "$(flag_re '-t|--seq-len')" -- "$TRAINER" "${flags[@]}" -x 1 -t -32
    expect_fail "flag: -x -1" "$(flag_re '-x|--steps')" -- "$TRAINER" "${flags[@]}" -x -1
    expect_fail "flag: -b abc (not a number)" "$(flag_re '-b|--batch-size')" -- "$TRAINER" "${flags[@]}" -x 1 -b abc
    expect_fail "flag: -x 3.5 (not an integer)" "$(flag_re '-x|--steps')" -- "$TRAINER" "${flags[@]}" -x 3.5
    expect_fail "flag: -l 1e-3x (trailing junk)" "$(flag_re '-l|--lr')" -- "$TRAINER" "${flags[@]}" -x 1 -l 1e-3x
    expect_fail "flag: -l nan" "$(flag_re '-l|--lr')" -- "$TRAINER" "${flags[@]}" -x 1 -l nan
    expect_fail "flag: -l -0.001" "$(flag_re '-l|--lr')" -- "$TRAINER" "${flags[@]}" -x 1 -l -0.001
    # 549755813888 / (B*T = 64) = 2^33 micro-steps, 2147483648 / 1 = 2^31: both overflow an int
    HOSTILE_TIMEOUT=20 expect_fail "flag: -d 549755813888 (grad accumulation overflow)" \
        "$(flag_re '-d|--total-batch-size')" -- "$TRAINER" "${flags[@]}" -x 1 -d 549755813888
    HOSTILE_TIMEOUT=20 expect_fail "flag: -b 1 -t 1 -d 2147483648 (2^31 micro-steps)" \
        "$(flag_re '-d|--total-batch-size')" -- "$TRAINER" "${flags[@]}" -x 1 -b 1 -t 1 -d 2147483648
    expect_fail "flag: -f bogus (bad FFN kind)" "$(flag_re '-f|--ffn')" -- "$TRAINER" "${flags[@]}" -x 1 -f bogus
    expect_fail "flag: -e tinyy (preset typo)" "$(flag_re '-e|--model').*tinyy|Error.*tinyy.*(-e|--model)" -- \
        "$TRAINER" "${flags[@]}" -x 1 -e tinyy
    expect_fail "flag: -y 1 without -o" "$(flag_re '-y|--resume|-o|--output-dir')" -- "$TRAINER" "${flags[@]}" -x 1 -y 1
    : > "$W/a_file"
    expect_fail "flag: -o names a regular file" "Error.*(a_file)" -- "$TRAINER" "${flags[@]}" "${data[@]}" -x 1 -o "$W/a_file"

    # ---- model files given to -e: refused naming the file
    head -c $(( $(stat -c %s "$model") / 2 )) "$model" > "$W/model_half.bin"
    expect_fail "model file: truncated" "Error.*(model_half\.bin)" -- "$TRAINER" "${flags[@]}" "${data[@]}" -x 1 -e "$W/model_half.bin"
    mkdir -p "$W/model_dir.bin"
    expect_fail "model file: a directory" "Error.*(model_dir\.bin)" -- "$TRAINER" "${flags[@]}" "${data[@]}" -x 1 -e "$W/model_dir.bin"
    expect_no_match "model file: a directory is not reported as truncated" "[Tt]runcat"
    cp "$model" "$W/model_flip.bin"
    xor_byte "$W/model_flip.bin" $(( 1024 + 4 * 777 )) 0x01  # one weight's lowest mantissa bit
    expect_fail "model file: one flipped bit (checksum)" "Error.*(model_flip\.bin)" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -x 1 -e "$W/model_flip.bin"
    # a NaN at wpe[0][0] (after wte: padded_vocab_size * C floats), used by every sequence
    cp "$model" "$W/model_nan.bin"
    local wpe=$(python3 -c "import struct,sys; h=struct.unpack('<256i', open(sys.argv[1],'rb').read(1024)); print(1024 + 4 * h[4] * h[7])" "$model")
    put_f32 "$W/model_nan.bin" "$wpe" nan
    expect_fail "model file: a NaN weight, refused naming the file" "Error.*(model_nan\.bin)" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -x 1 -e "$W/model_nan.bin"
    expect_no_match "model file: a NaN weight is not blamed on the learning rate" "(^|[^[:alnum:]-])(-l|--lr)([^[:alnum:]-]|$)|learning rate"
    # the same NaN in a version-1 model file (no hash: only the check of the values can catch it);
    # from a version-2 file (hash trailer of 16 bytes) the trailer is dropped and the version set to 1
    python3 - "$W/model_nan.bin" "$W/model_nan_v1.bin" <<'PY'
import struct, sys
raw = bytearray(open(sys.argv[1], "rb").read())
if struct.unpack_from("<i", raw, 4)[0] == 2:
    raw = raw[:-16]
struct.pack_into("<i", raw, 4, 1)
open(sys.argv[2], "wb").write(raw)
PY
    expect_fail "model file: a NaN weight in a version-1 file (no hash), refused naming the file" \
        "Error.*(model_nan_v1\.bin)" -- "$TRAINER" "${flags[@]}" "${data[@]}" -x 1 -e "$W/model_nan_v1.bin"
    expect_no_match "model file: the NaN of a version-1 file is not blamed on the learning rate" \
        "(^|[^[:alnum:]-])(-l|--lr)([^[:alnum:]-]|$)|learning rate"
    expect_fail "model file: a checkpoint given to -e" "Error.*(ckpt_00000001\.bin)" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -x 1 -e "$W/base/ckpt_00000001.bin"

    # ---- checkpoints
    # truncated newest: resume takes the previous complete one (and rewrites step 2 from it)
    copy_base "$W/ck_trunc"
    truncate -s $(( $(stat -c %s "$W/ck_trunc/ckpt_00000002.bin") / 2 )) "$W/ck_trunc/ckpt_00000002.bin"
    snapshot "$W/ck_trunc" ckpt_00000001.bin model.bin
    expect_ok "checkpoint: truncated newest, resume picks the previous one" "[Rr]esum.*ckpt_00000001\.bin" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -x 2 -n 1 -o "$W/ck_trunc" -y 1
    expect_intact "checkpoint: truncated newest, the previous one intact" "$W/ck_trunc"
    # a flipped byte in the newest: the same
    copy_base "$W/ck_flip"
    xor_byte "$W/ck_flip/ckpt_00000002.bin" $(( 1024 + 4 * 1000 )) 0x10
    expect_ok "checkpoint: one flipped byte in the newest, resume picks the previous one" \
        "[Rr]esum.*ckpt_00000001\.bin" -- "$TRAINER" "${flags[@]}" "${data[@]}" -x 2 -n 1 -o "$W/ck_flip" -y 1
    # two flipped high bits in different 8-byte words of the only checkpoint: a weak checksum
    # cancels them; a real one refuses, and -y 1 with no usable checkpoint is an error
    copy_base "$W/ck_2bits"
    rm "$W/ck_2bits/ckpt_00000001.bin"
    xor_byte "$W/ck_2bits/ckpt_00000002.bin" $(( 1024 + 8 * 1000 + 7 )) 0x80
    xor_byte "$W/ck_2bits/ckpt_00000002.bin" $(( 1024 + 8 * 3000 + 7 )) 0x80
    snapshot "$W/ck_2bits"
    expect_fail "checkpoint: two flipped high bits in different words are caught" \
        "ckpt_00000002\.bin.*(checksum|hash|corrupt)|Error.*ckpt_00000002\.bin" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -x 3 -n 1 -o "$W/ck_2bits" -y 1
    expect_intact "checkpoint: two flipped bits, nothing overwritten" "$W/ck_2bits"
    # resume with a changed data order or data set: refused naming what differs
    copy_base "$W/ck_seed"
    snapshot "$W/ck_seed"
    expect_fail "checkpoint: resume with a changed --seed" "$(flag_re '--seed')" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -x 3 -n 1 -o "$W/ck_seed" -y 1 --seed 7
    expect_intact "checkpoint: changed --seed, checkpoints and log intact" "$W/ck_seed"
    copy_base "$W/ck_shuffle"
    snapshot "$W/ck_shuffle"
    expect_fail "checkpoint: resume with a changed --shuffle" "$(flag_re '--shuffle')" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -x 3 -n 1 -o "$W/ck_shuffle" -y 1 --shuffle 0
    expect_intact "checkpoint: changed --shuffle, checkpoints and log intact" "$W/ck_shuffle"
    copy_base "$W/ck_data"
    snapshot "$W/ck_data"
    expect_fail "checkpoint: resume with other -i data of the same shard count" \
        "$(flag_re '-i|--train-data')|Error.*(training data|data2/train_00)" -- \
        "$TRAINER" "${flags[@]}" -i "$W/data2/train_*.bin" -x 3 -n 1 -o "$W/ck_data" -y 1
    expect_intact "checkpoint: other -i data, checkpoints and log intact" "$W/ck_data"
    copy_base "$W/ck_model"
    snapshot "$W/ck_model"
    expect_fail "checkpoint: resume with another model (-f swiglu)" "$(flag_re '-f|--ffn|-e|--model')|Error.*(model|ffn)" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -f swiglu -x 3 -n 1 -o "$W/ck_model" -y 1
    expect_intact "checkpoint: another model, checkpoints and log intact" "$W/ck_model"

    # ---- the multiple-choice eval file (--mc-eval): refused before step 0, naming the flag or file;
    # an --overwrite 1 run refused this way removes nothing of the run it was to replace
    local mc=data/mc_examples_val.bin
    expect_fail "mc eval: -b 2 is refused naming -b (4 rows per example)" "$(flag_re '-b|--batch-size').*--mc-eval" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -x 1 --mc-eval "$mc"
    expect_fail "mc eval: a missing file, named" "Error.*(missing_mc\.bin)" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -b 4 -x 1 --mc-eval "$W/missing_mc.bin"
    expect_no_match "mc eval: a missing file is refused before step 0" "^step +[0-9]|^val loss|^mc acc"
    copy_base "$W/mc_out"
    snapshot "$W/mc_out"
    expect_fail "mc eval: a token shard given as the eval file (bad magic), named" "Error.*(train_000\.bin).*magic" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -b 4 -x 1 --mc-eval "$W/data/train_000.bin" -o "$W/mc_out" --overwrite 1
    expect_no_match "mc eval: a bad file is refused before step 0" "^step +[0-9]|^val loss|^mc acc"
    expect_intact "mc eval: the refused --overwrite 1 run left the other run's files intact" "$W/mc_out"
    head -c 2000 "$mc" > "$W/mc_truncated.bin"
    expect_fail "mc eval: a truncated file, named" "Error.*(mc_truncated\.bin).*truncated" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -b 4 -x 1 --mc-eval "$W/mc_truncated.bin"
    expect_fail "mc eval: -t shorter than an example, refused naming T" "Error.*(mc_examples_val\.bin).*T = 16" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -b 4 -t 16 -x 1 --mc-eval "$mc"

    # ---- memory: a model that cannot fit is refused before allocating, with the numbers
    # (d48 with 65536 experts: about 11.5e9 parameters, well over 100 GiB with AdamW state, on
    # any host or GPU lent). The CPU trainer runs under a virtual-memory limit, so a trainer that
    # does try to allocate fails on malloc instead of pushing this machine out of memory.
    local limit=()
    [[ "$TRAINER" == *_cpu ]] && limit=(bash -c 'ulimit -v 8388608 && exec "$@"' limit)
    expect_fail "memory: a model too big for this machine, refused up front with numbers" \
        "[Mm]emory.*[0-9.]+ ?(GiB|GB|MiB|MB|bytes)|[0-9.]+ ?(GiB|GB|MiB|MB|bytes).*[Mm]emory" -- \
        "${limit[@]+"${limit[@]}"}" "$TRAINER" -e d48 --experts 65536 -b 1 -t 32 -x 1 -v 0 -s 0 -j "" "${data[@]}"

    # ---- output files
    # a stale .tmp of an interrupted checkpoint write is removed at start with a note
    copy_base "$W/out_tmp"
    head -c 4096 "$W/base/ckpt_00000001.bin" > "$W/out_tmp/ckpt_00000009.bin.tmp"
    snapshot "$W/out_tmp" ckpt_00000001.bin ckpt_00000002.bin
    expect_ok "output: a stale .tmp is removed with a note naming it" "ckpt_00000009\.bin\.tmp" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -x 3 -n 1 -o "$W/out_tmp" -y 1
    check "output: the stale .tmp is gone" test ! -e "$W/out_tmp/ckpt_00000009.bin.tmp"
    expect_intact "output: stale .tmp, the checkpoints before intact" "$W/out_tmp"
    # a full disk while writing a checkpoint: a tmpfs that holds the first run's files but not one
    # more checkpoint (needs root: mount)
    local full=$W/full_disk
    mkdir -p "$full"
    local ck_bytes=$(stat -c %s "$W/base/ckpt_00000001.bin") model_bytes=$(stat -c %s "$model")
    if mount -t tmpfs -o size=$(( (ck_bytes + model_bytes) / 1024 + 1024 ))k tmpfs "$full" 2>/dev/null; then
        hostile_mounts+=("$full")
        expect_ok "full disk: (setup) one step, its checkpoint and model file fit" "" -- \
            "$TRAINER" "${flags[@]}" "${data[@]}" -x 1 -n 1 -o "$full/run"
        snapshot "$full/run" ckpt_00000001.bin model.bin
        expect_fail "full disk: the next checkpoint write fails naming the file" \
            "Error.*(ckpt_00000002|$full/run)" -- "$TRAINER" "${flags[@]}" "${data[@]}" -x 2 -n 1 -o "$full/run" -y 1
        expect_intact "full disk: the checkpoint and model file before intact" "$full/run"
        check "full disk: no partial checkpoint or .tmp left" \
            test -z "$(ls "$full/run" | grep -E 'ckpt_00000002|\.tmp')"
    else
        hostile_skip "full disk" "cannot mount a tmpfs here (needs root)"
    fi
    # the same for any user: the next write's .tmp is a link to /dev/full ("No space left on
    # device"); a run of several processes stops every rank this way (test_loop_ranks)
    local dfull=$W/dev_full
    expect_ok "/dev/full: (setup) one step, its checkpoint and model file" "" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -x 1 -n 1 -o "$dfull"
    snapshot "$dfull" ckpt_00000001.bin model.bin
    ln -s /dev/full "$dfull/ckpt_00000002.bin.tmp"
    expect_rc "/dev/full: a checkpoint write fails with exit 1 naming the file and the cause" 1 \
        "Error.*ckpt_00000002\.bin\.tmp.*No space left on device" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -x 2 -n 1 -o "$dfull" -y 1
    expect_intact "/dev/full: the checkpoint and model file before intact" "$dfull"
    check "/dev/full: no checkpoint 2 and no .tmp left" test -z "$(ls -A "$dfull" | grep -E 'ckpt_00000002|\.tmp')"
    ln -s /dev/full "$dfull/model.bin.tmp"
    expect_rc "/dev/full: a model file write fails with exit 1 naming the file and the cause" 1 \
        "Error.*model\.bin\.tmp.*No space left on device" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -x 2 -n 1 -o "$dfull" -y 1
    expect_intact "/dev/full: ... the model file before is intact (no rename)" "$dfull"
    check "/dev/full: ... the checkpoint of step 2 is written, no .tmp left" \
        bash -c "[ -f '$dfull/ckpt_00000002.bin' ] && ! ls -A '$dfull' | grep -q '\.tmp'"
    # the log on a device that is always full
    expect_fail "output: --log-file /dev/full, the write error ends the run" "Error.*(/dev/full)" -- \
        "$TRAINER" "${flags[@]}" "${data[@]}" -x 2 --log-file /dev/full
}

hostile_cases_input
