"""power_probe.py - what a byte moved and a FLOP done cost in energy on this GPU, measured.

Each phase runs one kind of work for SECONDS seconds while nvidia-smi samples the instantaneous
board power and the SM clock every 100 ms; the later half of the samples (the steady state) is
averaged. Phases: idle; a device-to-device copy of 1 GiB buffers (bytes read + written counted);
a bf16 GEMM 8192^3 with fp32 accumulation (torch.mm, cuBLAS). For the work phases it prints the
rate, the mean power, the SM clock, and the energy above idle per unit of work:

    dynamic energy per byte = (P - P_idle) / (bytes per second)
    dynamic energy per FLOP = (P - P_idle) / (FLOPs per second)

With --step it then runs, the same way, each GEMM of the GPT-2 124M training step at B*T =
32,768 tokens (the forward, input-gradient and weight-gradient GEMMs of qkv, attproj, fc, fcproj
and the LM head, through torch.mm) and causal attention forward + backward at its shape (torch's
SDPA, cuDNN's kernels where torch has them), and prints the step's energy budget: each GEMM's
energy per call (time per call x mean power) times its calls per step. docs/performance.md
(target 5) sets that beside the trainer's measured energy per step.
Usage (GPU machine): python3 dev/power_probe.py [SECONDS] [--step]   (default 5 s a phase)
"""
import subprocess
import sys
import time

import torch

ARGS = [a for a in sys.argv[1:] if a != "--step"]
SECONDS = float(ARGS[0]) if ARGS else 5.0
STEP = "--step" in sys.argv[1:]


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
        for _ in range(50):  # queued ahead: the GPU never waits for the host
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
    _, idle_w, idle_mhz = measured(lambda: (time.sleep(0.002), 0)[1])
    print("idle: %.1f W at %.0f MHz" % (idle_w, idle_mhz))

    n = 1 << 29  # 1 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
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
    del a, b, c
    if STEP:
        step_budget(idle_w)


def step_budget(idle_w):
    BT, C, V, L, B, T, NH = 32768, 768, 50304, 12, 32, 1024, 12
    # (name, M, N, K, transposes as the backward uses them, calls per step): out (M, N) = op(a) (M, K) op(b) (K, N)
    shapes = []
    for name, n_out, n_in, calls in (("qkv", 3 * C, C, L), ("attproj", C, C, L), ("fc", 4 * C, C, L),
                                     ("fcproj", C, 4 * C, L), ("lm head", V, C, 1)):
        shapes.append((name + " forward", BT, n_out, n_in, "nt", calls))        # x W^T
        shapes.append((name + " input gradient", BT, n_in, n_out, "nn", calls))  # dout W
        shapes.append((name + " weight gradient", n_out, n_in, BT, "tn", calls))  # dout^T x
    total_j = total_dyn_j = total_ms = 0.0
    print("\n| GEMM of the step | M x N x K | calls | ms a call | TFLOP/s | W | MHz | J per step (above idle) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, M, N, K, tr, calls in shapes:
        a = torch.randn((K, M) if tr[0] == "t" else (M, K), device="cuda", dtype=torch.bfloat16)
        b = torch.randn((N, K) if tr[1] == "t" else (K, N), device="cuda", dtype=torch.bfloat16)
        opa = a.t() if tr[0] == "t" else a
        opb = b.t() if tr[1] == "t" else b
        out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        flop = 2.0 * M * N * K
        rate, w, mhz = measured(lambda: (torch.mm(opa, opb, out=out), flop)[1])
        sec = flop / rate
        total_j += calls * sec * w
        total_dyn_j += calls * sec * (w - idle_w)
        total_ms += calls * sec * 1e3
        print("| %s | %d x %d x %d | %d | %.3f | %.0f | %.0f | %.0f | %.2f (%.2f) |" % (
            name, M, N, K, calls, sec * 1e3, rate / 1e12, w, mhz, calls * sec * w, calls * sec * (w - idle_w)))
        del a, b, out
    print("GEMMs of one step: %.2f ms, %.2f J (%.2f J above idle)" % (total_ms, total_j, total_dyn_j))
    F = torch.nn.functional
    q, k, v = (torch.randn(B, NH, T, C // NH, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, NH, T, C // NH, device="cuda", dtype=torch.bfloat16)
    backend = "default"
    try:
        from torch.nn.attention import sdpa_kernel, SDPBackend
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)
        ctx, backend = (lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)), "cuDNN"
    except Exception:
        import contextlib
        ctx = contextlib.nullcontext
    with ctx():  # counted in calls (fwd+bwd of one layer)
        rate, w, mhz = measured(lambda: (F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout), 1)[1])
    sec = 1.0 / rate
    print("attention fwd+bwd (torch SDPA, %s): %.3f ms a layer, %.0f W, %.0f MHz: %.2f J per step (%.2f above idle)"
          % (backend, sec * 1e3, w, mhz, L * sec * w, L * sec * (w - idle_w)))
    print("POWER_PROBE_STEP gemm_ms=%.2f gemm_j=%.2f attention_ms=%.2f attention_j=%.2f" % (
        total_ms, total_j, L * sec * 1e3, L * sec * w))


if __name__ == "__main__":
    main()
