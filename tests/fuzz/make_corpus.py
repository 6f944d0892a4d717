#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (tests/fuzz/corpus/<target>/).

    python3 tests/fuzz/make_corpus.py            # rewrites the corpus in place

The seeds are deterministic (fixed random seeds), so rerunning changes nothing unless this file or
proto/da/v1/attention.proto changed. fuzz_request_validation inputs are one selector byte
(0 AttendRequest, 1 StreamHeader, 2 WarmUpRequest) then the message's protobuf encoding; they cover
accepted problems of every dtype and mode and each kind of refusal, so that mutation starts next to
both sides of every check. fuzz_stream_assembly inputs are FuzzedDataProvider bytes: random ones
of a few lengths, which already decode into complete streams.
"""
import argparse
import importlib
import pathlib
import shutil
import sys
import tempfile

import numpy as np
from grpc_tools import protoc

REPO = pathlib.Path(__file__).resolve().parents[2]
ATTEND, HEADER, WARMUP, WIRE = 0, 1, 2, 3


def load_protos(out_dir):
    proto_dir = REPO / "proto"
    args = ["protoc", f"-I{proto_dir}", f"--python_out={out_dir}", "da/v1/attention.proto"]
    if protoc.main(args) != 0:
        sys.exit("make_corpus: protoc failed")
    sys.path.insert(0, str(out_dir))
    return importlib.import_module("da.v1.attention_pb2")


def tensor_bytes(rng, shape, dtype):
    values = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
    if dtype == "fp32":
        return values.tobytes()
    if dtype == "fp16":
        return values.astype(np.float16).tobytes()
    return (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # bf16, truncated.


def spec(pb, patterns, causal=False, mode=None, scale=None, precision=None):
    s = pb.AttentionSpec(causal=causal)
    for segment_len, dilation in patterns:
        s.segment_lengths.append(segment_len)
        s.dilation_rates.append(dilation)
    if mode is not None:
        s.combine_mode = mode
    if scale is not None:
        s.softmax_scale = scale
    if precision is not None:
        s.precision = precision
    return s


def attend(pb, rng, shape, kv_heads, dtype, attention_spec, data_shapes=None):
    dtypes = {"fp32": pb.DTYPE_FP32, "fp16": pb.DTYPE_FP16, "bf16": pb.DTYPE_BF16}
    b, n, h, d = shape
    shapes = data_shapes or [shape, (b, n, kv_heads, d), (b, n, kv_heads, d)]
    tensors = [
        pb.Tensor(dtype=dtypes[dtype], shape=list(s), data=tensor_bytes(rng, s, dtype))
        for s in shapes
    ]
    return pb.AttendRequest(request_id="seed", spec=attention_spec, query=tensors[0],
                            key=tensors[1], value=tensors[2])


def header(pb, shape, kv_heads, attention_spec, dtype=None):
    b, n, h, d = shape
    return pb.StreamHeader(request_id="seed", spec=attention_spec,
                           dtype=pb.DTYPE_FP32 if dtype is None else dtype, batch=b, seq_len=n,
                           heads=h, kv_heads=kv_heads, head_dim=d)


def request_validation_seeds(pb):
    rng = np.random.default_rng(5)
    base = spec(pb, [(8, 1), (16, 2)])
    seeds = {
        "attend_fp32_two_patterns": attend(pb, rng, (1, 16, 2, 4), 2, "fp32", base),
        "attend_bf16_gqa_causal_grouped": attend(
            pb, rng, (1, 12, 4, 8), 2, "bf16",
            spec(pb, [(4, 1), (12, 3)], causal=True, mode=pb.COMBINE_MODE_GROUPED)),
        "attend_fp16_batch2_scale": attend(pb, rng, (2, 10, 2, 4), 1, "fp16",
                                           spec(pb, [(6, 2)], scale=0.3)),
        "attend_fp32_precision_fp32_odd_len": attend(
            pb, rng, (1, 13, 3, 5), 3, "fp32",
            spec(pb, [(5, 1), (13, 4)], precision=pb.PRECISION_FP32)),
        "attend_bad_dilation": attend(pb, rng, (1, 8, 2, 4), 2, "fp32", spec(pb, [(4, 5)])),
        "attend_bad_rank": attend(pb, rng, (1, 8, 2, 4), 2, "fp32", base,
                                  data_shapes=[(8, 2, 4), (1, 8, 2, 4), (1, 8, 2, 4)]),
        "attend_bad_kv_heads": attend(pb, rng, (1, 8, 3, 4), 2, "fp32", base),
        "attend_bad_mode": attend(pb, rng, (1, 8, 2, 4), 2, "fp32",
                                  spec(pb, [(8, 1)], mode=9)),
    }
    mismatched = attend(pb, rng, (1, 8, 2, 4), 2, "fp32", base)
    mismatched.key.dtype = pb.DTYPE_FP16
    seeds["attend_dtype_mismatch"] = mismatched
    short = attend(pb, rng, (1, 8, 2, 4), 2, "fp32", base)
    short.value.data = short.value.data[:-4]
    seeds["attend_short_value"] = short
    huge = attend(pb, rng, (1, 2, 1, 1), 1, "fp32", base)
    for t in (huge.query, huge.key, huge.value):
        t.shape[:] = [1 << 40, 1 << 40, 1, 1]
    seeds["attend_huge_shape"] = huge
    lists = attend(pb, rng, (1, 8, 2, 4), 2, "fp32", base)
    lists.spec.dilation_rates.append(1)
    seeds["attend_unequal_pattern_lists"] = lists

    headers = {
        "header_fp32": header(pb, (1, 64, 4, 8), 2, base),
        "header_bf16_causal": header(pb, (2, 24, 2, 16), 0, spec(pb, [(8, 2)], causal=True),
                                     pb.DTYPE_BF16),
        "header_kv_heads_not_dividing": header(pb, (1, 64, 4, 8), 3, base),
        "header_head_dim_too_large": header(pb, (1, 64, 4, 4096), 4, base),
        "header_huge_seq_len": header(pb, (1 << 20, 1 << 40, 8, 64), 8, base),
        "header_no_dtype": header(pb, (1, 64, 4, 8), 2, base, pb.DTYPE_UNSPECIFIED),
        "header_no_patterns": header(pb, (1, 64, 4, 8), 2, pb.AttentionSpec()),
    }
    warmups = {
        "warmup_two_shapes": pb.WarmUpRequest(shapes=[
            header(pb, (1, 32, 2, 8), 2, base),
            header(pb, (1, 16, 4, 4), 1, spec(pb, [(16, 4)]), pb.DTYPE_FP16)]),
        "warmup_second_invalid": pb.WarmUpRequest(shapes=[
            header(pb, (1, 32, 2, 8), 2, base),
            header(pb, (1, -5, 2, 8), 2, base)]),
    }
    # Stream messages as the server receives them: 8 cut points, then an AttendStreamRequest.
    block = pb.TokenBlock(token_start=96, token_count=4,
                          query=rng.bytes(4 * 16), key=rng.bytes(4 * 8), value=rng.bytes(4 * 8))
    wires = {
        "wire_block": pb.AttendStreamRequest(block=block).SerializeToString(),
        "wire_header": pb.AttendStreamRequest(
            header=header(pb, (1, 64, 4, 8), 2, base)).SerializeToString(),
        "wire_two_blocks": (pb.AttendStreamRequest(block=block).SerializeToString() * 2),
        "wire_unknown_field": b"\x78\x05" + pb.AttendStreamRequest(block=block).SerializeToString(),
    }
    out = {}
    for kind, group in ((ATTEND, seeds), (HEADER, headers), (WARMUP, warmups)):
        for name, message in group.items():
            out[name] = bytes([kind]) + message.SerializeToString()
    for name, data in wires.items():
        out[name] = bytes([WIRE]) + bytes([3, 17, 0, 40, 9, 200, 1, 64]) + data
    return out


def stream_assembly_seeds():
    rng = np.random.default_rng(55)
    return {f"random_{i:02d}_{size}": rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            for i, size in enumerate([16, 48, 96, 160, 256, 384, 512, 768, 1024, 1536, 2048])}


def write(directory, seeds):
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for name, data in sorted(seeds.items()):
        (directory / name).write_bytes(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "tests" / "fuzz" / "corpus")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as gen:
        pb = load_protos(gen)
        write(args.out / "fuzz_request_validation", request_validation_seeds(pb))
    write(args.out / "fuzz_stream_assembly", stream_assembly_seeds())
    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"make_corpus: wrote {args.out} ({total} bytes)")


if __name__ == "__main__":
    main()
