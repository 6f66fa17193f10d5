#!/usr/bin/env python3
"""Writes a margin-softmax input file in the safetensors format with nothing but the
Python standard library, as an outside engine would: features (B×D), weights (C×D),
labels (B i64, -1 = ignore) and a scalar scale (f32). Features and weights are stored
as DTYPE: f32 (the default), f16 (IEEE half, rounded to nearest even by struct's 'e')
or bf16 (the high 16 bits of the f32, rounded to nearest even).

usage: python3 examples/make_tensors.py OUT.safetensors [B D C SEED] [DTYPE]
       (DTYPE: f32, f16 or bf16; also accepted as --dtype DTYPE)
"""
import json
import random
import struct
import sys

DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}


def tensor(dtype, shape, fmt, values):
    return dtype, shape, struct.pack("<%d%s" % (len(values), fmt), *values)


def bf16_bits(v):
    """The bfloat16 nearest the f32 nearest v, ties to even, as its 16 bits."""
    (u,) = struct.unpack("<I", struct.pack("<f", v))
    if (u & 0x7FFFFFFF) > 0x7F800000:  # NaN stays NaN
        return (u >> 16) | 0x40
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


def float_tensor(dtype, shape, values):
    if dtype == "f16":
        return tensor("F16", shape, "e", values)
    if dtype == "bf16":
        return tensor("BF16", shape, "H", [bf16_bits(v) for v in values])
    return tensor("F32", shape, "f", values)


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


def parse_args(argv):
    """(path, (b, d, c, seed), dtype) from OUT [B D C SEED] [DTYPE | --dtype DTYPE]."""
    args, dtype = list(argv), "f32"
    if "--dtype" in args:
        k = args.index("--dtype")
        if k + 1 >= len(args):
            sys.exit("--dtype needs a value: f32, f16 or bf16")
        dtype = args[k + 1]
        del args[k:k + 2]
    elif len(args) > 1 and args[-1].lower() in DTYPES:
        dtype = args.pop()
    dtype = dtype.lower()
    if dtype not in DTYPES:
        sys.exit("dtype %r: use f32, f16 or bf16" % dtype)
    if not args:
        sys.exit(__doc__)
    dims = (int(v) for v in (args[1:5] if len(args) >= 5 else (48, 32, 200, 7)))
    return args[0], tuple(dims), dtype


def main():
    path, (b, d, c, seed), dtype = parse_args(sys.argv[1:])
    rng = random.Random(seed)
    labels = [rng.randrange(c) for _ in range(b)]
    labels[0] = -1  # an ignored row
    write_safetensors(path, {
        "features": float_tensor(dtype, [b, d], [rng.gauss(0, 1) for _ in range(b * d)]),
        "weights": float_tensor(dtype, [c, d], [rng.gauss(0, 1) for _ in range(c * d)]),
        "labels": tensor("I64", [b], "q", labels),
        "scale": tensor("F32", [], "f", [24.0]),
    })


if __name__ == "__main__":
    main()
