#!/usr/bin/env python3
"""The summary table of a `scripts/gpu-check bench` run: for each engine run (da-bench --json in
engine-*.log) its GPU time, rate and share of the in-run GEMM rate, its host copies, the first
(cold) run against the warm median, the PyTorch baseline's time for the same problem
(baseline-<mode>-d<D>.json) and the ratio; then the fused path's stage times (the first warm run's
DA_CUDA_STAGE_TIMES line) and the host copy ceilings (copy-bandwidth.json).

    gpu_summary.py DIR      # DIR: gpu-check's log directory ($OUT)
"""

import glob
import json
import os
import re
import sys


def _engine_runs(directory):
    for path in sorted(glob.glob(os.path.join(directory, "engine-*.log"))):
        name = os.path.basename(path)[len("engine-"):-len(".log")]
        text = open(path).read()
        figures = None
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    figures = json.loads(line)
                except ValueError:
                    pass
        stages = [line for line in text.splitlines() if " fused run:" in line]
        yield name, figures, stages


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu-check"
    rows = []
    stage_lines = []
    for name, j, stages in _engine_runs(directory):
        if j is None:
            rows.append(f"| {name} | (no result) | | | | | | |")
            continue
        mode, dim = j["mode"], j["shape"]["head_dim"]
        baseline_path = os.path.join(directory, f"baseline-{mode}-d{dim}.json")
        baseline = json.load(open(baseline_path)) if os.path.exists(baseline_path) else None
        gpu_s = j.get("device_compute_s", 0)
        base_ms = f"{baseline['median_s'] * 1e3:.1f} ms" if baseline else ""
        ratio = f"{baseline['median_s'] / gpu_s:.2f}x" if baseline and gpu_s else ""
        rows.append(
            f"| {name} | {gpu_s * 1e3:.1f} ms | {j.get('device_gflops', 0) / 1e3:.0f} TFLOP/s | "
            f"{100 * j.get('device_ratio_to_peak', 0):.1f}% | {j.get('device_copy_s', 0):.2f} s | "
            f"{j['first_run_s']:.2f} / {j['time_s']['median']:.2f} s | {base_ms} | {ratio} |")
        if len(stages) > 1:
            stage_lines.append(f"{name}: {re.sub(r'^.*fused run: ', '', stages[1])}")
    print("| run | GPU time | rate | of GEMM | host copies | cold / warm end to end | "
          "PyTorch | ours vs PyTorch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(row)
    for line in stage_lines:
        print(line)
    copies = os.path.join(directory, "copy-bandwidth.json")
    if os.path.exists(copies):
        c = json.load(open(copies))
        print("host copies (GB/s): " + ", ".join(
            f"{k[:-5]} {v:.1f}" for k, v in c.items() if k.endswith("_gbps")))


if __name__ == "__main__":
    main()
