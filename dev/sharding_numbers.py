#!/usr/bin/env python3
"""
sharding_numbers.py - every number of docs/sharding.md, from the formulas of llmc/config.h and the
trainer's buffer list (train_omnimoe.cu model_build). Plain Python, no packages.

    python3 dev/sharding_numbers.py            # all tables
    python3 dev/sharding_numbers.py --check    # also asserts the cross-checks against issue 18

Memory: 16 bytes per parameter (bf16 weights and gradients, fp32 master, m, v), plus activations
and scratch as model_build sizes them (the CUB sort's temporary storage is estimated: 8 bytes per
pair + 1 MiB), plus the trainer's 1 GiB margin (MEMORY_PLAN_MARGIN_BYTES, llmc/memory_plan.h).
`--plan` of the trainers prints the same numbers from the trainer's own buffer list
(scripts/test_plan.py checks that they agree).
Bytes on the wire: per GPU and step, bytes each GPU sends (NVLink is full duplex: it receives the
same amount at the same time), for ring collectives and grouped send/recv all-to-all.
"""
import sys, math

GiB = 1024.0 ** 3
MARGIN = 1 << 30
USABLE = 139 * GiB   # an H200 as the issue counts it

# d12 preset, omni (llmc/config.h): L=12, C=768, NH=12, maxT=1024, Vp=50304, I=1920 (for n=128, k=32;
# --experts and --topk do not change I)
L, C, NH, MAXT, V, VP, I = 12, 768, 12, 1024, 50257, 50304, 1920

def align256(x): return (x + 255) // 256 * 256
def ceil_div(a, b): return (a + b - 1) // b

def param_sizes(N, n):
    s = {}
    s['wte'] = VP * C; s['wpe'] = MAXT * C
    s['ln'] = 4 * L * C                       # ln1w, ln1b, ln2w, ln2b
    s['qkvw'] = L * 3 * C * C; s['qkvb'] = L * 3 * C
    s['attprojw'] = L * C * C; s['attprojb'] = L * C
    s['fcw'] = L * 2 * I * C; s['fcprojw'] = L * C * I
    s['routerw'] = L * 2 * n * C
    s['expert_u'] = L * N * C; s['expert_v'] = L * N * C
    s['lnf'] = 2 * C
    return s

def num_params(N):
    n = int(round(math.sqrt(N))); assert n * n == N
    return sum(param_sizes(N, n).values())

def table_params(N): return 2 * L * N * C   # U and V

def activation_bytes(N, B, T, k, P=1, column_sharded=False):
    """model_build's work buffers (train_omnimoe.cu) + the OmniMoE layers' saved state, workspace,
    counts. column_sharded: the extra state of the column partition (every rank handles the P*BT*k
    pairs of all ranks over C/P columns)."""
    n = int(round(math.sqrt(N)))
    BT = B * T; FI = 2 * I; H = I; X = 2; F = 4
    w = 0
    w += BT * C * X                                   # encoded
    w += L * BT * C * X * 5                           # ln1, atty, residual2, ln2, residual3
    w += L * BT * F * 4                               # ln1/ln2 mean, rstd
    w += L * BT * 3 * C * X                           # qkv
    w += L * BT * NH * F                              # att lse
    w += L * BT * FI * X + L * BT * H * X             # fch, fch_act
    w += BT * C * X + 2 * BT * F                      # lnf, mean, rstd
    w += BT * VP * X + BT * F + F                     # logits, losses, loss_sum
    w += BT * C * X + 2 * BT * 4                      # sublayer_out, inputs, targets
    w += 2 * BT * C * X + BT * max(3 * C, FI) * X + BT * max(H, C) * X   # dresidual, dsub, dwide, dhidden
    Pp = BT * k                                       # the pairs of a rank's own tokens
    Cw = C
    nchunk = ceil_div(BT, 128)
    scratch = max(ceil_div(BT, 64) * max(3 * C, FI, C, VP) * F,            # matmul backward
                  ceil_div(BT, 32) * 2 * C * F,                           # layernorm backward
                  2 * align256(nchunk * 2 * n * F),                       # router forward
                  align256(BT * 2 * n * F) + align256(BT * 2 * n * X) + 2 * align256(nchunk * 2 * n * F),
                  align256(8 * Pp + (1 << 20)) + 2 * align256(Pp * 4),    # scheduler (CUB estimated)
                  2 * align256(Pp * F) + 4 * align256(ceil_div(Pp, 64) * Cw * F))  # experts backward
    w += scratch
    R = 2 * n; A = min(Pp, N)
    saved = (2 * align256(BT * R * F) + 2 * align256(R * F) + 3 * align256(Pp * 4)
             + 3 * align256(Pp * 4) + align256(A * 4) + align256((A + 1) * 4) + 4)
    w += L * saved + (BT * k * F + N * 4)             # layers' saved state, workspace
    if column_sharded:                                # llmc/experts_shard.cuh: all ranks' pairs
        Aa = P * BT * k; Ta = P * BT; cols = C // P   # over this rank's C/P columns
        w += L * (align256(Aa * 4) + 2 * align256(Aa * F) + align256(Ta * cols * X))   # idx, gate, s, x columns
        f = max(Aa, Ta * cols); amax = min(Aa, N)
        sched = align256(8 * Aa + (1 << 20)) + 2 * align256(Aa * 4)                  # schedule of the Aa pairs
        grads = 2 * align256(Aa * F) + 4 * align256(ceil_div(Aa, 64) * cols * F)     # dU/dV segment sums
        w += (align256(BT * C * X) + align256(Ta * cols * X) + 2 * align256(f * F) + 2 * align256(BT * k * F)
              + align256(Aa * F) + 3 * align256(Aa * 4) + 2 * align256((amax + 1) * 4) + align256(4)
              + align256(max(sched, grads)))        # the one work buffer of the exchanges
    w += L * N * 4 + 2 * L * F                        # expert counts, statistics
    return w

SCHEMES = ['replicated', 'zero1', 'tables', 'zero1+tables']

def state_bytes(N, P, scheme):
    Pt = num_params(N); Tb = table_params(N); R = Pt - Tb
    if scheme == 'replicated': return 16 * Pt
    if scheme == 'zero1': return 4 * Pt + 12 * Pt / P
    if scheme == 'tables': return 16 * R + 16 * Tb / P
    if scheme == 'zero1+tables': return 4 * R + 12 * R / P + 16 * Tb / P

def total_bytes(N, P, scheme, B, k, T=1024):
    col = scheme in ('tables', 'zero1+tables') and P > 1
    return state_bytes(N, P, scheme) + activation_bytes(N, B, T, k, P, col) + MARGIN

def largest_n(P, scheme, B, k):
    lo, hi = 1, 1 << 14
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total_bytes(mid * mid, P, scheme, B, k) <= USABLE: lo = mid
        else: hi = mid - 1
    return lo

# ----------------------------------------------------------------------------
# bytes on the wire per GPU per step (sent; the same amount is received), the expert branch only

def wire_column(B, k, P, T=1024):
    """by columns of C: per layer, with BT = B*T tokens per rank
    fwd: all-gather idx+gate (8 B/pair), all-to-all x columns (bf16), s: partials to the token's
         owner (all-to-all, fp32) + all-gather of the summed s (fp32), all-to-all y columns back (fp32)
    bwd: all-to-all dy columns (bf16), h: partials to owner + all-gather of ds (fp32), dx columns back (fp32)"""
    BT = B * T
    f = {}
    f['idx+gate all-gather'] = (P - 1) * BT * k * 8
    f['x columns all-to-all'] = (P - 1) * BT * (C // P) * 2
    f['s partials + all-gather'] = 2 * (P - 1) * BT * k * 4
    f['y columns all-to-all'] = (P - 1) * BT * (C // P) * 4
    b = {}
    b['dy columns all-to-all'] = (P - 1) * BT * (C // P) * 2
    b['h partials + ds all-gather'] = 2 * (P - 1) * BT * k * 4
    b['dx columns all-to-all'] = (P - 1) * BT * (C // P) * 4
    return L * sum(f.values()), L * sum(b.values()), f, b

def reach(P, k):
    """expected number of other ranks a token's k experts fall on (uniform routing, ids spread evenly)"""
    return (P - 1) * (1 - (1 - 1 / P) ** k)

def wire_expert_id(B, k, P, T=1024):
    """by expert id: per layer
    fwd: x once to each other rank that owns one of the token's k experts (bf16; under uniform
         routing a token reaches reach(P, k) = (P-1)(1 - (1-1/P)^k) other ranks), the pairs
         (idx+gate, 8 B) to their owner, each reached rank's partial y back (fp32, summed in rank order)
    bwd: dy to the same ranks (bf16), partial dx back (fp32), dgate back to the token (fp32)"""
    BT = B * T
    r = reach(P, k)
    f = {'x to owners': r * BT * C * 2,
         'pairs to owners': BT * k * 8 * (P - 1) / P,
         'partial y back': r * BT * C * 4}
    b = {'dy to owners': r * BT * C * 2,
         'partial dx back': r * BT * C * 4,
         'dgate back': BT * k * 4 * (P - 1) / P}
    return L * sum(f.values()), L * sum(b.values()), f, b

def dp_table_grad_bytes(N, P):
    """what the data-parallel gradient all-reduce moves today for U and V alone (bf16, ring)"""
    return 2 * (P - 1) / P * table_params(N) * 2

BW = 370e9   # assumed NCCL bus rate per GPU and direction on H200 NVLink 4 (450 GB/s raw)

def main():
    check = '--check' in sys.argv
    Ns = [16384, 65536, 262144, 1048576]
    print("## parameter counts, d12 omni (I=1920)")
    for N in Ns:
        Pt = num_params(N)
        print(f"N={N:>8} n={int(math.sqrt(N)):>5} params={Pt/1e9:.4f}B  U+V={table_params(N)/1e9:.4f}B "
              f"({100*table_params(N)/Pt:.1f}%)  16 B/param = {16*Pt/GiB:.1f} GiB  ckpt 12 B/param = {12*Pt/1e9:.1f} GB")
    if check:
        assert abs(num_params(16384) - 425.2e6) < 0.05e6, num_params(16384)
        assert abs(num_params(65536) - 1333.6e6) < 0.05e6
        assert abs(num_params(262144) / 1e9 - 4.96) < 0.005
        assert abs(num_params(1048576) / 1e9 - 19.5) < 0.05
        # the allocation failure: "asked for 74261 MiB for fp32 master weights"
        assert int(num_params(1048576) * 4 / 2**20) == 74261, num_params(1048576) * 4 / 2**20
    print("\n## activations + scratch (replicated path), GiB")
    for N in Ns:
        print(f"N={N:>8}: " + "  ".join(f"B={B},k={k}: {activation_bytes(N, B, 1024, k)/GiB:.2f}"
                                         for B in (8, 16, 32) for k in (16, 32)))
    print("\n## memory per GPU (GiB), d12, T=1024, k=32, incl. 1 GiB margin")
    for B in (16, 32):
        print(f"### B={B}")
        print("| N | params | P | replicated | ZeRO-1 | tables (columns) | ZeRO-1 + tables |")
        for N in Ns:
            for P in (1, 2, 4, 8):
                row = [total_bytes(N, P, s, B, 32) / GiB for s in SCHEMES]
                print(f"| {N:,} | {num_params(N)/1e9:.2f}B | {P} | " + " | ".join(f"{x:.1f}" for x in row) + " |")
    print("\n## state only (GiB per GPU: weights, grads, master, m, v)")
    for N in Ns:
        print(f"N={N:>8}: " + "; ".join(f"P={P}: " + "/".join(f"{state_bytes(N, P, s)/GiB:.1f}" for s in SCHEMES)
                                        for P in (1, 2, 4, 8)))
    print("\n## largest N = n*n that fits in 139 GiB, d12, T=1024 (B, k)")
    for B, k in ((16, 32), (32, 32), (16, 16)):
        for P in (1, 2, 4, 8):
            cells = []
            for s in SCHEMES:
                n = largest_n(P, s, B, k)
                p4 = 4 ** int(math.log(n * n, 4))
                cells.append(f"{s}: n={n} N={n*n:,} ({num_params(n*n)/1e9:.1f}B), pow4 {p4:,}")
            print(f"B={B} k={k} P={P}: " + " | ".join(cells))
    print("\n## expert-branch bytes per GPU per step (sent; GB = 1e9 B), d12")
    print("| B | k | P | columns fwd | columns bwd | columns total | ms @370 | expert-id fwd | expert-id bwd | expert-id total | ms @370 | ratio |")
    for B in (16, 32):
        for k in (16, 32):
            for P in (2, 4, 8):
                cf, cb, _, _ = wire_column(B, k, P)
                ef, eb, _, _ = wire_expert_id(B, k, P)
                print(f"| {B} | {k} | {P} | {cf/1e9:.2f} | {cb/1e9:.2f} | {(cf+cb)/1e9:.2f} | {(cf+cb)/BW*1e3:.1f} | "
                      f"{ef/1e9:.2f} | {eb/1e9:.2f} | {(ef+eb)/1e9:.2f} | {(ef+eb)/BW*1e3:.1f} | {(ef+eb)/(cf+cb):.2f} |")
    print("\n## the parts, per layer, B=32 k=16 P=4 (MB)")
    for name, fn in (('columns', wire_column), ('expert id', wire_expert_id)):
        _, _, f, b = fn(32, 16, 4)
        print(name + ": " + ", ".join(f"{kk} {v/1e6:.1f}" for kk, v in list(f.items()) + list(b.items())))
    print("\n## expert-id partition: other ranks a token reaches, (P-1)(1-(1-1/P)^k), of P-1")
    for k in (16, 32):
        print(f"k={k}: " + ", ".join(f"P={P}: {reach(P, k):.3f} of {P-1}" for P in (2, 4, 8)))
    print("\n## today's data-parallel all-reduce of the U, V gradients alone (GB per GPU per step, ms @370)")
    for N in Ns:
        print(f"N={N:>8}: " + ", ".join(f"P={P}: {dp_table_grad_bytes(N, P)/1e9:.2f} GB {dp_table_grad_bytes(N, P)/BW*1e3:.0f} ms"
                                         for P in (2, 4, 8)))
    print("\n## ZeRO-1 vs all-reduce: gradient bytes per GPU per step (bf16), GB")
    for N in Ns:
        Pt = num_params(N)
        print(f"N={N:>8}: " + ", ".join(f"P={P}: all-reduce {2*(P-1)/P*Pt*2/1e9:.2f}, RS+AG {((P-1)/P*Pt*2)*2/1e9:.2f}, "
                                         f"RS fp32 + AG bf16 {((P-1)/P*Pt*4 + (P-1)/P*Pt*2)/1e9:.2f}" for P in (2, 4, 8)))
    if check:
        cf, cb, _, _ = wire_column(32, 16, 4); ef, eb, _, _ = wire_expert_id(32, 16, 4)
        assert cf + cb < ef + eb
        print("\nchecks passed")

if __name__ == '__main__':
    main()
