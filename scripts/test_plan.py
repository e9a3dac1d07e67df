#!/usr/bin/env python3
"""
test_plan.py - the trainer's --plan (llmc/memory_plan.h: the buffer list the CUDA trainer
allocates from) against the independent formulas of dev/sharding_numbers.py (docs/sharding.md
§1), byte for byte: d12, N = 16,384 .. 1,048,576, P = 1, 2, 4, 8 GPUs, every mode, B = 16 and 32,
k = 16 and 32. Then the parts that sharding_numbers.py does not model: a dense model has nothing
to shard as tables, -r 1 / -r 2 keep one layer of the recomputed activations, and --shard-experts 1
refuses a C that 8P does not divide.

    python3 scripts/test_plan.py [TRAINER]      # default ./train_omnimoe_cpu (make test runs it)

One PASS/FAIL line per check, then "test_plan: N passed, N failed"; exit 1 on any FAIL.
"""
import os, re, subprocess, sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'dev'))
import sharding_numbers as sn  # noqa: E402

TRAINER = sys.argv[1] if len(sys.argv) > 1 else './train_omnimoe_cpu'
# the sharding modes of docs/sharding.md §1.3 as the trainers' flags
MODES = {'replicated': [], 'zero1': ['--zero', 1], 'tables': ['--shard-experts', 1],
         'zero1+tables': ['--zero', 1, '--shard-experts', 1]}
passed = failed = 0


def check(ok, name, detail=''):
    global passed, failed
    print(f"{'PASS' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ''))
    passed, failed = passed + bool(ok), failed + (not ok)


def plan(*flags):
    r = subprocess.run([TRAINER, '--plan'] + [str(f) for f in flags], capture_output=True, text=True)
    m = re.search(r'^plan_bytes (.*)$', r.stdout, re.M)
    if r.returncode != 0 or not m:
        return None, r
    values = {k: int(v) for k, v in (kv.split('=') for kv in m.group(1).split())}
    values['params'] = int(re.search(r'memory plan per GPU: (\d+) parameters', r.stdout).group(1))
    return values, r


# every cell of docs/sharding.md §1.3's table (and k = 16): state and activations byte for byte
for N in (16384, 65536, 262144, 1048576):
    for scheme in sn.SCHEMES:
        worst = None
        cells = 0
        for P in (1, 2, 4, 8):
            if P == 1 and 'tables' in scheme:
                continue  # --shard-experts 1 needs several processes (train_config_validate)
            for B in (16, 32):
                for k in (16, 32):
                    got, r = plan(P, *MODES[scheme], '-e', 'd12', '--experts', N, '--topk', k,
                                  '-b', B, '-t', 1024)
                    cells += 1
                    if got is None:
                        worst = worst or f"P={P} B={B} k={k}: exit {r.returncode}: {r.stderr.strip()[:200]}"
                        continue
                    state = sum(got[x] for x in ('weights', 'grads', 'master', 'adam_m', 'adam_v'))
                    col = scheme in ('tables', 'zero1+tables') and P > 1
                    want_state = sn.state_bytes(N, P, scheme)
                    want_act = sn.activation_bytes(N, B, 1024, k, P, col)
                    act = got['activations'] + got['workspace']
                    total = state + got['other'] + act + got['margin']
                    if got['params'] != sn.num_params(N):
                        worst = worst or f"P={P}: {got['params']} parameters, sharding_numbers {sn.num_params(N)}"
                    elif state != want_state:
                        worst = worst or f"P={P} B={B} k={k}: state {state} B, sharding_numbers {want_state:.0f}"
                    elif act != want_act:
                        worst = worst or f"P={P} B={B} k={k}: activations {act} B, sharding_numbers {want_act}"
                    elif got['margin'] != sn.MARGIN or total != got['total']:
                        worst = worst or f"P={P} B={B} k={k}: margin {got['margin']}, total {got['total']} != {total}"
                    elif abs(got['total'] - got['other'] - sn.total_bytes(N, P, scheme, B, k)) > 0:
                        worst = worst or f"P={P} B={B} k={k}: total {got['total']} vs {sn.total_bytes(N, P, scheme, B, k)}"
        check(worst is None, f"plan_vs_sharding_numbers_N{N}_{scheme}",
              worst or f"{cells} cells (P 1-8, B 16/32, k 16/32) equal to the byte")

# ZeRO-1 with tails (docs/sharding.md §2), which d12 at P = 1, 2, 4, 8 never has: at P = 3, 5, 6, 7 each
# slice of c elements gives a rank q = floor(c / 8P) * 8 of it plus the c - P*q tail, computed here
# per tensor and layer from the shapes alone
def zero1_elements(N, P, tables):
    n = int(N ** 0.5); C, L, I = sn.C, sn.L, sn.I
    slices = [(1, sn.VP * C), (1, sn.MAXT * C)] + [(L, C)] * 4 + [(L, 3 * C * C), (L, 3 * C), (L, C * C), (L, C),
              (L, 2 * I * C), (L, C * I), (L, 2 * n * C)] + ([] if tables else [(L, N * C)] * 2) + [(1, C), (1, C)]
    return sum(s * (c // (8 * P) * 8 + c - P * (c // (8 * P) * 8)) for s, c in slices)

for P in (3, 5, 6, 7):
    for scheme in ('zero1', 'zero1+tables'):
        tables = scheme == 'zero1+tables'
        if tables and 768 % (8 * P):
            continue
        got, r = plan(P, *MODES[scheme], '-e', 'd12', '--experts', 65536, '-b', 2, '-t', 1024)
        want = 4 * (zero1_elements(65536, P, tables) + (2 * sn.L * 65536 * sn.C // P if tables else 0))
        check(got is not None and got['master'] == want and got['adam_m'] == want and got['adam_v'] == want,
              f"plan_zero1_tails_P{P}_{scheme}", f"master {got and got['master']} B, expected {want}")

# a dense model: ZeRO-1 cuts the fp32 state to 1/P and leaves the bf16 weights whole
rep, _ = plan(4, '-e', 'd12', '-f', 'swiglu', '-b', 8, '-t', 1024)
z1, _ = plan(4, *MODES['zero1'], '-e', 'd12', '-f', 'swiglu', '-b', 8, '-t', 1024)
check(rep is not None and z1 is not None and z1['master'] * 4 == rep['master'] and z1['weights'] == rep['weights'],
      "plan_dense_zero1_quarter_state", f"master {z1 and z1['master']} of {rep and rep['master']} B")

# -r (--recompute, llmc/memory_plan.h): 1 keeps one layer of the FFN activation (BT x H), 2 also one
# layer of ln1 and ln2 (BT x C each) instead of L; nothing else changes. Each FFN kind, 1 and 4 GPUs.
for kind, H in (('gelu', 4 * 768), ('swiglu', 2048), ('omni', 1920)):
    for P in (1, 4):
        B, T, L, C, X = 8, 512, 12, 768, 2
        flags = (P, '-e', 'd12', '-f', kind, '--hidden', H, '-b', B, '-t', T) + (('--zero', 1) if P > 1 else ())
        r0, _ = plan(*flags)
        r1, _ = plan(*flags, '-r', 1)
        r2, r = plan(*flags, '-r', 2)
        ok = r0 is not None and r1 is not None and r2 is not None
        act = (L - 1) * B * T * H * X
        ln = 2 * (L - 1) * B * T * C * X
        ok = ok and r0['activations'] - r1['activations'] == act and r1['activations'] - r2['activations'] == ln
        ok = ok and all(r0[x] == r1[x] == r2[x] for x in r0 if x not in ('activations', 'total'))
        ok = ok and r0['total'] - r2['total'] == act + ln and '-r 2 (recomputed' in r.stdout
        check(ok, f"plan_recompute_{kind}_P{P}", f"activations -r 0/1/2: {r0 and r0['activations']}, "
              f"{r1 and r1['activations']}, {r2 and r2['activations']} B; expected savings {act}, then {ln}")
_, r = plan(1, '-e', 'd12', '-r', 3)
check(r.returncode != 0 and '--recompute' in r.stderr and 'plan_bytes' not in r.stdout, "plan_refuses_bad_recompute",
      r.stderr.strip()[:160])

if TRAINER.endswith('_cpu'):  # the CPU reference keeps every activation: it refuses -r with a clear message
    r = subprocess.run([TRAINER, '-e', 'tiny', '-x', '1', '-r', '1'], capture_output=True, text=True)
    check(r.returncode != 0 and '-r (--recompute) 1' in r.stderr and 'CUDA trainer' in r.stderr and 'step' not in r.stdout,
          "cpu_trainer_refuses_recompute", r.stderr.strip()[:160])

# refusals: tables need C (768) a multiple of 8P; a bad mode word names the flag
_, r = plan(5, *MODES['tables'], '-e', 'd12', '-b', 8, '-t', 1024)
check(r.returncode != 0 and '--shard-experts' in r.stderr and 'divisible' in r.stderr and 'plan_bytes' not in r.stdout,
      "plan_refuses_tables_C_not_multiple_of_8P", r.stderr.strip()[:160])
_, r = plan(2, '--zero', 2, '-e', 'd12')
check(r.returncode != 0 and '--zero' in r.stderr and 'plan_bytes' not in r.stdout, "plan_refuses_bad_zero_flag",
      r.stderr.strip()[:160])

print(f"test_plan: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
