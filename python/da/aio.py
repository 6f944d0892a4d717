"""da.aio.Client: da.Client on grpc.aio, so that many requests can be in flight from one event
loop.

    async with da.aio.Client("localhost:50051") as client:
        outputs = await asyncio.gather(*(client.attend(q, q, q, segments=[2048], dilations=[1])
                                         for q in batches))

The same arguments, results and exceptions as da.Client (da/_client.py), whose checks, requests
and output assembly it shares; only the calls are awaited.
"""

import grpc
import grpc.aio

from da import _client, _stub, errors
from da.v1 import attention_pb2 as pb


class Client:
    """da.Client's asyncio twin; see da.Client for the arguments. Use it as an async context
    manager, or await close()."""

    def __init__(self, target, *, tls_ca=None, tls_cert=None, tls_key=None, token=None,
                 timeout=None, options=(), max_message_bytes=1 << 30):
        self._channel = _client._make_channel(grpc.aio, target, tls_ca, tls_cert, tls_key,
                                              options, max_message_bytes)
        self._stub = _stub.AttentionServiceStub(self._channel)
        self._attend = self._channel.unary_unary(_client._ATTEND)
        self._attend_stream = self._channel.stream_stream(_client._ATTEND_STREAM)
        self._health = self._channel.unary_unary(_client._HEALTH_CHECK)
        self._token_metadata = [("authorization", f"Bearer {token}")] if token else []
        self._timeout = timeout
        self._message_limit = None

    async def close(self):
        """Closes the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    def _options(self, timeout, request_id=""):
        return _client._call_options(self._token_metadata, self._timeout, timeout, request_id)

    async def _call(self, method, request, timeout, request_id=""):
        try:
            return await method(request, **self._options(timeout, request_id))
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None

    async def info(self, timeout=None):
        """da.Client.info, awaited."""
        return await self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest(), timeout)

    async def health(self, service="", timeout=None):
        """da.Client.health, awaited."""
        return _client._health_status(
            await self._call(self._health, _client._health_request(service), timeout))

    async def warm_up(self, shapes, timeout=None):
        """da.Client.warm_up, awaited."""
        return await self._call(self._stub.WarmUp, _client._warm_up_request(shapes), timeout)

    async def _server_message_limit(self, timeout):
        if self._message_limit is None:
            self._message_limit = _client._message_limit(await self.info(timeout))
        return self._message_limit

    async def attend(self, q, k, v, *, segments, dilations, causal=False, mode="longnet",
                     precision="auto", scale=None, out=None, stream=None, block_tokens=0,
                     request_id="", priority=0, timeout=None, return_info=False,
                     progress=None):
        """da.Client.attend, awaited (progress is called on the event loop)."""
        job = _client._Attend(q, k, v, out, _client._spec(segments, dilations, causal, mode,
                                                          precision, scale),
                              request_id, priority, progress)
        limit = await self._server_message_limit(timeout)
        options = self._options(timeout, request_id)
        try:
            if job.streams(stream, limit):
                call = self._attend_stream(job.stream_requests(limit, block_tokens), **options)
                try:
                    async for message in call:
                        job.take_stream_message(message)
                finally:
                    call.cancel()
            else:
                job.take_unary_response(await self._attend(job.unary_request(), **options))
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None
        return job.result(return_info)

    def attend_blocks(self, blocks, *, seq_len, segments, dilations, causal=False,
                      mode="longnet", precision="auto", scale=None, request_id="", priority=0,
                      timeout=None):
        """da.Client.attend_blocks for `async for`; blocks may be an async or a sync iterable.
        Returns a BlockStream whose `info` is the execution info once it has ended."""
        spec = _client._spec(segments, dilations, causal, mode, precision, scale)
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

    async def __aiter__(self):
        client = self._client
        feed = _client._BlockFeed(*self._args,
                                  await client._server_message_limit(self._timeout))
        call = client._attend_stream(feed.async_requests(),
                                     **client._options(self._timeout, self._request_id))
        try:
            async for message in call:
                block = feed.take_stream_message(message)
                if block is not None:
                    yield block
            self.info = feed.finish()
        except grpc.RpcError as error:
            raise feed.failure(error) from None
        finally:
            call.cancel()
