#!/usr/bin/env python3
"""The Python package `da` (python/, issue #18) as a user has it: its wheel built with
`python -m build` from a copy of python/ and proto/, installed into a fresh virtual environment
(which sees the system's grpcio, numpy, ml_dtypes and torch but not the checkout), and this file
run again inside it against a real da-server. Checked: numpy arrays and torch tensors of every
wire dtype against the numpy reference, unary and streamed alike to the byte, the tensor bytes
framed by hand equal to protobuf's own encoding, the automatic switch to streaming (a 96 MiB
request), outputs written into a caller's array, the block iterator fed by a generator that never
holds the input, warm-up, local refusals before anything is sent, errors as exceptions of the
right classes, health, info and the bearer token, the asyncio client, and the torch module; and
that the wheel holds no gencode that checks the grpcio or protobuf version at import (it would
refuse the older ones that pyproject.toml accepts), its stub and messages standing in for it.

    test_python_client.py --server-binary build/bin/da-server
"""

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np

import da_testing
import numpy_reference as ref

ARGS, UNITTEST_ARGV = da_testing.parse_args(needs=("server_binary",))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_RUN = "DA_PYTHON_PACKAGE_VENV"  # Set (to the venv's directory) in the run inside the venv.


def _run_in_a_fresh_venv():
    """Builds the wheel, installs it into a new virtual environment and runs this file there;
    exits with that run's status."""
    work = tempfile.mkdtemp(prefix="da-wheel-")
    try:
        source = os.path.join(work, "src")
        # Not what a build leaves in the checkout (attention_pb2.py is written by hand: kept).
        ignore = shutil.ignore_patterns("build", "*.egg-info", "*.desc", "*_pb2_grpc.py",
                                        "__pycache__")
        shutil.copytree(os.path.join(ROOT, "python"), os.path.join(source, "python"),
                        ignore=ignore)
        shutil.copytree(os.path.join(ROOT, "proto"), os.path.join(source, "proto"))
        venv = os.path.join(work, "venv")
        python = os.path.join(venv, "bin", "python")
        steps = [
            [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
             os.path.join(work, "dist"), os.path.join(source, "python")],
            [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv],
        ]
        for step in steps:
            # In work/: run from the checkout, `-m build` would find its build/ directory.
            done = subprocess.run(step, capture_output=True, text=True, cwd=work)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(step)} failed:\n{done.stdout}{done.stderr}")
        wheels = os.listdir(os.path.join(work, "dist"))
        if len(wheels) != 1 or not wheels[0].endswith(".whl"):
            raise SystemExit(f"python -m build made {wheels}, not one wheel")
        # --no-index: the wheel's dependencies must be met by what is installed, with no
        # download (pip itself comes from the system's site-packages).
        install = [python, "-m", "pip", "install", "--quiet", "--no-index",
                   "--disable-pip-version-check", os.path.join(work, "dist", wheels[0])]
        done = subprocess.run(install, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"installing the wheel failed:\n{done.stdout}{done.stderr}")
        print(f"installed {wheels[0]} into a fresh venv", flush=True)
        run = subprocess.run([python, os.path.abspath(__file__), *sys.argv[1:]],
                             env=dict(os.environ, **{VENV_RUN: venv}))
        raise SystemExit(run.returncode)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if VENV_RUN not in os.environ:
    _run_in_a_fresh_venv()

import da  # noqa: E402  (the wheel's, in the venv)
import da.torch  # noqa: E402
import grpc  # noqa: E402
import ml_dtypes  # noqa: E402
import torch  # noqa: E402
from da import _client  # noqa: E402  (the framing, compared with protobuf's below)
from da import _stub  # noqa: E402
from da.v1 import attention_pb2 as pb  # noqa: E402

if not da.__file__.startswith(os.environ[VENV_RUN]):
    raise SystemExit(f"da was imported from {da.__file__}, not from the venv")


def grpc_code(name):
    import grpc
    return getattr(grpc.StatusCode, name)


def random_qkv(rng, seq_len, kv_heads, dtype):
    """q [2, seq_len, 4, 16], k and v [2, seq_len, kv_heads, 16], standard normal in dtype."""
    return (rng.standard_normal((2, seq_len, heads, 16)).astype(dtype)
            for heads in (4, kv_heads, kv_heads))


def established(port):
    """This process's connections established to a server's port, counted on the client's side
    (/proc/net/tcp and tcp6: remote port `port`, state 01, a socket among this process's open
    files). Not the server's side: another test's process (ctest runs them side by side) may
    connect to a port it was told is free, as the server's may be by then."""
    own = set()  # Socket inodes.
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # Closed meanwhile.
        if target.startswith("socket:["):
            own.add(target[8:-1])
    count = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(name):  # No IPv6.
            continue
        with open(name) as table:
            for line in list(table)[1:]:
                fields = line.split()
                count += (int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01"
                          and fields[9] in own)
    return count


def reference(q, k, v, segments, dilations, **kw):
    as64 = [np.asarray(t, dtype=np.float64) for t in (q, k, v)]
    return ref.dilated_attention(*as64, segments, dilations, **kw)


async def tasks_left(settle_s=2.0):
    """The event loop's tasks other than the caller's that are still pending after up to
    `settle_s`: a task cancelled a moment ago (grpc.aio's own, when a channel closes) ends one
    loop turn later, while one left waiting for good is still there."""
    import asyncio
    until = time.monotonic() + settle_s
    while True:
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if not left or time.monotonic() >= until:
            return left
        await asyncio.sleep(0.01)


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
        rng = np.random.default_rng(11)
        cases = [  # (mode, causal, kv_heads, seq_len, segments, dilations)
            ("grouped", True, 2, 90, [16, 64], [1, 4]),  # GQA; a partial last segment of 64.
            ("longnet", False, 4, 77, [32, 24], [2, 3]),
        ]
        for (dtype, tolerance), (mode, causal, kv_heads, seq_len, segments, dilations) in (
                itertools.product(((np.float32, "fp32"), (np.float16, "fp16"),
                                   (ml_dtypes.bfloat16, "bf16")), cases)):
            with self.subTest(dtype=np.dtype(dtype).name, mode=mode):
                q, k, v = random_qkv(rng, seq_len, kv_heads, dtype)
                kw = dict(segments=segments, dilations=dilations, causal=causal, mode=mode,
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
                want = reference(q, k, v, segments, dilations, causal=causal,
                                 mode=ref.GROUPED if mode == "grouped" else ref.LONGNET)
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
            ((q[:, :0], q[:, :0], q[:, :0]), {"stream": True}, "query.shape seq_len is 0"),
            ((q, q, q), {"stream": True, "block_tokens": 2.0}, "block_tokens 2.0 must be an int"),
            ((q, q, q), {"block_tokens": -1}, "block_tokens -1 must be an int from 0"),
            ((q, q, q), {"priority": 2**31}, "priority 2147483648 must be an int from "
                                             "-2147483648 to 2147483647"),
            ((q, q, q), {"stream": True, "priority": 1.5}, "priority 1.5 must be an int"),
            # Pattern values are whole numbers the wire's int64 holds, not truncated.
            ((q, q, q), {"segments": [2048.7]}, "segments[0] 2048.7 must be an int from 1 to "
                                                "9223372036854775807"),
            ((q, q, q), {"segments": [4, 2**70], "dilations": [1, 1]},
             f"segments[1] {2**70} must be an int"),
            ((q, q, q), {"segments": [4, 0], "dilations": [1, 1]}, "segments[1] 0 must be"),
            ((q, q, q), {"dilations": [True]}, "dilations[0] True must be an int"),
            ((q, q, q), {"dilations": [1.0]}, "dilations[0] 1.0 must be an int"),
        ]
        for args, kw, text in cases:
            with self.subTest(text=text):
                kw = {"segments": [4], "dilations": [1], **kw}
                with self.assertRaises(da.InvalidArgument) as caught:
                    nowhere.attend(*args, **kw)
                self.assertIsInstance(caught.exception, ValueError)
                self.assertIn(text, str(caught.exception))
        with self.assertRaises(da.InvalidArgument) as caught:
            nowhere.attend_blocks([(q, q, q)], seq_len=8, segments=[4], dilations=[1],
                                  priority=True)
        self.assertIn("priority True must be an int", str(caught.exception))
        for seq_len in (8.0, 0, 2**63):
            with self.subTest(seq_len=seq_len), self.assertRaises(da.InvalidArgument) as bad:
                nowhere.attend_blocks([(q, q, q)], seq_len=seq_len, segments=[4], dilations=[1])
            self.assertIn(f"seq_len {seq_len!r} must be an int from 1", str(bad.exception))
        spec = _client._spec([np.int64(4), 8], [np.int32(1), 2], False, "longnet", "auto", None)
        self.assertEqual((list(spec.segment_lengths), list(spec.dilation_rates)), ([4, 8], [1, 2]))
        nowhere.close()
        # A CA file without a PEM block would stand for the system's roots: refused by name.
        for path in (os.devnull, os.path.dirname(os.path.abspath(__file__))):
            with self.subTest(tls_ca=path), self.assertRaises(da.InvalidArgument) as empty:
                da.Client("127.0.0.1:1", tls_ca=path)
            self.assertIn(f"tls_ca {path}: ", str(empty.exception))
        # Errors cross process boundaries (multiprocessing, concurrent.futures) whole.
        import pickle
        copied = pickle.loads(pickle.dumps(caught.exception))
        self.assertIsInstance(copied, da.InvalidArgument)
        self.assertEqual((copied.code, copied.message, str(copied)),
                         (caught.exception.code, caught.exception.message, str(caught.exception)))

    def test_errors_are_exceptions_with_the_code_and_the_servers_message(self):
        q = np.ones((1, 64, 2, 8), np.float32)
        with self.assertRaises(da.InvalidArgument) as caught:
            self.client.attend(q, q, q, segments=[16, 16], dilations=[1, 32])
        self.assertIn("spec.dilation_rates[1] is 32", caught.exception.message)
        # One dense segment of 32768 tokens: seconds of compute, far past 50 ms.
        long_q = np.random.default_rng(13).standard_normal((1, 32768, 1, 32)).astype(np.float32)
        with self.assertRaises(da.DeadlineExceeded) as caught:
            self.client.attend(long_q, long_q, long_q, segments=[32768], dilations=[1],
                               stream=False, timeout=0.05)
        self.assertIsInstance(caught.exception, TimeoutError)
        with self.assertRaises(da.Unavailable):
            da.Client("127.0.0.1:1").attend(q, q, q, segments=[16], dilations=[1], stream=False,
                                            timeout=10)

    def test_calls_a_draining_replica_refuses_are_sent_again_and_reach_the_next_one(self):
        # A rolling update: the replica the client is connected to drains (SIGTERM, 1.5 s of
        # grace) while another one serves. Its refusals ("da-refused") are sent again after a
        # backoff (da.Retry) and, once it has closed its connections, reach the next replica:
        # unary, one stream and two parallel streams, from the sync and the asyncio client.
        # pick_first over the two addresses stands for a load balancer sending new connections
        # to ready replicas.
        import asyncio
        import concurrent.futures
        rng = np.random.default_rng(41)
        q, k, v = (rng.standard_normal((1, 512, 2, 16)).astype(np.float32) for _ in range(3))
        kw = dict(segments=[64, 128], dilations=[1, 2], precision="fp32")
        shapes = {"unary": dict(stream=False),
                  "stream": dict(stream=True, block_tokens=128),
                  "parts": dict(stream=True, block_tokens=64, parallel_streams=2)}
        with da_testing.Server(ARGS.server_binary, ["--threads", "2"], metrics=True) as nxt:
            want = self.client.attend(q, k, v, **kw)
            for kind in ("sync", "asyncio"):
                with da_testing.Server(ARGS.server_binary, ["--threads", "2",
                                                            "--drain-grace-ms", "1500"],
                                       metrics=True) as draining:
                    target = f"ipv4:127.0.0.1:{draining.port},127.0.0.1:{nxt.port}"
                    before = nxt.metric('da_requests_total{code="OK",method="Attend"}')

                    def refused(name):
                        return sum(f"request id={kind}-{name}" in line and
                                   "code=UNAVAILABLE" in line
                                   for line in draining.log().splitlines())

                    def drain_then(call):
                        call(None)  # Connected to the first address, the draining one.
                        self.assertEqual(draining.metric(
                            'da_requests_total{code="OK",method="Attend"}'), 1.0)
                        draining.terminate()
                        da_testing.wait_until(lambda: "draining: new calls refused" in
                                              draining.log() or None, 10, "the drain")
                        return call

                    if kind == "sync":
                        with da.Client(target, timeout=60) as client:
                            def call(name):
                                extra = shapes[name] if name else dict(stream=False)
                                return client.attend(q, k, v, request_id=f"{kind}-{name}",
                                                     **extra, **kw)
                            drain_then(call)
                            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                                got = dict(zip(shapes, pool.map(call, shapes)))
                    else:
                        async def run():
                            async with da.aio.Client(target, timeout=60) as client:
                                async def call(name):
                                    extra = shapes[name] if name else dict(stream=False)
                                    return await client.attend(q, k, v,
                                                               request_id=f"{kind}-{name}",
                                                               **extra, **kw)
                                await call(None)
                                self.assertEqual(draining.metric(
                                    'da_requests_total{code="OK",method="Attend"}'), 1.0)
                                draining.terminate()
                                await asyncio.to_thread(
                                    da_testing.wait_until, lambda: "draining: new calls refused"
                                    in draining.log() or None, 10, "the drain")
                                return dict(zip(shapes, await asyncio.gather(
                                    *(call(name) for name in shapes))))
                        got = asyncio.run(run())
                    self.assertEqual(draining.wait(), 0)
                    for name in shapes:
                        self.assertTrue(np.array_equal(got[name], want), f"{kind} {name}")
                        self.assertGreaterEqual(refused(name), 1, f"{kind} {name}: never "
                                                f"refused, so never sent again:\n"
                                                f"{draining.log()}")
                    self.assertEqual(nxt.metric('da_requests_total{code="OK",method="Attend"}'),
                                     before + 1)

    def test_connections_past_their_age_reach_a_replica_added_since(self):
        # A client that calls without pause keeps its connection, and so its replica, for as
        # long as it lives: behind a load balancer that spreads connections (a forwarder here,
        # whose new connections go to a replica added since), the added replica never sees its
        # calls. With max_connection_age each connection is replaced as it ages, the next goes
        # where the balancer sends it, and a call running on the aged one finishes there, the
        # connection closed after it.
        import asyncio
        import threading
        rng = np.random.default_rng(47)
        q = rng.standard_normal((1, 256, 2, 16)).astype(np.float32)
        kw = dict(segments=[64, 128], dilations=[1, 2], precision="fp32")
        want = self.client.attend(q, q, q, stream=False, **kw)
        shapes = (dict(stream=False), dict(stream=True, block_tokens=64),
                  dict(stream=True, block_tokens=64, parallel_streams=2))

        def wait_closed(port):
            """Whether no connection to port is left within 10 s."""
            try:
                return da_testing.wait_until(lambda: established(port) == 0, 10, "")
            except TimeoutError:
                return False

        with da_testing.Server(ARGS.server_binary, ["--threads", "1"], metrics=True) as first, \
                da_testing.Server(ARGS.server_binary, ["--threads", "1"],
                                  metrics=True) as added, \
                da_testing.Forwarder(first.port) as balancer:
            target = f"127.0.0.1:{balancer.port}"
            for kind, age in itertools.product(("sync", "asyncio"), (None, 0.5)):
                balancer.route = first.port
                # Gone by now: the connections of the client before (closed with it).
                da_testing.wait_until(lambda: established(first.port) == 0 or None, 10,
                                      "the last client's connections to close")
                before = added.answered_ok()
                # Every connection made on the first replica (a call of each shape) and a
                # streamed call held open there by its blocks (its output comes once they are
                # all in: one chunk); then new connections go to the
                # added replica, and calls run for 2 s and whole rounds of the shapes (each
                # connection taken again, past the age, after the last).
                release = threading.Event()
                pieces = []

                def blocks():
                    yield q[:, :128], q[:, :128], q[:, :128]
                    release.wait(30)
                    yield q[:, 128:], q[:, 128:], q[:, 128:]

                async def async_blocks():
                    yield q[:, :128], q[:, :128], q[:, :128]
                    while not release.is_set():
                        await asyncio.sleep(0.01)
                    yield q[:, 128:], q[:, 128:], q[:, 128:]

                def held_on_first():
                    return first.metric("da_in_flight_requests") == 1

                def rounds_over(got, until):
                    return time.monotonic() >= until and len(got) % len(shapes) == 0

                if kind == "sync":
                    with da.Client(target, timeout=60, max_connection_age=age) as client:
                        for shape in shapes:
                            client.attend(q, q, q, **shape, **kw)
                        held = client.attend_blocks(blocks(), seq_len=256, **kw)
                        reader = threading.Thread(
                            target=lambda: pieces.extend(block.output for block in held))
                        reader.start()
                        da_testing.wait_until(held_on_first, 30, "the held call on the first")
                        balancer.route = added.port  # A replica added: new connections go there.
                        got, until = [], time.monotonic() + 2
                        while not rounds_over(got, until):
                            got.append(client.attend(q, q, q, **shapes[len(got) % 3], **kw))
                        still_open = established(first.port)
                        release.set()
                        reader.join(30)
                        renewed = client.connections_renewed
                        closed_after = age is None or wait_closed(first.port)
                else:
                    async def run():
                        async with da.aio.Client(target, timeout=60,
                                                 max_connection_age=age) as client:
                            for shape in shapes:
                                await client.attend(q, q, q, **shape, **kw)
                            held = client.attend_blocks(async_blocks(), seq_len=256, **kw)

                            async def read():
                                async for block in held:
                                    pieces.append(block.output)

                            reader = asyncio.ensure_future(read())
                            while not await asyncio.to_thread(held_on_first):
                                await asyncio.sleep(0.01)
                            balancer.route = added.port
                            got, until = [], time.monotonic() + 2
                            while not rounds_over(got, until):
                                got.append(await client.attend(q, q, q,
                                                               **shapes[len(got) % 3], **kw))
                            still_open = established(first.port)
                            release.set()
                            await reader
                            closed_after = age is None or await asyncio.to_thread(
                                wait_closed, first.port)
                            return got, client.connections_renewed, still_open, closed_after

                    got, renewed, still_open, closed_after = asyncio.run(run())
                label = f"{kind}, max_connection_age {age}"
                self.assertGreaterEqual(len(got), len(shapes), label)
                for output in got:
                    self.assertTrue(np.array_equal(output, want), label)
                self.assertTrue(np.array_equal(np.concatenate(pieces, axis=1), want), label)
                if age is None:
                    self.assertEqual(added.answered_ok(), before, label)
                    self.assertEqual(renewed, 0, label)
                else:
                    # Ages of 0.45-0.5 s, each connection taken again after 2 s: both renewed.
                    self.assertGreater(added.answered_ok(), before, label)
                    self.assertGreaterEqual(renewed, 2, label)
                    # The connections to the first replica were closed as they were replaced,
                    # but for the one the held call still ran on; it closed after the call,
                    # while the client lived on.
                    self.assertEqual(still_open, 1, label)
                    self.assertTrue(closed_after, label)

    def test_a_renewed_tls_connection_needs_no_certificate_file(self):
        # The PEM files are read once, when the client is made: its connections made later
        # (renewed by age here; parallel streams' and retries' alike) do not read them again,
        # so a client made from files since removed (temporary files, a rotated mount) goes on.
        with tempfile.TemporaryDirectory(prefix="da-tls-") as folder:
            subprocess.run(["openssl", "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt",
                            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key",
                            "-out", "server.pem", "-days", "2", "-subj", "/CN=localhost",
                            "-addext", "subjectAltName=DNS:localhost"],
                           cwd=folder, check=True, capture_output=True)
            path = lambda name: os.path.join(folder, name)
            with da_testing.Server(ARGS.server_binary,
                                   ["--threads", "1", "--tls-cert", path("server.pem"),
                                    "--tls-key", path("server.key")]) as server:
                client = da.Client(f"localhost:{server.port}", tls_ca=path("server.pem"),
                                   timeout=60, max_connection_age=0.2)
                with client:
                    self.assertTrue(client.info().version)
                    os.remove(path("server.pem"))
                    time.sleep(0.3)
                    self.assertTrue(client.info().version)
                    self.assertEqual(client.connections_renewed, 1)

    def test_a_retry_goes_on_a_new_connection_past_a_drain_held_open_by_a_long_call(self):
        # A draining server keeps refusing new calls on its connections while a call is still
        # in flight. The client sends a refused call again on a connection of its own, which the
        # load balancer (a forwarder here) sends to a replica that serves: the call is answered
        # while the long one still runs, not once it has ended and the connections closed.
        import asyncio
        import threading
        rng = np.random.default_rng(43)
        small = rng.standard_normal((1, 256, 2, 16)).astype(np.float32)
        kw = dict(segments=[64, 128], dilations=[1, 2], precision="fp32", stream=False)
        # One dense segment of 65536 tokens: 0.55 TFLOP, about 10 s on two cores; cancelled
        # once the check is made.
        long_q = rng.standard_normal((1, 65536, 1, 32)).astype(np.float32)
        want = self.client.attend(small, small, small, **kw)
        with da_testing.Server(ARGS.server_binary, ["--threads", "2"]) as nxt:
            for kind in ("sync", "asyncio"):
                with da_testing.Server(ARGS.server_binary, ["--threads", "2",
                                                            "--drain-timeout-ms", "120000"],
                                       metrics=True) as draining, \
                        da_testing.Forwarder(draining.port) as balancer, \
                        da.Client(f"127.0.0.1:{balancer.port}") as client:
                    long_call = {}

                    def run_long():
                        # No deadline: a slow machine (or a sanitizer build) must not have the
                        # server refuse it up front for one.
                        try:
                            client.attend(long_q, long_q, long_q, segments=[65536],
                                          dilations=[1], stream=False)
                        except da.Error as error:
                            long_call["error"] = error

                    long_thread = threading.Thread(target=run_long)

                    def start_long_call_and_drain():
                        long_thread.start()
                        da_testing.wait_until(
                            lambda: draining.metric("da_in_flight_requests") == 1, 60,
                            "the long call in flight")
                        draining.terminate()
                        da_testing.wait_until(lambda: "draining: new calls refused" in
                                              draining.log() or None, 10, "the drain")
                        balancer.route = nxt.port  # The draining replica is no longer ready.

                    if kind == "sync":
                        start_long_call_and_drain()
                        got = client.attend(small, small, small, request_id=f"{kind}-small",
                                            timeout=60, **kw)
                    else:
                        async def run():
                            async with da.aio.Client(f"127.0.0.1:{balancer.port}",
                                                     timeout=60) as aio_client:
                                await aio_client.info()  # Connected to the draining replica.
                                start_long_call_and_drain()
                                return await aio_client.attend(
                                    small, small, small, request_id=f"{kind}-small", **kw)

                        got = asyncio.run(run())
                    self.assertTrue(long_thread.is_alive(), f"{kind}: the long call ended "
                                    f"first, so this proves nothing")
                    self.assertTrue(np.array_equal(got, want), kind)
                    self.assertIn(f"request id={kind}-small method=Attend shape=- "
                                  f"code=UNAVAILABLE", draining.log())
                    client.close()  # Cancels the long call; the drain then ends.
                    long_thread.join()
                    self.assertIsInstance(long_call.get("error"), da.Cancelled)
                    self.assertEqual(draining.wait(), 0)

    def test_asyncio_client_runs_many_requests_from_one_loop(self):
        import asyncio
        rng = np.random.default_rng(14)
        inputs = [rng.standard_normal((1, 120, 4, 16)).astype(np.float32) for _ in range(6)]
        kw = dict(segments=[32, 64], dilations=[1, 2], precision="fp32")

        async def run():
            async with da.aio.Client(self.server.address, timeout=60) as client:
                self.assertEqual(await client.health("da.v1.AttentionService"), "SERVING")
                # The stub's calls (da/_stub.py) on a grpc.aio channel.
                self.assertEqual((await client.info()).devices[0].id, "cpu:0")
                self.assertEqual(len((await client.warm_up([dict(
                    shape=(1, 120, 4, 16), segments=[32, 64], dilations=[1, 2],
                    precision="fp32")])).results), 1)
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

    def test_progress_counts_every_byte_each_way_on_the_calling_thread(self):
        import asyncio
        import threading
        rng = np.random.default_rng(15)
        # 16,384 tokens: 4 chunks of the server's default 4,096, each answered by itself.
        q = rng.standard_normal((2, 16384, 2, 16)).astype(np.float32)
        kv = rng.standard_normal((2, 16384, 1, 16)).astype(np.float32)
        kw = dict(segments=[32], dilations=[2], precision="fp32")
        to_send, to_receive = q.nbytes + 2 * kv.nbytes, q.nbytes
        for stream in (True, False):
            with self.subTest(stream=stream):
                calls, threads = [], set()

                def progress(*counts):
                    calls.append(counts)
                    threads.add(threading.get_ident())

                out = self.client.attend(q, kv, kv, stream=stream, block_tokens=1024,
                                         progress=progress, **kw)
                self.assertTrue(np.array_equal(out, self.client.attend(q, kv, kv, **kw)))
                self.assertEqual(calls[-1], (to_send, to_send, to_receive, to_receive))
                self.assertEqual(threads, {threading.get_ident()})
                for before, after in zip(calls, calls[1:]):  # Never backwards.
                    self.assertTrue(all(a <= b for a, b in zip(before, after)), calls)
                if stream:  # A call per output block: at least one per chunk.
                    self.assertGreaterEqual(len(calls), 4, calls)
                    self.assertLess(calls[0][2], to_receive)
                else:
                    self.assertEqual(len(calls), 1)

        async def run():
            calls = []
            async with da.aio.Client(self.server.address, timeout=60) as client:
                await client.attend(q, kv, kv, stream=True, block_tokens=1024,
                                    progress=lambda *c: calls.append(c), **kw)
            return calls

        calls = asyncio.run(run())
        self.assertGreaterEqual(len(calls), 4)
        self.assertEqual(calls[-1], (to_send, to_send, to_receive, to_receive))

    def test_health_info_and_the_token(self):
        self.assertEqual(self.client.health(), "SERVING")
        self.assertEqual(self.client.health("da.v1.AttentionService"), "SERVING")
        info = self.client.info()
        self.assertTrue(info.version)
        self.assertEqual(info.devices[0].id, "cpu:0")
        with tempfile.NamedTemporaryFile("w", suffix=".tokens") as tokens:
            tokens.write("s3cret-token max_priority=3\nplain-token\n")
            tokens.flush()
            with da_testing.Server(ARGS.server_binary,
                                   ["--threads", "1", "--auth-token-file", tokens.name,
                                    "--max-priority", "0"]) as guarded:
                q = np.ones((1, 32, 2, 8), np.float32)
                with self.assertRaises(da.Unauthenticated):
                    da.Client(guarded.address).attend(q, q, q, segments=[16], dilations=[1],
                                                      stream=False)
                client = da.Client(guarded.address, token="s3cret-token")
                out = client.attend(q, q, q, segments=[16], dilations=[1], stream=False,
                                    priority=3)
                self.assertEqual(out.shape, q.shape)
                self.assertEqual(client.info().limits.max_priority, 3)
                # Above the token's cap, unary or streamed: refused, naming the cap.
                for stream in (False, True):
                    with self.assertRaisesRegex(da.PermissionDenied, "priority 4 is above 3"):
                        client.attend(q, q, q, segments=[16], dilations=[1], stream=stream,
                                      priority=4)
                plain = da.Client(guarded.address, token="plain-token")
                self.assertEqual(plain.info().limits.max_priority, 0)
                with self.assertRaisesRegex(da.PermissionDenied, r"\(--max-priority\)"):
                    plain.attend(q, q, q, segments=[16], dilations=[1], stream=False,
                                 priority=1)

    def test_tensor_bytes_framed_by_hand_equal_protobufs_encoding(self):
        rng = np.random.default_rng(21)
        q = rng.standard_normal((2, 9, 4, 8)).astype(ml_dtypes.bfloat16)
        k = rng.standard_normal((2, 9, 2, 8)).astype(ml_dtypes.bfloat16)
        spec = _client._spec([4, 8], [1, 2], True, "grouped", "fp32", 0.25)
        job = _client._Attend(q, k, k, None, spec, "request-7", -3)

        def tensor(a):
            return pb.Tensor(dtype=pb.DTYPE_BF16, shape=a.shape, data=a.tobytes())

        want = pb.AttendRequest(request_id="request-7", spec=spec, query=tensor(q),
                                key=tensor(k), value=tensor(k), priority=-3)
        self.assertEqual(job.unary_request(), want.SerializeToString())
        messages = list(job.stream_requests(1 << 20, 4))
        self.assertEqual(len(messages), 1 + 3)  # The header and blocks of 4, 4 and 1 tokens.
        for i, message in enumerate(messages):
            parsed = pb.AttendStreamRequest.FromString(message)
            self.assertEqual(parsed.SerializeToString(), message)
            if i > 0:
                start = 4 * (i - 1)
                self.assertEqual(parsed.block.token_start, start)
                self.assertEqual(parsed.block.query, q[:, start:start + 4].tobytes())
                self.assertEqual(parsed.block.value, k[:, start:start + 4].tobytes())
        # Answers read by hand as protobuf wrote them.
        out = rng.standard_normal(q.shape).astype(ml_dtypes.bfloat16)
        info = pb.ExecutionInfo(request_id="request-7", compute_time_us=12)
        job.take_unary_response(pb.AttendResponse(output=tensor(out),
                                                  info=info).SerializeToString())
        result = job.result(return_info=True)
        self.assertTrue(np.array_equal(result.output.view(np.uint16), out.view(np.uint16)))
        self.assertEqual(result.info, info)
        job = _client._Attend(q, k, k, None, spec, "", 0)
        for start, count in ((0, 5), (5, 4)):
            job.take_stream_message(pb.AttendStreamResponse(block=pb.OutputBlock(
                token_start=start, token_count=count,
                output=out[:, start:start + count].tobytes())).SerializeToString())
        job.take_stream_message(pb.AttendStreamResponse(
            trailer=pb.StreamTrailer(info=info)).SerializeToString())
        self.assertTrue(np.array_equal(job.result(False).view(np.uint16), out.view(np.uint16)))

    def test_torch_tensors_of_every_dtype_match_the_reference(self):
        generator = torch.Generator().manual_seed(22)
        cases = [  # (mode, causal, kv_heads, seq_len, segments, dilations)
            ("grouped", True, 2, 90, [16, 64], [1, 4]),
            ("longnet", False, 4, 77, [32, 24], [2, 3]),  # Partial last segments.
        ]
        for dtype, tolerance in ((torch.float32, "fp32"), (torch.float16, "fp16"),
                                 (torch.bfloat16, "bf16")):
            for mode, causal, kv_heads, seq_len, segments, dilations in cases:
                with self.subTest(dtype=str(dtype), mode=mode):
                    q = torch.randn(2, seq_len, 4, 16, generator=generator).to(dtype)
                    k = torch.randn(2, seq_len, kv_heads, 16, generator=generator).to(dtype)
                    v = torch.randn(2, seq_len, kv_heads, 16, generator=generator).to(dtype)
                    kw = dict(segments=segments, dilations=dilations, causal=causal, mode=mode,
                              precision="fp32")
                    unary = self.client.attend(q, k, v, stream=False, **kw)
                    streamed = self.client.attend(q, k, v, stream=True, block_tokens=11, **kw)
                    self.assertIsInstance(unary, torch.Tensor)
                    self.assertEqual((unary.dtype, unary.device, unary.shape),
                                     (dtype, q.device, q.shape))
                    self.assertTrue(torch.equal(unary.view(torch.int16) if dtype ==
                                                torch.bfloat16 else unary,
                                                streamed.view(torch.int16) if dtype ==
                                                torch.bfloat16 else streamed))
                    want = reference(*(t.float().numpy() for t in (q, k, v)), segments,
                                     dilations, causal=causal,
                                     mode=ref.GROUPED if mode == "grouped" else ref.LONGNET)
                    da_testing.assert_close(unary.float().numpy(), want, tolerance, str(dtype))

    def test_outputs_land_in_the_callers_array(self):
        rng = np.random.default_rng(23)
        q = rng.standard_normal((2, 64, 2, 16)).astype(np.float16)
        kw = dict(segments=[32], dilations=[2], precision="fp32")
        want = self.client.attend(q, q, q, **kw)
        for stream in (False, True):
            with self.subTest(stream=stream):
                out = np.full(q.shape, np.nan, np.float16)
                got = self.client.attend(q, q, q, out=out, stream=stream, block_tokens=20, **kw)
                self.assertIs(got, out)
                self.assertTrue(np.array_equal(out, want))
                tq = torch.from_numpy(q)
                tout = torch.full(q.shape, float("nan"), dtype=torch.float16)
                got = self.client.attend(tq, tq, tq, out=tout, stream=stream, **kw)
                self.assertIs(got, tout)
                self.assertTrue(np.array_equal(tout.numpy(), want))
        # An out with strides of its own (a slice of a wider buffer) is filled in place too.
        for stream in (False, True):
            with self.subTest(stream=stream, out="strided"):
                wide = np.full((2, 96, 2, 16), np.nan, np.float16)
                out = wide[:, 16:80]
                got = self.client.attend(q, q, q, out=out, stream=stream, block_tokens=20, **kw)
                self.assertIs(got, out)
                self.assertTrue(np.array_equal(wide[:, 16:80], want))
                self.assertTrue(np.isnan(wide[:, :16]).all() and np.isnan(wide[:, 80:]).all())
        with self.assertRaises(da.InvalidArgument) as caught:
            self.client.attend(q, q, q, out=np.empty(q.shape, np.float32), **kw)
        self.assertIn("expected the query's shape [2, 64, 2, 16] and the output's dtype float16",
                      str(caught.exception))
        # An out that requires grad: refused as inputs are, written in place under no_grad.
        tq = torch.from_numpy(q)
        tout = torch.zeros(q.shape, dtype=torch.float16, requires_grad=True)
        with self.assertRaises(da.InvalidArgument) as caught:
            self.client.attend(tq, tq, tq, out=tout, **kw)
        self.assertIn("out requires grad", str(caught.exception))
        with torch.no_grad():
            self.assertIs(self.client.attend(tq, tq, tq, out=tout, **kw), tout)
        self.assertTrue(np.array_equal(tout.detach().numpy(), want))

    def test_a_96_mib_request_streams_by_itself(self):
        # 16,384 x 8 x 64 fp32: q, k and v are 96 MiB, past the default 64 MiB message.
        rng = np.random.default_rng(24)
        q, k, v = (rng.standard_normal((1, 16384, 8, 64), dtype=np.float32) for _ in range(3))
        result = self.client.attend(q, k, v, segments=[256], dilations=[4], precision="fp32",
                                    return_info=True, timeout=300)
        self.assertGreater(result.info.stream_chunks, 1, "the call was not streamed")
        # Segments are independent: the first and last 1024 tokens are problems of their own.
        for rows in (slice(0, 1024), slice(16384 - 1024, 16384)):
            want = reference(q[:, rows], k[:, rows], v[:, rows], [256], [4])
            da_testing.assert_close(result.output[:, rows], want, "fp32", f"rows {rows}")

    def test_parallel_streams_give_the_bytes_of_one_stream_and_of_unary(self):
        import asyncio
        rng = np.random.default_rng(31)
        cases = [  # (mode, causal, kv_heads, seq_len, segments, dilations): lcm 64, 8 chunks.
            ("longnet", True, 2, 500, [32, 64], [1, 2]),  # GQA; a partial last chunk.
            ("grouped", False, 4, 512, [16, 64], [2, 4]),
        ]
        for (dtype, tolerance), (mode, causal, kv_heads, seq_len, segments, dilations) in (
                itertools.product(((np.float32, "fp32"), (ml_dtypes.bfloat16, "bf16")), cases)):
            q, k, v = random_qkv(rng, seq_len, kv_heads, dtype)
            kw = dict(segments=segments, dilations=dilations, causal=causal, mode=mode,
                      precision="fp32")
            unary = self.client.attend(q, k, v, stream=False, **kw)
            one = self.client.attend(q, k, v, stream=True, block_tokens=40, **kw)
            self.assertTrue(np.array_equal(unary.view(np.uint8), one.view(np.uint8)))
            da_testing.assert_close(unary, reference(
                q, k, v, segments, dilations, causal=causal,
                mode=ref.GROUPED if mode == "grouped" else ref.LONGNET), tolerance, mode)
            for parts in (1, 2, 3, 4):
                with self.subTest(dtype=np.dtype(dtype).name, mode=mode, parallel_streams=parts):
                    calls = []
                    out = np.full(q.shape, np.nan, dtype)
                    got = self.client.attend(q, k, v, stream=True, block_tokens=40,
                                             parallel_streams=parts, out=out, request_id="pp",
                                             return_info=True, progress=lambda *c: calls.append(c),
                                             **kw)
                    self.assertIs(got.output, out)
                    self.assertTrue(np.array_equal(out.view(np.uint8), one.view(np.uint8)))
                    # Each part a request of its own on the server.
                    ids = ["pp"] if parts == 1 else [f"pp/{i + 1}" for i in range(parts)]
                    self.assertEqual(got.info.request_id.split(","), ids)
                    self.assertGreaterEqual(got.info.stream_chunks, parts)  # Summed.
                    to_send = q.nbytes + k.nbytes + v.nbytes
                    self.assertEqual(calls[-1], (to_send, to_send, q.nbytes, q.nbytes))

        q = rng.standard_normal((1, 640, 2, 16)).astype(np.float32)
        kw = dict(segments=[64, 128], dilations=[1, 2], precision="fp32", stream=True)
        want = self.client.attend(q, q, q, **kw)

        async def run():
            async with da.aio.Client(self.server.address, timeout=60) as client:
                return await asyncio.gather(*(
                    client.attend(q, q, q, parallel_streams=parts, return_info=True, **kw)
                    for parts in (2, 3, 5)))

        for parts, got in zip((2, 3, 5), asyncio.run(run())):
            self.assertTrue(np.array_equal(got.output, want), parts)
            self.assertEqual(len(got.info.request_id.split(",")), parts)

    def test_asyncio_streams_refused_at_their_header_keep_the_servers_status(self):
        # grpc.aio reports a write that fails because the server ended the call as INTERNAL
        # "Internal error from Core" (grpc/grpc#36066); the client sends blocks only once the
        # server has admitted the header, so a refusal keeps its code and message.
        import asyncio
        q = np.random.default_rng(34).standard_normal((1, 16384, 4, 32)).astype(np.float32)
        kw = dict(segments=[8192], dilations=[1], precision="fp32")
        with da_testing.Server(ARGS.server_binary,
                               ["--threads", "2", "--max-tokens", "12000"]) as server:
            async def run():
                async with da.aio.Client(server.address, timeout=60) as client:
                    for _ in range(5):
                        with self.assertRaises(da.ResourceExhausted) as caught:
                            await client.attend(q, q, q, stream=True, block_tokens=256, **kw)
                        self.assertIn("limit is 12000", caught.exception.message)
                        with self.assertRaises(da.ResourceExhausted) as caught:
                            async for _ in client.attend_blocks(
                                    ((q[:, i:i + 4096],) * 3 for i in range(0, 16384, 4096)),
                                    seq_len=16384, **kw):
                                pass
                        self.assertIn("limit is 12000", caught.exception.message)
                    # An admitted stream still streams (its blocks follow the admission).
                    small = q[:, :8192]
                    got = await client.attend(small, small, small, stream=True, **kw)
                    self.assertTrue(np.array_equal(got, await client.attend(
                        small, small, small, stream=False, **kw)))

            asyncio.run(run())

    def test_asyncio_streams_whose_deadline_passes_mid_transfer_say_so(self):
        # A deadline that passes while a block is being written ends the call with a failed
        # write, which grpc.aio reports as INTERNAL "Internal error from Core" (grpc/grpc#36066;
        # 7 of 8 such streams before da.aio kept the deadline). 1 GiB to move in 0.25 s: the
        # transfer, not the (near-zero) compute, outlasts the deadline.
        import asyncio
        q = np.random.default_rng(35).standard_normal((1, 262144, 4, 64)).astype(np.float32)
        kw = dict(segments=[16], dilations=[16], mode="grouped", precision="fp32")

        async def run():
            async with da.aio.Client(self.server.address, timeout=60) as client:
                for parts in (1, 1, 1, 2, 2):
                    with self.assertRaises(da.DeadlineExceeded, msg=f"{parts} streams"):
                        await client.attend(q, q, q, stream=True, block_tokens=8192,
                                            parallel_streams=parts, timeout=0.25, **kw)
                for _ in range(3):
                    with self.assertRaises(da.DeadlineExceeded, msg="attend_blocks"):
                        async for _ in client.attend_blocks(
                                ((q[:, i:i + 8192],) * 3 for i in range(0, 262144, 8192)),
                                seq_len=262144, timeout=0.25, **kw):
                            pass

        asyncio.run(run())

    def test_asyncio_streams_the_server_ends_mid_transfer_keep_its_status(self):
        # A stream the server ends while a block is being written: grpc.aio reports the failed
        # write as INTERNAL "Internal error from Core" (grpc/grpc#36066) whether or not the
        # server's status came first; before da.aio kept it, 4 of 4 idle streams and 3 of 6
        # drained ones ended so. A drained server's UNAVAILABLE is what tells a caller to retry.
        import asyncio
        import signal
        q = np.random.default_rng(36).standard_normal((1, 262144, 4, 64)).astype(np.float32)
        kw = dict(segments=[16], dilations=[16], mode="grouped", precision="fp32")

        def blocks():
            # A producer that blocks the event loop past the idle limit before its first block:
            # the client then reads nothing either, so the stall comes before any answer is due.
            # Stalled later (at token 65536, as before), a server whose answer write was in flight
            # ended the call as a client that reads nothing, which gRPC reports as CANCELLED
            # "Cancelled on the server side" (a CI run).
            time.sleep(0.6)
            for i in range(0, 262144, 8192):
                yield (q[:, i:i + 8192],) * 3

        async def idle(server):
            async with da.aio.Client(server.address, timeout=60) as client:
                for _ in range(3):
                    with self.assertRaises(da.DeadlineExceeded) as caught:
                        async for _ in client.attend_blocks(blocks(), seq_len=262144, **kw):
                            pass
                    self.assertIn("stream idle: no message from the client", str(caught.exception))

        with da_testing.Server(ARGS.server_binary, ["--stream-idle-timeout-ms", "300"]) as server:
            asyncio.run(idle(server))

        async def drained(server, parts):
            signalled = []

            def stop_server(sent, to_send, received, to_receive):
                if not signalled and sent >= to_send // 4:  # Three quarters still to write.
                    signalled.append(server.process.send_signal(signal.SIGTERM))

            async with da.aio.Client(server.address, timeout=60) as client:
                with self.assertRaises(da.Unavailable, msg=f"{parts} streams") as caught:
                    await client.attend(q, q, q, stream=True, block_tokens=8192,
                                        parallel_streams=parts, progress=stop_server, **kw)
                self.assertEqual(len(signalled), 1)
                return str(caught.exception)

        for parts in (1, 1, 2, 2):
            # No time for calls in flight: the server cancels them as it stops.
            with da_testing.Server(ARGS.server_binary, ["--drain-timeout-ms", "0"]) as server:
                self.assertIn("UNAVAILABLE", asyncio.run(drained(server, parts)))
                self.assertEqual(server.stop(), 0)

    def test_retry_sends_again_only_what_the_server_neither_read_nor_computed(self):
        class Failed(grpc.RpcError):
            def __init__(self, code, details, trailing=(), initial=()):
                self._status = (code, details, trailing, initial)

            def code(self):
                return self._status[0]

            def details(self):
                return self._status[1]

            def trailing_metadata(self):
                return self._status[2]

            def initial_metadata(self):
                return self._status[3]

        codes = grpc.StatusCode
        refusal = Failed(codes.UNAVAILABLE, "draining: ...", (("da-refused", "draining"),))
        self.assertTrue(_client._refused_unread(refusal))
        # A server's gRPC that dropped the call unstarted as it shut down (grpc/grpc#41785).
        self.assertTrue(_client._refused_unread(Failed(codes.CANCELLED, "CANCELLED")))
        for other in (Failed(codes.UNAVAILABLE, "Connection reset by peer"),  # May be a crash.
                      Failed(codes.CANCELLED, "Locally cancelled by application!"),
                      Failed(codes.CANCELLED, "Cancelled on the server side"),
                      Failed(codes.CANCELLED, "CANCELLED", (("x", "1"),)),
                      Failed(codes.CANCELLED, "CANCELLED", (), (("x", "1"),)),
                      Failed(codes.RESOURCE_EXHAUSTED, "queue full",
                             (("da-refused", "draining"),))):
            self.assertFalse(_client._refused_unread(other), other.details())

        # Waits of 0.25 s doubling to 2 s, each between half and all of it.
        retry = da.Retry()
        for attempt, full in ((2, 0.25), (3, 0.5), (4, 1.0), (5, 2.0), (9, 2.0)):
            waits = [retry.wait(attempt) for _ in range(200)]
            self.assertGreaterEqual(min(waits), full / 2)
            self.assertLessEqual(max(waits), full)
            self.assertGreater(max(waits) - min(waits), full / 4)
        # Attempts end at their count, and before the deadline, and say how many were made.
        calls = []

        def refused(timeout):
            calls.append(timeout)
            raise refusal

        attempts = _client._Attempts(da.Retry(attempts=3, backoff=0.01, max_backoff=0.01), None)
        with self.assertRaises(grpc.RpcError) as caught:
            _client._retrying(attempts, refused)
        self.assertEqual(len(calls), 3)
        self.assertRegex(caught.exception.details(), r"^draining: \.\.\. \(refused 3 times over "
                                                     r"\d+ ms\)$")
        calls.clear()
        start = time.monotonic()
        attempts = _client._Attempts(da.Retry(attempts=1000, backoff=0.1, max_backoff=0.1),
                                     time.monotonic() + 0.4)
        with self.assertRaises(grpc.RpcError):
            _client._retrying(attempts, refused)
        self.assertLess(time.monotonic() - start, 0.4)
        self.assertTrue(3 <= len(calls) <= 8, len(calls))
        self.assertTrue(all(0 < left <= 0.4 for left in calls), calls)  # What is left of it.
        # Some of the answer taken: never again.
        calls.clear()
        with self.assertRaises(grpc.RpcError):
            _client._retrying(_client._Attempts(da.Retry(), None), refused, lambda: True)
        self.assertEqual(len(calls), 1)

        for bad in (dict(attempts=0), dict(attempts=1.5), dict(backoff=-1),
                    dict(max_backoff="1")):
            with self.assertRaises(da.InvalidArgument):
                da.Retry(**bad)
        with self.assertRaises(da.InvalidArgument):
            da.Client("127.0.0.1:1", retry=3)

    def test_parallel_streams_cut_only_where_no_segment_crosses(self):
        self.assertEqual(_client._chunk_tokens([2048, 4096, 8192], 65536), 8192)
        self.assertEqual(_client._chunk_tokens([12, 56, 24], 200), 168)
        self.assertEqual(_client._chunk_tokens([16, 400], 200), 200)  # w > N: no cut.
        self.assertEqual(_client._chunk_tokens([3, 5, 7, 11, 13], 10000), 10000)
        self.assertEqual(_client._cut_parts([16, 32], 200, 2), [(0, 96), (96, 200)])
        self.assertEqual(_client._cut_parts([16, 32], 200, 3), [(0, 64), (64, 128), (128, 200)])
        self.assertEqual(len(_client._cut_parts([16, 32], 200, 100)), 7)  # One per chunk.
        for parts in range(1, 10):
            cuts = _client._cut_parts([12, 56, 24], 1000, parts)
            self.assertEqual([b for b, _ in cuts[1:]], [e for _, e in cuts[:-1]])
            self.assertEqual((cuts[0][0], cuts[-1][1]), (0, 1000))
            self.assertTrue(all(b % 168 == 0 and e > b for b, e in cuts))
        # A segment as long as the sequence: four streams asked for are one call, its own id.
        rng = np.random.default_rng(32)
        q = rng.standard_normal((1, 96, 2, 16)).astype(np.float32)
        kw = dict(segments=[16, 96], dilations=[1, 4], precision="fp32")
        got = self.client.attend(q, q, q, stream=True, parallel_streams=4, request_id="whole",
                                 return_info=True, **kw)
        self.assertEqual(got.info.request_id, "whole")
        self.assertTrue(np.array_equal(got.output, self.client.attend(q, q, q, **kw)))
        # 0 chooses from the size: a small request goes as one stream.
        got = self.client.attend(q, q, q, stream=True, parallel_streams=0, return_info=True,
                                 segments=[16], dilations=[1], precision="fp32")
        self.assertNotIn(",", got.info.request_id)
        got = self.client.attend(q, q, q, stream=True, parallel_streams=np.int64(4),
                                 request_id="np", return_info=True, segments=[16],
                                 dilations=[1], precision="fp32")
        self.assertEqual(got.info.request_id, "np/1,np/2,np/3,np/4")
        for bad in (-1, 65, 1.5, True, np.True_, "2"):
            with self.subTest(parallel_streams=bad):
                with self.assertRaises(da.InvalidArgument) as caught:
                    self.client.attend(q, q, q, parallel_streams=bad, **kw)
                self.assertIn("parallel_streams", str(caught.exception))

    def test_one_part_failing_fails_the_call_and_cancels_the_others(self):
        # At most 12000 tokens per request: of 3 chunks of 8192 cut into 2 parts, the first (one
        # chunk, a dense segment of 8192: a second or more of compute) is taken, the second (two
        # chunks) refused at once.
        with da_testing.Server(ARGS.server_binary, ["--threads", "2", "--max-tokens", "12000"],
                               metrics=True) as server:
            rng = np.random.default_rng(33)
            q = rng.standard_normal((1, 3 * 8192, 4, 32)).astype(np.float32)
            for aio in (False, True):
                with self.subTest(aio=aio):
                    kw = dict(segments=[8192], dilations=[1], precision="fp32", stream=True,
                              parallel_streams=2)
                    with self.assertRaises(da.Error) as caught:
                        if aio:
                            import asyncio

                            async def run():
                                async with da.aio.Client(server.address, timeout=60) as client:
                                    await client.attend(q, q, q, **kw)

                            asyncio.run(run())
                        else:
                            with da.Client(server.address, timeout=60) as client:
                                client.attend(q, q, q, **kw)
                    self.assertNotEqual(caught.exception.code, grpc_code("CANCELLED"))
                    self.assertTrue(caught.exception.message.startswith(
                        "part 2 of 2 (tokens 8192..24576): "), caught.exception.message)
                    self.assertIn("12000", caught.exception.message)
            # Each time the first part ended as cancelled on the server, not computed through.
            cancelled = 'da_requests_total{code="CANCELLED",method="AttendStream"}'
            da_testing.wait_until(lambda: server.metric(cancelled) == 2, 10,
                                  f"two cancelled parts ({server.metric(cancelled)})")
            self.assertEqual(server.metric('da_requests_total{code="OK",method="AttendStream"}'),
                             0)

    def test_the_block_iterator_streams_a_sequence_never_held_whole(self):
        batch, heads, kv_heads, head_dim, block, blocks = 1, 4, 2, 32, 2048, 48
        seq_len = block * blocks  # 24 MiB of q, k and v in all, 0.5 MiB a block.
        kw = dict(segments=[512, 1024], dilations=[1, 2], causal=True, precision="fp32")
        produced = []  # Tokens produced when each output block arrived.
        state = {"produced": 0}

        def make(i):
            rng = np.random.default_rng(1000 + i)
            return (rng.standard_normal((batch, block, heads, head_dim), dtype=np.float32),
                    rng.standard_normal((batch, block, kv_heads, head_dim), dtype=np.float32),
                    rng.standard_normal((batch, block, kv_heads, head_dim), dtype=np.float32))

        def generate():
            for i in range(blocks):
                yield make(i)
                state["produced"] += block

        stream = self.client.attend_blocks(generate(), seq_len=seq_len, **kw)
        outputs = {}
        for out in stream:
            produced.append(state["produced"])
            self.assertEqual(out.output.shape[::2], (batch, head_dim)[:1] + (heads,))
            outputs[out.token_start] = out.output
        self.assertIsNotNone(stream.info)
        self.assertGreater(stream.info.stream_chunks, 1)
        # The first output came back long before the generator had produced everything.
        self.assertLess(produced[0], seq_len // 2, f"tokens produced at each output: {produced}")
        starts = sorted(outputs)
        self.assertEqual(sum(outputs[s].shape[1] for s in starts), seq_len)
        # Check two windows of whole segments against the reference.
        for first in (0, blocks - 2):
            q, k, v = (np.concatenate(parts, axis=1) for parts in zip(make(first),
                                                                       make(first + 1)))
            got = np.concatenate([outputs[s] for s in starts], axis=1)
            rows = slice(first * block, (first + 2) * block)
            want = reference(q, k, v, [512, 1024], [1, 2], causal=True)
            da_testing.assert_close(got[:, rows], want, "fp32", f"blocks {first}, {first + 1}")

    def test_the_block_iterator_refuses_bad_blocks_and_passes_the_callers_errors_on(self):
        x = np.ones((1, 16, 2, 8), np.float32)
        kw = dict(segments=[8], dilations=[1])
        with self.assertRaises(da.InvalidArgument) as caught:
            wide = np.ones((1, 16, 4, 8), np.float32)
            list(self.client.attend_blocks([(x, x, x), (wide, x, x)], seq_len=32, **kw))
        self.assertIn("the block at token 16 has query shape [1, 16, 4, 8]",
                      str(caught.exception))
        with self.assertRaises(da.InvalidArgument) as caught:
            list(self.client.attend_blocks([(x, x, x)], seq_len=32, **kw))
        self.assertIn("ended after 16 of seq_len 32 tokens", str(caught.exception))

        class Broken(Exception):
            pass

        def failing():
            yield x, x, x
            raise Broken("the producer failed")

        with self.assertRaises(Broken):
            list(self.client.attend_blocks(failing(), seq_len=32, **kw))
        # Leaving early cancels the call; the server is still there for the next.
        stream = self.client.attend_blocks(((x, x, x) for _ in range(64)), seq_len=1024, **kw)
        for _ in stream:
            break
        stream.close()
        self.assertEqual(self.client.health("da.v1.AttentionService"), "SERVING")

    def test_an_output_dtype_of_its_own_keeps_the_compute_unrounded(self):
        import asyncio
        # bf16 inputs answered in fp32 equal the same inputs sent widened to fp32 (bf16 widens
        # exactly), unary, streamed and in parallel parts, numpy and torch; out= takes the
        # output's dtype; a warm-up names it; a dtype that is none is refused before sending.
        rng = np.random.default_rng(23)
        q = rng.standard_normal((1, 512, 4, 16)).astype(ml_dtypes.bfloat16)
        k = rng.standard_normal((1, 512, 2, 16)).astype(ml_dtypes.bfloat16)
        v = rng.standard_normal((1, 512, 2, 16)).astype(ml_dtypes.bfloat16)
        kw = dict(segments=[128, 256], dilations=[1, 2], precision="fp32")
        want = self.client.attend(*(t.astype(np.float32) for t in (q, k, v)), **kw)
        shapes = (dict(stream=False), dict(stream=True, block_tokens=50),
                  dict(stream=True, block_tokens=50, parallel_streams=2))
        for shape in shapes:
            with self.subTest(**shape):
                got = self.client.attend(q, k, v, out_dtype="float32", **shape, **kw)
                self.assertEqual((got.dtype, got.shape), (np.float32, q.shape))
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
                half = self.client.attend(q, k, v, out_dtype=np.float16, **shape, **kw)
                self.assertEqual(half.dtype, np.float16)
                np.testing.assert_allclose(half.astype(np.float32), want, rtol=1e-3, atol=1e-3)
        out = np.empty(q.shape, np.float32)
        self.assertIs(self.client.attend(q, k, v, out=out, out_dtype="float32", **kw), out)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
        with self.assertRaises(da.InvalidArgument) as caught:
            self.client.attend(q, k, v, out=np.empty(q.shape, np.float32), **kw)
        self.assertIn("and the output's dtype bfloat16", str(caught.exception))
        tq, tk, tv = (torch.from_numpy(t.astype(np.float32)).bfloat16() for t in (q, k, v))
        got = self.client.attend(tq, tk, tv, out_dtype=torch.float32, stream=True, **kw)
        self.assertEqual((got.dtype, tuple(got.shape)), (torch.float32, q.shape))
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
        fp32 = np.float32(want)
        back = self.client.attend(*(t.astype(np.float32) for t in (q, k, v)),
                                  out_dtype="bfloat16", **kw)
        self.assertEqual(back.dtype, ml_dtypes.bfloat16)
        np.testing.assert_allclose(back.astype(np.float32), fp32, rtol=1 / 128, atol=1e-3)

        async def in_asyncio():
            async with da.aio.Client(self.server.address, timeout=60) as client:
                return [await client.attend(q, k, v, out_dtype="float32", **shape, **kw)
                        for shape in shapes]

        for got in asyncio.run(in_asyncio()):
            self.assertEqual(got.dtype, np.float32)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

        # A shape no call above had (384 tokens): its plan is the warm-up's.
        shape = dict(shape=(1, 384, 4, 16), kv_heads=2, dtype="bfloat16", out_dtype="float32",
                     **kw)
        warmed = self.client.warm_up([shape])
        self.assertFalse(warmed.results[0].already_warm)
        self.assertIn("bf16->fp32", warmed.results[0].plan_key)
        result = self.client.attend(q[:, :384], k[:, :384], v[:, :384], out_dtype="float32",
                                    stream=False, return_info=True, **kw)
        self.assertTrue(result.plan_cache_hit)
        for bad in ("float64", np.int8):
            with self.assertRaises(da.InvalidArgument) as caught:
                self.client.attend(q, k, v, out_dtype=bad, **kw)
            self.assertIn("is not float32, float16 or bfloat16", str(caught.exception))

        # An answer in another dtype than the one asked for (a server older than output_dtype
        # answers in the inputs'), unary or streamed, is refused rather than misread.
        spec = _client._spec([128, 256], [1, 2], False, "longnet", "fp32", None)
        job = _client._Attend(q, k, v, None, spec, "", 0, out_dtype="float16")
        answer = pb.AttendResponse(output=pb.Tensor(dtype=pb.DTYPE_BF16, shape=q.shape,
                                                    data=q.tobytes()))
        with self.assertRaises(da.Error) as caught:
            job.take_unary_response(answer.SerializeToString())
        self.assertIn("the answer is DTYPE_BF16, not the DTYPE_FP16 asked for",
                      str(caught.exception))
        header = pb.AttendStreamResponse(header=pb.StreamResponseHeader(
            dtype=pb.DTYPE_BF16, shape=q.shape))
        with self.assertRaises(da.Error) as caught:
            job.parts[0].take_message(header.SerializeToString())
        self.assertIn("the answer is DTYPE_BF16, not the DTYPE_FP16 asked for",
                      str(caught.exception))

    def test_warm_up_makes_the_first_request_a_plan_cache_hit(self):
        shape = dict(shape=(1, 640, 4, 32), kv_heads=2, dtype=torch.float16, segments=[64, 128],
                     dilations=[1, 2], mode="grouped", precision="fp32")
        warmed = self.client.warm_up([shape])
        self.assertEqual(len(warmed.results), 1)
        self.assertFalse(warmed.results[0].already_warm)
        self.assertTrue(self.client.warm_up([shape]).results[0].already_warm)
        q = torch.randn(1, 640, 4, 32).half()
        k = torch.randn(1, 640, 2, 32).half()
        result = self.client.attend(q, k, k, segments=[64, 128], dilations=[1, 2],
                                    mode="grouped", precision="fp32", stream=False,
                                    return_info=True)
        self.assertTrue(result.plan_cache_hit)
        with self.assertRaises(da.InvalidArgument) as caught:
            self.client.warm_up([dict(shape=(1, 64, 4, 32), segments=[64])])
        self.assertIn("needs shape, segments and dilations", str(caught.exception))

    def test_the_torch_module_is_grouped_dilated_attention_for_inference(self):
        generator = torch.Generator().manual_seed(25)
        # fp32 compute, to compare with the reference closely (the default, auto, may be bf16).
        module = da.torch.DilatedAttention([32, 64, 128], [1, 2, 4], precision="fp32",
                                           client=self.client)
        self.assertIsInstance(module, torch.nn.Module)
        for dtype, tolerance in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            with self.subTest(dtype=str(dtype)):
                # Five heads over three patterns: groups of 2, 2 and 1.
                q, k, v = (torch.randn(2, 256, 5, 32, generator=generator).to(dtype)
                           for _ in range(3))
                with torch.no_grad():
                    out = module(q, k, v, is_causal=True)
                self.assertEqual((out.dtype, out.device, out.shape), (dtype, q.device, q.shape))
                want = reference(*(t.float().numpy() for t in (q, k, v)), [32, 64, 128],
                                 [1, 2, 4], causal=True, mode=ref.GROUPED)
                da_testing.assert_close(out.float().numpy(), want, tolerance, str(dtype))
                # Streamed as two parallel streams (cut at token 128): the same bytes.
                parts = da.torch.DilatedAttention([32, 64, 128], [1, 2, 4], precision="fp32",
                                                  client=self.client, stream=True,
                                                  parallel_streams=2)
                with torch.no_grad():
                    self.assertTrue(torch.equal(parts(q, k, v, is_causal=True), out))
        q = torch.randn(1, 64, 3, 16, requires_grad=True)
        with self.assertRaises(da.InvalidArgument) as caught:
            module(q, q, q)
        self.assertIsInstance(caught.exception, ValueError)
        self.assertIn("torch.no_grad()", str(caught.exception))
        with torch.no_grad():
            self.assertEqual(module(q, q, q).shape, q.shape)
        with self.assertRaises(ValueError):
            da.torch.DilatedAttention([32], [1], attention_dropout=0.1, client=self.client)
        with self.assertRaises(da.InvalidArgument):
            da.torch.DilatedAttention([32, 64], [1], client=self.client)
        with self.assertRaises(da.InvalidArgument) as caught:
            da.torch.DilatedAttention([2048.7], [1], client=self.client)
        self.assertIn("segments[0] 2048.7 must be an int", str(caught.exception))

    def test_asyncio_block_iterator_takes_an_async_generator(self):
        import asyncio
        rng = np.random.default_rng(26)
        q = rng.standard_normal((1, 300, 2, 16)).astype(np.float32)
        kw = dict(segments=[50], dilations=[1], precision="fp32")

        async def blocks():
            for start in range(0, 300, 70):
                await asyncio.sleep(0)
                part = q[:, start:start + 70]
                yield part, part, part

        async def run():
            async with da.aio.Client(self.server.address, timeout=60) as client:
                stream = client.attend_blocks(blocks(), seq_len=300, **kw)
                parts = [block.output async for block in stream]
                return np.concatenate(parts, axis=1), stream.info

        got, info = asyncio.run(run())
        self.assertIsNotNone(info)
        self.assertTrue(np.array_equal(got, self.client.attend(q, q, q, **kw)))


    def test_asyncio_block_iterator_refuses_bad_blocks_and_passes_the_callers_errors_on(self):
        # grpc.aio cancels a call whose request iterator raised and reading it raises
        # asyncio.CancelledError, which `except Exception` does not catch; da.aio raises the
        # iterator's error instead, as da.Client does.
        import asyncio
        x = np.ones((1, 16, 2, 8), np.float32)
        kw = dict(segments=[8], dilations=[1])

        class Broken(Exception):
            pass

        async def failing():
            yield x, x, x
            raise Broken("the producer failed")

        async def run():
            async with da.aio.Client(self.server.address, timeout=60) as client:
                wide = np.ones((1, 16, 4, 8), np.float32)
                cases = [([(x, x, x), (wide, x, x)], da.InvalidArgument,
                          "the block at token 16 has query shape [1, 16, 4, 8]"),
                         ([(x, x, x)], da.InvalidArgument, "ended after 16 of seq_len 32 tokens"),
                         (failing(), Broken, "the producer failed")]
                for blocks, kind, text in cases:
                    with self.assertRaises(kind) as caught:
                        async for _ in client.attend_blocks(blocks, seq_len=32, **kw):
                            pass
                    self.assertIn(text, str(caught.exception))
                with self.assertRaises(da.InvalidArgument) as caught:  # Before any call.
                    client.attend_blocks([(x, x, x)], seq_len=32.0, **kw)
                self.assertIn("seq_len 32.0 must be an int", str(caught.exception))
                # Leaving early and closing cancels the call; the server is there for the next.
                stream = client.attend_blocks([(x, x, x)] * 64, seq_len=1024, **kw)
                async for _ in stream:
                    break
                stream.close()
                return await client.health("da.v1.AttentionService")

        self.assertEqual(asyncio.run(run()), "SERVING")

    def test_asyncio_client_prepares_large_requests_off_the_event_loop(self):
        # Gathering a request on the host, joining its unary message and giving its output back
        # copy every byte: for a large request (24 MiB here) they run on a worker thread, in the
        # caller's torch grad mode (a tensor that requires grad, under no_grad); a small one's
        # stay on the loop.
        import asyncio
        import threading
        from da import _client
        made_on, original = [], _client._Attend

        class Recorded(original):
            def __init__(self, *args, **kwargs):
                made_on.append(threading.get_ident())
                super().__init__(*args, **kwargs)

            def unary_request(self):
                made_on.append(threading.get_ident())
                return super().unary_request()

        x = torch.randn(1, 32768, 4, 16, requires_grad=True)
        kw = dict(segments=[64], dilations=[1], precision="fp32", stream=False)

        async def run(tensor):
            async with da.aio.Client(self.server.address, timeout=60) as client:
                return await client.attend(tensor, tensor, tensor, **kw), threading.get_ident()

        _client._Attend = Recorded
        try:
            with torch.no_grad():
                got, loop = asyncio.run(run(x))
                self.assertEqual(len(made_on), 2)
                self.assertNotIn(loop, made_on)
                self.assertTrue(torch.equal(got, self.client.attend(x, x, x, **kw)))
                made_on.clear()
                _, loop = asyncio.run(run(x[:, :64]))
                self.assertEqual(made_on, [loop, loop])
        finally:
            _client._Attend = original

    def test_the_block_iterator_pulls_blocks_in_the_callers_grad_mode(self):
        # gRPC's sync client pulls the blocks on a thread of its own, where torch.no_grad() of
        # the caller's thread does not hold: a producer computing with a module's parameters made
        # tensors that require grad there, refused as if the caller had not asked for no_grad.
        layer = torch.nn.Linear(16, 16)
        x = torch.from_numpy(np.random.default_rng(37).standard_normal((1, 64, 2, 16))
                             .astype(np.float32))
        kw = dict(segments=[16], dilations=[1], precision="fp32")
        with torch.no_grad():
            y = layer(x)
            want = self.client.attend(y, y, y, **kw)
            got = [block.output for block in self.client.attend_blocks(
                ((layer(x[:, i:i + 16]),) * 3 for i in range(0, 64, 16)), seq_len=64, **kw)]
        self.assertTrue(torch.equal(torch.cat(got, dim=1), want))

    def test_a_client_limit_below_the_servers_makes_requests_stream(self):
        # A 12 MiB q, k, v and output (48 MiB) fit the server's 64 MiB message limit but not this
        # client's 16 MiB: the request streams (in blocks under 16 MiB) instead of failing here.
        q = np.random.default_rng(38).standard_normal((1, 49152, 1, 64)).astype(np.float32)
        kw = dict(segments=[64], dilations=[1], precision="fp32")
        with da.Client(self.server.address, max_message_bytes=16 << 20, timeout=120) as small:
            got = small.attend(q, q, q, return_info=True, **kw)
        self.assertGreater(got.info.stream_buffer_bytes, 0)
        self.assertTrue(np.array_equal(got.output, self.client.attend(q, q, q, **kw)))


class ClientReviewTest(unittest.TestCase):
    """Strided inputs, block sizes, closing, cancellation and the asyncio client's tasks."""

    @classmethod
    def setUpClass(cls):
        cls.server = da_testing.Server(ARGS.server_binary, ["--threads", "2"],
                                       metrics=True).start()
        cls.client = da.Client(cls.server.address, timeout=60)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop_and_close()

    def test_strided_inputs_give_the_bytes_of_contiguous_ones_and_stream_without_a_copy(self):
        rng = np.random.default_rng(39)
        q = rng.standard_normal((2, 96, 4, 16)).astype(np.float32)
        k = rng.standard_normal((2, 96, 2, 16)).astype(np.float32)
        kw = dict(segments=[32], dilations=[2], precision="fp32")
        want = self.client.attend(q, k, k, stream=False, **kw)

        def heads_major(a):  # The same values, each head's tokens together in memory.
            return np.ascontiguousarray(a.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)

        for layout, make in (("heads-major", heads_major), ("fortran", np.asfortranarray)):
            sq, sk = make(q), make(k)
            self.assertFalse(sq.flags.c_contiguous)
            for stream in (False, True):
                with self.subTest(layout=layout, stream=stream):
                    got = self.client.attend(sq, sk, sk, stream=stream, block_tokens=20, **kw)
                    self.assertTrue(np.array_equal(got.view(np.uint8), want.view(np.uint8)))
        tq, tk = (torch.from_numpy(a).transpose(1, 2).contiguous().transpose(1, 2)
                  for a in (q, k))
        self.assertFalse(tq.is_contiguous())
        got = self.client.attend(tq, tk, tk, stream=True, block_tokens=20, **kw)
        self.assertTrue(np.array_equal(got.numpy().view(np.uint8), want.view(np.uint8)))
        self.assertTrue(np.shares_memory(_client._Attend(tq, tk, tk, None, _client._spec(
            [32], [2], False, "longnet", "auto", None), "", 0).q.raw, tq.numpy()))
        # 16 MiB each for q, k and v (one array), streamed in blocks of 64 tokens: what is
        # allocated at once is a block's rows and message, not a copy of the input.
        import tracemalloc
        big = heads_major(rng.standard_normal((1, 8192, 8, 64)).astype(np.float32))
        out = np.empty_like(big)
        spec = _client._spec([64], [1], False, "longnet", "fp32", None)
        tracemalloc.start()
        try:
            job = _client._Attend(big, big, big, out, spec, "", 0, block_tokens=64)
            sent = sum(len(message) for message in job.stream_requests(64 << 20, 64))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertGreater(sent, 3 * big.nbytes)
        self.assertLess(peak, big.nbytes // 8, f"{peak} bytes allocated at the peak")

    def test_the_block_iterator_encodes_a_blocks_messages_one_at_a_time(self):
        x = np.ones((1, 1024, 2, 16), np.float32)  # 384 bytes of q, k and v a token.
        spec = _client._spec([16], [1], False, "longnet", "auto", None)
        # A message limit of 128 tokens: blocks of 64 (half a message), 16 for x.
        feed = _client._BlockFeed([(x, x, x)], 1024, spec, "", 0, 128 * 384)
        made, original = [], _client._block_message

        def recorded(token_start, *args):
            made.append(token_start)
            return original(token_start, *args)

        _client._block_message = recorded
        try:
            requests = feed.requests()
            next(requests)  # The header.
            next(requests)
            self.assertEqual(made, [0])
            self.assertEqual(len(list(requests)), 15)
            self.assertEqual(made, list(range(0, 1024, 64)))
        finally:
            _client._block_message = original

    def test_a_block_larger_than_a_message_is_refused_before_sending(self):
        import asyncio
        q = np.ones((1, 4096, 2, 16), np.float32)  # 384 bytes of q, k and v a token.
        kw = dict(segments=[16], dilations=[1], stream=True)
        refusal = ("block_tokens 4096: a block's message of up to 1572944 bytes exceeds the "
                   "message limit of 1048576 bytes")
        with da.Client(self.server.address, max_message_bytes=1 << 20, timeout=60) as small:
            with self.assertRaises(da.InvalidArgument) as caught:
                small.attend(q, q, q, block_tokens=4096, **kw)
            self.assertIn(refusal, str(caught.exception))
            # A block that fits goes; so does a larger block_tokens than the sequence has.
            self.assertEqual(small.attend(q, q, q, block_tokens=2048, **kw).shape, q.shape)
            self.assertEqual(small.attend(q[:, :16], q[:, :16], q[:, :16], block_tokens=4096,
                                          **kw).shape, (1, 16, 2, 16))

        async def run():
            async with da.aio.Client(self.server.address, max_message_bytes=1 << 20,
                                     timeout=60) as small:
                with self.assertRaises(da.InvalidArgument) as caught:
                    await small.attend(q, q, q, block_tokens=4096, **kw)
                return str(caught.exception)

        self.assertIn(refusal, asyncio.run(run()))

    def test_a_closed_client_refuses_calls_with_cancelled_and_makes_no_channel(self):
        import asyncio
        q = np.ones((1, 128, 2, 16), np.float32)
        kw = dict(segments=[16], dilations=[1], precision="fp32")
        parts = dict(stream=True, parallel_streams=2, **kw)
        client = da.Client(self.server.address, timeout=60)
        client.attend(q, q, q, **parts)  # The server's limit read, a part's channel made.
        client.close()
        more = dict(parts, parallel_streams=3)  # Would need a third channel.
        for name, call in (("parallel", lambda: client.attend(q, q, q, **more)),
                           ("unary", lambda: client.attend(q, q, q, stream=False, **kw)),
                           ("info", client.info),
                           ("blocks", lambda: list(client.attend_blocks([(q, q, q)],
                                                                        seq_len=128, **kw)))):
            with self.subTest(call=name), self.assertRaises(da.Cancelled) as caught:
                call()
            self.assertIn("the client is closed", str(caught.exception))
        self.assertEqual(len(client._connections._slots), 2)  # None made after close().

        async def run():
            client = da.aio.Client(self.server.address, timeout=60)
            await client.attend(q, q, q, **parts)
            await client.close()
            refused = []
            for call in (lambda: client.attend(q, q, q, **more),
                         lambda: client.attend(q, q, q, stream=False, **kw), client.info):
                with self.assertRaises(da.Cancelled) as caught:
                    await call()
                refused.append(str(caught.exception))
            with self.assertRaises(da.Cancelled) as caught:
                async for _ in client.attend_blocks([(q, q, q)], seq_len=128, **kw):
                    pass
            refused.append(str(caught.exception))
            return refused, len(client._connections._slots)

        refused, slots = asyncio.run(run())
        self.assertEqual(len(refused), 4)
        self.assertTrue(all("the client is closed" in text for text in refused), refused)
        self.assertEqual(slots, 2)

    def test_asyncio_streams_leave_no_task_waiting_in_the_callers_generator(self):
        # grpc.aio cancels the task that pulls a call's requests only while the call has not
        # ended: one waiting in the caller's generator when the call failed stayed pending for
        # good ("Task was destroyed but it is pending!"), holding the call and the blocks.
        import asyncio
        x = np.ones((1, 16, 2, 8), np.float32)

        async def run():
            never = asyncio.Queue()

            async def blocks():
                yield x, x, x
                yield await never.get()  # Nothing ever comes.

            producer = blocks()
            async with da.aio.Client(self.server.address, timeout=60) as client:
                began = time.monotonic()
                with self.assertRaises(da.DeadlineExceeded):
                    async for _ in client.attend_blocks(producer, seq_len=32, segments=[8],
                                                        dilations=[1], timeout=0.5):
                        pass
                took = time.monotonic() - began
                left = await tasks_left()
                return took, left, producer.ag_frame is None

        took, left, closed = asyncio.run(run())
        self.assertLess(took, 10)
        self.assertEqual(left, [])
        self.assertTrue(closed, "the caller's generator was left open")

    def test_asyncio_calls_in_flight_when_the_client_closes_raise_cancelled(self):
        # As da.Client's: close() from another task cancels the calls in flight, whose tasks
        # were not cancelled themselves: they get da.Cancelled, not asyncio.CancelledError
        # (which Python before 3.11 cannot tell from the task's own cancellation).
        import asyncio
        x = np.ones((1, 16, 2, 8), np.float32)
        # One dense segment of 32768 tokens: seconds of compute.
        long_q = np.random.default_rng(40).standard_normal((1, 32768, 1, 32)).astype(np.float32)
        in_flight = "da_in_flight_requests"

        async def run():
            never = asyncio.Queue()

            async def blocks():
                yield x, x, x
                yield await never.get()  # Nothing ever comes.

            async def stream(client):
                async for _ in client.attend_blocks(blocks(), seq_len=32, segments=[8],
                                                    dilations=[1]):
                    pass

            client = da.aio.Client(self.server.address, timeout=60)
            await client.info()
            calls = [asyncio.ensure_future(stream(client)),
                     asyncio.ensure_future(client.attend(long_q, long_q, long_q,
                                                         segments=[32768], dilations=[1],
                                                         stream=False))]
            await asyncio.to_thread(da_testing.wait_until,
                                    lambda: self.server.metric(in_flight) == 2, 30,
                                    "both calls in flight")
            await client.close()
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            left = await tasks_left()
            return outcomes, left

        outcomes, left = asyncio.run(run())
        want = da.Cancelled if sys.version_info >= (3, 11) else asyncio.CancelledError
        for outcome in outcomes:
            self.assertIsInstance(outcome, want)
        self.assertEqual(left, [])


class PackageTest(unittest.TestCase):
    """The wheel without version-locked gencode: its gRPC stub (da/_stub.py) and its messages
    (da/v1/attention_pb2.py, made at import from the descriptor set the build wrote)."""

    def test_the_installed_package_holds_no_version_checking_gencode(self):
        package = os.path.dirname(da.__file__)
        files = sorted(os.path.relpath(os.path.join(d, f), package)
                       for d, _, names in os.walk(package) for f in names)
        self.assertIn(os.path.join("v1", "attention.desc"), files)
        self.assertIn(os.path.join("v1", "attention_pb2.py"), files)
        self.assertNotIn(os.path.join("v1", "attention_pb2_grpc.py"), files)
        for name in files:
            with open(os.path.join(package, name), "rb") as f:
                data = f.read()
            # grpcio-tools' stub raises under an older grpcio; protoc's messages under an older
            # protobuf (google.protobuf.runtime_version).
            for text in (b"GRPC_GENERATED_VERSION", b"ValidateProtobufRuntimeVersion",
                         b"import runtime_version"):
                self.assertFalse(text in data, f"{text.decode()} in da/{name}")

    def test_messages_and_enums_have_the_gencode_names(self):
        file = pb.DESCRIPTOR
        self.assertEqual(file.name, "da/v1/attention.proto")
        for name, descriptor in file.message_types_by_name.items():
            self.assertIs(getattr(pb, name).DESCRIPTOR, descriptor)
        for name, descriptor in file.enum_types_by_name.items():
            self.assertIs(getattr(pb, name).DESCRIPTOR, descriptor)
            for value in descriptor.values:
                self.assertEqual(getattr(pb, value.name), value.number)
                self.assertEqual(getattr(pb, name).Value(value.name), value.number)
        self.assertEqual(pb.DType.Name(pb.DTYPE_BF16), "DTYPE_BF16")
        self.assertEqual(pb.PRECISION_FP8, 4)
        request = pb.AttendRequest(request_id="r", spec=pb.AttentionSpec(
            segment_lengths=[8], dilation_rates=[2], softmax_scale=0.5,
            combine_mode=pb.COMBINE_MODE_GROUPED), priority=-1)
        again = pb.AttendRequest.FromString(request.SerializeToString())
        self.assertEqual(again, request)
        self.assertTrue(again.spec.HasField("softmax_scale"))
        answer = pb.AttendStreamResponse(trailer=pb.StreamTrailer())
        self.assertEqual(answer.WhichOneof("kind"), "trailer")
        # An fp8 run's scales, as Result reads them (no fp8 device here: made by hand).
        info = pb.ExecutionInfo(precision_used=pb.PRECISION_FP8, fp8_scales=[pb.Fp8Scales(
            device="cuda:0", query_amax=2, key_amax=0.5, value_amax=4, query_scale=224,
            key_scale=896, value_scale=112)])
        result = da.Result(None, pb.ExecutionInfo.FromString(info.SerializeToString()))
        self.assertEqual(result.precision, "fp8")
        self.assertEqual(result.fp8_scales, [{"device": "cuda:0", "amax": (2, 0.5, 4),
                                              "scale": (224, 896, 112)}])
        self.assertEqual(da.Result(None, pb.ExecutionInfo()).fp8_scales, [])

    def test_the_stub_makes_each_rpc_of_the_service_with_its_kind(self):
        class Channel:  # Records what the stub asks of a channel.
            def __init__(self):
                self.made = {}

            def __getattr__(self, kind):
                def make(path, request_serializer, response_deserializer):
                    self.made[path] = (kind, request_serializer, response_deserializer)
                    return (kind, path)
                return make

        channel = Channel()
        stub = _stub.AttentionServiceStub(channel)
        service = pb.DESCRIPTOR.services_by_name["AttentionService"]
        self.assertEqual(_stub.SERVICE, service.full_name)
        self.assertEqual(sorted(_stub.METHODS), sorted(m.name for m in service.methods))
        for method in service.methods:
            with self.subTest(method=method.name):
                path = f"/da.v1.AttentionService/{method.name}"
                self.assertEqual(getattr(stub, method.name), channel.made[path][:1] + (path,))
                kind, serialize, deserialize = channel.made[path]
                if hasattr(method, "client_streaming"):  # protobuf >= 4.23 or so.
                    self.assertEqual(kind, ("stream" if method.client_streaming else "unary") +
                                     ("_stream" if method.server_streaming else "_unary"))
                request = getattr(pb, method.input_type.name)
                response = getattr(pb, method.output_type.name)
                self.assertEqual(serialize, request.SerializeToString)
                self.assertEqual(deserialize, response.FromString)
        # On real channels: info and warm_up above (grpc.Channel) and in the asyncio test.


if __name__ == "__main__":
    da_testing.run_unittest(UNITTEST_ARGV)
