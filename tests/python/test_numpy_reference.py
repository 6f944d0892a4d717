#!/usr/bin/env python3
"""Checks the numpy reference of docs/MATH.md before anything is compared with it.

Hand-computed cases (kept sets of the MATH.md worked example, a lone kept query returns its own
value, scale 0 averages values, unkept positions are 0) and a second, scalar statement of the math
written with plain loops, compared on random inputs over every case the server tests use.
"""

import math
import sys
import unittest

import numpy as np

import numpy_reference as ref


def scalar_dilated_attention(q, k, v, segment_lengths, dilation_rates, causal, scale, mode):
    """MATH.md transcribed position by position, with Python floats. Slow; tiny inputs only."""
    batch, seq_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    num_patterns = len(segment_lengths)
    out = np.zeros(q.shape)
    for b in range(batch):
        for j in range(heads):
            kv = j // (heads // kv_heads)
            # results[x] = list of (lse, out vector) of the patterns that kept x for this head.
            results = [[] for _ in range(seq_len)]
            for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
                if mode == ref.LONGNET:
                    offset = math.floor(j / math.ceil(heads / r))
                else:
                    base, extra = divmod(heads, num_patterns)
                    sizes = [base + (1 if g < extra else 0) for g in range(num_patterns)]
                    first = sum(sizes[:i])
                    if not first <= j < first + sizes[i]:
                        continue
                    offset = i % r
                num_segments = -(-seq_len // w)
                for t in range(num_segments):
                    kept = []
                    m = 0
                    while offset + m * r < w and t * w + offset + m * r < seq_len:
                        kept.append(t * w + offset + m * r)
                        m += 1
                    for p in kept:
                        keys = [x for x in kept if not causal or x <= p]
                        scores = [scale * sum(float(q[b, p, j, d]) * float(k[b, x, kv, d])
                                              for d in range(head_dim)) for x in keys]
                        top = max(scores)
                        lse = top + math.log(sum(math.exp(s - top) for s in scores))
                        vec = [sum(math.exp(s - lse) * float(v[b, x, kv, d])
                                   for s, x in zip(scores, keys)) for d in range(head_dim)]
                        results[p].append((lse, vec))
            for p in range(seq_len):
                if not results[p]:
                    continue
                if mode == ref.GROUPED:
                    for _, vec in results[p]:
                        out[b, p, j] += np.array(vec) / num_patterns
                else:
                    top = max(l for l, _ in results[p])
                    weights = [math.exp(l - top) for l, _ in results[p]]
                    total = sum(weights)
                    for wgt, (_, vec) in zip(weights, results[p]):
                        out[b, p, j] += wgt / total * np.array(vec)
    return out


def random_qkv(rng, batch, seq_len, heads, kv_heads, head_dim):
    q = rng.standard_normal((batch, seq_len, heads, head_dim))
    k = rng.standard_normal((batch, seq_len, kv_heads, head_dim))
    v = rng.standard_normal((batch, seq_len, kv_heads, head_dim))
    return q, k, v


def dense_attention(q, k, v, scale, causal=False):
    scores = np.einsum("bnhd,bmhd->bhnm", q, k) * scale
    if causal:
        n = q.shape[1]
        scores = np.where(np.triu(np.ones((n, n), dtype=bool), 1), -np.inf, scores)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhnm,bmhd->bnhd", weights, v)


class KeptSetTest(unittest.TestCase):
    def test_worked_example_of_math_md(self):
        # N=6, w=4, r=2: segments [0,4) and [4,6) (partial).
        got = [list(p) for p in ref.kept_positions(6, 4, 2, 0)]
        self.assertEqual(got, [[0, 2], [4]])
        got = [list(p) for p in ref.kept_positions(6, 4, 2, 1)]
        self.assertEqual(got, [[1, 3], [5]])

    def test_segment_longer_than_sequence(self):
        self.assertEqual([list(p) for p in ref.kept_positions(5, 8, 3, 2)], [[2]])
        self.assertEqual([list(p) for p in ref.kept_positions(5, 8, 3, 0)], [[0, 3]])

    def test_dilation_not_dividing_segment(self):
        # w=5, r=3: offsets 0 and 1 keep two per full segment, offset 2 keeps one.
        self.assertEqual([list(p) for p in ref.kept_positions(10, 5, 3, 0)], [[0, 3], [5, 8]])
        self.assertEqual([list(p) for p in ref.kept_positions(10, 5, 3, 2)], [[2], [7]])
        self.assertEqual([list(p) for p in ref.kept_positions(7, 5, 3, 1)], [[1, 4], [6]])

    def test_offsets_and_groups(self):
        self.assertEqual([ref.longnet_offset(j, 8, 2) for j in range(8)], [0] * 4 + [1] * 4)
        self.assertEqual([ref.longnet_offset(j, 8, 3) for j in range(8)],
                         [0, 0, 0, 1, 1, 1, 2, 2])
        self.assertEqual([ref.longnet_offset(j, 2, 4) for j in range(2)], [0, 1])
        self.assertEqual([list(g) for g in ref.grouped_head_groups(5, 3)], [[0, 1], [2, 3], [4]])
        self.assertEqual([list(g) for g in ref.grouped_head_groups(2, 3)], [[0], [1], []])


class HandComputedTest(unittest.TestCase):
    def setUp(self):
        self.rng = np.random.default_rng(7)

    def test_one_full_pattern_is_dense_attention(self):
        q, k, v = random_qkv(self.rng, 2, 9, 3, 3, 4)
        for causal in (False, True):
            for mode in (ref.LONGNET, ref.GROUPED):
                got = ref.dilated_attention(q, k, v, [16], [1], causal=causal, mode=mode)
                np.testing.assert_allclose(got, dense_attention(q, k, v, 0.5, causal),
                                           rtol=1e-12, atol=1e-12)

    def test_segment_of_one_returns_own_value(self):
        q, k, v = random_qkv(self.rng, 1, 5, 4, 2, 3)
        got = ref.dilated_attention(q, k, v, [1], [1])
        np.testing.assert_allclose(got, np.repeat(v, 2, axis=2), rtol=0, atol=1e-12)

    def test_scale_zero_averages_kept_values(self):
        # N=6, w=4, r=2, one head (offset 0): kept {0,2} and {4}; 1, 3, 5 are 0.
        q, k, v = random_qkv(self.rng, 1, 6, 1, 1, 2)
        got = ref.dilated_attention(q, k, v, [4], [2], scale=0.0)
        want = np.zeros_like(v)
        want[0, 0, 0] = want[0, 2, 0] = (v[0, 0, 0] + v[0, 2, 0]) / 2
        want[0, 4, 0] = v[0, 4, 0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        causal = ref.dilated_attention(q, k, v, [4], [2], scale=0.0, causal=True)
        want[0, 0, 0] = v[0, 0, 0]
        np.testing.assert_allclose(causal, want, rtol=0, atol=1e-12)

    def test_two_heads_use_both_offsets(self):
        # H=2, r=2: ceil(2/2)=1, head 1 uses offset 1 and keeps the odd positions.
        q, k, v = random_qkv(self.rng, 1, 6, 2, 2, 2)
        got = ref.dilated_attention(q, k, v, [4], [2], scale=0.0)
        self.assertTrue(np.all(got[0, 0::2, 1] == 0))
        self.assertTrue(np.all(got[0, 1::2, 0] == 0))
        np.testing.assert_allclose(got[0, 5, 1], v[0, 5, 1], atol=1e-12)

    def test_longnet_weights_by_lse(self):
        # Scale 0: a pattern's LSE is log(|kept keys|), so alpha is proportional to set sizes.
        q, k, v = random_qkv(self.rng, 1, 4, 1, 1, 2)
        got = ref.dilated_attention(q, k, v, [1, 4], [1, 1], scale=0.0)
        mean = v[0, :, 0].mean(axis=0)
        # Position p: pattern 0 gives v_p with weight 1, pattern 1 gives the mean with weight 4.
        want = (v[0, :, 0] * 1 + mean * 4) / 5
        np.testing.assert_allclose(got[0, :, 0], want, atol=1e-12)

    def test_grouped_divides_by_pattern_count(self):
        q, k, v = random_qkv(self.rng, 1, 4, 1, 1, 2)
        got = ref.dilated_attention(q, k, v, [1, 4], [1, 1], scale=0.0, mode=ref.GROUPED)
        # One head, two patterns: group 0 has it, group 1 is empty.
        np.testing.assert_allclose(got, v / 2, atol=1e-12)

    def test_gqa_equals_repeated_heads(self):
        q, k, v = random_qkv(self.rng, 1, 7, 4, 2, 3)
        a = ref.dilated_attention(q, k, v, [3, 5], [1, 2], causal=True)
        b = ref.dilated_attention(q, np.repeat(k, 2, 2), np.repeat(v, 2, 2), [3, 5], [1, 2],
                                  causal=True)
        np.testing.assert_array_equal(a, b)

    def test_cost_formula(self):
        self.assertEqual(ref.cost_flops(8192, 8, 64, [2048, 4096], [1, 2]),
                         8 * (4 * 8192 * 64 * 2048 + 4 * 8192 * 64 * 4096 / 4))


class ScalarAgreementTest(unittest.TestCase):
    """The vectorised reference equals the loop-by-loop transcription on random inputs."""

    CASES = [
        # (B, N, H, Hkv, D, segments, dilations, causal, scale, mode)
        (1, 6, 2, 2, 3, [4], [2], False, None, ref.LONGNET),
        (2, 11, 3, 1, 4, [4, 8], [1, 2], True, None, ref.LONGNET),
        (1, 13, 4, 2, 3, [5, 3], [3, 1], False, 0.3, ref.LONGNET),
        (1, 5, 8, 4, 2, [8, 16], [3, 4], True, None, ref.LONGNET),
        (1, 10, 5, 5, 2, [4, 6, 10], [1, 2, 3], False, None, ref.GROUPED),
        (2, 9, 2, 1, 3, [2, 4, 8], [1, 2, 4], True, 1.7, ref.GROUPED),
        (1, 7, 3, 3, 2, [7], [7], False, None, ref.LONGNET),
    ]

    def test_cases(self):
        rng = np.random.default_rng(11)
        for case in self.CASES:
            b, n, h, hkv, d, segments, dilations, causal, scale, mode = case
            with self.subTest(case=case):
                q, k, v = random_qkv(rng, b, n, h, hkv, d)
                got = ref.dilated_attention(q, k, v, segments, dilations, causal, scale, mode)
                want = scalar_dilated_attention(q, k, v, segments, dilations, causal, scale,
                                                mode)
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    sys.exit(0 if result.wasSuccessful() else 1)
