#!/usr/bin/env python3
"""Host <-> GPU copy bandwidth, pageable against pinned host memory, through PyTorch: the ceilings
for the CUDA backend's input and output copies (issue #15: at 1M tokens, D = 128, its 16 GiB of
q, k, v and output took 2.3 s through pageable memory on an H200, against 88 ms of attention).

    copy_bandwidth.py --gib 4 --repeat 3

prints GB/s for each direction and kind of host memory (the best of --repeat copies of random
bytes, timed with CUDA events after a warm-up copy), and with --json writes them to a file.
"""

import argparse
import json

import torch


def _timed_copy(dst, src, repeat):
    """The best seconds of repeat dst.copy_(src), timed with CUDA events."""
    dst.copy_(src)  # Warm-up: first touch, driver staging buffers.
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=4.0, help="bytes per copy, in GiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the figures to this file too")
    args = parser.parse_args()
    n = int(args.gib * (1 << 30))
    device = torch.device("cuda")
    gpu = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    figures = {"device": torch.cuda.get_device_name(device), "bytes": n}
    for kind, pinned in (("pageable", False), ("pinned", True)):
        host = torch.randint(0, 256, (n,), dtype=torch.uint8).pin_memory() if pinned else \
            torch.randint(0, 256, (n,), dtype=torch.uint8)
        for direction, (dst, src) in (("host_to_device", (gpu, host)),
                                      ("device_to_host", (host, gpu))):
            seconds = _timed_copy(dst, src, args.repeat)
            figures[f"{direction}_{kind}_gbps"] = n / seconds / 1e9
            print(f"{direction:15} {kind:8} {n / seconds / 1e9:6.1f} GB/s "
                  f"({n / (1 << 30):.1f} GiB in {seconds * 1e3:.1f} ms)")
        del host
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
