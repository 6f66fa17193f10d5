#!/usr/bin/env python3
"""Writes a margin-softmax input file in the safetensors format with nothing but the
Python standard library, as an outside engine would: features (B×D f32), weights (C×D
f32), labels (B i64, -1 = ignore) and a scalar scale (f32).

usage: python3 examples/make_tensors.py OUT.safetensors [B D C SEED]
"""
import json
import random
import struct
import sys


def tensor(dtype, shape, fmt, values):
    return dtype, shape, struct.pack("<%d%s" % (len(values), fmt), *values)


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def main():
    path = sys.argv[1]
    b, d, c, seed = (int(v) for v in (sys.argv[2:6] if len(sys.argv) >= 6 else (48, 32, 200, 7)))
    rng = random.Random(seed)
    labels = [rng.randrange(c) for _ in range(b)]
    labels[0] = -1  # an ignored row
    write_safetensors(path, {
        "features": tensor("F32", [b, d], "f", [rng.gauss(0, 1) for _ in range(b * d)]),
        "weights": tensor("F32", [c, d], "f", [rng.gauss(0, 1) for _ in range(c * d)]),
        "labels": tensor("I64", [b], "q", labels),
        "scale": tensor("F32", [], "f", [24.0]),
    })


if __name__ == "__main__":
    main()
