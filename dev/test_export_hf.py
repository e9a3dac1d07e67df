"""
test_export_hf.py - loads Hugging Face exports (dev/export_hf.py) of freshly trained gelu, swiglu
and omni models with transformers and compares their logits with the CPU trainer's on the same
tokens. Needs torch and transformers (no GPU: everything runs on the CPU) and a C compiler.

For each case: train `-e tiny` (one case `-e small`) a few steps with ./train_omnimoe_cpu -o,
export model.bin (and for omni the step checkpoint, which must give the same safetensors bytes),
get our logits from dev/export_logits.c (gpt_forward, evaluation mode), load the export (gelu:
GPT2LMHeadModel, no remote code; swiglu/omni: AutoModelForCausalLM with trust_remote_code=True),
run the same random tokens (B=2, T=maxT) and compare the V real columns in fp32: max |diff| <=
TOL_ABS. Also checks that omni selects the same experts as ours (dev/export_logits.c writes its ids), the exported
top-k's tie rule on a crafted score matrix, that greedy
generate() runs, and that a model file with one flipped bit is refused (XXH64).
One PASS/FAIL line per check, then "test_export_hf: N passed, N failed"; exit 1 on any FAIL.

    make train_omnimoe_cpu && python3 dev/test_export_hf.py [--steps 10] [--keep DIR]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# fp32 logits of magnitude ~2 after a different summation order (attention, GEMMs, expert sums):
# measured max |diff| <= 1.5e-6 for the tiny cases, 3.1e-6 for small (torch 2.15, CPU). Planted errors in the omni
# export moved the logits by 3e-4 (BN running var x2, or k-1 experts with the prob gate) to 7e-3
# (BN off, the other gate), so 2e-5 leaves >= 6x room on both sides.
TOL_ABS = 2e-5

CASES = [("gelu", ["-e", "tiny", "-f", "gelu"]), ("swiglu", ["-e", "tiny", "-f", "swiglu"]),
         ("omni", ["-e", "tiny", "-f", "omni"]),
         ("omni_none_prob", ["-e", "tiny", "-f", "omni", "--router-norm", "none", "--gate", "prob"]),
         ("omni_small", ["-e", "small", "-f", "omni"])]  # L=4 C=128 n=16 k=8 maxT=256

passed, failed = 0, 0


def check(name, ok, detail=""):
    global passed, failed
    print(f"{'PASS' if ok else 'FAIL'} {name}{'' if ok else ': ' + detail}", flush=True)
    if ok:
        passed += 1
    else:
        failed += 1
    return ok


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trainer", default="./train_omnimoe_cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
    args = ap.parse_args()
    import transformers
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    work = args.keep or tempfile.mkdtemp(prefix="test_export_hf.")
    os.makedirs(work, exist_ok=True)
    torch.manual_seed(0)
    helper = os.path.join(work, "export_logits")
    # the Makefile's include rule: xxhash.h from the system or, where it lacks it, carry/include
    includes = ["-I."] + (["-Icarry/include"] if os.path.exists("carry/include/xxhash.h") else [])
    run(["gcc", "-O2", "-std=c11", "-fopenmp", *includes, "dev/export_logits.c", "-o", helper, "-lm"])
    rng = np.random.default_rng(1234)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    try:
        for name, flags in CASES:
            run_dir, hf_dir = os.path.join(work, name), os.path.join(work, "hf_" + name)
            for d in (run_dir, hf_dir, hf_dir + "_ckpt"):  # a kept directory of an earlier run
                shutil.rmtree(d, ignore_errors=True)
            run([args.trainer, *flags, "-b", "2", "-t", "32", "-x", str(args.steps), "-l", "3e-3",
                 "--schedule", "constant", "-u", "1", "-v", "0", "-s", "0", "--seed", "7", "-o", run_dir], env=env)
            model_bin = os.path.join(run_dir, "model.bin")
            print("    " + run([sys.executable, "dev/export_hf.py", model_bin, hf_dir]).strip())
            if name.startswith("omni"):
                ck_dir = hf_dir + "_ckpt"
                run([sys.executable, "dev/export_hf.py", os.path.join(run_dir, f"ckpt_{args.steps:08d}.bin"), ck_dir])
                same = open(os.path.join(hf_dir, "model.safetensors"), "rb").read() == \
                    open(os.path.join(ck_dir, "model.safetensors"), "rb").read()
                check(f"{name}: checkpoint export == model.bin export (bytes)", same, "safetensors differ")
                if name == "omni":  # a flipped bit must fail the hash (dev/xxh64.py, with or without xxhash)
                    bad = os.path.join(work, "corrupt.bin")
                    data = bytearray(open(model_bin, "rb").read())
                    data[len(data) // 2] ^= 4
                    open(bad, "wb").write(data)
                    r = subprocess.run([sys.executable, "dev/export_hf.py", bad, os.path.join(work, "hf_corrupt")],
                                       capture_output=True, text=True, cwd=ROOT)
                    check("a model file with one flipped bit is refused (XXH64)", r.returncode == 1 and
                          "checksum mismatch (XXH64" in r.stderr, r.stderr.strip() or r.stdout.strip())
            if name == "gelu":
                model = GPT2LMHeadModel.from_pretrained(hf_dir)
            else:
                model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True)
            model.eval()
            cfg = model.config
            V, T, B = cfg.vocab_size, cfg.n_positions, 2
            Vp = cfg.padded_vocab_size if name != "gelu" else (V + 127) // 128 * 128
            tokens = rng.integers(0, V, size=(B, T)).astype("<i4")
            tok_path, logit_path = os.path.join(work, "tokens.i32"), os.path.join(work, name + ".f32")
            tokens.tofile(tok_path)
            omni = name.startswith("omni")
            ids_path = os.path.join(work, name + ".ids")
            run([helper, model_bin, tok_path, str(B), str(T), logit_path] + ([ids_path] if omni else []), env=env)
            ours = np.fromfile(logit_path, dtype="<f4").reshape(B, T, Vp)[:, :, :V]
            chosen = []
            if omni:  # record the export's expert ids of every layer
                mod = sys.modules[type(model).__module__]
                topk = mod.exact_topk
                mod.exact_topk = lambda S, k: chosen.append(topk(S, k)) or chosen[-1]
            with torch.no_grad():
                theirs = model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()
            if omni:
                mod.exact_topk = topk
                our_ids = np.fromfile(ids_path, dtype="<i4").reshape(len(chosen), B * T, -1)
                differ = [int((E.numpy() != our_ids[l]).any(-1).sum()) for l, E in enumerate(chosen)]
                check(f"{name}: the same experts in the same order as ours, every layer and token", sum(differ) == 0,
                      f"tokens with other experts per layer: {differ}")
            ok_shape = check(f"{name}: logits shape {tuple(theirs.shape)}", theirs.shape == ours.shape,
                             f"ours {ours.shape}")
            if ok_shape:
                diff = np.abs(theirs.astype(np.float64) - ours)
                scale = np.abs(ours).max()
                print(f"    {name}: max |diff| {diff.max():.3e}, mean {diff.mean():.3e}, max |logit| {scale:.3f}, "
                      f"argmax agreement {np.mean(theirs.argmax(-1) == ours.argmax(-1)) * 100:.2f}%")
                check(f"{name}: logits match ours (max |diff| <= {TOL_ABS:g})", diff.max() <= TOL_ABS,
                      f"max |diff| {diff.max():.3e} at {np.unravel_index(diff.argmax(), diff.shape)}")
            if omni:
                # ties: ids 1, 3, 4 score 2.0; rows sorted must put 1, 3 before 4, and the NaN last
                S = torch.tensor([[0.5, 2.0, 1.0, 2.0, 2.0, float("nan")], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
                got = mod.exact_topk(S, 4).tolist()
                check(f"{name}: exported top-k ties go to the smaller id", got == [[1, 3, 4, 2], [0, 1, 2, 3]], str(got))
            with torch.no_grad():
                gen = model.generate(torch.from_numpy(tokens[:1, :8].astype(np.int64)), max_new_tokens=4,
                                     do_sample=False, pad_token_id=50256)
                first = model(torch.from_numpy(tokens[:1, :8].astype(np.int64))).logits[0, -1].argmax().item()
            check(f"{name}: greedy generate() runs and starts with the argmax", gen.shape == (1, 12) and
                  gen[0, 8].item() == first, f"{gen.tolist()} vs first {first}")
    except Exception as e:
        check("run", False, f"{type(e).__name__}: {e}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"test_export_hf: {passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
