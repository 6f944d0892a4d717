#!/usr/bin/env python3
"""bench/gpu_summary.py, the table at the end of `scripts/gpu-check bench`, over a log directory
made here the way gpu-check writes it: a da-bench JSON line with its stage lines, the PyTorch
baseline's JSON, a run that printed no result, and the copy ceilings."""

import contextlib
import io
import json
import os
import sys
import tempfile
import unittest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_summary  # noqa: E402


class GpuSummaryTest(unittest.TestCase):
    def test_the_table_holds_each_run_against_its_baseline(self):
        with tempfile.TemporaryDirectory() as d:
            engine = {"mode": "longnet", "shape": {"head_dim": 128}, "device_compute_s": 0.08,
                      "device_gflops": 400000.0, "device_ratio_to_peak": 0.5,
                      "device_copy_s": 2.5, "first_run_s": 3.0, "time_s": {"median": 2.6}}
            with open(os.path.join(d, "engine-longnet-d128.log"), "w") as f:
                f.write("cuda:0 fused run: alloc 1 ms, p0 sdpa 30 ms\n")
                f.write("cuda:0 fused run: alloc 2 ms, p0 sdpa 31 ms\n")
                f.write(json.dumps(engine) + "\n")
            with open(os.path.join(d, "engine-grouped-d64.log"), "w") as f:
                f.write("da-bench: killed\n")
            with open(os.path.join(d, "baseline-longnet-d128.json"), "w") as f:
                json.dump({"median_s": 0.16}, f)
            with open(os.path.join(d, "copy-bandwidth.json"), "w") as f:
                json.dump({"device": "x", "host_to_device_pinned_gbps": 50.0}, f)
            out = io.StringIO()
            sys.argv = ["gpu_summary.py", d]
            with contextlib.redirect_stdout(out):
                gpu_summary.main()
            text = out.getvalue()
        self.assertIn("| longnet-d128 | 80.0 ms | 400 TFLOP/s | 50.0% | 2.50 s | "
                      "3.00 / 2.60 s | 160.0 ms | 2.00x |", text)
        self.assertIn("| grouped-d64 | (no result) |", text)
        self.assertIn("longnet-d128: alloc 2 ms, p0 sdpa 31 ms", text)  # The first warm run.
        self.assertIn("host_to_device_pinned 50.0", text)


if __name__ == "__main__":
    unittest.main()
