"""
omnimoe_torch.py - an independent PyTorch reference of the omnimoe model (docs/design.md §1-2) and
the binary files it shares with the C and CUDA trainers (model file, fixture file).

It is written to be read, not to be fast: every step of the math is spelled out, the top-k is
a brute-force sort of the FULL n x n score grid (ties broken by the smaller expert id), and all
gradients come from autograd. The default dtype is float64 so that the fixtures it produces
are an exact-math reference for the fp32 C trainer and the CUDA trainer.

Layout (llmc/config.h): 19 parameter tensors in a fixed order, in one flat fp32 buffer;
  fcw (swiglu/omni) rows [0,I) = Wg, [I,2I) = Wu;  routerw rows [0,n) = Wr, [n,2n) = Wc;
  expert id e = i*n + j (i = row, j = column); BN running stats per layer: mean[2n] then var[2n].

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

FFN_GELU, FFN_SWIGLU, FFN_OMNI = 0, 1, 2
ROUTER_NORM_NONE, ROUTER_NORM_BN = 0, 1
GATE_SOFTMAX, GATE_PROB = 0, 1

LN_EPS = 1e-5
BN_EPS = 1e-5
BN_MOMENTUM = 0.1

PARAM_NAMES = ["wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b",
               "fcw", "fcb", "fcprojw", "fcprojb", "routerw", "expert_u", "expert_v", "lnfw", "lnfb"]


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

    # header slots [2..14] of docs/design.md §5, in order
    def header_slots(self):
        return [self.max_seq_len, self.vocab_size, self.padded_vocab_size, self.num_layers,
                self.num_heads, self.channels, self.ffn_kind, self.ffn_hidden, self.router_n,
                self.num_experts, self.top_k, self.router_norm, self.gate]

    @staticmethod
    def from_header(h):
        return Config(*[int(x) for x in h[2:15]])

    def describe(self):
        kind = ["gelu", "swiglu", "omni"][self.ffn_kind]
        s = (f"L={self.num_layers} C={self.channels} NH={self.num_heads} maxT={self.max_seq_len} "
             f"V={self.vocab_size} Vp={self.padded_vocab_size} ffn={kind} H={self.ffn_hidden}")
        if self.ffn_kind == FFN_OMNI:
            s += (f" n={self.router_n} N={self.num_experts} k={self.top_k}"
                  f" norm={['none', 'bn'][self.router_norm]} gate={['softmax', 'prob'][self.gate]}")
        return s


def param_shapes(c):
    """Shapes of the 19 tensors in layout order; an empty tuple-like (0,) for a missing tensor."""
    Vp, C, L, T, H = c.padded_vocab_size, c.channels, c.num_layers, c.max_seq_len, c.ffn_hidden
    gelu = c.ffn_kind == FFN_GELU
    omni = c.ffn_kind == FFN_OMNI
    n = c.router_n if omni else 0
    N = c.num_experts if omni else 0
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


def forward(c, params, bn_stats, inputs, targets=None, training=True, record=None):
    """params: list of 19 tensors (layout order); bn_stats: 1-D tensor (num_bn_stats) or None;
    inputs/targets: int tensors (B, T). Returns dict with logits (B, T, Vp), loss (mean CE over
    the first V columns) or None, bn_after (1-D tensor, detached).
    record: optional list that receives per-layer {"S", "E"} for omni layers."""
    (wte, wpe, ln1w, ln1b, qkvw, qkvb, attprojw, attprojb, ln2w, ln2b,
     fcw, fcb, fcprojw, fcprojb, routerw, expert_u, expert_v, lnfw, lnfb) = params
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
        loss = F.cross_entropy(real.reshape(B * T, -1), targets.reshape(-1).long())
    bn_out = torch.cat(bn_after) if bn_after else torch.zeros(0, dtype=wte.dtype)
    return {"logits": logits, "loss": loss, "bn_after": bn_out}


# ----------------------------------------------------------------------------
# files, little-endian. Header: 256 int32 = [0] magic [1] version [2] max_seq_len [3] vocab_size
# [4] padded_vocab_size [5] num_layers [6] num_heads [7] channels [8] ffn_kind [9] ffn_hidden
# [10] router_n [11] num_experts [12] top_k [13] router_norm [14] gate, other slots 0 except:
# Model file (magic 20261101): header, fp32 params[num_params], fp32 bn_stats[num_bn]; version 2
#   then a 16-byte trailer: uint64 XXH64 (seed 0) of everything before it, b"OMNI-END" (checked
#   with dev/xxh64.py: the python xxhash module, else pure Python). write_model writes version 1 (no hash), which
#   the trainers still read, with a warning.
# Fixture file (magic 20261103, v1): header with [16] B [17] T [18] training, then fp32 params,
#   fp32 bn_stats_before, int32 inputs[B*T], int32 targets[B*T], fp32 logits[B*T*Vp],
#   fp32 loss, fp32 grads[num_params], fp32 bn_stats_after.

def make_header(magic, version, c, extra=None):
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[0], h[1] = magic, version
    h[2:15] = c.header_slots()
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
                  grads_flat, bn_after):
    f32 = lambda a: np.asarray(a, dtype="<f4").reshape(-1)
    i32 = lambda a: np.asarray(a, dtype="<i4").reshape(-1)
    parts = [make_header(FIXTURE_MAGIC, FIXTURE_VERSION, c, {16: B, 17: T, 18: int(training)}),
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
        d = {"config": c, "B": B, "T": T, "training": training}
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
             record=None):
    """Forward + backward from flat fp32 buffers. Returns a dict of float64 numpy results:
    logits, loss, grads_flat, bn_after (bn_after = bn_before where there is no BN update)."""
    params = [t.to(dtype).requires_grad_(True) for t in unflatten_params(c, np.asarray(params_flat))]
    bn = torch.as_tensor(np.asarray(bn_before)).to(dtype)
    inp = torch.as_tensor(np.asarray(inputs)).long()
    tgt = torch.as_tensor(np.asarray(targets)).long()
    out = forward(c, params, bn, inp, tgt, training=training, record=record)
    out["loss"].backward()
    grads = flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
    bn_after = out["bn_after"] if num_bn_stats(c) else bn
    return {"logits": out["logits"].detach().double().numpy(), "loss": out["loss"].item(),
            "grads": grads.detach().double().numpy(), "bn_after": bn_after.double().numpy()}


def main():
    ap = argparse.ArgumentParser(description="Run the PyTorch omnimoe reference on a model file.")
    ap.add_argument("model", help="model .bin (magic 20261101)")
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--T", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", action="store_true", help="BN uses running statistics")
    ap.add_argument("--float32", action="store_true", help="compute in float32 (default float64)")
    args = ap.parse_args()
    c, p, b = read_model(args.model)
    print(c.describe(), f"params={num_params(c)}")
    rng = np.random.default_rng(args.seed)
    T = min(args.T, c.max_seq_len)
    inputs = rng.integers(0, c.vocab_size, size=(args.B, T))
    targets = rng.integers(0, c.vocab_size, size=(args.B, T))
    r = run_step(c, p, b, inputs, targets, training=not args.eval,
                 dtype=torch.float32 if args.float32 else torch.float64)
    print(f"loss {r['loss']:.6f}  grad norm {np.linalg.norm(r['grads']):.6f}")


if __name__ == "__main__":
    main()
