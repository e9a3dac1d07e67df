"""
bench_attention_torch.py - PyTorch scaled_dot_product_attention (is_causal) timings at the GPT-2 124M
attention shape, for comparison with llmc/attention.cuh (see dev/cuda/test_attention.cu).

Same layout as the CUDA trainer: qkv (B, T, 3C) bf16 split into q, k, v views of (B, NH, T, hs)
(strided, no copies), output transposed back to (B, T, C). For each SDPA backend that is available:
forward time, and fwd+bwd time with autograd (grad of qkv); bwd = (fwd+bwd) - fwd.
MATH materialises the T x T matrix: that is the naive baseline.
Also checks the flash backend's output against the math backend (fp32 upcast) on a small shape.
Prints lines starting with SUMMARY.
"""
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend

B, T, C, NH = 32, 1024, 768, 12
HS = C // NH
# the card's dense bf16 peak in TFLOP/s, as test_attention prints it from cuda_peak_bf16_flops
# (llmc/cuda_utils.cuh); run_attention.sh passes it. 0: unknown, no percentage.
PEAK = float(os.environ.get("PEAK_TFLOPS", "0"))
FWD_FLOPS = 2.0 * 2.0 * B * NH * T * T * HS / 2.0
BWD_FLOPS = 2.5 * FWD_FLOPS


def attn(qkv, b, t):
    q, k, v = qkv.split(C, dim=2)
    q, k, v = (x.view(b, t, NH, HS).transpose(1, 2) for x in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(b, t, C)


def median_ms(fn, warmup=5, iters=30):
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return ms[iters // 2]


def line(what, flops, ms):
    tf = flops / (ms * 1e-3) / 1e12
    pct = 100 * tf / PEAK if PEAK > 0 else 0.0
    print(f"SUMMARY torch {what:<38s} {ms:8.3f} ms {tf:7.1f} TFLOP/s  {pct:5.1f}% of {PEAK:g}")


def main():
    torch.manual_seed(0)
    dev = "cuda"
    print("torch", torch.__version__, torch.cuda.get_device_name(0))

    # small sanity check: flash vs math (fp32)
    qs = torch.randn(2, 256, 3 * C, device=dev, dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.MATH]):
        ref = attn(qs.float(), 2, 256)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        got = attn(qs, 2, 256).float()
    print(f"flash vs math (fp32) rel err {((got - ref).norm() / ref.norm()).item():.2e}")

    qkv = torch.randn(B, T, 3 * C, device=dev, dtype=torch.bfloat16)
    dout = torch.randn(B, T, C, device=dev, dtype=torch.bfloat16)
    for name, be in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math (naive TxT)", SDPBackend.MATH)]:
        try:
            with sdpa_kernel([be]):
                x = qkv.detach().requires_grad_(True)

                def fwd():
                    return attn(x, B, T)

                def fwdbwd():
                    y = attn(x, B, T)
                    y.backward(dout)
                    x.grad = None

                ms_f = median_ms(fwd)
                ms_fb = median_ms(fwdbwd, warmup=3, iters=15 if be == SDPBackend.MATH else 30)
        except Exception as e:  # backend not available for this shape/build
            print(f"SUMMARY torch {name}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
            continue
        line(f"{name} fwd", FWD_FLOPS, ms_f)
        line(f"{name} bwd (fwd+bwd - fwd)", BWD_FLOPS, ms_fb - ms_f)
        line(f"{name} fwd+bwd", FWD_FLOPS + BWD_FLOPS, ms_fb)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
