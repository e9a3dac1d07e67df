#!/usr/bin/env bash
# bench_llmc.sh - our dense GPT-2 124M step against llm.c, built with cuDNN flash attention (its
# best configuration on Hopper) and without, in one call on one GPU, so the ratio cannot drift.
#
#   bash dev/bench_llmc.sh prepare LLMC_DIR   here, once: copies an llm.c checkout (git clone
#       https://github.com/karpathy/llm.c) into carry/llm.c with the two fixes it needs to build
#       with CUDA 13, and the cudnn-frontend headers (PyPI wheel nvidia-cudnn-frontend, include/)
#       into carry/cudnn-frontend/include; carry/ is git-ignored and travels with carry ["carry"]
#   bash dev/bench_llmc.sh                     on the GPU machine: builds both llm.c variants and
#       ./train_omnimoe, runs them alternating (REPEATS rounds), prints a table and the ratios last,
#       then for each OURS_EXTRA set whether its losses and norms equal ours' bitwise (same seed)
#
# Same flags for every trainer: d12 (GPT-2 124M, random init), B=32, T=1024, lr 6e-4, 10 warm-up
# steps, cosine to 0.1 of the peak, weight decay 0.1, STEPS=40 steps, no validation or sampling
# inside the timed steps; llm.c with -r 0 (no recomputation, as we do). llm.c with cuDNN runs twice
# a round: at its default -ge 0 (its GELU unfused: "off for now" in its source) and with -ge 2 (the
# GELU in cuBLASLt's forward and backward epilogues, as our CUDA default --gelu-fusion 2). tok/s is
# each trainer's own per-step figure; the median over steps SKIP+1..STEPS of each run is reported.
# Beside it, from nvidia-smi samples every POWER_MS (100) ms of each run, the later half of those
# taken while it draws at least 40% of the power limit (the timed steps): the median SM clock, the
# mean power, the share of samples with the software power cap active, and energy per token (mean
# power / tok/s, in mJ).
set -uo pipefail
cd "$(dirname "$0")/.."
LLMC=carry/llm.c
CFE=carry/cudnn-frontend/include   # shared with our `make USE_CUDNN=1` (Makefile)

if [ "${1:-}" = prepare ]; then
    src=${2:?usage: bash dev/bench_llmc.sh prepare LLMC_DIR}
    rm -rf "$LLMC" && mkdir -p "$LLMC"
    if git -C "$src" cat-file -e HEAD:train_gpt2.cu 2>/dev/null; then   # a clone, bare or not
        git -C "$src" archive HEAD | tar -x -C "$LLMC"
        git -C "$src" rev-parse HEAD > "$LLMC/COMMIT"
    elif [ -f "$src/train_gpt2.cu" ]; then
        cp -r "$src"/. "$LLMC"/
    else
        echo "bench_llmc: $src has no train_gpt2.cu (expected an llm.c checkout)"; exit 1
    fi
    # fix 1: CUDA 13's cudaMemAdvise takes a cudaMemLocation, not a device id
    python3 - "$LLMC/llmc/cuda_utils.cuh" <<'EOF' || exit 1
import sys
p = sys.argv[1]
s = open(p).read()
old = "cudaMemAdvise(*out, bytes, cudaMemAdviseSetPreferredLocation, cudaCpuDeviceId)"
new = "cudaMemAdvise(*out, bytes, cudaMemAdviseSetPreferredLocation, cudaMemLocation{cudaMemLocationTypeHost, 0})"
if old not in s:
    sys.exit("bench_llmc: %s: the cudaMemAdvise call to fix was not found (another llm.c version?)" % p)
open(p, "w").write(s.replace(old, new))
EOF
    # fix 2 (at build time below): the cuDNN build links -lnvrtc -lcuda, which cudnn-frontend needs
    if [ ! -d "$CFE/cudnn_frontend" ]; then
        tmp=$(mktemp -d)
        python3 -m pip download --no-deps nvidia-cudnn-frontend -d "$tmp" >/dev/null \
            || { echo "bench_llmc: pip download nvidia-cudnn-frontend failed"; exit 1; }
        python3 -m zipfile -e "$tmp"/nvidia_cudnn_frontend-*.whl "$tmp/x"
        mkdir -p "$(dirname "$CFE")" && cp -r "$tmp/x/include" "$CFE"
        rm -rf "$tmp"
    fi
    echo "bench_llmc: prepared $LLMC ($(cat "$LLMC/COMMIT" 2>/dev/null || echo 'no git commit')) and $CFE"
    exit 0
fi

STEPS=${STEPS:-40}
SKIP=${SKIP:-10}
REPEATS=${REPEATS:-2}
OURS_CUDNN=${OURS_CUDNN:-0}   # 1: ./train_omnimoe was built with USE_CUDNN=1; also run it with --attention cudnn
OURS_EXTRA=${OURS_EXTRA:-}    # more runs of ours, flag sets separated by ';', e.g. "--gelu-fusion 1;--overlap-dweight 0"
B=${B:-32}
RUN_TIMEOUT=${RUN_TIMEOUT:-180}
TRAIN=data/tinyshakespeare/tiny_shakespeare_train.bin
# llm.c opens its validation loader even when it never evaluates, and asserts that the shard holds
# B*T+1 tokens; tinyshakespeare's val shard (32k tokens) is smaller, so both loaders read the train shard
VAL=$TRAIN
D=${BENCH_DIR:-${OUT:-/tmp}/bench_llmc}
mkdir -p "$D"
[ -f "$LLMC/train_gpt2.cu" ] || { echo "bench_llmc: $LLMC missing: run 'bash dev/bench_llmc.sh prepare LLMC_DIR' and carry carry/"; exit 1; }
[ -d "$CFE/cudnn_frontend" ] || { echo "bench_llmc: $CFE missing: run the prepare step"; exit 1; }
# BENCH_BUILD_ONLY=DIR (dev/prebuild.sh llmc, on a machine without a GPU): build llm.c's two
# variants for Hopper into DIR and stop. Such a machine has no driver, so no libnvidia-ml to link:
# the link flags below leave it out (llm.c calls NVML only for -lg, its GPU-status lines, which
# these runs don't ask for; without nvml.h it builds them out)
plain_link=() cudnn_link=()
if [ -n "${BENCH_BUILD_ONLY:-}" ]; then
    D=$BENCH_BUILD_ONLY; arch=90
    plain_link=(NVCC_LDFLAGS="-lcublas -lcublasLt") cudnn_link=(NVCC_LDFLAGS="-lcublas -lcublasLt -lcudnn")
else
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
    echo "bench_llmc: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), llm.c $(cat "$LLMC/COMMIT" 2>/dev/null)"
fi

build() {  # build <name> <make args...>: llm.c's train_gpt2cu copied to $D/<name>
    local name=$1; shift
    ln -sfn ../cudnn-frontend "$LLMC/cudnn-frontend"   # llm.c's Makefile looks in ./cudnn-frontend/include
    (cd "$LLMC" && make clean >/dev/null 2>&1; make -j"$(nproc)" train_gpt2cu GPU_COMPUTE_CAPABILITY="$arch" "$@") \
        > "$D/build_$name.log" 2>&1 && cp "$LLMC/train_gpt2cu" "$D/$name" \
        || { tail -n 20 "$D/build_$name.log"; echo "bench_llmc: FAIL: build $name"; exit 1; }
}
# one GPU: NCCL and MPI off, so the NVCC_LDLIBS given here (it replaces the Makefile's) lacks nothing
# the two llm.c programs: unpacked by 'dev/prebuild.sh --unpack llmc' into $LLMC/bin, else built here
if [ -z "${BENCH_BUILD_ONLY:-}" ] && [ -x "$LLMC/bin/llmc_cudnn" ] && [ -x "$LLMC/bin/llmc_plain" ]; then
    cp "$LLMC/bin/llmc_cudnn" "$LLMC/bin/llmc_plain" "$D/"
    echo "bench_llmc: llm.c programs from $LLMC/bin (dev/prebuild.sh)"
else
    build llmc_cudnn USE_CUDNN=1 NO_MULTI_GPU=1 NO_USE_MPI=1 NVCC_LDLIBS="-lnvrtc -lcuda" "${cudnn_link[@]}"
    build llmc_plain USE_CUDNN=0 NO_MULTI_GPU=1 NO_USE_MPI=1 "${plain_link[@]}"
fi
if [ -n "${BENCH_BUILD_ONLY:-}" ]; then exit 0; fi
if [ "$OURS_CUDNN" = 1 ]; then make USE_CUDNN=1 train_omnimoe > "$D/build_ours.log" 2>&1; else make train_omnimoe > "$D/build_ours.log" 2>&1; fi \
    || { tail -n 20 "$D/build_ours.log"; echo "bench_llmc: FAIL: build ours"; exit 1; }

# the GPU's SM clock, power draw and power-cap state every POWER_MS ms of each run, into <log>.power:
# at B=32 both trainers draw the board's power limit and the driver lowers the clock, so a kernel's
# time at full clock (the kernel benchmarks) is not what it costs in the step; energy per token is
# (power.draw.instant: power.draw is a one-second average on these drivers, which lags each run)
power_fields=
for f in clocks.sm,power.draw.instant,clocks_event_reasons.sw_power_cap clocks.sm,power.draw,clocks_event_reasons.sw_power_cap \
         clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap; do
    nvidia-smi --query-gpu=$f --format=csv,noheader,nounits > /dev/null 2>&1 && { power_fields=$f; break; }
done
POWER_LIMIT_W=$(nvidia-smi --query-gpu=power.limit --format=csv,noheader,nounits | head -1)
sampled() {  # sampled <log> <command...>: the command, with the sampler beside it
    local log=$1 sampler rc; shift
    [ -n "$power_fields" ] || { "$@"; return; }
    nvidia-smi --query-gpu=$power_fields --format=csv,noheader,nounits -lms "${POWER_MS:-100}" > "$log.power" 2>&1 &
    sampler=$!
    "$@"; rc=$?
    kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
    return $rc
}
run_llmc() {  # run_llmc <binary> <log> [more flags]
    local bin=$1 log=$2; shift 2
    sampled "$log" timeout -k 5 "$RUN_TIMEOUT" "$D/$bin" -e d12 -i "$TRAIN" -j "$VAL" -b "$B" -t 1024 -x "$STEPS" \
        -l 6e-4 -u 10 -q 0.1 -c 0.1 -r 0 -v 100000 -m 1 -s 100000 -h 0 "$@" > "$log" 2>&1
}
run_ours() {  # run_ours <log> [more flags]: the JSONL log is <log>.jsonl
    local log=$1; shift
    rm -f "$log.jsonl"   # the trainer refuses to start a fresh run over another run's log
    sampled "$log" timeout -k 5 "$RUN_TIMEOUT" ./train_omnimoe -e d12 -f gelu -i "$TRAIN" --val-data= -b "$B" -t 1024 \
        -x "$STEPS" -l 6e-4 -u 10 -q 0.1 --schedule cosine -c 0.1 -v 0 -s 0 --log-file "$log.jsonl" "$@" > "$log" 2>&1
}
# OURS_EXTRA's flag sets, blank ones dropped (as the summary below drops them, so that ours_extra<i> names the same set)
extras=()
IFS=';' read -ra extra_sets <<< "$OURS_EXTRA"
for e in "${extra_sets[@]}"; do [[ "$e" =~ [^[:space:]] ]] && extras+=("$e"); done
for round in $(seq 1 "$REPEATS"); do   # alternate, so drift in clocks or heat hits every trainer alike
    run_llmc llmc_cudnn "$D/llmc_cudnn_$round.out" || echo "llmc_cudnn round $round: exit $?"
    run_llmc llmc_cudnn "$D/llmc_cudnn_ge2_$round.out" -ge 2 || echo "llmc_cudnn_ge2 round $round: exit $?"
    run_ours "$D/ours_$round.out" || echo "ours round $round: exit $?"
    if [ "$OURS_CUDNN" = 1 ]; then run_ours "$D/ours_cudnn_$round.out" --attention cudnn || echo "ours_cudnn round $round: exit $?"; fi
    for i in "${!extras[@]}"; do
        # shellcheck disable=SC2086  # each entry is a list of flags
        run_ours "$D/ours_extra${i}_$round.out" ${extras[$i]} || echo "ours_extra$i round $round: exit $?"
    done
    run_llmc llmc_plain "$D/llmc_plain_$round.out" || echo "llmc_plain round $round: exit $?"
done

python3 - "$D" "$SKIP" "$REPEATS" "$OURS_CUDNN" "$OURS_EXTRA" "$POWER_LIMIT_W" <<'EOF'
import json, os, re, sys
d, skip, repeats, ours_cudnn = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
extras = [e.strip() for e in sys.argv[5].split(";") if e.strip()]
try:
    power_limit = float(sys.argv[6])
except ValueError:
    power_limit = None
step_re = re.compile(r"^step\s+(\d+)/\d+ \|.*\| ([0-9.]+) ms \| (-?[0-9.]+)% bf16 MFU \| ([0-9.]+) tok/s")

def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])

def llmc_tok_s(path):
    vals = [float(m.group(4)) for m in map(step_re.match, open(path, errors="replace")) if m and int(m.group(1)) > skip]
    return median(vals) if vals else None

def ours_train_records(path):  # the train records of ours' JSONL log (path + ".jsonl")
    for line in open(path + ".jsonl"):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("type") == "train":
            yield r

def ours_tok_s(path):
    vals = [r["tok_s"] for r in ours_train_records(path) if r.get("step", 0) > skip and r.get("tok_s")]
    return median(vals) if vals else None

def power_under_load(path):  # (median SM MHz, mean W, share power-capped) of the steady samples
    rows = []
    for line in open(path, errors="replace"):
        f = [x.strip() for x in line.split(",")]
        try:
            rows.append((float(f[0]), float(f[1]), f[2] == "Active"))
        except (ValueError, IndexError):
            continue
    # under load: above 40% of the limit; steady: the later half of those (start-up, the first
    # steps and the ramp of the power reading come first; the timed steps are the last 3/4)
    load = [r for r in rows if power_limit and r[1] >= 0.4 * power_limit]
    load = load[len(load) // 2:]
    if not load:
        return None
    return (median([r[0] for r in load]), sum(r[1] for r in load) / len(load), sum(r[2] for r in load) / len(load))
res = {}
extra_names = tuple("ours_extra%d" % i for i in range(len(extras)))
for name in ("llmc_cudnn", "llmc_cudnn_ge2", "ours", "llmc_plain") + (("ours_cudnn",) if ours_cudnn else ()) + extra_names:
    res[name] = []
    for r in range(1, repeats + 1):
        p = os.path.join(d, "%s_%d.out" % (name, r))
        try:
            res[name].append(ours_tok_s(p) if name.startswith("ours") else llmc_tok_s(p))
        except OSError:
            res[name].append(None)
label = {"llmc_cudnn": "llm.c, cuDNN flash attention", "llmc_cudnn_ge2": "llm.c, cuDNN flash attention, -ge 2",
         "ours": "ours (-f gelu)", "llmc_plain": "llm.c without cuDNN",
         "ours_cudnn": "ours (-f gelu --attention cudnn)"}
label.update({n: "ours (-f gelu %s)" % e for n, e in zip(extra_names, extras)})
power = {}
for name in res:
    power[name] = []
    for r in range(1, repeats + 1):
        try:
            power[name].append(power_under_load(os.path.join(d, "%s_%d.out.power" % (name, r))))
        except OSError:
            power[name].append(None)
# energy per token: the mean power under load over the run's median tok/s (mJ)
def mj_per_token(p, tok_s):
    return "%.3f" % (1e3 * p[1] / tok_s) if p and tok_s else "-"
print("\nSM clock, power and energy per token: the later half of the samples (every %s ms) above 40%% of the %s W limit" % (os.environ.get("POWER_MS", "100"), power_limit))
print("\n| trainer | median tok/s per run | SM clock MHz | power W | power-capped | mJ/token |\n|---|---:|---:|---:|---:|---:|")
for name, v in res.items():
    pw = power[name]
    print("| %s | %s | %s | %s | %s | %s |" % (label[name], " / ".join("%.1fk" % (x / 1e3) if x else "failed" for x in v),
          " / ".join("%.0f" % p[0] if p else "-" for p in pw), " / ".join("%.0f" % p[1] if p else "-" for p in pw),
          " / ".join("%.0f%%" % (100 * p[2]) if p else "-" for p in pw),
          " / ".join(mj_per_token(p, x) for p, x in zip(pw, v))))
best = {n: max([x for x in v if x] or [0]) for n, v in res.items()}
json.dump({"runs": res, "skip": skip, "power": power, "power_limit_w": power_limit},
          open(os.path.join(d, "bench_llmc.json"), "w"), indent=1)
if best["ours"] and best["llmc_cudnn"] and best["llmc_plain"]:
    print("ours / llm.c with cuDNN: %.3f   ours / llm.c without cuDNN: %.3f   (best run of each)"
          % (best["ours"] / best["llmc_cudnn"], best["ours"] / best["llmc_plain"]))
else:
    sys.exit("bench_llmc: a trainer produced no step lines (see %s)" % d)
if best.get("ours_cudnn") and best["llmc_cudnn"]:
    print("ours with --attention cudnn / llm.c with cuDNN: %.3f" % (best["ours_cudnn"] / best["llmc_cudnn"]))
if best.get("llmc_cudnn_ge2") and best["llmc_cudnn"]:
    print("llm.c with cuDNN, -ge 2 / -ge 0: %.3f" % (best["llmc_cudnn_ge2"] / best["llmc_cudnn"]))
    for n in ("ours", "ours_cudnn"):
        if best.get(n):
            print("%s / llm.c with cuDNN -ge 2: %.3f" % (label[n], best[n] / best["llmc_cudnn_ge2"]))
for n, e in zip(extra_names, extras):
    if best.get(n) and best["llmc_cudnn"]:
        print("ours with %s / llm.c with cuDNN: %.3f" % (e, best[n] / best["llmc_cudnn"]))

def ours_curve(path):  # (step, loss, norm) of each train record (%.9g: equal floats print equal)
    return [(r.get("step"), r.get("loss"), r.get("norm")) for r in ours_train_records(path)]

# the same seed and data: a flag set that keeps the bits (--overlap-dweight 0) gives ours' losses
# and norms exactly (round 1, against ours with the same --attention)
for n, e in zip(extra_names, extras):
    base = "ours_cudnn" if ours_cudnn and "--attention cudnn" in e else "ours"
    try:
        a, b = ours_curve(os.path.join(d, base + "_1.out")), ours_curve(os.path.join(d, n + "_1.out"))
    except OSError:
        continue
    k = min(len(a), len(b))
    if k:
        print("ours with %s: losses and norms of %d steps %s %s (bitwise)" % (e, k, "equal to" if a[:k] == b[:k] else "DIFFER from", base))
EOF
