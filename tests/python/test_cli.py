#!/usr/bin/env python3
"""da-client end to end against a real da-server: every subcommand, .npy files written by numpy,
outputs compared with numpy_reference (docs/MATH.md), and the failure behaviour users rely on
(one line on stderr, a non-zero exit, never a hang).

    test_cli.py --server-binary build/bin/da-server --client-binary build/bin/da-client
"""

import json
import os
import tempfile
import time
import unittest

import numpy as np

import da_testing
import numpy_reference as ref

ARGS, UNITTEST_ARGV = da_testing.parse_args(needs=("server_binary", "client_binary"))


def parse_json_output(text):
    """One JSON object, or one per line (e.g. one per --repeat); returns a list of objects."""
    text = text.strip()
    try:
        value = json.loads(text)
        return value if isinstance(value, list) else [value]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


class CliTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = da_testing.Server(ARGS.server_binary).start()
        cls.tmp = tempfile.TemporaryDirectory(prefix="da-cli-")

    @classmethod
    def tearDownClass(cls):
        try:
            cls.server.stop_and_close()
        finally:
            cls.tmp.cleanup()

    def cli(self, *args):
        return da_testing.run_cli(ARGS.client_binary, *args)

    def assert_ok(self, done):
        self.assertEqual(done.returncode, 0,
                         f"{done.args} exited {done.returncode}\nstdout: {done.stdout}\n"
                         f"stderr: {done.stderr}")

    def assert_fails_with_one_line(self, done):
        self.assertNotEqual(done.returncode, 0, f"{done.args} should fail: {done.stdout}")
        self.assertGreater(done.returncode, 0, f"{done.args} died of signal {-done.returncode}")
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, f"{done.args}: expected one line on stderr, got "
                                        f"{done.stderr!r}")

    def path(self, name):
        return os.path.join(self.tmp.name, name)

    def test_random_prints_json(self):
        for extra in ([], ["--dtype", "fp16", "--kv-heads", "2", "--causal", "--stream"],
                      ["--mode", "grouped", "--repeat", "2", "--seed", "7"],
                      ["--dtype", "bf16", "--kv-heads", "1"]):
            with self.subTest(extra=extra):
                done = self.cli("random", "--server", self.server.address, "--batch", 1,
                                "--seq-len", 300, "--heads", 4, "--head-dim", 16, "--segments",
                                "64,128", "--dilations", "1,2", "--json", *extra)
                self.assert_ok(done)
                objects = parse_json_output(done.stdout)
                self.assertTrue(objects and all(isinstance(o, dict) for o in objects),
                                done.stdout)

    def test_requests_over_a_message_are_streamed_unasked(self):
        # A server taking messages of at most 1 MiB: a 2 MiB query goes as a stream (in blocks
        # under half a message) where gRPC would refuse it unary; a small request stays unary.
        with da_testing.Server(ARGS.server_binary, ["--max-message-bytes", "1048576"]) as server:
            for seq_len, streamed, extra in ((4096, True, []), (256, False, []),
                                             (4096, True, ["--stream"])):
                with self.subTest(seq_len=seq_len, extra=extra):
                    done = self.cli("random", "--server", server.address, "--seq-len", seq_len,
                                    "--heads", 4, "--head-dim", 32, "--segments", "512,1024",
                                    "--dilations", "1,2", "--json", *extra)
                    self.assert_ok(done)
                    report = parse_json_output(done.stdout)[-1]
                    self.assertEqual(report["stream"], streamed, done.stdout)
                    self.assertEqual(report["parallel_streams"], 1 if streamed else 0)
                    info = report["calls"][0]["info"]
                    if streamed:
                        self.assertEqual(info["stream_chunk_tokens"], 4096, info)
            # The same 2 MiB query from .npy files through `attend`.
            rng = np.random.default_rng(5)
            paths = []
            for name in ("q", "k", "v"):
                paths.append(self.path(f"big-{name}.npy"))
                np.save(paths[-1], rng.standard_normal((1, 4096, 4, 32)).astype(np.float32))
            done = self.cli("attend", "--server", server.address, "--q", paths[0], "--k",
                            paths[1], "--v", paths[2], "--segments", "512,1024", "--dilations",
                            "1,2", "--out", self.path("big-out.npy"), "--json")
            self.assert_ok(done)
            self.assertTrue(parse_json_output(done.stdout)[-1]["stream"], done.stdout)
            self.assertEqual(np.load(self.path("big-out.npy")).shape, (1, 4096, 4, 32))

    def test_out_dtype_answers_in_the_dtype_asked_for(self):
        # bf16 inputs answered in fp32, unary and streamed; a dtype that is none is one line.
        for extra in ([], ["--stream"]):
            with self.subTest(extra=extra):
                done = self.cli("random", "--server", self.server.address, "--seq-len", 256,
                                "--heads", 4, "--head-dim", 16, "--segments", "64,128",
                                "--dilations", "1,2", "--dtype", "bf16", "--out-dtype", "fp32",
                                "--json", *extra)
                self.assert_ok(done)
                report = parse_json_output(done.stdout)[-1]
                self.assertEqual((report["dtype"], report["output_dtype"]), ("bf16", "fp32"))
        rng = np.random.default_rng(9)
        paths = []
        for name in ("q", "k", "v"):
            paths.append(self.path(f"half-{name}.npy"))
            np.save(paths[-1], rng.standard_normal((1, 128, 2, 16)).astype(np.float16))
        done = self.cli("attend", "--server", self.server.address, "--q", paths[0], "--k",
                        paths[1], "--v", paths[2], "--segments", "64", "--dilations", "1",
                        "--out", self.path("half-out.npy"), "--out-dtype", "fp32", "--json")
        self.assert_ok(done)
        out = np.load(self.path("half-out.npy"))
        self.assertEqual((out.dtype, out.shape), (np.float32, (1, 128, 2, 16)))
        done = self.cli("attend", "--server", self.server.address, "--q", paths[0], "--k",
                        paths[1], "--v", paths[2], "--segments", "64", "--dilations", "1",
                        "--out-dtype", "fp64")
        self.assert_fails_with_one_line(done)
        self.assertIn("--out-dtype: 'fp64' is not fp32, fp16 or bf16", done.stderr)

    def test_random_plain_output(self):
        done = self.cli("random", "--server", self.server.address, "--batch", 1, "--seq-len",
                        256, "--heads", 2, "--head-dim", 8, "--segments", "64", "--dilations", "2")
        self.assert_ok(done)
        self.assertTrue(done.stdout.strip())

    def test_info(self):
        done = self.cli("info", "--server", self.server.address)
        self.assert_ok(done)
        self.assertIn("cpu", done.stdout.lower())

    def test_health(self):
        self.assert_ok(self.cli("health", "--server", self.server.address))
        self.assert_ok(self.cli("health", "--server", self.server.address, "--service",
                                "da.v1.AttentionService"))
        done = self.cli("health", "--server", self.server.address, "--service", "nosuch")
        self.assertNotEqual(done.returncode, 0, done.stdout)
        self.assertGreater(done.returncode, 0, "da-client died of a signal")

    def test_attend_with_npy_files(self):
        rng = np.random.default_rng(17)
        cases = [
            # (name, numpy dtype, shape q, kv heads, segments, dilations, extra flags, ref kw)
            ("fp32 gqa", np.float32, (1, 70, 4, 16), 2, [16, 32], [1, 2], [], {}),
            ("fp16 gqa causal grouped scale", np.float16, (2, 45, 6, 8), 3, [8, 16, 64],
             [1, 4, 3], ["--causal", "--mode", "grouped", "--scale", "0.3"],
             dict(causal=True, mode=ref.GROUPED, scale=0.3)),
            ("fp32 stream", np.float32, (1, 90, 2, 32), 1, [32, 100], [2, 7],
             ["--stream", "--causal"], dict(causal=True)),
        ]
        for name, dtype, shape, kv_heads, segments, dilations, flags, kw in cases:
            with self.subTest(case=name):
                batch, seq_len, heads, head_dim = shape
                q = rng.standard_normal(shape).astype(dtype)
                k = rng.standard_normal((batch, seq_len, kv_heads, head_dim)).astype(dtype)
                v = rng.standard_normal((batch, seq_len, kv_heads, head_dim)).astype(dtype)
                files = {}
                for label, array in (("q", q), ("k", k), ("v", v)):
                    files[label] = self.path(f"{name}-{label}.npy".replace(" ", "_"))
                    np.save(files[label], array)
                out = self.path(f"{name}-out.npy".replace(" ", "_"))
                done = self.cli("attend", "--server", self.server.address, "--q", files["q"],
                                "--k", files["k"], "--v", files["v"], "--segments",
                                ",".join(map(str, segments)), "--dilations",
                                ",".join(map(str, dilations)), "--out", out, "--json",
                                "--precision", "fp32", *flags)
                self.assert_ok(done)
                self.assertEqual(len(parse_json_output(done.stdout)), 1, done.stdout)
                got = np.load(out)
                self.assertEqual(got.dtype, np.dtype(dtype))
                want = ref.dilated_attention(q, k, v, segments, dilations, **kw)
                da_testing.assert_close(got, want, "fp32" if dtype == np.float32 else "fp16",
                                        name)

    def test_attend_with_bfloat16_npy_files(self):
        """bf16 both ways: ml_dtypes arrays as np.save writes them ('<V2'), and raw bits in uint16
        arrays with --bf16-as-uint16; unary and streamed."""
        import ml_dtypes  # scripts/install-deps installs it.
        rng = np.random.default_rng(23)
        shape, kv_shape = (2, 40, 4, 16), (2, 40, 2, 16)
        q, k, v = (rng.standard_normal(s).astype(ml_dtypes.bfloat16)
                   for s in (shape, kv_shape, kv_shape))
        want = ref.dilated_attention(q.astype(np.float64), k.astype(np.float64),
                                     v.astype(np.float64), [8, 16], [1, 2], causal=True)
        for convention, flags in (("void", []), ("uint16", ["--bf16-as-uint16"])):
            for transport in ([], ["--stream", "--block-tokens", "7"]):
                name = f"bf16 {convention} {' '.join(transport) or 'unary'}"
                with self.subTest(case=name):
                    files = {}
                    for label, array in (("q", q), ("k", k), ("v", v)):
                        files[label] = self.path(f"bf16-{convention}-{label}.npy")
                        np.save(files[label], array if convention == "void"
                                else array.view(np.uint16))
                    out = self.path(f"bf16-{convention}-out.npy")
                    done = self.cli("attend", "--server", self.server.address, "--q", files["q"],
                                    "--k", files["k"], "--v", files["v"], "--segments", "8,16",
                                    "--dilations", "1,2", "--causal", "--out", out,
                                    "--precision", "fp32", *flags, *transport)
                    self.assert_ok(done)
                    raw = np.load(out)
                    self.assertEqual(raw.dtype, np.dtype("V2" if convention == "void" else "<u2"))
                    got = raw.view(ml_dtypes.bfloat16)
                    self.assertEqual(got.shape, shape)
                    da_testing.assert_close(got.astype(np.float64), want, "bf16", name)
        # Without the flag a uint16 file is refused, naming the flag.
        done = self.cli("attend", "--server", self.server.address, "--q", files["q"], "--k",
                        files["k"], "--v", files["v"], "--segments", "8,16", "--dilations", "1,2")
        self.assert_fails_with_one_line(done)
        self.assertIn("--bf16-as-uint16", done.stderr)

    def test_bad_inputs_fail_with_one_line(self):
        q = np.zeros((1, 8, 2, 4), dtype=np.float32)
        np.save(self.path("ok.npy"), q)
        np.save(self.path("f64.npy"), q.astype(np.float64))
        with open(self.path("garbage.npy"), "wb") as f:
            f.write(b"not an npy file")
        common = ["--segments", "4", "--dilations", "1", "--out", self.path("never.npy")]
        for label, q_file in (("missing file", self.path("missing.npy")),
                              ("float64", self.path("f64.npy")),
                              ("not npy", self.path("garbage.npy"))):
            with self.subTest(case=label):
                done = self.cli("attend", "--server", self.server.address, "--q", q_file, "--k",
                                self.path("ok.npy"), "--v", self.path("ok.npy"), *common)
                self.assert_fails_with_one_line(done)
        with self.subTest(case="server rejects the request"):
            done = self.cli("attend", "--server", self.server.address, "--q",
                            self.path("ok.npy"), "--k", self.path("ok.npy"), "--v",
                            self.path("ok.npy"), "--segments", "4", "--dilations", "5")
            self.assert_fails_with_one_line(done)

    def test_unreachable_server_fails_with_one_line(self):
        address = f"127.0.0.1:{da_testing.free_port()}"
        for args in (["health"], ["info"],
                     ["random", "--batch", 1, "--seq-len", 16, "--heads", 1, "--head-dim", 4,
                      "--segments", "8", "--dilations", "1", "--timeout-ms", "5000"]):
            with self.subTest(command=args[0]):
                done = self.cli(args[0], "--server", address, *args[1:])
                self.assert_fails_with_one_line(done)



class HttpHealthTest(unittest.TestCase):
    """`da-client health --http`: the server's plaintext probes on its metrics port, for a
    container's health check where the gRPC port is TLS-only (the Dockerfile's HEALTHCHECK)."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="da-cli-http-")
        da_testing.make_certificates(cls.tmp.name)
        path = lambda name: os.path.join(cls.tmp.name, name)
        cls.tls = da_testing.Server(ARGS.server_binary, [
            "--threads", "1", "--tls-cert", path("server.pem"), "--tls-key", path("server.key")],
            metrics=True).start()

    @classmethod
    def tearDownClass(cls):
        try:
            cls.tls.stop_and_close()
        finally:
            cls.tmp.cleanup()

    def cli(self, *args):
        return da_testing.run_cli(ARGS.client_binary, *args)

    def test_a_tls_only_server_is_probed_over_http(self):
        probe = f"127.0.0.1:{self.tls.metrics_port}"
        # Ready once its start-up self-check has passed.
        done = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done = self.cli("health", "--http", probe, "--service", "da.v1.AttentionService",
                            "--json")
            if done.returncode == 0:
                break
            time.sleep(0.1)
        self.assertEqual(done.returncode, 0, f"stdout: {done.stdout}\nstderr: {done.stderr}")
        self.assertEqual(json.loads(done.stdout),
                         {"service": "da.v1.AttentionService", "status": "SERVING"})
        live = self.cli("health", "--http", probe)
        self.assertEqual(live.returncode, 0, live.stderr)
        self.assertEqual(live.stdout.strip(), "SERVING")
        # The same question over plaintext gRPC does not reach a TLS-only port.
        plain = self.cli("health", "--server", self.tls.address, "--service",
                         "da.v1.AttentionService", "--timeout-ms", "5000")
        self.assertEqual(plain.returncode, 1, plain.stdout)
        self.assertIn("UNAVAILABLE", plain.stderr)

    def test_not_ready_says_why_and_exits_one(self):
        # Rank 0 of a group of two whose worker never comes: alive, not ready.
        server = da_testing.Server(ARGS.server_binary, [
            "--threads", "1", "--world-size", "2", "--rank", "0", "--coordinator",
            f"127.0.0.1:{da_testing.free_port()}", "--rank-address", "127.0.0.1"],
            metrics=True).start()
        try:
            probe = f"127.0.0.1:{server.metrics_port}"
            done = self.cli("health", "--http", probe, "--service", "da.v1.AttentionService")
            self.assertEqual(done.returncode, 1, f"stdout: {done.stdout}\nstderr: {done.stderr}")
            self.assertTrue(done.stdout.startswith("NOT_SERVING: "), done.stdout)
            self.assertIn("rank 1", done.stdout)
            done = self.cli("health", "--http", probe, "--service", "da.v1.AttentionService",
                            "--json")
            self.assertEqual(done.returncode, 1, done.stderr)
            answer = json.loads(done.stdout)
            self.assertEqual(answer["status"], "NOT_SERVING")
            self.assertIn("rank 1", answer["reason"])
            self.assertEqual(self.cli("health", "--http", probe).returncode, 0, "not alive")
        finally:
            server.stop_and_close()

    def test_wrong_ports_and_services_fail_with_one_line(self):
        cases = [
            # The gRPC port speaks HTTP/2, not a probe's HTTP/1.1.
            (["--http", self.tls.address], 1, "not the gRPC port"),
            (["--http", f"127.0.0.1:{da_testing.free_port()}"], 1, "UNAVAILABLE"),
            (["--http", "localhost"], 2, "HOST:PORT"),
            (["--http", f"127.0.0.1:{self.tls.metrics_port}", "--service", "nosuch"], 2,
             "/readyz"),
        ]
        for args, code, said in cases:
            with self.subTest(args=args):
                done = self.cli("health", *args, "--timeout-ms", "5000")
                self.assertEqual(done.returncode, code, f"{done.stdout}\n{done.stderr}")
                lines = [line for line in done.stderr.splitlines() if line.strip()]
                self.assertEqual(len(lines), 1, done.stderr)
                self.assertIn(said, lines[0])

if __name__ == "__main__":
    da_testing.run_unittest(UNITTEST_ARGV)
