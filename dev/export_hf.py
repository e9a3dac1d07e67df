"""
export_hf.py - export an omnimoe model file (or the model inside a training checkpoint) to a
Hugging Face folder. Pure Python (struct, array, json): no PyTorch or numpy needed to export.

    python3 dev/export_hf.py out/run/model.bin out/hf_model
    python3 dev/export_hf.py out/run/ckpt_00005000.bin out/hf_model     (params + rank 0's BN set)

What the folder holds (docs/design.md §1-§2 for the math, §5.3-§5.4 for the input files):
  gelu     a standard GPT-2: config.json (model_type gpt2, activation gelu_new = the tanh GELU)
           and model.safetensors with GPT2LMHeadModel's names; the Linear weights are transposed
           into GPT-2's Conv1D layout (in, out). transformers loads it without remote code.
  swiglu,  config.json (model_type omnimoe, auto_map), model.safetensors, and the modeling code
  omni     configuration_omnimoe.py + modeling_omnimoe.py (copied from dev/hf_omnimoe/), which
           transformers loads with trust_remote_code=True. It computes our model in evaluation
           mode: router BN with the running statistics, the exact top-k (ties to the smaller
           expert id), the gate kind of the file. Weights keep our (out, in) layout.
Both: the LM head is tied to wte (no lm_head tensor is written); the padded vocabulary rows
wte[V:Vp] are dropped (they never get probability, docs/design.md §1.2), so vocab_size = V and
the logits have V columns. All tensors are float32, bit for bit the floats of the input file.

Input checks: magic, version, the exact size the header implies, the end marker, the XXH64 hash
(the python xxhash module when installed, else dev/xxh64.py's pure-Python one: ~25 MB/s), and no
NaN/Inf weight. Any failure: one message naming the file, exit status 1, nothing written; a
write error (a full disk) removes what the export had written.
"""

import json
import math
import os
import shutil
import struct
import sys
from array import array

import xxh64  # dev/xxh64.py, next to this file

MODEL_MAGIC, CKPT_MAGIC, FIXTURE_MAGIC, SHARD_MAGIC = 20261101, 20261102, 20261103, 20240520
HEADER_BYTES = 1024
TRAILER_BYTES = 16
END_MAGIC = b"OMNI-END"
FFN_NAMES = ["gelu", "swiglu", "omni"]
FFN_KIND_MOE = 3  # header slot 8 of a moe model (llmc/config.h); its tensors have no Hugging Face layout here
HERE = os.path.dirname(os.path.abspath(__file__))
MODELING_DIR = os.path.join(HERE, "hf_omnimoe")
PURE_HASH_BPS = 25e6  # bytes/s of the pure-Python XXH64 (measured: 25-30 MB/s)
MODELING_FILES = ["configuration_omnimoe.py", "modeling_omnimoe.py"]

# header slots 2..14 (docs/design.md §5.1)
CONFIG_FIELDS = ["max_seq_len", "vocab_size", "padded_vocab_size", "num_layers", "num_heads", "channels",
                 "ffn_kind", "ffn_hidden", "router_n", "num_experts", "top_k", "router_norm", "gate"]
PARAM_NAMES = ["wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b",
               "fcw", "fcb", "fcprojw", "fcprojb", "routerw", "expert_u", "expert_v", "lnfw", "lnfb"]


class ExportError(Exception):
    pass


def param_shapes(c):
    """The 19 tensors of llmc/config.h in layout order; None for a tensor the kind lacks."""
    Vp, C, L, T, H = c["padded_vocab_size"], c["channels"], c["num_layers"], c["max_seq_len"], c["ffn_hidden"]
    gelu, omni = c["ffn_kind"] == 0, c["ffn_kind"] == 2
    n, N = c["router_n"], c["num_experts"]
    return [(Vp, C), (T, C), (L, C), (L, C), (L, 3 * C, C), (L, 3 * C), (L, C, C), (L, C), (L, C), (L, C),
            (L, H, C) if gelu else (L, 2 * H, C), (L, H) if gelu else None, (L, C, H), (L, C) if gelu else None,
            (L, 2 * n, C) if omni else None, (L, N, C) if omni else None, (L, N, C) if omni else None,
            (C,), (C,)]


def numel(shape):
    return math.prod(shape) if shape else 0


def num_bn_stats(c):
    return c["num_layers"] * 4 * c["router_n"] if c["ffn_kind"] == 2 else 0


def validate_config(c, path):
    """The checks of model_config_validate that the export relies on."""
    bad = []
    for f in ["max_seq_len", "vocab_size", "padded_vocab_size", "num_layers", "num_heads", "channels", "ffn_hidden"]:
        if c[f] < 1:
            bad.append(f"{f}={c[f]}")
    if c["ffn_kind"] not in (0, 1, 2):
        bad.append(f"ffn_kind={c['ffn_kind']}")
    if c["padded_vocab_size"] < c["vocab_size"]:
        bad.append("padded_vocab_size < vocab_size")
    if c["num_heads"] >= 1 and c["channels"] % c["num_heads"]:
        bad.append("channels not a multiple of num_heads")
    if c["ffn_kind"] == 2:
        n, k = c["router_n"], c["top_k"]
        if n < 1 or c["num_experts"] != n * n or not 1 <= k <= n * n:
            bad.append(f"router_n={n} num_experts={c['num_experts']} top_k={k}")
        if c["router_norm"] not in (0, 1) or c["gate"] not in (0, 1):
            bad.append(f"router_norm={c['router_norm']} gate={c['gate']}")
    if bad:
        raise ExportError(f"{path}: the configuration in its header is impossible ({', '.join(bad)})")


def magic_hint(magic):
    return {FIXTURE_MAGIC: " (it is an omnimoe test fixture)", SHARD_MAGIC: " (it is a token shard)"}.get(magic, "")


class HashingReader:
    """Reads a file front to back and feeds every byte before the trailer to XXH64 (dev/xxh64.py:
    the python xxhash module when installed, else the pure-Python one)."""

    def __init__(self, f, path):
        self.f, self.path = f, path
        self.h = xxh64.new()
        size = os.path.getsize(path)
        if isinstance(self.h, xxh64.PureXXH64) and size > PURE_HASH_BPS * 10:
            print(f"note: verifying the XXH64 of {path} in pure Python: about {size / PURE_HASH_BPS:.0f} s "
                  f"(pip install xxhash makes it fast)", file=sys.stderr)

    def read(self, nbytes, what):
        data = self.f.read(nbytes)
        if len(data) != nbytes:
            raise ExportError(f"{self.path}: unexpected end of file inside {what}")
        self.h.update(data)
        return data

    def skip(self, nbytes, what):
        chunk = 1 << 24
        while nbytes > 0:
            self.read(min(chunk, nbytes), what)
            nbytes -= min(chunk, nbytes)

    def check_trailer(self):
        trailer = self.f.read(TRAILER_BYTES)
        if len(trailer) != TRAILER_BYTES or trailer[8:] != END_MAGIC:
            raise ExportError(f"{self.path}: end magic missing: the file is corrupt")
        stored, computed = struct.unpack("<Q", trailer[:8])[0], self.h.intdigest()
        if computed != stored:
            raise ExportError(f"{self.path}: checksum mismatch (XXH64 of the contents {computed:016x}, "
                              f"stored in the trailer {stored:016x}): the file is corrupt")
        return "verified (XXH64)"


def read_input(path):
    """Returns (config dict, list of 19 float32 byte strings or None, BN stats bytes, description)."""
    if sys.byteorder != "little":
        raise ExportError("this exporter runs on little-endian hosts only")
    if os.path.isdir(path):
        raise ExportError(f"{path}: is a directory, not a file (expected a model file or a checkpoint)")
    if not os.path.exists(path):
        raise ExportError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ExportError(f"{path}: not a regular file (expected a model file or a checkpoint)")
    size = os.path.getsize(path)
    try:
        f = open(path, "rb")
    except OSError as e:  # no read permission
        raise ExportError(f"{path}: cannot open: {e.strerror or e}")
    with f:
        r = HashingReader(f, path)
        if size < HEADER_BYTES:
            raise ExportError(f"{path}: truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
        h = struct.unpack("<256i", r.read(HEADER_BYTES, "the header"))
        c = dict(zip(CONFIG_FIELDS, h[2:15]))
        magic, version = h[0], h[1]
        if magic in (MODEL_MAGIC, CKPT_MAGIC) and c["ffn_kind"] == FFN_KIND_MOE:
            raise ExportError(f"{path}: a moe model (-f moe): this exporter writes gelu, swiglu and omni models only")
        if magic == MODEL_MAGIC:
            if version not in (1, 2):
                raise ExportError(f"{path}: model file version {version}, this exporter reads versions 1 and 2")
            bad = [s for s in range(15, 256) if h[s] != 0]
            if bad:
                raise ExportError(f"{path}: header slot {bad[0]} is {h[bad[0]]}, expected 0 (corrupt)")
            validate_config(c, path)
            P, NB = sum(numel(s) for s in param_shapes(c)), num_bn_stats(c)
            expected = HEADER_BYTES + 4 * (P + NB) + (TRAILER_BYTES if version == 2 else 0)
            kind, skip_between = f"model file v{version}", 0
        elif magic == CKPT_MAGIC:
            if version != 2:
                raise ExportError(f"{path}: checkpoint version {version}, this exporter reads version 2")
            validate_config(c, path)
            i64 = lambda slot: struct.unpack_from("<q", struct.pack("<2i", h[slot], h[slot + 1]))[0]
            P, NB, S, file_bytes = i64(48), i64(50), h[27], i64(56)
            if P != sum(numel(s) for s in param_shapes(c)) or NB != num_bn_stats(c) or S < 1:
                raise ExportError(f"{path}: section sizes (params {P}, BN {NB} x {S} sets) do not match the model "
                                  f"in its header: the file is corrupt")
            expected = file_bytes
            kind, skip_between = f"checkpoint v2, step {h[20]}, BN set 0 of {S}", 8 * P  # m and v
        else:
            raise ExportError(f"{path}: bad magic number {magic}, expected {MODEL_MAGIC} (model file) or "
                              f"{CKPT_MAGIC} (checkpoint){magic_hint(magic)}")
        if size != expected:
            raise ExportError(f"{path}: {'truncated: ' if size < expected else ''}{size} bytes, expected {expected} "
                              f"for the configuration in its header")
        tensors = []
        for name, shape in zip(PARAM_NAMES, param_shapes(c)):
            tensors.append(r.read(4 * numel(shape), f"tensor {name}") if shape else None)
        r.skip(skip_between, "the AdamW moments")
        bn = r.read(4 * NB, "the BN running statistics")
        if magic == CKPT_MAGIC:
            r.skip(expected - TRAILER_BYTES - f.tell(), "the other BN sets, the loader and RNG state")
        hash_note = r.check_trailer() if magic == CKPT_MAGIC or version == 2 else \
            "NOT verified (a version-1 model file has no hash)"
    for name, data in list(zip(PARAM_NAMES, tensors)) + [("the BN running statistics", bn)]:
        if data and not math.isfinite(sum(array("f", data))):  # a double sum of fp32 values cannot overflow
            a = array("f", data)
            i = next(i for i, x in enumerate(a) if not math.isfinite(x))
            raise ExportError(f"{path}: {name}[{i}] = {a[i]}: not a usable model")
    return c, tensors, bn, f"{kind}; hash {hash_note}"


def transpose(data, rows, cols):
    """(rows, cols) float32 bytes -> (cols, rows), bits unchanged."""
    a = array("f", data)
    return b"".join(a[j::cols].tobytes() for j in range(cols))


def layer(data, l, L):
    step = len(data) // L
    return data[l * step:(l + 1) * step]


def hf_tensors(c, t, bn):
    """[(name, shape, float32 bytes)] in the order written; t = the 19 tensors of the input."""
    (wte, wpe, ln1w, ln1b, qkvw, qkvb, attprojw, attprojb, ln2w, ln2b,
     fcw, fcb, fcprojw, fcprojb, routerw, expert_u, expert_v, lnfw, lnfb) = t
    V, C, L, T, H = c["vocab_size"], c["channels"], c["num_layers"], c["max_seq_len"], c["ffn_hidden"]
    n, N = c["router_n"], c["num_experts"]
    gelu = c["ffn_kind"] == 0
    out = [("transformer.wte.weight", (V, C), wte[:4 * V * C]),  # padded rows dropped
           ("transformer.wpe.weight", (T, C), wpe)]
    for l in range(L):
        p = f"transformer.h.{l}."
        if gelu:  # GPT-2's Conv1D keeps weights as (in, out)
            c_attn = ((C, 3 * C), transpose(layer(qkvw, l, L), 3 * C, C))
            c_proj = ((C, C), transpose(layer(attprojw, l, L), C, C))
            c_fc = ((C, H), transpose(layer(fcw, l, L), H, C))
            fc_proj = ((H, C), transpose(layer(fcprojw, l, L), C, H))
        else:     # nn.Linear keeps (out, in): our layout
            c_attn = ((3 * C, C), layer(qkvw, l, L))
            c_proj = ((C, C), layer(attprojw, l, L))
            c_fc = ((2 * H, C), layer(fcw, l, L))
            fc_proj = ((C, H), layer(fcprojw, l, L))
        out += [(p + "ln_1.weight", (C,), layer(ln1w, l, L)), (p + "ln_1.bias", (C,), layer(ln1b, l, L)),
                (p + "attn.c_attn.weight",) + c_attn, (p + "attn.c_attn.bias", (3 * C,), layer(qkvb, l, L)),
                (p + "attn.c_proj.weight",) + c_proj, (p + "attn.c_proj.bias", (C,), layer(attprojb, l, L)),
                (p + "ln_2.weight", (C,), layer(ln2w, l, L)), (p + "ln_2.bias", (C,), layer(ln2b, l, L)),
                (p + "mlp.c_fc.weight",) + c_fc]
        if gelu:
            out.append((p + "mlp.c_fc.bias", (H,), layer(fcb, l, L)))
        out.append((p + "mlp.c_proj.weight",) + fc_proj)
        if gelu:
            out.append((p + "mlp.c_proj.bias", (C,), layer(fcprojb, l, L)))
        if c["ffn_kind"] == 2:
            stats = layer(bn, l, L)  # running_mean[2n] then running_var[2n]
            out += [(p + "mlp.router.weight", (2 * n, C), layer(routerw, l, L)),
                    (p + "mlp.expert_u", (N, C), layer(expert_u, l, L)),
                    (p + "mlp.expert_v", (N, C), layer(expert_v, l, L)),
                    (p + "mlp.bn_running_mean", (2 * n,), stats[:8 * n]),
                    (p + "mlp.bn_running_var", (2 * n,), stats[8 * n:])]
    out += [("transformer.ln_f.weight", (C,), lnfw), ("transformer.ln_f.bias", (C,), lnfb)]
    for name, shape, data in out:
        assert len(data) == 4 * numel(shape), (name, shape, len(data))
    return out


def write_safetensors(path, tensors, metadata):
    """safetensors: u64 little-endian header length, a JSON header (name -> dtype, shape,
    data_offsets [begin, end) into the data), padded with spaces to a multiple of 8, then the data."""
    header, offset = {"__metadata__": metadata}, 0
    for name, shape, data in tensors:
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, data in tensors:
            f.write(data)


def hf_config(c, source):
    V, C, L, NH, T, H = (c["vocab_size"], c["channels"], c["num_layers"], c["num_heads"], c["max_seq_len"],
                         c["ffn_hidden"])
    common = {"vocab_size": V, "n_positions": T, "n_embd": C, "n_layer": L, "n_head": NH,
              "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256,
              "tie_word_embeddings": True, "torch_dtype": "float32", "omnimoe_source": source}
    if c["ffn_kind"] == 0:
        return dict(common, model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=T, n_inner=H,
                    activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                    initializer_range=0.02, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                    reorder_and_upcast_attn=False, use_cache=True)
    return dict(common, model_type="omnimoe", architectures=["OmnimoeForCausalLM"],
                auto_map={"AutoConfig": "configuration_omnimoe.OmnimoeConfig",
                          "AutoModelForCausalLM": "modeling_omnimoe.OmnimoeForCausalLM"},
                padded_vocab_size=c["padded_vocab_size"], ffn_kind=FFN_NAMES[c["ffn_kind"]], ffn_hidden=H,
                router_n=c["router_n"], num_experts=c["num_experts"], num_experts_per_tok=c["top_k"],
                router_norm=["none", "bn"][c["router_norm"]] if c["ffn_kind"] == 2 else "none",
                gate=["softmax", "prob"][c["gate"]] if c["ffn_kind"] == 2 else "softmax", bn_eps=1e-5)


def export(src, out_dir):
    c, tensors, bn, description = read_input(src)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ExportError(f"{out_dir}: exists and is not an empty directory: choose a new output directory "
                          f"(an earlier export is never overwritten)")
    source = {"file": os.path.basename(src), "input": description, "padded_vocab_size": c["padded_vocab_size"],
              "header": {k: c[k] for k in CONFIG_FIELDS}}
    made = not os.path.exists(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        write_safetensors(os.path.join(out_dir, "model.safetensors"), hf_tensors(c, tensors, bn), {"format": "pt"})
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(hf_config(c, source), f, indent=2)
            f.write("\n")
        if c["ffn_kind"] != 0:
            for name in MODELING_FILES:
                shutil.copyfile(os.path.join(MODELING_DIR, name), os.path.join(out_dir, name))
    except OSError as e:  # a full disk, an unwritable folder: a half-written export must not look like one
        if os.path.isdir(out_dir):  # it was empty or new: everything in it is ours
            for name in os.listdir(out_dir):
                os.remove(os.path.join(out_dir, name))
            if made:
                os.rmdir(out_dir)
        raise ExportError(f"{out_dir}: writing the export failed ({e.strerror or e}); nothing was left there")
    return c, description


def main(argv):
    if len(argv) != 3 or argv[1].startswith("-"):
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        print("usage: python3 dev/export_hf.py <model.bin | ckpt_XXXXXXXX.bin> <output directory>", file=sys.stderr)
        return 1
    try:
        c, description = export(argv[1], argv[2])
    except ExportError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(f"exported {argv[1]} ({description}) as {FFN_NAMES[c['ffn_kind']]} "
          f"L={c['num_layers']} C={c['channels']} to {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
