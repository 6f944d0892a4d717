#!/usr/bin/env python3
"""An independent client of da-server: Python grpcio with stubs generated from proto/ at test
time, inputs from numpy, results compared with numpy_reference (docs/MATH.md in float64).

    test_independent_client.py --server-binary build/bin/da-server --proto-dir proto

It starts the real server on a loopback port, checks Attend against the reference over the cases
below, AttendStream against Attend byte for byte, the health service, GetServerInfo, validation
errors, and that SIGTERM drains an in-flight stream and exits 0. Tolerances: da_testing.TOLERANCES.
"""

import queue
import tempfile
import threading
import unittest

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

import da_testing
import numpy_reference as ref

ARGS, UNITTEST_ARGV = da_testing.parse_args(needs=("server_binary", "proto_dir"))
STUB_DIR = tempfile.TemporaryDirectory(prefix="da-stubs-")
pb2, pb2_grpc = da_testing.generate_stubs(ARGS.proto_dir, STUB_DIR.name)

DTYPES = {"fp32": pb2.DTYPE_FP32, "fp16": pb2.DTYPE_FP16, "bf16": pb2.DTYPE_BF16}
MODES = {ref.LONGNET: pb2.COMBINE_MODE_LONGNET, ref.GROUPED: pb2.COMBINE_MODE_GROUPED}
READINESS = "da.v1.AttentionService"


class Case:
    def __init__(self, name, batch, seq_len, heads, kv_heads, head_dim, segments, dilations,
                 dtype="fp32", causal=False, scale=None, mode=ref.LONGNET):
        self.name = name
        self.shape = (batch, seq_len, heads, kv_heads, head_dim)
        self.segments, self.dilations = segments, dilations
        self.dtype, self.causal, self.scale, self.mode = dtype, causal, scale, mode

    def __repr__(self):
        return self.name


CASES = [
    Case("fp32 two patterns", 2, 64, 4, 4, 16, [16, 32], [1, 2]),
    Case("fp16 gqa causal partial last segment", 1, 100, 8, 2, 32, [32, 64], [1, 4],
         dtype="fp16", causal=True),
    Case("fp32 grouped causal, heads not divisible by patterns", 1, 77, 5, 5, 8, [8, 16, 32],
         [1, 2, 4], causal=True, mode=ref.GROUPED),
    Case("fp32 segment longer than sequence, r not dividing w", 2, 20, 3, 3, 8, [64], [3]),
    Case("fp32 r not dividing w, custom scale", 1, 50, 4, 2, 16, [7, 10], [3, 4], scale=0.37),
    Case("fp16 grouped with fewer heads than patterns, gqa", 1, 40, 2, 1, 16, [4, 8, 16],
         [1, 2, 4], dtype="fp16", mode=ref.GROUPED),
    Case("bf16 gqa longnet causal", 1, 33, 4, 2, 16, [8, 16], [2, 4], dtype="bf16",
         causal=True),
    Case("fp32 single token", 1, 1, 2, 1, 4, [4], [2]),
    Case("fp32 longer sequence", 1, 1000, 8, 4, 64, [128, 256, 512], [1, 2, 4]),
    Case("fp32 long segments with a one-token tail, causal", 1, 4097, 2, 1, 64, [2048, 4096],
         [1, 2], causal=True),
    Case("fp16 longnet dilation above heads", 1, 96, 2, 2, 32, [16, 48], [4, 8], dtype="fp16",
         scale=0.05),
]


def make_request(case, q, k, v, request_id="", precision=pb2.PRECISION_FP32):
    # FP32 unless a test says otherwise: AUTO may choose bf16 products on CPUs that have them,
    # whose error bound (relative L2 2e-2) is not the elementwise fp32 one checked here.
    spec = pb2.AttentionSpec(segment_lengths=case.segments, dilation_rates=case.dilations,
                             causal=case.causal, combine_mode=MODES[case.mode],
                             precision=precision)
    if case.scale is not None:
        spec.softmax_scale = case.scale
    tensors = [pb2.Tensor(dtype=DTYPES[case.dtype], shape=list(x.shape),
                          data=da_testing.to_bytes(x, case.dtype)) for x in (q, k, v)]
    return pb2.AttendRequest(request_id=request_id, spec=spec, query=tensors[0], key=tensors[1],
                             value=tensors[2])


def stream_messages(request, dtype, inputs, token_bounds):
    """The AttendStream messages of request: a header, then one block per [start, end)."""
    q, k, v = inputs
    batch, seq_len, heads, head_dim = q.shape
    yield pb2.AttendStreamRequest(header=pb2.StreamHeader(
        request_id=request.request_id, spec=request.spec, dtype=DTYPES[dtype], batch=batch,
        seq_len=seq_len, heads=heads, kv_heads=k.shape[2], head_dim=head_dim))
    for start, end in token_bounds:
        yield pb2.AttendStreamRequest(block=pb2.TokenBlock(
            token_start=start, token_count=end - start,
            query=da_testing.to_bytes(q[:, start:end], dtype),
            key=da_testing.to_bytes(k[:, start:end], dtype),
            value=da_testing.to_bytes(v[:, start:end], dtype)))


def collect_stream(responses, test):
    """Reassembles an AttendStream answer; returns (output bytes, header, trailer)."""
    header, trailer, blocks = None, None, []
    for response in responses:
        kind = response.WhichOneof("kind")
        test.assertIsNotNone(kind, "empty AttendStreamResponse")
        if kind == "header":
            test.assertIsNone(header, "two stream headers")
            header = response.header
        elif kind == "block":
            test.assertIsNotNone(header, "a block before the header")
            test.assertIsNone(trailer, "a block after the trailer")
            blocks.append(response.block)
        else:
            test.assertIsNone(trailer, "two trailers")
            trailer = response.trailer
    test.assertIsNotNone(header, "no stream header")
    test.assertIsNotNone(trailer, "no stream trailer")
    batch, seq_len, heads, head_dim = header.shape
    element = 4 if header.dtype == pb2.DTYPE_FP32 else 2
    out = np.zeros((batch, seq_len, heads * head_dim * element), dtype=np.uint8)
    covered = np.zeros(seq_len, dtype=int)
    for block in blocks:
        start, count = block.token_start, block.token_count
        test.assertEqual(len(block.output), batch * count * heads * head_dim * element)
        out[:, start:start + count] = np.frombuffer(block.output, np.uint8).reshape(
            batch, count, -1)
        covered[start:start + count] += 1
    test.assertTrue(np.all(covered == 1), "output blocks do not cover every token exactly once")
    return out.tobytes(), header, trailer


def uneven_bounds(seq_len, pieces):
    """Token ranges of growing sizes covering [0, seq_len): cuts at seq_len * (i / pieces)^2."""
    cuts = sorted({0, seq_len} | {seq_len * i * i // (pieces * pieces) for i in range(1, pieces)})
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def reference_output(case, q, k, v):
    return ref.dilated_attention(q, k, v, case.segments, case.dilations, causal=case.causal,
                                 scale=case.scale, mode=case.mode)


class IndependentClientTest(unittest.TestCase):
    """One server for every call; tearDownClass asserts it exits 0 on SIGTERM."""

    @classmethod
    def setUpClass(cls):
        cls.server = da_testing.Server(ARGS.server_binary).start()
        cls.channel = da_testing.open_channel(cls.server.address)
        cls.stub = pb2_grpc.AttentionServiceStub(cls.channel)
        cls.health = health_pb2_grpc.HealthStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        cls.server.stop_and_close()

    def attend(self, request):
        return self.stub.Attend(request, timeout=da_testing.CALL_TIMEOUT_S)

    def test_attend_matches_numpy_reference(self):
        rng = np.random.default_rng(20261125)
        for case in CASES:
            with self.subTest(case=case):
                batch, seq_len, heads, kv_heads, head_dim = case.shape
                q, k, v = da_testing.random_inputs(rng, batch, seq_len, heads, kv_heads,
                                                   head_dim, case.dtype)
                response = self.attend(make_request(case, q, k, v))
                self.assertEqual(response.output.dtype, DTYPES[case.dtype])
                self.assertEqual(list(response.output.shape), [batch, seq_len, heads, head_dim])
                got = da_testing.from_bytes(response.output.data, case.dtype,
                                            (batch, seq_len, heads, head_dim))
                da_testing.assert_close(got, reference_output(case, q, k, v), case.dtype,
                                        case.name)
                self.assertTrue(response.info.backend, "execution info has no backend")
                self.assertTrue(response.info.devices, "execution info has no devices")
                self.assertGreaterEqual(response.info.compute_time_us, 0)

    def test_auto_precision_is_reported_and_within_its_bound(self):
        rng = np.random.default_rng(11)
        case = CASES[8]  # fp32, 1000 tokens, three patterns.
        q, k, v = da_testing.random_inputs(rng, *case.shape, case.dtype)
        response = self.attend(make_request(case, q, k, v, precision=pb2.PRECISION_AUTO))
        self.assertIn(response.info.precision_used, (pb2.PRECISION_FP32, pb2.PRECISION_BF16))
        self.assertTrue(response.info.precision_reason.startswith("auto"),
                        response.info.precision_reason)
        got = da_testing.from_bytes(response.output.data, case.dtype, q.shape)
        want = reference_output(case, q, k, v)
        relative_l2 = np.linalg.norm(got - want) / np.linalg.norm(want)
        bound = 2e-2 if response.info.precision_used == pb2.PRECISION_BF16 else 1e-5
        self.assertLessEqual(relative_l2, bound, pb2.Precision.Name(response.info.precision_used))

    def test_request_id_is_echoed_or_generated(self):
        rng = np.random.default_rng(3)
        case = CASES[0]
        q, k, v = da_testing.random_inputs(rng, *case.shape, case.dtype)
        self.assertEqual(self.attend(make_request(case, q, k, v, "py-42")).info.request_id,
                         "py-42")
        self.assertTrue(self.attend(make_request(case, q, k, v)).info.request_id)

    def test_stream_returns_the_same_bytes_as_unary(self):
        rng = np.random.default_rng(5)
        for case in (CASES[1], CASES[2], CASES[6], CASES[7]):
            batch, seq_len, heads, kv_heads, head_dim = case.shape
            inputs = da_testing.random_inputs(rng, batch, seq_len, heads, kv_heads, head_dim,
                                              case.dtype)
            request = make_request(case, *inputs)
            unary = self.attend(request)
            for pieces in (1, 3):
                with self.subTest(case=case, blocks=pieces):
                    bounds = uneven_bounds(seq_len, pieces)
                    responses = self.stub.AttendStream(
                        stream_messages(request, case.dtype, inputs, bounds),
                        timeout=da_testing.CALL_TIMEOUT_S)
                    data, header, trailer = collect_stream(responses, self)
                    self.assertEqual(header.dtype, DTYPES[case.dtype])
                    self.assertEqual(list(header.shape), [batch, seq_len, heads, head_dim])
                    self.assertTrue(trailer.info.backend)
                    self.assertEqual(data, unary.output.data,
                                     "AttendStream bytes differ from Attend bytes")

    def test_health_is_serving(self):
        for service in ("", READINESS):
            with self.subTest(service=service):
                answer = self.health.Check(health_pb2.HealthCheckRequest(service=service),
                                           timeout=10)
                self.assertEqual(answer.status, health_pb2.HealthCheckResponse.SERVING)
        with self.assertRaises(grpc.RpcError) as raised:
            self.health.Check(health_pb2.HealthCheckRequest(service="nosuch.Service"), timeout=10)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.NOT_FOUND)

    def test_server_info_lists_the_cpu(self):
        info = self.stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=10)
        self.assertTrue(info.version)
        kinds = [device.kind for device in info.devices]
        self.assertIn("cpu", kinds)
        self.assertGreater(info.limits.max_message_bytes, 0)

    def test_validation_errors_are_invalid_argument(self):
        rng = np.random.default_rng(9)
        case = Case("base", 1, 16, 4, 2, 8, [8], [2])
        q, k, v = da_testing.random_inputs(rng, *case.shape, "fp32")
        good = make_request(case, q, k, v)
        bad = {}
        # (what is wrong, words of which the message should contain one)
        request = pb2.AttendRequest(); request.CopyFrom(good)
        request.spec.dilation_rates[0] = 9
        bad[("dilation greater than segment", ("dilation",))] = request
        request = pb2.AttendRequest(); request.CopyFrom(good)
        request.spec.dilation_rates.append(1)
        bad[("list lengths differ", ("dilation", "segment", "pattern"))] = request
        request = pb2.AttendRequest(); request.CopyFrom(good)
        del request.spec.segment_lengths[:]
        del request.spec.dilation_rates[:]
        bad[("no pattern", ("pattern", "segment"))] = request
        request = pb2.AttendRequest(); request.CopyFrom(good)
        request.spec.segment_lengths[0] = 0
        request.spec.dilation_rates[0] = 0
        bad[("zero segment", ("segment", "dilation"))] = request
        k3 = da_testing.random_inputs(rng, 1, 16, 3, 3, 8, "fp32")[1]
        bad[("kv heads not dividing heads", ("head",))] = make_request(case, q, k3, k3)
        request = pb2.AttendRequest(); request.CopyFrom(good)
        request.query.data = request.query.data[:-4]
        bad[("byte count", ("byte",))] = request
        request = pb2.AttendRequest(); request.CopyFrom(good)
        request.key.shape[:] = [1, 16, 2]
        bad[("rank-3 key", ("key", "shape", "rank"))] = request
        request = pb2.AttendRequest(); request.CopyFrom(good)
        request.value.dtype = pb2.DTYPE_FP16
        bad[("mixed dtypes", ("dtype",))] = request
        for (what, words), request in bad.items():
            with self.subTest(what=what):
                with self.assertRaises(grpc.RpcError) as raised:
                    self.attend(request)
                self.assertEqual(raised.exception.code(), grpc.StatusCode.INVALID_ARGUMENT,
                                 raised.exception.details())
                details = raised.exception.details().lower()
                self.assertTrue(any(word in details for word in words),
                                f"message {details!r} names none of {words}")
        # A bad stream header fails the same way.
        request = pb2.AttendRequest(); request.CopyFrom(good)
        request.spec.dilation_rates[0] = 9
        with self.assertRaises(grpc.RpcError) as raised:
            list(self.stub.AttendStream(stream_messages(request, "fp32", (q, k, v), [(0, 16)]),
                                        timeout=da_testing.CALL_TIMEOUT_S))
        self.assertEqual(raised.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        # The server still answers afterwards.
        self.assertEqual(len(self.attend(good).output.data), q.nbytes)


class LimitsTest(unittest.TestCase):
    """Configured ceilings: a unary message over --max-message-bytes and a request over
    --max-tokens are RESOURCE_EXHAUSTED; the same large request streamed in small blocks passes."""

    def test_limits(self):
        rng = np.random.default_rng(21)
        args = ["--max-message-bytes", str(1 << 20), "--max-tokens", "4096"]
        with da_testing.Server(ARGS.server_binary, args) as server:
            channel = da_testing.open_channel(server.address)
            stub = pb2_grpc.AttentionServiceStub(channel)
            # q alone is 2 MiB: over the message limit, within the token limit.
            case = Case("large", 1, 2048, 8, 2, 32, [256, 1024], [1, 4])
            inputs = da_testing.random_inputs(rng, *case.shape, "fp32")
            request = make_request(case, *inputs)
            with self.assertRaises(grpc.RpcError) as raised:
                stub.Attend(request, timeout=da_testing.CALL_TIMEOUT_S)
            self.assertEqual(raised.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
            bounds = [(start, min(start + 256, 2048)) for start in range(0, 2048, 256)]
            responses = stub.AttendStream(stream_messages(request, "fp32", inputs, bounds),
                                          timeout=da_testing.CALL_TIMEOUT_S)
            data, _, _ = collect_stream(responses, self)
            got = da_testing.from_bytes(data, "fp32", inputs[0].shape)
            da_testing.assert_close(got, reference_output(case, *inputs), "fp32", case.name)
            # 5000 tokens of a few bytes each: over --max-tokens only.
            case = Case("many tokens", 1, 5000, 1, 1, 4, [64], [1])
            request = make_request(case, *da_testing.random_inputs(rng, *case.shape, "fp32"))
            with self.assertRaises(grpc.RpcError) as raised:
                stub.Attend(request, timeout=da_testing.CALL_TIMEOUT_S)
            self.assertEqual(raised.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.assertIn("token", raised.exception.details().lower())
            channel.close()
            self.assertEqual(server.stop(), 0, server.log())


class LifecycleTest(unittest.TestCase):
    def test_sigterm_drains_an_in_flight_stream_then_exits_zero(self):
        rng = np.random.default_rng(13)
        case = Case("drain", 1, 64, 4, 4, 16, [16, 32], [1, 2])
        inputs = da_testing.random_inputs(rng, *case.shape, "fp32")
        request = make_request(case, *inputs)
        messages = list(stream_messages(request, "fp32", inputs, [(0, 20), (20, 64)]))
        outgoing = queue.Queue()
        with da_testing.Server(ARGS.server_binary, ["--drain-timeout-ms", "30000"],
                               metrics=True) as server:
            channel = da_testing.open_channel(server.address)
            stub = pb2_grpc.AttentionServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            # Open the stream and send the header and a first block: the request is in flight.
            responses = stub.AttendStream(iter(outgoing.get, None),
                                          timeout=da_testing.CALL_TIMEOUT_S)
            outgoing.put(messages[0])
            outgoing.put(messages[1])
            collected = {}
            reader = threading.Thread(target=lambda: collected.update(
                result=self._collect_or_error(responses)))
            reader.start()
            # SIGTERM once the server holds the stream (its queue place, taken when the header
            # is admitted): an answer on the same connection does not promise that gRPC has
            # handed the stream to the service yet.
            da_testing.wait_until(lambda: server.metric("da_queue_stream_places") >= 1, 20,
                                  "the server to admit the stream")
            self.assertEqual(health.Check(health_pb2.HealthCheckRequest(service=READINESS),
                                          timeout=10).status,
                             health_pb2.HealthCheckResponse.SERVING)
            server.terminate()

            def not_ready():
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=READINESS),
                                          timeout=5).status
                    return status == health_pb2.HealthCheckResponse.NOT_SERVING
                except grpc.RpcError:
                    return True  # No longer accepting calls counts as not ready.

            da_testing.wait_until(not_ready, 20, "readiness to turn off after SIGTERM")
            self.assertIsNone(server.process.poll(), "exited before the in-flight stream ended")
            outgoing.put(messages[2])
            outgoing.put(None)
            reader.join(da_testing.CALL_TIMEOUT_S)
            self.assertFalse(reader.is_alive(), "the drained stream never finished")
            result = collected["result"]
            if isinstance(result, Exception):
                raise AssertionError(f"in-flight stream failed: {result}\n{server.log()}")
            data = result[0]
            got = da_testing.from_bytes(data, "fp32", inputs[0].shape)
            da_testing.assert_close(got, reference_output(case, *inputs), "fp32", "drained")
            channel.close()
            self.assertEqual(server.wait(), 0, server.log())

    def _collect_or_error(self, responses):
        try:
            return collect_stream(responses, self)
        except Exception as error:  # Re-raised on the test's thread.
            return error


if __name__ == "__main__":
    da_testing.run_unittest(UNITTEST_ARGV)
