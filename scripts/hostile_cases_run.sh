# Hostile-input cases of a training run's life (sourced by scripts/test_hostile.sh, which sources
# scripts/hostile_lib.sh first and sets TRAINER and HOSTILE_WORK): signals, two runs in one
# output directory, -y 1 without a usable checkpoint, a log on a full disk, non-finite values,
# resume past -x. Every case names the outcome it expects and checks that files saved before
# are intact. The shared loop (llmc/train_loop.h) implements what is checked here.

RUN_TINY=(-e "$HOSTILE_MODEL" -b 2 -t 32 -s 0 --seed 3)  # tiny on the CPU, small for the CUDA trainer (hostile_lib.sh)

# a finished run of 4 steps with checkpoints at 2 and 4, model.bin and a log, in $1
hostile_run_dir() {
    rm -rf "$1"
    "$TRAINER" "${RUN_TINY[@]}" -x 4 -n 2 -v 2 -m 1 -o "$1" > "$1.out" 2>&1
}

# --- SIGTERM / SIGINT with -n 0: the step finishes, a checkpoint is written, exit 130, resumable;
# with a second argument 2 the signal comes twice, 0.2 s apart (an impatient user, a scheduler and
# a launcher both forwarding it): the same outcome (the handler was reset after one delivery, and
# the second SIGTERM killed the run without its checkpoint)
hostile_signal_case() {
    local sig=$1 times=${2:-1}
    local d="$HOSTILE_WORK/sig_${sig}_$times" out="$HOSTILE_WORK/sig_${sig}_$times.out"
    local what="SIG$sig$([ "$times" -gt 1 ] && echo " sent $times times")"
    rm -rf "$d"
    "$TRAINER" "${RUN_TINY[@]}" -v 0 -x 100000 -n 0 -o "$d" > "$out" 2>&1 &
    local pid=$! i rc step
    for ((i = 0; i < 600; i++)); do
        grep -q "^step " "$out" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -"$sig" "$pid" 2>/dev/null
    for ((i = 1; i < times; i++)); do sleep 0.2; kill -"$sig" "$pid" 2>/dev/null; done
    # the step finishes, then the checkpoint: it has HOSTILE_TIMEOUT seconds (a trainer that
    # ignores the signal is killed then)
    for ((i = 0; i < HOSTILE_TIMEOUT * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid"
    rc=$?
    step=$(sed -n 's/^stopped by a signal at step \([0-9]*\)$/\1/p' "$out")
    hostile_last_log=$out
    if [ "$rc" = 130 ] && [ -n "$step" ] && [ -f "$d/ckpt_$(printf %08d "$step").bin" ]; then
        hostile_pass "run: $what with -n 0 ends with exit 130 and a checkpoint of step $step"
        expect_ok "run: the checkpoint left by $what resumes" "resumed from .*ckpt_$(printf %08d "$step").bin" -- \
            "$TRAINER" "${RUN_TINY[@]}" -v 0 -x $((step + 1)) -o "$d" -y 1
    else
        hostile_fail "run: $what with -n 0" "exit status $rc (130 expected), stop step '$step', files: $(ls "$d" 2>/dev/null | tr '\n' ' ')"
    fi
}
hostile_signal_case TERM
hostile_signal_case INT
hostile_signal_case TERM 2

# --- a fresh run into another run's directory is refused; --overwrite 1 replaces it
D="$HOSTILE_WORK/used"
hostile_run_dir "$D"
snapshot "$D"
expect_fail "run: a fresh run into another run's output directory is refused" "another run.*--overwrite 1" -- \
    "$TRAINER" "${RUN_TINY[@]}" -v 0 -x 2 -o "$D"
expect_intact "run: ... and the other run's checkpoints, model and log are intact" "$D"
expect_fail "run: a fresh run whose --log-file holds another run's log is refused" "another run.*log" -- \
    "$TRAINER" "${RUN_TINY[@]}" -v 0 -x 2 --log-file "$D/log.jsonl"
expect_intact "run: ... and that log is intact" "$D"
expect_ok "run: --overwrite 1 replaces another run's files" "overwrite 1: removed 3" -- \
    "$TRAINER" "${RUN_TINY[@]}" -v 0 -x 1 -o "$D" --overwrite 1
check "run: ... leaving only the new run's checkpoint, model and log (1 step)" \
    bash -c "[ \"\$(ls '$D' | tr '\n' ' ')\" = 'ckpt_00000001.bin log.jsonl model.bin ' ] && [ \$(grep -c '\"type\":\"train\"' '$D/log.jsonl') = 1 ]"
expect_fail "run: -y 1 with --overwrite 1 is refused" "contradict" -- \
    "$TRAINER" "${RUN_TINY[@]}" -v 0 -x 2 -o "$D" -y 1 --overwrite 1

# --- -y 1 without a usable checkpoint is an error; nothing is overwritten
D="$HOSTILE_WORK/corrupt"
hostile_run_dir "$D"
for f in "$D"/ckpt_*.bin; do  # flip one byte in the middle of each checkpoint
    size=$(stat -c %s "$f")
    printf '\x5a' | dd of="$f" bs=1 seek=$((size / 2)) conv=notrunc status=none
done
snapshot "$D"
expect_fail "run: -y 1 when every checkpoint is corrupt is an error naming the directory" \
    "none of the 2 checkpoint file.* in $D is usable" -- "$TRAINER" "${RUN_TINY[@]}" -v 0 -x 6 -o "$D" -y 1
expect_intact "run: ... and the corrupt checkpoints, model and log are left as they were" "$D"
mkdir -p "$HOSTILE_WORK/empty"
expect_fail "run: -y 1 on a directory without checkpoints is an error" "no checkpoint in $HOSTILE_WORK/empty" -- \
    "$TRAINER" "${RUN_TINY[@]}" -v 0 -x 2 -o "$HOSTILE_WORK/empty" -y 1
check "run: ... and wrote nothing there" bash -c "[ -z \"\$(ls -A '$HOSTILE_WORK/empty')\" ]"

# --- a log on a full disk: the run ends non-zero naming the file, its state saved first
D="$HOSTILE_WORK/fulldisk"
rm -rf "$D"
expect_fail "run: a log write error (/dev/full) ends the run naming the file" "log file \"/dev/full\".*No space" -- \
    "$TRAINER" "${RUN_TINY[@]}" -v 0 -x 4 -n 0 -o "$D" --log-file /dev/full
check "run: ... after a checkpoint of the state reached (step 1)" test -f "$D/ckpt_00000001.bin"
check "run: ... and no model.bin (the run did not finish)" test ! -e "$D/model.bin"
snapshot "$D"
expect_fail "run: a resume whose log cannot be written (/dev/full) ends naming the file" "log file \"/dev/full\"" -- \
    "$TRAINER" "${RUN_TINY[@]}" -v 0 -x 4 -n 0 -o "$D" --log-file /dev/full -y 1
check "run: ... after a checkpoint of the step it reached (step 2)" test -f "$D/ckpt_00000002.bin"
expect_intact "run: ... and the checkpoint it resumed from is intact" "$D"

# --- non-finite values: nothing non-finite is saved, the message names the cause
D="$HOSTILE_WORK/nanval"
rm -rf "$D"
expect_fail "run: a NaN validation loss (-l 1e30) stops the run, named" "validation loss is (nan|-nan|inf)" -- \
    "$TRAINER" "${RUN_TINY[@]}" -l 1e30 -u 0 -v 1 -m 1 -x 4 -n 1 -o "$D"
check "run: ... before the checkpoint of those weights or a model.bin is written" \
    bash -c "! ls '$D' | grep -q -e '^ckpt_00000001.bin\$' -e '^model.bin\$'"
D="$HOSTILE_WORK/nanresume"
hostile_run_dir "$D"
mkdir -p "$D.saved"
cp "$D"/ckpt_*.bin "$D/model.bin" "$D.saved/"
expect_fail "run: a resume that diverges (-l 1e30) stops with the last good checkpoint named" \
    "last good checkpoint is .*ckpt_00000004.bin" -- \
    "$TRAINER" "${RUN_TINY[@]}" -l 1e30 -u 0 --schedule constant -v 1 -m 1 -x 8 -n 1 -o "$D" -y 1
check "run: ... the checkpoints and model saved before are intact" \
    bash -c "for f in '$D.saved'/*; do cmp -s \"\$f\" '$D'/\$(basename \"\$f\") || exit 1; done"
check "run: ... and no checkpoint of the diverged weights is left for -y 1" \
    bash -c "[ \"\$(ls '$D' | grep -c '^ckpt_.*bin\$')\" = 2 ]"
D="$HOSTILE_WORK/nantrain"
rm -rf "$D"
expect_fail "run: a non-finite training loss or norm (-l 1e30, no validation) is named" \
    "(training loss|gradient norm) is (nan|-nan|inf)" -- \
    "$TRAINER" "${RUN_TINY[@]}" -l 1e30 -u 0 --schedule constant -v 0 -x 6 -n 1 -o "$D"
check "run: ... its diverged checkpoint is moved aside, not left for -y 1" \
    bash -c "! ls '$D' | grep -q -e '^ckpt_[0-9]*.bin\$' -e '^model.bin\$' && ls '$D' | grep -q 'diverged'"

# --- a resume whose checkpoint is past -x: an error; exactly at -x: complete, nothing written
D="$HOSTILE_WORK/pastx"
hostile_run_dir "$D"
snapshot "$D"
expect_fail "run: -y 1 with the checkpoint past -x is an error naming -x and the step" "step 4, past .*-x 3" -- \
    "$TRAINER" "${RUN_TINY[@]}" -v 2 -m 1 -x 3 -n 2 -o "$D" -y 1
expect_intact "run: ... and writes nothing" "$D"
expect_ok "run: -y 1 with the checkpoint at -x: the run is already complete" "already complete" -- \
    "$TRAINER" "${RUN_TINY[@]}" -v 2 -m 1 -x 4 -n 2 -o "$D" -y 1
expect_intact "run: ... and writes nothing" "$D"
