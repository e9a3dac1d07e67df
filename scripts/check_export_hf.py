"""
check_export_hf.py - checks a Hugging Face folder written by dev/export_hf.py against the model
file it came from, with the standard library only (struct, array, json: no PyTorch, no numpy),
reading both files itself rather than through the exporter's code:
  - model.safetensors: the 8-byte little-endian header length, a JSON header (padded to 8 bytes),
    every tensor F32 with the expected name and shape, data_offsets [begin, end) of exactly
    4 * numel bytes, packed back to back from 0 to the end of the file, no other tensors;
  - every tensor's values equal the model file's floats bit for bit (compared as uint32), GPT-2's
    Conv1D matrices (gelu) as the transposes of ours, wte without the padded rows, the omni BN
    running statistics as mean[2n] and var[2n] of each layer;
  - config.json fields equal the model file's header (docs/design.md §5.1); for swiglu and omni
    the two modeling files are present, for gelu none (a standard GPT-2).
    python3 scripts/check_export_hf.py model.bin export_dir      exit 0 and "OK ...", else 1
"""
import json
import os
import struct
import sys
from array import array

FIELDS = ["max_seq_len", "vocab_size", "padded_vocab_size", "num_layers", "num_heads", "channels",
          "ffn_kind", "ffn_hidden", "router_n", "num_experts", "top_k", "router_norm", "gate"]


def fail(msg):
    print(f"check_export_hf: {msg}")
    sys.exit(1)


def read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        fail(f"{path}: cannot read: {e.strerror or e}")


def read_json(path, data):
    try:
        return json.loads(data)
    except ValueError as e:  # not UTF-8 or not JSON
        fail(f"{path}: not JSON: {e}")


def read_model(path):
    """The model file as (header config, {our tensor name: uint32 array}) with its own layout walk."""
    data = read_bytes(path)
    if len(data) < 1024:
        fail(f"{path}: {len(data)} bytes, shorter than the 1024-byte header")
    h = struct.unpack_from("<256i", data)
    c = dict(zip(FIELDS, h[2:15]))
    if c["ffn_kind"] not in (0, 1, 2):
        fail(f"{path}: ffn kind {c['ffn_kind']} in its header; the export holds gelu (0), swiglu (1) or omni (2)")
    L, C, H, T, Vp = c["num_layers"], c["channels"], c["ffn_hidden"], c["max_seq_len"], c["padded_vocab_size"]
    kind, n, N = c["ffn_kind"], c["router_n"], c["num_experts"]
    fc_rows = H if kind == 0 else 2 * H
    sizes = [("wte", Vp * C), ("wpe", T * C), ("ln1w", L * C), ("ln1b", L * C), ("qkvw", L * 3 * C * C),
             ("qkvb", L * 3 * C), ("attprojw", L * C * C), ("attprojb", L * C), ("ln2w", L * C), ("ln2b", L * C),
             ("fcw", L * fc_rows * C), ("fcb", L * H if kind == 0 else 0), ("fcprojw", L * C * H),
             ("fcprojb", L * C if kind == 0 else 0), ("routerw", L * 2 * n * C if kind == 2 else 0),
             ("expert_u", L * N * C if kind == 2 else 0), ("expert_v", L * N * C if kind == 2 else 0),
             ("lnfw", C), ("lnfb", C), ("bn", L * 4 * n if kind == 2 else 0)]
    off, t = 1024, {}
    for name, count in sizes:
        t[name] = array("I", data[off:off + 4 * count])
        off += 4 * count
    if off + (16 if h[1] == 2 else 0) != len(data):
        fail(f"{path}: {len(data)} bytes, the layout walk ends at {off} (+ trailer)")
    return c, t


def expected_tensors(c, t):
    """{HF name: (shape, uint32 array)} that the export must hold."""
    L, C, H, V, T = c["num_layers"], c["channels"], c["ffn_hidden"], c["vocab_size"], c["max_seq_len"]
    kind, n, N = c["ffn_kind"], c["router_n"], c["num_experts"]

    def part(name, l, count):
        return t[name][l * count:(l + 1) * count]

    def conv1d(name, l, rows, cols):  # our (rows = out, cols = in) -> GPT-2's (in, out)
        m = part(name, l, rows * cols)
        out = array("I")
        for i in range(cols):
            out.extend(m[i::cols])
        return (cols, rows), out

    e = {"transformer.wte.weight": ((V, C), t["wte"][:V * C]), "transformer.wpe.weight": ((T, C), t["wpe"]),
         "transformer.ln_f.weight": ((C,), t["lnfw"]), "transformer.ln_f.bias": ((C,), t["lnfb"])}
    for l in range(L):
        p = f"transformer.h.{l}."
        for hf, ours in [("ln_1.weight", "ln1w"), ("ln_1.bias", "ln1b"), ("ln_2.weight", "ln2w"), ("ln_2.bias", "ln2b"),
                         ("attn.c_proj.bias", "attprojb")]:
            e[p + hf] = ((C,), part(ours, l, C))
        e[p + "attn.c_attn.bias"] = ((3 * C,), part("qkvb", l, 3 * C))
        if kind == 0:
            e[p + "attn.c_attn.weight"] = conv1d("qkvw", l, 3 * C, C)
            e[p + "attn.c_proj.weight"] = conv1d("attprojw", l, C, C)
            e[p + "mlp.c_fc.weight"] = conv1d("fcw", l, H, C)
            e[p + "mlp.c_fc.bias"] = ((H,), part("fcb", l, H))
            e[p + "mlp.c_proj.weight"] = conv1d("fcprojw", l, C, H)
            e[p + "mlp.c_proj.bias"] = ((C,), part("fcprojb", l, C))
        else:
            e[p + "attn.c_attn.weight"] = ((3 * C, C), part("qkvw", l, 3 * C * C))
            e[p + "attn.c_proj.weight"] = ((C, C), part("attprojw", l, C * C))
            e[p + "mlp.c_fc.weight"] = ((2 * H, C), part("fcw", l, 2 * H * C))
            e[p + "mlp.c_proj.weight"] = ((C, H), part("fcprojw", l, C * H))
        if kind == 2:
            e[p + "mlp.router.weight"] = ((2 * n, C), part("routerw", l, 2 * n * C))
            e[p + "mlp.expert_u"] = ((N, C), part("expert_u", l, N * C))
            e[p + "mlp.expert_v"] = ((N, C), part("expert_v", l, N * C))
            e[p + "mlp.bn_running_mean"] = ((2 * n,), part("bn", l, 4 * n)[:2 * n])
            e[p + "mlp.bn_running_var"] = ((2 * n,), part("bn", l, 4 * n)[2 * n:])
    return e


def check_safetensors(path, expected):
    data = read_bytes(path)
    if len(data) < 8:
        fail(f"{path}: {len(data)} bytes, shorter than the 8-byte header length")
    (hlen,) = struct.unpack_from("<Q", data)
    if 8 + hlen > len(data) or (8 + hlen) % 8:
        fail(f"{path}: header length {hlen} does not fit the {len(data)}-byte file or is not 8-aligned")
    header = read_json(path, data[8:8 + hlen])
    if not isinstance(header, dict):
        fail(f"{path}: the JSON header is not an object")
    header.pop("__metadata__", None)
    if set(header) != set(expected):
        fail(f"{path}: tensors differ: missing {sorted(set(expected) - set(header))[:5]}, "
             f"extra {sorted(set(header) - set(expected))[:5]}")
    body, end = data[8 + hlen:], 0
    for name, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
                and all(isinstance(x, int) for x in info["data_offsets"]) and isinstance(info.get("shape"), list)):
            fail(f"{path}: {name}: expected dtype, shape and data_offsets [begin, end], found {info!r}"[:300])
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        shape, values = expected[name]
        b, e = info["data_offsets"]
        if info.get("dtype") != "F32" or tuple(info["shape"]) != shape:
            fail(f"{path}: {name} is {info['dtype']} {info['shape']}, expected F32 {list(shape)}")
        if b != end or e - b != 4 * len(values):
            fail(f"{path}: {name} occupies [{b}, {e}), expected [{end}, {end + 4 * len(values)})")
        if array("I", body[b:e]) != values:
            fail(f"{path}: {name} differs from the model file's floats")
        end = e
    if end != len(body):
        fail(f"{path}: {len(body) - end} bytes after the last tensor")
    return len(header)


def check_config(path, c, export_dir):
    j = read_json(path, read_bytes(path))
    if not isinstance(j, dict):
        fail(f"{path}: not a JSON object")
    want = {"vocab_size": c["vocab_size"], "n_positions": c["max_seq_len"], "n_embd": c["channels"],
            "n_layer": c["num_layers"], "n_head": c["num_heads"], "tie_word_embeddings": True}
    if c["ffn_kind"] == 0:
        want.update(model_type="gpt2", n_inner=c["ffn_hidden"], activation_function="gelu_new")
    else:
        want.update(model_type="omnimoe", padded_vocab_size=c["padded_vocab_size"], ffn_hidden=c["ffn_hidden"],
                    ffn_kind=["gelu", "swiglu", "omni"][c["ffn_kind"]])
    if c["ffn_kind"] == 2:
        want.update(router_n=c["router_n"], num_experts=c["num_experts"], num_experts_per_tok=c["top_k"],
                    router_norm=["none", "bn"][c["router_norm"]], gate=["softmax", "prob"][c["gate"]])
    for k, v in want.items():
        if j.get(k) != v:
            fail(f"{path}: {k} = {j.get(k)!r}, the model header says {v!r}")
    modeling = [f for f in ("configuration_omnimoe.py", "modeling_omnimoe.py")
                if os.path.isfile(os.path.join(export_dir, f))]
    if len(modeling) != (0 if c["ffn_kind"] == 0 else 2):
        fail(f"{export_dir}: modeling files {modeling} for ffn kind {c['ffn_kind']}")


def main():
    if len(sys.argv) != 3:
        fail("usage: python3 scripts/check_export_hf.py model.bin export_dir")
    c, t = read_model(sys.argv[1])
    count = check_safetensors(os.path.join(sys.argv[2], "model.safetensors"), expected_tensors(c, t))
    check_config(os.path.join(sys.argv[2], "config.json"), c, sys.argv[2])
    print(f"OK {count} tensors bit-identical, config.json matches the header")


if __name__ == "__main__":
    main()
