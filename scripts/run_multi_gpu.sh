#!/usr/bin/env bash
# run_multi_gpu.sh - trains on G GPUs of this host, one process per GPU (data parallel).
#
#   scripts/run_multi_gpu.sh G [train_omnimoe flags...]
#   scripts/run_multi_gpu.sh 4 -e d12 -f omni -b 8 -t 1024 -d 262144 -x 5000 -o out/d12 -n 500
#
# Launch: mpirun when ./train_omnimoe was built with MPI and mpirun is on the PATH, else G
# background processes that meet through a fresh NCCL id file (-pn G -pr r -pf FILE). Force one
# with OMNIMOE_LAUNCH=mpi or OMNIMOE_LAUNCH=file.
#
# Several hosts without MPI: run this script once per host with
#   OMNIMOE_NODES=<hosts> OMNIMOE_NODE_RANK=<this host, 0..hosts-1> OMNIMOE_ID_FILE=<path on a
#   file system every host shares, new for each launch>
# (hosts give ranks node_rank*G .. node_rank*G+G-1; host 0 holds rank 0, which writes the files).
# With MPI, use mpirun directly: mpirun -np 16 --hostfile hosts -x NCCL_NVLS_ENABLE ./train_omnimoe ...
#
# SIGINT/SIGTERM to this script reach every rank: they agree on a step, rank 0 writes a checkpoint
# (with -o) and all exit with status 130. If a rank fails, the others (which would wait for it
# forever inside NCCL) are killed and the script exits with the failing rank's status; with
# several hosts, through OMNIMOE_ID_FILE.failed, which ends the other hosts' ranks too (their
# launchers exit with 137). Test without GPUs: scripts/test_launcher_cpu.sh.
set -u
export NCCL_NVLS_ENABLE=0   # never NVLink multicast (house rule; the trainer defaults to it too)

if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 <number of GPUs> [train_omnimoe flags...]" >&2
    exit 2
fi
G=$1
shift
BIN=${OMNIMOE_BIN:-./train_omnimoe}
if [ ! -x "$BIN" ]; then
    echo "Error: $BIN not found or not executable (build it with make train_omnimoe)" >&2
    exit 2
fi

launch=${OMNIMOE_LAUNCH:-}
if [ -z "$launch" ]; then
    if command -v mpirun >/dev/null 2>&1 && ldd "$BIN" 2>/dev/null | grep -q libmpi; then launch=mpi; else launch=file; fi
fi

if [ "$launch" = mpi ]; then
    extra=()
    if [ "$(id -u)" = 0 ]; then extra+=(--allow-run-as-root); fi
    # --bind-to none: each rank's host threads may use any core (the default pins to one core)
    exec mpirun -np "$G" "${extra[@]}" --bind-to none -x NCCL_NVLS_ENABLE "$BIN" "$@"
fi
if [ "$launch" != file ]; then
    echo "Error: OMNIMOE_LAUNCH must be mpi or file, not \"$launch\"" >&2
    exit 2
fi

nodes=${OMNIMOE_NODES:-1}
node_rank=${OMNIMOE_NODE_RANK:-0}
if [ "$nodes" -gt 1 ] && [ -z "${OMNIMOE_ID_FILE:-}" ]; then
    echo "Error: several hosts (OMNIMOE_NODES=$nodes) need OMNIMOE_ID_FILE on a file system they share" >&2
    exit 2
fi
id_file=${OMNIMOE_ID_FILE:-$(mktemp -u "${TMPDIR:-/tmp}/omnimoe_nccl_id.XXXXXXXX")}
# Several hosts: a rank that fails leaves the ranks of the other hosts waiting inside NCCL, where
# no launcher of theirs sees it. The launchers share a marker file beside the id file: the one
# that sees a failure writes it, and every launcher's watcher ends its own ranks when it appears.
fail_marker="$id_file.failed"
if [ "$nodes" -gt 1 ] && [ -e "$fail_marker" ]; then
    echo "Error: $fail_marker exists (left by an earlier launch that failed): give every launch a new OMNIMOE_ID_FILE" >&2
    exit 2
fi
world=$((nodes * G))

pids=()
for ((local = 0; local < G; local++)); do
    rank=$((node_rank * G + local))
    LOCAL_RANK=$local "$BIN" "$@" -pn "$world" -pr "$rank" -pf "$id_file" &
    pids+=($!)
done
watcher=""
if [ "$nodes" -gt 1 ]; then
    ( while [ ! -e "$fail_marker" ]; do sleep 1; done
      echo "run_multi_gpu.sh (host $node_rank): ending this host's ranks: $(cat "$fail_marker" 2>/dev/null)" >&2
      kill -KILL "${pids[@]}" 2>/dev/null ) &
    watcher=$!
    disown "$watcher"  # not a rank: wait -n below must not count it
fi

signalled=0
forward_signal() { signalled=1; kill -TERM "${pids[@]}" 2>/dev/null; }
trap forward_signal INT TERM

status=0
remaining=$G
while [ "$remaining" -gt 0 ]; do
    signalled=0
    wait -n
    rc=$?
    if [ "$signalled" = 1 ] && [ "$rc" -gt 128 ]; then continue; fi  # the trap woke wait; no rank ended
    remaining=$((remaining - 1))
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=$rc
        # 130 = stopped by a signal after a checkpoint: the others stop at the same step by themselves.
        # Any other failure: the others wait for it inside NCCL forever, so end them.
        if [ "$rc" -ne 130 ]; then
            kill -KILL "${pids[@]}" 2>/dev/null
            if [ "$nodes" -gt 1 ] && [ ! -e "$fail_marker" ]; then
                echo "a rank of host $node_rank exited with status $rc" > "$fail_marker"
            fi
        fi
    fi
done
if [ -n "$watcher" ]; then kill "$watcher" 2>/dev/null; fi
# the marker stays (the other hosts must see it); the id file goes
if [ "$node_rank" = 0 ]; then rm -f "$id_file" "$id_file.tmp"; fi
exit "$status"
