"""da.aio.Client: da.Client on grpc.aio, so that many requests can be in flight from one event
loop.

    async with da.aio.Client("localhost:50051") as client:
        outputs = await asyncio.gather(*(client.attend(q, q, q, segments=[2048], dilations=[1])
                                         for q in batches))

The same arguments, results and exceptions as da.Client (da/_client.py), whose checks, requests
and output assembly it shares; only the calls are awaited.
"""

import asyncio
import contextlib
import time

import grpc
import grpc.aio

from da import _client, errors
from da.v1 import attention_pb2 as pb

# What grpc.aio (up to at least 1.85) reports for a write that fails because the call has ended,
# in place of the call's status (grpc/grpc#36066).
_LOST_STATUS = "Internal error from Core"


# Requests at least this large (q, k and v) are prepared and given back off the event loop.
_OFF_LOOP_BYTES = 16 << 20


def _nbytes(tensor):
    return int(getattr(tensor, "nbytes", 0) or 0)


async def _maybe_off_loop(off, fn, *args):
    """fn(*args): on a worker thread, in the caller's torch grad mode, when off; else here."""
    if not off:
        return fn(*args)
    grad_mode = _client._callers_grad_mode()

    def run():
        with grad_mode():
            return fn(*args)

    return await asyncio.to_thread(run)


def _raise_cancelled(call):
    """Inside `except asyncio.CancelledError` around awaiting call: da.Cancelled, as da.Client
    raises, where the call was cancelled (close() of the client or of a BlockStream) and the
    current task was not; else re-raises the task's own cancellation. Before Python 3.11
    (no Task.cancelling()) the two cannot be told apart, and the CancelledError stays."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    if call.cancelled() and cancelling is not None and cancelling() == 0:
        raise errors.Cancelled(grpc.StatusCode.CANCELLED,
                               _at_once(call.details()) or "cancelled") from None
    raise


def _raise_requests_error(error, call):
    """Inside `except asyncio.CancelledError` around reading a stream call: a call whose
    requests raised is cancelled (_write_requests), and reading it then raises CancelledError;
    raises the requests' exception (`error`, kept by da) instead, else as _raise_cancelled."""
    if error is not None:
        raise error from None
    _raise_cancelled(call)


async def _write_requests(call, requests):
    """Writes requests (a sync or async iterable) to call, then half-closes it: the task of da's
    that pulls a stream's requests. grpc.aio's own (for a request iterator given to the call)
    is cancelled with the call only while the call has not ended: one waiting in the caller's
    generator when the server ended the call stayed pending for good, holding the call and
    its blocks. A failed write ends this one (reading the call gives its status); requests that
    raise cancel the call, as grpc.aio does (da keeps their exception)."""
    try:
        async for request in _client._as_async(requests):
            await call.write(request)
        await call.done_writing()
    except (grpc.RpcError, asyncio.InvalidStateError):
        pass  # The call has ended.
    except Exception:  # Kept by the requests' generator (_Part.requests, _BlockFeed).
        call.cancel()


class _Stream:
    """An AttendStream call, its _KeptStatus, and the task that writes its requests."""

    def __init__(self, call, requests, deadline):
        self.call = call
        self.kept = _KeptStatus(call, deadline)
        self._writer = asyncio.ensure_future(_write_requests(call, requests))

    def cancel(self):
        """Cancels the call (nothing once it has ended; else it stops the server's work) and
        the writer."""
        self.call.cancel()
        self._writer.cancel()

    async def end(self):
        """cancel(), then waits for the writer to end (the caller's generator closed with it)."""
        self.cancel()
        await asyncio.wait([self._writer])


def _at_once(coroutine):
    """The value of a coroutine that returns without waiting (a finished call's code() or
    details()); None, closing it, where it would wait."""
    try:
        coroutine.send(None)
    except StopIteration as returned:
        return returned.value
    coroutine.close()
    return None


def _lost(code, details):
    return code == grpc.StatusCode.INTERNAL and details == _LOST_STATUS


def _failed(code, details):
    """A failed call's status, not grpc.aio's stand-in for it."""
    return code is not None and code != grpc.StatusCode.OK and not _lost(code, details)


class _KeptStatus:
    """A stream call's status as the server sent it, where grpc.aio reports a failed write
    instead (grpc/grpc#36066). A write that fails because the call has ended sets the call's
    status to INTERNAL (_LOST_STATUS) whether or not Core already delivered the server's: if the
    server's came first, the first status (taken here, as the call finishes) is it; if the write
    failure came first, Core's status replaces it a moment later. Measured before this: a server
    draining mid-transfer reached 3 of 6 asyncio callers as INTERNAL instead of UNAVAILABLE, a
    stream the server ended as idle 4 of 4 instead of DEADLINE_EXCEEDED."""

    # How long a lost status may wait for Core's: it follows on the event loop at once where the
    # server ended the call; only a write that failed for a reason of Core's own waits it out.
    WAIT_S = 1.0

    def __init__(self, call, deadline):
        self._call = call
        self._deadline = deadline
        self._first = None
        call.add_done_callback(self._finished)

    def _finished(self, call):  # Once: as the call's first status is set, with its metadata.
        self._first = (_at_once(call.code()), _at_once(call.details()),
                       _at_once(call.initial_metadata()), _at_once(call.trailing_metadata()))

    async def of(self, error):
        """error, or the call's own status where grpc.aio lost it."""
        if not (isinstance(error, grpc.RpcError) and _lost(error.code(), error.details())):
            return error
        if self._first is not None and _failed(*self._first[:2]):
            return _client._Status(*self._first)
        give_up = time.monotonic() + self.WAIT_S
        while time.monotonic() < give_up:
            code, details = await self._call.code(), await self._call.details()
            if _failed(code, details):
                return _client._Status(code, details, *await self._metadata())
            await asyncio.sleep(0.005)
        # No status followed: past the call's deadline, the deadline is what ended it, as the sync
        # client reports (before _KeptStatus, 7 of 8 streams whose deadline passed mid-transfer
        # ended as INTERNAL).
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return _client._Status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        return error

    async def _metadata(self):
        """The ended call's initial and trailing metadata."""
        return await self._call.initial_metadata(), await self._call.trailing_metadata()


async def _retrying(attempts, attempt, answered=lambda: False):
    """await attempt(timeout) under attempts (a _client._Attempts) until it returns or raises
    other than a refusal to retry (see da.Retry); answered() says whether some of the attempt's
    answer was taken."""
    while True:
        try:
            return await attempt(attempts.next_timeout())
        except grpc.RpcError as error:
            pause = attempts.pause(error, answered())
            if pause is None:
                raise attempts.given_back(error) from None
            await asyncio.sleep(pause)


class Client:
    """da.Client's asyncio twin; see da.Client for the arguments. Use it as an async context
    manager, or await close()."""

    def __init__(self, target, *, tls_ca=None, tls_cert=None, tls_key=None, token=None,
                 timeout=None, options=(), max_message_bytes=1 << 30, retry=_client.Retry(),
                 max_connection_age=None):
        # Calls take the multicallables of the channel of their attempt (_multicallable).
        self._token_metadata = [("authorization", f"Bearer {token}")] if token else []
        self._timeout = timeout
        self._retry = _client._check_retry(retry)
        self._message_limit = None
        self._max_message_bytes = max_message_bytes
        self._admits_streams = False  # The server lists _client._STREAM_ADMITTED.
        self._channel_args = _client._channel_args(target, tls_ca, tls_cert, tls_key, options,
                                                   max_message_bytes)
        # The client's channel and those of parallel streams, renewed by age (as da.Client's).
        self._connections = _client._Connections(
            grpc.aio, self._channel_args, _client._check_connection_age(max_connection_age))
        self._retry_channels = set()  # Those of retries in flight (_attempt_channel).
        self._closed = False

    @property
    def connections_renewed(self):
        """da.Client.connections_renewed."""
        return self._connections.renewed

    async def close(self):
        """Closes the channels; calls in flight are cancelled, and later calls raise
        da.Cancelled."""
        self._closed = True
        channels = [*self._retry_channels, *self._connections.close()]
        self._retry_channels = set()
        for channel in channels:
            await channel.close()

    @contextlib.asynccontextmanager
    async def _held(self, index=0):
        """da.Client._held: channel `index` for one call, from its first attempt to its end."""
        channel, stale = self._connections.take(index)
        try:
            if stale is not None:
                await asyncio.shield(stale.close())
            yield channel
        finally:
            done = self._connections.give_back(channel)
            if done is not None:  # Closed even when the task is cancelled meanwhile.
                await asyncio.shield(done.close())

    @contextlib.asynccontextmanager
    async def _attempt_channel(self, attempts, channel):
        """da.Client._attempt_channel: channel for a call's first attempt, a connection of its
        own for a retry, closed after it."""
        if attempts.made <= 1:
            yield channel
            return
        _client._check_open(self._closed)
        fresh = _client._fresh_channel(grpc.aio, self._channel_args)
        self._retry_channels.add(fresh)
        try:
            yield fresh
        finally:
            try:  # Closed even when the task is cancelled meanwhile.
                await asyncio.shield(fresh.close())
            finally:
                self._retry_channels.discard(fresh)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    def _options(self, timeout, request_id=""):
        """A call's options; every call takes them first (Cancelled once closed)."""
        _client._check_open(self._closed)
        return _client._call_options(self._token_metadata, self._timeout, timeout, request_id)

    async def _call(self, name, request, timeout, request_id="", retry=True):
        """The unary RPC name (_client._multicallable) with request, retried under self._retry
        (when retry)."""
        attempts = _client._Attempts(self._retry if retry else _client._ONCE,
                                     _client._deadline(self._timeout, timeout))
        try:
            async with self._held() as first:
                return await _retrying(attempts, lambda left: self._unary(
                    attempts, first, name, request, self._options(left, request_id)))
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None

    async def _unary(self, attempts, first, name, request, options):
        """One attempt of a unary call whose first went on channel first; a task cancelled
        meanwhile cancels it."""
        async with self._attempt_channel(attempts, first) as channel:
            call = _client._multicallable(channel, name)(request, **options)
            try:
                return await call
            except asyncio.CancelledError:
                _raise_cancelled(call)

    async def info(self, timeout=None):
        """da.Client.info, awaited."""
        return await self._call("GetServerInfo", pb.GetServerInfoRequest(), timeout)

    async def health(self, service="", timeout=None):
        """da.Client.health, awaited."""
        return _client._health_status(
            await self._call("Health", _client._health_request(service), timeout, retry=False))

    async def warm_up(self, shapes, timeout=None):
        """da.Client.warm_up, awaited."""
        return await self._call("WarmUp", _client._warm_up_request(shapes), timeout)

    async def _server_message_limit(self, timeout):
        if self._message_limit is None:
            info = await self.info(timeout)
            self._admits_streams = _client._STREAM_ADMITTED in info.protocol_features
            self._message_limit = _client._message_limit(info, self._max_message_bytes)
        return self._message_limit

    def _open_stream(self, requests, options, deadline, channel):
        """A _Stream: an AttendStream call on channel sending requests;
        its blocks wait for the server's admission where the server gives one
        (_client._after_admission: a refusal then never meets a write in flight). After
        _server_message_limit."""
        method = _client._multicallable(channel, "AttendStream")
        if self._admits_streams:
            options = dict(options, metadata=[*options["metadata"], _client._ADMISSION_REQUEST])
        call = method(**options)
        if self._admits_streams:
            requests = _client._after_admission(requests, call)
        return _Stream(call, requests, deadline)

    async def attend(self, q, k, v, *, segments, dilations, causal=False, mode="longnet",
                     precision="auto", scale=None, out=None, stream=None, block_tokens=0,
                     parallel_streams=1, request_id="", priority=0, timeout=None,
                     return_info=False, progress=None, out_dtype=None):
        """da.Client.attend, awaited (progress is called on the event loop; parallel streams
        are tasks on it)."""
        spec = _client._spec(segments, dilations, causal, mode, precision, scale)
        parts = _client._check_parallel_streams(parallel_streams)
        # A large request's copies (a strided or GPU input gathered on the host, the unary
        # message, the output given back) run on a worker thread, so that the event loop goes on.
        large = sum(_nbytes(t) for t in (q, k, v)) >= _OFF_LOOP_BYTES
        job = await _maybe_off_loop(large, _client._Attend, q, k, v, out, spec, request_id,
                                    priority, progress, block_tokens, out_dtype)
        deadline = _client._deadline(self._timeout, timeout)
        limit = await self._server_message_limit(timeout)
        _client._check_open(self._closed)
        attempts = _client._Attempts(self._retry, deadline)
        try:
            if job.streams(stream, limit) and len(job.cut(parts)) > 1:
                await self._stream_parts(job, limit, block_tokens, deadline)
            elif job.streams(stream, limit):
                part = job.parts[0]
                try:
                    async with self._held() as first:
                        await _retrying(attempts, lambda left: self._stream_part(
                            attempts, part, limit, block_tokens, left, deadline, first),
                            lambda: part.answered)
                except grpc.RpcError as error:
                    raise part.failure(error) from None
            else:
                request = await _maybe_off_loop(large, job.unary_request)
                async with self._held() as first:
                    response = await _retrying(attempts, lambda left: self._unary(
                        attempts, first, "Attend", request, self._options(left, request_id)))
                await _maybe_off_loop(large, job.take_unary_response, response)
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None
        job.complete()  # Progress is reported on the event loop.
        return job.packaged(await _maybe_off_loop(large, job.output.result), return_info)

    async def _stream_part(self, attempts, part, limit, block_tokens, timeout, deadline,
                           first):
        """One attempt (of attempts) of part's stream (the whole request, or a part of a
        parallel one), whose first attempt went on channel first: its answers written into the
        output;
        raises its failure as a grpc.RpcError (the server's status where grpc.aio lost it). The
        call ends with it (cancelled when it has not)."""
        part.restart()
        async with self._attempt_channel(attempts, first) as channel:
            opened = self._open_stream(part.requests(limit, block_tokens),
                                       self._options(timeout, part.request_id), deadline,
                                       channel)
            try:
                async for message in opened.call:
                    part.take_message(message)
            except grpc.RpcError as error:
                raise (await opened.kept.of(error)) from None
            except asyncio.CancelledError:
                _raise_requests_error(part.error, opened.call)
            finally:
                await opened.end()

    async def _stream_parts(self, job, limit, block_tokens, deadline):
        """Streams job's parts as concurrent calls, a task each; a part the server refuses
        unread is sent again on its own (self._retry). Raises the first part's failure after
        cancelling every call."""

        async def take(index, part):
            attempts = _client._Attempts(self._retry, deadline)
            try:
                # This client's connection for the first part, connections of their own for
                # the others.
                async with self._held(index) as channel:
                    await _retrying(attempts, lambda left: self._stream_part(
                        attempts, part, limit, block_tokens, left, deadline, channel),
                        lambda: part.answered)
            except grpc.RpcError as error:
                raise part.failure(error) from None

        _client._check_open(self._closed)
        tasks = [asyncio.ensure_future(take(index, part)) for index, part in enumerate(job.parts)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:
                if task in done and task.exception() is not None:
                    raise task.exception()
        finally:
            for task in tasks:
                task.cancel()  # Each ends its call as it ends (_stream_part).
            await asyncio.gather(*tasks, return_exceptions=True)

    def attend_blocks(self, blocks, *, seq_len, segments, dilations, causal=False,
                      mode="longnet", precision="auto", scale=None, request_id="", priority=0,
                      timeout=None):
        """da.Client.attend_blocks for `async for`; blocks may be an async or a sync iterable.
        Returns a BlockStream whose `info` is the execution info once it has ended."""
        spec = _client._spec(segments, dilations, causal, mode, precision, scale)
        _client._check_priority(priority)
        _client._check_seq_len(seq_len)
        return BlockStream(self, blocks, seq_len, spec, request_id, priority, timeout)


class BlockStream:
    """The output of da.aio.Client.attend_blocks: an async iterator of OutputBlocks, and `info`
    (the ExecutionInfo message) once it has ended. Leaving the loop early cancels the call."""

    def __init__(self, client, blocks, seq_len, spec, request_id, priority, timeout):
        self.info = None
        self._client = client
        self._args = (blocks, seq_len, spec, request_id, priority)
        self._timeout = timeout
        self._request_id = request_id
        self._stream = None

    async def __aiter__(self):
        client = self._client
        deadline = _client._deadline(client._timeout, self._timeout)
        feed = _client._BlockFeed(*self._args,
                                  await client._server_message_limit(self._timeout))
        timeout = _client._left(deadline)
        async with client._held() as channel:
            stream = client._open_stream(feed.async_requests(),
                                         client._options(timeout, self._request_id), deadline,
                                         channel)
            self._stream = stream
            try:
                async for message in stream.call:
                    block = feed.take_stream_message(message)
                    if block is not None:
                        yield block
                self.info = feed.finish()
            except grpc.RpcError as error:
                raise feed.failure(await stream.kept.of(error)) from None
            except asyncio.CancelledError:
                _raise_requests_error(feed.error, stream.call)
            finally:
                await stream.end()
                # Not kept past its end: a grpc.aio call holds its connection open, even once
                # the channel is closed (a channel replaced for its age, _Connections).
                self._stream = None

    def close(self):
        """Cancels the call (if it has not ended), as leaving the loop early does; for a loop
        left early, where the async generator's own clean-up waits for the event loop's."""
        if self._stream is not None:
            self._stream.cancel()
