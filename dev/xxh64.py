"""
xxh64.py - XXH64 (seed 0 by default) for the Python tools that check the trailer of omnimoe model
files and checkpoints (docs/design.md §5): a uint64 XXH64 of every byte before it.

    h = xxh64.new(); h.update(b"..."); h.intdigest()

new() returns the python xxhash module's hasher when it is installed (C speed) and else the
pure-Python XXH64 below (a few MB/s: fine for test-sized files, slow for big ones). Both give the
same integers; `python3 dev/xxh64.py` checks the pure one against the published test vectors.

The algorithm (xxHash's public description): four 64-bit lanes eat the input in 32-byte stripes
(8 bytes per lane, round = acc += lane * P2; acc = rotl(acc, 31) * P1), the lanes are folded into
one value with merge rounds, the length is added, the remaining 8-byte, 4-byte and 1-byte pieces
are mixed in, and an avalanche spreads every input bit over the result. Inputs shorter than one
stripe skip the lanes (h = seed + P5). All arithmetic is modulo 2^64, little-endian reads.
"""

import struct
import sys

P1 = 0x9E3779B185EBCA87
P2 = 0xC2B2AE3D27D4EB4F
P3 = 0x165667B19E3779F9
P4 = 0x85EBCA77C2B2AE63
P5 = 0x27D4EB2F165667C5
M64 = (1 << 64) - 1
STRIPE = 32


def rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M64


def lane_round(acc, lane):
    return rotl((acc + lane * P2) & M64, 31) * P1 & M64


class PureXXH64:
    """Streaming XXH64 in plain Python: update() any number of times, then intdigest()."""

    def __init__(self, seed=0):
        self.seed = seed & M64
        self.v = [(self.seed + P1 + P2) & M64, (self.seed + P2) & M64, self.seed, (self.seed - P1) & M64]
        self.total = 0
        self.buf = b""  # fewer than 32 bytes not yet consumed by a stripe

    def _stripes(self, data):
        """Consumes len(data) (a multiple of 32) bytes; the lane round is inlined for speed."""
        v1, v2, v3, v4 = self.v
        for a, b, c, d in struct.iter_unpack("<4Q", data):
            v1 = (v1 + a * P2) & M64
            v1 = ((v1 << 31 | v1 >> 33) & M64) * P1 & M64
            v2 = (v2 + b * P2) & M64
            v2 = ((v2 << 31 | v2 >> 33) & M64) * P1 & M64
            v3 = (v3 + c * P2) & M64
            v3 = ((v3 << 31 | v3 >> 33) & M64) * P1 & M64
            v4 = (v4 + d * P2) & M64
            v4 = ((v4 << 31 | v4 >> 33) & M64) * P1 & M64
        self.v = [v1, v2, v3, v4]

    def update(self, data):
        data = memoryview(data).cast("B")
        self.total += len(data)
        start = 0
        if self.buf:  # complete the pending stripe first
            start = min(STRIPE - len(self.buf), len(data))
            self.buf += bytes(data[:start])
            if len(self.buf) < STRIPE:
                return
            self._stripes(self.buf)
            self.buf = b""
        end = start + (len(data) - start) // STRIPE * STRIPE
        if end > start:
            self._stripes(data[start:end])
        self.buf = bytes(data[end:])

    def intdigest(self):
        if self.total >= STRIPE:
            v1, v2, v3, v4 = self.v
            h = (rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18)) & M64
            for v in self.v:  # merge rounds
                h = ((h ^ lane_round(0, v)) * P1 + P4) & M64
        else:
            h = (self.seed + P5) & M64
        h = (h + self.total) & M64
        tail, i = self.buf, 0
        while i + 8 <= len(tail):
            h ^= lane_round(0, struct.unpack_from("<Q", tail, i)[0])
            h = (rotl(h, 27) * P1 + P4) & M64
            i += 8
        if i + 4 <= len(tail):
            h ^= struct.unpack_from("<I", tail, i)[0] * P1 & M64
            h = (rotl(h, 23) * P2 + P3) & M64
            i += 4
        while i < len(tail):
            h ^= tail[i] * P5 & M64
            h = rotl(h, 11) * P1 & M64
            i += 1
        h ^= h >> 33  # avalanche
        h = h * P2 & M64
        h ^= h >> 29
        h = h * P3 & M64
        h ^= h >> 32
        return h


def new(seed=0):
    """The python xxhash module's XXH64 when installed (faster), else PureXXH64."""
    try:
        import xxhash
        return xxhash.xxh64(seed=seed)
    except ImportError:
        return PureXXH64(seed)


def pure_digest(data, seed=0):
    h = PureXXH64(seed)
    h.update(data)
    return h.intdigest()


if __name__ == "__main__":
    # the published vectors of XXH64, then one input hashed whole and in uneven pieces
    vectors = [(b"", 0xEF46DB3751D8E999), (b"abc", 0x44BC2CF5AD770999)]
    bad = [(d, hex(pure_digest(d)), hex(want)) for d, want in vectors if pure_digest(d) != want]
    data = bytes((i * 131 + 7) % 251 for i in range(1000))
    pieces = PureXXH64()
    for a, b in [(0, 3), (3, 3), (3, 40), (40, 71), (71, 72), (72, 1000)]:
        pieces.update(data[a:b])
    if pieces.intdigest() != pure_digest(data):
        bad.append(("1000 bytes in pieces", hex(pieces.intdigest()), hex(pure_digest(data))))
    for d, got, want in bad:
        print(f"FAIL XXH64({d!r}) = {got}, expected {want}")
    if not bad:
        print(f"OK XXH64 pure-Python: {len(vectors)} published vectors, streaming == one-shot")
    sys.exit(1 if bad else 0)
