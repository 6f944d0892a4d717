#!/usr/bin/env python3
"""The summary table of a `scripts/gpu-check bench` run: for each engine run (da-bench --json in
engine-*.log) its GPU time, rate and share of the in-run GEMM rate, its host copies, the first
(cold) run against the warm median, the PyTorch baseline's time for the same problem
(baseline-<mode>-d<D>.json) and the ratio; then, for each run, the precision it computed in and
the cuBLAS GEMM type its "of GEMM" share is against (da-bench holds bf16 and fp8 compute against
the bf16 GEMM, fp16 against fp16, fp32 against plain fp32); then the fused path's stage times (the
first warm run's DA_CUDA_STAGE_TIMES line) and the host copy ceilings (copy-bandwidth.json).
The baseline runs in one dtype (bf16 in gpu-check): a run computed in another (fp8) is divided
by that baseline all the same, and its ratio cell says so.

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


def _gemm_type(figures):
    """The cuBLAS GEMM type the run's "of GEMM" share is against: da-bench's peak_gpu_gemm_type,
    or, in logs from before that field, the type named in its ratio_peak_loop."""
    if "peak_gpu_gemm_type" in figures:
        return figures["peak_gpu_gemm_type"]
    match = re.search(r"cuBLAS (\w+) GEMM", figures.get("ratio_peak_loop", ""))
    return match.group(1) if match else "?"


def _baseline_dtype(baseline):
    """The dtype torch_baseline.py ran in: the word before " on <device>" in its problem name;
    None when that is not there."""
    match = re.search(r" (\w+) on \S+$", baseline.get("problem", ""))
    return match.group(1) if match else None


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu-check"
    rows = []
    gemm_lines = []
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
        precision = j.get("precision_used")
        base_dtype = _baseline_dtype(baseline) if baseline else None
        if ratio and precision and base_dtype and precision != base_dtype:
            ratio += f" ({precision} against the {base_dtype} baseline)"
        rows.append(
            f"| {name} | {gpu_s * 1e3:.1f} ms | {j.get('device_gflops', 0) / 1e3:.0f} TFLOP/s | "
            f"{100 * j.get('device_ratio_to_peak', 0):.1f}% | {j.get('device_copy_s', 0):.2f} s | "
            f"{j['first_run_s']:.2f} / {j['time_s']['median']:.2f} s | {base_ms} | {ratio} |")
        gemm_lines.append(f"{name} {precision or '?'} compute against the {_gemm_type(j)} GEMM")
        if len(stages) > 1:
            stage_lines.append(f"{name}: {re.sub(r'^.*fused run: ', '', stages[1])}")
    print("| run | GPU time | rate | of GEMM | host copies | cold / warm end to end | "
          "PyTorch | ours vs PyTorch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(row)
    if gemm_lines:
        print("of GEMM, per run (cuBLAS, in-run): " + "; ".join(gemm_lines))
    for line in stage_lines:
        print(line)
    copies = os.path.join(directory, "copy-bandwidth.json")
    if os.path.exists(copies):
        c = json.load(open(copies))
        print("host copies (GB/s): " + ", ".join(
            f"{k[:-5]} {v:.1f}" for k, v in c.items() if k.endswith("_gbps")))


if __name__ == "__main__":
    main()
