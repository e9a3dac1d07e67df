# Hostile-input cases of the features added after the first sweep: the tools around --mc-eval
# (dev/data/hellaswag.py's offline JSONL mode), --mc-eval and --mc-every in the trainer, the moe
# flags, --plan and the number flags. Sourced by scripts/test_hostile.sh (after
# scripts/hostile_lib.sh); uses TRAINER and HOSTILE_WORK. Everything lives in $HOSTILE_WORK/features.
# hellaswag.py's cases need numpy (else skipped); those that tokenize need the GPT-2 BPE files:
# TIKTOKEN_DIR (default ../shared/data/tiktoken next to the repository), else they are skipped.

# ---- dev/data/hellaswag.py jsonl: every bad input is one message naming the file and line; in $1
hostile_cases_hellaswag() {
    local W=$1
    local tiktoken=${TIKTOKEN_DIR:-../shared/data/tiktoken}
    local good='{"context": "The cat sat on the", "endings": ["mat.", "moon.", "sky.", "sea."], "label": 0}'
    local hs=(python3 dev/data/hellaswag.py jsonl)
    echo '["The cat sat on the", ["mat."]]' > "$W/hs_list.jsonl"
    expect_fail "hellaswag.py: a line that is JSON but not an object, named" \
        "^Error: .*hs_list\.jsonl line 1: expected a JSON object" -- "${hs[@]}" "$W/hs_list.jsonl" -o "$W/hs.bin"
    expect_no_match "hellaswag.py: ... without a traceback" "Traceback"
    { echo "$good"; printf '{"context": "caf\xe9", "endings": ["a", "b", "c", "d"], "label": 1}\n'; } > "$W/hs_latin1.jsonl"
    expect_fail "hellaswag.py: a file that is not UTF-8, named with the byte" \
        "^Error: .*hs_latin1\.jsonl: not UTF-8 text .* at byte [0-9]+" -- "${hs[@]}" "$W/hs_latin1.jsonl" -o "$W/hs.bin"
    expect_no_match "hellaswag.py: ... without a traceback" "Traceback"
    expect_fail "hellaswag.py: a missing file, named" "^Error: .*hs_missing\.jsonl: no such file" -- \
        "${hs[@]}" "$W/hs_missing.jsonl" -o "$W/hs.bin"
    mkdir -p "$W/hs_dir.jsonl"
    expect_fail "hellaswag.py: a directory, named" "^Error: .*hs_dir\.jsonl: is not a regular file" -- \
        "${hs[@]}" "$W/hs_dir.jsonl" -o "$W/hs.bin"
    mkfifo "$W/hs_fifo.jsonl"
    HOSTILE_TIMEOUT=10 expect_fail "hellaswag.py: a FIFO is refused, no hang" "^Error: .*hs_fifo\.jsonl: is not a regular file" -- \
        "${hs[@]}" "$W/hs_fifo.jsonl" -o "$W/hs.bin"
    echo '{"context": "The cat sat on the", "endings": ["mat.", "moon.", "sky.", "sea."], "label": true}' > "$W/hs_bool.jsonl"
    expect_fail "hellaswag.py: label true is not taken as 1" "^Error: .*hs_bool\.jsonl line 1: expected 'label'" -- \
        "${hs[@]}" "$W/hs_bool.jsonl" -o "$W/hs.bin"
    echo '{"context": "The cat sat on the", "endings": ["mat.", "moon.", "sky.", "sea."], "label": "²"}' > "$W/hs_sup.jsonl"
    expect_fail "hellaswag.py: label \"²\" (a digit to str.isdigit, not to int)" "^Error: .*hs_sup\.jsonl line 1: expected 'label'" -- \
        "${hs[@]}" "$W/hs_sup.jsonl" -o "$W/hs.bin"
    check "hellaswag.py: the refused inputs wrote nothing" test ! -e "$W/hs.bin"
    # the output: refused naming -o, no half-written file (.tmp) left
    echo "$good" > "$W/hs_good.jsonl"
    mkdir -p "$W/hs_out_dir"
    expect_fail "hellaswag.py: -o names a directory, refused naming -o" "^Error: -o .*hs_out_dir: is a directory" -- \
        "${hs[@]}" "$W/hs_good.jsonl" -o "$W/hs_out_dir"
    check "hellaswag.py: ... and nothing was written beside it" test ! -e "$W/hs_out_dir.tmp"
    cp "$W/hs_good.jsonl" "$W/hs_same.jsonl"
    snapshot "$W" hs_same.jsonl
    expect_fail "hellaswag.py: -o the input file (or any file but an eval file) is refused naming -o" \
        "^Error: -o .*hs_same\.jsonl: exists and is not an eval file" -- \
        "${hs[@]}" "$W/hs_same.jsonl" -o "$W/hs_same.jsonl" --tiktoken-dir "$tiktoken"
    expect_intact "hellaswag.py: ... and the input is intact (it was replaced by the eval file)" "$W"
    if [ -d "$tiktoken" ]; then
        expect_ok "hellaswag.py: (setup) a good file converts" "^wrote 1 examples" -- \
            "${hs[@]}" "$W/hs_good.jsonl" -o "$W/hs_good.bin" --tiktoken-dir "$tiktoken"
        ln -s /dev/full "$W/hs_full.bin.tmp"
        expect_fail "hellaswag.py: a write error (/dev/full) is one message naming -o and the cause" \
            "^Error: -o .*hs_full\.bin: cannot write the eval file: No space left on device" -- \
            "${hs[@]}" "$W/hs_good.jsonl" -o "$W/hs_full.bin" --tiktoken-dir "$tiktoken"
        expect_no_match "hellaswag.py: ... without a traceback" "Traceback"
        check "hellaswag.py: ... and no eval file or .tmp is left" test ! -e "$W/hs_full.bin" -a ! -e "$W/hs_full.bin.tmp"
    else
        hostile_skip "hellaswag.py: write errors" "no GPT-2 BPE files in $tiktoken (set TIKTOKEN_DIR)"
    fi
}

hostile_cases_features() {
    local W=$HOSTILE_WORK/features
    mkdir -p "$W"
    if python3 -c "import numpy" 2>/dev/null; then
        hostile_cases_hellaswag "$W"
    else
        hostile_skip "hellaswag.py" "python3 has no numpy"
    fi

    # ---- --mc-eval in the trainer (the file's format: test_mc_eval; the basic cases: hostile_cases_input.sh)
    make_shard "$W/mc_train.bin" 3000
    local mcflags=(-e "$HOSTILE_MODEL" -b 4 -t 32 -v 0 -s 0 -j "" -i "$W/mc_train.bin")
    expect_fail "mc eval: --mc-every without --mc-eval is refused naming both (it was ignored)" \
        "$(flag_re '--mc-every').*--mc-eval.*not given" -- "$TRAINER" "${mcflags[@]}" -x 1 --mc-every 5
    # (these passed already) a directory; a bad file on -y 1 is refused before any step, the run intact
    expect_fail "mc eval: a directory, named" "Error: .*'$W': is a directory" -- \
        "$TRAINER" "${mcflags[@]}" -x 1 --mc-eval "$W"
    expect_ok "mc eval: (setup) a run with --mc-eval, checkpoints at steps 1 and 2" "^mc acc" -- \
        "$TRAINER" "${mcflags[@]}" -x 2 -n 1 --mc-eval data/mc_examples_val.bin -o "$W/mc_run"
    snapshot "$W/mc_run"
    expect_fail "mc eval: -y 1 with a token shard as the eval file, named" "Error: .*mc_train\.bin.*magic" -- \
        "$TRAINER" "${mcflags[@]}" -x 3 -n 1 --mc-eval "$W/mc_train.bin" -o "$W/mc_run" -y 1
    expect_no_match "mc eval: ... before any step" "^step +[0-9]|^mc acc"
    expect_intact "mc eval: ... the run's checkpoints and log intact" "$W/mc_run"

    # ---- moe: -y 1 with other moe flags is refused naming the changed flag (the expert width
    # follows the counts, so it was named instead: "ffn_hidden (--hidden) is 48 ... but 64"),
    # and the run's checkpoints and log stay as they were
    local mflags=(-e "$HOSTILE_MODEL" -b 2 -t 32 -v 0 -s 0 -j "" -i "$W/moe_train.bin")
    make_shard "$W/moe_train.bin" 3000
    expect_ok "moe: (setup) a --moepp 1 run, checkpoints at steps 1 and 2" "" -- \
        "$TRAINER" "${mflags[@]}" -f moe --moepp 1 -x 2 -n 1 -o "$W/moe_run"
    snapshot "$W/moe_run"
    expect_fail "moe: -y 1 without --moepp names --moe-zero (1 in the checkpoint, 0 now)" \
        "Error: checkpoint .*ckpt_00000002\.bin.*moe_zero \(--moe-zero\) is 1 in the checkpoint but 0" -- \
        "$TRAINER" "${mflags[@]}" -f moe -x 3 -n 1 -o "$W/moe_run" -y 1
    expect_no_match "moe: ... not --hidden, which the user did not give" "--hidden"
    expect_fail "moe: -y 1 with --moe-experts 4 names --moe-experts" \
        "Error: checkpoint .*moe_experts \(--moe-experts\) is [0-9]+ in the checkpoint but 4" -- \
        "$TRAINER" "${mflags[@]}" -f moe --moepp 1 --moe-experts 4 -x 3 -n 1 -o "$W/moe_run" -y 1
    expect_fail "moe: -y 1 with --moe-router linear names it in words" \
        "Error: checkpoint .*moe_router \(--moe-router\) is tanh in the checkpoint but linear" -- \
        "$TRAINER" "${mflags[@]}" -f moe --moepp 1 --moe-router linear -x 3 -n 1 -o "$W/moe_run" -y 1
    expect_intact "moe: the refused resumes left the checkpoints and log intact" "$W/moe_run"

    # ---- --plan (no GPU, no data): sizes whose byte counts would overflow 64 bits are refused
    # naming -b and -t (the plan printed wrapped-around numbers: activations 2.2e14 bytes for
    # 2^65); a plan that is merely too big for any GPU is still printed, with its true numbers
    expect_fail "plan: swiglu --hidden 2^31-1 at B*T = 2^31-64, refused naming -b and -t" \
        "$(flag_re '-b').* -t 64: one micro-batch .* more than 2\^60" -- \
        "$TRAINER" --plan 1 -e tiny -f swiglu --hidden 2147483647 -b 33554431 -t 64
    expect_no_match "plan: ... and no plan is printed" "^plan_bytes"
    expect_fail "plan: moe with 65536 constant experts, all chosen, refused the same way" \
        "$(flag_re '-b').*one micro-batch .* more than 2\^60" -- \
        "$TRAINER" --plan 1 -e tiny -f moe --moe-experts 0 --moe-const 65536 --moe-topk 65536 -b 33554431 -t 64
    expect_ok "plan: d48 at B*T = 2^31-1024 is printed (it fits no GPU)" \
        "^fits an H100 80GB \(79 GiB free\): no; an H200 \(139 GiB free\): no" -- \
        "$TRAINER" --plan 1 -e d48 -b 2097151 -t 1024
    check "plan: ... with its true activation bytes (5.75e15, not wrapped)" \
        grep -q "activations=5750623466184900 " "$hostile_case_log"
    # the same bound for a run: refused before any allocation (the CPU trainer's products wrap too)
    make_shard "$W/train_000.bin" 70000
    expect_fail "plan: a run of a moe model whose expert buffers pass 2^64 bytes, refused naming -b and -t" \
        "$(flag_re '-b').*one micro-batch .* more than 2\^60" -- \
        "$TRAINER" -e tiny -f moe --moe-experts 0 --moe-shared 0 --moe-zero 65536 --moe-topk 65536 \
        --hidden 2147483647 -b 1024 -t 64 -x 1 -v 0 -s 0 -j "" -i "$W/train_000.bin"
}

hostile_cases_features
