#!/usr/bin/env python3
"""
Write a multiple-choice eval file in llm.c's HellaSwag format (docs/design.md §5.7), which
llmc/mc_eval.h reads, from one of two sources:

  # offline: any JSONL, one example per line: {"context" or "ctx": str, "endings": [4 str], "label": int}
  python dev/data/hellaswag.py jsonl dev/data/mc_examples.jsonl -o data/mc_examples_val.bin

  # online: the public HellaSwag split (10,042 validation examples), downloaded to
  # data_local/hellaswag/ first. UNTESTED in this repo: the machines it was written on have no network.
  python dev/data/hellaswag.py download --split val -o data_local/hellaswag/hellaswag_val.bin

Tokens are GPT-2 BPE (tiktoken "gpt2"), the context encoded as it is and each ending as " " +
ending (as llm.c does, so the completion starts with a space token). The file: a header of 256
int32 {20240522, 1, number of examples, longest example in bytes, 0...}, then per example the
uint16 values 65535, its size in bytes, its index, the label, the number of completions (4),
the context length and tokens, then per completion its length and tokens.

Offline: tiktoken reads the BPE files from --tiktoken-dir, else ../shared/data/tiktoken next to
the repo, else $TIKTOKEN_CACHE_DIR (prepro.py's rule). Needs `pip install numpy tiktoken`.
The output is deterministic: the same input gives byte-identical files.
"""
import argparse
import json
import os
import sys
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from prepro import REPO_ROOT, die, get_encoding  # noqa: E402  (the tokenizer setup shared with prepro.py)

EVAL_MAGIC = 20240522
EVAL_VERSION = 1
HEADER_INTS = 256
DELIMITER = 2**16 - 1
NUM_COMPLETIONS = 4
MAX_EXAMPLES = 2**16 - 1  # the example index is a uint16
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"


def read_jsonl(path):
    """The examples of a JSONL file as (context, endings, label), each checked."""
    examples = []
    if not os.path.isfile(path):  # (a FIFO would block the open)
        die(f"{path}: {'is not a regular file' if os.path.exists(path) else 'no such file'}, expected a JSONL file")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        die(f"{path}: cannot read: {e.strerror or e}")
    except UnicodeDecodeError as e:
        die(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path} line {line_no}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            die(f"{where}: not JSON: {e}")
        if not isinstance(item, dict):
            die(f"{where}: expected a JSON object {{\"context\": ..., \"endings\": [...], \"label\": ...}}, "
                f"got {type(item).__name__}")
        context = item.get("context", item.get("ctx"))
        endings, label = item.get("endings"), item.get("label")
        if not isinstance(context, str) or not context:
            die(f"{where}: expected a non-empty string 'context' (or 'ctx')")
        if not isinstance(endings, list) or len(endings) != NUM_COMPLETIONS or \
                not all(isinstance(e, str) and e for e in endings):
            die(f"{where}: expected 'endings', a list of {NUM_COMPLETIONS} non-empty strings")
        if isinstance(label, str) and label.isascii() and label.isdigit():  # HellaSwag's files store it as a string in places
            label = int(label)
        # (a JSON true/false is a Python bool, an int subclass: not a label)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < NUM_COMPLETIONS:
            die(f"{where}: expected 'label', an integer 0 to {NUM_COMPLETIONS - 1}")
        examples.append((context, endings, label))
    if not examples:
        die(f"{path}: no examples")
    return examples


def example_stream(index, context_tokens, ending_tokens, label):
    """The uint16 values of one example, its size in bytes filled in."""
    stream = [DELIMITER, 0, index, label, len(ending_tokens), len(context_tokens)] + context_tokens
    for tokens in ending_tokens:
        stream += [len(tokens)] + tokens
    stream[1] = 2 * len(stream)
    return stream


def write_eval_file(path, enc, examples, max_len=None):
    """Tokenize and write; max_len (optional) refuses any context + ending longer than that."""
    if len(examples) > MAX_EXAMPLES:
        die(f"{len(examples)} examples, at most {MAX_EXAMPLES} fit the format")
    streams = []
    for i, (context, endings, label) in enumerate(examples):
        context_tokens = enc.encode_ordinary(context)
        ending_tokens = [enc.encode_ordinary(" " + e) for e in endings]
        stream = example_stream(i, context_tokens, ending_tokens, label)
        if stream[1] >= 2**16:
            die(f"example {i} is {stream[1]} bytes, the format stores at most 65535")
        longest_total = len(context_tokens) + max(len(t) for t in ending_tokens)
        if max_len is not None and longest_total > max_len:
            die(f"example {i}: context + ending is {longest_total} tokens, more than --max-len {max_len}")
        streams.append(stream)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = EVAL_MAGIC, EVAL_VERSION, len(streams)
    header[3] = max(s[1] for s in streams)
    body = np.array([v for s in streams for v in s], dtype="<u2")
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(body.tobytes())
        os.replace(tmp, path)
    except OSError as e:  # an unwritable folder, a full disk: no half-written file is left
        try:
            os.remove(tmp)
        except OSError:
            pass
        die(f"-o {path}: cannot write the eval file: {e.strerror or e}")
    print(f"wrote {len(streams)} examples to {path} ({HEADER_INTS * 4 + body.nbytes:,} bytes, "
          f"longest example {header[3]} bytes)")
    first = streams[0]
    n_ctx = first[5]
    print(f"example 0: label {first[3]}, context tokens {first[6:6 + n_ctx]}")
    p = 6 + n_ctx
    for c in range(NUM_COMPLETIONS):
        n = first[p]
        print(f"example 0: completion {c} tokens {first[p + 1:p + 1 + n]}")
        p += 1 + n


def check_output(path):
    """-o may be new or an eval file (replaced): never a directory or another file, such as the input."""
    if os.path.isdir(path):
        die(f"-o {path}: is a directory, expected the path of the eval file to write")
    if not os.path.lexists(path):
        return
    magic = None
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                head = f.read(4)
            magic = int.from_bytes(head, "little") if len(head) == 4 else None
        except OSError as e:
            die(f"-o {path}: cannot read what is there: {e.strerror or e}")
    if magic != EVAL_MAGIC:
        die(f"-o {path}: exists and is not an eval file, which would be overwritten: remove it or choose another -o")


def download(split, cache_dir):
    """The HellaSwag split's JSONL in cache_dir (downloaded once). Untested here: no network."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"hellaswag_{split}.jsonl")
    if not os.path.exists(path):
        url = HELLASWAG_URL.format(split=split)
        print(f"downloading {url} to {path}")
        try:
            urllib.request.urlretrieve(url, path + ".tmp")
        except OSError as e:
            die(f"download of {url} failed: {e}")
        os.replace(path + ".tmp", path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=["jsonl", "download"])
    parser.add_argument("jsonl", nargs="?", help="the input JSONL (source jsonl)")
    parser.add_argument("--split", default="val", choices=["train", "val"], help="HellaSwag split (download)")
    parser.add_argument("-o", "--out", required=True, help="the eval file to write")
    parser.add_argument("--max-len", type=int, default=None, help="refuse examples longer than this (the model's T)")
    parser.add_argument("--tiktoken-dir", default=None, help="folder of the GPT-2 BPE files (offline)")
    args = parser.parse_args()
    check_output(args.out)
    if args.source == "jsonl":
        if args.jsonl is None:
            die("source jsonl needs the input file: hellaswag.py jsonl FILE.jsonl -o OUT.bin")
        path = args.jsonl
    else:
        path = download(args.split, os.path.join(REPO_ROOT, "data_local", "hellaswag"))
    examples = read_jsonl(path)
    enc = get_encoding(args.tiktoken_dir)
    write_eval_file(args.out, enc, examples, args.max_len)


if __name__ == "__main__":
    main()
