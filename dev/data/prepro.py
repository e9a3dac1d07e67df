#!/usr/bin/env python3
"""
Tokenize text into llm.c-format token shards with the GPT-2 BPE (tiktoken "gpt2"), and write
the GPT-2 tokenizer file the C code uses to print samples. See dev/data/README.md.

Shard: 256 int32 header {20240520, 1, token count, 0...} then uint16 tokens. Every document is
preceded by end-of-text (50256). Offline by default: tiktoken reads the BPE files from
--tiktoken-dir (default ../shared/data/tiktoken next to the repo), else $TIKTOKEN_CACHE_DIR.

  python dev/data/prepro.py tinyshakespeare
  python dev/data/prepro.py files --name mixed --out-dir data_local/mixed \\
      ../shared/data/tinyshakespeare/input.txt ../shared/data/corpus/*.txt
  python dev/data/prepro.py fineweb-edu --hf-name sample-10BT     (online; needs `datasets`)
  python dev/data/prepro.py tinystories                           (online; needs `datasets`)
"""
import argparse
import os
import random
import sys

import numpy as np

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEFAULT_TIKTOKEN_DIR = os.path.join(REPO_ROOT, "..", "shared", "data", "tiktoken")
DEFAULT_SHAKESPEARE = os.path.join(REPO_ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
TOKENIZER_MAGIC = 20240328
TOKENIZER_VERSION = 2
HEADER_INTS = 256
MAX_SHARD_TOKENS = 2**31 - 1  # the header stores the count as int32
EOT = 50256
TINYSHAKESPEARE_VAL_TOKENS = 32768  # llm.c's split: the first 32,768 tokens are validation


def die(message):
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(1)


# -----------------------------------------------------------------------------
# tokenizer

def get_encoding(tiktoken_dir):
    """The tiktoken gpt2 encoding, loaded offline when the BPE files are available locally."""
    if tiktoken_dir is not None:
        if not os.path.isdir(tiktoken_dir):
            die(f"--tiktoken-dir '{tiktoken_dir}' is not a directory")
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(tiktoken_dir)
    elif os.path.isdir(DEFAULT_TIKTOKEN_DIR):
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(DEFAULT_TIKTOKEN_DIR)
    # otherwise: $TIKTOKEN_CACHE_DIR if set, else tiktoken's own cache/download
    try:
        import tiktoken
    except ImportError:
        die("the tiktoken package is missing: pip install numpy tiktoken")
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no cached files
        die(f"could not load the GPT-2 BPE (TIKTOKEN_CACHE_DIR={os.environ.get('TIKTOKEN_CACHE_DIR')}): {e}\n"
            "  offline: --tiktoken-dir DIR, a folder with tiktoken's cached gpt2 files (dev/data/README.md)")
    assert enc.eot_token == EOT and enc.n_vocab == EOT + 1, "unexpected gpt2 encoding"
    assert enc.encode_ordinary("hello world") == [31373, 995], "gpt2 encoding gives unexpected tokens"
    return enc


def write_tokenizer_file(enc, path):
    """header 256 int32 {magic, version 2, vocab size, eot}; then per token: uint8 length, bytes."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0] = TOKENIZER_MAGIC
    header[1] = TOKENIZER_VERSION
    header[2] = enc.n_vocab
    header[3] = enc.eot_token
    pieces = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]
    for i, piece in enumerate(pieces):
        assert 1 <= len(piece) <= 255, f"token {i} is {len(piece)} bytes; the format stores lengths as uint8"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        for piece in pieces:
            f.write(bytes([len(piece)]))
            f.write(piece)
    os.replace(tmp, path)
    print(f"wrote {path} ({enc.n_vocab} tokens, eot {enc.eot_token})")


# -----------------------------------------------------------------------------
# shards

def write_shard(path, tokens):
    tokens = np.asarray(tokens)
    assert 0 < len(tokens) <= MAX_SHARD_TOKENS, f"shard {path}: {len(tokens)} tokens"
    assert tokens.min() >= 0 and tokens.max() < 2**16, f"shard {path}: token out of uint16 range"
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0] = SHARD_MAGIC
    header[1] = SHARD_VERSION
    header[2] = len(tokens)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"  # a crash never leaves a half-written shard under the real name
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    # read it back: header and every token as intended
    check_header = np.fromfile(tmp, dtype=np.int32, count=HEADER_INTS)
    check_tokens = np.fromfile(tmp, dtype=np.uint16, offset=HEADER_INTS * 4)
    assert np.array_equal(check_header, header) and np.array_equal(check_tokens, tokens), f"{tmp}: read-back differs"
    os.replace(tmp, path)
    print(f"wrote {path} ({len(tokens):,} tokens)")


class ShardWriter:
    """Collects documents (lists of tokens, EOT first) into shards.

    The validation shard {name}_val_000000.bin takes whole documents until the next one would
    exceed val_tokens (at least one document). Training shards {name}_train_NNNNNN.bin (numbered
    from 000001) are filled to exactly shard_size tokens; a document may continue in the next
    shard, as in llm.c's fineweb.py; the last shard holds the remainder.
    """

    def __init__(self, out_dir, name, shard_size, val_tokens):
        if not (1 <= shard_size <= MAX_SHARD_TOKENS):
            die(f"--shard-size {shard_size}: expected 1 .. {MAX_SHARD_TOKENS} (int32 header)")
        if not (1 <= val_tokens <= MAX_SHARD_TOKENS):
            die(f"validation size {val_tokens}: expected 1 .. {MAX_SHARD_TOKENS} tokens")
        self.out_dir, self.name = out_dir, name
        self.shard_size, self.val_tokens = shard_size, val_tokens
        self.in_val = True
        self.val_docs = []
        self.val_count = 0
        self.buffer = np.empty(shard_size, dtype=np.uint16)
        self.fill = 0
        self.shard_index = 1
        self.train_tokens = 0
        self.paths = []

    def _path(self, split, index):
        return os.path.join(self.out_dir, f"{self.name}_{split}_{index:06d}.bin")

    def _finish_val(self):
        path = self._path("val", 0)
        write_shard(path, np.concatenate(self.val_docs))
        self.paths.append(path)
        self.val_docs = []
        self.in_val = False

    def add(self, doc):
        doc = np.asarray(doc, dtype=np.uint16)
        assert len(doc) > 0 and doc[0] == EOT, "every document starts with end-of-text"
        if self.in_val:
            if self.val_count == 0 or self.val_count + len(doc) <= self.val_tokens:
                self.val_docs.append(doc)
                self.val_count += len(doc)
                return
            self._finish_val()
        self.train_tokens += len(doc)
        while len(doc) > 0:
            take = min(len(doc), self.shard_size - self.fill)
            self.buffer[self.fill:self.fill + take] = doc[:take]
            self.fill += take
            doc = doc[take:]
            if self.fill == self.shard_size:
                self._flush_train()

    def end_val(self):
        """Switches to training shards now (for sources with their own validation split)."""
        if self.in_val:
            if self.val_count == 0:
                die("the validation split is empty")
            self._finish_val()

    def _flush_train(self):
        path = self._path("train", self.shard_index)
        write_shard(path, self.buffer[:self.fill])
        self.paths.append(path)
        self.shard_index += 1
        self.fill = 0

    def close(self):
        if self.in_val:
            die(f"all {self.val_count:,} tokens fit in the validation split (val size {self.val_tokens:,}); "
                "nothing is left for training: lower the validation size")
        if self.fill > 0:
            self._flush_train()
        print(f"{self.name}: {self.val_count:,} validation tokens, {self.train_tokens:,} training tokens "
              f"in {self.shard_index - 1} training shard(s) under {self.out_dir}")


# -----------------------------------------------------------------------------
# documents

def split_paragraphs(text):
    """Splits on blank lines ("\\n\\n"), keeping the separator with each piece, so that
    ''.join(pieces) == text."""
    parts = text.split("\n\n")
    return [p + "\n\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def chunk_long(piece, max_chars):
    """Cuts a piece longer than max_chars at line ends where possible, else at max_chars."""
    out = []
    while len(piece) > max_chars:
        cut = piece.rfind("\n", 0, max_chars) + 1
        if cut <= 0:
            cut = max_chars
        out.append(piece[:cut])
        piece = piece[cut:]
    if piece:
        out.append(piece)
    return out


def group_documents(text, max_chars):
    """Consecutive paragraphs grouped into documents of at most max_chars characters."""
    docs, current = [], ""
    for paragraph in split_paragraphs(text):
        for piece in chunk_long(paragraph, max_chars):
            if current and len(current) + len(piece) > max_chars:
                docs.append(current)
                current = ""
            current += piece
    if current:
        docs.append(current)
    assert "".join(docs) == text
    return docs


def tokenize_documents(enc, docs, threads):
    """EOT + ordinary tokens of each document (special-token text like '<|endoftext|>' stays text)."""
    encoded = enc.encode_ordinary_batch(docs, num_threads=threads)
    return [[EOT] + tokens for tokens in encoded]


def read_text(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        hint = " (pass the tinyshakespeare text with --input FILE)" if path == DEFAULT_SHAKESPEARE else ""
        die(f"input file '{path}' not found{hint}")
    except UnicodeDecodeError as e:
        die(f"input file '{path}' is not valid UTF-8: {e}")


# -----------------------------------------------------------------------------
# sources

def prepro_tinyshakespeare(args, enc):
    text = read_text(args.input)
    # documents are the blank-line-separated speeches; val/train split as in llm.c
    docs = split_paragraphs(text)
    tokens = [t for doc in tokenize_documents(enc, docs, args.threads) for t in doc]
    decoded = enc.decode([t for t in tokens if t != EOT])
    assert decoded == text, "tokenization does not round-trip"
    out_dir = args.out_dir or os.path.join(REPO_ROOT, "data", "tinyshakespeare")
    val_tokens = args.val_tokens or TINYSHAKESPEARE_VAL_TOKENS
    if val_tokens >= len(tokens):
        die(f"--val-tokens {val_tokens} leaves no training tokens (text has {len(tokens)})")
    write_shard(os.path.join(out_dir, "tiny_shakespeare_val.bin"), tokens[:val_tokens])
    write_shard(os.path.join(out_dir, "tiny_shakespeare_train.bin"), tokens[val_tokens:])
    print(f"tinyshakespeare: {len(docs):,} documents, {len(tokens):,} tokens "
          f"({val_tokens:,} val, {len(tokens) - val_tokens:,} train)")


def prepro_files(args, enc):
    docs = []
    for path in args.paths:
        text = read_text(path)
        file_docs = group_documents(text, args.doc_chars)
        print(f"{path}: {len(text):,} characters, {len(file_docs):,} documents")
        docs.extend(file_docs)
    if not docs:
        die("the input files hold no text")
    if not args.no_shuffle_docs:
        # shuffle whole documents so the validation split and every training shard mix all sources
        random.Random(args.doc_seed).shuffle(docs)
    tokenized = tokenize_documents(enc, docs, args.threads)
    decoded = enc.decode_batch([d[1:] for d in tokenized], num_threads=args.threads)
    assert decoded == docs, "tokenization does not round-trip"
    total = sum(len(d) for d in tokenized)
    val_tokens = args.val_tokens or max(1, int(total * args.val_fraction))
    out_dir = args.out_dir or os.path.join(REPO_ROOT, "data_local", args.name)
    writer = ShardWriter(out_dir, args.name, args.shard_size, val_tokens)
    for doc in tokenized:
        writer.add(doc)
    writer.close()


def tokenize_one_text(text):
    # runs in a worker process: one encoding per worker
    global _worker_enc
    if "_worker_enc" not in globals():
        import tiktoken
        _worker_enc = tiktoken.get_encoding("gpt2")
    return np.array([EOT] + _worker_enc.encode_ordinary(text), dtype=np.uint16)


def stream_texts(dataset):
    for row in dataset:
        yield row["text"]


def prepro_huggingface(args, enc):
    """fineweb-edu / tinystories through Hugging Face `datasets` (needs the network)."""
    import multiprocessing as mp
    try:
        from datasets import load_dataset
    except ImportError:
        die("the datasets package is missing: pip install datasets")
    out_dir = args.out_dir or os.path.join(REPO_ROOT, "data_local", args.source)
    procs = max(1, args.threads)
    if args.source == "fineweb-edu":
        name = f"edufineweb_{args.hf_name}"
        # streaming: no full local copy of the dataset; the first val_tokens go to validation (llm.c: one shard)
        dataset = load_dataset("HuggingFaceFW/fineweb-edu", name=args.hf_name, split="train", streaming=True)
        val_tokens = args.val_tokens or args.shard_size
        writer = ShardWriter(out_dir, name, args.shard_size, val_tokens)
        with mp.Pool(procs) as pool:
            for doc in pool.imap(tokenize_one_text, stream_texts(dataset), chunksize=16):
                writer.add(doc)
        writer.close()
    else:  # tinystories: the dataset's own validation split becomes the val shard
        name = "tinystories"
        splits = {s: load_dataset("roneneldan/TinyStories", split=s) for s in ("validation", "train")}
        writer = ShardWriter(out_dir, name, args.shard_size, MAX_SHARD_TOKENS)
        with mp.Pool(procs) as pool:
            for doc in pool.imap(tokenize_one_text, stream_texts(splits["validation"]), chunksize=64):
                writer.add(doc)
            writer.end_val()
            for doc in pool.imap(tokenize_one_text, stream_texts(splits["train"]), chunksize=64):
                writer.add(doc)
        writer.close()


# -----------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out-dir", default=None, help="where shards go (default depends on the source)")
    common.add_argument("--shard-size", type=int, default=100_000_000, help="tokens per training shard")
    common.add_argument("--val-tokens", type=int, default=0,
                        help="validation tokens (default: 32768 tinyshakespeare, --val-fraction files, "
                             "--shard-size fineweb-edu)")
    common.add_argument("--tiktoken-dir", default=None,
                        help=f"folder with the GPT-2 BPE files (default {DEFAULT_TIKTOKEN_DIR} if present, "
                             "else $TIKTOKEN_CACHE_DIR)")
    common.add_argument("--tokenizer-out", default=os.path.join(REPO_ROOT, "data", "gpt2_tokenizer.bin"),
                        help="where to write the tokenizer file for C ('' to skip)")
    common.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="tokenizer threads/processes")
    sub = parser.add_subparsers(dest="source", required=True)

    p = sub.add_parser("tinyshakespeare", parents=[common], help="the tinyshakespeare text (offline)")
    p.add_argument("--input", default=DEFAULT_SHAKESPEARE, help="path of input.txt")

    p = sub.add_parser("files", parents=[common], help="local UTF-8 text files (offline)")
    p.add_argument("paths", nargs="+", help="text files")
    p.add_argument("--name", default="corpus", help="shard name prefix (and data_local/ subfolder)")
    p.add_argument("--doc-chars", type=int, default=4000,
                   help="documents: consecutive blank-line paragraphs up to this many characters")
    p.add_argument("--val-fraction", type=float, default=0.05, help="validation share when --val-tokens is 0")
    p.add_argument("--doc-seed", type=int, default=1337, help="seed of the document shuffle")
    p.add_argument("--no-shuffle-docs", action="store_true", help="keep documents in file order")

    p = sub.add_parser("fineweb-edu", parents=[common], help="FineWeb-Edu from Hugging Face (online)")
    p.add_argument("--hf-name", default="sample-10BT", help="dataset config: sample-10BT, sample-100BT, ...")

    sub.add_parser("tinystories", parents=[common], help="TinyStories from Hugging Face (online)")

    args = parser.parse_args()
    if args.source == "files" and args.doc_chars < 1:
        die("--doc-chars must be >= 1")
    if args.source == "files" and not (0.0 < args.val_fraction < 1.0):
        die("--val-fraction must be in (0, 1)")
    if args.val_tokens < 0:
        die("--val-tokens must be >= 0")
    enc = get_encoding(args.tiktoken_dir)
    if args.tokenizer_out:
        write_tokenizer_file(enc, args.tokenizer_out)
    if args.source == "tinyshakespeare":
        prepro_tinyshakespeare(args, enc)
    elif args.source == "files":
        prepro_files(args, enc)
    else:
        prepro_huggingface(args, enc)


if __name__ == "__main__":
    main()
