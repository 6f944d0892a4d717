#!/usr/bin/env python3
"""The Python client's own cost per request (issue #18): wall time and the client process's CPU
time of da.Client.attend on fp32 [1, tokens, 8, 64] q, k and v, streamed and unary, the best of
--repeat, against a running da-server. --package puts an installed copy of the package (e.g. an
older one, pip install --target DIR) ahead of the path, to compare two versions in one session.
--parallel-streams K ... times the streamed call with each K in turn (interleaved, the median
of --repeat each); --segment and --dilation choose the one pattern (16 16 with --mode grouped:
almost no compute, the transport alone).

    da-server --listen 127.0.0.1:50977 --threads 2 --max-message-bytes 536870912 &
    python_client_cost.py --address 127.0.0.1:50977 --tokens 16384 [--package DIR]
    python_client_cost.py --address 127.0.0.1:50977 --tokens 262144 --segment 16 --dilation 16 \
        --mode grouped --parallel-streams 1 2 4 --repeat 5
"""

import argparse
import resource
import statistics
import sys
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--tokens", type=int, default=16384, help="16384: 96 MiB of q, k, v")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--package", help="a directory holding the package `da` to measure")
    parser.add_argument("--stream-only", action="store_true")
    parser.add_argument("--segment", type=int, default=256)
    parser.add_argument("--dilation", type=int, default=4)
    parser.add_argument("--mode", default="longnet")
    parser.add_argument("--parallel-streams", type=int, nargs="+")
    args = parser.parse_args()
    if args.package:
        sys.path.insert(0, args.package)
    import numpy as np

    import da
    client = da.Client(args.address, timeout=600)
    q = np.random.default_rng(1).standard_normal((1, args.tokens, 8, 64), dtype=np.float32)
    kw = dict(segments=[args.segment], dilations=[args.dilation], mode=args.mode,
              precision="fp32")
    print(f"da from {da.__file__}; q, k, v {3 * q.nbytes / 2**20:.0f} MiB")
    if args.parallel_streams:
        times = {k: [] for k in args.parallel_streams}
        out = np.empty_like(q)
        for _ in range(args.repeat):
            for k in args.parallel_streams:
                wall = time.perf_counter()
                client.attend(q, q, q, stream=True, parallel_streams=k, out=out, **kw)
                times[k].append(time.perf_counter() - wall)
        for k, runs in times.items():
            runs.sort()
            median = statistics.median(runs)  # Of an even count: the mean of the middle two.
            print(f"parallel_streams {k}: median {median:.3f} s, best "
                  f"{runs[0]:.3f} s ({' '.join(f'{t:.3f}' for t in runs)}); "
                  f"{4 * q.nbytes / median / 1e9:.2f} GB/s of q, k, v, out")
        return
    for stream in (True,) if args.stream_only else (True, False):
        best = None
        for _ in range(args.repeat):
            wall, cpu = time.perf_counter(), time.process_time()
            client.attend(q, q, q, stream=stream, **kw)
            run = (time.perf_counter() - wall, time.process_time() - cpu)
            best = run if best is None else min(best, run)
        print(f"{'streamed' if stream else 'unary':8}  wall {best[0]:.3f} s, client CPU "
              f"{best[1]:.3f} s (best of {args.repeat}); peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")


if __name__ == "__main__":
    main()
