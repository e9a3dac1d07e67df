"""
omnimoe_torch.py - an independent PyTorch reference of the omnimoe model (docs/design.md §1-2) and
the binary files it shares with the C and CUDA trainers (model file, fixture file).

It is written to be read, not to be fast: every step of the math is spelled out, the top-k is
a brute-force sort of the FULL n x n score grid (ties broken by the smaller expert id), and all
gradients come from autograd. The default dtype is float64 so that the fixtures it produces
are an exact-math reference for the fp32 C trainer and the CUDA trainer.

Layout (llmc/config.h): 27 parameter tensors in a fixed order, in one flat fp32 buffer;
  fcw (swiglu/omni) rows [0,I) = Wg, [I,2I) = Wu;  routerw rows [0,n) = Wr, [n,2n) = Wc;
  expert id e = i*n + j (i = row, j = column); BN running stats per layer: mean[2n] then var[2n].
  The last 8 tensors belong to the moe kind (docs/design.md §10) and are empty for the others.

The moe kind (moe_ffn) is written from docs/design.md §10 alone, densely: every routed expert
runs on every token and the top-k choice only picks which outputs are summed, so the code shares
no structure with the C trainer's pair lists. Its load-balance loss (§10.3) is part of the loss
when training with alpha > 0, as in the C trainer (mean_loss = cross-entropy + L_aux).

Library use:
    cfg = Config(...); params = random_params(cfg, rng); bn = ...
    out = forward(cfg, params, bn, inputs, targets, training=True)   # dict: logits, loss, bn_after
Command line (a quick look at a model file):
    python dev/omnimoe_torch.py model.bin [--B 2 --T 16 --seed 0 --eval]
"""

import argparse
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import xxh64  # dev/xxh64.py, next to this file

MODEL_MAGIC = 20261101
MODEL_VERSION = 1
MODEL_VERSION_HASHED = 2  # the trainers write this one: with a 16-byte trailer
FIXTURE_MAGIC = 20261103
FIXTURE_VERSION = 1
HEADER_INTS = 256

FFN_GELU, FFN_SWIGLU, FFN_OMNI, FFN_MOE = 0, 1, 2, 3
MOE_ROUTER_LINEAR, MOE_ROUTER_TANH = 0, 1
MOE_TANH_WIDTH = 8        # the tanh router's hidden width, in multiples of E_t
MOE_HEADER_SLOT = 60      # slots 60-69: the moe fields, in Config order
ROUTER_NORM_NONE, ROUTER_NORM_BN = 0, 1
GATE_SOFTMAX, GATE_PROB = 0, 1

LN_EPS = 1e-5
BN_EPS = 1e-5
BN_MOMENTUM = 0.1

PARAM_NAMES = ["wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b",
               "fcw", "fcb", "fcprojw", "fcprojb", "routerw", "expert_u", "expert_v", "lnfw", "lnfb",
               "moe_router", "moe_router2", "moe_gate_map", "moe_w1", "moe_w2", "moe_const",
               "moe_const_mix", "moe_bias"]
MOE_FIELDS = ["moe_experts", "moe_topk", "moe_shared", "moe_zero", "moe_copy", "moe_const",
              "moe_gate_res", "moe_norm_topk", "moe_router", "moe_input_scale"]


@dataclass
class Config:
    max_seq_len: int
    vocab_size: int
    padded_vocab_size: int
    num_layers: int
    num_heads: int
    channels: int
    ffn_kind: int
    ffn_hidden: int
    router_n: int = 0
    num_experts: int = 0
    top_k: int = 0
    router_norm: int = ROUTER_NORM_BN
    gate: int = GATE_SOFTMAX
    # moe only (docs/design.md §10), header slots 60-69 in this order; 0 for the other kinds
    moe_experts: int = 0      # E routed SwiGLU experts of width I_e = ffn_hidden
    moe_topk: int = 0         # k
    moe_shared: int = 0       # S shared experts: one SwiGLU of width S*I_e
    moe_zero: int = 0         # MoE++ zero experts
    moe_copy: int = 0         # MoE++ copy experts
    moe_const: int = 0        # MoE++ constant experts
    moe_gate_res: int = 0     # gating residuals
    moe_norm_topk: int = 0    # gates renormalised over the chosen non-zero experts
    moe_router: int = MOE_ROUTER_LINEAR
    moe_input_scale: int = 0  # routed experts read k x

    # header slots [2..14] of docs/design.md §5, in order
    def header_slots(self):
        return [self.max_seq_len, self.vocab_size, self.padded_vocab_size, self.num_layers,
                self.num_heads, self.channels, self.ffn_kind, self.ffn_hidden, self.router_n,
                self.num_experts, self.top_k, self.router_norm, self.gate]

    def moe_slots(self):
        return [getattr(self, f) for f in MOE_FIELDS]

    @staticmethod
    def from_header(h):
        c = Config(*[int(x) for x in h[2:15]])
        for i, f in enumerate(MOE_FIELDS):
            setattr(c, f, int(h[MOE_HEADER_SLOT + i]))
        return c

    def moe_routed(self):
        """E_t = E + constant + copy + zero; ids in that order."""
        if self.ffn_kind != FFN_MOE:
            return 0
        return self.moe_experts + self.moe_const + self.moe_copy + self.moe_zero

    def dense_width(self):
        """the width of the dense branch: ffn_hidden, or S*I_e for moe."""
        return self.moe_shared * self.ffn_hidden if self.ffn_kind == FFN_MOE else self.ffn_hidden

    def describe(self):
        kind = ["gelu", "swiglu", "omni", "moe"][self.ffn_kind]
        s = (f"L={self.num_layers} C={self.channels} NH={self.num_heads} maxT={self.max_seq_len} "
             f"V={self.vocab_size} Vp={self.padded_vocab_size} ffn={kind} H={self.ffn_hidden}")
        if self.ffn_kind == FFN_OMNI:
            s += (f" n={self.router_n} N={self.num_experts} k={self.top_k}"
                  f" norm={['none', 'bn'][self.router_norm]} gate={['softmax', 'prob'][self.gate]}")
        if self.ffn_kind == FFN_MOE:
            s += (f" E={self.moe_experts} k={self.moe_topk} S={self.moe_shared} zero={self.moe_zero}"
                  f" copy={self.moe_copy} const={self.moe_const} gate_res={self.moe_gate_res}"
                  f" norm_topk={self.moe_norm_topk} router={['linear', 'tanh'][self.moe_router]}"
                  f" input_scale={self.moe_input_scale}")
        return s


def param_shapes(c):
    """Shapes of the 27 tensors in layout order; an empty tuple-like (0,) for a missing tensor."""
    Vp, C, L, T, H = c.padded_vocab_size, c.channels, c.num_layers, c.max_seq_len, c.dense_width()
    gelu = c.ffn_kind == FFN_GELU
    omni = c.ffn_kind == FFN_OMNI
    moe = c.ffn_kind == FFN_MOE
    n = c.router_n if omni else 0
    N = c.num_experts if omni else 0
    Et, E, Ie, Kc = c.moe_routed(), c.moe_experts, c.ffn_hidden, c.moe_const
    tanh = moe and c.moe_router == MOE_ROUTER_TANH
    RH = MOE_TANH_WIDTH * Et
    return [
        (Vp, C),                              # wte
        (T, C),                               # wpe
        (L, C), (L, C),                       # ln1w, ln1b
        (L, 3 * C, C), (L, 3 * C),            # qkvw, qkvb
        (L, C, C), (L, C),                    # attprojw, attprojb
        (L, C), (L, C),                       # ln2w, ln2b
        (L, H, C) if gelu else (L, 2 * H, C),  # fcw
        (L, H) if gelu else (0,),             # fcb
        (L, C, H),                            # fcprojw
        (L, C) if gelu else (0,),             # fcprojb
        (L, 2 * n, C) if omni else (0,),      # routerw
        (L, N, C) if omni else (0,),          # expert_u
        (L, N, C) if omni else (0,),          # expert_v
        (C,), (C,),                           # lnfw, lnfb
        ((L, RH, C) if tanh else (L, Et, C)) if moe else (0,),   # moe_router: W_r, or W_a of tanh
        (L, Et, RH) if tanh else (0,),        # moe_router2: W_b of the tanh router
        (L, Et, Et) if moe and c.moe_gate_res else (0,),          # moe_gate_map G
        (L, E, 2 * Ie, C) if moe else (0,),   # moe_w1: rows [0,I_e) Wg_e, [I_e,2I_e) Wu_e
        (L, E, C, Ie) if moe else (0,),       # moe_w2
        (L, Kc, C) if moe else (0,),          # moe_const: c_j
        (L, Kc, 2, C) if moe else (0,),       # moe_const_mix: A_j
        (L, Et) if moe else (0,),             # moe_bias: selection only, no gradient
    ]


def num_params(c):
    return sum(int(np.prod(s)) for s in param_shapes(c))


def num_bn_stats(c):
    return c.num_layers * 4 * c.router_n if c.ffn_kind == FFN_OMNI else 0


def unflatten_params(c, flat):
    """flat 1-D array/tensor -> list of 19 tensors (views are not needed: we copy)."""
    flat = torch.as_tensor(flat)
    out, off = [], 0
    for shape in param_shapes(c):
        size = int(np.prod(shape))
        out.append(flat[off:off + size].reshape(shape).clone())
        off += size
    assert off == flat.numel(), f"flat buffer has {flat.numel()} floats, the layout needs {off}"
    return out


def flatten(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


# ----------------------------------------------------------------------------
# the model

def layernorm(x, w, b):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as GPT-2
    return (x - mean) / torch.sqrt(var + LN_EPS) * w + b


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x * torch.sigmoid(x)


def attention(x, qkvw, qkvb, projw, projb, num_heads):
    B, T, C = x.shape
    hs = C // num_heads
    qkv = x @ qkvw.T + qkvb                              # (B, T, 3C), rows of qkvw: q, k, v
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    q = q.reshape(B, T, num_heads, hs).transpose(1, 2)   # (B, NH, T, hs)
    k = k.reshape(B, T, num_heads, hs).transpose(1, 2)
    v = v.reshape(B, T, num_heads, hs).transpose(1, 2)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(hs)      # (B, NH, T, T)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    att = att.masked_fill(~causal, float("-inf"))
    att = torch.softmax(att, dim=-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, C)
    return y @ projw.T + projb


def swiglu(x, fcw, fcprojw, I):
    wg, wu = fcw[:I], fcw[I:2 * I]
    return (silu(x @ wg.T) * (x @ wu.T)) @ fcprojw.T


def topk_full_grid(S, k):
    """Exact top-k of every row of S (M, N) by sorting all N scores on (-score, id).
    Returns int64 indices (M, k), sorted by score descending, ties by the smaller id."""
    S_np = S.detach().cpu().numpy()
    M, N = S_np.shape
    idx = np.empty((M, k), dtype=np.int64)
    ids = np.arange(N)
    for t in range(M):
        order = np.lexsort((ids, -S_np[t]))  # last key is primary: -score, then id
        idx[t] = order[:k]
    return torch.from_numpy(idx)


def omni_ffn(c, x, fcw, fcprojw, routerw, U, V, bn_mean, bn_var, training, record=None):
    """One OmniMoE FFN (docs/design.md §2) over the M = B*T tokens x (M, C).
    bn_mean/bn_var: running stats (2n) of this layer. Returns (y, new_mean, new_var)."""
    n, k, I = c.router_n, c.top_k, c.ffn_hidden
    M = x.shape[0]
    y_shared = swiglu(x, fcw, fcprojw, I)

    logits = x @ routerw.T                                # (M, 2n): [:, :n] rows, [:, n:] columns
    new_mean, new_var = bn_mean, bn_var
    if c.router_norm == ROUTER_NORM_BN:
        if training:
            mean = logits.mean(0)
            var = ((logits - mean) ** 2).mean(0)          # biased: used for normalising
            unbiased = var * M / (M - 1)
            new_mean = (1 - BN_MOMENTUM) * bn_mean + BN_MOMENTUM * mean.detach()
            new_var = (1 - BN_MOMENTUM) * bn_var + BN_MOMENTUM * unbiased.detach()
        else:
            mean, var = bn_mean, bn_var
        logits = (logits - mean) / torch.sqrt(var + BN_EPS)
    pr = torch.log_softmax(logits[:, :n], dim=-1)         # (M, n)
    pc = torch.log_softmax(logits[:, n:], dim=-1)         # (M, n)
    S = (pr[:, :, None] + pc[:, None, :]).reshape(M, n * n)  # S[:, i*n + j] = pr[i] + pc[j]

    E = topk_full_grid(S, k)                              # (M, k), no gradient
    S_sel = torch.gather(S, 1, E)                         # (M, k), carries gradient
    if c.gate == GATE_SOFTMAX:
        g = torch.softmax(S_sel, dim=-1)
    else:
        g = torch.exp(S_sel)

    u = U[E]                                              # (M, k, C)
    v = V[E]                                              # (M, k, C)
    s = (u * x[:, None, :]).sum(-1)                       # (M, k)
    a = g * silu(s)
    y_experts = (a[:, :, None] * v).sum(1)                # (M, C)
    if record is not None:
        record.append({"S": S.detach(), "E": E})
    return y_shared + y_experts, new_mean, new_var


def moe_ffn(c, x, fcw, fcprojw, wr, wr2, gmap, w1, w2, cvec, cmix, bias, z_prev, record=None):
    """One moe FFN (docs/design.md §10.2) over the M = B*T tokens x (M, C).
    z_prev: the previous layer's router logits (M, E_t) for the gating residual, or None.
    Returns (y, z, p, E): the output, this layer's logits (with residual), p = softmax(z) and the
    chosen ids (M, k), best first (by p + b, ties to the smaller id)."""
    E, k, Ie, Kc = c.moe_experts, c.moe_topk, c.ffn_hidden, c.moe_const
    Et = c.moe_routed()
    M, C = x.shape
    y = swiglu(x, fcw, fcprojw, c.moe_shared * Ie)        # shared experts (zero when S = 0)

    if c.moe_router == MOE_ROUTER_TANH:
        z = torch.tanh(x @ wr.T) @ wr2.T                  # W_b tanh(W_a x)
    else:
        z = x @ wr.T                                      # W_r x
    if z_prev is not None:
        z = z + z_prev @ gmap.T                           # + G z_{l-1}
    p = torch.softmax(z, dim=-1)                          # (M, E_t) over all routed experts
    sel = topk_full_grid(p + bias, k)                     # (M, k): the bias only selects
    g = torch.gather(p, 1, sel)                           # (M, k)
    if c.moe_norm_topk:
        keep = (sel < Et - c.moe_zero).to(p.dtype)        # zero experts are the last ids
        D = (g * keep).sum(-1, keepdim=True)
        g = torch.where(D > 0, g * keep / torch.where(D > 0, D, torch.ones_like(D)), torch.zeros_like(g))

    # every routed expert on every token: Y (M, E_t, C)
    xe = k * x if c.moe_input_scale else x
    outs = []
    for e in range(E):                                    # FFN experts: SwiGLU of width I_e
        outs.append(swiglu(xe, w1[e], w2[e], Ie))
    for j in range(Kc):                                   # constant: softmax(A_j x) mixes x and c_j
        w = torch.softmax(xe @ cmix[j].T, dim=-1)         # (M, 2)
        outs.append(w[:, :1] * xe + w[:, 1:] * cvec[j])
    for _ in range(c.moe_copy):
        outs.append(xe)
    for _ in range(c.moe_zero):
        outs.append(torch.zeros_like(xe))
    Y = torch.stack(outs, dim=1)
    Ysel = torch.gather(Y, 1, sel[:, :, None].expand(M, k, C))   # (M, k, C)
    y = y + (g[:, :, None] * Ysel).sum(1)
    if record is not None:
        record.append({"S": (p + bias).detach(), "E": sel, "gates": g.detach()})
    return y, z, p, sel


def moe_balance_loss(c, p, sel, alpha, tau):
    """docs/design.md §10.3 for one layer: alpha sum_i eta_i f_i P_i, f_i = E_t c_i / (k M) with
    c_i the (token, slot) pairs routed to expert i (no gradient), P_i = mean_t p_{t,i}."""
    M, Et, k = p.shape[0], c.moe_routed(), c.moe_topk
    counts = torch.bincount(sel.reshape(-1), minlength=Et).to(p.dtype)
    f = Et * counts / (k * M)
    eta = torch.ones(Et, dtype=p.dtype)
    eta[c.moe_experts:] = tau                             # zero, copy and constant experts
    return alpha * (eta * f * p.mean(0)).sum()


def forward(c, params, bn_stats, inputs, targets=None, training=True, record=None,
            moe_aux=0.0, moe_zc_weight=1.0):
    """params: list of 19 tensors (layout order); bn_stats: 1-D tensor (num_bn_stats) or None;
    inputs/targets: int tensors (B, T). Returns dict with logits (B, T, Vp), loss (mean CE over
    the first V columns, plus the moe balance loss when training with moe_aux > 0) or None,
    aux (that balance loss, 0 otherwise), bn_after (1-D tensor, detached).
    moe_aux, moe_zc_weight: alpha and tau of docs/design.md §10.3 (run settings, not in Config).
    record: optional list that receives per-layer {"S", "E"} for omni and moe layers
    (the selection scores and the chosen ids)."""
    (wte, wpe, ln1w, ln1b, qkvw, qkvb, attprojw, attprojb, ln2w, ln2b,
     fcw, fcb, fcprojw, fcprojb, routerw, expert_u, expert_v, lnfw, lnfb,
     moe_r, moe_r2, moe_g, moe_w1, moe_w2, moe_c, moe_cm, moe_b) = params
    aux = torch.zeros((), dtype=wte.dtype)
    z_prev = None
    B, T = inputs.shape
    assert T <= c.max_seq_len
    n = c.router_n
    bn_after = []
    x = wte[inputs] + wpe[:T]                             # (B, T, C)
    for l in range(c.num_layers):
        h = layernorm(x, ln1w[l], ln1b[l])
        x = x + attention(h, qkvw[l], qkvb[l], attprojw[l], attprojb[l], c.num_heads)
        h = layernorm(x, ln2w[l], ln2b[l])
        if c.ffn_kind == FFN_GELU:
            f = gelu_tanh(h @ fcw[l].T + fcb[l]) @ fcprojw[l].T + fcprojb[l]
        elif c.ffn_kind == FFN_SWIGLU:
            f = swiglu(h, fcw[l], fcprojw[l], c.ffn_hidden)
        elif c.ffn_kind == FFN_MOE:
            gz = z_prev if c.moe_gate_res and l > 0 else None
            f2, z_prev, p, sel = moe_ffn(c, h.reshape(B * T, -1), fcw[l], fcprojw[l], moe_r[l],
                                         moe_r2[l] if moe_r2.numel() else None,
                                         moe_g[l] if gz is not None else None, moe_w1[l], moe_w2[l],
                                         moe_c[l], moe_cm[l], moe_b[l], gz, record)
            f = f2.reshape(B, T, -1)
            if training and moe_aux > 0:
                aux = aux + moe_balance_loss(c, p, sel, moe_aux, moe_zc_weight)
        else:
            base = l * 4 * n
            rm, rv = bn_stats[base:base + 2 * n], bn_stats[base + 2 * n:base + 4 * n]
            f2, rm, rv = omni_ffn(c, h.reshape(B * T, -1), fcw[l], fcprojw[l], routerw[l],
                                  expert_u[l], expert_v[l], rm, rv, training, record)
            f = f2.reshape(B, T, -1)
            bn_after += [rm.detach(), rv.detach()]
        x = x + f
    x = layernorm(x, lnfw, lnfb)
    logits = x @ wte.T                                    # (B, T, Vp): padded columns too
    loss = None
    if targets is not None:
        real = logits[..., :c.vocab_size]                 # padded columns never get probability
        loss = F.cross_entropy(real.reshape(B * T, -1), targets.reshape(-1).long()) + aux
    bn_out = torch.cat(bn_after) if bn_after else torch.zeros(0, dtype=wte.dtype)
    return {"logits": logits, "loss": loss, "aux": aux, "bn_after": bn_out}


# ----------------------------------------------------------------------------
# files, little-endian. Header: 256 int32 = [0] magic [1] version [2] max_seq_len [3] vocab_size
# [4] padded_vocab_size [5] num_layers [6] num_heads [7] channels [8] ffn_kind [9] ffn_hidden
# [10] router_n [11] num_experts [12] top_k [13] router_norm [14] gate, [60..69] the moe fields
# (MOE_FIELDS order), other slots 0 except:
# Model file (magic 20261101): header, fp32 params[num_params], fp32 bn_stats[num_bn]; version 2
#   then a 16-byte trailer: uint64 XXH64 (seed 0) of everything before it, b"OMNI-END" (checked
#   with dev/xxh64.py: the python xxhash module, else pure Python). write_model writes version 1 (no hash), which
#   the trainers still read, with a warning.
# Fixture file (magic 20261103, v1): header with [16] B [17] T [18] training, and for moe the fp32
#   bits of [70] alpha (--moe-aux) [71] tau (--moe-zc-weight) (the checkpoint's slots) and [73] the
#   reference's balance loss L_aux (0 when not training or alpha = 0); then fp32 params,
#   fp32 bn_stats_before, int32 inputs[B*T], int32 targets[B*T], fp32 logits[B*T*Vp],
#   fp32 loss (mean cross-entropy + L_aux: what the gradients are of), fp32 grads[num_params],
#   fp32 bn_stats_after.
FIXTURE_SLOT_MOE_AUX, FIXTURE_SLOT_MOE_TAU, FIXTURE_SLOT_MOE_AUX_LOSS = 70, 71, 73


def f32_bits(x):
    return int(np.array([x], dtype="<f4").view("<i4")[0])


def bits_f32(i):
    return float(np.array([i], dtype="<i4").view("<f4")[0])

def make_header(magic, version, c, extra=None):
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[0], h[1] = magic, version
    h[2:15] = c.header_slots()
    h[MOE_HEADER_SLOT:MOE_HEADER_SLOT + len(MOE_FIELDS)] = c.moe_slots()
    for slot, val in (extra or {}).items():
        h[slot] = val
    return h


def read_header(f, path, magic, version):
    raw = f.read(HEADER_INTS * 4)
    if len(raw) != HEADER_INTS * 4:
        raise ValueError(f"{path}: file shorter than its 1024-byte header")
    h = np.frombuffer(raw, dtype="<i4")
    if h[0] != magic:
        raise ValueError(f"{path}: bad magic {h[0]} (expected {magic})")
    if h[1] != version:
        raise ValueError(f"{path}: unsupported version {h[1]} (expected {version})")
    return h


def _read_array(f, path, dtype, count, what):
    raw = f.read(count * np.dtype(dtype).itemsize)
    if len(raw) != count * np.dtype(dtype).itemsize:
        raise ValueError(f"{path}: file ends inside {what} (wanted {count} values)")
    return np.frombuffer(raw, dtype=dtype).copy()


def write_model(path, c, params_flat, bn_stats):
    """params_flat: num_params floats; bn_stats: num_bn_stats floats."""
    p = np.asarray(params_flat, dtype="<f4").reshape(-1)
    b = np.asarray(bn_stats, dtype="<f4").reshape(-1)
    assert p.size == num_params(c) and b.size == num_bn_stats(c)
    with open(path, "wb") as f:
        f.write(make_header(MODEL_MAGIC, MODEL_VERSION, c).tobytes())
        f.write(p.tobytes())
        f.write(b.tobytes())


def read_model(path):
    """Returns (config, params_flat float32 array, bn_stats float32 array)."""
    with open(path, "rb") as f:
        version = MODEL_VERSION_HASHED if np.frombuffer(f.read(8), dtype="<i4")[1] == MODEL_VERSION_HASHED else MODEL_VERSION
        f.seek(0)
        h = read_header(f, path, MODEL_MAGIC, version)
        c = Config.from_header(h)
        p = _read_array(f, path, "<f4", num_params(c), "the parameters")
        b = _read_array(f, path, "<f4", num_bn_stats(c), "the BN running statistics")
        if version == MODEL_VERSION_HASHED:
            trailer = f.read(16)
            if len(trailer) != 16 or trailer[8:] != b"OMNI-END":
                raise ValueError(f"{path}: the 16-byte trailer (hash, OMNI-END) is missing or damaged")
            hasher = xxh64.new()  # the xxhash module, else pure Python (dev/xxh64.py)
            for part in (h, p, b):
                hasher.update(part.tobytes())
            if hasher.intdigest() != int.from_bytes(trailer[:8], "little"):
                raise ValueError(f"{path}: checksum mismatch (XXH64): the file is corrupt")
        if f.read(1):
            raise ValueError(f"{path}: trailing bytes after the BN statistics")
    return c, p, b


def write_fixture(path, c, B, T, training, params_flat, bn_before, inputs, targets, logits, loss,
                  grads_flat, bn_after, moe_aux=0.0, moe_zc_weight=0.0, aux_loss=0.0):
    f32 = lambda a: np.asarray(a, dtype="<f4").reshape(-1)
    i32 = lambda a: np.asarray(a, dtype="<i4").reshape(-1)
    extra = {16: B, 17: T, 18: int(training)}
    if c.ffn_kind == FFN_MOE:
        extra.update({FIXTURE_SLOT_MOE_AUX: f32_bits(moe_aux), FIXTURE_SLOT_MOE_TAU: f32_bits(moe_zc_weight),
                      FIXTURE_SLOT_MOE_AUX_LOSS: f32_bits(aux_loss)})
    parts = [make_header(FIXTURE_MAGIC, FIXTURE_VERSION, c, extra),
             f32(params_flat), f32(bn_before), i32(inputs), i32(targets), f32(logits),
             f32([loss]), f32(grads_flat), f32(bn_after)]
    sizes = [num_params(c), num_bn_stats(c), B * T, B * T, B * T * c.padded_vocab_size, 1,
             num_params(c), num_bn_stats(c)]
    for part, size in zip(parts[1:], sizes):
        assert part.size == size, (part.size, size)
    with open(path, "wb") as f:
        for part in parts:
            f.write(part.tobytes())


def read_fixture(path):
    with open(path, "rb") as f:
        h = read_header(f, path, FIXTURE_MAGIC, FIXTURE_VERSION)
        c = Config.from_header(h)
        B, T, training = int(h[16]), int(h[17]), int(h[18])
        P, NB, Vp = num_params(c), num_bn_stats(c), c.padded_vocab_size
        d = {"config": c, "B": B, "T": T, "training": training,
             "moe_aux": bits_f32(h[FIXTURE_SLOT_MOE_AUX]), "moe_zc_weight": bits_f32(h[FIXTURE_SLOT_MOE_TAU]),
             "aux_loss": bits_f32(h[FIXTURE_SLOT_MOE_AUX_LOSS])}
        d["params"] = _read_array(f, path, "<f4", P, "params")
        d["bn_before"] = _read_array(f, path, "<f4", NB, "bn_stats_before")
        d["inputs"] = _read_array(f, path, "<i4", B * T, "inputs").reshape(B, T)
        d["targets"] = _read_array(f, path, "<i4", B * T, "targets").reshape(B, T)
        d["logits"] = _read_array(f, path, "<f4", B * T * Vp, "logits").reshape(B, T, Vp)
        d["loss"] = float(_read_array(f, path, "<f4", 1, "loss")[0])
        d["grads"] = _read_array(f, path, "<f4", P, "grads")
        d["bn_after"] = _read_array(f, path, "<f4", NB, "bn_stats_after")
        if f.read(1):
            raise ValueError(f"{path}: trailing bytes after bn_stats_after")
    return d


def run_step(c, params_flat, bn_before, inputs, targets, training=True, dtype=torch.float64,
             record=None, moe_aux=0.0, moe_zc_weight=1.0):
    """Forward + backward from flat fp32 buffers. Returns a dict of float64 numpy results:
    logits, loss (with the moe balance loss, see forward), aux, grads_flat, bn_after
    (bn_after = bn_before where there is no BN update)."""
    params = [t.to(dtype).requires_grad_(True) for t in unflatten_params(c, np.asarray(params_flat))]
    bn = torch.as_tensor(np.asarray(bn_before)).to(dtype)
    inp = torch.as_tensor(np.asarray(inputs)).long()
    tgt = torch.as_tensor(np.asarray(targets)).long()
    out = forward(c, params, bn, inp, tgt, training=training, record=record, moe_aux=moe_aux,
                  moe_zc_weight=moe_zc_weight)
    out["loss"].backward()
    grads = flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
    bn_after = out["bn_after"] if num_bn_stats(c) else bn
    return {"logits": out["logits"].detach().double().numpy(), "loss": out["loss"].item(),
            "aux": float(out["aux"].detach()),
            "grads": grads.detach().double().numpy(), "bn_after": bn_after.double().numpy()}


def main():
    ap = argparse.ArgumentParser(description="Run the PyTorch omnimoe reference on a model file.")
    ap.add_argument("model", help="model .bin (magic 20261101)")
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--T", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", action="store_true", help="BN uses running statistics")
    ap.add_argument("--float32", action="store_true", help="compute in float32 (default float64)")
    ap.add_argument("--moe-aux", type=float, default=0.0, help="moe: balance loss alpha (default 0: off)")
    ap.add_argument("--moe-zc-weight", type=float, default=0.75, help="moe: balance loss tau")
    args = ap.parse_args()
    c, p, b = read_model(args.model)
    print(c.describe(), f"params={num_params(c)}")
    rng = np.random.default_rng(args.seed)
    T = min(args.T, c.max_seq_len)
    inputs = rng.integers(0, c.vocab_size, size=(args.B, T))
    targets = rng.integers(0, c.vocab_size, size=(args.B, T))
    r = run_step(c, p, b, inputs, targets, training=not args.eval,
                 dtype=torch.float32 if args.float32 else torch.float64, moe_aux=args.moe_aux,
                 moe_zc_weight=args.moe_zc_weight)
    print(f"loss {r['loss']:.6f} (balance loss {r['aux']:.6f})  grad norm {np.linalg.norm(r['grads']):.6f}")


if __name__ == "__main__":
    main()
