"""Streams and small calls as load, shared by test_hostile.py and scripts/queue-fairness: stream
messages made on demand, an AttendStream call on a thread of its own, and the queue times of small
unary calls made while streams run. Every function takes the generated da.v1 messages (pb2)."""

import threading
import time

import grpc
import numpy as np

TIMEOUT_S = 60.0


def stream_header(pb2, seq_len, heads=8, head_dim=64, segment=2048, request_id=""):
    header = pb2.StreamHeader(dtype=pb2.DTYPE_FP32, batch=1, seq_len=seq_len, heads=heads,
                              head_dim=head_dim, request_id=request_id)
    header.spec.segment_lengths.append(segment)
    header.spec.dilation_rates.append(1)
    header.spec.precision = pb2.PRECISION_FP32
    return header


def stream_requests(pb2, header, block_tokens=1024, seed=0, hold=None, blocks=None):
    """The messages of a stream with random q = k = v: the header, then blocks. With hold (an
    Event), after `blocks` blocks (None: all of them) the iterator waits on it before it ends, so
    the call stays open without sending anything."""
    rng = np.random.default_rng(seed)
    row = header.heads * header.head_dim
    block = rng.standard_normal(block_tokens * row).astype("<f4").tobytes()
    yield pb2.AttendStreamRequest(header=header)
    sent = 0
    for start in range(0, header.seq_len, block_tokens):
        if blocks is not None and sent == blocks:
            break
        count = min(block_tokens, header.seq_len - start)
        data = block[:count * row * 4]
        yield pb2.AttendStreamRequest(block=pb2.TokenBlock(
            token_start=start, token_count=count, query=data, key=data, value=data))
        sent += 1
    if hold is not None:
        hold.wait(TIMEOUT_S)


class OpenStream:
    """An AttendStream call on its own thread: sends what stream_requests yields, reads every
    answer unless read=False, and records how it ended. timeout None: no deadline (a deadline
    the server's throughput cannot meet is refused up front)."""

    def __init__(self, stub, requests, read=True, metadata=None, timeout=TIMEOUT_S):
        self.code = None
        self.details = ""
        self.trailer = None
        self.ended = threading.Event()
        self.call = stub.AttendStream(requests, metadata=metadata, timeout=timeout)
        self._thread = threading.Thread(target=self._run if read else self._wait, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            for response in self.call:
                if response.HasField("trailer"):
                    self.trailer = response.trailer
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            self.code, self.details = error.code(), error.details()
        self.ended.set()

    def _wait(self):
        # Never reads an answer. grpcio reports the status only after the answers it holds have
        # been read, so the server's side (log, metrics) is what tells how such a call ended.
        self.ended.set()

    def cancel(self):
        self.call.cancel()
        self.ended.wait(TIMEOUT_S)


def tiny_call_queue_times(pb2, stub, streams, seq_len, tiny_calls, watch, heads=8):
    """Runs `streams` AttendStreams of seq_len tokens (H = heads, D = 64, fp32, one pattern
    (2048, 1)) and, while they run, `tiny_calls` small unary calls one after another; returns the
    small calls' queue times (ExecutionInfo.queue_time_us) as p50/p99 in ms, the streams' compute
    time per chunk, and the largest queue length that `watch` (the server's da_queue_length)
    reported. The small calls start once chunks wait in the queue."""
    header = stream_header(pb2, seq_len, heads=heads)
    running = [OpenStream(stub, stream_requests(pb2, header, seed=i), timeout=None)
               for i in range(streams)]
    rng = np.random.default_rng(11)
    values = rng.standard_normal((1, 64, 1, 16)).astype("<f4")
    tensor = pb2.Tensor(dtype=pb2.DTYPE_FP32, shape=values.shape, data=values.tobytes())
    tiny = pb2.AttendRequest(query=tensor, key=tensor, value=tensor)
    tiny.spec.segment_lengths.append(64)
    tiny.spec.dilation_rates.append(1)
    tiny.spec.precision = pb2.PRECISION_FP32
    # From the moment chunks wait in the queue, the streams keep the engine busy.
    deadline = time.monotonic() + TIMEOUT_S
    while watch() < 1 and time.monotonic() < deadline and not all(s.ended.is_set()
                                                                    for s in running):
        time.sleep(0.005)
    queue_ms = []
    longest = 0
    for _ in range(tiny_calls):
        if all(s.ended.is_set() for s in running):
            break
        answer = stub.Attend(tiny, timeout=TIMEOUT_S)
        queue_ms.append(answer.info.queue_time_us / 1e3)
        longest = max(longest, watch())
    for stream in running:
        stream.ended.wait(TIMEOUT_S * 5)
    failures = [(s.code, s.details) for s in running if s.code != grpc.StatusCode.OK]
    chunks = [s.trailer.info for s in running if s.trailer is not None]
    chunk_ms = max(i.compute_time_us / max(i.stream_chunks, 1) / 1e3 for i in chunks) if chunks \
        else 0.0
    return {
        "tiny_calls": len(queue_ms),
        "tiny_p50_ms": float(np.percentile(queue_ms, 50)) if queue_ms else 0.0,
        "tiny_p99_ms": float(np.percentile(queue_ms, 99)) if queue_ms else 0.0,
        "chunk_compute_ms": chunk_ms,
        "max_queue_length": longest,
        "stream_failures": failures,
    }
