"""
bench_torch.py - PyTorch baselines for the OmniMoE layer (docs/design.md §2-§4), bf16, forward and
forward+backward, timed on the GPU with triton.testing.do_bench medians after warm-up (CUDA
events; do_bench also flushes the L2 cache before every repetition).

What it times (all token-centric, PEER-style: every (token, m) pair gathers its u and v rows
with F.embedding, so the baseline materialises (T, k, d) tensors and its backward scatters into
dense dU/dV through PyTorch's sort-based embedding backward):
  (a) the whole OmniMoE layer at T=4096, d=1024, I=4096, N=4096 (n=64), k=16;
      router + experts alone (no shared SwiGLU) at that shape;
      a dense SwiGLU with the same active parameters (I=4160 ~ 4096 + (2nd + 2kd)/(3d)).
  (b) experts alone (given random indices and gates) at T=4096, d=1024, k=32,
      N in {4096, 65536, 1048576}.
  (c) the router alone (linear 2n x d, affine-free BN, log_softmax per half, exact top-k by the
      product-key argument, softmax gate) at T=4096, d=1024, n in {64,256,1024}, k in {16,32,64}.

Router numerics: the 2n x d GEMM runs in bf16; logits are upcast to fp32 for BN, log_softmax,
top-k and the gate (as a fused kernel would keep them in registers). torch.topk breaks ties in
no promised order (docs/design.md §2 wants the smaller id); with continuous random data ties do not occur.

Bytes that must move (docs/design.md §4), used for the bandwidth fractions (3.0 TB/s = the measured
device-to-device copy rate of this workplace's H100, read + write):
  experts fwd      : per token 2k rows of d (u and v) + x + y            = 2*T*d*(2k+2) bytes
  experts fwd+bwd  : fwd + bwd; bwd reads dY, x, 2k rows (u, v) and writes dX, 2k rows (dU, dV)
                     = 2*T*d*(6k+5) bytes. These are per-pair counts (an upper bound on the
                     floor: rows shared by several tokens need only be read once); the floor
                     with each distinct row moved once is printed beside it.
  router fwd       : x + W (2n x d) in bf16, indices + gates out (int32 + fp32)
  router fwd+bwd   : fwd + dg in, x and W read again, dX and dW out.

Before timing, two checks that fail loudly:
  - float64 on the CPU, small shape: this file's layer (forward, every gradient, BN running
    statistics) against the independent reference dev/omnimoe_torch.py (full-grid top-k);
  - on the GPU in fp32 at every benchmarked router shape: the product-key top-k scores equal the
    top-k of the full n x n grid for 256 tokens.

Usage (on the device):  python3 dev/bench_torch.py [--quick] [--json PATH]
  --quick  runs only (a);  --json defaults to $OUT/bench_torch.json when OUT is set.
The table printed last: name, shape, fwd ms, fwd+bwd ms (medians), and rates.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

BN_EPS = 1e-5
BN_MOMENTUM = 0.1
HBM_TBS = 3.0  # TB/s, measured copy bandwidth of the H100 here (KINDS.md), read + write counted


# ----------------------------------------------------------------------------
# the layer, token-centric

def shared_swiglu(x, w_gate_up, w_down):
    """Wd (SiLU(Wg x) * (Wu x)); w_gate_up is (2I, d): rows [0,I) = Wg, [I,2I) = Wu."""
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down)


def router(x, w_router, bn_mean, bn_var, n, k, training=True):
    """Returns expert ids E (T, k) int64 sorted by score and gates g (T, k) (fp32 for bf16 x).
    w_router is (2n, d): rows [0,n) = Wr (rows of the grid), [n,2n) = Wc (columns)."""
    T = x.shape[0]
    logits = F.linear(x, w_router)
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    # affine-free BatchNorm over the T tokens: batch statistics, running stats updated in place
    logits = F.batch_norm(logits, bn_mean, bn_var, None, None, training, BN_MOMENTUM, BN_EPS)
    pr = torch.log_softmax(logits[:, :n], dim=-1)
    pc = torch.log_softmax(logits[:, n:], dim=-1)
    # product-key argument: the global top-k of pr[i] + pc[j] lies in the k' x k' grid of the
    # k' best rows and the k' best columns
    kk = min(n, k)
    top_r, idx_r = pr.topk(kk, dim=-1)
    top_c, idx_c = pc.topk(kk, dim=-1)
    grid = (top_r[:, :, None] + top_c[:, None, :]).reshape(T, kk * kk)
    S, pos = grid.topk(k, dim=-1)
    E = idx_r.gather(1, pos // kk) * n + idx_c.gather(1, pos % kk)
    g = torch.softmax(S, dim=-1)
    return E, g


def experts(x, U, V, E, g):
    """sum_m g_m SiLU(<u_{E_m}, x>) v_{E_m}, gathering rows per (token, m) pair."""
    u = F.embedding(E, U)                                 # (T, k, d)
    v = F.embedding(E, V)                                 # (T, k, d)
    s = torch.einsum("td,tkd->tk", x, u)
    a = (g * F.silu(s.to(g.dtype))).to(x.dtype)
    return torch.einsum("tk,tkd->td", a, v)


def omni_layer(x, p, bn_mean, bn_var, n, k, training=True, with_shared=True):
    E, g = router(x, p["w_router"], bn_mean, bn_var, n, k, training)
    y = experts(x, p["U"], p["V"], E, g)
    if with_shared:
        y = y + shared_swiglu(x, p["w_gate_up"], p["w_down"])
    return y


def moe_layer(x, p, E, k):
    """the moe kind (docs/design.md §10) as PyTorch users write it: shared SwiGLU, softmax router,
    top-k, tokens sorted by expert, one matmul pair per expert in a Python loop, gated index_add.
    A timing baseline for dev/cuda/bench_moe.cu (same shape), not a bitwise reference."""
    Ie = p["w1"].shape[1] // 2
    y = shared_swiglu(x, p["w_gate_up"], p["w_down"])
    probs = torch.softmax(F.linear(x, p["w_moe_router"]).float(), dim=-1)
    g, ids = torch.topk(probs, k, dim=-1)
    order = torch.argsort(ids.reshape(-1), stable=True)
    counts = torch.bincount(ids.reshape(-1), minlength=E).tolist()  # the host needs the sizes, as ours
    tok = order // k
    xs = x[tok]
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        h = F.linear(xs[start:start + c], p["w1"][e])
        outs.append(F.linear(F.silu(h[:, :Ie]) * h[:, Ie:], p["w2"][e]))
        start += c
    ye = torch.cat(outs) * g.reshape(-1)[order].to(x.dtype)[:, None]
    return y.index_add(0, tok, ye)


def bench_moe(res, device):
    """the shape of dev/cuda/bench_moe.cu: T=8192 d=1024 E=64 I_e=512 S=2 k=6"""
    T, d, E, Ie, S, k = 8192, 1024, 64, 512, 2, 6
    gen = torch.Generator(device=device).manual_seed(1)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).requires_grad_(True)

    p = {"w_gate_up": rnd(2 * S * Ie, d), "w_down": rnd(d, S * Ie), "w_moe_router": rnd(E, d),
         "w1": rnd(E, 2 * Ie, d), "w2": rnd(E, d, Ie)}
    x = torch.randn(T, d, generator=gen, device=device).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn(T, d, generator=gen, device=device).to(torch.bfloat16)
    f, b = time_fwd_and_fwdbwd(lambda: moe_layer(x, p, E, k), [x] + list(p.values()), dy)
    fl = 6 * d * (S + k) * Ie * T
    res.add("moe layer (torch loop)", f"T={T} d={d} E={E} Ie={Ie} S={S} k={k}", f, b,
            flops_fwd=fl, flops_fwdbwd=3 * fl)


def make_layer_params(d, I, n, dtype, device, gen):
    N = n * n
    std = 0.02

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)

    return {"w_gate_up": rnd(2 * I, d), "w_down": rnd(d, I), "w_router": rnd(2 * n, d),
            "U": rnd(N, d), "V": rnd(N, d)}


# ----------------------------------------------------------------------------
# checks

def check_against_reference():
    """float64 on the CPU: this file's layer vs dev/omnimoe_torch.py omni_ffn (full-grid top-k),
    output, every gradient and the BN running statistics."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import omnimoe_torch as ref

    T, d, I = 96, 48, 80
    worst = 0.0
    for (n, k) in [(6, 10), (8, 3)]:   # k > n (k' = n) and k < n (k' = k)
        gen = torch.Generator().manual_seed(1234 + n)
        p = make_layer_params(d, I, n, torch.float64, "cpu", gen)
        for t in p.values():
            t.mul_(25.0)  # larger router logits and expert scores: sharper, less trivial gates
        x = torch.randn(T, d, generator=gen, dtype=torch.float64)
        dy = torch.randn(T, d, generator=gen, dtype=torch.float64)
        mean0 = torch.randn(2 * n, generator=gen, dtype=torch.float64) * 0.1
        var0 = torch.rand(2 * n, generator=gen, dtype=torch.float64) + 0.5

        leaves = [x] + [p[key] for key in ("w_gate_up", "w_down", "w_router", "U", "V")]
        mine_in = [t.clone().requires_grad_(True) for t in leaves]
        ref_in = [t.clone().requires_grad_(True) for t in leaves]

        m_mean, m_var = mean0.clone(), var0.clone()
        pm = dict(zip(("w_gate_up", "w_down", "w_router", "U", "V"), mine_in[1:]))
        y_mine = omni_layer(mine_in[0], pm, m_mean, m_var, n, k, training=True)
        g_mine = torch.autograd.grad(y_mine, mine_in, dy)

        c = ref.Config(max_seq_len=T, vocab_size=1, padded_vocab_size=1, num_layers=1, num_heads=1,
                       channels=d, ffn_kind=ref.FFN_OMNI, ffn_hidden=I, router_n=n,
                       num_experts=n * n, top_k=k)
        y_ref, r_mean, r_var = ref.omni_ffn(c, ref_in[0], ref_in[1], ref_in[2], ref_in[3],
                                            ref_in[4], ref_in[5], mean0.clone(), var0.clone(), True)
        g_ref = torch.autograd.grad(y_ref, ref_in, dy)

        pairs = [("y", y_mine, y_ref), ("bn_mean", m_mean, r_mean), ("bn_var", m_var, r_var)]
        for name, a, b in zip(("dx", "dWgu", "dWd", "dWrouter", "dU", "dV"), g_mine, g_ref):
            pairs.append((name, a, b))
        for name, a, b in pairs:
            rel = ((a - b).norm() / b.norm()).item()
            worst = max(worst, rel)
            if not (rel < 1e-10):
                sys.exit(f"check FAILED: {name} (n={n}, k={k}) differs from dev/omnimoe_torch.py: "
                         f"rel err {rel:.3e}")
    print(f"check: layer vs dev/omnimoe_torch.py (fp64, y, 6 gradients, BN stats): worst rel err "
          f"{worst:.2e}  OK")


def check_topk_exact(n, k, device):
    """fp32 on the GPU: the product-key top-k scores equal the full-grid top-k scores."""
    T, d = 256, 1024
    gen = torch.Generator(device=device).manual_seed(7 + n + k)
    x = torch.randn(T, d, generator=gen, device=device)
    w = torch.randn(2 * n, d, generator=gen, device=device) * 0.02
    logits = F.batch_norm(x @ w.t(), None, None, None, None, True, 0.0, BN_EPS)
    pr = torch.log_softmax(logits[:, :n], -1)
    pc = torch.log_softmax(logits[:, n:], -1)
    full = (pr[:, :, None] + pc[:, None, :]).reshape(T, n * n)
    want_S, _ = full.topk(k, dim=-1)
    E, g = router(x, w, torch.zeros(2 * n, device=device), torch.ones(2 * n, device=device), n, k)
    got_S = full.gather(1, E)
    if not torch.equal(got_S, want_S):
        sys.exit(f"check FAILED: product-key top-k differs from the full grid at n={n} k={k}")
    if (E.sort(1).values.diff(1) == 0).any():
        sys.exit(f"check FAILED: repeated expert ids in a token's top-k at n={n} k={k}")
    if not torch.allclose(g.sum(-1), torch.ones(T, device=device), atol=1e-5):
        sys.exit(f"check FAILED: gates do not sum to 1 at n={n} k={k}")


# ----------------------------------------------------------------------------
# timing

def bench_ms(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def time_fwd_and_fwdbwd(forward, inputs, grad_out):
    """forward() -> tensor; inputs: tensors that need gradients. Returns (fwd ms, fwd+bwd ms)."""
    def fwd():
        with torch.no_grad():
            forward()

    def fwdbwd():
        out = forward()
        torch.autograd.grad(out, inputs, grad_out)

    fwdbwd()  # first call outside the timer: allocator, cuBLAS handles
    torch.cuda.synchronize()
    return bench_ms(fwd), bench_ms(fwdbwd)


def gbps(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9


class Results:
    def __init__(self):
        self.rows = []

    def add(self, name, shape, fwd_ms, fb_ms, **extra):
        row = {"name": name, "shape": shape, "fwd_ms": fwd_ms, "fwdbwd_ms": fb_ms}
        row.update(extra)
        self.rows.append(row)
        note = row_note(row)
        print(f"{name:<26s} {shape:<34s} fwd {fwd_ms:8.3f} ms  fwd+bwd {fb_ms:8.3f} ms  {note}",
              flush=True)


def row_note(row):
    if "bytes_fwd" in row:
        f_frac = gbps(row["bytes_fwd"], row["fwd_ms"]) / (HBM_TBS * 1e3)
        b_frac = gbps(row["bytes_fwdbwd"], row["fwdbwd_ms"]) / (HBM_TBS * 1e3)
        return (f"bytes {row['bytes_fwd'] / 1e6:.0f}/{row['bytes_fwdbwd'] / 1e6:.0f} MB "
                f"-> {100 * f_frac:.1f}%/{100 * b_frac:.1f}% of {HBM_TBS} TB/s")
    if "flops_fwd" in row:
        tf_f = row["flops_fwd"] / (row["fwd_ms"] * 1e-3) / 1e12
        tf_b = row["flops_fwdbwd"] / (row["fwdbwd_ms"] * 1e-3) / 1e12
        return f"{tf_f:.0f}/{tf_b:.0f} TFLOP/s"
    return ""


# ----------------------------------------------------------------------------
# the three parts

def bench_layer(res, device):
    T, d, I, n, k = 4096, 1024, 4096, 64, 16
    N = n * n
    I_dense = 4160  # 3 d I_dense ~ 3 d I + 2 n d + 2 k d = 3 d (I + 53.3), rounded up to 64
    gen = torch.Generator(device=device).manual_seed(0)
    p = make_layer_params(d, I, n, torch.bfloat16, device, gen)
    for t in p.values():
        t.requires_grad_(True)
    x = torch.randn(T, d, generator=gen, device=device).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn(T, d, generator=gen, device=device).to(torch.bfloat16)
    bn_mean = torch.zeros(2 * n, device=device)
    bn_var = torch.ones(2 * n, device=device)
    shape = f"T={T} d={d} I={I} N={N} k={k}"

    flops_shared = 6 * d * I * T
    flops_router = 4 * n * d * T
    flops_experts = 4 * k * d * T
    params = [x] + list(p.values())
    f, b = time_fwd_and_fwdbwd(lambda: omni_layer(x, p, bn_mean, bn_var, n, k), params, dy)
    fl = flops_shared + flops_router + flops_experts
    res.add("omni layer (torch gather)", shape, f, b, flops_fwd=fl, flops_fwdbwd=3 * fl)

    params = [x, p["w_router"], p["U"], p["V"]]
    f, b = time_fwd_and_fwdbwd(
        lambda: omni_layer(x, p, bn_mean, bn_var, n, k, with_shared=False), params, dy)
    res.add("router+experts (no SwiGLU)", f"T={T} d={d} N={N} k={k}", f, b,
            **expert_bytes(T, d, k, None))

    pd = make_layer_params(d, I_dense, 1, torch.bfloat16, device, gen)
    wgu, wd = pd["w_gate_up"].requires_grad_(True), pd["w_down"].requires_grad_(True)
    f, b = time_fwd_and_fwdbwd(lambda: shared_swiglu(x, wgu, wd), [x, wgu, wd], dy)
    fl = 6 * d * I_dense * T
    res.add("dense SwiGLU (matched)", f"T={T} d={d} I={I_dense}", f, b,
            flops_fwd=fl, flops_fwdbwd=3 * fl)

    f, b = time_fwd_and_fwdbwd(lambda: shared_swiglu(x, p["w_gate_up"], p["w_down"]),
                               [x, p["w_gate_up"], p["w_down"]], dy)
    fl = 6 * d * I * T
    res.add("shared SwiGLU alone", f"T={T} d={d} I={I}", f, b, flops_fwd=fl, flops_fwdbwd=3 * fl)


def expert_bytes(T, d, k, distinct_rows):
    """docs/design.md §4 per-pair byte counts (bf16); distinct_rows gives the floor with each row once."""
    out = {"bytes_fwd": 2 * T * d * (2 * k + 2), "bytes_fwdbwd": 2 * T * d * (6 * k + 5)}
    if distinct_rows is not None:
        out["distinct_rows"] = distinct_rows
        out["bytes_fwd_distinct"] = 2 * d * (2 * distinct_rows + 2 * T)
        out["bytes_fwdbwd_distinct"] = 2 * d * (6 * distinct_rows + 5 * T)
    return out


def bench_experts(res, device):
    T, d, k = 4096, 1024, 32
    for N in (4096, 65536, 1048576):
        gen = torch.Generator(device=device).manual_seed(N)
        U = (torch.randn(N, d, generator=gen, device=device) * 0.02).to(torch.bfloat16)
        V = (torch.randn(N, d, generator=gen, device=device) * 0.02).to(torch.bfloat16)
        U.requires_grad_(True)
        V.requires_grad_(True)
        x = torch.randn(T, d, generator=gen, device=device).to(torch.bfloat16).requires_grad_(True)
        dy = torch.randn(T, d, generator=gen, device=device).to(torch.bfloat16)
        E = distinct_random_ids(T, N, k, gen, device)  # k distinct ids per token, as a router gives
        g = torch.softmax(torch.randn(T, k, generator=gen, device=device), -1).requires_grad_(True)
        distinct = int(E.unique().numel())
        f, b = time_fwd_and_fwdbwd(lambda: experts(x, U, V, E, g), [x, U, V, g], dy)
        res.add("experts alone (gather)", f"T={T} d={d} N={N} k={k}", f, b,
                **expert_bytes(T, d, k, distinct))
        del U, V, x, dy, E, g
        torch.cuda.empty_cache()


def distinct_random_ids(T, N, k, gen, device):
    """k distinct ids in [0, N) per token without a (T, N) matrix: draw 2k, keep the first k
    distinct ones (fewer than k distinct among 2k draws from N >= 4096 is vanishingly rare;
    checked)."""
    draw = torch.randint(0, N, (T, 2 * k), generator=gen, device=device)
    srt, order = draw.sort(dim=1, stable=True)
    dup = torch.zeros_like(draw, dtype=torch.bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]          # a later copy of an earlier draw (stable sort)
    repeat = torch.empty_like(dup).scatter_(1, order, dup)   # back to draw order
    keyed = torch.where(repeat, torch.full_like(draw, 2 * k),
                        torch.arange(2 * k, device=device).expand(T, -1))
    keep = keyed.argsort(dim=1, stable=True)[:, :k]
    if (keyed.gather(1, keep) >= 2 * k).any():
        sys.exit("could not draw k distinct expert ids per token")
    return draw.gather(1, keep)


def bench_router(res, device):
    T, d = 4096, 1024
    for n in (64, 256, 1024):
        for k in (16, 32, 64):
            gen = torch.Generator(device=device).manual_seed(n * 100 + k)
            w = (torch.randn(2 * n, d, generator=gen, device=device) * 0.02).to(torch.bfloat16)
            w.requires_grad_(True)
            x = torch.randn(T, d, generator=gen, device=device).to(torch.bfloat16)
            x.requires_grad_(True)
            dg = torch.randn(T, k, generator=gen, device=device)
            bn_mean = torch.zeros(2 * n, device=device)
            bn_var = torch.ones(2 * n, device=device)
            f, b = time_fwd_and_fwdbwd(lambda: router(x, w, bn_mean, bn_var, n, k)[1], [x, w], dg)
            b_fwd = 2 * T * d + 2 * 2 * n * d + T * k * (4 + 4)
            b_bwd = T * k * 4 + 2 * T * d + 2 * 2 * n * d + 2 * T * d + 2 * 2 * n * d
            res.add("router alone", f"T={T} d={d} n={n} N={n * n} k={k}", f, b,
                    bytes_fwd=b_fwd, bytes_fwdbwd=b_fwd + b_bwd)


# ----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="run only (a), the layer shapes")
    default_json = os.path.join(os.environ["OUT"], "bench_torch.json") if os.environ.get("OUT") else None
    ap.add_argument("--json", default=default_json, help="write the numbers here (default $OUT/bench_torch.json)")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        sys.exit("bench_torch.py: no CUDA device (this benchmark runs on the GPU machine)")
    device = "cuda"
    import triton
    card = torch.cuda.get_device_name(0)
    print(f"torch {torch.__version__}, triton {triton.__version__}, {card}, "
          f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs", flush=True)

    t0 = time.time()
    check_against_reference()
    routers = [(64, 16)] if args.quick else [(n, k) for n in (64, 256, 1024) for k in (16, 32, 64)]
    for n, k in routers:
        check_topk_exact(n, k, device)
    print(f"check: product-key top-k == full-grid top-k (fp32, GPU) at (n,k) in {routers}  OK",
          flush=True)

    res = Results()
    bench_layer(res, device)
    bench_moe(res, device)
    if not args.quick:
        bench_experts(res, device)
        bench_router(res, device)

    print(f"\n# PyTorch baselines, bf16, {card}; do_bench medians (ms); "
          f"bytes fwd/fwd+bwd per docs/design.md §4 (per-pair; floor with distinct rows in the JSON)")
    print(f"{'name':<26s} | {'shape':<34s} | {'fwd ms':>8s} | {'f+b ms':>8s} | rate")
    for row in res.rows:
        print(f"{row['name']:<26s} | {row['shape']:<34s} | {row['fwd_ms']:8.3f} | "
              f"{row['fwdbwd_ms']:8.3f} | {row_note(row)}")
    print(f"(total {time.time() - t0:.0f} s)")

    if args.json:
        meta = {"card": card, "torch": torch.__version__, "triton": triton.__version__,
                "timer": "triton.testing.do_bench(warmup=25, rep=200, return_mode='median')",
                "hbm_tb_s_for_fractions": HBM_TBS, "argv": sys.argv}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": res.rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
