#!/usr/bin/env python3
"""The Python client's GPU-tensor path (issue #18), for scripts/gpu-check on a machine with a
CUDA GPU and torch: CUDA tensors through da.Client.attend and da.torch.DilatedAttention against a
running da-server. The output must come back on the input's GPU in its dtype, equal the float64
reference within the dtype's tolerance, and be written into a GPU `out=` tensor.

    PYTHONPATH=<the da wheel, installed> gpu_tensors_check.py --address 127.0.0.1:PORT
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy_reference as ref  # noqa: E402

import da  # noqa: E402
import da.torch  # noqa: E402
from da.v1 import attention_pb2 as pb  # noqa: E402

# Absolute bounds on outputs of unit-variance inputs (values below 1), by the coarser of the
# dtype and the precision the server computed in.
TOLERANCE = {"fp32": 2e-4, "fp16": 4e-3, "bf16": 3e-2, "fp8": 1.5e-1}
DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--device", default="cuda:0", help="cpu tries this script without a GPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch")
    client = da.Client(args.address, timeout=120)
    generator = torch.Generator(device=device).manual_seed(7)
    failures = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v = (torch.randn(2, 384, 6, 64, device=device, generator=generator).to(dtype)
                   for _ in range(3))
        module = da.torch.DilatedAttention([64, 128, 256], [1, 2, 4], client=client)
        with torch.no_grad():
            out = module(q, k, v, is_causal=True)
        out_into = torch.empty_like(q)
        result = client.attend(q, k, v, segments=[64, 128, 256], dilations=[1, 2, 4],
                               causal=True, mode="grouped", out=out_into, return_info=True)
        got = result.output
        tolerance = max(TOLERANCE[DTYPE_NAME[dtype]], TOLERANCE[result.precision])
        want = ref.dilated_attention(*(t.float().cpu().numpy() for t in (q, k, v)),
                                     [64, 128, 256], [1, 2, 4], causal=True, mode=ref.GROUPED)
        # Both calls against the reference, each on its own: the server may place them on
        # different devices (the CPU and the GPU), so they need not agree bit for bit.
        error = max(float(np.max(np.abs(t.float().cpu().numpy() - want))) for t in (out, got))
        ok = (out.device == q.device and out.dtype == dtype and got is out_into
              and error <= tolerance)
        print(f"{dtype}: output on {out.device} in {out.dtype}, max abs error {error:.2e} "
              f"(tolerance {tolerance}, computed in {result.precision} on {result.devices}), "
              f"out= in place {got is out_into}: "
              f"{'ok' if ok else 'FAILED'}")
        failures += not ok
    # fp8 where the server's GPU offers it (sm_90 and later): bf16 tensors in, per-tensor scales
    # from the data reported for the device that computed.
    offered = {d.id: set(d.precisions) for d in client.info().devices}
    if pb.PRECISION_FP8 in offered.get(str(device), set()):
        q, k, v = (torch.randn(2, 384, 6, 64, device=device, generator=generator)
                   .to(torch.bfloat16) for _ in range(3))
        result = client.attend(q, k, v, segments=[64, 128, 256], dilations=[1, 2, 4],
                               causal=True, mode="grouped", precision="fp8", return_info=True)
        want = ref.dilated_attention(*(t.float().cpu().numpy() for t in (q, k, v)),
                                     [64, 128, 256], [1, 2, 4], causal=True, mode=ref.GROUPED)
        error = float(np.max(np.abs(result.output.float().cpu().numpy() - want)))
        scales = result.fp8_scales
        ok = (result.precision == "fp8" and error <= TOLERANCE["fp8"] and len(scales) == 1
              and scales[0]["device"] == str(device) and min(scales[0]["amax"]) > 0)
        print(f"fp8: max abs error {error:.2e} (tolerance {TOLERANCE['fp8']}), scales {scales}: "
              f"{'ok' if ok else 'FAILED'}")
        failures += not ok
    else:
        print(f"fp8: not offered by {device} ({sorted(offered.get(str(device), set()))}); skipped")
    client.close()
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
