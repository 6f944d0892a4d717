#!/usr/bin/env python3
"""The server against hostile and careless clients (issue #13), driven by an independent client
(Python grpcio) against the real da-server on loopback.

    test_hostile.py --server-binary build/bin/da-server --proto-dir proto

Each case starts its own da-server with the flags it is about and reads the server's own
/metrics, log and /proc figures:
- idle streams (header only; one block then silence; the answer never read) end within
  --stream-idle-timeout-ms and free their reservation, and a legitimate stream is then admitted;
- 20 idle streams from one client cannot lock another client out (--max-client-stream-bytes);
- a unary answer larger than --max-message-bytes is refused before any compute;
- small calls keep a bounded queue time next to running streams, and the queue never passes
  --max-queue;
- softmax scales past the documented bound are refused, the bound itself gives finite output;
- bodies that are not the method's message get INVALID_ARGUMENT, a log line and a metric on every
  method;
- the trailer reports the bytes the stream reserved;
- resident memory after rounds of concurrent streams returns within a stated bound of idle;
- unary requests whose last byte never comes (a raw HTTP/2 client) hold no more than
  --grpc-memory-bytes, and the server serves on once that client has gone.
"""

import os
import queue
import re
import tempfile
import threading
import time
import unittest

import grpc
import numpy as np

import da_testing
import raw_h2
import stream_load
from stream_load import OpenStream

ARGS, UNITTEST_ARGV = da_testing.parse_args(needs=("server_binary", "proto_dir"))
STUB_DIR = tempfile.TemporaryDirectory(prefix="da-stubs-")
pb2, pb2_grpc = da_testing.generate_stubs(ARGS.proto_dir, STUB_DIR.name)

SERVICE = "/da.v1.AttentionService/"
TIMEOUT_S = 60.0


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def stream_header(seq_len, **kwargs):
    return stream_load.stream_header(pb2, seq_len, **kwargs)


def stream_requests(header, **kwargs):
    return stream_load.stream_requests(pb2, header, **kwargs)


class HostileClientTest(unittest.TestCase):
    def start(self, *flags):
        server = da_testing.Server(ARGS.server_binary, ["--threads", "2", *flags], metrics=True)
        server.start()
        self.addCleanup(server.close)
        channel = da_testing.open_channel(server.address)
        self.addCleanup(channel.close)
        return server, channel, pb2_grpc.AttentionServiceStub(channel)

    def wait_reserved(self, server, predicate, what, timeout_s=TIMEOUT_S):
        return da_testing.wait_until(
            lambda: predicate(server.metric("da_memory_reserved_bytes")), timeout_s, what)

    # --- Idle streams --------------------------------------------------------------------------

    def test_idle_streams_end_within_the_limit_and_free_their_reservation(self):
        idle_ms = 1500
        server, _, stub = self.start("--stream-idle-timeout-ms", str(idle_ms),
                                     "--max-client-stream-bytes", "0")
        hold = threading.Event()
        self.addCleanup(hold.set)
        header = stream_header(65536)
        started = time.monotonic()
        streams = {
            "header only": OpenStream(stub, stream_requests(header, hold=hold, blocks=0),
                                      timeout=None),
            "one block": OpenStream(stub, stream_requests(header, hold=hold, blocks=1),
                                    timeout=None),
        }
        # Sends everything, reads nothing: the server's writes wait on the client.
        never_reads = OpenStream(stub, stream_requests(stream_header(65536, segment=4096)),
                                 read=False, timeout=None)
        self.addCleanup(never_reads.cancel)
        # All three hold a window, then give it back within the limit (plus the watch's period;
        # the limit counts from the client's last progress, which is after the start).
        self.wait_reserved(server, lambda r: r > 0, "the streams' reservations", 10)
        self.wait_reserved(server, lambda r: r == 0, "the reservations to be freed",
                           idle_ms / 1e3 + 10)
        took = time.monotonic() - started
        for name, stream in streams.items():
            self.assertTrue(stream.ended.wait(5), name)
            self.assertEqual(stream.code, grpc.StatusCode.DEADLINE_EXCEEDED, name)
            self.assertIn("stream idle: no message from the client for", stream.details)
            self.assertIn("reserved bytes are freed (--stream-idle-timeout-ms 1500)",
                          stream.details)
        self.assertLess(took, idle_ms / 1e3 + 10)
        self.assertRegex(server.log(), r"code=CANCELLED .*stream idle: the client read no answer")
        self.assertEqual(server.metric('da_requests_rejected_total{reason="idle"}'), 3)
        # A legitimate stream is admitted and answered afterwards.
        good = OpenStream(stub, stream_requests(stream_header(8192), seed=3))
        self.assertTrue(good.ended.wait(TIMEOUT_S))
        self.assertEqual(good.code, grpc.StatusCode.OK, good.details)
        self.assertIsNotNone(good.trailer)

    def test_a_stream_failed_while_its_answer_waits_gives_back_its_window_then_ends(self):
        # The client reads nothing and sends one chunk at a time until the engine stops (both
        # output slots wait on the client: the server's write waits), then a block that repeats
        # tokens, which the server still has room to read: the stream fails with a write in
        # flight. Its window goes back at once, all but the message gRPC is still writing, and
        # the call ends within the idle limit with its own error in the server's log.
        idle_ms = 6000  # Longer than the 3 s that tell that the engine waits on the client.
        server, _, stub = self.start("--stream-idle-timeout-ms", str(idle_ms))
        # Chunks of 4096 tokens (the segment), 4 blocks each; answers of 8 MiB per chunk.
        header = stream_header(65536, segment=4096, request_id="fails-while-writing")
        steps = queue.Queue()
        sent_bad = []

        def requests():
            good = stream_requests(header)
            yield next(good)  # The header.
            while steps.get() == "chunk":
                for _ in range(4):
                    yield next(good)
            row = header.heads * header.head_dim
            data = np.ones(1024 * row, dtype="<f4").tobytes()
            sent_bad.append(time.monotonic())
            yield pb2.AttendStreamRequest(block=pb2.TokenBlock(
                token_start=0, token_count=1024, query=data, key=data, value=data))
            time.sleep(TIMEOUT_S)  # Keeps the call open without sending more.

        never_reads = OpenStream(stub, requests(), read=False, timeout=None)
        self.addCleanup(never_reads.cancel)
        self.addCleanup(steps.put, "end")
        window = self.wait_reserved(server, lambda r: r if r > 0 else 0, "the stream's window", 10)
        for chunk in range(16):
            steps.put("chunk")
            try:
                da_testing.wait_until(
                    lambda: server.metric("da_engine_runs_completed_total") > chunk, 3,
                    f"chunk {chunk} computed")
            except TimeoutError:
                break  # The engine waits on the client's reading.
        else:
            self.fail("the server's answers never waited on the client")
        self.assertGreaterEqual(chunk, 2)
        self.assertEqual(server.metric("da_memory_reserved_bytes"), window)
        steps.put("bad")
        message_bytes = (4 << 20) + 64  # One output message and its few bytes of framing.
        held = self.wait_reserved(server, lambda r: r if 0 < r <= message_bytes else 0,
                                  "the window given back, but the message in flight", 5)
        self.assertLess(time.monotonic() - sent_bad[0], 2.0)
        self.assertGreater(window, 20 * held)
        # The idle watch ends the call: the write waits on a client that reads nothing.
        self.wait_reserved(server, lambda r: r == 0, "the call to end", idle_ms / 1e3 + 10)
        self.assertLess(time.monotonic() - sent_bad[0], idle_ms / 1e3 + 5)
        da_testing.wait_until(lambda: "request id=fails-while-writing" in server.log(), 10,
                              "the request line")
        line = [l for l in server.log().splitlines() if "request id=fails-while-writing" in l][-1]
        self.assertIn("code=INVALID_ARGUMENT", line)
        self.assertIn("block", line)
        self.assertEqual(server.metric("da_in_flight_requests"), 0)

    def test_twenty_idle_streams_of_one_client_cannot_lock_out_another(self):
        folder = tempfile.TemporaryDirectory(prefix="da-tokens-")
        self.addCleanup(folder.cleanup)
        tokens = folder.name + "/tokens.txt"
        with open(tokens, "w") as f:
            f.write("hostile-token-1\nhonest-token-2\n")
        budget = 2 << 30
        # The default cap: half the budget per client.
        server, _, stub = self.start("--memory-budget-bytes", str(budget),
                                     "--stream-idle-timeout-ms", "120000",
                                     "--auth-token-file", tokens)
        hostile = [("authorization", "Bearer hostile-token-1")]
        honest = [("authorization", "Bearer honest-token-2")]
        hold = threading.Event()
        self.addCleanup(hold.set)
        header = stream_header(4 << 20)
        # One first, to learn the window a stream of this shape reserves.
        idle = [OpenStream(stub, stream_requests(header, hold=hold, blocks=0), metadata=hostile,
                           timeout=None)]
        window = self.wait_reserved(server, lambda r: r if r > 0 else 0, "the first window")
        idle += [OpenStream(stub, stream_requests(header, hold=hold, blocks=0), metadata=hostile,
                            timeout=None) for _ in range(19)]
        admitted = min(20, (budget // 2) // int(window))
        self.assertLess(admitted, 20)
        da_testing.wait_until(lambda: sum(s.ended.is_set() for s in idle) == 20 - admitted,
                              TIMEOUT_S, f"{20 - admitted} refusals for the client's cap")
        for stream in idle:
            if stream.ended.is_set():
                self.assertEqual(stream.code, grpc.StatusCode.RESOURCE_EXHAUSTED, stream.details)
                self.assertIn("(--max-client-stream-bytes)", stream.details)
        self.assertEqual(server.metric("da_memory_reserved_bytes"), admitted * window)
        self.assertLessEqual(admitted * window, budget // 2)
        self.assertEqual(server.metric('da_requests_rejected_total{reason="client_memory"}'),
                         20 - admitted)

        # The honest client still streams, and gets the right answer.
        good = OpenStream(stub, stream_requests(stream_header(8192), seed=4), metadata=honest)
        self.assertTrue(good.ended.wait(TIMEOUT_S))
        self.assertEqual(good.code, grpc.StatusCode.OK, good.details)
        hold.set()
        for stream in idle:
            stream.cancel()
        self.wait_reserved(server, lambda r: r == 0, "the idle streams' memory to return", 10)

    def test_trailer_reports_the_bytes_the_stream_reserved(self):
        server, _, stub = self.start()
        proceed = threading.Event()
        self.addCleanup(proceed.set)
        header = stream_header(16384)

        def requests():
            messages = stream_requests(header, seed=5)
            yield next(messages)  # The header, then one block, then the rest once measured.
            yield next(messages)
            proceed.wait(TIMEOUT_S)
            yield from messages

        stream = OpenStream(stub, requests())
        reserved = self.wait_reserved(server, lambda r: r if r > 0 else 0, "the window")
        proceed.set()
        self.assertTrue(stream.ended.wait(TIMEOUT_S))
        self.assertEqual(stream.code, grpc.StatusCode.OK, stream.details)
        self.assertEqual(stream.trailer.info.stream_buffer_bytes, reserved)

    # --- Answers that cannot be sent ----------------------------------------------------------

    @staticmethod
    def one_token_request(heads, dims, patterns=1):
        """fp16, one token: q of `heads` heads, k and v of one head, `patterns` patterns (1, 1)."""
        q = np.ones((1, 1, heads, dims), dtype="<f2")
        kv = np.ones((1, 1, 1, dims), dtype="<f2")
        request = pb2.AttendRequest(
            query=pb2.Tensor(dtype=pb2.DTYPE_FP16, shape=q.shape, data=q.tobytes()),
            key=pb2.Tensor(dtype=pb2.DTYPE_FP16, shape=kv.shape, data=kv.tobytes()),
            value=pb2.Tensor(dtype=pb2.DTYPE_FP16, shape=kv.shape, data=kv.tobytes()))
        request.spec.segment_lengths.extend([1] * patterns)
        request.spec.dilation_rates.extend([1] * patterns)
        return request

    def refused_with_cpu(self, server, stub, request):
        """The RpcError an Attend of request ends with, and the server's CPU seconds meanwhile."""
        cpu_before = cpu_seconds(server.process.pid)
        with self.assertRaises(grpc.RpcError) as refused:
            stub.Attend(request, timeout=TIMEOUT_S)
        return refused.exception, cpu_seconds(server.process.pid) - cpu_before

    def test_a_request_whose_answer_would_pass_the_message_limit_is_refused_before_compute(self):
        server, _, stub = self.start("--max-message-bytes", str(8 << 20))
        # 8,388,224 bytes of q (65,533 heads x 64 fp16, one token), k and v of one head: the
        # request fits 8 MiB, the answer (the output plus its framing and info) does not. Past the
        # head limit's reach: an answer exceeds q by a few hundred bytes, while k and v add
        # q / heads each, so it takes a key of one head and few dims to be over only on the way
        # back.
        request = self.one_token_request(heads=65533, dims=64)
        self.assertLess(request.ByteSize(), 8 << 20)
        refused, cpu = self.refused_with_cpu(server, stub, request)
        self.assertEqual(refused.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        details = refused.details()
        for part in ("the answer would take", "8388224 bytes", "(--max-message-bytes) is 8388608",
                     "AttendStream"):
            self.assertIn(part, details)
        values = server.metric_values()
        self.assertEqual(values["da_plan_cache_builds_total"], 0)
        self.assertEqual(values["da_engine_runs_completed_total"], 0)
        self.assertEqual(values['da_requests_total{code="RESOURCE_EXHAUSTED",method="Attend"}'], 1)
        self.assertEqual(values.get('da_requests_total{code="OK",method="Attend"}', 0), 0)
        self.assertLess(cpu, 1.0)

    def test_millions_of_heads_are_refused_before_any_compute(self):
        server, _, stub = self.start()
        # 2,097,140 heads of 16 fp16 dims and one token, 64 patterns, fit a 64 MiB message;
        # per-head tables (plans, estimates) would cost more than the request, so heads stop at
        # 65,536.
        request = self.one_token_request(heads=2097140, dims=16, patterns=64)
        self.assertLess(request.ByteSize(), 64 << 20)
        refused, cpu = self.refused_with_cpu(server, stub, request)
        self.assertEqual(refused.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("heads is 2097140; at most 65536", refused.details())
        values = server.metric_values()
        self.assertEqual(values["da_plan_cache_builds_total"], 0)
        self.assertEqual(values['da_requests_total{code="INVALID_ARGUMENT",method="Attend"}'], 1)
        self.assertLess(cpu, 1.0)

    # --- Fair queueing -------------------------------------------------------------------------

    def test_small_calls_keep_a_bounded_queue_time_next_to_streams(self):
        server, channel, stub = self.start("--max-queue", "8")
        result = stream_load.tiny_call_queue_times(pb2, stub, streams=6, seq_len=16384, tiny_calls=40,
                                       watch=lambda: server.metric("da_queue_length"))
        # With fair queueing a small call waits for the chunk in progress, not for every stream's.
        self.assertLessEqual(result["max_queue_length"], 8)
        self.assertEqual(result["stream_failures"], [])
        self.assertLess(result["tiny_p99_ms"], 2.5 * result["chunk_compute_ms"] + 50,
                        result)

    # --- Scale -------------------------------------------------------------------------------------

    def test_scales_past_the_bound_are_refused_and_the_bound_is_finite(self):
        _, _, stub = self.start()
        rng = np.random.default_rng(7)
        values = rng.standard_normal((1, 128, 1, 16)).astype("<f4")

        def request(scale):
            tensor = pb2.Tensor(dtype=pb2.DTYPE_FP32, shape=values.shape, data=values.tobytes())
            r = pb2.AttendRequest(query=tensor, key=tensor, value=tensor)
            r.spec.segment_lengths.append(128)
            r.spec.dilation_rates.append(1)
            r.spec.softmax_scale = scale
            return r

        for scale in (1e37, 3e38, -1e7):
            with self.assertRaises(grpc.RpcError) as refused:
                stub.Attend(request(scale), timeout=TIMEOUT_S)
            self.assertEqual(refused.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn("spec.softmax_scale is", refused.exception.details())
            self.assertIn("its magnitude must be at most 1e+06", refused.exception.details())
        for scale in (1e6, -1e6):
            answer = stub.Attend(request(scale), timeout=TIMEOUT_S)
            out = np.frombuffer(answer.output.data, dtype="<f4")
            self.assertTrue(np.all(np.isfinite(out)), scale)

    # --- Garbage bodies ----------------------------------------------------------------------------

    def test_garbage_bodies_get_invalid_argument_a_log_line_and_a_metric_on_every_method(self):
        server, channel, _ = self.start()
        truncated = b"\x1a\xff\xff\xff\x0f\x01"  # Field 3, a length far past the end.
        bad_utf8 = b"\x0a\x02\xc3\x28"  # Field 1 (request_id), invalid UTF-8.
        cases = [
            ("Attend", truncated), ("Attend", bad_utf8),
            ("GetServerInfo", b"\x0a\xff"),
            ("WarmUp", b"\x0a\x04" + bad_utf8), ("WarmUp", truncated),
        ]
        for method, body in cases:
            call = channel.unary_unary(SERVICE + method)  # Bytes as they are.
            with self.assertRaises(grpc.RpcError) as refused:
                call(body, timeout=TIMEOUT_S)
            error = refused.exception
            self.assertEqual(error.code(), grpc.StatusCode.INVALID_ARGUMENT, (method, body))
            self.assertIn(f"{method}: the request body ({len(body)} bytes) is not a da.v1.",
                          error.details())
        stream = channel.stream_stream(SERVICE + "AttendStream")
        with self.assertRaises(grpc.RpcError) as refused:
            list(stream(iter([bad_utf8]), timeout=TIMEOUT_S))
        self.assertEqual(refused.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertTrue(refused.exception.details())

        values = server.metric_values()
        self.assertEqual(values['da_requests_total{code="INVALID_ARGUMENT",method="Attend"}'], 2)
        self.assertEqual(
            values['da_requests_total{code="INVALID_ARGUMENT",method="GetServerInfo"}'], 1)
        self.assertEqual(values['da_requests_total{code="INVALID_ARGUMENT",method="WarmUp"}'], 2)
        self.assertEqual(values['da_requests_total{code="INVALID_ARGUMENT",method="AttendStream"}'],
                         1)
        self.assertEqual(values['da_requests_rejected_total{reason="invalid_argument"}'], 6)
        log = server.log()
        for method in ("Attend", "GetServerInfo", "WarmUp", "AttendStream"):
            self.assertRegex(log, rf"method={method} .*code=INVALID_ARGUMENT")
        # The server still answers well-formed calls.
        self.assertTrue(pb2_grpc.AttentionServiceStub(channel).GetServerInfo(
            pb2.GetServerInfoRequest(), timeout=TIMEOUT_S).version)

    # --- Connections -------------------------------------------------------------------------------

    def test_a_connection_without_calls_is_closed_after_the_idle_limit(self):
        server, channel, stub = self.start("--max-connection-idle-ms", "300")
        states = []
        channel.subscribe(states.append)
        self.assertTrue(stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=TIMEOUT_S).version)
        # The server's GOAWAY after 300 ms without a call takes the channel back to IDLE.
        da_testing.wait_until(
            lambda: grpc.ChannelConnectivity.READY in states
            and states[-1] == grpc.ChannelConnectivity.IDLE, 10,
            f"the channel to go idle (states so far: {states})")
        # A new call simply reconnects.
        self.assertTrue(stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=TIMEOUT_S).version)

    # A client that reads its answer late (tests/python/raw_h2.py): with a large window and a
    # 64 KiB receive buffer, the server writes the whole answer into its socket at once, and the
    # client reads it a second later, returning window every 256 KiB as a gRPC client does.
    # Should gRPC close the connection while the answer still waits in the server's socket, the
    # client's first WINDOW_UPDATE makes the server's kernel reset the connection and throw the
    # rest away. gRPC does that right after the last call on a connection it sent its final
    # GOAWAY to has written its answer: with the drain's GOAWAY if that went out while the call
    # ran, and on its own with --max-connection-age-ms (which is why that is off by default).

    def test_a_slow_reader_gets_its_whole_answer_when_the_server_drains_during_its_call(self):
        server, _, stub = self.start()
        # 4096 tokens, H = 1, D = 32, fp32: one chunk, a 512 KiB answer (it must fit in the
        # server's socket while the client does not read).
        header = stream_header(4096, heads=1, head_dim=32, segment=2048)
        # Blocks of 1023 tokens: the last one, 4 tokens, fits in the window the client already
        # has once it stops reading (and so stops seeing the server's WINDOW_UPDATEs).
        requests = [m.SerializeToString()
                    for m in stream_requests(header, block_tokens=1023, seed=5)]
        want = b"".join(r.block.output for r in stub.AttendStream(
            stream_requests(header, block_tokens=1023, seed=5), timeout=TIMEOUT_S)
            if r.HasField("block"))
        self.assertEqual(len(want), 4096 * 32 * 4)
        connection = raw_h2.Connection(server.port, window=1 << 30, receive_buffer=64 << 10,
                                       update_every=256 << 10)
        self.addCleanup(connection.close)
        stream = connection.open_call(SERVICE + "AttendStream")
        for message in requests[:-1]:
            connection.send_message(stream, message)
        # The call is in flight when the drain begins, and the client reads (it would answer
        # the ping of a GOAWAY) until its last block has gone.
        server.terminate()
        da_testing.wait_until(lambda: "draining" in server.log(), TIMEOUT_S, "the drain")
        time.sleep(0.5)
        connection.reading.clear()
        connection.send_message(stream, requests[-1], end_stream=True, stall_s=TIMEOUT_S)
        da_testing.wait_until(
            lambda: re.search(r"request id=\S+ method=AttendStream",
                              server.log().split("draining")[-1]),
            TIMEOUT_S, "the call to finish")
        time.sleep(1)  # The server must not close the connection while the client has not read.
        connection.reading.set()
        ended = connection.wait_ended(stream, TIMEOUT_S)
        messages = connection.messages(stream)
        self.assertTrue(ended, f"the answer ended after {len(messages)} messages "
                               f"({len(connection.received.get(stream, b''))} bytes): "
                               f"{connection.error}, resets {connection.reset}")
        answers = [pb2.AttendStreamResponse.FromString(m) for m in messages]
        self.assertTrue(answers[-1].HasField("trailer"))
        self.assertEqual(b"".join(a.block.output for a in answers if a.HasField("block")), want)
        self.assertEqual(server.stop(), 0)
        self.assertRegex(server.log(), r"drain: 1 calls in flight ended and their answers reached")

    def test_a_unary_request_still_arriving_when_the_drain_begins_is_answered_not_cut_off(self):
        # gRPC hands a unary call to the service only once its message is whole, so the drain's
        # count of calls does not see it; it must wait for the stream all the same (channelz's
        # open streams) rather than send the GOAWAY that closes the connection under it.
        server, _, _ = self.start()
        rng = np.random.default_rng(13)
        request = pb2.AttendRequest(spec=pb2.AttentionSpec(
            segment_lengths=[256], dilation_rates=[1], precision=pb2.PRECISION_FP32))
        for field in (request.query, request.key, request.value):
            field.dtype = pb2.DTYPE_FP32
            field.shape[:] = [1, 1024, 2, 64]
            field.data = rng.standard_normal(1024 * 2 * 64).astype(np.float32).tobytes()
        connection = raw_h2.Connection(server.port, window=1 << 30)
        self.addCleanup(connection.close)

        def drain_first():
            server.terminate()
            da_testing.wait_until(lambda: "draining" in server.log(), TIMEOUT_S, "the drain")
            time.sleep(0.5)  # Time for the server to close the connection, were it to.

        stream = connection.call(SERVICE + "Attend", request.SerializeToString(),
                                 before_last=drain_first)
        self.assertTrue(connection.wait_ended(stream, TIMEOUT_S),
                        f"the call got no status: {connection.error}, resets {connection.reset}; "
                        f"{server.log()}")
        self.assertEqual(connection.messages(stream), [])
        self.assertEqual(connection.reset, {})
        self.assertEqual(server.stop(), 0)
        self.assertRegex(server.log(), r"method=Attend .*code=UNAVAILABLE")

    def test_calls_that_keep_coming_during_the_drain_do_not_hold_it(self):
        # Clients that keep sending are refused ("draining") until the GOAWAY moves them; the
        # drain's wait for calls still arriving counts only those open when it began, so it ends
        # soon (well inside its 5 s bound for arrivals) however many keep coming. Eight threads
        # on one connection keep calls of 1.5 MiB open on it nearly all the time.
        server, _, stub = self.start()
        request = pb2.AttendRequest(spec=pb2.AttentionSpec(
            segment_lengths=[64], dilation_rates=[1], precision=pb2.PRECISION_FP32))
        rng = np.random.default_rng(17)
        for field in (request.query, request.key, request.value):
            field.dtype = pb2.DTYPE_FP32
            field.shape[:] = [1, 4096, 2, 16]
            field.data = rng.standard_normal(4096 * 2 * 16).astype(np.float32).tobytes()
        stop = threading.Event()
        codes = []

        def hammer():
            while not stop.is_set():
                try:
                    stub.Attend(request, timeout=TIMEOUT_S)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    codes.append(error.code())

        threads = [threading.Thread(target=hammer, daemon=True) for _ in range(8)]
        for thread in threads:
            thread.start()
        self.addCleanup(stop.set)
        da_testing.wait_until(lambda: codes.count(grpc.StatusCode.OK) >= 20, TIMEOUT_S,
                              "calls answered before the drain")
        server.terminate()
        self.assertEqual(server.wait(), 0)
        stop.set()
        for thread in threads:
            thread.join(TIMEOUT_S)
        drain = re.search(r"drain: .* in ([0-9.]+) ms; closing", server.log())
        self.assertIsNotNone(drain, server.log()[-2000:])
        print(drain.group(0))
        self.assertLess(float(drain.group(1)), 3000, drain.group(0))
        self.assertIn(grpc.StatusCode.UNAVAILABLE, codes)  # The drain did refuse some.

    # --- Memory after load -----------------------------------------------------------------------

    def test_resident_memory_returns_near_idle_after_rounds_of_concurrent_streams(self):
        pool_bytes = 256 << 20
        server, _, stub = self.start("--stream-buffer-pool-bytes", str(pool_bytes))
        header = stream_header(8192, heads=2, segment=256)
        first = OpenStream(stub, stream_requests(header))
        self.assertTrue(first.ended.wait(TIMEOUT_S))
        self.assertEqual(first.code, grpc.StatusCode.OK, first.details)
        idle_rss = rss_bytes(server.process.pid)
        peak = 0
        for round_index in range(5):
            streams = [OpenStream(stub, stream_requests(header, seed=round_index * 25 + i))
                       for i in range(25)]
            for stream in streams:
                self.assertTrue(stream.ended.wait(TIMEOUT_S))
                self.assertEqual(stream.code, grpc.StatusCode.OK, stream.details)
                peak = max(peak, rss_bytes(server.process.pid))
        # Stated bound: idle, plus the stream buffer pool's capacity, plus 128 MiB of malloc's
        # and gRPC's own (kept per heap: server/malloc_tuning.h). Given back within a second or
        # two of the last stream (the stream watch trims after it).
        bound = idle_rss + pool_bytes + (128 << 20)
        after = da_testing.wait_until(
            lambda: (lambda r: r if r <= bound else 0)(rss_bytes(server.process.pid)), 10,
            f"resident memory within {bound >> 20} MiB (idle {idle_rss >> 20} MiB)")
        print(f"resident: idle {idle_rss >> 20} MiB, peak seen {peak >> 20} MiB, after the "
              f"rounds {after >> 20} MiB (bound {bound >> 20} MiB)")

    # --- What gRPC alone holds -------------------------------------------------------------------

    def test_unary_requests_that_never_complete_hold_no_more_than_the_grpc_bound(self):
        grpc_bytes = 128 << 20
        server, _, stub = self.start("--grpc-memory-bytes", str(grpc_bytes))
        self.assertTrue(stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=TIMEOUT_S).version)
        idle_rss = rss_bytes(server.process.pid)
        # Eight calls of a 60 MiB message whose last byte never comes, on one connection: 480 MiB
        # that nothing counts but gRPC's quota (the engine sees no request until it is whole).
        connection = raw_h2.Connection(server.port)
        self.addCleanup(connection.close)
        for _ in range(8):
            connection.start_call(SERVICE + "Attend", 60 << 20, stall_s=2)
        held = rss_bytes(server.process.pid) - idle_rss
        print(f"held by the incomplete calls: {held >> 20} MiB (bound {grpc_bytes >> 20} MiB); "
              f"calls reset by the server: {sorted(connection.reset)}")
        # The quota, plus one message gRPC may have taken in as it reached it.
        self.assertLess(held, grpc_bytes + (64 << 20))
        self.assertTrue(connection.reset, "the server reset none of the calls")
        self.assertEqual(server.metric("da_memory_reserved_bytes"), 0)
        # Once that client has gone, a request is served.
        connection.close()
        rng = np.random.default_rng(7)
        request = pb2.AttendRequest(spec=pb2.AttentionSpec(segment_lengths=[64],
                                                           dilation_rates=[1]))
        for field in (request.query, request.key, request.value):
            field.dtype = pb2.DTYPE_FP32
            field.shape[:] = [1, 256, 2, 16]
            field.data = rng.standard_normal(256 * 2 * 16).astype(np.float32).tobytes()
        answer = stub.Attend(request, timeout=TIMEOUT_S)
        self.assertEqual(len(answer.output.data), 256 * 2 * 16 * 4)


def cpu_seconds(pid):
    """User + system CPU seconds of a process (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    da_testing.run_unittest(UNITTEST_ARGV)
