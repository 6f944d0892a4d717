#!/usr/bin/env python3
"""bench/torch_baseline.py, the PyTorch baseline of the GPU benchmarks, equals the float64 numpy
reference (docs/MATH.md) on CPU across the semantics: both modes, causal, grouped-query attention,
partial last segments, w > N, r not dividing w, more patterns than heads in GROUPED, and fp32 and
bf16 inputs; so that a GPU run compares our engine with a baseline that computes the same thing.

    test_torch_baseline.py
"""

import importlib.util
import os
import unittest

import numpy as np
import torch

import da_testing
import numpy_reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location(
    "torch_baseline", os.path.join(ROOT, "bench", "torch_baseline.py"))
baseline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(baseline)

CASES = [  # (batch, seq_len, heads, kv_heads, head_dim, segments, dilations)
    (2, 96, 4, 4, 16, [16, 32], [1, 2]),
    (1, 90, 6, 2, 8, [16, 64], [1, 4]),        # GQA; a partial last segment
    (1, 77, 5, 5, 8, [24, 32, 100], [3, 2, 5]),  # r not dividing w; w > N; 5 heads, 3 groups
    (1, 40, 2, 1, 8, [8, 16, 20], [1, 2, 3]),   # GROUPED: more patterns than heads
]


class TorchBaselineTest(unittest.TestCase):
    def test_equals_the_reference(self):
        generator = torch.Generator().manual_seed(5)
        for case in CASES:
            batch, seq_len, heads, kv_heads, dim, segments, dilations = case
            for mode in ("grouped", "longnet"):
                for causal in (False, True):
                    for dtype, tolerance in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                        with self.subTest(case=case, mode=mode, causal=causal, dtype=str(dtype)):
                            q = torch.randn(batch, seq_len, heads, dim, generator=generator)
                            k, v = (torch.randn(batch, seq_len, kv_heads, dim,
                                                generator=generator) for _ in range(2))
                            q, k, v = (t.to(dtype) for t in (q, k, v))
                            got = baseline.dilated_attention(q, k, v, segments, dilations,
                                                             causal, mode=mode)
                            self.assertEqual((got.dtype, got.shape), (dtype, q.shape))
                            want = ref.dilated_attention(
                                *(t.float().numpy() for t in (q, k, v)), segments, dilations,
                                causal=causal,
                                mode=ref.GROUPED if mode == "grouped" else ref.LONGNET)
                            da_testing.assert_close(got.float().numpy(), want, tolerance,
                                                    f"{mode} {case}")

    def test_the_cost_is_the_references(self):
        self.assertEqual(baseline.cost_flops(4096, 8, 64, [1024, 2048], [1, 2], False),
                         ref.cost_flops(4096, 8, 64, [1024, 2048], [1, 2]))
        # GROUPED: each pattern on its group of heads (3 and 2 of 5 heads) only.
        self.assertEqual(
            baseline.cost_flops(4096, 5, 64, [1024, 2048], [1, 2], False, mode="grouped"),
            3 * 4 * 4096 * 64 * 1024 + 2 * 4 * 4096 * 64 * 2048 / 4)


if __name__ == "__main__":
    unittest.main()
