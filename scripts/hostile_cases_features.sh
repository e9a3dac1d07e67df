# Hostile-input cases of the features added after the first sweep: the tools around --mc-eval
# (dev/data/hellaswag.py's offline JSONL mode), --mc-eval and --mc-every in the trainer, the moe
# flags, --plan and the number flags. Sourced by scripts/test_hostile.sh (after
# scripts/hostile_lib.sh); uses TRAINER and HOSTILE_WORK. Everything lives in $HOSTILE_WORK/features.
# hellaswag.py's cases that tokenize need the GPT-2 BPE files: TIKTOKEN_DIR (default
# ../shared/data/tiktoken next to the repository), else they are skipped.

hostile_cases_features() {
    local W=$HOSTILE_WORK/features
    mkdir -p "$W"
    local tiktoken=${TIKTOKEN_DIR:-../shared/data/tiktoken}
    local good='{"context": "The cat sat on the", "endings": ["mat.", "moon.", "sky.", "sea."], "label": 0}'

    # ---- dev/data/hellaswag.py jsonl: every bad input is one message naming the file and line
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
}

hostile_cases_features
