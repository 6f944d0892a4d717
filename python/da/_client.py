"""da.Client and what da.aio.Client shares with it: the checks made before anything is sent, the
requests (tensor bytes copied once, da/_wire.py), the output filled as blocks arrive, the
execution info. The two clients differ only in how a call is made and awaited."""

import contextlib
import itertools
import math
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np

from da import _stub, _tensors, _wire, errors
from da.v1 import attention_pb2 as pb

_MODES = {"longnet": pb.COMBINE_MODE_LONGNET, "grouped": pb.COMBINE_MODE_GROUPED}
_PRECISIONS = {"auto": pb.PRECISION_AUTO, "fp32": pb.PRECISION_FP32, "bf16": pb.PRECISION_BF16,
               "fp16": pb.PRECISION_FP16, "fp8": pb.PRECISION_FP8}
_PRECISION_NAMES = {value: name for name, value in _PRECISIONS.items()}
_DTYPES = {"float32": pb.DTYPE_FP32, "float16": pb.DTYPE_FP16, "bfloat16": pb.DTYPE_BF16}
# A streamed block carries about this many bytes of q, k and v (as da-client's blocks).
_BLOCK_BYTES = 4 << 20
_BLOCK_FRAMING_BYTES = 80  # More than a block message's tags and lengths take (66 at most).
_DEFAULT_MESSAGE_BYTES = 64 << 20  # The server's default --max-message-bytes.
# parallel_streams=0 sends one stream per this many bytes of q, k, v and output, at most
# _AUTO_PARALLEL_STREAMS (as da-client chooses); at most _MAX_PARALLEL_STREAMS when asked.
_PARALLEL_STREAM_BYTES = 256 << 20
_AUTO_PARALLEL_STREAMS = 4
_MAX_PARALLEL_STREAMS = 64
# A server listing this protocol feature sends an AttendStream's initial metadata, with
# _WINDOW_METADATA, as soon as it has admitted the stream's header, to a client that asks with
# _ADMISSION_REQUEST in its metadata.
_STREAM_ADMITTED = "stream-admitted-metadata"
_ADMISSION_REQUEST = ("da-stream-admission", "1")
_WINDOW_METADATA = "da-stream-window-bytes"
# A call the server refused before reading or computing anything (a draining server's
# UNAVAILABLE; protocol feature "refused-metadata") ends with this trailing metadata.
_REFUSED_METADATA = "da-refused"
_ATTEND = _stub.method_path("Attend")
_ATTEND_STREAM = _stub.method_path("AttendStream")
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_MAX_INT64 = 2**63 - 1
# Draws the jitter of retries' backoffs and connections' ages: a generator of da's own, which a
# caller's random.seed() does not make the same in every process.
_RANDOM = random.Random()


class Retry:
    """How a call the server refused before reading or computing anything is sent again.

    A draining da-server (SIGTERM, a rolling update) refuses new calls with UNAVAILABLE and the
    trailing metadata "da-refused" while it finishes the calls in flight, on the connections
    that carry them too, which stay open until then; a load balancer sends new connections to
    replicas that serve. So the call is sent again, on a connection of its own (closed after
    it), after a wait of `backoff` seconds, doubled for each further attempt up
    to `max_backoff` (each drawn between half and all of it, so that a replica's clients do not
    come back at once), for at most `attempts` attempts in all (1: never again), and only while
    what is left of the call's timeout after the wait is at least as long as the wait. Also
    retried: a call that reached a server as its gRPC was shutting down and was dropped before
    any handler saw it (CANCELLED "CANCELLED" with no metadata, grpc/grpc#41785). Nothing else
    is: an UNAVAILABLE without the metadata (a connection reset) may have come from a request
    that brought a server down, and would bring down the next.
    The defaults wait up to about 14 s in all (at least 7 s), longer than the drain grace of
    da's Kubernetes manifest (5 s).
    """

    def __init__(self, attempts=10, backoff=0.25, max_backoff=2.0):
        if isinstance(attempts, bool) or not (isinstance(attempts, int)
                                              and 1 <= attempts <= 1000):
            raise errors.invalid(f"Retry attempts is {attempts!r}; it must be an integer from "
                                 f"1 to 1000")
        self.attempts = attempts
        for name, value in (("backoff", backoff), ("max_backoff", max_backoff)):
            if isinstance(value, bool) or not (isinstance(value, (int, float))
                                               and 0 <= value <= 3600):
                raise errors.invalid(f"Retry {name} is {value!r}; it must be a number of "
                                     f"seconds from 0 to 3600")
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)

    def wait(self, attempt):
        """Seconds to wait before attempt `attempt` (2: the first retry)."""
        full = min(self.max_backoff, self.backoff * 2.0 ** min(attempt - 2, 60))
        return full * _RANDOM.uniform(0.5, 1.0)

    def __repr__(self):
        return (f"Retry(attempts={self.attempts}, backoff={self.backoff}, "
                f"max_backoff={self.max_backoff})")


def _refused_unread(error):
    """Whether a grpc.RpcError (sync or asyncio) is a refusal of a call the server neither read
    nor computed (see Retry): safe to make again as it was."""
    if not (hasattr(error, "code") and hasattr(error, "trailing_metadata")):
        return False
    code = error.code()
    trailing = tuple(error.trailing_metadata() or ())
    if code == grpc.StatusCode.UNAVAILABLE:
        return any(key == _REFUSED_METADATA for key, _ in trailing)
    initial = tuple(error.initial_metadata() or ()) if hasattr(error, "initial_metadata") else ()
    return (code == grpc.StatusCode.CANCELLED and error.details() == "CANCELLED"
            and not trailing and not initial)


class _Status(grpc.RpcError):
    """A call's status as da tells it (a refusal given back after retries; in da.aio, the
    server's status where grpc.aio lost it), with the call's metadata (what tells a refusal to
    retry, _refused_unread)."""

    def __init__(self, code, details, initial=(), trailing=()):
        super().__init__(details)
        self._code, self._details = code, details
        self._initial, self._trailing = tuple(initial or ()), tuple(trailing or ())

    def code(self):
        return self._code

    def details(self):
        return self._details

    def initial_metadata(self):
        return self._initial

    def trailing_metadata(self):
        return self._trailing


class _Attempts:
    """The attempts of one call under a Retry within its deadline (a _deadline; None: none),
    for the sync and the asyncio loops (_retrying here, _retrying in da/aio.py)."""

    def __init__(self, retry, deadline):
        self.retry, self.deadline = retry, deadline
        self.made = 0
        self.start = time.monotonic()

    def next_timeout(self):
        """The timeout of the next attempt (what is left of the deadline), counting it."""
        self.made += 1
        return _left(self.deadline)

    def pause(self, error, answered):
        """Seconds to wait before sending the call again after error, or None where it is not
        sent again: not a refusal of a call left unread (see Retry), some of its answer taken
        already (answered), its attempts made, or the next one would start past the deadline."""
        if answered or not _refused_unread(error) or self.made >= self.retry.attempts:
            return None
        pause = self.retry.wait(self.made + 1)
        # The attempt gets at least as long as the wait before it (10 ms at least): one started
        # with a moment left would only end in DEADLINE_EXCEEDED in place of the refusal.
        if (self.deadline is not None
                and time.monotonic() + pause + max(pause, 0.01) > self.deadline):
            return None
        return pause

    def given_back(self, error):
        """error as the call's end: after retries, its message says how many."""
        if self.made <= 1 or not _refused_unread(error):
            return error
        over = (time.monotonic() - self.start) * 1000
        return _Status(error.code(), f"{error.details()} (refused {self.made} times over "
                                     f"{over:.0f} ms)")


def _retrying(attempts, attempt, answered=lambda: False, stop=None):
    """attempt(timeout) under attempts (an _Attempts) until it returns or raises other than a
    refusal to retry; answered() says whether some of the attempt's answer was taken; stop (a
    threading.Event) ends a wait at once and gives the refusal back (another part failed)."""
    while True:
        try:
            return attempt(attempts.next_timeout())
        except grpc.RpcError as error:
            pause = attempts.pause(error, answered())
            if pause is None or (stop.wait(pause) if stop is not None else time.sleep(pause)):
                raise attempts.given_back(error) from None


@dataclass
class Result:
    """An output with how the server computed it.

    `output` has the query's shape, kind (numpy or torch), dtype and device; `info` is the
    server's ExecutionInfo message, whose main fields are also properties here."""
    output: object
    info: pb.ExecutionInfo

    @property
    def precision(self):
        """The precision computed in: "fp32", "bf16", "fp16" or "fp8"."""
        return _PRECISION_NAMES.get(self.info.precision_used, "auto")

    @property
    def reason(self):
        """Why the server chose that precision."""
        return self.info.precision_reason

    @property
    def devices(self):
        """The devices that computed, e.g. ["cpu:0"]."""
        return list(self.info.devices)

    @property
    def queue_time_s(self):
        """Seconds from acceptance to the start of compute."""
        return self.info.queue_time_us / 1e6

    @property
    def compute_time_s(self):
        """Seconds of compute."""
        return self.info.compute_time_us / 1e6

    @property
    def plan_cache_hit(self):
        """Whether the execution plan was warm (cached) already."""
        return self.info.plan_cache_hit

    @property
    def request_id(self):
        """The request's id: the caller's, or one the server made."""
        return self.info.request_id

    @property
    def fp8_scales(self):
        """fp8 runs: per device (and per chunk of a stream), the scales q, k and v were quantized
        with, derived from the data: [{"device": "cuda:0", "amax": (q, k, v), "scale": (q, k,
        v)}], scale = 448 / amax. Empty for other precisions."""
        return [{"device": s.device, "amax": (s.query_amax, s.key_amax, s.value_amax),
                 "scale": (s.query_scale, s.key_scale, s.value_scale)}
                for s in self.info.fp8_scales]


@dataclass
class OutputBlock:
    """One block of a streamed output (Client.attend_blocks): the tokens [token_start,
    token_start + token_count) of every batch, as [batch, token_count, heads, head_dim] in the
    first input block's kind, dtype and device."""
    token_start: int
    output: object

    @property
    def token_count(self):
        """The number of tokens in this block."""
        return self.output.shape[1]


class Client:
    """A connection to a da server.

    target: "host:port". TLS when any of tls_ca (PEM file of the CA that signed the server's
    certificate), tls_cert and tls_key (a client certificate for mutual TLS) is given; token: a
    bearer token sent with every call; timeout: the default deadline of each call in seconds
    (None: none); options: extra gRPC channel arguments; max_message_bytes: the largest message
    this client sends or receives; retry: how a call refused by a draining server is sent again
    (a da.Retry; None: never), within its timeout: info, warm_up and attend (each part of a
    parallel request on its own), not attend_blocks, whose blocks the caller produces once.

    max_connection_age: seconds (None: no limit) after which a connection takes no new calls
    (drawn between 0.9 and 1 times it per connection, so that the clients of one server do not
    all reconnect at once): the next call goes on a new connection, and so, behind a load
    balancer that spreads connections (a Kubernetes ClusterIP Service), possibly to a replica
    added since (a scale-up), which a client that calls without pause would otherwise never
    reach. Calls still running on the old connection finish there; it closes after the last.

    Thread safe, as a gRPC channel is. Usable as a context manager (closes the channels).
    """

    def __init__(self, target, *, tls_ca=None, tls_cert=None, tls_key=None, token=None,
                 timeout=None, options=(), max_message_bytes=1 << 30, retry=Retry(),
                 max_connection_age=None):
        # Calls take the multicallables of the channel of their attempt (_multicallable).
        self._token_metadata = [("authorization", f"Bearer {token}")] if token else []
        self._timeout = timeout
        self._retry = _check_retry(retry)
        self._message_limit = None  # The server's max_message_bytes (at most ours), read once.
        self._max_message_bytes = max_message_bytes
        self._channel_args = _channel_args(target, tls_ca, tls_cert, tls_key, options,
                                           max_message_bytes)
        # The client's channel and those of parallel streams (made when first needed and kept),
        # renewed by age.
        self._connections = _Connections(grpc, self._channel_args,
                                         _check_connection_age(max_connection_age))
        self._retry_channels = set()  # Those of retries in flight (_attempt_channel).
        self._retry_lock = threading.Lock()
        self._closed = False

    @property
    def connections_renewed(self):
        """How many of this client's connections have been replaced for their age so far."""
        return self._connections.renewed

    def close(self):
        """Closes the channels; calls in flight are cancelled, and later calls raise
        da.Cancelled."""
        with self._retry_lock:
            self._closed = True
            channels = [*self._retry_channels, *self._connections.close()]
            self._retry_channels = set()
        for channel in channels:
            channel.close()

    @contextlib.contextmanager
    def _held(self, index=0):
        """Channel `index` (0: the client's; 1..: those of parallel streams) for one call, from
        its first attempt to its end (_Connections)."""
        channel, stale = self._connections.take(index)
        try:
            if stale is not None:
                stale.close()
            yield channel
        finally:
            done = self._connections.give_back(channel)
            if done is not None:
                done.close()

    @contextlib.contextmanager
    def _attempt_channel(self, attempts, channel):
        """The channel of a call's attempt (after attempts.next_timeout() counted it): channel
        for the first; for a retry, a connection of its own, closed after it (da.Retry)."""
        if attempts.made <= 1:
            yield channel
            return
        fresh = _fresh_channel(grpc, self._channel_args)
        with self._retry_lock:
            if self._closed:
                fresh.close()
            else:
                self._retry_channels.add(fresh)
        try:
            _check_open(self._closed)
            yield fresh
        finally:
            with self._retry_lock:
                self._retry_channels.discard(fresh)
            fresh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _options(self, timeout, request_id=""):
        """A call's options; every call takes them first (Cancelled once closed)."""
        _check_open(self._closed)
        return _call_options(self._token_metadata, self._timeout, timeout, request_id)

    def _call(self, name, request, timeout, request_id="", retry=True):
        """The unary RPC name (_multicallable) with request, retried under self._retry (when
        retry)."""
        attempts = _Attempts(self._retry if retry else _ONCE, _deadline(self._timeout, timeout))

        def attempt(left):
            with self._attempt_channel(attempts, first) as channel:
                return _multicallable(channel, name)(request, **self._options(left, request_id))

        try:
            with self._held() as first:
                return _retrying(attempts, attempt)
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None

    def info(self, timeout=None):
        """GetServerInfo: version, build features, devices, limits, plan-cache statistics (the
        GetServerInfoResponse message)."""
        return self._call("GetServerInfo", pb.GetServerInfoRequest(), timeout)

    def health(self, service="", timeout=None):
        """grpc.health.v1 Check of service ("" liveness, "da.v1.AttentionService" readiness):
        "SERVING", "NOT_SERVING", ... (NOT_FOUND for an unknown service raises da.Error)."""
        # Not retried: a probe answers for the replica it reached.
        return _health_status(self._call("Health", _health_request(service), timeout,
                                         retry=False))

    def warm_up(self, shapes, timeout=None):
        """Builds the server's plans for shapes ahead of requests, so that their first request is
        a plan-cache hit. Each shape is a dict with "shape" ([batch, seq_len, heads, head_dim]),
        "segments" and "dilations", and optionally "kv_heads", "dtype" ("float32", "float16",
        "bfloat16", or a numpy or torch dtype), "causal", "mode", "precision" and "scale", as
        attend takes them. Returns the WarmUpResponse: one result per shape (plan key, whether it
        was warm already, bytes, build time, precision) and the plan cache after."""
        return self._call("WarmUp", _warm_up_request(shapes), timeout)

    def attend(self, q, k, v, *, segments, dilations, causal=False, mode="longnet",
               precision="auto", scale=None, out=None, stream=None, block_tokens=0,
               parallel_streams=1, request_id="", priority=0, timeout=None, return_info=False,
               progress=None, out_dtype=None):
        """Dilated attention of q over k and v.

        q is [batch, seq_len, heads, head_dim], k and v [batch, seq_len, kv_heads, head_dim]
        (kv_heads divides heads), all numpy arrays (float32, float16, ml_dtypes.bfloat16) or all
        torch tensors (float32, float16, bfloat16; any device; not requiring grad unless under
        torch.no_grad()) of one dtype. segments and dilations: the patterns (w_i, r_i). mode
        "longnet" or "grouped"; precision "auto", "fp32", "bf16", "fp16" or "fp8"; scale the
        softmax scale (default 1/sqrt(head_dim)); causal masks keys after the query.

        out_dtype: the output's dtype ("float32", "float16", "bfloat16", or a numpy or torch
        dtype) where it is not q's, e.g. float32 for bfloat16 inputs, which keeps the compute's
        fp32 result unrounded; None: q's.

        out: an array or tensor of q's shape and the output's dtype to write the output into
        (otherwise one is allocated). stream None chooses: one message when q, k, v and the output fit the
        server's message limit, else AttendStream in blocks of block_tokens tokens (0: about 4
        MiB, at most half the server's message limit), the output filled as blocks arrive.
        Either way each tensor's bytes are copied once going out and once coming back (a strided
        input's rows are gathered first: whole for one message, a block at a time for a stream).

        parallel_streams: a streamed request is cut where no segment crosses (multiples of every
        segment length) into at most this many parts, sent as concurrent AttendStream calls on
        connections of their own and written into the one output (0: one per 256 MiB of q, k, v
        and output, at most 4). One stream of gRPC moves about 1.3 GB/s on loopback; several
        move more where the cores allow, at the cost of a stream window of server memory each.
        The first part to fail fails the call with its status (its message naming the part) and
        cancels the others. A request that cannot be cut (a segment as long as the sequence)
        goes as one stream. Each part is a request of its own on the server (request id
        "<request_id>/<part>"); the info returned merges theirs.

        progress: called as progress(sent, to_send, received, to_receive) with the q, k and v
        bytes sent so far of their total and the output bytes received of theirs, on the
        calling thread: as each output block of a stream arrives, and once when the answer is
        complete, e.g. to drive a progress bar:

            bar = tqdm.tqdm(total=q.nbytes + k.nbytes + v.nbytes + out_nbytes, unit="B",
                            unit_scale=True)
            client.attend(q, k, v, ..., progress=lambda s, _, r, __: bar.update(s + r - bar.n))

        Returns the output (q's shape, kind and device; out_dtype, else q's dtype), or a Result
        with the execution info when return_info. Raises da.Error subclasses (InvalidArgument before anything is
        sent for inputs the server would refuse).
        """
        job = _Attend(q, k, v, out, _spec(segments, dilations, causal, mode, precision, scale),
                      request_id, priority, progress, block_tokens, out_dtype)
        parts = _check_parallel_streams(parallel_streams)
        deadline = _deadline(self._timeout, timeout)
        limit = self._server_message_limit(timeout)
        _check_open(self._closed)
        attempts = _Attempts(self._retry, deadline)
        try:
            if job.streams(stream, limit) and len(job.cut(parts)) > 1:
                self._stream_parts(job, limit, block_tokens, deadline)
            elif job.streams(stream, limit):
                part = job.parts[0]

                def attempt(left):
                    part.restart()
                    with self._attempt_channel(attempts, first) as channel:
                        answers = channel.stream_stream(_ATTEND_STREAM)(
                            job.stream_requests(limit, block_tokens),
                            **self._options(left, request_id))
                        try:
                            for message in answers:
                                job.take_stream_message(message)
                        finally:
                            answers.cancel()  # Nothing once the stream has ended; else stops it.

                with self._held() as first:
                    _retrying(attempts, attempt, lambda: part.answered)
            else:
                request = job.unary_request()

                def attempt(left):
                    with self._attempt_channel(attempts, first) as channel:
                        return channel.unary_unary(_ATTEND)(request,
                                                            **self._options(left, request_id))

                with self._held() as first:
                    job.take_unary_response(_retrying(attempts, attempt))
        except grpc.RpcError as error:
            raise job.parts[0].failure(error) from None
        return job.result(return_info)

    def attend_blocks(self, blocks, *, seq_len, segments, dilations, causal=False,
                      mode="longnet", precision="auto", scale=None, request_id="", priority=0,
                      timeout=None):
        """Streams a sequence the caller produces block by block and need not hold whole.

        blocks: an iterable of (q, k, v) blocks, each [batch, tokens, heads, head_dim] and
        [batch, tokens, kv_heads, head_dim] (any number of tokens, numpy arrays or torch tensors
        as attend takes them), pulled only as the transport can send them; seq_len: their total
        number of tokens. Returns a BlockStream: iterate it for OutputBlocks in token order, as
        the server computes them; its `info` is the execution info once it has ended. Stopping
        early (break, close()) cancels the call on the server.

        gRPC pulls the blocks on a thread of its own, which only sees the call end when the
        iterable returns its next block: one that never returns (waiting for input that never
        comes) holds that thread, and what it refers to, after the call has failed. da cannot
        interrupt it; give such a producer a timeout or an end of its own.
        """
        _check_priority(priority)  # Before the server is asked anything.
        _check_seq_len(seq_len)
        deadline = _deadline(self._timeout, timeout)
        feed = _BlockFeed(blocks, seq_len,
                          _spec(segments, dilations, causal, mode, precision, scale),
                          request_id, priority, self._server_message_limit(timeout))
        timeout = _left(deadline)
        return BlockStream(self._held, feed, self._options(timeout, request_id))

    def _server_message_limit(self, timeout):
        if self._message_limit is None:
            self._message_limit = _message_limit(self.info(timeout), self._max_message_bytes)
        return self._message_limit

    def _stream_parts(self, job, limit, block_tokens, deadline):
        """Streams job's parts as concurrent calls. A thread per call hands its answers over a
        bounded queue (a call whose answers are not taken waits, and so does its server); this
        thread writes them into the output and reports progress. A part the server refuses
        unread is sent again on its own (its thread waits, self._retry). Raises the first
        part's failure after cancelling every call."""
        with contextlib.ExitStack() as held:
            # This client's connection, then those of the parts, connections of their own.
            channels = [held.enter_context(self._held(i)) for i in range(len(job.parts))]
            self._stream_parts_on(channels, job, limit, block_tokens, deadline)

    def _stream_parts_on(self, channels, job, limit, block_tokens, deadline):
        """_stream_parts, on channels (one per part)."""
        calls = [None] * len(job.parts)  # Each part's call of the moment.
        lock = threading.Lock()  # Guards calls against the cancelling below.
        stop = threading.Event()  # Set once the request has ended: no more calls.
        arrived = queue.Queue(maxsize=2 * len(calls))

        def pump(index):
            part, answered = job.parts[index], False

            def attempt(left):
                nonlocal answered
                part.restart()
                with self._attempt_channel(attempts, channels[index]) as channel:
                    with lock:
                        if stop.is_set():
                            return
                        call = calls[index] = channel.stream_stream(_ATTEND_STREAM)(
                            part.requests(limit, block_tokens),
                            **self._options(left, part.request_id))
                    for message in call:
                        answered = True
                        arrived.put((index, message))

            attempts = _Attempts(self._retry, deadline)
            try:
                _retrying(attempts, attempt, lambda: answered, stop)
                arrived.put((index, None))  # Ended.
            except BaseException as error:  # Ended; raised on the caller's thread.
                arrived.put((index, error))

        threads = [threading.Thread(target=pump, args=(i,), name=f"da-part-{i + 1}",
                                    daemon=True) for i in range(len(calls))]
        for thread in threads:
            thread.start()
        ended = 0
        try:
            while ended < len(calls):
                index, item = arrived.get()
                if item is None or isinstance(item, BaseException):
                    ended += 1
                    if item is not None:
                        raise job.parts[index].failure(item)
                else:
                    job.parts[index].take_message(item)
        finally:
            with lock:
                stop.set()
                for call in calls:
                    if call is not None:
                        call.cancel()  # Nothing for a call that has ended; else stops its work.
            while ended < len(calls):  # Every pump ends (none waits on a full queue).
                _, item = arrived.get()
                ended += item is None or isinstance(item, BaseException)
            for thread in threads:
                thread.join()


class BlockStream:
    """The output of Client.attend_blocks: an iterator of OutputBlocks, and `info` (the
    ExecutionInfo message) once it has ended."""

    def __init__(self, held, feed, options):
        self.info = None
        self._held = held  # The client's _held: its channel for the call's duration.
        self._feed = feed
        self._options = options
        self._answers = None

    def __iter__(self):
        with self._held() as channel:
            self._answers = _multicallable(channel, "AttendStream")(self._feed.requests(),
                                                                    **self._options)
            try:
                for message in self._answers:
                    block = self._feed.take_stream_message(message)
                    if block is not None:
                        yield block
                self.info = self._feed.finish()
            except grpc.RpcError as error:
                raise self._feed.failure(error) from None
            finally:
                self._answers.cancel()
                self._answers = None  # Not kept past its end (aio's BlockStream says why).

    def close(self):
        """Cancels the call (if it has not ended)."""
        answers = self._answers  # Once: the iterating thread drops it as the call ends.
        if answers is not None:
            answers.cancel()


def _channel_args(target, tls_ca, tls_cert, tls_key, options, max_message_bytes):
    """What a client makes its channels from (_make_channel): target, the credentials (None:
    plaintext; TLS when any TLS file is given, read here, once, so that channels made later
    need neither the files nor their paths), the channel options with messages up to
    max_message_bytes both ways."""
    channel_options = (("grpc.max_receive_message_length", max_message_bytes),
                       ("grpc.max_send_message_length", max_message_bytes), *options)
    return target, _credentials(tls_ca, tls_cert, tls_key), channel_options


def _make_channel(module, channel_args, argument=None):
    """A channel of module (grpc or grpc.aio) from _channel_args, plus the channel argument
    `argument` when given: one no other channel has gets a connection of its own from gRPC."""
    target, credentials, options = channel_args
    options = [*options, argument] if argument else list(options)
    if credentials is None:
        return module.insecure_channel(target, options=options)
    return module.secure_channel(target, credentials, options=options)


def _credentials(tls_ca, tls_cert, tls_key):
    """TLS channel credentials from the PEM files given, None for plaintext (none given)."""
    if not (tls_ca or tls_cert or tls_key):
        return None
    if bool(tls_cert) != bool(tls_key):
        raise errors.invalid("tls_cert and tls_key go together")

    def read(name, path):
        """The PEM file's bytes; one without a PEM block (empty, a directory, /dev/null) is
        refused: an empty CA must not stand for the system's public roots."""
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                pem = f.read()
        except OSError as error:
            raise errors.invalid(f"{name} {path}: cannot read: {error.strerror}") from None
        if b"-----BEGIN " not in pem:
            raise errors.invalid(f"{name} {path}: no PEM block ('-----BEGIN') in its "
                                 f"{len(pem)} bytes")
        return pem

    return grpc.ssl_channel_credentials(root_certificates=read("tls_ca", tls_ca),
                                        private_key=read("tls_key", tls_key),
                                        certificate_chain=read("tls_cert", tls_cert))


async def _as_async(items):
    """An async iterator over items, an async or a sync iterable."""
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


# Numbers the retries' channels (_fresh_channel).
_FRESH_CHANNELS = itertools.count(1)


def _fresh_channel(module, channel_args):
    """A channel of module (grpc or grpc.aio) with a connection of its own: where a call a
    draining server refused is sent again (da.Retry)."""
    return _make_channel(module, channel_args, ("da.retry_channel", next(_FRESH_CHANNELS)))


def _multicallable(channel, name):
    """The multicallable of RPC name on channel (grpc or grpc.aio): "Attend" and "AttendStream"
    take and give bytes (da/_wire.py), "Health" is grpc.health.v1's Check on bytes, others are
    da/_stub.py's, on messages."""
    if name == "Attend":
        return channel.unary_unary(_ATTEND)
    if name == "AttendStream":
        return channel.stream_stream(_ATTEND_STREAM)
    if name == "Health":
        return channel.unary_unary(_HEALTH_CHECK)
    return _stub._multicallable(channel, name)


def _part_channel(module, channel_args, number):
    """Channel `number` (from 1) of a client's parallel streams, for module (grpc or grpc.aio)."""
    return _make_channel(module, channel_args, ("da.channel_id", number))


# Numbers the channels made to replace aged ones (_Connections).
_RENEWED_CHANNELS = itertools.count(1)


class _Connections:
    """A client's channels, for da.Client and da.aio.Client (module grpc or grpc.aio): slot 0
    the client's own, slots 1.. those of parallel streams, made when first needed. Each call
    takes its slot's channel with take() and gives it back with give_back(). With max_age
    (seconds), a slot whose channel has taken new calls for that long (drawn between 0.9 and 1
    times it) gets a new channel of its own for the calls after; the calls still on the old one
    finish there, and it is closed once the last of them has given it back. The closing is the
    caller's (grpc.aio's close() is awaited): take(), give_back() and close() return the
    channels to close."""

    def __init__(self, module, channel_args, max_age):
        self._module = module
        self._channel_args = channel_args
        self._max_age = max_age
        # Reentrant: a channel made under it may start the garbage collector, whose finalizing
        # of an abandoned BlockStream gives its channel back on this thread.
        self._lock = threading.RLock()
        first = _make_channel(module, channel_args)
        self._slots = [[first, self._renew_at()]]  # [channel, when it is replaced]
        self._calls = {}  # Channel: calls on it now.
        self._retired = set()  # Replaced channels that calls still hold.
        self.renewed = 0  # Channels replaced for their age.
        self.closed = False

    def _renew_at(self):
        if self._max_age is None:
            return math.inf
        return time.monotonic() + self._max_age * _RANDOM.uniform(0.9, 1.0)

    def take(self, index):
        """(channel, stale): slot index's channel, counted as held by one more call, and the
        channel it replaced when it was too old and no call held it (else None). Cancelled
        once closed."""
        with self._lock:
            _check_open(self.closed)
            while len(self._slots) <= index:
                number = len(self._slots)
                self._slots.append([_part_channel(self._module, self._channel_args, number),
                                    self._renew_at()])
            slot, stale = self._slots[index], None
            if time.monotonic() >= slot[1]:
                old = slot[0]
                slot[0] = _make_channel(self._module, self._channel_args,
                                        ("da.renewed_channel", next(_RENEWED_CHANNELS)))
                slot[1] = self._renew_at()
                self.renewed += 1
                if old in self._calls:
                    self._retired.add(old)
                else:
                    stale = old
            channel = slot[0]
            self._calls[channel] = self._calls.get(channel, 0) + 1
            return channel, stale

    def give_back(self, channel):
        """A call is done with channel; the channel to close now (a replaced one that no call
        holds any more), else None."""
        with self._lock:
            self._calls[channel] -= 1
            if self._calls[channel] > 0:
                return None
            del self._calls[channel]
            if channel in self._retired:
                self._retired.discard(channel)
                return channel
            return None

    def close(self):
        """Every channel, to close; later take()s raise da.Cancelled."""
        with self._lock:
            self.closed = True
            channels = [slot[0] for slot in self._slots] + list(self._retired)
            self._retired = set()
            return channels


async def _after_admission(requests, call):
    """requests (a sync or async iterable of encoded AttendStream requests) for a grpc.aio call
    to a server that admits streams with its initial metadata (_STREAM_ADMITTED): the header,
    then, once the server has admitted the stream, the rest; nothing more when it refused it.

    grpc.aio (up to at least 1.85) reports a write that fails because the server has ended the
    call as INTERNAL "Internal error from Core", in place of the server's status
    (grpc/grpc#36066): a stream refused at its header (over the memory budget, the queue full,
    too many tokens) while a block was being written lost its RESOURCE_EXHAUSTED. Waiting for
    the admission means no block is in flight when a header is refused. call: the call they are
    written to (da.aio writes them itself, call.write)."""
    admitted = None

    async def admit():
        metadata = await call.initial_metadata()
        return any(key == _WINDOW_METADATA for key, _ in (metadata or ()))

    async for message in _as_async(requests):
        yield message
        if admitted is None:
            admitted = await admit()
        if not admitted:
            return


_ONCE = Retry(attempts=1)


def _check_retry(retry):
    """retry as a client keeps it: a Retry, None for none."""
    if retry is None:
        return _ONCE
    if not isinstance(retry, Retry):
        raise errors.invalid(f"retry is {retry!r}; it must be a da.Retry or None")
    return retry


def _check_connection_age(max_connection_age):
    """max_connection_age (seconds, or None) checked: above 0."""
    if max_connection_age is None:
        return None
    if isinstance(max_connection_age, bool) or not isinstance(max_connection_age, (int, float)) \
            or not max_connection_age > 0:
        raise errors.invalid(f"max_connection_age is {max_connection_age!r}; it must be a "
                             f"number of seconds above 0, or None")
    return float(max_connection_age)


def _check_open(closed):
    """Cancelled for a call on a client that has been closed (gRPC's own refusal is a
    ValueError)."""
    if closed:
        raise errors.Cancelled(grpc.StatusCode.CANCELLED, "the client is closed")


def _call_options(token_metadata, default_timeout, timeout, request_id):
    metadata = list(token_metadata)
    if request_id:
        metadata.append(("x-request-id", request_id))
    return {"timeout": timeout if timeout is not None else default_timeout,
            "metadata": metadata}


def _message_limit(info, client_limit):
    """The largest message both ends take: the server's max_message_bytes and this client's
    (max_message_bytes; gRPC takes -1 for no limit)."""
    limit = info.limits.max_message_bytes
    limit = limit if limit > 0 else _DEFAULT_MESSAGE_BYTES
    return min(limit, client_limit) if client_limit > 0 else limit


def _deadline(default_timeout, timeout):
    """The time.monotonic() by which a call made now ends, or None: taken before the call is
    made, so no later than the deadline gRPC gives it."""
    seconds = timeout if timeout is not None else default_timeout
    return None if seconds is None else time.monotonic() + seconds


def _left(deadline):
    """Seconds left until a _deadline (None: none), for a call made after another (the first
    call's GetServerInfo) took some of the time."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _spec(segments, dilations, causal, mode, precision, scale):
    """The AttentionSpec, after the checks that need no server (with the server's wording)."""
    segments, dilations = list(segments), list(dilations)
    if not segments or len(segments) != len(dilations):
        raise errors.invalid(f"spec: {len(segments)} segment lengths and {len(dilations)} "
                             "dilation rates; they must be equal in number and at least one")
    if mode not in _MODES:
        raise errors.invalid(f"mode '{mode}' is not longnet or grouped")
    if precision not in _PRECISIONS:
        raise errors.invalid(f"precision '{precision}' is not one of {sorted(_PRECISIONS)}")
    # Whole numbers the wire's int64 holds (the server checks the ranges): 2048.7 is not 2048.
    spec = pb.AttentionSpec(segment_lengths=[_check_int(f"segments[{i}]", w, 1, _MAX_INT64)
                                             for i, w in enumerate(segments)],
                            dilation_rates=[_check_int(f"dilations[{i}]", r, 1, _MAX_INT64)
                                            for i, r in enumerate(dilations)],
                            causal=bool(causal),
                            combine_mode=_MODES[mode], precision=_PRECISIONS[precision])
    if scale is not None:
        spec.softmax_scale = float(scale)
    return spec


def _host_tensors(q, k, v):
    """q, k and v as HostTensors, after the shape and dtype checks the server would make."""
    q, k, v = (_tensors.HostTensor(name, t) for name, t in (("query", q), ("key", k),
                                                             ("value", v)))
    for name, tensor in (("key", k), ("value", v)):
        if not tensor.same_kind(q):
            raise errors.invalid(f"{name} dtype {tensor.dtype_name} differs from query dtype "
                                 f"{q.dtype_name}")
        if (tensor.shape[0], tensor.shape[1], tensor.shape[3]) != (
                q.shape[0], q.shape[1], q.shape[3]):
            raise errors.invalid(f"{name} shape {list(tensor.shape)} must match query shape "
                                 f"{list(q.shape)} in batch, seq_len and head_dim")
    if v.shape != k.shape:
        raise errors.invalid(f"value shape {list(v.shape)} differs from key shape "
                             f"{list(k.shape)}")
    for name, tensor in (("query", q), ("key", k), ("value", v)):
        for dim, size in zip(("batch", "seq_len", "heads", "head_dim"), tensor.shape):
            if size < 1:
                raise errors.invalid(f"{name}.shape {dim} is {size}; must be >= 1")
    if q.shape[2] % k.shape[2] != 0:
        raise errors.invalid(f"heads {q.shape[2]} is not a multiple of kv_heads {k.shape[2]}")
    return q, k, v


def _block_tokens(q, k, message_limit, requested):
    """Tokens per streamed block: as requested (InvalidArgument where its block, of at most q's
    tokens, does not fit a message), or about 4 MiB of q, k and v and never more than half a
    message."""
    token_bytes = q.shape[0] * (q.shape[2] + 2 * k.shape[2]) * q.shape[3] * q.raw.itemsize
    if requested > 0:
        block_bytes = min(requested, q.shape[1]) * token_bytes + _BLOCK_FRAMING_BYTES
        if block_bytes > message_limit:
            raise errors.invalid(f"block_tokens {requested}: a block's message of up to "
                                 f"{block_bytes} bytes exceeds the message limit of "
                                 f"{message_limit} bytes")
        return requested
    return max(1, min(_BLOCK_BYTES, message_limit // 2) // token_bytes)


def _stream_header(q, k, seq_len, spec, request_id, priority, out_wire=pb.DTYPE_UNSPECIFIED):
    batch, _, heads, head_dim = q.shape
    header = pb.StreamHeader(request_id=request_id, spec=spec, dtype=q.wire, batch=batch,
                             seq_len=seq_len, heads=heads, kv_heads=k.shape[2],
                             head_dim=head_dim, priority=priority, output_dtype=out_wire)
    return _wire.message_field(1, header)


def _rows(raw, start, end):
    """The buffers of tokens [start, end) of every batch of raw: one contiguous run per batch
    (gathered here where raw is strided, so that a strided input is never copied whole)."""
    return [memoryview(np.ascontiguousarray(raw[b, start:end])) for b in range(raw.shape[0])]


def _block_message(token_start, q, k, v, start, end):
    """AttendStreamRequest{block}: tokens [start, end) of q, k and v (HostTensors) sent as
    tokens token_start + [0, end - start) of the stream."""
    block = [_wire.int_field(1, token_start), _wire.int_field(2, end - start)]
    for field, tensor in ((3, q), (4, k), (5, v)):
        block += _wire.bytes_field(field, _rows(tensor.raw, start, end))
    return _wire.join(_wire.bytes_field(2, block))


def _read_stream_message(data):
    """An encoded AttendStreamResponse as ("block", token_start, token_count, output bytes),
    ("trailer", ExecutionInfo) or ("header", output dtype)."""
    for field, value in _wire.fields(data):
        if field == 2:
            block = dict(_wire.fields(value))
            return "block", block.get(1, 0), block.get(2, 0), block.get(3, memoryview(b""))
        if field == 3:
            return "trailer", pb.StreamTrailer.FromString(value).info
        if field == 1:
            return "header", dict(_wire.fields(value)).get(2, pb.DTYPE_UNSPECIFIED)
    return "header", pb.DTYPE_UNSPECIFIED


def _check_answer_dtype(got, wanted, where=""):
    """The answer's dtype must be the one asked for: a server older than output_dtype answers
    in the inputs' dtype."""
    if got != wanted:
        name = pb.DType.Name(got) if got in pb.DType.values() else str(got)
        raise _internal(f"{where}the answer is {name}, not the {pb.DType.Name(wanted)} asked for "
                        "(a server older than output_dtype answers in the inputs' dtype)")


def _internal(message):
    return errors.Error(grpc.StatusCode.INTERNAL, message)


def _rows_from_wire(data, dtype, shape, what):
    """The output bytes of a message as an array of shape (not copied), checked for size."""
    rows = np.frombuffer(data, dtype=dtype)
    if rows.size != int(np.prod(shape)):
        raise _internal(f"{what} has {rows.size} elements, expected {list(shape)}")
    return rows.reshape(shape)


def _check_int(name, value, low, high):
    """value as an int in [low, high] (a Python or numpy integer, not a bool), or
    InvalidArgument naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not (
            low <= value <= high):
        raise errors.invalid(f"{name} {value!r} must be an int from {low} to {high}")
    return int(value)


def _check_priority(priority):
    return _check_int("priority", priority, -2**31, 2**31 - 1)  # The wire's int32.


def _check_seq_len(seq_len):
    return _check_int("seq_len", seq_len, 1, _MAX_INT64)


def _check_parallel_streams(parallel_streams):
    """parallel_streams as an int in [0, _MAX_PARALLEL_STREAMS], or InvalidArgument."""
    if isinstance(parallel_streams, (bool, np.bool_)) or not isinstance(
            parallel_streams, (int, np.integer)) or not (
            0 <= parallel_streams <= _MAX_PARALLEL_STREAMS):
        raise errors.invalid(f"parallel_streams {parallel_streams!r} must be an int from 0 "
                             f"(chosen from the request's size) to {_MAX_PARALLEL_STREAMS}")
    return int(parallel_streams)


def _chunk_tokens(segments, seq_len):
    """The least common multiple of the segment lengths (every segment of every pattern starts
    at a multiple of it), or seq_len when that is at least seq_len: no cut is possible."""
    chunk = 1
    for w in segments:
        if w < 1 or w >= seq_len:
            return seq_len
        chunk = chunk // math.gcd(chunk, w) * w
        if chunk >= seq_len:
            return seq_len
    return chunk


def _cut_parts(segments, seq_len, parts):
    """[0, seq_len) cut at multiples of _chunk_tokens into at most `parts` (begin, end) ranges
    of whole chunks, as even as the chunks allow (as da-client's CutParts)."""
    chunk = _chunk_tokens(segments, seq_len)
    chunks = -(-seq_len // chunk)
    count = min(max(parts, 1), max(chunks, 1))
    return [(i * chunks // count * chunk, min(seq_len, (i + 1) * chunks // count * chunk))
            for i in range(count)]


def _merge_infos(infos):
    """One ExecutionInfo for the parts of a call (as da-client's MergePartInfos): the first
    part's, with every part's devices, the longest queue and total times, the summed compute and
    plan-build times, chunks and stream buffers, a plan-cache hit only when every part had one,
    every part's fp8 scales in order and the request ids joined by commas."""
    merged = pb.ExecutionInfo()
    merged.CopyFrom(infos[0])
    del merged.devices[:]
    for info in infos:
        merged.devices.extend(d for d in info.devices if d not in merged.devices)
    for info in infos[1:]:
        merged.queue_time_us = max(merged.queue_time_us, info.queue_time_us)
        merged.total_time_us = max(merged.total_time_us, info.total_time_us)
        merged.compute_time_us += info.compute_time_us
        merged.plan_build_time_us += info.plan_build_time_us
        merged.plan_cache_hit = merged.plan_cache_hit and info.plan_cache_hit
        merged.stream_chunk_tokens = max(merged.stream_chunk_tokens, info.stream_chunk_tokens)
        merged.stream_chunks += info.stream_chunks
        merged.stream_buffer_bytes += info.stream_buffer_bytes
        merged.fp8_scales.extend(info.fp8_scales)
    merged.request_id = ",".join(info.request_id for info in infos)
    return merged


class _Attend:
    """One attend call on whole tensors: its checks, requests and output, made the same way by
    the sync and the asyncio client. Streamed, it is one or more parts (_Part), each a request
    of its own."""

    def __init__(self, q, k, v, out, spec, request_id, priority, progress=None, block_tokens=0,
                 out_dtype=None):
        self.q, self.k, self.v = _host_tensors(q, k, v)
        self.out_wire = _output_wire(out_dtype)  # DTYPE_UNSPECIFIED: q's.
        self.answer_wire = self.out_wire or self.q.wire  # The dtype the output comes in.
        self.output = _tensors.Output(
            self.q.with_dtype(self.out_wire) if self.out_wire else self.q, out)
        self.spec = spec
        self.request_id = request_id
        self.priority = _check_priority(priority)
        self.block_tokens = _check_int("block_tokens", block_tokens, 0, 2**62)
        self.info = None
        self.progress = progress
        self.to_send = self.q.nbytes + self.k.nbytes + self.v.nbytes
        self.parts = [_Part(self, 0, self.q.shape[1], 0)]

    @property
    def sent(self):
        """Bytes of q, k and v gRPC has pulled (each part's counter written by its thread)."""
        return sum(part.sent for part in self.parts)

    @property
    def received(self):
        return sum(part.received for part in self.parts)

    def report(self):
        if self.progress is not None:
            self.progress(self.sent, self.to_send, self.received, self.output.raw.nbytes)

    def streams(self, stream, message_limit):
        """Whether to stream: as asked, or when q, k, v and the output do not fit one message
        (with room for framing). A stream's block_tokens is checked here, before it is sent."""
        if stream is None:
            stream = (self.q.nbytes + self.output.raw.nbytes + self.k.nbytes + self.v.nbytes >
                      0.9 * message_limit)
        if stream:
            _block_tokens(self.q, self.k, message_limit, self.block_tokens)
        return stream

    def cut(self, parallel_streams):
        """Cuts the call into at most parallel_streams parts (0: one per
        _PARALLEL_STREAM_BYTES, at most _AUTO_PARALLEL_STREAMS); returns them."""
        wanted = parallel_streams or min(_AUTO_PARALLEL_STREAMS, max(
            1, (self.to_send + self.output.raw.nbytes) // _PARALLEL_STREAM_BYTES))
        ranges = _cut_parts(self.spec.segment_lengths, self.q.shape[1], wanted)
        self.parts = [_Part(self, begin, end, i + 1 if len(ranges) > 1 else 0)
                      for i, (begin, end) in enumerate(ranges)]
        return self.parts

    def unary_request(self):
        """AttendRequest, encoded."""
        parts = []
        if self.request_id:
            parts += _wire.bytes_field(1, [self.request_id.encode()])
        parts.append(_wire.message_field(2, self.spec))
        for field, tensor in ((3, self.q), (4, self.k), (5, self.v)):
            header = pb.Tensor(dtype=tensor.wire, shape=tensor.shape).SerializeToString()
            data = np.ascontiguousarray(tensor.raw)  # A strided input gathered whole.
            parts += _wire.bytes_field(field, [header, *_wire.bytes_field(3, [data])])
        parts.append(_wire.int_field(6, self.priority))
        if self.out_wire:
            parts.append(_wire.int_field(7, self.out_wire))
        return _wire.join(parts)

    def take_unary_response(self, data):
        """Copies the output of an encoded AttendResponse into place; keeps the info."""
        whole = self.parts[0]
        for field, value in _wire.fields(data):
            if field == 1:
                tensor = dict(_wire.fields(value))
                _check_answer_dtype(tensor.get(1, pb.DTYPE_UNSPECIFIED), self.answer_wire)
                raw = self.output.raw
                np.copyto(raw, _rows_from_wire(tensor.get(3, b""), raw.dtype, raw.shape,
                                               "the output"))
                whole.next_token = raw.shape[1]
                whole.sent, whole.received = self.to_send, raw.nbytes
            elif field == 2:
                whole.info = pb.ExecutionInfo.FromString(value)

    def stream_requests(self, message_limit, block_tokens):
        """The encoded AttendStream requests of the call as one stream: the header, then blocks
        of block_tokens tokens."""
        return self.parts[0].requests(message_limit, block_tokens)

    def take_stream_message(self, data):
        """Fills the output from an encoded AttendStreamResponse of the one stream."""
        self.parts[0].take_message(data)

    def result(self, return_info):
        self.complete()
        return self.packaged(self.output.result(), return_info)

    def complete(self):
        """Checks that every part has its whole answer, merges the infos, reports progress."""
        for part in self.parts:
            part.check_complete()
        infos = [part.info for part in self.parts]
        self.info = infos[0] if len(infos) == 1 else _merge_infos(infos)
        self.report()

    def packaged(self, output, return_info):
        """What the caller gets for output (self.output.result(), after complete())."""
        return Result(output, self.info) if return_info else output


class _Part:
    """Tokens [begin, end) of an _Attend streamed as a request of its own: the whole call, or
    part `number` (from 1) of its parallel streams."""

    def __init__(self, job, begin, end, number):
        self.job = job
        self.begin, self.end = begin, end
        self.number = number
        self.request_id = (f"{job.request_id}/{number}" if job.request_id and number
                           else job.request_id)
        self.attempt = 0  # Counted by restart().
        self.restart()

    def restart(self):
        """The part as before its call: for the call's first attempt, or another after the
        server refused it unread (nothing of its answer taken). The requests of an attempt
        before (gRPC's thread may still pull one more) count nothing any more."""
        self.attempt += 1
        self.next_token = 0  # Of the part's own tokens: the next output block's start.
        self.sent = 0  # Bytes of q, k and v; written by gRPC's thread that pulls the requests.
        self.received = 0
        self.info = None
        self.error = None  # What made requests() fail.
        self.answered = False  # A message of the answer was taken.

    def where(self):
        """How messages name the part ("" for a whole call)."""
        if not self.number:
            return ""
        return (f"part {self.number} of {len(self.job.parts)} (tokens "
                f"{self.begin}..{self.end}): ")

    def requests(self, message_limit, block_tokens):
        """The encoded AttendStream requests: the header, then blocks of block_tokens tokens,
        numbered from the part's start. An exception here is kept (gRPC cancels the call and
        says only that the requests failed) and raised by failure()."""
        attempt = self.attempt
        try:
            yield from self._requests(message_limit, block_tokens, attempt)
        except Exception as error:
            if attempt == self.attempt:
                self.error = error
            raise

    def _requests(self, message_limit, block_tokens, attempt):
        job = self.job
        q, k, v = job.q, job.k, job.v
        yield _stream_header(q, k, self.end - self.begin, job.spec, self.request_id,
                             job.priority, job.out_wire)
        step = _block_tokens(q, k, message_limit, block_tokens)
        token_bytes = job.to_send // q.shape[1]
        for start in range(self.begin, self.end, step):
            end = min(self.end, start + step)
            if attempt == self.attempt:
                self.sent += (end - start) * token_bytes
            yield _block_message(start - self.begin, q, k, v, start, end)

    def take_message(self, data):
        """Fills the part's rows of the output from an encoded AttendStreamResponse (blocks
        arrive in order); keeps the trailer's info."""
        self.answered = True
        kind, *rest = _read_stream_message(data)
        if kind == "trailer":
            self.info = rest[0]
        elif kind == "header":
            _check_answer_dtype(rest[0], self.job.answer_wire, self.where())
        elif kind == "block":
            start, count, data = rest
            job = self.job
            raw = job.output.raw
            if start != self.next_token or count < 1 or start + count > self.end - self.begin:
                raise _internal(f"{self.where()}output block of {count} tokens at token "
                                f"{self.begin + start}, expected token "
                                f"{self.begin + self.next_token}")
            batch, _, heads, head_dim = raw.shape
            first = self.begin + start
            raw[:, first:first + count] = _rows_from_wire(
                data, raw.dtype, (batch, count, heads, head_dim), "an output block")
            self.next_token += count
            self.received += len(data)
            if job.received < raw.nbytes:  # The last block's report is result()'s.
                job.report()

    def check_complete(self):
        if self.next_token != self.end - self.begin or self.info is None:
            raise _internal(f"{self.where()}the answer ended after "
                            f"{self.begin + self.next_token} of {self.end} tokens")

    def failure(self, error):
        """The exception for the part's failed call, its message naming the part: the error of
        its requests where they failed (gRPC then cancels the call), else the call's status."""
        if self.error is not None:
            return self.error
        if not isinstance(error, grpc.RpcError):
            return error
        failed = errors.from_rpc_error(error)
        return type(failed)(failed.code, self.where() + failed.message)


_ENDED = object()  # next()'s default: the blocks have ended.


def _callers_grad_mode():
    """A context manager factory that puts another thread in this thread's torch grad mode
    (thread-local): torch.no_grad where the caller has grad off (no_grad, inference_mode)."""
    torch = sys.modules.get("torch")
    if torch is not None and not torch.is_grad_enabled():
        return torch.no_grad
    return contextlib.nullcontext


class _BlockFeed:
    """The iterator form's requests, pulled from the caller's blocks as the transport asks, and
    its output blocks. An exception raised by the caller's iterable (or a check of its blocks)
    is kept and raised in place of the cancelled call's status."""

    def __init__(self, blocks, seq_len, spec, request_id, priority, message_limit):
        self.blocks = blocks
        self.seq_len = _check_seq_len(seq_len)
        self.spec = spec
        self.request_id = request_id
        self.priority = _check_priority(priority)
        self.message_limit = message_limit
        self.first = None  # The first block's query: the shape and kind every block must have.
        self.first_kv = None
        self.sent = 0  # Tokens sent.
        self.received = 0  # Tokens received.
        self.error = None
        self.info = None
        # The caller's torch grad mode (thread-local): gRPC's sync client pulls the blocks on a
        # thread of its own, where the caller's torch.no_grad() does not hold.
        self._grad_mode = _callers_grad_mode()

    def requests(self):
        """The encoded requests, from a sync iterable of blocks (pulled, and checked, in the
        caller's grad mode)."""
        try:
            blocks = iter(self.blocks)
            while True:
                with self._grad_mode():
                    block = next(blocks, _ENDED)
                    if block is _ENDED:
                        break
                    messages = self._messages(block)  # Checked here; encoded as sent.
                yield from messages
            self._check_complete()
        except Exception as error:
            self.error = error
            raise

    async def async_requests(self):
        """The encoded requests, from an async or a sync iterable of blocks."""
        try:
            async for block in _as_async(self.blocks):
                with self._grad_mode():
                    messages = self._messages(block)
                for message in messages:
                    yield message
            self._check_complete()
        except Exception as error:
            self.error = error
            raise

    def _messages(self, block):
        """Checks block (in the caller's grad mode) and counts its tokens as sent; returns an
        iterator that encodes its messages one at a time, as the transport takes them."""
        try:
            q, k, v = block
        except (TypeError, ValueError):
            raise errors.invalid(f"blocks: each block is (q, k, v), got {type(block).__name__}")
        q, k, v = _host_tensors(q, k, v)
        tokens = q.shape[1]
        header = None
        if self.first is None:
            self.first, self.first_kv = q, k
            header = _stream_header(q, k, self.seq_len, self.spec, self.request_id,
                                    self.priority)
        elif (q.shape[0], q.shape[2], q.shape[3], k.shape[2]) != (
                self.first.shape[0], self.first.shape[2], self.first.shape[3],
                self.first_kv.shape[2]) or not q.same_kind(self.first):
            raise errors.invalid(
                f"blocks: the block at token {self.sent} has query shape {list(q.shape)}, "
                f"kv_heads {k.shape[2]} and dtype {q.dtype_name}; the first block had "
                f"{list(self.first.shape)}, {self.first_kv.shape[2]} and "
                f"{self.first.dtype_name}")
        if self.sent + tokens > self.seq_len:
            raise errors.invalid(f"blocks: {self.sent + tokens} tokens so far, past seq_len "
                                 f"{self.seq_len}")
        token_start = self.sent
        self.sent += tokens
        return self._encoded(header, token_start, q, k, v)

    def _encoded(self, header, token_start, q, k, v):
        if header is not None:
            yield header
        step = _block_tokens(q, k, self.message_limit, 0)
        for start in range(0, q.shape[1], step):
            end = min(q.shape[1], start + step)
            yield _block_message(token_start + start, q, k, v, start, end)

    def _check_complete(self):
        if self.sent != self.seq_len:
            raise errors.invalid(f"blocks: ended after {self.sent} of seq_len {self.seq_len} "
                                 "tokens")

    def take_stream_message(self, data):
        """The OutputBlock of an encoded AttendStreamResponse (None for the header and the
        trailer, whose info is kept)."""
        kind, *rest = _read_stream_message(data)
        if kind == "trailer":
            self.info = rest[0]
            return None
        if kind != "block":
            return None
        start, count, data = rest
        if start != self.received or count < 1 or start + count > self.seq_len:
            raise _internal(f"output block of {count} tokens at token {start}, expected token "
                            f"{self.received}")
        batch, _, heads, head_dim = self.first.shape
        raw = self.first.empty((batch, count, heads, head_dim))
        np.copyto(raw, _rows_from_wire(data, raw.dtype, raw.shape, "an output block"))
        self.received += count
        return OutputBlock(start, self.first.give_back(raw))

    def finish(self):
        """The execution info, once every output token has arrived."""
        if self.received != self.seq_len or self.info is None:
            raise _internal(f"the answer ended after {self.received} of {self.seq_len} tokens")
        return self.info

    def failure(self, error):
        """What to raise for a failed call: the caller's own exception when its blocks caused
        the failure, else the call's status."""
        return self.error if self.error is not None else errors.from_rpc_error(error)


def _warm_up_request(shapes):
    request = pb.WarmUpRequest()
    known = {"shape", "segments", "dilations", "kv_heads", "dtype", "causal", "mode",
             "precision", "scale", "out_dtype"}
    for i, shape in enumerate(shapes):
        unknown = sorted(set(shape) - known)
        if unknown or not {"shape", "segments", "dilations"} <= set(shape):
            raise errors.invalid(f"shapes[{i}]: keys {sorted(shape)}; needs shape, segments and "
                                 f"dilations, may have {sorted(known - {'shape'})}")
        try:
            batch, seq_len, heads, head_dim = (int(n) for n in shape["shape"])
        except (TypeError, ValueError):
            raise errors.invalid(f"shapes[{i}].shape {shape['shape']!r} is not [batch, seq_len, "
                                 "heads, head_dim]") from None
        dtype = _dtype_name(shape.get("dtype", "float32"))
        if dtype not in _DTYPES:
            raise errors.invalid(f"shapes[{i}].dtype {dtype} is not float32, float16 or "
                                 "bfloat16")
        spec = _spec(shape["segments"], shape["dilations"], shape.get("causal", False),
                     shape.get("mode", "longnet"), shape.get("precision", "auto"),
                     shape.get("scale"))
        try:
            out_wire = _output_wire(shape.get("out_dtype"))
        except errors.InvalidArgument as error:
            raise errors.invalid(f"shapes[{i}].{error.message}") from None
        request.shapes.append(pb.StreamHeader(
            spec=spec, dtype=_DTYPES[dtype], batch=batch, seq_len=seq_len, heads=heads,
            kv_heads=int(shape.get("kv_heads", heads)), head_dim=head_dim, output_dtype=out_wire))
    return request


def _output_wire(out_dtype):
    """The wire dtype of attend's out_dtype; DTYPE_UNSPECIFIED (0) for None."""
    if out_dtype is None:
        return pb.DTYPE_UNSPECIFIED
    name = _dtype_name(out_dtype)
    if name not in _DTYPES:
        raise errors.invalid(f"out_dtype {name} is not float32, float16 or bfloat16")
    return _DTYPES[name]


def _dtype_name(dtype):
    """"float32", "float16", "bfloat16", ... of a name, a numpy dtype or type, or a torch dtype."""
    if isinstance(dtype, str):
        return dtype
    if type(dtype).__module__.startswith("torch"):
        return str(dtype).removeprefix("torch.")
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def _health_request(service):
    """HealthCheckRequest{service = 1}, encoded here so that the client needs no health
    package."""
    return _wire.join(_wire.bytes_field(1, [service.encode()])) if service else b""


def _health_status(answer):
    """The status of an encoded HealthCheckResponse{status = 1}."""
    status = dict(_wire.fields(answer)).get(1, 0)
    return {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}.get(
        status, str(status))
