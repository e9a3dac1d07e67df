"""power_probe.py - what a byte moved and a FLOP done cost in energy on this GPU, measured.

Each phase runs one kind of work for SECONDS seconds while nvidia-smi samples the instantaneous
board power and the SM clock every 100 ms; the later half of the samples (the steady state) is
averaged. Phases: idle; a device-to-device copy of 1 GiB buffers (bytes read + written counted);
a bf16 GEMM 8192^3 with fp32 accumulation (torch.mm, cuBLAS). For the work phases it prints the
rate, the mean power, the SM clock, and the energy above idle per unit of work:

    dynamic energy per byte = (P - P_idle) / (bytes per second)
    dynamic energy per FLOP = (P - P_idle) / (FLOPs per second)

docs/performance.md (target 5) uses these to split the training step's energy between its
GEMMs and attention (the same cuBLASLt and cuDNN work llm.c does) and the memory-bound kernels.
Usage (GPU machine): python3 dev/power_probe.py [SECONDS]   (default 5)
"""
import subprocess
import sys
import time

import torch

SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0


def sample_fields():
    for f in ("power.draw.instant", "power.draw"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm," + f, "--format=csv,noheader,nounits"],
                           capture_output=True, text=True)
        if q.returncode == 0:
            return "clocks.sm," + f
    sys.exit("power_probe: nvidia-smi reports no power reading")


FIELDS = sample_fields()


def measured(work):
    """runs work() repeatedly for SECONDS s under the sampler; (work units done / s, mean W, median MHz)"""
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=" + FIELDS, "--format=csv,noheader,nounits", "-lms", "100"],
                           stdout=subprocess.PIPE, text=True)
    done = 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        for _ in range(10):
            done += work()
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    smi.terminate()
    rows = []
    for line in smi.stdout.read().splitlines():
        try:
            mhz, watts = (float(x) for x in line.split(","))
            rows.append((mhz, watts))
        except ValueError:
            continue
    steady = rows[len(rows) // 2:]
    if not steady:
        sys.exit("power_probe: no power samples")
    clocks = sorted(r[0] for r in steady)
    return done / elapsed, sum(r[1] for r in steady) / len(steady), clocks[len(clocks) // 2]


def main():
    torch.cuda.init()
    name = torch.cuda.get_device_name()
    limit = subprocess.run(["nvidia-smi", "--query-gpu=power.limit", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True).stdout.strip()
    print("power_probe on %s (power limit %s W), %s, %.0f s a phase" % (name, limit, FIELDS, SECONDS))
    _, idle_w, idle_mhz = measured(lambda: (time.sleep(0.01), 0)[1])
    print("idle: %.1f W at %.0f MHz" % (idle_w, idle_mhz))

    n = 1 << 29  # 1 GiB of bf16
    src = torch.randn(n, device="cuda").to(torch.bfloat16)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        return 2 * src.numel() * src.element_size()  # read + write

    rate, w, mhz = measured(copy)
    pj_byte = (w - idle_w) / rate * 1e12
    print("copy: %.2f TB/s, %.1f W, %.0f MHz: %.1f pJ per byte moved above idle (%.1f with idle)"
          % (rate / 1e12, w, mhz, pj_byte, w / rate * 1e12))
    del src, dst

    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(m, m, device="cuda", dtype=torch.bfloat16)

    def gemm():
        torch.mm(a, b, out=c)
        return 2 * m * m * m

    rate, w, mhz = measured(gemm)
    pj_flop = (w - idle_w) / rate * 1e12
    print("gemm %d^3 bf16: %.0f TFLOP/s, %.1f W, %.0f MHz: %.3f pJ per FLOP above idle (%.3f with idle)"
          % (m, rate / 1e12, w, mhz, pj_flop, w / rate * 1e12))
    print("POWER_PROBE idle_w=%.1f copy_pj_per_byte=%.2f gemm_pj_per_flop=%.4f" % (idle_w, pj_byte, pj_flop))


if __name__ == "__main__":
    main()
