#!/usr/bin/env python3
"""ncu_table.py - one Nsight Compute CSV (--metrics gpu__time_duration.sum --csv) summed per kernel
name and divided by the number of repeats it covered: the table dev/profile_step.sh (per training
step) and dev/profile_moe_layer.sh (per layer forward+backward) print.

    python3 dev/ncu_table.py [--skip NAME ...] PROFILE.csv REPEATS UNIT [TOP]

UNIT names one repeat in the table ("step", "fwd+bwd"); TOP rows (30 unless given), largest first;
--skip leaves out kernels of that name (a benchmark's set-up, which ran once, not per repeat).
"""
import collections
import csv
import re
import sys


def short_name(full):
    """The kernel's name without its arguments; CUTLASS's grouped GEMMs (whose names differ only deep
    in their templates) as cuBLAS's ops of their A and B (llmc/moe_gemm_cutlass_kernels.hpp) and,
    for the moe token reads, the gathered operand (llmc/moe_gemm_gather_sm90.hpp)."""
    name = full.split("(")[0]
    if "cutlass::device_kernel<cutlass::GemmUniversal" not in name:
        return name
    # the A and B strides: (long, 1) is K-contiguous, which is cuBLAS's op(A) = T and op(B) = N
    strides = re.findall(r"cutlass::bfloat16_t, cute::tuple<(.*?)> \*", name)[:2]
    ops = ""
    if len(strides) == 2:
        k_major = [st.replace(" ", "").startswith("long,cute::C<1>") for st in strides]
        ops = " " + ("T" if k_major[0] else "N") + ("N" if k_major[1] else "T")
    tag = "cutlass grouped GEMM" + ops
    at = name.find("MoeGatherMainloop<")
    if at >= 0:  # its last template argument: the gather kind
        depth, i, last = 0, at + len("MoeGatherMainloop<"), None
        start = i
        while i < len(name):
            c = name[i]
            if c == "<":
                depth += 1
            elif c == ">":
                if depth == 0:
                    last = name[start:i].strip()
                    break
                depth -= 1
            elif c == "," and depth == 0:
                start = i + 1
            i += 1
        kinds = {"1": "B rows", "2": "B K", "3": "A K"}
        tag += ", token reads (%s)" % kinds.get(last, last)
    return tag

args, skip = sys.argv[1:], set()
while len(args) >= 2 and args[0] == "--skip":
    skip.add(args[1])
    args = args[2:]
if len(args) not in (3, 4):
    sys.exit("usage: ncu_table.py [--skip NAME ...] PROFILE.csv REPEATS UNIT [TOP]")
path, repeats, unit = args[0], int(args[1]), args[2]
top = int(args[3]) if len(args) == 4 else 30
try:
    rows = [l for l in open(path) if l.startswith('"')]
except OSError as e:
    sys.exit("ncu_table: cannot read %s: %s" % (path, e))
scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3, "nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}
total = collections.defaultdict(float)
count = collections.Counter()
for r in csv.DictReader(rows):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    name = short_name(r["Kernel Name"])
    if name in skip:
        continue
    total[name] += float(r["Metric Value"].replace(",", "")) * scale[r["Metric Unit"]]
    count[name] += 1
if not total:
    sys.exit("ncu_table: no gpu__time_duration rows in %s (did ncu run? see its stderr)" % path)
allms = sum(total.values())
print("   %d kernel launches, %.3f ms of kernels per %s (%d profiled)" % (sum(count.values()), allms / repeats, unit,
                                                                       repeats))
print("   %-72s %6s %9s %6s" % ("kernel", "calls", "ms/" + unit, "share"))
for name, t in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
    print("   %-72s %6d %9.3f %5.1f%%" % (name[:72], count[name] // repeats, t / repeats, 100 * t / allms))
