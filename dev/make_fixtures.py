"""
make_fixtures.py - writes dev/fixtures/<name>.bin: tiny omnimoe models with random weights in
EVERY tensor (biases, LayerNorm and BN running statistics too), random tokens, and the float64
PyTorch reference (dev/omnimoe_torch.py) of one training step: logits, mean loss, the
gradient of every parameter and the BN running statistics after the step. Stored as fp32 in
the fixture format (magic 20261103; see write_fixture in omnimoe_torch.py). test_fixtures.c checks the C trainer
against them; the GPU test can do the same.

moe fixtures (docs/design.md §10) also carry the balance loss's alpha and tau in the header; their
loss is the mean cross-entropy plus the balance loss L_aux (as the C trainer's mean_loss), and
L_aux alone is stored too (header slot 73), so test_fixtures checks both.

Before a fixture is written it must pass three checks (else the next seed is tried):
  * top-k margin: in every omni layer and for every token, the k-th and (k+1)-th best scores
    of the full n x n grid differ by more than MARGIN (moe: the k-th and (k+1)-th largest
    p + b of the E_t routed experts, by more than MOE_MARGIN), so an fp32 implementation
    selects the same experts as float64;
  * the same forward in float32 selects exactly the same expert sets;
  * central finite differences (float64) of a few coordinates of every parameter tensor agree
    with autograd (the selection is held fixed by the margin).

Usage: python dev/make_fixtures.py [--out dev/fixtures] [--only NAME ...]
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import omnimoe_torch as om  # noqa: E402

MARGIN = 1e-3          # smallest allowed gap between the k-th and (k+1)-th score (log-probs)
MOE_MARGIN = 2e-4      # the same for moe, whose scores p + b are probabilities (values <= 1)
FD_EPS = 1e-6          # central difference step (float64)
FD_COORDS = 4          # coordinates checked per parameter tensor
FD_FLOOR = 1e-3        # gradients smaller than this are compared in absolute terms (x FD_FLOOR)

BASE = dict(max_seq_len=16, vocab_size=101, padded_vocab_size=128, num_layers=2, num_heads=4,
            channels=32)

# name -> (config fields, B, T[, training flag: default 1])
FIXTURES = {
    "gelu": (dict(ffn_kind=om.FFN_GELU, ffn_hidden=128), 2, 16),
    "swiglu": (dict(ffn_kind=om.FFN_SWIGLU, ffn_hidden=48), 2, 12),
    "omni_bn_softmax": (dict(ffn_kind=om.FFN_OMNI, ffn_hidden=48, router_n=4, num_experts=16,
                             top_k=3, router_norm=om.ROUTER_NORM_BN, gate=om.GATE_SOFTMAX), 2, 16),
    "omni_none_prob": (dict(ffn_kind=om.FFN_OMNI, ffn_hidden=48, router_n=4, num_experts=16,
                            top_k=6, router_norm=om.ROUTER_NORM_NONE, gate=om.GATE_PROB), 2, 10),
    "omni_bn_prob_kgtn": (dict(ffn_kind=om.FFN_OMNI, ffn_hidden=48, router_n=3, num_experts=9,
                               top_k=5, router_norm=om.ROUTER_NORM_BN, gate=om.GATE_PROB), 2, 8),
    "omni_bn_softmax_keqn": (dict(ffn_kind=om.FFN_OMNI, ffn_hidden=48, router_n=4, num_experts=16,
                                  top_k=4, router_norm=om.ROUTER_NORM_BN, gate=om.GATE_SOFTMAX), 2, 13),
    # k = N: every expert selected (no margin needed), odd sizes
    "omni_bn_softmax_kN": (dict(ffn_kind=om.FFN_OMNI, ffn_hidden=48, router_n=2, num_experts=4,
                                top_k=4, router_norm=om.ROUTER_NORM_BN, gate=om.GATE_SOFTMAX), 3, 7),
    # evaluation mode (training flag 0): BN normalises with the running statistics, which
    # stay unchanged; loss and gradients are still recorded
    "omni_bn_eval": (dict(ffn_kind=om.FFN_OMNI, ffn_hidden=48, router_n=4, num_experts=16,
                          top_k=3, router_norm=om.ROUTER_NORM_BN, gate=om.GATE_SOFTMAX), 2, 9, 0),
    # moe (docs/design.md §10); the fifth field: the balance loss's alpha and tau, and what the
    # seed must show ("bias": the bias changes some token's choice, "zero_only": some token
    # chose only zero experts, so D = 0 and every gate is 0)
    # DeepSeekMoE: linear router, gates = p, shared experts, balance loss over FFN experts only
    "moe": (dict(ffn_kind=om.FFN_MOE, ffn_hidden=12, moe_experts=6, moe_topk=2, moe_shared=1),
            2, 12, 1, dict(moe_aux=0.05, moe_zc_weight=0.75, require=["bias"])),
    # MoE++ as --moepp 1: zero, copy, 2 constant experts, gating residuals, renormalised gates,
    # tanh router, k x input
    "moe_pp": (dict(ffn_kind=om.FFN_MOE, ffn_hidden=12, moe_experts=5, moe_topk=2, moe_shared=1,
                    moe_zero=1, moe_copy=1, moe_const=2, moe_gate_res=1, moe_norm_topk=1,
                    moe_router=om.MOE_ROUTER_TANH, moe_input_scale=1),
               2, 11, 1, dict(moe_aux=0.03, moe_zc_weight=0.6, require=["bias"])),
    # MoE++ experts with the linear router and raw gates, no shared experts (S = 0), k = 3
    "moe_pp_linear": (dict(ffn_kind=om.FFN_MOE, ffn_hidden=8, moe_experts=4, moe_topk=3, moe_shared=0,
                           moe_zero=1, moe_copy=2, moe_const=1),
                      2, 10, 1, dict(moe_aux=0.1, moe_zc_weight=0.5, require=["bias"])),
    # two zero experts, renormalised gates: some tokens pick only zero experts (D = 0); gating
    # residuals with the linear router; no balance loss (alpha = 0)
    "moe_zero_only": (dict(ffn_kind=om.FFN_MOE, ffn_hidden=8, moe_experts=3, moe_topk=2, moe_shared=2,
                           moe_zero=2, moe_const=1, moe_gate_res=1, moe_norm_topk=1),
                      2, 12, 1, dict(moe_aux=0.0, moe_zc_weight=0.75, require=["zero_only"])),
    # evaluation mode: the balance loss is not part of the loss (alpha > 0 is ignored)
    "moe_pp_eval": (dict(ffn_kind=om.FFN_MOE, ffn_hidden=8, moe_experts=4, moe_topk=2, moe_shared=1,
                         moe_zero=1, moe_copy=1, moe_const=1, moe_gate_res=1, moe_norm_topk=1,
                         moe_router=om.MOE_ROUTER_TANH, moe_input_scale=1),
                    2, 9, 0, dict(moe_aux=0.05, moe_zc_weight=0.6)),
}


def random_params(c, rng):
    """Random values for every tensor: matrices N(0, 0.1) (router 0.3 so routing is peaked
    enough for clear top-k margins), biases N(0, 0.1), LN weights 1 + N(0, 0.1)."""
    out = []
    for name, shape in zip(om.PARAM_NAMES, om.param_shapes(c)):
        size = int(np.prod(shape))
        if size == 0:
            out.append(np.zeros(0))
        elif name in ("ln1w", "ln2w", "lnfw"):
            out.append(1.0 + 0.1 * rng.standard_normal(size))
        elif name in ("routerw", "moe_router", "moe_router2", "moe_gate_map"):
            out.append(0.3 * rng.standard_normal(size))
        elif name == "moe_const":
            out.append(0.5 * rng.standard_normal(size))
        elif name == "moe_bias":
            out.append(0.05 * rng.standard_normal(size))  # big enough to change some choices
        else:
            out.append(0.1 * rng.standard_normal(size))
    # round to fp32 first: the float64 reference computes on exactly the stored values
    return np.concatenate(out).astype(np.float32)


def random_bn(c, rng):
    n, out = c.router_n, []
    for _ in range(c.num_layers):
        out.append(0.1 * rng.standard_normal(2 * n))           # running mean
        out.append(rng.uniform(0.5, 1.5, size=2 * n))          # running var, positive
    return (np.concatenate(out) if out else np.zeros(0)).astype(np.float32)


def routed_k_n(c):
    """(k, number of candidates) of the top-k, or None for kinds without routing."""
    if c.ffn_kind == om.FFN_OMNI:
        return c.top_k, c.num_experts
    if c.ffn_kind == om.FFN_MOE:
        return c.moe_topk, c.moe_routed()
    return None


def topk_margin(c, record):
    """Smallest gap between the k-th and (k+1)-th score over all layers and tokens (inf if k=N)."""
    kn = routed_k_n(c)
    if kn is None or kn[0] >= kn[1]:
        return float("inf")
    k = kn[0]
    worst = float("inf")
    for rec in record:
        s = np.sort(rec["S"].numpy(), axis=1)[:, ::-1]
        worst = min(worst, float((s[:, k - 1] - s[:, k]).min()))
    return worst


def moe_features(c, params, record):
    """What a moe seed shows: tokens whose choice the bias changed, tokens with only zero experts."""
    if c.ffn_kind != om.FFN_MOE:
        return {}
    sizes = [int(np.prod(s)) for s in om.param_shapes(c)]
    off = sum(sizes[:om.PARAM_NAMES.index("moe_bias")])
    bias = params[off:off + sizes[-1]].reshape(c.num_layers, -1).astype(np.float64)
    k, first_zero = c.moe_topk, c.moe_routed() - c.moe_zero
    bias_changed = zero_only = 0
    for l, rec in enumerate(record):
        p = rec["S"].numpy() - bias[l]
        chosen = np.sort(rec["E"].numpy(), axis=1)
        by_p = np.sort(om.topk_full_grid(torch.from_numpy(p), k).numpy(), axis=1)
        bias_changed += int((chosen != by_p).any(axis=1).sum())
        zero_only += int((chosen >= first_zero).all(axis=1).sum())
    return {"bias": bias_changed, "zero_only": zero_only}


def same_selection_fp32(c, params, bn, inputs, targets, training, record64, run):
    if routed_k_n(c) is None:
        return True
    record32 = []
    om.run_step(c, params, bn, inputs, targets, training=training, dtype=torch.float32,
                record=record32, **run)
    for r64, r32 in zip(record64, record32):
        a = np.sort(r64["E"].numpy(), axis=1)
        b = np.sort(r32["E"].numpy(), axis=1)
        if not np.array_equal(a, b):
            return False
    return True


def finite_difference_check(c, params, bn, inputs, targets, training, grads, rng, run):
    """Worst relative error of central differences vs autograd over FD_COORDS coordinates of
    each tensor (coordinates with a sizeable gradient preferred, zeros allowed too)."""
    p64 = params.astype(np.float64)
    sizes = [int(np.prod(s)) for s in om.param_shapes(c)]

    def loss_at(p):
        ps = [t.double() for t in om.unflatten_params(c, p)]
        with torch.no_grad():
            out = om.forward(c, ps, torch.as_tensor(bn).double(), torch.as_tensor(inputs).long(),
                             torch.as_tensor(targets).long(), training=training, **run)
        return out["loss"].item()

    worst, off = 0.0, 0
    for size in sizes:
        if size == 0:
            continue
        g = grads[off:off + size]
        # half the coordinates: the largest gradients; half random
        big = np.argsort(-np.abs(g))[:FD_COORDS // 2]
        rand = rng.integers(0, size, size=FD_COORDS - len(big))
        for i in np.concatenate([big, rand]):
            p = p64.copy()
            p[off + i] += FD_EPS
            lp = loss_at(p)
            p[off + i] -= 2 * FD_EPS
            lm = loss_at(p)
            fd = (lp - lm) / (2 * FD_EPS)
            # relative, but not below FD_FLOOR: under it the quotient's rounding (loss ~5 at
            # 1e-16, over 2 FD_EPS: ~1e-9 absolute, depending on the summation order) dominates
            err = abs(fd - g[i]) / max(abs(g[i]), FD_FLOOR)
            worst = max(worst, err)
        off += size
    return worst


def make_one(name, out_dir, max_tries=50):
    fields, B, T = FIXTURES[name][:3]
    training = FIXTURES[name][3] if len(FIXTURES[name]) > 3 else 1
    extra = dict(FIXTURES[name][4]) if len(FIXTURES[name]) > 4 else {}
    require = extra.pop("require", [])
    run = extra  # moe_aux, moe_zc_weight (moe only)
    c = om.Config(**BASE, **fields)
    for attempt in range(max_tries):
        seed = 1000 * (list(FIXTURES).index(name) + 1) + attempt
        rng = np.random.default_rng(seed)
        params = random_params(c, rng)
        bn = random_bn(c, rng)
        inputs = rng.integers(0, c.vocab_size, size=(B, T)).astype(np.int32)
        targets = rng.integers(0, c.vocab_size, size=(B, T)).astype(np.int32)
        record = []
        r = om.run_step(c, params, bn, inputs, targets, training=training, dtype=torch.float64,
                        record=record, **run)
        margin = topk_margin(c, record)
        if margin <= (MOE_MARGIN if c.ffn_kind == om.FFN_MOE else MARGIN):
            print(f"  {name}: seed {seed}: top-k margin {margin:.2e} too thin, next seed")
            continue
        features = moe_features(c, params, record)
        missing = [what for what in require if features[what] == 0]
        if missing:
            print(f"  {name}: seed {seed}: no token shows {', '.join(missing)}, next seed")
            continue
        if not same_selection_fp32(c, params, bn, inputs, targets, training, record, run):
            print(f"  {name}: seed {seed}: float32 selects other experts, next seed")
            continue
        fd_err = finite_difference_check(c, params, bn, inputs, targets, training, r["grads"], rng, run)
        if fd_err > 1e-5:
            raise SystemExit(f"Error: {name}: finite differences disagree with autograd "
                             f"(worst relative error {fd_err:.2e})")
        path = os.path.join(out_dir, name + ".bin")
        om.write_fixture(path, c, B, T, training, params, bn, inputs, targets, r["logits"], r["loss"],
                         r["grads"], r["bn_after"], aux_loss=r["aux"], **run)
        # read back: the file must round-trip
        d = om.read_fixture(path)
        assert np.array_equal(d["params"], params) and d["B"] == B and d["T"] == T
        assert np.allclose(d["grads"], r["grads"], rtol=1e-6, atol=1e-9)
        experts_used = ""
        if routed_k_n(c) is not None:
            used = [len(np.unique(rec["E"].numpy())) for rec in record]
            experts_used = f" experts used/layer {used}/{routed_k_n(c)[1]}"
        if features:
            experts_used += (f"  aux {r['aux']:.6f} (alpha {run['moe_aux']}, tau {run['moe_zc_weight']})"
                             f"  tokens: bias changed the choice {features['bias']}, only zero experts"
                             f" {features['zero_only']}")
        print(f"{name:22s} seed {seed}  B={B} T={T} training={training}  {c.describe()}")
        print(f"{'':22s} loss {r['loss']:.6f}  |grad| {np.linalg.norm(r['grads']):.4f}  "
              f"top-k margin {margin:.2e}  fd rel err {fd_err:.1e}{experts_used}  "
              f"{os.path.getsize(path)} bytes")
        return
    raise SystemExit(f"Error: {name}: no seed in {max_tries} tries gave a top-k margin > {MARGIN}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
    ap.add_argument("--only", nargs="*", help="fixture names (default: all)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)  # deterministic and plenty for these sizes
    names = args.only or list(FIXTURES)
    for name in names:
        if name not in FIXTURES:
            raise SystemExit(f"Error: unknown fixture '{name}' (known: {', '.join(FIXTURES)})")
        make_one(name, args.out)
    print(f"wrote {len(names)} fixtures to {args.out}")


if __name__ == "__main__":
    main()
