#!/usr/bin/env python3
"""The Python package `da` (python/, issue #18), installed from the checkout as a user would
(pip install ./python, here into a temporary directory) and used against a real da-server:
numpy arrays of every wire dtype against the numpy reference, unary and streamed alike, the
automatic switch to streaming past the server's message limit, local refusals before anything is
sent, errors as exceptions of the right classes, health, info and the bearer token, and the
asyncio client.

    test_python_client.py --server-binary build/bin/da-server
"""

import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

import da_testing
import numpy_reference as ref

ARGS, UNITTEST_ARGV = da_testing.parse_args(needs=("server_binary",))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

INSTALL = tempfile.TemporaryDirectory(prefix="da-python-")
_installed = subprocess.run(
    [sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps",
     "--target", INSTALL.name, os.path.join(ROOT, "python")], capture_output=True, text=True)
if _installed.returncode != 0:
    raise SystemExit("pip install ./python failed:\n" + _installed.stdout + _installed.stderr)
sys.path.insert(0, INSTALL.name)
import da  # noqa: E402  (installed just above)


def reference(q, k, v, segments, dilations, **kw):
    as64 = [np.asarray(t, dtype=np.float64) for t in (q, k, v)]
    return ref.dilated_attention(*as64, segments, dilations, **kw)


class PythonClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = da_testing.Server(ARGS.server_binary, ["--threads", "2"]).start()
        cls.client = da.Client(cls.server.address, timeout=60)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop_and_close()

    def test_every_dtype_unary_and_streamed_matches_the_reference(self):
        import ml_dtypes
        rng = np.random.default_rng(11)
        for dtype, tolerance in ((np.float32, "fp32"), (np.float16, "fp16"),
                                 (ml_dtypes.bfloat16, "bf16")):
            with self.subTest(dtype=np.dtype(dtype).name):
                q = rng.standard_normal((2, 90, 4, 16)).astype(dtype)
                k = rng.standard_normal((2, 90, 2, 16)).astype(dtype)
                v = rng.standard_normal((2, 90, 2, 16)).astype(dtype)
                kw = dict(segments=[16, 64], dilations=[1, 4], causal=True, mode="grouped",
                          precision="fp32")
                unary = self.client.attend(q, k, v, stream=False, **kw)
                streamed = self.client.attend(q, k, v, stream=True, block_tokens=13,
                                              return_info=True, **kw)
                self.assertEqual(unary.dtype, np.dtype(dtype))
                self.assertEqual(unary.shape, q.shape)
                self.assertTrue(
                    np.array_equal(unary.view(np.uint8), streamed.output.view(np.uint8)))
                self.assertEqual(streamed.precision, "fp32")
                self.assertGreater(streamed.info.stream_chunks, 0)
                want = reference(q, k, v, [16, 64], [1, 4], causal=True, mode=ref.GROUPED)
                da_testing.assert_close(unary, want, tolerance, np.dtype(dtype).name)

    def test_large_requests_stream_by_themselves(self):
        # A server whose messages hold 1 MiB: a 2.5 MiB request goes as a stream.
        with da_testing.Server(ARGS.server_binary,
                               ["--threads", "2", "--max-message-bytes", "1048576"]) as small:
            client = da.Client(small.address, timeout=60)
            rng = np.random.default_rng(12)
            q = rng.standard_normal((1, 5000, 4, 32)).astype(np.float32)
            result = client.attend(q, q, q, segments=[1000], dilations=[2], precision="fp32",
                                   return_info=True)
            self.assertGreater(result.info.stream_chunks, 0, "the call was not streamed")
            da_testing.assert_close(result.output, reference(q, q, q, [1000], [2]), "fp32",
                                    "streamed")
            client.close()

    def test_inputs_the_server_would_refuse_are_refused_before_sending(self):
        nowhere = da.Client("127.0.0.1:1")  # Nothing listens: only a local refusal can answer.
        q = np.zeros((1, 8, 2, 4), np.float32)
        cases = [
            ((q, q[:, :4], q), {}, "must match query shape"),
            ((q[0], q, q), {}, "expected rank 4"),
            ((q.astype(np.float64), q, q), {}, "is not float32, float16 or bfloat16"),
            ((q, q.astype(np.float16), q.astype(np.float16)), {}, "differs from query dtype"),
            ((q, q, q), {"segments": [4, 8], "dilations": [1]}, "must be equal in number"),
        ]
        for args, kw, text in cases:
            with self.subTest(text=text):
                kw = {"segments": [4], "dilations": [1], **kw}
                with self.assertRaises(da.InvalidArgument) as caught:
                    nowhere.attend(*args, **kw)
                self.assertIsInstance(caught.exception, ValueError)
                self.assertIn(text, str(caught.exception))
        nowhere.close()

    def test_errors_are_exceptions_with_the_code_and_the_servers_message(self):
        q = np.ones((1, 64, 2, 8), np.float32)
        with self.assertRaises(da.InvalidArgument) as caught:
            self.client.attend(q, q, q, segments=[16, 0], dilations=[1, 1])
        self.assertIn("spec.segment_lengths[1] is 0", caught.exception.message)
        # One dense segment of 32768 tokens: seconds of compute, far past 50 ms.
        long_q = np.random.default_rng(13).standard_normal((1, 32768, 1, 32)).astype(np.float32)
        with self.assertRaises(da.DeadlineExceeded) as caught:
            self.client.attend(long_q, long_q, long_q, segments=[32768], dilations=[1],
                               stream=False, timeout=0.05)
        self.assertIsInstance(caught.exception, TimeoutError)
        with self.assertRaises(da.Unavailable):
            da.Client("127.0.0.1:1").attend(q, q, q, segments=[16], dilations=[1], stream=False,
                                            timeout=10)

    def test_asyncio_client_runs_many_requests_from_one_loop(self):
        import asyncio
        rng = np.random.default_rng(14)
        inputs = [rng.standard_normal((1, 120, 4, 16)).astype(np.float32) for _ in range(6)]
        kw = dict(segments=[32, 64], dilations=[1, 2], precision="fp32")

        async def run():
            async with da.aio.Client(self.server.address, timeout=60) as client:
                self.assertEqual(await client.health("da.v1.AttentionService"), "SERVING")
                unary = await asyncio.gather(*(client.attend(q, q, q, stream=False, **kw)
                                               for q in inputs))
                streamed = await asyncio.gather(*(client.attend(q, q, q, stream=True,
                                                                block_tokens=50, **kw)
                                                  for q in inputs))
                with self.assertRaises(da.InvalidArgument):
                    await client.attend(inputs[0], inputs[0], inputs[0], segments=[16, 0],
                                        dilations=[1, 1])
                return unary, streamed

        unary, streamed = asyncio.run(run())
        for q, a, b in zip(inputs, unary, streamed):
            self.assertTrue(np.array_equal(a, b))
            self.assertTrue(np.array_equal(a, self.client.attend(q, q, q, **kw)))

    def test_health_info_and_the_token(self):
        self.assertEqual(self.client.health(), "SERVING")
        self.assertEqual(self.client.health("da.v1.AttentionService"), "SERVING")
        info = self.client.info()
        self.assertTrue(info.version)
        self.assertEqual(info.devices[0].id, "cpu:0")
        with tempfile.NamedTemporaryFile("w", suffix=".tokens") as tokens:
            tokens.write("s3cret-token\n")
            tokens.flush()
            with da_testing.Server(ARGS.server_binary,
                                   ["--threads", "1", "--auth-token-file", tokens.name]) as guarded:
                q = np.ones((1, 32, 2, 8), np.float32)
                with self.assertRaises(da.Unauthenticated):
                    da.Client(guarded.address).attend(q, q, q, segments=[16], dilations=[1],
                                                      stream=False)
                out = da.Client(guarded.address, token="s3cret-token").attend(
                    q, q, q, segments=[16], dilations=[1], stream=False)
                self.assertEqual(out.shape, q.shape)


if __name__ == "__main__":
    da_testing.run_unittest(UNITTEST_ARGV)
